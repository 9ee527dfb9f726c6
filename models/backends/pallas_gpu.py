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
PROGRAMS = 264  # about two kernel programs per streaming multiprocessor of an H100 (132)


def splits_for(rows: int, kv_heads: int, pages: int) -> int:
    """Partitions of each sequence's `pages` (a divisor): only as many as it takes for rows x KV heads x splits to
    fill the card. Each program then walks several blocks of pages, which the kernel pipelines; at 256 rows the
    upstream default of 16 splits left each program one block of 4 pages (vLLM splits likewise, its paged attention
    v2, only when sequences x heads are few)."""
    return largest_divisor(pages, max(1, min(MAX_SPLITS, -(-PROGRAMS // (rows * kv_heads)))))


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
           interpret: bool = False) -> jax.Array:
    """Attention of one pre-scaled query per row `q [B, h, d]` over its first `lengths [B]` keys, in the pool pages
    listed by `table [B, n]` of `k_pages`/`v_pages [kvh, pages, page_size, d]`; returns `[B, h, d]`."""
    from jax.experimental.pallas.ops.gpu import paged_attention as kernel

    n = table.shape[1]
    splits = splits_for(q.shape[0], k_pages.shape[0], n)
    block = largest_divisor(n // splits, MAX_BLOCK)
    return kernel.paged_attention(q, k_pages, v_pages, table, lengths, k_splits=splits,
                                  pages_per_compute_block=block, interpret=interpret)
