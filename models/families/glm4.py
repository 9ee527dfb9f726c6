"""GLM-4 (the 0414 models, GLM-Z1): Gemma's sandwich layer without the `1 + w` scales (`x + norm(attn(norm(x)))`,
then the same around the MLP), q/k/v biases, a partial rotary factor whose dims turn in interleaved pairs
(`ModelConfig.rope_interleave`), and gate and up fused in one `gate_up_proj` (split as Phi-3's are). Its checkpoints
name the norms `post_self_attn_layernorm` (after attention), `post_attention_layernorm` (before the MLP) and
`post_mlp_layernorm`; llama.cpp's `glm4` GGUF names them as Gemma's, fuses gate and up in `ffn_up` and keeps q and k
as they are (GGML's normal RoPE turns interleaved pairs)."""

from __future__ import annotations

from models.families.gemma3 import LAYER_GGUF, DecoderLayer  # noqa: F401  (the sandwich layer, config-driven)
from models.families.phi3 import HF_FUSED as _PHI3

ARCHITECTURES = ("Glm4ForCausalLM",)
GGUF_ARCHS = ("glm4",)

LAYER_GGUF = {**LAYER_GGUF, "mlp/gate_proj": "ffn_up"}  # gate and up in one tensor, as the checkpoints hold them
HF_FUSED = {name: fused for name, fused in _PHI3.items() if name.startswith("mlp/")}
GGUF_FUSED = {name: take for name, (_, take) in HF_FUSED.items()}

# Our sandwich layer's norms -> GLM-4's names.
_NORMS = {"post_attention_layernorm": "post_self_attn_layernorm",
          "pre_feedforward_layernorm": "post_attention_layernorm", "post_feedforward_layernorm": "post_mlp_layernorm"}


def hf_name(name: str) -> str:
    """Our mechanical HF name -> GLM-4's (the three norms around the blocks)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[3] in _NORMS:  # model.layers.{i}.{norm}.weight
        parts[3] = _NORMS[parts[3]]
    return ".".join(parts)
