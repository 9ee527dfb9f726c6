"""Multi-head latent attention (DeepSeek-V2/V3) over the paged pool, in the absorbed form.

Each token stores one vector per layer: its normalized KV latent `c` (`kv_lora_rank` wide) and its rotated shared
key part (`qk_rope_head_dim`): 576 values for V3, where expanded heads would take 128 * (192 + 128). The pool is the
same `KVCache` as grouped-query attention's, with one head of that width for keys and none for values
(`ModelConfig.cache_widths`). `kv_b_proj` holds each head's key (`W_UK`) and value (`W_UV`) up-projections of the
latent. Absorbed: a head's query becomes `[q_nope @ W_UK, q_rope]`, which scores directly against the stored
vectors (one KV head for all query heads), the softmax-weighted latents come out of the same attention call (the
stored vector is also the value; its rope part is dropped), and `W_UV` maps them to the head's output. Prefill and
decode both run this form through the XLA reference (`backends.paged`), so prefix caching, preemption and every
pool operation work unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from models import backends
from models.backends import paged
from models.config import ModelConfig
from models.layers.attention import rope
from models.layers.linear import RMSNorm, Weight, projection


class MLAttention(nn.Module):
    """Latent attention with the checkpoints' module names: `q_proj` (or `q_a_proj`, `q_a_layernorm`, `q_b_proj`),
    `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`. Same call as `Attention`; `v_cache` (zero wide)
    passes through."""

    cfg: ModelConfig
    backend: str = "xla"

    @nn.compact
    def __call__(self, x, positions, table, k_cache, v_cache, layer, stacks=None, first: int = 0, adapters=None):
        """`x [B, S, H]` at `positions [B, S]`, pages `table`, the pools, this layer's index in its group and (packed
        int8 or int4, scanned) the group's parameter stacks, the group's first layer -> `(out, k_cache, v_cache)`."""
        at = first + layer  # the model's index of the layer: its pages in the pool
        cfg, dt = self.cfg, self.cfg.dtype
        b, s, _ = x.shape
        h, nope, rd, vd, r = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                              cfg.kv_lora_rank)
        proj = functools.partial(projection, cfg, layer=layer, stacks=stacks)
        if cfg.q_lora_rank:
            q = proj("q_a_proj", cfg.q_lora_rank, (None, "embed"), x, cfg.attention_bias)
            q = RMSNorm(cfg.rms_eps, 0.0, dt, name="q_a_layernorm")(q)
            q = proj("q_b_proj", h * (nope + rd), ("heads", None), q)
        else:
            q = proj("q_proj", h * (nope + rd), ("heads", "embed"), x)
        q = q.reshape(b, s, h, nope + rd)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        kv = proj("kv_a_proj_with_mqa", r + rd, (None, "embed"), x, cfg.attention_bias)
        latent = RMSNorm(cfg.rms_eps, 0.0, dt, name="kv_a_layernorm")(kv[..., :r])
        k_rope = kv[..., r:][:, :, None, :]
        q_rope = rope(q_rope, positions, cfg.rope_global, cfg.rope_scale, cfg.rope_interleave)
        k_rope = rope(k_rope, positions, cfg.rope_global, cfg.rope_scale, cfg.rope_interleave)

        up = Weight((h * (nope + vd), r), ("heads", None), dt, name="kv_b_proj")().reshape(h, nope + vd, r)
        query = jnp.concatenate([jnp.einsum("bshn,hnr->bshr", q_nope, up[:, :nope]), q_rope], axis=-1)
        entry = jnp.concatenate([latent[:, :, None, :], k_rope], axis=-1)  # [B, S, 1, r + rope]: what is stored

        if isinstance(table, paged.Flat):  # a flat batch: each token a row of the pool (see `Attention`)
            flat = dataclasses.replace(table, tables=paged.layer_pages(table.tables, at, k_cache, cfg.num_layers))
            k_cache = paged.write_flat(k_cache, entry.reshape(b * s, 1, r + rd), positions.reshape(-1), table, at,
                                       cfg.num_layers)
            out = backends.flat_attention("xla", query.reshape(b * s, h, r + rd), k_cache, k_cache, flat,
                                          positions.reshape(-1), cfg.scale)
        else:
            pages = paged.layer_pages(table, at, k_cache, cfg.num_layers)
            k_cache = paged.write(k_cache, entry, positions, pages)
            out = backends.paged_attention(self.backend, query, entry, entry, k_cache, k_cache, pages, positions,
                                            cfg.scale)
        out = out.reshape(b, s, h, r + rd)[..., :r]  # the weighted latents
        out = jnp.einsum("bshr,hvr->bshv", out, up[:, nope:]).reshape(b, s, h * vd)
        return proj("o_proj", cfg.hidden_size, ("embed", "heads"), out, cfg.attention_bias), k_cache, v_cache
