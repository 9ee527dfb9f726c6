"""Phi-1.5 and Phi-2 (`PhiForCausalLM`): Cohere's parallel layer (`families.cohere`) over LayerNorms with biases,
q/k/v and output projections with biases (the output named `dense`), a plain GELU MLP (`fc1`, `fc2`), a partial
rotary factor, a final `final_layernorm` and an LM head with a bias."""

from __future__ import annotations

from models.families.cohere import DecoderLayer  # noqa: F401  (the parallel layer, config-driven)
from models.families.llama import LAYER_GGUF  # noqa: F401  (the same tensor names)

ARCHITECTURES = ("PhiForCausalLM",)
GGUF_ARCHS = ("phi2",)

_NAMES = {".self_attn.o_proj.": ".self_attn.dense.", ".mlp.up_proj.": ".mlp.fc1.", ".mlp.down_proj.": ".mlp.fc2.",
          "model.norm.": "model.final_layernorm."}


def hf_name(name: str) -> str:
    """Our mechanical HF name -> Phi's."""
    for ours, theirs in _NAMES.items():
        name = name.replace(ours, theirs)
    return name
