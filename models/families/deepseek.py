"""DeepSeek-V2 and V3: the Llama layer with multi-head latent attention (`layers.mla`: the absorbed form over a
latent cache) and, after the first `first_k_dense_replace` dense layers, a mixture of experts plus ungated shared
experts, routed by softmax scores, greedy or group-limited (V2), or by sigmoid scores with a selection bias and
grouped top-k (V3). The checkpoints name the shared experts `shared_experts`; their multi-token-prediction layers
(past `num_hidden_layers`) are not used for decoding."""

from __future__ import annotations

import numpy as np

from models.config import ModelConfig
from models.families.llama import LAYER_GGUF as _LLAMA
from models.families.llama import DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
GGUF_ARCHS = ("deepseek2",)

LAYER_GGUF = {
    **_LLAMA,
    "self_attn/q_a_proj": "attn_q_a",
    "self_attn/q_a_layernorm": "attn_q_a_norm",
    "self_attn/q_b_proj": "attn_q_b",
    "self_attn/kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn/kv_a_layernorm": "attn_kv_a_norm",
    "self_attn/kv_b_proj": "attn_kv_b",
    "mlp/gate/e_score_correction_bias": "exp_probs_b.bias",
}


def hf_name(name: str) -> str:
    """Our mechanical HF name -> DeepSeek's (`mlp.shared_expert.` -> `mlp.shared_experts.`)."""
    return name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")


def join_kv_b(cfg: ModelConfig, k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """`kv_b_proj` from llama.cpp's parts: `k_b [H, kv_lora_rank, nope]` (each head's key rows, transposed) and
    `v_b [H, v_head_dim, kv_lora_rank]`, a head's key rows then its value rows."""
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, cfg.kv_lora_rank)


# llama.cpp's files since its MLA support (2025) store `attn_kv_b` as these two; older ones hold it whole.
GGUF_SPLITS = {"attn_kv_b": (("attn_k_b", "attn_v_b"), join_kv_b)}
