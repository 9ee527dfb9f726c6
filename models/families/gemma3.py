"""Gemma 2 and Gemma 3 text: sandwich norms with `1 + w` scales, scaled embeddings, GELU-tanh MLP, and sliding-window
and global attention layers (alternating in Gemma 2; five local-RoPE sliding layers to a global one in Gemma 3, which
adds q/k norms; Gemma 2 soft-caps its attention logits)."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from models.config import ModelConfig
from models.layers.causal_lm import Block
from models.layers.linear import norm

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
GGUF_ARCHS = ("gemma2", "gemma3")


class DecoderLayer(Block):
    """`x + post_norm(attn(pre_norm(x)))`, then `x + post_norm(mlp(pre_norm(x)))`."""

    @nn.compact
    def __call__(self, carry, layer, positions, table, stacks=None, adapters=None):
        """One layer over `carry` (`Block`'s call)."""
        x, k_cache, v_cache = carry
        cfg = self.cfg
        h = norm(cfg, "input_layernorm")(x)
        h, k_cache, v_cache = self.attend(h, positions, table, k_cache, v_cache, layer, stacks, adapters)
        x = x + norm(cfg, "post_attention_layernorm")(h)
        h = self.feed_forward(norm(cfg, "pre_feedforward_layernorm")(x), layer, stacks, adapters)
        return (x + norm(cfg, "post_feedforward_layernorm")(h), k_cache, v_cache), None


LAYER_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn/q_proj": "attn_q",
    "self_attn/k_proj": "attn_k",
    "self_attn/v_proj": "attn_v",
    "self_attn/o_proj": "attn_output",
    "self_attn/q_norm": "attn_q_norm",
    "self_attn/k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp/gate_proj": "ffn_gate",
    "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
}


def gguf_fix(cfg: ModelConfig, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp stores Gemma norm weights as `1 + w`; store them back as `w`."""
    return w - 1.0 if gguf_name.endswith("norm.weight") else w
