"""Cohere's Command R, R7B, A and Aya Expanse (`CohereForCausalLM`, `Cohere2ForCausalLM`): one LayerNorm (no bias)
feeding attention and the MLP side by side, `x + attn(norm(x)) + mlp(norm(x))`, rotary dims in interleaved pairs,
logits scaled by `logit_scale`, tied embeddings; Cohere 2 adds sliding windows on three layers of four, and its full
layers turn no positions (`ModelConfig.layer_rope`)."""

from __future__ import annotations

import flax.linen as nn

from models.families.llama import LAYER_GGUF  # noqa: F401  (the same tensor names)
from models.layers.causal_lm import Block
from models.layers.linear import norm

ARCHITECTURES = ("CohereForCausalLM", "Cohere2ForCausalLM")
GGUF_ARCHS = ("command-r", "cohere2")


class DecoderLayer(Block):
    """`x + attn(norm(x)) + mlp(norm(x))`: attention and the MLP read the same normalized input (Cohere's, Phi's)."""

    @nn.compact
    def __call__(self, carry, layer, positions, table, stacks=None, adapters=None):
        """One layer over `carry` (`Block`'s call)."""
        x, k_cache, v_cache = carry
        cfg = self.cfg
        h = norm(cfg, "input_layernorm")(x)
        a, k_cache, v_cache = self.attend(h, positions, table, k_cache, v_cache, layer, stacks, adapters)
        return (x + a + self.feed_forward(h, layer, stacks, adapters), k_cache, v_cache), None
