"""Every sink switch compiles with torch.compile(fullgraph=True) on a GPU: no graph breaks."""

from __future__ import annotations

import pytest
import torch

from sinkfree.models.llm import LLM, LLMConfig

pytestmark = pytest.mark.gpu

# Every value of every switch appears at least once; combined so the GPU check compiles few graphs.
SWITCHES = [
    {},
    {"attn_gate": "headwise", "attn_sink": "off_by_one", "residual_sink": "preaffine", "norm": "zero_centered"},
    {"attn_gate": "elementwise", "attn_sink": "learnable", "residual_sink": "gatednorm", "qk_norm": True,
     "outlier_clip": 50.0},
    {"residual_sink": "gatednorm", "gatednorm_identity_init": True, "attn_gate": "elementwise",
     "attn_gate_identity_init": True},
    {"norm": "dyt", "fused_proj": False},
    {"residual_sink": "gatednorm", "attn_gate": "elementwise", "attn_bias": True, "gatednorm_kernel": "triton_gate"},
    {"norm": "identity", "attn_softmax": "sigmoid", "attn_backend": "eager", "attn_logit_clip": 30.0},
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "plain")
def test_switch_compiles_without_graph_breaks(switches: dict) -> None:
    torch._dynamo.reset()
    cfg = LLMConfig.from_name("tiny", block_size=256, **switches)
    model = LLM(cfg).cuda()
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = compiled(idx)
        eager = model(idx)
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(logits.float(), eager.float(), atol=5e-2, rtol=5e-2)
