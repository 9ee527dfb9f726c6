"""Gemma (the first): the Llama layer with `1 + w` norm scales, embeddings scaled by sqrt(hidden) and a GELU-tanh MLP,
all config-driven. llama.cpp's `gemma` GGUF stores the norms as `1 + w` and q and k as they are (Gemma 2 and 3, with
their sandwich norms, are `families.gemma3`)."""

from __future__ import annotations

from models.families.gemma3 import gguf_fix  # noqa: F401  (the norms back to w)
from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("GemmaForCausalLM",)
GGUF_ARCHS = ("gemma",)
