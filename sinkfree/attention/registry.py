"""Registry of attention backends and the checks of what each one supports."""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from sinkfree.attention.spec import AttentionSpec

# fn(q, k, v, spec, sink) -> out; q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), sink None or (Hq,) fp32.
BackendFn = Callable[..., "object"]


@dataclass(frozen=True)
class BackendInfo:
    """One attention backend: its function and the features it declares."""

    name: str
    fn: BackendFn
    supports_sink: bool = False
    supports_sigmoid: bool = False
    supports_logit_clip: bool = False
    supports_causal: bool = True
    supports_noncausal: bool = True
    description: str = ""


_BACKENDS: dict[str, BackendInfo] = {}


def register_backend(info: BackendInfo, replace: bool = False) -> BackendInfo:
    """Add a backend to the registry; re-registering a name needs replace=True."""
    if not isinstance(info, BackendInfo):
        raise TypeError(f"register_backend expects a BackendInfo, got {type(info).__name__}")
    if info.name in _BACKENDS and not replace and _BACKENDS[info.name] is not info:
        raise ValueError(f"attn_backend {info.name!r} is already registered; pass replace=True to override")
    _BACKENDS[info.name] = info
    return info


def _import_backend_module(name: str) -> None:
    # Optional backends live in sinkfree/attention/<name>.py and register themselves on import, so a
    # name from YAML works without anyone importing the module first.
    # A variant `<module>-<suffix>` (say `sage8-infer`) is registered by `<module>.py`.
    for mod in dict.fromkeys((name.replace("-", "_"), name.split("-")[0])):
        if not mod.isidentifier():
            continue
        module = f"{__package__}.{mod}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
            return


def list_backends() -> list[str]:
    """Names of the registered backends, sorted."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> BackendInfo:
    """The backend registered under `name`; ValueError naming `attn_backend` otherwise."""
    if name not in _BACKENDS:
        _import_backend_module(name)
    if name not in _BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not a registered attention backend; "
                         f"allowed: {list_backends()}")
    return _BACKENDS[name]


def _with(feature: str) -> list[str]:
    return [n for n in list_backends() if getattr(_BACKENDS[n], feature)]


def check_spec(spec: AttentionSpec, has_sink: bool = False) -> BackendInfo:
    """Raise ValueError if spec.backend cannot run this spec (with a sink if has_sink); return it."""
    info = get_backend(spec.backend)
    name = spec.backend
    if spec.softmax == "sigmoid" and has_sink:
        raise ValueError("attn_softmax=sigmoid has no normalisation for a sink logit to join; "
                         "use attn_sink=none with attn_softmax=sigmoid")
    if spec.softmax == "sigmoid" and not info.supports_sigmoid:
        raise ValueError(f"attn_softmax=sigmoid is not supported by attn_backend={name!r}; "
                         f"backends that support it: {_with('supports_sigmoid')}")
    if has_sink and not info.supports_sink:
        raise ValueError(f"attn_sink (sink logits) is not supported by attn_backend={name!r}; "
                         f"backends that support it: {_with('supports_sink')}")
    if spec.logit_clip is not None and not info.supports_logit_clip:
        raise ValueError(f"attn_logit_clip (attention logit clipping) is not supported by "
                         f"attn_backend={name!r}; backends that support it: {_with('supports_logit_clip')}")
    if spec.causal and not info.supports_causal:
        raise ValueError(f"causal attention is not supported by attn_backend={name!r}; "
                         f"backends that support it: {_with('supports_causal')}")
    if not spec.causal and not info.supports_noncausal:
        raise ValueError(f"non-causal attention is not supported by attn_backend={name!r}; "
                         f"backends that support it: {_with('supports_noncausal')}")
    return info
