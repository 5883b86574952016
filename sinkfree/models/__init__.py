"""Models: the Llama-style decoder (`LLM`, `LLMConfig`), generation, and the image/video DiT (`DiT`, `DiTConfig`)."""
from sinkfree.models.dit import DiT, DiTConfig
from sinkfree.models.generate import generate
from sinkfree.models.llm import LLM, PRESETS, Block, LLMConfig

__all__ = ["DiT", "DiTConfig", "LLM", "LLMConfig", "Block", "PRESETS", "generate"]
