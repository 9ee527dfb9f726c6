"""The `pallas-gpu` attention backend over the paged KV pool: decode with JAX's Triton-based Pallas kernel
(`jax.experimental.pallas.ops.gpu.paged_attention`) or this module's `decode_rows`, and chunks of
queries (prefill) with `ragged`, this module's own flash attention over pages for any mix of sequences and query
counts in one flat batch. Which decode kernel and settings serve a batch size, and which settings `ragged` runs
at for a batch's tokens, is the card's to say: `tune` times `CHOICES` and `tune_ragged` `RAGGED_CHOICES` on it
once (the engine keeps the plan beside its programs) and `use` installs the plan.

Upstream marks the Triton-based GPU ops deprecated after JAX 0.11; their successors are the Mosaic GPU kernels and
tokamax. This module is the only place that names the kernel, so swapping it is a one-file change.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.backends.paged import SCRATCH, floats, reference, to_pool

MAX_SPLITS = 16  # partitions of a sequence's pages computed in parallel, then merged (flash-decoding)
MAX_BLOCK = 8  # pages per inner step of the kernel
PROGRAMS = 264  # about two kernel programs per streaming multiprocessor of an H100 (132)
CHECK_PAGES = 256  # pages of random keys and values in the pool `tune` checks each choice's results over
CHECK_TOLERANCE = 0.02  # the most |output - reference| / (1 + |reference|) `tune` lets a choice have (bfloat16: ~0.006)


@dataclasses.dataclass(frozen=True)
class DecodeChoice:
    """How `decode` runs a batch: JAX's kernel (`upstream`: blocks of whole pages, each read as a `[pages,
    page_size, d]` gather and reshaped; `block`: pages a block at most) or this module's `decode_rows` (`rows`: each
    block of `block` keys one 2-D gather of pool rows), at Triton's `warps` a program and pipeline `stages`, over
    `splits` partitions of each row's keys (0: only as many as fill the card, `splits_for`)."""

    kernel: str = "upstream"
    block: int = MAX_BLOCK
    warps: int = 8
    stages: int = 2
    splits: int = 0

    def __str__(self) -> str:
        unit = "pages" if self.kernel == "upstream" else "keys"
        return (f"{self.kernel} ({self.block} {unit} a block, {self.warps} warps, {self.stages} stages, "
                f"{self.splits or 'filling'} splits)")


DEFAULT = DecodeChoice()  # upstream's own warps and stages, measured on an H200 (session 27)
# What `tune` times on the card: the default, upstream at fewer warps, smaller blocks and more splits (session 27's
# best at 256 rows: 4 splits of 8-page blocks), and `decode_rows` at the settings `bench/triton_static.py` found to
# keep the most programs on a multiprocessor (docs/PERFORMANCE.md, session 43).
CHOICES = (DEFAULT, DecodeChoice(warps=4), DecodeChoice(block=4, warps=4), DecodeChoice(splits=4),
           DecodeChoice("rows", 64, 4, 2), DecodeChoice("rows", 32, 4, 3), DecodeChoice("rows", 64, 4, 3),
           DecodeChoice("rows", 128, 8, 2), DecodeChoice("rows", 64, 4, 2, splits=4))
ROW_KEYS, ROW_WARPS, ROW_STAGES = 64, 4, 2  # `decode_rows`' defaults: keys per inner step, warps per program, stages
FOREIGN = DecodeChoice("rows", ROW_KEYS, ROW_WARPS, ROW_STAGES)  # a pool in another dtype than the queries' (float8)
# where upstream's was named


@dataclasses.dataclass(frozen=True)
class RaggedChoice:
    """How `ragged` runs a flat batch: `rows` query rows a program (one KV head's heads for `rows` / its power-of-two
    group of a sequence's consecutive queries), `keys` keys an inner step (whole pages), at Triton's `warps` a
    program and pipeline `stages`."""

    rows: int = 64
    keys: int = 64
    warps: int = 4
    stages: int = 2

    def __str__(self) -> str:
        return f"ragged ({self.rows} query rows, {self.keys} keys a step, {self.warps} warps, {self.stages} stages)"


RAGGED_DEFAULT = RaggedChoice()  # session 27's H200 run: 16 x 512 chunk queries in 0.678 ms against XLA's 0.901
# What `tune_ragged` times on the card: the default, fewer and more keys a step, more and fewer query rows a
# program (a decode row fills gp of them: fewer rows waste less on one; more share each page read among more
# queries), more warps for the larger tiles, a deeper pipeline (FlashAttention-2's Triton settings are 128 x 64
# at 4-8 warps).
RAGGED_CHOICES = (RAGGED_DEFAULT, RaggedChoice(keys=32), RaggedChoice(keys=128, warps=8), RaggedChoice(rows=32),
                  RaggedChoice(rows=16, keys=128), RaggedChoice(rows=128, warps=8), RaggedChoice(stages=3))
# (*pool shape, pool dtype) -> (rows -> the card's decode choice, flat tokens -> the card's ragged choice) (`use`)
_tuned: dict[tuple, tuple[dict[int, DecodeChoice], dict[int, RaggedChoice]]] = {}
_UNTUNED = ({}, {})  # a pool no plan was installed for


def _pow2(n: int) -> int:
    """The smallest power of two at or past `n`."""
    return 1 << max(0, n - 1).bit_length()


def _pow2_divisor(n: int, at_most: int) -> int:
    """The largest power of two dividing `n`, at most `at_most` (Triton's arrays are powers of two long)."""
    return min(n & -n, 1 << (at_most.bit_length() - 1))


def _filling(rows: int, kv_heads: int) -> int:
    """Splits of each row's keys that rows x KV heads x splits needs to fill the card (at most `MAX_SPLITS`)."""
    return max(1, min(MAX_SPLITS, -(-PROGRAMS // (rows * kv_heads))))


def splits_for(rows: int, kv_heads: int, pages: int) -> int:
    """Partitions of each sequence's `pages` (a power of two dividing it): only as many as it takes for rows x KV
    heads x splits to fill the card. Each program then walks several blocks of pages, which the kernel pipelines;
    at 256 rows the upstream default of 16 splits left each program one block of 4 pages (vLLM splits likewise, its
    paged attention v2, only when sequences x heads are few)."""
    return _pow2_divisor(pages, _filling(rows, kv_heads))


def decode_plan(rows: int, kv_heads: int, pages: int, choice: DecodeChoice = DEFAULT) -> tuple[int, int, int]:
    """How the upstream kernel runs a table of `pages` columns under `choice`: its width padded with scratch pages
    past every length (so that blocks of pages are powers of two), its splits and its pages per block."""
    width = pages
    if pages % MAX_BLOCK:
        width = pages + -pages % MAX_BLOCK if pages > MAX_BLOCK else _pow2(pages)
    splits = _pow2_divisor(width, choice.splits) if choice.splits else splits_for(rows, kv_heads, width)
    return width, splits, _pow2_divisor(width // splits, choice.block)


def _pool(pool) -> tuple:
    return (*pool.shape, str(pool.dtype))


def choice_for(rows: int, pool) -> DecodeChoice:
    """The choice `decode` runs for `rows` rows over `pool` (an array or its shape and dtype): the plan `use`
    installed for its shape and dtype, else `DEFAULT`."""
    return _tuned.get(_pool(pool), _UNTUNED)[0].get(rows, DEFAULT)


def ragged_choice_for(pool, tokens: int) -> RaggedChoice:
    """The settings `ragged` runs at over `pool` for a batch of `tokens` queries: of the plan `use` installed for its
    shape and dtype, the choice tuned at the fewest tokens holding them (past the largest, the largest's), else the
    default."""
    plan = _tuned.get(_pool(pool), _UNTUNED)[1]
    return plan[min((t for t in plan if t >= tokens), default=max(plan))] if plan else RAGGED_DEFAULT


def use(pool, plan: dict[int, DecodeChoice], ragged_plan: dict[int, RaggedChoice] | None = None) -> None:
    """Make `decode` run `plan`'s choice for each batch size and `ragged` run `ragged_plan`'s by its batch's tokens
    (`ragged_choice_for`) over pools of `pool`'s shape and dtype (in the programs traced after; `{}`: the defaults).
    The plans are the process's: the last runner's for that shape holds."""
    _tuned[_pool(pool)] = (dict(plan), dict(ragged_plan or {}))


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
           interpret: bool = False, choice: DecodeChoice | None = None) -> jax.Array:
    """Attention of one pre-scaled query per row `q [B, h, d]` over its first `lengths [B]` keys, in the pool pages
    listed by `table [B, n]` of `k_pages`/`v_pages [kvh, pages, page_size, d]`; returns `[B, h, d]`. Runs `choice`
    (by default `choice_for` the batch: the card's, once tuned); over a pool in another dtype (float8), whose keys
    upstream's kernel cannot multiply with the queries, `decode_rows` (`FOREIGN`) where upstream's was named."""
    choice = choice or choice_for(q.shape[0], k_pages)
    if choice.kernel == "upstream" and k_pages.dtype != q.dtype:  # a float8 pool: upstream's products take one dtype
        choice = FOREIGN
    if choice.kernel == "rows":
        return decode_rows(q, k_pages, v_pages, table, lengths, interpret=interpret, splits=choice.splits or None,
                           keys=choice.block, warps=choice.warps, stages=choice.stages)
    from jax.experimental.pallas.ops.gpu import paged_attention as kernel

    n = table.shape[1]
    width, splits, block = decode_plan(q.shape[0], k_pages.shape[0], n, choice)
    if width > n:
        table = jnp.pad(table, ((0, 0), (0, width - n)), constant_values=SCRATCH)
    return kernel.paged_attention(q, k_pages, v_pages, table, lengths, k_splits=splits,
                                  pages_per_compute_block=block, num_warps=choice.warps,
                                  num_stages=choice.stages, interpret=interpret)


def tune(k_pages: jax.Array, v_pages: jax.Array, heads: int, rows: tuple[int, ...], length: int, dtype,
         choices: tuple[DecodeChoice, ...] = CHOICES, interpret: bool = False,
         seed: int = 0) -> tuple[dict[int, DecodeChoice], dict[int, dict[DecodeChoice, float]], dict]:
    """Time each of `choices` on this card at each batch size of `rows`, every row `length` keys long in pages
    spread over the pool `k_pages`/`v_pages` (the engine's own: the same shape, so the same addressing), and pick
    the fastest (Triton's autotuning, done once per card and shape: the engine keeps the plan beside its programs).
    Each choice's results are first checked on the card against `paged.reference`, over a small pool of random keys
    at the smallest batch size (`_check_batch`: not a big pool's 64-bit addressing, which the tests lower to Triton,
    nor each size's grid; a choice that fails there is left out at every size); a choice the compiler
    refuses, that fails on the card or computes wrong there is left out (all of them: `DEFAULT`); so is upstream's
    kernel over a pool in another dtype than the queries' (`dtype`, the model's). Returns the plan, every time
    (seconds a call) and why each choice left out was (its error, or the exception's name)."""
    kvh, pages, ps, d = k_pages.shape
    dtype = jnp.dtype(dtype)
    choices = tuple(c for c in choices if c.kernel == "rows" or dtype == k_pages.dtype)
    n = -(-length // ps)
    rng = np.random.default_rng(seed)
    args = {b: (jnp.asarray(rng.normal(size=(b, heads, d)), dtype), k_pages, v_pages,
                jnp.asarray(rng.integers(1, pages, (b, n)), jnp.int32),  # any pages: the keys' values do not matter
                jnp.full((b,), length, jnp.int32)) for b in rows}
    check, want = _check_batch(k_pages.dtype, kvh, heads, d, ps, min(rows, default=1), n, dtype, rng)
    times, left = _pick(lambda c: functools.partial(decode, interpret=interpret, choice=c), choices, args, check,
                        want)
    plan = {b: min(times[b], key=times[b].get) if times[b] else DEFAULT for b in rows}
    return plan, times, left


def tune_ragged(k_pages: jax.Array, v_pages: jax.Array, heads: int, rows: int, sizes: tuple[int, ...], length: int,
                dtype, choices: tuple[RaggedChoice, ...] = RAGGED_CHOICES, interpret: bool = False,
                seed: int = 0) -> tuple[dict[int, RaggedChoice], dict[int, dict[RaggedChoice, float]], dict]:
    """`tune` for `ragged`: time each of `choices` on this card over a flat batch of each of `sizes` tokens, as flat
    steps are at full load: `rows` decode rows each at `length` keys (none: a prefill's chunks alone), and the other
    tokens in new prompts' chunks of 512 queries, the last one shorter, over the pool `k_pages`/`v_pages`. A small
    step is mostly decode rows, each filling a KV head's group of a program's query rows (fewer rows waste less); a
    large one mostly prompts' chunks (more rows share each page read among more queries). Each choice's results are
    first checked on the card against `paged.reference` over a small pool of random keys (`_check_flat`). Returns the
    fastest at each size (`RAGGED_DEFAULT` where none ran), every time and why each choice left out was."""
    kvh, pages, ps, d = k_pages.shape
    rng = np.random.default_rng(seed)
    args = {}
    for tokens in sizes:
        beside = max(0, min(rows, tokens - 1))
        chunk = min(512, tokens - beside)
        whole, rest = divmod(tokens - beside, chunk)
        chunks = [chunk] * whole + [rest] * bool(rest)
        starts = np.concatenate([np.full(beside, length - 1), np.zeros(len(chunks), int)])
        lengths = np.concatenate([np.ones(beside, int), chunks])
        n = -(-max(length, chunk) // ps)
        args[tokens] = (jnp.asarray(rng.normal(size=(tokens, heads, d)), dtype), k_pages, v_pages,
                        jnp.asarray(rng.integers(1, pages, (len(starts), n)), jnp.int32),
                        jnp.asarray(starts, jnp.int32), jnp.asarray(lengths, jnp.int32))
    check, want = _check_flat(k_pages.dtype, kvh, heads, d, ps, dtype, rng)
    times, left = _pick(lambda c: functools.partial(ragged, interpret=interpret, choice=c), choices, args, check,
                        want)
    plan = {t: min(times[t], key=times[t].get, default=RAGGED_DEFAULT) for t in sizes}
    return plan, times, left


def _pick(kernel, choices: tuple, args: dict, check: tuple, want: jax.Array) -> tuple[dict, dict]:
    """Compile `kernel(choice)` for each of `choices` at each of `args` (size -> arguments) and at `check`, all on a
    thread pool; run each choice that compiled on `check` against `want` (a refusal, a failure on the card or an
    error past `CHECK_TOLERANCE` leaves it out at every size); time the rest. Returns every time (size -> choice ->
    seconds a call) and why each choice left out was."""
    jobs = [(b, c) for b in ("check", *args) for c in choices]
    args = {"check": check, **args}

    def compiled(job):
        b, choice = job
        try:
            return jax.jit(kernel(choice)).lower(*args[b]).compile()
        except Exception:  # noqa: BLE001  (too many registers or too much shared memory for the card)
            return None

    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 1) // 2))) as pool:
        exes = dict(zip(jobs, pool.map(compiled, jobs)))  # every size's compiles at once, then the timing
    sizes = [b for b in args if b != "check"]
    left = {c: "refused by the compiler" for c in choices if any(exes[b, c] is None for b in args)}
    for c in choices:
        if c not in left:
            try:
                error = float(jnp.max(jnp.abs(exes["check", c](*check).astype(jnp.float32) - want)
                                      / (1 + jnp.abs(want))))
            except Exception as e:  # noqa: BLE001  (it failed on the card)
                left[c] = f"failed on the card ({type(e).__name__})"
                continue
            if not error <= CHECK_TOLERANCE:  # NaN too
                left[c] = f"wrong on the card (error {error:.3g})"
    times = {b: {} for b in sizes}
    for b in sizes:
        for c in choices:
            if c not in left:
                try:
                    times[b][c] = _seconds(exes[b, c], args[b])
                except Exception as e:  # noqa: BLE001  (it failed on the card: left out like a refused one)
                    left[c] = f"failed on the card ({type(e).__name__})"
    return {b: {c: t for c, t in times[b].items() if c not in left} for b in sizes}, left


def _check_pool(pool_dtype, kvh: int, page_size: int, d: int, rng) -> tuple[jax.Array, jax.Array]:
    """The tuners' check pool: `CHECK_PAGES` pages (and the scratch page) of random keys and values in `pool_dtype`."""
    shape = (kvh, CHECK_PAGES + 1, page_size, d)
    return tuple(to_pool(jnp.asarray(rng.normal(size=shape), jnp.float32), pool_dtype) for _ in "kv")


def _check_batch(pool_dtype, kvh: int, heads: int, d: int, page_size: int, rows: int, n: int, dtype, rng):
    """`tune`'s check: `rows` rows of `n`-page tables over a small pool of random keys and values in `pool_dtype`
    (`CHECK_PAGES`), of lengths from one key to the whole table (page boundaries and partial blocks among them).
    Returns `decode`'s arguments and the reference's output in float32."""
    k, v = _check_pool(pool_dtype, kvh, page_size, d, rng)
    lengths = rng.integers(1, n * page_size + 1, rows)
    lengths[:4] = (1, n * page_size, page_size, page_size + 1)[:rows]
    lengths = jnp.asarray(np.minimum(lengths, n * page_size), jnp.int32)
    table = jnp.asarray(rng.integers(1, CHECK_PAGES + 1, (rows, n)), jnp.int32)
    q = jnp.asarray(rng.normal(size=(rows, heads, d)) * d ** -0.5, dtype)
    want = reference(q[:, None], k, v, table, (lengths - 1)[:, None], 1.0).reshape(rows, heads, d)
    return (q, k, v, table, lengths), want.astype(jnp.float32)


def _check_flat(pool_dtype, kvh: int, heads: int, d: int, page_size: int, dtype, rng):
    """`tune_ragged`'s check: a flat batch over a small pool of random keys and values in `pool_dtype`
    (`CHECK_PAGES`) mixing decode rows (one key, a page, a page and one) and chunks (from 0 across pages, from mid-page,
    from a page boundary), padding rows after them. Returns `ragged`'s arguments and the reference's output in
    float32."""
    k, v = _check_pool(pool_dtype, kvh, page_size, d, rng)
    starts = np.array([0, page_size - 1, page_size, 0, page_size // 2 + 3, 2 * page_size])
    lengths = np.array([1, 1, 1, 3 * page_size + 5, page_size + 7, 2 * page_size])
    t = int(lengths.sum()) + 5
    n = -(-int((starts + lengths).max()) // page_size)
    tables = rng.integers(1, CHECK_PAGES + 1, (len(starts), n))
    q = jnp.asarray(rng.normal(size=(t, heads, d)) * d ** -0.5, dtype)
    owner = np.repeat(np.arange(len(starts)), lengths)
    positions = np.concatenate([start + np.arange(count) for start, count in zip(starts, lengths)])
    want = reference(q[:len(owner), None], k, v, jnp.asarray(tables[owner], jnp.int32),
                     jnp.asarray(positions, jnp.int32)[:, None], 1.0)[:, 0].reshape(len(owner), heads, d)
    want = jnp.concatenate([want.astype(jnp.float32), jnp.zeros((t - len(owner), heads, d), jnp.float32)])
    return (q, k, v, jnp.asarray(tables, jnp.int32), jnp.asarray(starts, jnp.int32),
            jnp.asarray(lengths, jnp.int32)), want


def _seconds(exe, args, calls: int = 10, rounds: int = 3) -> float:
    """The fastest of `rounds` mean times of `calls` back-to-back calls of `exe` (after one untimed)."""
    jax.block_until_ready(exe(*args))
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            out = exe(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def _rows_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, keys: int, page_size: int,
                 per_split: int):
    """One program: one row's heads of one KV head (`q [group, d]`, the group padded) over one split of its keys,
    `keys` at a time: each key's pool row (its page from the table, its offset in the page) gathered straight into
    a `[keys, d]` block. Writes the split's unnormalised output, running maximum and sum (flash decoding)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    lo = pl.program_id(2) * per_split
    hi = jnp.minimum(len_ref[0], lo + per_split)
    q = q_ref[...]
    gp, d = q.shape

    def body(i, carry):
        o, m, l = carry
        j = lo + i * keys + jax.lax.broadcasted_iota(jnp.int32, (keys,), 0)
        row = table_ref[j // page_size] * page_size + j % page_size
        k, v = floats(k_ref[row]).astype(q.dtype), floats(v_ref[row]).astype(q.dtype)  # a float8 pool: widened here
        s = jnp.where((j < hi)[None, :], plgpu.dot(q, k.T).astype(jnp.float32), -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        c = jnp.exp(m - m_new)
        o = c[:, None] * o + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return o, m_new, c * l + p.sum(axis=-1)

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32), jnp.zeros((gp,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, jnp.maximum(0, pl.cdiv(hi - lo, keys)), body, init)
    o_ref[...], m_ref[...], l_ref[...] = o, m, l


@functools.partial(jax.jit, static_argnames=("interpret", "splits", "keys", "warps", "stages"))
def decode_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
                interpret: bool = False, splits: int | None = None, keys: int = ROW_KEYS, warps: int = ROW_WARPS,
                stages: int = ROW_STAGES) -> jax.Array:
    """`decode`'s attention (same arguments, same result) by this module's own kernel: a program per row, KV head
    and split of the row's keys (`splits`: by default as many as fill the card, as `splits_for`), each walking its
    keys `keys` at a time as one gather of pool rows; the splits are merged by their maxima and sums."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, h, d = q.shape
    kvh, pages, ps, _ = k_pages.shape
    g = h // kvh
    gp = max(16, _pow2(g))  # Triton's products take at least 16 rows
    n = table.shape[1]
    splits = splits or min(_filling(b, kvh), -(-n * ps // keys))
    per_split = -(-n * ps // splits)
    per_split += -per_split % keys
    width = -(-splits * per_split // ps)  # the table columns a split's last block may name: scratch past `n`
    table = jnp.pad(table, ((0, 0), (0, width - n)), constant_values=SCRATCH)
    qg = jnp.pad(q.reshape(b, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    per = lambda *tail: pl.BlockSpec((None, None, None, *tail), lambda r, hh, s: (r, hh, s) + (0,) * len(tail))  # noqa: E731
    pool = pl.BlockSpec((None, pages * ps, d), lambda r, hh, s: (hh, 0, 0))
    o, m, l = pl.pallas_call(
        functools.partial(_rows_kernel, keys=keys, page_size=ps, per_split=per_split),
        grid=(b, kvh, splits),
        in_specs=[pl.BlockSpec((None, 1), lambda r, hh, s: (r, 0)),
                  pl.BlockSpec((None, width), lambda r, hh, s: (r, 0)),
                  pl.BlockSpec((None, None, gp, d), lambda r, hh, s: (r, hh, 0, 0)), pool, pool],
        out_specs=[per(gp, d), per(gp), per(gp)],
        out_shape=[jax.ShapeDtypeStruct((b, kvh, splits, gp, d), jnp.float32),
                   *[jax.ShapeDtypeStruct((b, kvh, splits, gp), jnp.float32)] * 2],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="paged_decode_rows",
    )(lengths[:, None], table, qg, k_pages.reshape(kvh, pages * ps, d), v_pages.reshape(kvh, pages * ps, d))
    top = m.max(axis=2, keepdims=True)
    w = jnp.where(m > -jnp.inf, jnp.exp(m - top), 0.0)  # a split past the row's length has no keys: weight 0
    out = (o * w[..., None]).sum(2) / jnp.maximum((l * w).sum(2), jnp.finfo(jnp.float32).tiny)[..., None]
    return out[:, :, :g].reshape(b, h, d).astype(q.dtype)


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
        k = floats(k_ref[pages].reshape(width, d)).astype(q.dtype)  # a float8 pool: widened here
        v = floats(v_ref[pages].reshape(width, d)).astype(q.dtype)
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


def ragged(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, tables: jax.Array, starts: jax.Array,
           lengths: jax.Array, interpret: bool = False, choice: RaggedChoice | None = None) -> jax.Array:
    """Causal attention of pre-scaled queries `q [T, h, d]` for several sequences at once: sequence `r`'s
    `lengths[r]` queries follow the earlier sequences' in `q` and sit at positions `starts[r]` onwards, over the
    keys in its pool pages `tables[r]` (written before the call, this chunk's included). Rows past every sequence
    are padding (zeros out). A decode row is a sequence of one query; a prefill chunk, one of many.

    The grid is KV heads x query blocks: each sequence's queries in blocks of `choice.rows` rows (the queries' heads
    of one KV head, padded to a power of two as Triton wants), a program each, walking the pages up to its last
    query `choice.keys` keys at a time (flash attention, online softmax). `choice`: by default `ragged_choice_for`
    the pool and the batch's tokens (the card's, once tuned), looked up outside the jitted body so that a plan
    installed later is traced."""
    return _ragged(q, k_pages, v_pages, tables, starts, lengths, interpret=interpret,
                   choice=choice or ragged_choice_for(k_pages, q.shape[0]))


@functools.partial(jax.jit, static_argnames=("interpret", "choice"))
def _ragged(q, k_pages, v_pages, tables, starts, lengths, interpret: bool, choice: RaggedChoice) -> jax.Array:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    t, h, d = q.shape
    kvh, _, page_size, _ = k_pages.shape
    g = h // kvh
    gp = _pow2(g)
    block = max(1, choice.rows // gp)
    pages_per_step = max(1, choice.keys // page_size)
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
        compiler_params=plgpu.CompilerParams(num_warps=choice.warps, num_stages=choice.stages),
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
