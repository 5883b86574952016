"""LightningModules: causal language modelling (and, later, flow-matching diffusion)."""

from sinkfree.tasks.lm import CausalLM

__all__ = ["CausalLM"]
