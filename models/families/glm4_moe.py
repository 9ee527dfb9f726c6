"""GLM-4.5, 4.6 and 4.7 (Z.ai's mixtures of experts): the Llama layer with grouped-query attention (q/k/v biases, a
partial rotary factor, q/k norms where the config asks) and, after the first `first_k_dense_replace` dense layers,
DeepSeek-V3's mixture of experts: sigmoid scores with a selection bias, grouped top-k, renormalized and scaled
weights, ungated shared experts. The checkpoints name the blocks as DeepSeek's do; their multi-token-prediction layers
(past `num_hidden_layers`) are not used for decoding. llama.cpp's `glm4moe` GGUF keeps q and k as they are (GGML's
NeoX RoPE) and names the norm before the MLP `post_attention_norm`."""

from __future__ import annotations

from models.families.deepseek import LAYER_GGUF as _DEEPSEEK
from models.families.deepseek import hf_name  # noqa: F401  (DeepSeek's names, the router's bias too)
from models.families.llama import DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("Glm4MoeForCausalLM",)
GGUF_ARCHS = ("glm4moe",)

LAYER_GGUF = {**_DEEPSEEK, "post_attention_layernorm": "post_attention_norm"}
