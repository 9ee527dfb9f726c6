"""Device side of the engine: the KV page pool, bucketed prefill, and the multi-step decode over all slots.

All functions here are pure and jitted once per shape bucket with the cache and sampler state donated; the host
only hands arrays in and reads results out.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from engine import sampler as smp
from engine.compile import AOT, Job
from models import KVCache, Model
from models.sharding import cache_sharding

log = logging.getLogger("sparkler.engine")

PREFILL_BUCKETS = (32, 64, 128, 256, 512)
BATCHED_PREFILL = 128  # prompts up to this many tokens are prefilled several per call
PREFILL_ROWS = 8  # at most this many prompts per prefill call


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Engine sizing: batch slots, per-sequence context cap, KV page pool (budget and page size), decode steps."""

    max_num_seqs: int = 32  # sequences decoded together (batch rows)
    max_model_len: int = 0  # per-sequence cap; 0: the model's limit, or what the pool holds if that is less
    kv_cache_gb: float = 4.0  # sizes the page pool
    page_size: int = 16  # tokens per page (TPU kernels want 128+)
    decode_steps: int = 4
    min_attend: int = 128
    max_prefill_tokens: int = 512  # long-prompt chunks computed per engine step (SGLang's --max-prefill-tokens)


def platform_defaults(platform: str) -> dict:
    """Engine settings measured best per platform: on an H200, 16 decode steps per dispatch and 16,384 prefill
    tokens per step took 256 concurrent streams from 3,843 to 5,100 tokens/s (docs/PERFORMANCE.md)."""
    if platform == "cpu":
        return dict(decode_steps=4, max_prefill_tokens=512)
    return dict(decode_steps=16, max_prefill_tokens=16384)


def kv_bytes_per_token(model: Model) -> int:
    """Bytes of K and V one token occupies across all layers."""
    cfg = model.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def plan_pages(model: Model, rc: RunnerConfig) -> int:
    """Pages in the pool (page 0, the scratch page, included): the KV budget over the bytes of one page."""
    return int(rc.kv_cache_gb * (1 << 30)) // (rc.page_size * kv_bytes_per_token(model))


def plan_max_len(model: Model, rc: RunnerConfig, num_pages: int) -> int:
    """Context length per sequence: the requested one (else the model's), at most what the pool holds, in pages."""
    pool = (num_pages - 1) * rc.page_size
    want = rc.max_model_len or min(model.cfg.max_position, pool)
    if want > model.cfg.max_position:
        raise ValueError(f"max_model_len {want} exceeds the model's limit of {model.cfg.max_position}")
    if want > pool:
        raise ValueError(f"max_model_len {want} exceeds the {pool} tokens the KV pool holds "
                         f"({rc.kv_cache_gb} GiB); raise --kv-cache-gb")
    if want < rc.page_size:
        raise ValueError(f"the KV pool ({rc.kv_cache_gb} GiB) holds less than one page per sequence")
    return want // rc.page_size * rc.page_size


def attend_buckets(max_len: int, lo: int) -> tuple[int, ...]:
    """Attended-length buckets: powers of two from `lo`, then `max_len` (all multiples of the page size)."""
    out, b = [], lo
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def join_pieces(pieces: list) -> tuple:
    """Concatenate per-chunk echo logprobs `(chosen, top ids, top logprobs)` along the prompt."""
    return tuple(np.concatenate([p[i] for p in pieces]) for i in range(3))


class Runner:
    """Owns the KV page pool and sampler state on device, and the compiled step functions.

    The host hands in page tables (`[rows, pages]` int32, a row per sequence, unused entries 0 = scratch) and sees
    only their widths as compiled shapes: a table sliced to `attend / page_size` columns.
    """

    def __init__(self, model: Model, rc: RunnerConfig):
        self.model, self.rc = model, rc
        self.slots, self.page_size = rc.max_num_seqs, rc.page_size
        self.num_pages = plan_pages(model, rc)
        self.max_len = plan_max_len(model, rc, self.num_pages)
        self.max_pages = self.max_len // self.page_size
        lo = min(max(rc.min_attend, self.page_size), self.max_len)
        self.attend = attend_buckets(self.max_len, lo // self.page_size * self.page_size)
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b < self.max_len) + (
            (min(PREFILL_BUCKETS[-1], self.max_len),) if self.max_len <= PREFILL_BUCKETS[-1] else ())
        self.chunk = self.prefill_buckets[-1]
        self.batch_buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < self.slots) + (self.slots,)
        vocab = model.cfg.vocab_size
        pool = cache_sharding(model.cfg.num_kv_heads, model.mesh)  # zeros made in place, both at once
        self.cache = jax.jit(lambda: KVCache.zeros(model.cfg, self.num_pages, self.page_size),
                             out_shardings=KVCache(pool, pool))()
        self.replicated = NamedSharding(model.mesh, PartitionSpec())
        self.state = jax.device_put(smp.init_state(self.slots, vocab), self.replicated)
        self.host_params = smp.neutral_params(self.slots, vocab)
        self.all_allowed = np.full((self.slots, (vocab + 31) // 32), -1, np.int32)  # bitmasks of free rows
        self.push_params()
        self.compiles = 0
        module = model.module

        def forward(params, cache, tokens, positions, table, last_index=None, all_logits=False):
            return module.apply(params, tokens, positions, table, cache, last_index, all_logits)

        @functools.partial(jax.jit, static_argnames=("echo",), donate_argnums=(1,))
        def prefill(params, cache, tokens, start, length, table, next_token, echo):
            self.compiles += 1  # counts traces (one per compiled shape)
            s = tokens.shape[1]
            positions = start[:, None] + jnp.arange(s)[None, :]
            if not echo:  # rows are prompts (padding rows have an all-scratch table)
                logits, cache = forward(params, cache, tokens, positions, table, length - 1)
                return cache, logits, None
            logits, cache = forward(params, cache, tokens, positions, table, None, True)
            logits = logits[0]
            lp = jax.nn.log_softmax(logits, axis=-1)
            nxt = jnp.concatenate([tokens[0, 1:], next_token[None]])
            chosen = jnp.take_along_axis(lp, nxt[:, None], axis=1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(lp, smp.TOP_LOGPROBS)
            return cache, logits[length[0] - 1][None], (chosen, top_ids, top_lp)

        @functools.partial(jax.jit, static_argnames=("steps",), donate_argnums=(1, 2))
        def decode(params, cache, state, sparams, tokens, positions, active, table, allowed, steps):
            self.compiles += 1

            def one(carry, _):  # `allowed` binds every step: a constrained batch runs one step per dispatch
                cache, state, tokens, positions = carry
                logits, cache = forward(params, cache, tokens[:, None], positions[:, None], table)
                out, state = smp.sample(logits, sparams, state, active, allowed)
                return (cache, state, out.token, positions + 1), out

            nb = tokens.shape[0]  # a batch bucket: slots 0..nb-1
            part = jax.tree.map(lambda x: x[:nb], state)
            sparams = jax.tree.map(lambda x: x[:nb], sparams)
            (cache, part, _, _), outs = jax.lax.scan(one, (cache, part, tokens, positions), None, length=steps)
            state = jax.tree.map(lambda full, x: full.at[:nb].set(x), state, part)
            return cache, state, outs

        @functools.partial(jax.jit, donate_argnums=(0,))
        def first_tokens(state, sparams, logits, active, allowed):
            self.compiles += 1  # one shape per batch bucket: rows past the bucket are left as they are
            nb = logits.shape[0]
            rows = lambda tree: jax.tree.map(lambda x: x[:nb], tree)  # noqa: E731
            out, part = smp.sample(logits, rows(sparams), rows(state), active, allowed)
            return jax.tree.map(lambda full, x: full.at[:nb].set(x), state, part), out

        @functools.partial(jax.jit, donate_argnums=(0,))
        def set_state_row(state, row, values):
            self.compiles += 1
            return jax.tree.map(lambda full, x: full.at[row].set(x), state, values)

        layer_base = np.arange(model.cfg.num_layers)[:, None] * self.num_pages  # each layer's first pool page

        @functools.partial(jax.jit, donate_argnums=(0,))
        def copy_pages(cache, src, dst):
            self.compiles += 1
            src, dst = (layer_base + src[None]).reshape(-1), (layer_base + dst[None]).reshape(-1)  # in every layer
            return KVCache(cache.k.at[:, dst].set(cache.k[:, src]), cache.v.at[:, dst].set(cache.v[:, src]))

        self._prefill, self._decode, self._first = AOT(prefill), AOT(decode), AOT(first_tokens)
        self._set_row, self._copy = AOT(set_state_row), AOT(copy_pages)

    def warm_jobs(self, full: bool = False, constrained: bool = False) -> list[Job]:
        """The shapes to compile before serving: prefill of short prompts (several per call) and of a first chunk,
        the first draw, sampler-row and page copies, and decode at every batch bucket for the shortest attended
        length. `full`: every attended length for decode and prefill too (minutes the first time, seconds once the
        persistent compilation cache holds them). `constrained`: decode of one step too (structured output runs
        one step per dispatch)."""
        i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        p, c, st, sp = self.model.params, self.cache, self.state, self.params
        jobs: list[Job] = []
        for size in self.prefill_buckets:
            budget = max(self.rc.max_prefill_tokens, size)
            rows = [r for r in (1, 2, 4, PREFILL_ROWS) if size <= BATCHED_PREFILL or r * size <= budget]
            attends = [a for a in self.attend if a >= size] if full else [bucket(size, self.attend)]
            for nb in rows:
                for attend in attends:
                    table = i32(nb, attend // self.page_size)
                    jobs.append((self._prefill, (p, c, i32(nb, size), i32(nb), i32(nb), table, np.int32(0)),
                                 dict(echo=False)))
        vocab = self.model.cfg.vocab_size
        for nb in self.batch_buckets:
            jobs.append((self._first, (st, sp, np.zeros((nb, vocab), np.float32), np.zeros(nb, bool),
                                       self.all_allowed[:nb]), {}))
        row = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), st)
        jobs.append((self._set_row, (st, np.int32(0), row), {}))
        jobs.append((self._copy, (c, i32(self.slots), i32(self.slots)), {}))
        steps = sorted({self.rc.decode_steps, 1} if constrained else {self.rc.decode_steps})
        for attend in self.attend if full else self.attend[:1]:
            for nb in self.batch_buckets:
                for k in steps:
                    jobs.append((self._decode, (p, c, st, sp, i32(nb), i32(nb), np.zeros(nb, bool),
                                                i32(nb, attend // self.page_size), self.all_allowed[:nb]),
                                 dict(steps=k)))
        return jobs

    # ---- host-facing operations -------------------------------------------------------------------------------

    def table(self, rows: np.ndarray, attend: int) -> jax.Array:
        """Page-table rows cut to the pages an attended length covers."""
        return jnp.asarray(rows[:, :attend // self.page_size])

    def prefill_chunk(self, table: np.ndarray, tokens: list[int], start: int, echo: bool = False):
        """Write one chunk of a sequence's K/V (positions `start .. start + chunk`) into the pages of its `table`
        row. Returns the chunk's last logits `[V]` and, for echo, its per-position `(logprob of the next prompt
        token, top ids, top logprobs)`."""
        piece = tokens[start:start + self.chunk]
        size = bucket(len(piece), self.prefill_buckets)
        toks = np.zeros((1, size), np.int32)
        toks[0, :len(piece)] = piece
        nxt = tokens[start + len(piece)] if start + len(piece) < len(tokens) else 0
        attend = bucket(min(start + size, self.max_len), self.attend)
        self.cache, logits, extra = self._prefill(
            self.model.params, self.cache, jnp.asarray(toks), jnp.asarray([start], jnp.int32),
            jnp.asarray([len(piece)], jnp.int32), self.table(table[None], attend), jnp.int32(nxt), echo=echo)
        return logits[0], ([np.asarray(x)[:len(piece)] for x in extra] if echo else None)

    def prefill(self, table: np.ndarray, tokens: list[int], start: int = 0, echo: bool = False):
        """Write a sequence's K/V from `start` on, chunk by chunk; returns its last logits `[V]` and, for echo, the
        concatenated per-position logprobs (see `prefill_chunk`)."""
        logits, pieces = None, []
        for s in range(start, len(tokens), self.chunk):
            logits, piece = self.prefill_chunk(table, tokens, s, echo)
            pieces.append(piece)
        return logits, (join_pieces(pieces) if echo else None)

    def prefill_many(self, items: list[tuple[np.ndarray, list[int], int]]) -> list[jax.Array]:
        """Prefill `(table row, tokens, start)` items and return each one's last logits `[V]`, in order. Items with
        up to one chunk of tokens to compute share calls (grouped by length and attended-length bucket, up to
        `PREFILL_ROWS` rows, padded to a power of two); longer ones go through the chunked `prefill`."""
        out: list[jax.Array | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (table, tokens, start) in enumerate(items):
            n = len(tokens) - start
            if n <= self.chunk:
                size = bucket(n, self.prefill_buckets)
                groups.setdefault((size, bucket(min(start + size, self.max_len), self.attend)), []).append(i)
            else:
                out[i] = self.prefill(table, tokens, start)[0]
        for (size, attend), idx in groups.items():
            for lo in range(0, len(idx), PREFILL_ROWS):
                part = idx[lo:lo + PREFILL_ROWS]
                nb = bucket(len(part), (1, 2, 4, PREFILL_ROWS))
                toks = np.zeros((nb, size), np.int32)
                lengths, starts = np.ones(nb, np.int32), np.zeros(nb, np.int32)
                tables = np.zeros((nb, self.max_pages), np.int32)  # padding rows: all scratch
                for r, i in enumerate(part):
                    table, tokens, start = items[i]
                    n = len(tokens) - start
                    toks[r, :n], lengths[r], starts[r], tables[r] = tokens[start:], n, start, table
                self.cache, logits, _ = self._prefill(
                    self.model.params, self.cache, jnp.asarray(toks), jnp.asarray(starts), jnp.asarray(lengths),
                    self.table(tables, attend), jnp.int32(0), echo=False)
                for r, i in enumerate(part):
                    out[i] = logits[r]
        return out

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy pages `src -> dst` (each choice of n > 1 gets its own copy of the prompt's partial last page)."""
        src, dst = np.zeros(self.slots, np.int32), np.zeros(self.slots, np.int32)  # padding: scratch onto scratch
        for lo in range(0, len(pairs), self.slots):
            part = pairs[lo:lo + self.slots]
            src[:], dst[:] = 0, 0
            src[:len(part)], dst[:len(part)] = zip(*part)
            self.cache = self._copy(self.cache, jnp.asarray(src), jnp.asarray(dst))

    def set_row(self, row: int, settings: dict, prompt: list[int], seed_key: np.ndarray) -> None:
        """Install a request's sampling settings and fresh sampler state in `row`."""
        self.set_settings(row, settings)
        prompt_row = np.zeros(self.model.cfg.vocab_size, bool)
        prompt_row[np.asarray(prompt, np.int64)] = True
        fresh = smp.SamplerState(np.zeros(self.model.cfg.vocab_size, np.int32), prompt_row,
                                 np.float32(2.0 * settings.get("mirostat_tau", 5.0)),
                                 np.asarray(seed_key, np.uint32), np.int32(0))
        self.restore_row(row, fresh)

    def set_settings(self, row: int, settings: dict) -> None:
        """Write a request's sampling settings into the host copy of row `row` (sent by `push_params`)."""
        for k, v in settings.items():
            self.host_params[k][row] = v

    def save_row(self, row: int) -> smp.SamplerState:
        """The sampler state of one row, on the host (a preempted sequence takes it along)."""
        return jax.tree.map(lambda x: np.asarray(x[row]), self.state)

    def restore_row(self, row: int, values: smp.SamplerState) -> None:
        """Put a row's sampler state (fresh, or saved at preemption) back on the device."""
        self.state = self._set_row(self.state, jnp.int32(row), jax.tree.map(jnp.asarray, values))

    def push_params(self) -> None:
        """Send the host copy of the sampling parameters to the device."""
        self.params = jax.device_put(smp.SamplerParams(**self.host_params), self.replicated)

    def first_tokens(self, rows_logits: dict[int, jax.Array], allowed: np.ndarray | None = None) -> smp.SampleOut:
        """Sample the first token for newly admitted rows from their prefill logits (`allowed`: `[slots, W]`
        bitmasks, see `sampler.sample`)."""
        rows = np.asarray(sorted(rows_logits), np.int32)
        nb = bucket(int(rows[-1]) + 1, self.batch_buckets)  # the smallest batch bucket holding every new row
        logits = jnp.zeros((nb, self.model.cfg.vocab_size), jnp.float32)
        logits = logits.at[rows].set(jnp.stack([rows_logits[r] for r in sorted(rows_logits)]))
        active = np.zeros(nb, bool)
        active[rows] = True
        allowed = (self.all_allowed if allowed is None else allowed)[:nb]
        self.state, out = self._first(self.state, self.params, logits, jnp.asarray(active), jnp.asarray(allowed))
        return jax.tree.map(np.asarray, out)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, active: np.ndarray, tables: np.ndarray,
               steps: int, allowed: np.ndarray | None = None) -> smp.SampleOut:
        """Run `steps` decode steps over the smallest batch bucket holding every active row, each reading the pages
        of its `tables` row (`allowed`: `[slots, W]` bitmasks, for one step); returns outputs stacked
        `[steps, nb, ...]` as numpy."""
        nb = bucket(int(np.flatnonzero(active).max()) + 1, self.batch_buckets)
        tokens, positions, active = tokens[:nb], positions[:nb], active[:nb]
        live = positions[active]
        need = int(live.max()) + steps if live.size else 1
        attend = bucket(min(need, self.max_len), self.attend)
        self.cache, self.state, outs = self._decode(
            self.model.params, self.cache, self.state, self.params, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32), jnp.asarray(active), self.table(tables[:nb], attend),
            jnp.asarray((self.all_allowed if allowed is None else allowed)[:nb]), steps=steps)
        return jax.tree.map(np.asarray, outs)
