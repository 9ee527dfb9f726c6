"""OLMo 2 and OLMo 3 (AI2's open models) and EXAONE 4 (LG's): norms after each block rather than before
(`x + norm(attn(x))`, then `x + norm(mlp(x))`), and q/k norms, over all heads' values together in OLMo's
(`ModelConfig.qk_norm_whole`) and per head in EXAONE's; OLMo 3 and EXAONE 4 add sliding-window layers (three to each
full one, by their `layer_types`), and EXAONE's full layers then turn no positions (`ModelConfig.layer_rope`).
llama.cpp writes both OLMos as an `olmo2` GGUF with q and k as they are."""

from __future__ import annotations

import flax.linen as nn

from models.families.llama import LAYER_GGUF as _LLAMA
from models.layers.causal_lm import Block
from models.layers.linear import norm

ARCHITECTURES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM", "Exaone4ForCausalLM")
GGUF_ARCHS = ("olmo2", "exaone4")


class DecoderLayer(Block):
    """`x + norm(attn(x))`, then `x + norm(mlp(x))`."""

    @nn.compact
    def __call__(self, carry, layer, positions, table, stacks=None, adapters=None):
        """One layer over `carry` (`Block`'s call)."""
        x, k_cache, v_cache = carry
        cfg = self.cfg
        h, k_cache, v_cache = self.attend(x, positions, table, k_cache, v_cache, layer, stacks, adapters)
        x = x + norm(cfg, "post_attention_layernorm")(h)
        h = self.feed_forward(x, layer, stacks, adapters)
        return (x + norm(cfg, "post_feedforward_layernorm")(h), k_cache, v_cache), None


LAYER_GGUF = {**_LLAMA, "post_attention_layernorm": "post_attention_norm",
              "post_feedforward_layernorm": "post_ffw_norm"}
