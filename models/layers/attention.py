"""Grouped-query attention: projections, q/k norms, RoPE, the K/V write into the paged pool and the backend call."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import backends
from models.backends import paged
from models.config import ModelConfig
from models.layers.linear import RMSNorm, projection


def rope(x: jax.Array, positions: jax.Array, inv_freq: tuple[float, ...], scale: float = 1.0,
         interleaved: bool = False) -> jax.Array:
    """Rotary embedding, `rotate_half` convention: x `[B, S, H, D]`, positions `[B, S]`; `scale` multiplies cos and
    sin (YaRN's attention factor). Only the first `2 * len(inv_freq)` dims turn (a partial rotary factor: Phi-4-mini,
    GLM); the rest pass through. `interleaved`: the turned dims come in pairs `(x0, x1), (x2, x3), ...` (DeepSeek's,
    GLM-4's), turned here in `rotate_half` order (evens, then odds): the dims come out in that order, which changes
    no product of a query and a key turned alike."""
    inv_freq = jnp.asarray(inv_freq, jnp.float32)  # may be traced
    rot = 2 * inv_freq.shape[0]
    if rot < x.shape[-1]:
        return jnp.concatenate([rope(x[..., :rot], positions, inv_freq, scale, interleaved), x[..., rot:]], axis=-1)
    if interleaved:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = (jnp.cos(emb) * scale).astype(x.dtype), (jnp.sin(emb) * scale).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention that writes this call's K/V into its layer's pages and attends over the pages in
    `table` (`[B, n]`, or a flat batch's `paged.Flat`). The model's index of the layer is `first + layer`: `layer` is
    its index in its group of layers (a traced index when they are scanned), `first` the group's first layer."""

    cfg: ModelConfig
    backend: str = "xla"

    @nn.compact
    def __call__(self, x, positions, table, k_cache, v_cache, layer, stacks=None, first: int = 0, adapters=None):
        """`stacks`: the scanned group's parameter stacks (every layer's), where packed projections read theirs
        at `layer` (see `Linear`), or None; `adapters`: each token's LoRA slot and scale (`models.lora`), or None;
        `positions`: `(positions, horizons)` where a picture's tokens see each other both ways (`CausalLM`)."""
        cfg, dt = self.cfg, self.cfg.dtype
        positions, horizons = positions if isinstance(positions, tuple) else (positions, None)
        at = first + layer  # the layer's pages in the pool, and its kind
        b, s, _ = x.shape
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        proj = functools.partial(projection, cfg, layer=layer, stacks=stacks, adapters=adapters, lora=True)
        q = proj("q_proj", h * d, ("heads", "embed"), x, cfg.attention_bias).reshape(b, s, h, d)
        k = proj("k_proj", kvh * d, ("kv_heads", "embed"), x, cfg.attention_bias).reshape(b, s, kvh, d)
        v = proj("v_proj", kvh * d, ("kv_heads", "embed"), x, cfg.attention_bias).reshape(b, s, kvh, d)
        if cfg.qk_norm:  # each head's values, or all heads' at once (OLMo 2: `qk_norm_whole`)
            def normed(name: str, t: jax.Array) -> jax.Array:
                spans = t.reshape(b, s, -1) if cfg.qk_norm_whole else t
                return RMSNorm(cfg.rms_eps, cfg.norm_offset, dt, name=name)(spans).reshape(t.shape)

            q, k = normed("q_norm", q), normed("k_norm", k)
        window, inv_freq, scale = 0, cfg.rope_global, cfg.rope_scale
        if cfg.sliding_window:  # this layer's kind is looked up by its index (data, when layers are scanned)
            sliding = jnp.asarray(cfg.layer_sliding)[at]
            window = jnp.where(sliding, cfg.sliding_window, 0)
            inv_freq = jnp.where(sliding, jnp.asarray(cfg.rope_local), jnp.asarray(cfg.rope_global))
            if cfg.rope_local_scale != cfg.rope_scale:
                scale = jnp.where(sliding, cfg.rope_local_scale, cfg.rope_scale)
        turned = (rope(q, positions, inv_freq, scale, cfg.rope_interleave),
                  rope(k, positions, inv_freq, scale, cfg.rope_interleave))
        if all(cfg.layer_rope):
            q, k = turned
        else:  # some layers attend without positions (SmolLM3's every fourth: `layer_rope`)
            turns = jnp.asarray(cfg.layer_rope)[at]
            q, k = jnp.where(turns, turned[0], q), jnp.where(turns, turned[1], k)

        sinks = None
        if cfg.attn_sinks:  # gpt-oss: one logit per head joins the softmax
            sinks = self.param("sinks", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)), (h,),
                               jnp.dtype(dt))
        if isinstance(table, paged.Flat):  # one row of several sequences' tokens: each token a row of the pool
            flat = dataclasses.replace(table, tables=paged.layer_pages(table.tables, at, k_cache, cfg.num_layers))
            k_cache, v_cache = (paged.write_flat(c, x.reshape(b * s, kvh, d), positions.reshape(-1), table, at,
                                                 cfg.num_layers) for c, x in ((k_cache, k), (v_cache, v)))
            out = backends.flat_attention(self.backend, q.reshape(b * s, h, d), k_cache, v_cache, flat,
                                          positions.reshape(-1), cfg.scale, cfg.attn_softcap, window, sinks,
                                          None if horizons is None else horizons.reshape(-1))
            out = out.reshape(b, s, h * d)
        else:
            pages = paged.layer_pages(table, at, k_cache, cfg.num_layers)
            k_cache = paged.write(k_cache, k, positions, pages)
            v_cache = paged.write(v_cache, v, positions, pages)
            backend = backends.call_backend(self.backend, b, cfg.matmul, s)
            out = backends.paged_attention(backend, q, k, v, k_cache, v_cache, pages, positions, cfg.scale,
                                            cfg.attn_softcap, window, sinks, horizons)
        out = proj("o_proj", cfg.hidden_size, ("embed", "heads"), out, cfg.o_bias)
        return out, k_cache, v_cache
