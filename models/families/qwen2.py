"""Qwen2 family: the Llama layer with biases on the q/k/v projections (set by `ModelConfig.attention_bias`)."""

from __future__ import annotations

import numpy as np

from models.config import ModelConfig
from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (same layer, config-driven bias)

ARCHITECTURES = ("Qwen2ForCausalLM",)
GGUF_ARCHS = ("qwen2",)


def gguf_fix(cfg: ModelConfig, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """Qwen2 GGUF tensors need no fix-up (GGML uses NeoX RoPE for it)."""
    return w
