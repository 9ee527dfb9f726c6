"""IBM Granite (3.x dense): the Llama layer with four multipliers, all config-driven: the embeddings'
(`embed_scale`), each block's output before the residual sum (`residual_scale`), the attention's softmax scale
(`query_scale`) and the logits' divisor (`logits_scaling`). llama.cpp's `granite` GGUF permutes q and k as Llama's."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF, DecoderLayer, gguf_fix  # noqa: F401  (the Llama layer and GGUF)

ARCHITECTURES = ("GraniteForCausalLM",)
GGUF_ARCHS = ("granite",)
