"""LightningModules: causal language modelling and flow-matching diffusion."""

from sinkfree.tasks.flow import RectifiedFlow, VSASparsityRamp
from sinkfree.tasks.lm import CausalLM

__all__ = ["CausalLM", "RectifiedFlow", "VSASparsityRamp"]
