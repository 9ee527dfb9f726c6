"""MiniMax-M2 (and M2.1): the Llama layer with q/k norms over all heads' values together (OLMo 2's,
`ModelConfig.qk_norm_whole`), RoPE on part of each head (its `rotary_dim`), and on every layer a mixture of experts
routed as DeepSeek-V3's without groups: sigmoid scores, the choice adding a learned bias, renormalized. Its
checkpoints name the block as Mixtral's (`block_sparse_moe`, experts `w1` / `w3` / `w2`), with the bias beside the
router (`block_sparse_moe.e_score_correction_bias`). llama.cpp writes it as a `minimax-m2` GGUF with q and k as they
are (its graph turns NeoX's halves), the turning width as `rope.dimension_count` and the bias as `exp_probs_b`."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF as _LLAMA
from models.families.llama import DecoderLayer  # noqa: F401  (the same layer, config-driven)
from models.families.mixtral import hf_name as _mixtral

ARCHITECTURES = ("MiniMaxM2ForCausalLM",)
GGUF_ARCHS = ("minimax-m2",)
LAYER_GGUF = {**_LLAMA, "mlp/gate/e_score_correction_bias": "exp_probs_b.bias"}


def hf_name(name: str) -> str:
    """Our mechanical HF name -> MiniMax-M2's (Mixtral's, the router's bias beside the router)."""
    return _mixtral(name).replace(".gate.e_score_correction_bias", ".e_score_correction_bias")
