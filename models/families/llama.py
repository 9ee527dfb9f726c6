"""Llama family (Llama 2/3, SmolLM2, Mistral-style configs): pre-norm decoder layers with a gated SiLU MLP. The
layer is config-driven, so Gemma 1, Phi-3, Granite, SmolLM3, StarCoder2, GLM-4.5 and the mixtures of experts are
this layer too (their modules map their tensors)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.layers.causal_lm import Block
from models.layers.linear import norm

# Arcee's AFM (a plain ReLU-squared MLP), Seed-OSS (biased q/k/v) and ERNIE 4.5 (interleaved rotary pairs) are this
# layer and these names, their differences config fields.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "ArceeForCausalLM", "SeedOssForCausalLM",
                 "Ernie4_5ForCausalLM")
# llama.cpp writes Arcee as Llama (q and k permuted for GGML's RoPE, the MLP ungated); Seed-OSS and ERNIE 4.5 as
# the checkpoint has them (its RoPE, NeoX's or ERNIE's interleaved pairs, is the one their graphs run)
GGUF_ARCHS = ("llama", "mistral", "arcee", "seed_oss", "ernie4_5")
UNPERMUTED = ("SeedOssForCausalLM", "Ernie4_5ForCausalLM")


class DecoderLayer(Block):
    """`x + attn(norm(x))`, then `x + mlp(norm(x))`; the MLP is a mixture of experts where the config routes
    them (`layers.moe.feed_forward`: Mixtral, Qwen2-MoE and Qwen3-MoE are this layer) and latent attention where
    it has a KV latent (`layers.mla`: DeepSeek-V3)."""

    @nn.compact
    def __call__(self, carry, layer, positions, table, stacks=None, adapters=None):
        """One layer over `carry` (`Block`'s call)."""
        x, k_cache, v_cache = carry
        cfg = self.cfg
        h = norm(cfg, "input_layernorm")(x)
        h, k_cache, v_cache = self.attend(h, positions, table, k_cache, v_cache, layer, stacks, adapters)
        x = x + scaled(h, cfg.residual_scale)
        h = norm(cfg, "post_attention_layernorm")(x)
        h = scaled(self.feed_forward(h, layer, stacks, adapters), cfg.residual_scale)
        return (x + h, k_cache, v_cache), None


def scaled(h, scale: float):
    """A block's output times the config's residual scale (Granite's `residual_multiplier`; 1 elsewhere)."""
    return h if scale == 1.0 else h * jnp.asarray(scale, h.dtype)


# Per-layer tensors: our module path -> GGUF tensor name (HF names follow our paths mechanically).
LAYER_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn/q_proj": "attn_q",
    "self_attn/k_proj": "attn_k",
    "self_attn/v_proj": "attn_v",
    "self_attn/o_proj": "attn_output",
    "self_attn/q_norm": "attn_q_norm",
    "self_attn/k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp/gate_proj": "ffn_gate",
    "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
    "mlp/gate": "ffn_gate_inp",  # mixture-of-experts layers (llama.cpp's names)
    "mlp/experts/gate_proj": "ffn_gate_exps",
    "mlp/experts/up_proj": "ffn_up_exps",
    "mlp/experts/down_proj": "ffn_down_exps",
    "mlp/shared_expert/gate_proj": "ffn_gate_shexp",
    "mlp/shared_expert/up_proj": "ffn_up_shexp",
    "mlp/shared_expert/down_proj": "ffn_down_shexp",
    "mlp/shared_expert_gate": "ffn_gate_inp_shexp",
}


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs back to `rotate_half` halves)."""
    d = w.shape[0] // heads // 2
    return w.reshape(heads, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_fix(cfg: ModelConfig, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """Llama GGUF files store q and k permuted for GGML's RoPE; undo it (not in `UNPERMUTED`'s files)."""
    if cfg.arch in UNPERMUTED:
        return w
    if ".attn_q." in gguf_name:
        return _unpermute(w, cfg.num_heads)
    if ".attn_k." in gguf_name:
        return _unpermute(w, cfg.num_kv_heads)
    return w
