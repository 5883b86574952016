"""Models: the Llama-style decoder (`LLM`, `LLMConfig`) and generation."""
from sinkfree.models.generate import generate
from sinkfree.models.llm import LLM, PRESETS, Block, LLMConfig

__all__ = ["LLM", "LLMConfig", "Block", "PRESETS", "generate"]
