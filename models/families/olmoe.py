"""OLMoE (AI2's open mixture of experts): the Llama layer with q/k norms over all heads' values together (OLMo 2's,
`ModelConfig.qk_norm_whole`) and on every layer a sparse mixture of experts routed by softmax scores, top-k, not
renormalized (`norm_topk_prob`, false in the released models). The checkpoints name everything as our modules do.
llama.cpp writes it as an `olmoe` GGUF with q and k as they are."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF, DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("OlmoeForCausalLM",)
GGUF_ARCHS = ("olmoe",)
