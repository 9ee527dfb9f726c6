"""The `pallas-gpu` attention backend: decode over the paged KV pool with JAX's Triton-based Pallas kernel
(`jax.experimental.pallas.ops.gpu.paged_attention`).

Upstream marks the Triton-based GPU ops deprecated after JAX 0.11; their successors are the Mosaic GPU kernels and
tokamax. This module is the only place that names the kernel, so swapping it is a one-file change.
"""

from __future__ import annotations

import jax

from models.backends.paged import largest_divisor

MAX_SPLITS = 16  # partitions of a sequence's pages computed in parallel, then merged (flash-decoding)
MAX_BLOCK = 8  # pages per inner step of the kernel


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
           interpret: bool = False) -> jax.Array:
    """Attention of one pre-scaled query per row `q [B, h, d]` over its first `lengths [B]` keys, in the pool pages
    listed by `table [B, n]` of `k_pages`/`v_pages [kvh, pages, page_size, d]`; returns `[B, h, d]`."""
    from jax.experimental.pallas.ops.gpu import paged_attention as kernel

    n = table.shape[1]
    splits = largest_divisor(n, MAX_SPLITS)
    block = largest_divisor(n // splits, MAX_BLOCK)
    return kernel.paged_attention(q, k_pages, v_pages, table, lengths, k_splits=splits,
                                  pages_per_compute_block=block, interpret=interpret)
