"""Qwen3 family: the Llama layer with RMSNorm on queries and keys per head (set by `ModelConfig.qk_norm`)."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (same layer, config-driven q/k norms)

ARCHITECTURES = ("Qwen3ForCausalLM",)
GGUF_ARCHS = ("qwen3",)
