"""One entry point `attend(q, k, v, spec, sink)` over a registry of attention backends."""
from sinkfree.attention.spec import AttentionSpec
from sinkfree.attention.registry import BackendInfo, check_spec, get_backend, list_backends, register_backend
from sinkfree.attention.eager import attend_with_probs, causal_visible
from sinkfree.attention import sdpa as _sdpa  # noqa: F401  (registers the default backend)
# Triton backends: these modules import sinkfree_kernels' ops (and triton) only when first called
from sinkfree.attention import flash as _flash, block_sparse as _block_sparse, topk as _topk, vsa as _vsa  # noqa: F401
from sinkfree.attention.dispatch import attend

__all__ = ["AttentionSpec", "attend", "attend_with_probs", "register_backend", "get_backend",
           "list_backends", "BackendInfo", "check_spec", "causal_visible"]
