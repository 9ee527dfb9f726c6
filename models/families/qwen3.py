"""Qwen3 family: the Llama layer with RMSNorm on queries and keys per head (set by `ModelConfig.qk_norm`)."""

from __future__ import annotations

import numpy as np

from models.config import ModelConfig
from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (same layer, config-driven q/k norms)

ARCHITECTURES = ("Qwen3ForCausalLM",)
GGUF_ARCHS = ("qwen3",)


def gguf_fix(cfg: ModelConfig, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """Qwen3 GGUF tensors need no fix-up."""
    return w
