"""Qwen2-MoE and Qwen3-MoE: the Qwen2 (q/k/v biases) and Qwen3 (q/k norms) layers with a sparse mixture of experts
for the MLP of the layers `decoder_sparse_step` and `mlp_only_layers` pick; Qwen2-MoE adds a shared expert gated by
a sigmoid. The config says which (`models.config`); the checkpoints name everything as our modules do."""

from __future__ import annotations

import numpy as np

from models.config import ModelConfig
from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
GGUF_ARCHS = ("qwen2moe", "qwen3moe")


def gguf_fix(cfg: ModelConfig, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp stores the shared expert's gate `[1, hidden]` as a vector; nothing else needs a fix-up."""
    return w.reshape(1, -1) if gguf_name.endswith("ffn_gate_inp_shexp.weight") else w
