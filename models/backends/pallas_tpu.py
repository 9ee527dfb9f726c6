"""The `pallas-tpu` attention backend: decode over the paged KV pool with JAX's Mosaic TPU kernel
(`jax.experimental.pallas.ops.tpu.paged_attention`), which DMAs a sequence's pages into VMEM block by block."""

from __future__ import annotations

import contextlib

import jax

from models.backends.paged import largest_divisor

MAX_BLOCK = 8  # pages per compute block (one double-buffered DMA)


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
           interpret: bool = False) -> jax.Array:
    """Attention of one pre-scaled query per row `q [B, h, d]` over its first `lengths [B]` keys, in the pool pages
    listed by `table [B, n]` of `k_pages`/`v_pages [kvh, pages, page_size, d]`; returns `[B, h, d]`. `interpret`
    runs the kernel in Pallas' TPU interpreter (any platform)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    block = largest_divisor(table.shape[1], MAX_BLOCK)
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        return paged_attention(q, k_pages, v_pages, lengths, table, pages_per_compute_block=block)
