"""Attention over a paged KV cache: the plain-XLA backend (the reference that kernels are tested against).

The cache is a pool of pages for every layer, `[layers, kv_heads, pages, page_size, head_dim]` (per layer, the layout
of the TPU and GPU paged-attention kernels). A row of the page table lists one sequence's pages in order: position p
lives in page `table[b, p // page_size]` at offset `p % page_size`. Table entries past a sequence's pages point at
page 0, the scratch page: padding rows and padding positions write there, and what they write is only ever read
under the causal mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.config import ModelConfig

NEG_INF = -1e30
SCRATCH = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer: `[layers, kv_heads, pages, page_size, head_dim]` each."""

    k: jax.Array
    v: jax.Array

    @staticmethod
    def zeros(cfg: ModelConfig, pages: int, page_size: int, dtype=None) -> "KVCache":
        """An empty pool of `pages` pages."""
        shape = (cfg.num_layers, cfg.num_kv_heads, pages, page_size, cfg.head_dim)
        dt = dtype or cfg.dtype
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


def write(cache: jax.Array, layer: int, x: jax.Array, positions: jax.Array, table: jax.Array) -> jax.Array:
    """Scatter this call's keys (or values) `x [B, S, kvh, d]` at `positions [B, S]` through the page table
    `[B, n]`; positions past the table go to the scratch page."""
    ps = cache.shape[3]
    page = jnp.take_along_axis(table, positions // ps, axis=1, mode="fill", fill_value=SCRATCH)
    heads = jnp.arange(cache.shape[1])[:, None, None]
    return cache.at[layer, heads, page[None], (positions % ps)[None]].set(x.transpose(2, 0, 1, 3).astype(cache.dtype))


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int, table: jax.Array,
                    positions: jax.Array, scale: float, softcap: float = 0.0, window: int = 0) -> jax.Array:
    """Causal attention of queries `q [B, S, h, d]` at `positions [B, S]` over the pages in `table [B, n]` (keys at
    positions `0 .. n * page_size - 1`); returns `[B, S, h * d]`. `window` > 0 limits each query to that many
    most recent keys; `softcap` > 0 caps the scores with tanh."""
    b, s, h, d = q.shape
    kvh = k_cache.shape[1]
    keys = k_cache[layer][:, table]  # [kvh, B, n, page, d]: a sequence's pages for one head, in order
    values = v_cache[layer][:, table]
    t = keys.shape[2] * keys.shape[3]
    keys, values = keys.reshape(kvh, b, t, d), values.reshape(kvh, b, t, d)
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d).transpose(2, 0, 3, 1, 4).reshape(kvh, b, g * s, d)
    scores = jnp.einsum("kbqd,kbtd->kbqt", qg, keys.astype(q.dtype)).astype(jnp.float32) * scale
    scores = scores.reshape(kvh, b, g, s, t)
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    key_pos = jnp.arange(t)[None, None, :]
    q_pos = positions[:, :, None]
    mask = key_pos <= q_pos
    if window:
        mask &= key_pos > q_pos - window
    scores = jnp.where(mask[None, :, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(kvh, b, g * s, t)
    out = jnp.einsum("kbqt,kbtd->kbqd", probs, values.astype(q.dtype))
    return out.reshape(kvh, b, g, s, d).transpose(1, 3, 0, 2, 4).reshape(b, s, h * d)
