"""LightningModules: causal language modelling and flow-matching diffusion."""

from sinkfree.tasks.callbacks import EMA
from sinkfree.tasks.flow import RectifiedFlow, VSASparsityRamp
from sinkfree.tasks.lm import CausalLM

__all__ = ["EMA", "CausalLM", "RectifiedFlow", "VSASparsityRamp"]
