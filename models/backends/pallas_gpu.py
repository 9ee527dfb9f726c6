"""The `pallas-gpu` attention backend over the paged KV pool: decode with JAX's Triton-based Pallas kernel
(`jax.experimental.pallas.ops.gpu.paged_attention`), and chunks of queries (prefill) with `ragged`, this module's
own flash attention over pages for any mix of sequences and query counts in one flat batch.

Upstream marks the Triton-based GPU ops deprecated after JAX 0.11; their successors are the Mosaic GPU kernels and
tokamax. This module is the only place that names the kernel, so swapping it is a one-file change.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.backends.paged import SCRATCH

MAX_SPLITS = 16  # partitions of a sequence's pages computed in parallel, then merged (flash-decoding)
MAX_BLOCK = 8  # pages per inner step of the kernel
PROGRAMS = 264  # about two kernel programs per streaming multiprocessor of an H100 (132)
WARPS, STAGES = 8, 2  # the decode kernel's warps per program and pipeline stages (upstream's defaults;
# bench/gpu_launch.py times others on the card)


def _pow2(n: int) -> int:
    """The smallest power of two at or past `n`."""
    return 1 << max(0, n - 1).bit_length()


def _pow2_divisor(n: int, at_most: int) -> int:
    """The largest power of two dividing `n`, at most `at_most` (Triton's arrays are powers of two long)."""
    return min(n & -n, 1 << (at_most.bit_length() - 1))


def splits_for(rows: int, kv_heads: int, pages: int) -> int:
    """Partitions of each sequence's `pages` (a power of two dividing it): only as many as it takes for rows x KV
    heads x splits to fill the card. Each program then walks several blocks of pages, which the kernel pipelines;
    at 256 rows the upstream default of 16 splits left each program one block of 4 pages (vLLM splits likewise, its
    paged attention v2, only when sequences x heads are few)."""
    return _pow2_divisor(pages, max(1, min(MAX_SPLITS, -(-PROGRAMS // (rows * kv_heads)))))


def decode_plan(rows: int, kv_heads: int, pages: int) -> tuple[int, int, int]:
    """How `decode` runs a table of `pages` columns: its width padded with scratch pages past every length (so that
    blocks of pages are powers of two), its splits and its pages per block."""
    width = pages
    if pages % MAX_BLOCK:
        width = pages + -pages % MAX_BLOCK if pages > MAX_BLOCK else _pow2(pages)
    splits = splits_for(rows, kv_heads, width)
    return width, splits, _pow2_divisor(width // splits, MAX_BLOCK)


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
           interpret: bool = False) -> jax.Array:
    """Attention of one pre-scaled query per row `q [B, h, d]` over its first `lengths [B]` keys, in the pool pages
    listed by `table [B, n]` of `k_pages`/`v_pages [kvh, pages, page_size, d]`; returns `[B, h, d]`."""
    from jax.experimental.pallas.ops.gpu import paged_attention as kernel

    n = table.shape[1]
    width, splits, block = decode_plan(q.shape[0], k_pages.shape[0], n)
    if width > n:
        table = jnp.pad(table, ((0, 0), (0, width - n)), constant_values=SCRATCH)
    return kernel.paged_attention(q, k_pages, v_pages, table, lengths, k_splits=splits,
                                  pages_per_compute_block=block, num_warps=WARPS, num_stages=STAGES,
                                  interpret=interpret)


ROWS = 64  # query rows (queries x the heads of one KV head) per program of `ragged`
KEYS = 64  # keys per inner step of `ragged` (whole pages)


def _ragged_kernel(meta_ref, table_ref, q_ref, k_ref, v_ref, o_ref, *, group: int, pages_per_step: int):
    """One program: one KV head's heads for up to `block` consecutive queries of one sequence (`meta`: the first
    query's row in `q`, how many are real, the first one's position), flash attention over the sequence's pages in
    `table` up to its last query, causal."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    first, count, start = meta_ref[0], meta_ref[1], meta_ref[2]
    gp, d = group, q_ref.shape[-1]
    rows = o_ref.shape[0]
    block = rows // gp
    page_size = k_ref.shape[1]
    width = pages_per_step * page_size
    q = q_ref[pl.ds(first, block)].reshape(rows, d)
    q_pos = start + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // gp
    steps = jnp.minimum(pl.cdiv(start + count, width), table_ref.shape[0] // pages_per_step)

    def body(i, carry):
        o, m, l = carry
        pages = table_ref[pl.ds(i * pages_per_step, pages_per_step)]
        k = k_ref[pages].reshape(width, d)
        v = v_ref[pages].reshape(width, d)
        s = plgpu.dot(q, k.T).astype(jnp.float32)
        k_pos = i * width + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
        s = jnp.where(k_pos <= q_pos, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))  # key 0 is every query's: never -inf from the first step on
        p = jnp.exp(s - m_new[:, None])
        c = jnp.exp(m - m_new)
        o = c[:, None] * o + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return o, m_new, c * l + p.sum(axis=-1)

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, _, l = jax.lax.fori_loop(0, jnp.where(count > 0, steps, 0), body, init)
    o_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def blocks(starts: jax.Array, lengths: jax.Array, t: int, block: int):
    """`ragged`'s query blocks: each sequence's queries in blocks of `block` (sequence r's first is block
    `before[r]`), ceil(t / block) + R blocks in all, the unused ones last. Returns `(meta, seq, before, offsets)`:
    per block its first query's row in `q` (0 for an unused block: the kernel reads a block's rows before it knows
    whether any is real), how many of its queries are real, the first one's position; its sequence; each sequence's
    first block and first row."""
    r = lengths.shape[0]
    counts = -(-lengths // block)
    before = jnp.cumsum(counts) - counts
    offsets = jnp.cumsum(lengths) - lengths
    i = jnp.arange(-(-t // block) + r)
    seq = jnp.clip(jnp.searchsorted(before + counts, i, side="right"), 0, r - 1)
    j = i - before[seq]
    real = i < (before + counts)[-1]
    meta = jnp.stack([jnp.where(real, offsets[seq] + j * block, 0),
                      jnp.where(real, jnp.clip(lengths[seq] - j * block, 0, block), 0),
                      starts[seq] + j * block, jnp.zeros_like(seq)], axis=1).astype(jnp.int32)
    return meta, seq, before, offsets


@functools.partial(jax.jit, static_argnames=("interpret", "block", "pages_per_step"))
def ragged(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array, starts: jax.Array,
           lengths: jax.Array, interpret: bool = False, block: int | None = None,
           pages_per_step: int | None = None) -> jax.Array:
    """Causal attention of pre-scaled queries `q [T, h, d]` for several sequences at once: sequence `r`'s
    `lengths[r]` queries follow the earlier sequences' in `q` and sit at positions `starts[r]` onwards, over the
    keys in its pool pages `tables[r]` (written before the call, this chunk's included). Rows past every sequence
    are padding (zeros out). A decode row is a sequence of one query; a prefill chunk, one of many.

    The grid is KV heads x query blocks: each sequence's queries in blocks of `block`, with the heads of one KV
    head, a program each, walking the pages up to its last query `pages_per_step` at a time (flash attention,
    online softmax). Head groups are padded to a power of two, as Triton wants."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    t, h, d = q.shape
    kvh, _, page_size, _ = k_pages.shape
    g = h // kvh
    gp = _pow2(g)
    block = block or max(1, ROWS // gp)
    pages_per_step = pages_per_step or max(1, KEYS // page_size)
    r, n = tables.shape
    width = max(pages_per_step, _pow2(n))
    width += -width % pages_per_step
    tables = jnp.pad(tables, ((0, 0), (0, width - n)), constant_values=SCRATCH)
    meta, seq, before, offsets = blocks(starts, lengths, t, block)
    nb = meta.shape[0]
    qg = q.reshape(t, kvh, g, d).transpose(1, 0, 2, 3)
    qg = jnp.pad(qg, ((0, 0), (0, block), (0, gp - g), (0, 0)))  # a block's rows read past the end stay in bounds
    out = pl.pallas_call(
        functools.partial(_ragged_kernel, group=gp, pages_per_step=pages_per_step),
        grid=(kvh, nb),
        in_specs=[pl.BlockSpec((None, 4), lambda hh, b: (b, 0)),
                  pl.BlockSpec((None, width), lambda hh, b: (b, 0)),
                  pl.BlockSpec((None, t + block, gp, d), lambda hh, b: (hh, 0, 0, 0)),
                  pl.BlockSpec((None, *k_pages.shape[1:]), lambda hh, b: (hh, 0, 0, 0)),
                  pl.BlockSpec((None, *v_pages.shape[1:]), lambda hh, b: (hh, 0, 0, 0))],
        out_specs=pl.BlockSpec((None, None, block * gp, d), lambda hh, b: (hh, b, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((kvh, nb, block * gp, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="ragged_paged_attention",
    )(meta, tables[seq], qg, k_pages, v_pages)
    # Each query's row of its block's output.
    tok = jnp.arange(t)
    ends = offsets + lengths
    owner = jnp.clip(jnp.searchsorted(ends, tok, side="right"), 0, r - 1)
    inside = tok - offsets[owner]
    blk, row = before[owner] + inside // block, inside % block
    out = out.reshape(kvh, nb, block, gp, d)[:, blk, row, :g]  # [kvh, T, g, d]
    out = jnp.where((tok < ends[-1])[None, :, None, None], out, 0)
    return out.transpose(1, 0, 2, 3).reshape(t, h, d)
