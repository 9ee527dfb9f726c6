"""Device side of the engine: the KV cache, bucketed prefill, and the multi-step decode over all slots.

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
from models import KVCache, Model, Step
from models.sharding import cache_sharding

log = logging.getLogger("sparkler.engine")

PREFILL_BUCKETS = (32, 64, 128, 256, 512)
BATCHED_PREFILL = 128  # prompts up to this many tokens are prefilled several per call
PREFILL_ROWS = 8  # at most this many prompts per prefill call


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Engine sizing: slots, context length, decode steps per dispatch, KV memory budget."""

    max_num_seqs: int = 32
    max_model_len: int = 0  # 0: as much as the KV budget and the model allow
    kv_cache_gb: float = 4.0
    decode_steps: int = 4
    min_attend: int = 128


def kv_bytes_per_token(model: Model) -> int:
    """Bytes of K and V one token occupies across all layers."""
    cfg = model.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def plan_max_len(model: Model, rc: RunnerConfig) -> int:
    """Context length per slot: the requested one, capped by the model and by the KV budget."""
    budget = int(rc.kv_cache_gb * (1 << 30)) // (rc.max_num_seqs * kv_bytes_per_token(model))
    cap = min(model.cfg.max_position, budget)
    want = rc.max_model_len or cap
    if want > cap:
        raise ValueError(f"max_model_len {want} exceeds what fits: {cap} (model limit {model.cfg.max_position}, "
                         f"KV budget {rc.kv_cache_gb} GiB over {rc.max_num_seqs} slots)")
    return max(want // 32 * 32, 32)


def attend_buckets(max_len: int, lo: int) -> tuple[int, ...]:
    """Attended-length buckets: powers of two from `lo`, then `max_len`."""
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
    """Owns the KV cache and sampler state on device, and the compiled step functions."""

    def __init__(self, model: Model, rc: RunnerConfig):
        self.model, self.rc = model, rc
        self.slots = rc.max_num_seqs
        self.max_len = plan_max_len(model, rc)
        self.attend = attend_buckets(self.max_len, min(rc.min_attend, self.max_len))
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b < self.max_len) + (
            (min(PREFILL_BUCKETS[-1], self.max_len),) if self.max_len <= PREFILL_BUCKETS[-1] else ())
        self.chunk = self.prefill_buckets[-1]
        self.batch_buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < self.slots) + (self.slots,)
        vocab = model.cfg.vocab_size
        self.cache = jax.device_put(KVCache.zeros(model.cfg, self.slots, self.max_len),
                                    cache_sharding(model.cfg.num_kv_heads, model.mesh))
        self.replicated = NamedSharding(model.mesh, PartitionSpec())
        self.state = jax.device_put(smp.init_state(self.slots, vocab), self.replicated)
        self.host_params = smp.neutral_params(self.slots, vocab)
        self.push_params()
        self.compiles = 0
        module = model.module

        def forward(params, cache, tokens, positions, slots, step, last_index=None, all_logits=False):
            return module.apply(params, tokens, positions, slots, cache, step, last_index, all_logits)

        @functools.partial(jax.jit, static_argnames=("attend", "echo"), donate_argnums=(1,))
        def prefill(params, cache, tokens, start, length, slots, next_token, attend, echo):
            self.compiles += 1  # counts traces (one per compiled shape)
            s = tokens.shape[1]
            positions = start[:, None] + jnp.arange(s)[None, :]
            step = Step(attend_len=attend, all_slots=False)
            if not echo:  # rows are prompts (padding rows carry an out-of-range slot: their writes are dropped)
                logits, cache = forward(params, cache, tokens, positions, slots, step, length - 1)
                return cache, logits, None
            logits, cache = forward(params, cache, tokens, positions, slots, step, None, True)
            logits = logits[0]
            lp = jax.nn.log_softmax(logits, axis=-1)
            nxt = jnp.concatenate([tokens[0, 1:], next_token[None]])
            chosen = jnp.take_along_axis(lp, nxt[:, None], axis=1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(lp, smp.TOP_LOGPROBS)
            return cache, logits[length[0] - 1][None], (chosen, top_ids, top_lp)

        @functools.partial(jax.jit, static_argnames=("attend", "steps"), donate_argnums=(1, 2))
        def decode(params, cache, state, sparams, tokens, positions, active, attend, steps):
            self.compiles += 1
            step = Step(attend_len=attend, all_slots=True)
            slots = jnp.arange(tokens.shape[0], dtype=jnp.int32)

            def one(carry, _):
                cache, state, tokens, positions = carry
                logits, cache = forward(params, cache, tokens[:, None], positions[:, None], slots, step)
                out, state = smp.sample(logits, sparams, state, active)
                return (cache, state, out.token, positions + 1), out

            nb = tokens.shape[0]  # a batch bucket: slots 0..nb-1
            part = jax.tree.map(lambda x: x[:nb], state)
            sparams = jax.tree.map(lambda x: x[:nb], sparams)
            (cache, part, _, _), outs = jax.lax.scan(one, (cache, part, tokens, positions), None, length=steps)
            state = jax.tree.map(lambda full, x: full.at[:nb].set(x), state, part)
            return cache, state, outs

        @functools.partial(jax.jit, donate_argnums=(0,))
        def first_tokens(state, sparams, logits, active):
            self.compiles += 1
            out, state = smp.sample(logits, sparams, state, active)
            return state, out

        @functools.partial(jax.jit, donate_argnums=(0,))
        def reset_row(state, row, prompt_row, key, mu):
            self.compiles += 1
            return smp.SamplerState(
                state.counts.at[row].set(0), state.prompt_mask.at[row].set(prompt_row),
                state.mu.at[row].set(mu), state.key.at[row].set(key), state.step.at[row].set(0))

        @functools.partial(jax.jit, donate_argnums=(0,))
        def copy_slot(cache, src, dst):
            self.compiles += 1
            return KVCache(cache.k.at[:, dst].set(cache.k[:, src]), cache.v.at[:, dst].set(cache.v[:, src]))

        self._prefill, self._decode, self._first = prefill, decode, first_tokens
        self._reset, self._copy = reset_row, copy_slot

    # ---- host-facing operations -------------------------------------------------------------------------------

    def prefill_chunk(self, slot: int, prompt: list[int], start: int, echo: bool = False):
        """Write one chunk of a prompt (positions `start .. start + chunk`) into `slot`. Returns the chunk's last
        logits `[V]` and, for echo, its per-position `(logprob of the next prompt token, top ids, top logprobs)`."""
        piece = prompt[start:start + self.chunk]
        size = bucket(len(piece), self.prefill_buckets)
        toks = np.zeros((1, size), np.int32)
        toks[0, :len(piece)] = piece
        nxt = prompt[start + len(piece)] if start + len(piece) < len(prompt) else 0
        attend = bucket(min(start + size, self.max_len), self.attend)
        self.cache, logits, extra = self._prefill(
            self.model.params, self.cache, jnp.asarray(toks), jnp.asarray([start], jnp.int32),
            jnp.asarray([len(piece)], jnp.int32), jnp.asarray([slot], jnp.int32), jnp.int32(nxt),
            attend=attend, echo=echo)
        return logits[0], ([np.asarray(x)[:len(piece)] for x in extra] if echo else None)

    def prefill(self, slot: int, prompt: list[int], echo: bool = False):
        """Write a whole prompt's K/V into `slot`, chunk by chunk; returns its last logits `[V]` and, for echo, the
        concatenated per-position logprobs (see `prefill_chunk`)."""
        logits, pieces = None, []
        for start in range(0, len(prompt), self.chunk):
            logits, piece = self.prefill_chunk(slot, prompt, start, echo)
            pieces.append(piece)
        return logits, (join_pieces(pieces) if echo else None)

    def prefill_many(self, items: list[tuple[int, list[int]]]) -> list[jax.Array]:
        """Prefill `(slot, prompt)` pairs and return each one's last logits `[V]`, in order. Prompts of up to
        `BATCHED_PREFILL` tokens share calls (grouped by length bucket, up to `PREFILL_ROWS` rows, padded to a
        power of two); longer ones go through the chunked `prefill`."""
        out: list[jax.Array | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (slot, prompt) in enumerate(items):
            if len(prompt) <= BATCHED_PREFILL:
                groups.setdefault(bucket(len(prompt), self.prefill_buckets), []).append(i)
            else:
                out[i] = self.prefill(slot, prompt)[0]
        for size, idx in groups.items():
            for lo in range(0, len(idx), PREFILL_ROWS):
                part = idx[lo:lo + PREFILL_ROWS]
                nb = bucket(len(part), (1, 2, 4, PREFILL_ROWS))
                toks = np.zeros((nb, size), np.int32)
                lengths = np.ones(nb, np.int32)
                slots = np.full(nb, self.slots, np.int32)  # out of range: padding rows write nothing
                for r, i in enumerate(part):
                    slot, prompt = items[i]
                    toks[r, :len(prompt)], lengths[r], slots[r] = prompt, len(prompt), slot
                attend = bucket(min(size, self.max_len), self.attend)
                self.cache, logits, _ = self._prefill(
                    self.model.params, self.cache, jnp.asarray(toks), jnp.zeros(nb, jnp.int32), jnp.asarray(lengths),
                    jnp.asarray(slots), jnp.int32(0), attend=attend, echo=False)
                for r, i in enumerate(part):
                    out[i] = logits[r]
        return out

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy one slot's K/V rows into another (n > 1 shares one prefill)."""
        self.cache = self._copy(self.cache, src, dst)

    def set_row(self, row: int, settings: dict, prompt: list[int], seed_key: np.ndarray) -> None:
        """Install a request's sampling settings and fresh sampler state in `row`."""
        for k, v in settings.items():
            self.host_params[k][row] = v
        prompt_row = np.zeros(self.model.cfg.vocab_size, bool)
        prompt_row[np.asarray(prompt, np.int64)] = True
        self.state = self._reset(self.state, row, jnp.asarray(prompt_row), jnp.asarray(seed_key, jnp.uint32),
                                 jnp.float32(2.0 * settings.get("mirostat_tau", 5.0)))

    def push_params(self) -> None:
        """Send the host copy of the sampling parameters to the device."""
        self.params = jax.device_put(smp.SamplerParams(**self.host_params), self.replicated)

    def first_tokens(self, rows_logits: dict[int, jax.Array]) -> smp.SampleOut:
        """Sample the first token for newly admitted rows from their prefill logits."""
        logits = jnp.zeros((self.slots, self.model.cfg.vocab_size), jnp.float32)
        rows = np.asarray(sorted(rows_logits), np.int32)
        logits = logits.at[rows].set(jnp.stack([rows_logits[r] for r in sorted(rows_logits)]))
        active = np.zeros(self.slots, bool)
        active[rows] = True
        self.state, out = self._first(self.state, self.params, logits, jnp.asarray(active))
        return jax.tree.map(np.asarray, out)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, active: np.ndarray, steps: int) -> smp.SampleOut:
        """Run `steps` decode steps over the smallest batch bucket holding every active slot; returns outputs
        stacked `[steps, nb, ...]` as numpy."""
        nb = bucket(int(np.flatnonzero(active).max()) + 1, self.batch_buckets)
        tokens, positions, active = tokens[:nb], positions[:nb], active[:nb]
        live = positions[active]
        need = int(live.max()) + steps if live.size else 1
        attend = bucket(min(need, self.max_len), self.attend)
        self.cache, self.state, outs = self._decode(
            self.model.params, self.cache, self.state, self.params, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32), jnp.asarray(active), attend=attend, steps=steps)
        return jax.tree.map(np.asarray, outs)
