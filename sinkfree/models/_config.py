"""Validation helpers shared by the model configs (`LLMConfig`, `DiTConfig`): one error message per kind of
mistake, so YAML errors read the same for every model."""
from __future__ import annotations

import dataclasses
import math


def none_to_off(config, names) -> None:
    """YAML `none`/null for a string switch means "none" (off)."""
    for name in names:
        if getattr(config, name) is None:
            setattr(config, name, "none")


def check_choice(field: str, value, allowed) -> None:
    """value must be one of allowed."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {list(allowed)}")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_ints(config, names) -> None:
    """Each field must be an int > 0 (bools rejected)."""
    for name in names:
        value = getattr(config, name)
        if not _is_positive_int(value):
            raise ValueError(f"{name}={value!r} must be a positive integer")


def check_optional_positive_ints(config, names) -> None:
    """Each field must be None or an int > 0 (bools rejected)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not _is_positive_int(value):
            raise ValueError(f"{name}={value!r} must be a positive integer or None")


def check_positive_finite(config, names) -> None:
    """Each field must be a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name}={value!r} must be a positive finite number")


def from_preset(cls, presets: dict[str, dict], kind: str, name: str, overrides: dict):
    """cls built from presets[name] with fields overridden by keyword; unknown presets and fields raise."""
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; allowed: {list(presets)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**{**presets[name], **overrides})
