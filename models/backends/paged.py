"""The paged KV cache and the plain-XLA attention over it: the cache layout, the K/V write, and the reference that
every kernel is tested against (`models.backends` dispatches between them).

The cache is one pool per K and V, `[kv_heads, layers * pages, page_size, head_dim]`: each layer owns a range of
`pages` pages, so page `p` of layer `l` is pool page `l * pages + p`. Per head this is exactly the operand of the
TPU and GPU paged-attention kernels, and a kernel gets the whole pool (no per-layer slice to copy, whether the
layers are unrolled or scanned) with the page table offset by `l * pages`. A row of the page table lists one
sequence's pages in order: position t lives in page `table[b, t // page_size]` at offset `t % page_size`. Table
entries past a sequence's pages are 0: page 0 of every layer is a scratch page, never allocated, and positions
past the table go to pool page 0. Padding rows and positions write there, and what they write is only ever read
under the causal mask.

Backends (`BACKENDS`): `xla`, the plain-XLA reference below (gather the pages, masked softmax), used for every
prefill and wherever a kernel does not apply; `pallas-gpu` and `pallas-tpu`, decode kernels from JAX's Pallas ops
(`models/backends/pallas_gpu.py`, `pallas_tpu.py`), and `cpu`, the C++ decode kernel (`cpu_attention.py`).
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
    """Keys and values of every layer: `[kv_heads, layers * pages, page_size, head_dim]` each."""

    k: jax.Array
    v: jax.Array

    @staticmethod
    def zeros(cfg: ModelConfig, pages: int, page_size: int, dtype=None) -> "KVCache":
        """An empty pool of `pages` pages per layer (MLA: one latent per token as the key, zero-wide values)."""
        (kw, vw), lead = cfg.cache_widths, (cfg.cache_heads, cfg.num_layers * pages, page_size)
        dt = dtype or pool_dtype(cfg.cache_dtype)
        return KVCache(jnp.zeros((*lead, kw), dt), jnp.zeros((*lead, vw), dt))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Flat:
    """A flat batch's layout (the flat step): the model's input is one row of T tokens, several sequences one
    after another (a decode row is a sequence of one token, a prefill chunk one of many), then padding. Token `i`
    belongs to sequence `owner[i]` and goes to pool page `pages[i]`; sequence `r` has `lengths[r]` tokens from
    position `starts[r]` on, in the pool pages of `tables[r]`. Padding tokens belong to a sequence of length 0 whose
    table is all scratch. Pages are the first layer's: each layer adds its offset (`layer_pages`)."""

    tables: jax.Array  # [R, W] pool pages
    owner: jax.Array  # [T]
    starts: jax.Array  # [R]
    lengths: jax.Array  # [R]
    pages: jax.Array  # [T]: tables[owner[i], position // page_size], computed once for every layer


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (kernels split a row's pages into equal blocks)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def layer_pages(table: jax.Array, layer, pool: jax.Array, num_layers: int) -> jax.Array:
    """Page table `table` of pool pages for layer `layer` (an int, or traced under scanned layers): each layer owns
    an equal range of the `pool`'s pages."""
    return table + layer * (pool.shape[1] // num_layers)


def write(cache: jax.Array, x: jax.Array, positions: jax.Array, table: jax.Array) -> jax.Array:
    """Scatter this call's keys (or values) `x [B, S, kvh, d]` at `positions [B, S]` through the page table
    `[B, n]` (pool pages, layer offset applied); positions past the table go to the scratch page."""
    ps = cache.shape[2]
    page = jnp.take_along_axis(table, positions // ps, axis=1, mode="fill", fill_value=SCRATCH)
    heads = jnp.arange(cache.shape[0])[:, None, None]
    return cache.at[heads, page[None], (positions % ps)[None]].set(to_pool(x.transpose(2, 0, 1, 3), cache.dtype))


def write_flat(cache: jax.Array, x: jax.Array, positions: jax.Array, flat: Flat, layer, num_layers: int) -> jax.Array:
    """Scatter a flat batch's keys (or values) `x [T, kvh, d]` at `positions [T]` to their pages (`flat.pages`, in
    layer `layer`'s range)."""
    pages = layer_pages(flat.pages, layer, cache, num_layers)
    heads = jnp.arange(cache.shape[0])[:, None]
    return cache.at[heads, pages[None], (positions % cache.shape[2])[None]].set(to_pool(x.transpose(1, 0, 2),
                                                                                           cache.dtype))


# A float8 pool (`--kv-cache-dtype fp8`) keeps its values' bits in an integer array of a byte, the integer type
# telling which float8: XLA's CPU backend computes a scatter into a float8 array in float16, converting the whole pool
# there and back at every write (48 ms a write into a 37 MB pool, against 0.02 ms into the same bytes as integers).
FLOAT8_BITS = {"float8_e4m3fn": jnp.dtype(jnp.uint8), "float8_e5m2": jnp.dtype(jnp.int8)}
_FLOAT8 = {bits: jnp.dtype(name) for name, bits in FLOAT8_BITS.items()}


def pool_dtype(name: str) -> jnp.dtype:
    """The array dtype of a pool of `name` values (`FLOAT8_BITS` for float8)."""
    return FLOAT8_BITS.get(name, jnp.dtype(name))


def to_pool(x: jax.Array, dtype) -> jax.Array:
    """Keys or values in a pool of array dtype `dtype`. Into a float8 pool they go unscaled (vLLM's `--kv-cache-dtype
    fp8` without calibrated scales) and saturated at its largest finite value (float8_e4m3fn has no infinity: a cast
    past 448 would give NaN), as bits."""
    f8 = _FLOAT8.get(jnp.dtype(dtype))
    if f8 is None:
        return x.astype(dtype)
    big = float(jnp.finfo(f8).max)
    return jax.lax.bitcast_convert_type(jnp.clip(x, -big, big).astype(f8), dtype)


def floats(x: jax.Array) -> jax.Array:
    """Values read from a pool as floats: a float8 pool's bits as their float8, others as they are."""
    f8 = _FLOAT8.get(jnp.dtype(x.dtype))
    return x if f8 is None else jax.lax.bitcast_convert_type(x, f8)


def gather(cache: jax.Array, table: jax.Array) -> jax.Array:
    """The keys (or values) in the pages of `table [B, n]`, in order: `[kvh, B, n * page_size, d]` (float8 for a
    float8 pool: `floats`). Taken as whole pages (rows of `page_size * d`), which XLA's CPU backend copies at
    ~40 GB/s, against ~10 GB/s for the element-wise gather that `cache[:, table]` becomes."""
    kvh, _, ps, d = cache.shape
    b, n = table.shape
    return floats(jnp.take(cache.reshape(kvh, -1, ps * d), table, axis=1).reshape(kvh, b, n * ps, d))


def reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, table: jax.Array, positions: jax.Array,
              scale: float, softcap: float = 0.0, window=0, sinks: jax.Array | None = None,
              horizons: jax.Array | None = None) -> jax.Array:
    """Causal attention of queries `q [B, S, h, d]` at `positions [B, S]` over the pages in `table [B, n]` (pool
    pages, layer offset applied; keys at positions `0 .. n * page_size - 1`); returns `[B, S, h * d]`. `window` > 0
    (may be traced) limits each query to that many most recent keys; `softcap` > 0 caps the scores with tanh;
    `sinks [h]` (gpt-oss) are logits that join each head's softmax with no value (they only take weight away).
    `horizons [B, S]`: each query's last visible key position, where it sees past its own (a picture's tokens, which
    see each other both ways: Gemma 3); the window still counts back from its position."""
    b, s, h, d = q.shape
    kvh = k_cache.shape[0]
    keys, values = gather(k_cache, table), gather(v_cache, table)  # [kvh, B, t, d]: each sequence's, in order
    t = keys.shape[2]
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d).transpose(2, 0, 3, 1, 4).reshape(kvh, b, g * s, d)
    # Decode with few queries per KV head as broadcast multiply-and-sum: XLA's CPU backend fuses each into one loop
    # over the gathered pages, where the einsum became many tiny matrix products (3 query rows each); single-stream
    # decode went from 40 to 49 tok/s (docs/PERFORMANCE.md). Prefill, and a KV head with 8 or more heads (MLA's one
    # latent head serves all of them), keep the matrix products: XLA's library fusion of such a sum inside scanned
    # layers ran 4x slower than the product (docs/PERFORMANCE.md, "Scanned groups of layers").
    bcast = s == 1 and g < 8
    if bcast:
        scores = jnp.sum(qg[:, :, :, None].astype(jnp.float32) * keys[:, :, None].astype(jnp.float32), -1) * scale
    else:
        scores = jnp.einsum("kbqd,kbtd->kbqt", qg, keys.astype(q.dtype),
                            preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(kvh, b, g, s, t)
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    key_pos = jnp.arange(t)[None, None, :]
    q_pos = positions[:, :, None]
    mask = key_pos <= (q_pos if horizons is None else horizons[:, :, None])
    if not (isinstance(window, int) and window == 0):
        mask &= (key_pos > q_pos - window) | (window <= 0)
    scores = jnp.where(mask[None, :, None], scores, NEG_INF)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:  # a column of the head's sink logit, dropped after the softmax
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(kvh, 1, g, 1, 1), (kvh, b, g, s, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :t]
    probs = probs.astype(q.dtype).reshape(kvh, b, g * s, t)
    if bcast:
        out = jnp.sum(probs[..., None] * values[:, :, None].astype(q.dtype), axis=3)
    else:
        out = jnp.einsum("kbqt,kbtd->kbqd", probs, values.astype(q.dtype))
    return out.reshape(kvh, b, g, s, d).transpose(1, 3, 0, 2, 4).reshape(b, s, h * d)


def flat_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, flat: Flat, positions: jax.Array,
                   scale: float, softcap: float = 0.0, window=0, sinks: jax.Array | None = None,
                   horizons: jax.Array | None = None) -> jax.Array:
    """`reference` for a flat batch (`flat`'s tables with the layer offset applied): each token `q [T, h, d]` at
    `positions [T]` attends as a row of its own over its sequence's pages; returns `[T, h * d]`. It gathers every
    token's pages, so it suits small batches and the tests; accelerators run a kernel (`pallas_gpu.ragged`)."""
    rows = flat.tables[flat.owner]
    return reference(q[:, None], k_cache, v_cache, rows, positions[:, None], scale, softcap, window, sinks,
                     None if horizons is None else horizons[:, None])[:, 0]


def _part(q, keys, values, q_pos, k_pos, valid, scale, softcap, window, q_end=None):
    """Softmax statistics of query rows `q [kvh, B, r, d]` (at `q_pos [B, r]`; seeing keys up to `q_end [B, r]`,
    default their positions) over `keys`/`values [kvh, B, t, d]` (at `k_pos [B, t]`, usable where `valid [B, t]`):
    the row maximum, the sum of exponentials and the unnormalised output (float32), for merging with other parts of
    the keys."""
    scores = jnp.einsum("kbrd,kbtd->kbrt", q, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    mask = (k_pos[:, None, :] <= (q_pos if q_end is None else q_end)[:, :, None]) & valid[:, None, :]
    if not (isinstance(window, int) and window == 0):
        mask &= (k_pos[:, None, :] > q_pos[:, :, None] - window) | (window <= 0)
    scores = jnp.where(mask[None], scores, NEG_INF)
    top = jnp.max(scores, axis=-1)
    e = jnp.where(mask[None], jnp.exp(scores - top[..., None]), 0.0)
    out = jnp.einsum("kbrt,kbtd->kbrd", e.astype(q.dtype), values.astype(q.dtype), preferred_element_type=jnp.float32)
    return top, jnp.sum(e, axis=-1), out


def _merge(x, y):
    """Two parts' softmax statistics `(max, sum of exponentials, unnormalised output)` as one."""
    top = jnp.maximum(x[0], y[0])
    a, c = jnp.exp(x[0] - top), jnp.exp(y[0] - top)
    return top, a * x[1] + c * y[1], a[..., None] * x[2] + c[..., None] * y[2]


def prefill(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array, table: jax.Array,
            positions: jax.Array, scale: float, softcap: float = 0.0, window=0, sinks: jax.Array | None = None,
            block: int = 128, prior=None, horizons: jax.Array | None = None) -> jax.Array:
    """`reference` for a chunk of consecutive positions per row (a prefill), in two parts merged by their softmax
    statistics: the chunk's queries over its own keys `k`/`v [B, S, kvh, d]`, taken as computed, in causal blocks
    of `block` queries that skip the keys after the block; and over the row's earlier positions, read from the pages
    of `table` (the first `table` width minus `S` positions; none when the table covers only the chunk, as in a
    fresh prompt's first chunk). A 512-token first chunk does 10/16 of `reference`'s score work and no page gather.
    `sinks` join the merged statistics last. Arguments and result as `reference`. `prior`, when given, computes the
    part over the earlier positions elsewhere, whatever the table's width: a function returning each query's output
    `[B, S, h, d]` and log-normaliser `[B, S, h]` (`NEG_INF` where there are none), as the `cpu` kernel reads them
    by length; it runs only when a row has earlier positions. With `horizons` (see `reference`) the chunk's keys are
    one block: a query may see keys after its own."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    rows = lambda x: x.transpose(2, 0, 1, 3)  # noqa: E731  [B, S, kvh, d] -> [kvh, B, S, d]
    qg = q.reshape(b, s, kvh, g, d).transpose(2, 0, 1, 3, 4).reshape(kvh, b, s * g, d)  # row = position * g + head
    q_pos = jnp.repeat(positions, g, axis=1)
    ps = k_cache.shape[2]
    before = -(-(table.shape[1] * ps - s) // ps) if table.shape[1] * ps > s else 0  # pages that may hold them
    cached = None  # the earlier positions' statistics, from the pages gathered here
    if prior is None and before:
        t = before * ps
        k_pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        cached = _part(qg, gather(k_cache, table[:, :before]), gather(v_cache, table[:, :before]), q_pos, k_pos,
                       k_pos < positions[:, :1], scale, softcap, window)
    block = block if s % block == 0 and horizons is None else s
    q_end = None if horizons is None else jnp.repeat(horizons, g, axis=1)
    kc, vc, ones = rows(k), rows(v), jnp.ones((b, s), bool)
    if sinks is not None:  # one more part per row: a key of the head's sink logit with a zero value
        sink = jnp.tile(sinks.astype(jnp.float32).reshape(kvh, 1, g), (1, block, 1)).reshape(kvh, 1, block * g)
        sink = (sink, jnp.ones_like(sink), 0.0)  # row = position * g + head, as in `qg`
    outs, norms = [], []
    for i in range(s // block):
        lo, hi, end = i * block * g, (i + 1) * block * g, (i + 1) * block
        part = _part(qg[:, :, lo:hi], kc[:, :, :end], vc[:, :, :end], q_pos[:, lo:hi], positions[:, :end],
                     ones[:, :end], scale, softcap, window, None if q_end is None else q_end[:, lo:hi])
        if cached is not None:  # cached part first: XLA fuses `a * x + c * y` into an FMA: the order sets the rounding
            part = _merge(tuple(x[:, :, lo:hi] for x in cached), part)
        if sinks is not None:
            part = _merge(part, sink)
        top, total, out = part
        outs.append(out / total[..., None])
        norms.append(top + jnp.log(total))
    out = jnp.concatenate(outs, axis=2)  # float32 (weighed below in float32), cast once at the end
    out = out.reshape(kvh, b, s, g, d).transpose(1, 2, 0, 3, 4).reshape(b, s, h, d)
    if prior is not None:  # normalised already: weighed against the chunk's normalised output
        lse = jnp.concatenate(norms, axis=2).reshape(kvh, b, s, g).transpose(1, 2, 0, 3).reshape(b, s, h)

        def weigh(out):  # each part by its share of the two normalisers (merging the parts' sums inside the blocks
            o, lse0 = prior()  # instead made XLA's CPU backend take ~1.6x the blocks' time, even for a constant part)
            both = jnp.logaddexp(lse0, lse)
            return jnp.exp(lse0 - both)[..., None] * o.astype(jnp.float32) + jnp.exp(lse - both)[..., None] * out

        out = jax.lax.cond(jnp.any(positions[:, 0] > 0), weigh, lambda out: out, out)  # none: a prompt's start
    return out.astype(q.dtype).reshape(b, s, h * d)
