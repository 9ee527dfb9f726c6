"""Phi-3 family (Phi-3, Phi-3.5, Phi-4, Phi-4-mini): the Llama layer, with q, k and v fused in one `qkv_proj` and
gate and up in one `gate_up_proj` (rows in that order, in the checkpoints and in llama.cpp's `phi3` GGUF alike),
split here as they are read; a sliding window over every layer where the config sets one (as transformers applies
it; llama.cpp does not), a partial rotary factor (Phi-4-mini) through `ModelConfig.rope_global`, and LongRoPE
(Phi-3.5-mini, Phi-4-mini: `config._inv_freq` says which of its factors turn)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from models.config import ModelConfig
from models.families.llama import LAYER_GGUF as _LLAMA
from models.families.llama import DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("Phi3ForCausalLM",)
GGUF_ARCHS = ("phi3",)

LAYER_GGUF = {**_LLAMA, "self_attn/q_proj": "attn_qkv", "self_attn/k_proj": "attn_qkv", "self_attn/v_proj": "attn_qkv",
              "mlp/gate_proj": "ffn_up", "mlp/up_proj": "ffn_up"}


def _rows(part: str) -> Callable[[ModelConfig, np.ndarray], np.ndarray]:
    """Our rows of a fused `qkv_proj` (q, k, v) or `gate_up_proj` (gate, up) weight."""

    def take(cfg: ModelConfig, w: np.ndarray) -> np.ndarray:
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter), "up": (inter, inter)}[part]
        return w[start:start + size]

    return take


# Our `module/leaf` -> (the checkpoint's fused tensor under `model.layers.{i}.`, our part of it).
HF_FUSED = {f"{module}/weight": (fused, _rows(part)) for module, fused, part in (
    ("self_attn/q_proj", "self_attn.qkv_proj.weight", "q"), ("self_attn/k_proj", "self_attn.qkv_proj.weight", "k"),
    ("self_attn/v_proj", "self_attn.qkv_proj.weight", "v"), ("mlp/gate_proj", "mlp.gate_up_proj.weight", "gate"),
    ("mlp/up_proj", "mlp.gate_up_proj.weight", "up"))}
GGUF_FUSED = {name: take for name, (_, take) in HF_FUSED.items()}
