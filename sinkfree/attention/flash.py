"""`flash` backend: our dense Triton flash attention (sinks in the kernel); PyTorch reference on CPU."""
from __future__ import annotations

import os

import torch

from sinkfree.attention.registry import BackendInfo, register_backend
from sinkfree.attention.spec import AttentionSpec


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernels should run on x: CUDA tensors, or any tensor under TRITON_INTERPRET=1."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def flash_attention_backend(q, k, v, spec: AttentionSpec, sink=None) -> torch.Tensor:
    """Dense attention through sinkfree_kernels.flash_attention (causal bottom-right, GQA, sinks)."""
    if use_triton(q):
        from sinkfree_kernels import flash_attention

        return flash_attention(q, k, v, sink, spec.causal, spec.scale)[0]
    from sinkfree_kernels.reference import attention_reference

    return attention_reference(q, k, v, sink, spec.causal, spec.scale)[0]


FLASH = register_backend(BackendInfo(
    "flash", flash_attention_backend, supports_sink=True,
    description="sinkfree Triton flash attention (fwd+bwd, sinks in the kernel); head dims 64 and 128"))
