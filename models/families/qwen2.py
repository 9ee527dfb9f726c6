"""Qwen2 family: the Llama layer with biases on the q/k/v projections (set by `ModelConfig.attention_bias`)."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (same layer, config-driven bias)

ARCHITECTURES = ("Qwen2ForCausalLM",)
GGUF_ARCHS = ("qwen2",)
