"""StarCoder2: the Llama layer (config-driven) over LayerNorms with biases, biases on every attention projection, a
plain GELU MLP (`c_fc`, `c_proj`) and a sliding window over every layer where the config sets one."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (the same layer and names)

ARCHITECTURES = ("Starcoder2ForCausalLM",)
GGUF_ARCHS = ("starcoder2",)


def hf_name(name: str) -> str:
    """Our mechanical HF name -> StarCoder2's (`mlp.up_proj` -> `mlp.c_fc`, `mlp.down_proj` -> `mlp.c_proj`)."""
    return name.replace(".mlp.up_proj.", ".mlp.c_fc.").replace(".mlp.down_proj.", ".mlp.c_proj.")
