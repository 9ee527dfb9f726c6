"""rednote's dots.llm1: the Llama layer with q/k norms per head (Qwen3's) and, after the first
`first_k_dense_replace` dense layers, DeepSeek-V3's mixture of experts (sigmoid scores with a selection bias, grouped
top-k, scaled weights, ungated shared experts). The checkpoints name the blocks as DeepSeek's do; llama.cpp writes
it as a `dots1` GGUF with q and k as they are (its graph turns NeoX's halves) and no expert groups (the release
has one)."""

from __future__ import annotations

from models.families.deepseek import LAYER_GGUF as _DEEPSEEK
from models.families.deepseek import hf_name  # noqa: F401  (DeepSeek's names, the router's bias too)
from models.families.llama import DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("Dots1ForCausalLM",)
GGUF_ARCHS = ("dots1",)
LAYER_GGUF = _DEEPSEEK
