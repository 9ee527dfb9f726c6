"""The `cpu` attention backend: decode over the paged KV pool with a small C++ kernel (`models/backends/csrc/
decode_attention.cc`) that XLA calls through its FFI.

XLA's CPU backend runs the reference's decode attention as many tiny batched products over gathered copies of the
pages; at 32-96 rows that took ~30% of a decode step (docs/PERFORMANCE.md). The kernel reads each key and value once,
straight from the pool, and shares its (row, KV head) tasks with XLA's own intra-op threads. It is compiled once per
machine (`models.backends.native`); where it does not compile, `auto` keeps the `xla` reference. Float32 pools only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.backends import native

TARGET = "sparkler_decode_attention"


def available() -> bool:
    """Whether the kernel is compiled and registered with XLA (compiling it on first call)."""
    return native.available("decode_attention", "SparklerDecodeAttention", TARGET)


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
           interpret: bool = False) -> jax.Array:
    """Attention of one pre-scaled query per row `q [B, h, d]` over its first `lengths [B]` keys, in the pool pages
    listed by `table [B, n]` of `k_pages`/`v_pages [kvh, pages, page_size, d]`; returns `[B, h, d]` (the same
    contract as the Pallas kernels; `interpret` is ignored: this kernel runs natively on the CPU)."""
    return chunk(q[:, None], k_pages, v_pages, table, lengths[:, None])[:, 0]


def chunk(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
          lse: bool = False):
    """`S` pre-scaled queries per row, `q [B, S, h, d]`, query `i` of row `b` over the first `lengths [B, S]` keys
    of the row's pages (a chunk whose keys are in the pool already: its causal mask is the lengths); `[B, S, h, d]`.
    Each key is read once for all of a row's queries (a verify pass: a row's last token and its draft). With `lse`,
    also each output's log-normaliser `[B, S, h]` (the log of its softmax's sum of exponentials), for merging with
    attention over other keys."""
    if not available():
        raise RuntimeError("the cpu attention backend needs a C++ compiler (g++) to build its kernel")
    f32 = jnp.float32
    shapes = (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(q.shape[:3], f32))
    call = jax.ffi.ffi_call(TARGET, shapes, vmap_method="sequential")
    out, norm = call(q.astype(f32), k_pages.astype(f32), v_pages.astype(f32), table.astype(jnp.int32),
                     lengths.astype(jnp.int32))
    return (out.astype(q.dtype), norm) if lse else out.astype(q.dtype)
