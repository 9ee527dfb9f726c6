"""Baidu's ERNIE 4.5 mixtures of experts (21B-A3B, 300B-A47B): ERNIE 4.5's layer (the Llama layer with its RoPE in
interleaved pairs) and, on the layers from `moe_layer_start_index` every `moe_layer_interval`, a mixture of experts
routed by softmax scores whose choice adds a learned bias (`moe_statics`), renormalized, beside ungated shared
experts. The checkpoints name the shared experts `shared_experts` and keep the bias as `[1, experts]`. llama.cpp's
`ernie4_5-moe` GGUF keeps q and k as they are (GGML's RoPE turns ERNIE's pairs), the bias as the checkpoint has it,
and no end index for the MoE layers (they run to the last). The checkpoints' multi-token-prediction block
(`model.mtp_*`) is not used for decoding."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF as _LLAMA
from models.families.llama import DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("Ernie4_5_MoeForCausalLM",)
GGUF_ARCHS = ("ernie4_5-moe",)
LAYER_GGUF = {**_LLAMA, "mlp/gate/e_score_correction_bias": "exp_probs_b.bias"}


def hf_name(name: str) -> str:
    """Our mechanical HF name -> ERNIE's (`mlp.shared_expert.` -> `mlp.shared_experts.`)."""
    return name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")


# Our `module/leaf` -> (the checkpoint's tensor under `model.layers.{i}.`, what of it is ours).
HF_FUSED = {"mlp/gate/e_score_correction_bias": ("mlp.moe_statics.e_score_correction_bias",
                                                 lambda cfg, w: w.reshape(-1))}
GGUF_FUSED = {"mlp/gate/e_score_correction_bias": lambda cfg, w: w.reshape(-1)}  # `[1, experts]` there too
