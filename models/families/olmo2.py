"""OLMo 2 and OLMo 3 (AI2's open models): norms after each block rather than before (`x + norm(attn(x))`, then
`x + norm(mlp(x))`), and q/k norms over all heads' values together (`ModelConfig.qk_norm_whole`); OLMo 3 adds
sliding-window layers (three to each full one, by its `layer_types`). llama.cpp writes both as an `olmo2` GGUF with
q and k as they are."""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from models.config import ModelConfig
from models.families.llama import LAYER_GGUF as _LLAMA
from models.layers.attention import Attention
from models.layers.causal_lm import Block
from models.layers.linear import RMSNorm
from models.layers.mlp import MLP

ARCHITECTURES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
GGUF_ARCHS = ("olmo2",)


class DecoderLayer(Block):
    """`x + norm(attn(x))`, then `x + norm(mlp(x))`."""

    @nn.compact
    def __call__(self, carry, layer, positions, table, stacks=None, adapters=None):
        """One layer over `carry` (`Block`'s call)."""
        x, k_cache, v_cache = carry
        cfg = self.cfg
        h, k_cache, v_cache = Attention(cfg, self.backend, name="self_attn")(x, positions, table, k_cache, v_cache,
                                                                             layer, stacks and stacks["self_attn"],
                                                                             self.first, adapters)
        x = x + RMSNorm(cfg.rms_eps, 0.0, cfg.dtype, name="post_attention_layernorm")(h)
        h = MLP(cfg, name="mlp")(x, layer, stacks and stacks["mlp"], adapters)
        return (x + RMSNorm(cfg.rms_eps, 0.0, cfg.dtype, name="post_feedforward_layernorm")(h), k_cache, v_cache), None


LAYER_GGUF = {**_LLAMA, "post_attention_layernorm": "post_attention_norm",
              "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_fix(cfg: ModelConfig, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """OLMo 2 GGUF tensors are read as they are (GGML's NeoX RoPE turns halves, as the checkpoints do)."""
    return w
