"""Mixtral: the Llama layer with a sparse mixture of experts for its MLP (softmax top-k routing, renormalized).
Its checkpoints name the block `block_sparse_moe` and the experts' projections `w1` (gate), `w3` (up), `w2` (down);
llama.cpp writes it as a `llama` GGUF with `expert_count`, so its q and k rows are permuted as Llama's are."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF, DecoderLayer, gguf_fix  # noqa: F401  (the Llama layer and GGUF)

ARCHITECTURES = ("MixtralForCausalLM",)
GGUF_ARCHS = ()  # a `llama` GGUF with experts (models.loading.source.gguf_config)

_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hf_name(name: str) -> str:
    """Our mechanical HF name -> Mixtral's (`mlp.experts.{e}.gate_proj` -> `block_sparse_moe.experts.{e}.w1`)."""
    name = name.replace(".mlp.", ".block_sparse_moe.")
    for ours, theirs in _EXPERT.items():
        name = name.replace(f".{ours}.", f".{theirs}.")
    return name
