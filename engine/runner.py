"""Device side of the engine: the KV page pool, bucketed prefill, and the multi-step decode over all slots.

All functions here are pure and jitted once per shape bucket with the cache and sampler state donated; the host
only hands arrays in and reads results out.

Data parallelism (a mesh with `data` = D > 1): slot `s` belongs to shard `s // per_shard`, and each shard owns its
slots' sampler rows and its own pool of `num_pages` pages (the pool's page axis is split over `data`). The step
functions are written for one shard and run under `shard_map` over `data` (the `tp` axis stays with GSPMD), so
inside a step every shard sees exactly the single-device layout: its rows, its pool, page tables of its own page
ids. A call's rows are laid out shard by shard, `nb` rows each (`call_rows`); the host-facing methods take and
return arrays indexed by global slot.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from engine import memory, multihost, sampler as smp, sleep as sleeping
from engine.compile import AOT, Job, kept as kept_result, shape_key
from models import KVCache, Model
from models import backends, pooling
from models.backends import paged
from models.sharding import cache_sharding, spec_for

log = logging.getLogger("sparkler.engine")

# Prompt tokens per prefill call and row. 16: the tail of a prompt whose earlier pages the prefix cache served (at most
# a page; a repeated ~650-token prompt's first token came in 37-43 ms against 60-62 at 32 tokens on the 2-core CPU);
# 1: the last token of a prompt the cache held whole (repeated: `PagePool.continuation`; 11-14 ms against 30 at 16).
PREFILL_BUCKETS = (1, 16, 32, 64, 128, 192, 256, 384, 512)
BATCHED_PREFILL = 128  # prompts up to this many tokens are prefilled several per call
PREFILL_ROWS = 8  # at most this many prompts per prefill call
FLAT_TOKENS = 64  # the smallest flat step (`Runner.prefill_flat`); the others double it
EMBED_TOKENS = 4096  # an embedding call's padded tokens at most (one longer input: a call of its own)
EMBED_ROWS = 32  # ... and its inputs
EMBED_MAX_LEN = 8192  # the longest input embedded (one program over all its tokens: its activations, and its
# compile time, grow with it)
TUNE_ROWS = 16  # batch sizes the decode kernel is tuned for (`RunnerConfig.tune_kernels`): from here on, the KV
# pages a step reads are a fair share of its bytes beside the weights (8B shape, 640 tokens: 1.3 of 15 GB at 16 rows).
# Above PREFILL_ROWS: a prefill of one token a prompt attends through `decode` too, always upstream's defaults.
TUNE_LENGTH = 2048  # ... at each row's length: half the context, at most this many tokens


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Engine sizing: batch slots, per-sequence context cap, KV page pool (budget and page size), decode steps."""

    max_num_seqs: int = 32  # sequences decoded together (batch rows)
    max_model_len: int = 0  # per-sequence cap; 0: the model's limit, or what the pool holds if that is less
    kv_cache_gb: float = 0.0  # sizes the page pool (a data shard's); 0: `memory.default_pool` on a GPU or TPU, else 4
    gpu_memory_utilization: float = 0.9  # with `kv_cache_gb` 0: the share of each accelerator's memory to use in all
    page_size: int = 16  # tokens per page (TPU kernels want 128+)
    decode_steps: int = 4
    min_attend: int = 128
    max_prefill_tokens: int = 512  # long-prompt chunks computed per engine step (SGLang's --max-prefill-tokens)
    draft_tokens: int = 16  # the most drafted tokens a verify step scores per row (speculative decoding)
    ngram: bool = False  # draft by n-gram lookup in each request's own tokens (a prediction drafts regardless)
    # Rows per data shard that decode, verify and first-draw steps are compiled for (vLLM's --cuda-graph-sizes): a
    # step runs at the smallest that holds its rows, and the slots per shard are always one. (): powers of two.
    decode_batch_sizes: tuple[int, ...] = ()
    # One flat step (issue 21): an engine step's prompts and chunks, and the running choices' next tokens beside
    # them, in one forward pass over a flat batch of tokens (`Runner.prefill_flat`). None: where the attention
    # backend is `pallas-gpu` (its `ragged` kernel); elsewhere prefill and decode stay separate calls (on a CPU the
    # `cpu` kernel decodes faster than a flat batch attends).
    flat_step: bool | None = None
    # How decode, first-draw and verify programs skip the sampler transforms no row wants (`sampler.sample`'s
    # `branches`). `cond`: one program per shape, a `lax.cond` each. `plain`: beside it, a program without them for
    # batches whose rows need none (`sampler.is_plain`). `select`: that, and for the other batches programs that
    # compute them for every row, with no conditional: `lean` (alternatives, mirostat and the exact top_k and
    # typical_p cuts left out) where every row is `sampler.is_lean`, as generation defaults are, else `select`
    # (`dry` where a row uses DRY, whose 32 passes over the history `select` leaves out).
    # XLA's GPU runtime decides a conditional on the host after waiting for the device, so the launch of a program
    # holding one returns only once the device has run the work queued before it, and the engine cannot work ahead;
    # it decides a loop of unknown count so at every iteration, so a verify program other than `cond` also draws at
    # every drafted position instead of stopping once every draft has failed.
    # None: `plain` on a GPU, else `cond` (a CPU or TPU decides a conditional in place).
    sampler_branches: str | None = None
    # Time `pallas_gpu.CHOICES` of the decode kernel on the card at each batch size from `TUNE_ROWS` on, and
    # `pallas_gpu.RAGGED_CHOICES` of the flat batches' kernel over the largest flat step, and run the fastest
    # (`Runner._tune_attention`; kept in the program store, so once per card, code and shape), with the `pallas-gpu`
    # backend. None: on a GPU (True elsewhere times the kernels interpreted: the tests).
    tune_kernels: bool | None = None
    # Who is seated first (`engine.scheduler.POLICIES`, vLLM's --scheduling-policy): "fcfs", arrival order; or
    # "priority", each request's `priority` (lower sooner) then arrival, less urgent work preempted for more urgent.
    scheduling_policy: str = "fcfs"
    max_images: int = 32  # a model that reads images: images whose features stay on the devices (`engine.images`)
    # bytes a token takes in another pool paged as this one (a draft model's, `engine.draft_model`): both pools'
    # pages come out of `kv_cache_gb`
    extra_kv_bytes: int = 0
    # What the logprobs of drawn tokens report (`sampler.LOGPROBS_MODES`, vLLM's --logprobs-mode): the model's
    # distribution (`raw_logprobs`), its logits, or those of the distribution drawn from, after every sampler
    # transform (`processed_logprobs`, `processed_logits`: what reinforcement learning's importance ratios want)
    logprobs_mode: str = "raw_logprobs"


def platform_defaults(platform: str) -> dict:
    """Engine settings measured best per platform: on an H200, 16 decode steps per dispatch and 16,384 prefill
    tokens per step took 256 concurrent streams from 3,843 to 5,100 tokens/s (docs/PERFORMANCE.md)."""
    if platform == "cpu":
        return dict(decode_steps=4, max_prefill_tokens=512)
    return dict(decode_steps=16, max_prefill_tokens=16384)


def kv_bytes_per_token(model: Model) -> int:
    """Bytes of K and V one token occupies across all layers."""
    cfg = model.cfg
    return cfg.num_layers * cfg.cache_heads * sum(cfg.cache_widths) * paged.pool_dtype(cfg.cache_dtype).itemsize


def plan_pages(model: Model, rc: RunnerConfig) -> int:
    """Pages in the pool (page 0, the scratch page, included): the KV budget over the bytes of one page (and of
    the same page in a draft model's pool)."""
    return int(rc.kv_cache_gb * (1 << 30)) // (rc.page_size * (kv_bytes_per_token(model) + rc.extra_kv_bytes))


def plan_max_len(model: Model, rc: RunnerConfig, num_pages: int) -> int:
    """Context length per sequence: the requested one (else the model's), at most what the pool holds, in pages."""
    pool = (num_pages - 1) * rc.page_size
    want = rc.max_model_len or min(model.cfg.max_position, pool)
    if want > model.cfg.max_position:
        raise ValueError(f"max_model_len {want} exceeds the model's limit of {model.cfg.max_position}; to serve a "
                         f"longer context than it was trained for, say so: --hf-overrides "
                         f"'{{\"max_position_embeddings\": {want}}}', with a \"rope_scaling\" (yarn, linear, ...) to "
                         "stretch its positions")
    if want > pool:
        raise ValueError(f"max_model_len {want} exceeds the {pool} tokens the KV pool holds "
                         f"({rc.kv_cache_gb} GiB); raise --kv-cache-gb")
    if want < rc.page_size:
        raise ValueError(f"the KV pool ({rc.kv_cache_gb} GiB) holds less than one page per sequence")
    return want // rc.page_size * rc.page_size


def doubling(lo: int, most: int) -> tuple[int, ...]:
    """Buckets `lo`, `2 lo`, `4 lo`, ... below `most`, then `most`."""
    out, b = [], lo
    while b < most:
        out.append(b)
        b *= 2
    return tuple(out) + (most,)


def _i32(*shape: int) -> np.ndarray:
    """Zeros standing for an int32 argument of a warm-up job (only its shape matters)."""
    return np.zeros(shape, np.int32)


Mix = tuple[tuple[int, float], ...]  # a request's LoRA adapters: (LoRA slot, scale) pairs ((): the base model)


def _lora(rows: int, mix: Mix) -> tuple[np.ndarray, np.ndarray] | None:
    """LoRA adapters `mix` for each of `rows` rows (`models.lora.delta`), as `[rows, 1, len(mix)]` arrays, an
    embedding call's argument (None for the base model: the program without the LoRA terms)."""
    if not mix:
        return None
    slots, scales = zip(*mix)
    return (np.broadcast_to(np.asarray(slots, np.int32), (rows, 1, len(mix))).copy(),
            np.broadcast_to(np.asarray(scales, np.float32), (rows, 1, len(mix))).copy())


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def join_pieces(pieces: list) -> tuple:
    """Concatenate per-chunk echo logprobs `(chosen, top ids, top logprobs, chosen's rank)` along the prompt."""
    return tuple(np.concatenate([p[i] for p in pieces]) for i in range(4))


class Dispatched:
    """A dispatched draw (a decode, or first tokens): its outputs on the devices, read back (once) by `result`."""

    def __init__(self, outs: smp.SampleOut, rows: np.ndarray, runner: "Runner", axis: int):
        self._outs, self._rows, self._runner, self._axis, self._host = outs, rows, runner, axis, None

    def result(self) -> smp.SampleOut:
        """The outputs as numpy indexed by slot (`[steps, slots, ...]` for a decode; waits for the devices)."""
        if self._host is None:
            self._host = self._runner.read_back(self._outs, self._rows, axis=self._axis)
            self._outs = None
        return self._host


@dataclasses.dataclass
class Pieces:
    """A long input embedded a chunk at a time (`Runner.embed_next`, one call between engine steps): how far it is,
    the pool holding its keys so far, and what its pieces pooled (`mean`: their sum)."""

    ids: list[int]
    mode: str
    size: int  # tokens a piece (`Runner.piece_size`)
    adapters: tuple = ()  # the LoRA adapters (and scales) its first piece ran on (`Engine.embed_next`: every
    # piece runs on them)
    start: int = 0
    pool: KVCache | None = None
    pooled: np.ndarray | None = None

    @property
    def done(self) -> bool:
        """Whether every piece is pooled (`pooled` is then the input's vector)."""
        return self.start >= len(self.ids)


class Runner:
    """Owns the KV page pool and sampler state on device, and the compiled step functions.

    The host hands in page tables (`[rows, pages]` int32, a row per sequence, unused entries 0 = scratch) and sees
    only their widths as compiled shapes: a table sliced to `attend / page_size` columns. Every argument of the
    host-facing methods is host data (numbers, lists, numpy arrays): a prefill's last logits stay on the devices, in
    the slot's row of `last_logits`, until `draw` draws from them, so a multi-host leader can replay each
    call on the other processes (`engine.multihost`).
    """

    def __init__(self, model: Model, rc: RunnerConfig):
        mesh = model.mesh
        self.dp = mesh.shape["data"]
        self.per_shard = -(-rc.max_num_seqs // self.dp)  # slots per data shard
        # The flat step where the `ragged` kernel computes its attention (a model it cannot serve, as one with a
        # window, attends through `xla`: `resolve_backend`).
        kernel = model.module.backend == "pallas-gpu"
        self.flat = kernel if rc.flat_step is None else rc.flat_step
        if self.flat and self.dp > 1:
            if rc.flat_step:
                raise ValueError("the flat step runs on one data shard (-dp 1)")
            self.flat = False
        if self.flat and not kernel and mesh.devices.flat[0].platform != "cpu":  # the reference's gathers
            raise ValueError("the flat step needs the pallas-gpu attention kernel on an accelerator (this model "
                             f"attends through {model.module.backend!r}): --flat-step off")
        try:  # how `kv_cache_gb` 0 sizes the pool on an accelerator (None on a CPU); logged when a size is given
            self.fit = memory.default_pool(model, *self._working(model, rc), rc.gpu_memory_utilization)
        except Exception as e:  # noqa: BLE001  (no room: with a size given, only the log line is missed)
            if not rc.kv_cache_gb:
                raise
            log.warning("sparkler: the KV pool's default size not found (%s: %s)", type(e).__name__, e)
            self.fit = None
        if not rc.kv_cache_gb:
            rc = dataclasses.replace(rc, kv_cache_gb=self.fit.pool / (1 << 30) if self.fit else memory.CPU_GB)
        self.model, self.rc = model, rc
        self.vocab, self.image_block = model.cfg.vocab_size, model.cfg.image_block  # the scheduler's (`_whole`)
        self.slots, self.page_size = self.dp * self.per_shard, rc.page_size
        self.num_pages = plan_pages(model, rc)  # per data shard
        self.max_len = plan_max_len(model, rc, self.num_pages)
        self.max_pages = self.max_len // self.page_size
        lo = min(max(rc.min_attend, self.page_size), self.max_len)
        self.attend = doubling(lo // self.page_size * self.page_size, self.max_len)  # page multiples
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b < self.max_len) + (
            (min(PREFILL_BUCKETS[-1], self.max_len),) if self.max_len <= PREFILL_BUCKETS[-1] else ())
        self.chunk = self.prefill_buckets[-1]
        ps = rc.page_size  # embedding inputs' lengths: page multiples (a table as wide as the input: `embed`)
        most = min(self.max_len, EMBED_MAX_LEN // ps * ps)
        self.embed_sizes = tuple(sorted({min(-(-b // ps) * ps, most)
                                         for b in PREFILL_BUCKETS[1:] + doubling(self.chunk, most)}))
        sizes = rc.decode_batch_sizes or (1, 2, 4, 8, 16, 32, 64, 128)
        if any(b < 1 for b in sizes):
            raise ValueError(f"decode batch sizes must be positive: {sizes}")
        self.batch_buckets = tuple(sorted({b for b in sizes if b < self.per_shard} | {self.per_shard}))
        # sampler rows installed per call (`install_rows`): powers of two, and every slot
        self.row_buckets = doubling(1, self.slots)
        self.copy_buckets = doubling(1, self.per_shard)  # page copies per call and shard (`copy_pages`)
        # prompts prefilled per call and shard: never more than its slots (each prompt holds one)
        self.prefill_rows = tuple(sorted({bucket(n, (1, 2, 4, PREFILL_ROWS))
                                         for n in range(1, min(self.per_shard, PREFILL_ROWS) + 1)}))
        if kernel and rc.page_size & (rc.page_size - 1):
            raise ValueError(f"the pallas-gpu kernels need a power-of-two page size, not {rc.page_size}")
        # A flat step's tokens, padded to a power of two or to the most it takes: the step's prompt budget (or a
        # chunk) and every slot's next token; its sequences: every slot and one more, the padding tokens' (scratch).
        most = max(rc.max_prefill_tokens, self.chunk) + self.slots
        self.flat_buckets = doubling(FLAT_TOKENS, most)
        platform = mesh.devices.flat[0].platform
        self.branches = rc.sampler_branches or ("plain" if platform in ("gpu", "cuda", "rocm") else "cond")
        if self.branches not in smp.BRANCHES:
            raise ValueError(f"sampler_branches: one of {smp.BRANCHES}, not {self.branches!r}")
        if rc.logprobs_mode not in smp.LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode: one of {smp.LOGPROBS_MODES}, not {rc.logprobs_mode!r}")
        sample = functools.partial(smp.sample, logprobs=rc.logprobs_mode)
        self.plain_rows = np.ones(self.slots, bool)  # each slot's settings are `sampler.is_plain` (set at install)
        self.lean_rows = np.ones(self.slots, bool)  # ... and `sampler.is_lean`
        self.dry_rows = np.zeros(self.slots, bool)  # ... uses DRY
        vocab = model.cfg.vocab_size
        pool = cache_sharding(model.cfg.cache_heads, mesh)  # zeros made in place, both at once
        zeros = jax.jit(lambda: KVCache.zeros(model.cfg, self.dp * self.num_pages, self.page_size),
                        out_shardings=KVCache(pool, pool))
        self.cache_shape = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                        jax.eval_shape(zeros), KVCache(pool, pool))
        # Zeroing gigabytes takes seconds (page faults): it runs on a thread, behind loading the first programs
        # (which need only its shape); the first step that uses the pool waits for it.
        self._zeroing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-pool").submit(zeros)
        self._zeros = zeros  # (again after a sleep: `restore_pool`)
        self.by_row = NamedSharding(mesh, P("data"))  # sampler rows: each shard holds its slots'
        self.state = jax.device_put(smp.init_state(self.slots, vocab), self.by_row)
        self.params = jax.device_put(smp.SamplerParams(**smp.neutral_params(self.slots, vocab)), self.by_row)
        self.all_allowed = np.full((self.slots, (vocab + 31) // 32), -1, np.int32)  # bitmasks of free rows
        # each slot's next logits, written by the prefill programs (a prompt's last) and `decode_logits` (a masked
        # step's) and read by `draw`, so neither the host nor an eager op touches them (a row is valid until drawn)
        self.last_logits = jax.device_put(jnp.zeros((self.slots, vocab), jnp.float32), self.by_row)
        self.drawable: set[int] = set()  # slots whose `last_logits` row holds logits not drawn from yet
        # each slot's last drawn token, on the devices: written by every decode and first draw, read by the next
        # decode or flat step for the rows the host has not read back yet (`fresh`, `from_drawn`), so the engine can
        # dispatch a step before reading back the one before it
        self.drawn = jax.device_put(jnp.zeros(self.slots, jnp.int32), self.by_row)
        # each slot's scale of each LoRA slot (`models.lora`; 0: not applied; a row of zeros: the base model), set
        # as work is seated (`seat_adapters`) and sent with every step (`_adapters`): None without LoRA slots
        self.lora_weights = np.zeros((self.slots, model.cfg.lora_slots), np.float32) if model.cfg.lora_slots else None
        self.compiles = 0
        self.read_seconds = 0.0  # spent reading outputs back (`device_seconds`)
        gpu = platform in ("gpu", "cuda")
        self.decode_plan, self.ragged_plan = self._tune_attention(
            gpu if rc.tune_kernels is None else rc.tune_kernels, not gpu)
        module = model.module
        gathered = NamedSharding(mesh, P())  # what the host reads back: on every process
        rows, kv, rep = P("data"), KVCache(P(None, "data"), P(None, "data")), P()

        def over_shards(fn, in_specs, out_specs):
            """`fn`, written for one data shard, over every shard (itself when there is one)."""
            if self.dp == 1:
                return fn
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={"data"},
                                 check_vma=False)

        def forward(params, cache, tokens, positions, table, last_index=None, all_logits=False, adapters=None):
            return module.apply(params, tokens, positions, table, cache, last_index, all_logits, adapters)

        def adapters_of(lora, rows):  # the LoRA slots and scales of each row's sequence (rows past the slots: none)
            if lora is None:
                return None
            return (jnp.take(lora[0], rows, axis=0, mode="fill", fill_value=-1),
                    jnp.take(lora[1], rows, axis=0, mode="fill", fill_value=0))

        # The prefills write each prompt's last logits into the shard's `last` rows named by `dest` (the slot within
        # the shard; padding rows name one past the shard's slots, and are dropped).
        def prefill_rows(params, cache, last, tokens, start, length, table, dest, lora):  # rows are prompts
            positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]  # (padding: all scratch)
            logits, cache = forward(params, cache, tokens, positions, table, length - 1, False,
                                    adapters_of(lora, dest[:, None]))
            return cache, last.at[dest].set(logits.astype(last.dtype), mode="drop")

        def prefill_echo(params, cache, last, tokens, start, length, table, next_token, dest, lora):  # one prompt
            positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]  # in the shard's row 0
            logits, cache = forward(params, cache, tokens, positions, table, None, True,
                                    adapters_of(lora, dest[:1, None]))
            logits = logits[0]
            lp = jax.nn.log_softmax(logits, axis=-1)
            nxt = jnp.concatenate([tokens[0, 1:], next_token[None]])
            chosen = jnp.take_along_axis(lp, nxt[:, None], axis=1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(lp, smp.TOP_LOGPROBS)
            rank = 1 + jnp.sum(lp > chosen[:, None], axis=1, dtype=jnp.int32)  # the next token's, in the vocabulary
            last = last.at[dest[:1]].set(logits[length[0] - 1][None].astype(last.dtype), mode="drop")
            return cache, last, (chosen[None], top_ids[None], top_lp[None], rank[None])

        @functools.partial(jax.jit, donate_argnums=(1, 2))
        def flat_step(params, cache, last, tokens, positions, owner, tables, starts, lengths, pages, dest, drawn,
                      from_drawn, lora):
            # tokens [T]: the sequences' tokens one after another (see `paged.Flat`), those with a `from_drawn` slot
            # taken from `drawn` (a rider whose last token is not read back yet); each sequence's last logits go to
            # its `dest` row of `last` (the padding sequences' to one past the slots: dropped)
            self.compiles += 1
            tokens = jnp.where(from_drawn >= 0, drawn[jnp.maximum(from_drawn, 0)], tokens)
            flat = paged.Flat(tables, owner, starts, lengths, pages)
            logits, cache = forward(params, cache, tokens[None], positions[None], flat, jnp.cumsum(lengths) - 1,
                                    False, adapters_of(lora, dest[owner][None]))
            return cache, last.at[dest].set(logits.astype(last.dtype), mode="drop")

        prefill_rows = over_shards(prefill_rows, (rep, kv, *(rows,) * 7), (kv, rows))
        prefill_echo = over_shards(prefill_echo, (rep, kv, *(rows,) * 5, rep, rows, rows), (kv, rows, rows))

        @functools.partial(jax.jit, static_argnames=("echo",), donate_argnums=(1, 2))
        def prefill(params, cache, last, tokens, start, length, table, next_token, dest, lora, echo):
            self.compiles += 1  # counts traces (one per compiled shape)
            if not echo:
                return (*prefill_rows(params, cache, last, tokens, start, length, table, dest, lora), None)
            return prefill_echo(params, cache, last, tokens, start, length, table, next_token, dest, lora)

        def decode_shard(params, cache, state, sparams, tokens, positions, active, table, drawn, fresh, lora, steps,
                         branches):
            def one(carry, _):
                cache, state, tokens, positions = carry
                # One row: XLA fuses int8 weights' widening into each matrix-vector product, reading int8. Tied to
                # the step's tokens the weights are not loop-invariant, so that widening is not hoisted out of the
                # loop into float32 copies read every step (2x slower). Several rows: the products widen anyway,
                # and widening once per dispatch is cheaper (docs/PERFORMANCE.md, "int8 weights").
                p, tokens = jax.lax.optimization_barrier((params, tokens)) if tokens.shape[0] == 1 else (params, tokens)
                logits, cache = forward(p, cache, tokens[:, None], positions[:, None], table, None, False, adapters)
                out, state = sample(logits, sparams, state, active, None, branches)
                return (cache, state, out.token, positions + 1), out

            nb = tokens.shape[0]  # a batch bucket: slots 0..nb-1
            tokens = jnp.where(fresh, drawn[:nb], tokens)  # rows whose last token the host has not read back
            adapters = adapters_of(lora, jnp.arange(nb)[:, None])
            part = jax.tree.map(lambda x: x[:nb], state)
            sparams = jax.tree.map(lambda x: x[:nb], sparams)
            (cache, part, last, _), outs = jax.lax.scan(one, (cache, part, tokens, positions), None, length=steps)
            state = jax.tree.map(lambda full, x: full.at[:nb].set(x), state, part)
            return cache, state, outs, drawn.at[:nb].set(jnp.where(active, last, drawn[:nb]))

        @functools.partial(jax.jit, static_argnames=("steps", "branches"), donate_argnums=(1, 2, 8))
        def decode(params, cache, state, sparams, tokens, positions, active, table, drawn, fresh, lora, steps,
                   branches="cond"):
            # each active row's last token goes to its slot of `drawn`: the next step may take it as its input before
            # the host has read these outputs back (`Runner.decode`'s `fresh`)
            self.compiles += 1
            fn = over_shards(functools.partial(decode_shard, steps=steps, branches=branches), (rep, kv, *(rows,) * 9),
                             (kv, rows, P(None, "data"), rows))
            cache, state, outs, drawn = fn(params, cache, state, sparams, tokens, positions, active, table, drawn,
                                           fresh, lora)
            return cache, state, jax.lax.with_sharding_constraint(outs, gathered), drawn

        def logits_shard(params, cache, last, tokens, positions, active, table, drawn, fresh, lora):
            # one decode step's forward pass: each active row's logits go to its row of `last`, for `draw`
            nb = tokens.shape[0]
            tokens = jnp.where(fresh, drawn[:nb], tokens)
            logits, cache = forward(params, cache, tokens[:, None], positions[:, None], table, None, False,
                                    adapters_of(lora, jnp.arange(nb)[:, None]))
            dest = jnp.where(active, jnp.arange(nb), last.shape[0])  # inactive rows: past the slots, dropped
            return cache, last.at[dest].set(logits.astype(last.dtype), mode="drop")

        logits_shard = over_shards(logits_shard, (rep, kv, *(rows,) * 8), (kv, rows))

        @functools.partial(jax.jit, donate_argnums=(1, 2))
        def decode_logits(params, cache, last, tokens, positions, active, table, drawn, fresh, lora):
            self.compiles += 1
            return logits_shard(params, cache, last, tokens, positions, active, table, drawn, fresh, lora)

        def verify_shard(params, cache, state, sparams, tokens, positions, ndraft, active, table, allowed, lora,
                         branches):
            # tokens [nb, W]: a row's last token, then its draft (ndraft tokens), then padding. One forward pass
            # scores all W positions; the sampler then runs over them in order, threading the row's state (and
            # each position's grammar mask, `allowed [nb, W, words]`), and a row stays alive while each drafted
            # token equals the token sampled before it (the positions a row does not reach are not kept).
            nb, w = tokens.shape
            pos = positions[:, None] + jnp.arange(w)[None, :]
            logits, cache = forward(params, cache, tokens, pos, table, None, True,
                                    adapters_of(lora, jnp.arange(nb)[:, None]))
            part = jax.tree.map(lambda x: x[:nb], state)
            sparams = jax.tree.map(lambda x: x[:nb], sparams)
            draw = lambda j, part, live: sample(jnp.take(logits, j, axis=1), sparams, part, live,  # noqa: E731
                                                    jnp.take(allowed, j, axis=1), branches)
            shapes = jax.eval_shape(draw, 0, part, active)[0]

            def going(carry):  # a row alive at j has j <= its ndraft (it was alive at j - 1 < ndraft, or j = 0)
                j, _, alive, _, _ = carry
                return (j < w) & jnp.any(alive)

            def one(carry):
                j, part, alive, outs, kept = carry
                live = alive & (j <= ndraft)
                out, part = draw(j, part, live)
                nxt = jnp.take(tokens, jnp.minimum(j + 1, w - 1), axis=1)
                outs = jax.tree.map(lambda buf, x: buf.at[j].set(x), outs, out)
                return j + 1, part, live & (j < ndraft) & (out.token == nxt), outs, kept.at[j].set(live)

            empty = jax.tree.map(lambda x: jnp.zeros((w, *x.shape), x.dtype), shapes), jnp.zeros((w, nb), bool)
            carry = jnp.int32(0), part, active, *empty
            if branches == "cond":  # the loop ends once every draft has failed: a rejection costs no more draws
                _, part, _, outs, kept = jax.lax.while_loop(going, one, carry)
            else:  # every position, rows masked: XLA's GPU runtime decides a loop of unknown count on the host
                _, part, _, outs, kept = jax.lax.fori_loop(0, w, lambda _, c: one(c), carry)
            state = jax.tree.map(lambda full, x: full.at[:nb].set(x), state, part)
            return cache, state, outs, kept

        @functools.partial(jax.jit, static_argnames=("branches",), donate_argnums=(1, 2))
        def verify(params, cache, state, sparams, tokens, positions, ndraft, active, table, allowed, lora,
                   branches="cond"):
            self.compiles += 1
            fn = over_shards(functools.partial(verify_shard, branches=branches), (rep, kv, *(rows,) * 9),
                             (kv, rows, P(None, "data"), P(None, "data")))
            cache, state, outs, kept = fn(params, cache, state, sparams, tokens, positions, ndraft, active, table,
                                          allowed, lora)
            return cache, state, *jax.lax.with_sharding_constraint((outs, kept), gathered)

        def first_shard(state, sparams, last, rows, source, allowed, drawn, branches):
            # `rows`: the shard's slots that draw (padding: one past its slots), each from its `source` row of
            # `last`: the sampler runs on those rows alone, whichever slots they are; their tokens go to `drawn`
            per = state.step.shape[0]
            pick = lambda tree: jax.tree.map(lambda x: x[jnp.minimum(rows, per - 1)], tree)  # noqa: E731
            out, new = sample(last[source], pick(sparams), pick(state), rows < per, allowed, branches)
            state = jax.tree.map(lambda full, x: full.at[rows].set(x, mode="drop"), state, new)
            return state, out, drawn.at[rows].set(out.token, mode="drop")

        def first_over(branches):  # `first_shard` of one variant over every shard (`rows` here is the spec)
            return over_shards(functools.partial(first_shard, branches=branches), (rows,) * 7, (rows, rows, rows))

        @functools.partial(jax.jit, static_argnames=("branches",), donate_argnums=(0, 6))
        def first_tokens(state, sparams, last, slots, source, allowed, drawn, branches="cond"):
            self.compiles += 1  # one shape per batch bucket (and sampler variant)
            state, out, drawn = first_over(branches)(state, sparams, last, slots, source, allowed, drawn)
            return state, jax.lax.with_sharding_constraint(out, gathered), drawn

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def set_rows(state, sparams, rows, state_rows, param_rows):
            # each field's rows, one per `rows` entry (padding rows name one past the slots: dropped)
            self.compiles += 1  # one shape per row bucket
            put = lambda full, x: full.at[rows].set(x, mode="drop")  # noqa: E731
            return jax.tree.map(put, state, state_rows), jax.tree.map(put, sparams, param_rows)

        layer_base = np.arange(model.cfg.num_layers)[:, None] * self.num_pages  # each layer's first pool page

        def copy_shard(cache, src, dst):
            src, dst = (layer_base + src[None]).reshape(-1), (layer_base + dst[None]).reshape(-1)  # in every layer
            return KVCache(cache.k.at[:, dst].set(cache.k[:, src]), cache.v.at[:, dst].set(cache.v[:, src]))

        copy_shard = over_shards(copy_shard, (kv, rows, rows), kv)

        @functools.partial(jax.jit, donate_argnums=(0,))
        def copy_pages(cache, src, dst):
            self.compiles += 1
            return copy_shard(cache, src, dst)

        # Embeddings (`embed`): the inputs' hidden states, pooled, with nothing kept. Through the XLA reference with a
        # table exactly as wide as the input, attention reads no page (`paged.prefill`: the chunk's own keys, as
        # computed), so every write goes to a one-page scratch pool and the pool serving requests is never touched.
        embedder = module.clone(backend="xla")

        @functools.partial(jax.jit, static_argnames=("mode",), out_shardings=gathered)
        def embed(params, tokens, lengths, adapters, mode):
            self.compiles += 1
            b, s = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            table = jnp.zeros((b, s // self.page_size), jnp.int32)
            x, _ = embedder.apply(params, tokens, positions, table, KVCache.zeros(model.cfg, 1, self.page_size),
                                  None, False, adapters, True)
            return pooling.pool(x, lengths, mode)

        # An input longer than a call's budget goes in pieces of a chunk instead (`embed_next`), each attending to the
        # earlier pieces' keys through the model's own backend, as a prompt's chunks do, in a pool of its own whose
        # pages hold the input's positions in order: the engine steps between pieces, and the pool serving
        # requests is still not touched.
        own = NamedSharding(mesh, spec_for(("kv_heads", None, None, None), (model.cfg.cache_heads, 0, 0, 0), mesh))
        self._piece_pool = KVCache(own, own)
        self._embed_pool = jax.jit(lambda pages: KVCache.zeros(model.cfg, pages, self.page_size), static_argnums=0,
                                   out_shardings=self._piece_pool)

        @functools.partial(jax.jit, static_argnames=("mode",), donate_argnums=(1,),
                           out_shardings=(gathered, self._piece_pool))
        def embed_piece(params, pool, tokens, start, length, table, adapters, mode):
            # (`table`, the pool's pages in order, is an argument so its width keys the program: a pool is a pytree)
            self.compiles += 1
            positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
            x, pool = module.apply(params, tokens, positions, table, pool, None, False, adapters, True)
            return pooling.pool(x, length, mode), pool

        # What shapes a program's trace beyond its arguments: the model, the mesh and the card's `ragged` settings,
        # and for the decode programs the card's decode kernel plan (`_tune_attention`). The runner's settings only
        # shape the arguments (slots, pool pages, page size, table widths, decode steps), which key the program store
        # anyway, so engines of one model with other settings share every program of the same shapes. The sampler's
        # programs trace nothing of the model either: any engine of the vocabulary and slots shares them.
        ns = repr((model.cfg, module.layer_cls.__qualname__, module.backend, module.scan, dict(mesh.shape),
                   sorted(self.ragged_plan.items())))
        tuned = ns + repr(sorted(self.decode_plan.items()))  # the programs that run `pallas_gpu.decode`
        drawing = repr(rc.logprobs_mode)  # and what the programs that draw report as logprobs
        self._prefill, self._decode = AOT(prefill, "prefill", ns), AOT(decode, "decode", tuned + drawing)
        sampler_ns = repr(dict(mesh.shape))
        self._first = AOT(first_tokens, "first", sampler_ns + drawing)
        self._set_rows = AOT(set_rows, "set_rows", sampler_ns)
        self._copy, self._verify = AOT(copy_pages, "copy", ns), AOT(verify, "verify", ns + drawing)
        self._flat, self._logits = AOT(flat_step, "flat", ns), AOT(decode_logits, "logits", tuned)
        self._embed, self._embed_piece = AOT(embed, "embed", ns), AOT(embed_piece, "embed_piece", ns)
        self._step_programs = (self._prefill, self._decode, self._first, self._set_rows, self._copy, self._verify,
                               self._flat, self._logits)

    def _working(self, model: Model, rc: RunnerConfig) -> tuple:
        """`memory.working_bytes`' step sizes for this runner: its largest step's tokens (a prompt budget or chunk,
        and every slot's next token), rows over the vocabulary (a verify pass's logits, and each slot's last logits,
        penalty counts, biases and seen tokens, kept on the devices), and what goes through
        `paged.reference` at most in a call: the flat step's every token, else a prefill's prompts (or a verify
        pass's drafts) over the longest context and a chunk; nothing where the `pallas-gpu` kernels attend."""
        tokens = max(rc.max_prefill_tokens, PREFILL_BUCKETS[-1]) + self.per_shard
        rows = self.per_shard * (rc.draft_tokens + 1 + 4)  # a verify pass's logits, and the slots' own rows
        longest = rc.max_model_len or model.cfg.max_position
        context = longest + min(PREFILL_BUCKETS[-1], longest)  # a chunk's table covers the context and the chunk
        if model.module.backend == "pallas-gpu":
            reference = None
        elif self.flat:
            reference = (tokens, tokens, context)
        else:  # a prefill call's prompts: short ones 8 at a time, or as many chunks as the budget holds
            queries = min(PREFILL_ROWS * PREFILL_BUCKETS[-1],
                          max(rc.max_prefill_tokens, PREFILL_ROWS * BATCHED_PREFILL))
            reference = (max(queries, rows), max(PREFILL_ROWS, self.per_shard), context)
        return tokens, rows, reference

    def _tune_attention(self, tune: bool, interpret: bool = False) -> tuple[dict, dict]:
        """Which `pallas_gpu` decode kernel and settings run each batch size from `TUNE_ROWS` on, and which settings
        `ragged` runs at by a step's tokens: with `tune`, the fastest of `pallas_gpu.CHOICES` that compute right on this
        card (`pallas_gpu.tune`), over this pool, at half the context up to `TUNE_LENGTH` tokens, and of
        `pallas_gpu.RAGGED_CHOICES` over two flat steps (`pallas_gpu.tune_ragged`: every slot's next token at that
        length beside one prompt's chunk, mostly decode rows, as a step is while requests come and go; and beside a
        whole prompt budget, the largest step, as at a burst; without the flat step, a prefill budget's chunks), kept in
        the program store (a warm start reads it and waits for nothing); else none (the kernels' defaults). Installed
        for this pool's shape either way (`pallas_gpu.use`), for the programs traced after. The card's choice, not a
        guess: session 27's H200 ran upstream's decode kernel at 1,036-1,383 GB/s by its settings alone. On several
        processes, process 0 times on its devices and every process runs its plan (`multihost.from_leader`: the same
        programs everywhere; not kept, as no program is there). The defaults where the pool cannot be allocated (the
        server says so) or nothing ran (then nothing is kept). Returns the decode plan and the `ragged` plan (tokens ->
        choice)."""
        from models.backends import pallas_gpu

        cfg = self.model.cfg
        if self.model.module.backend != "pallas-gpu":
            return {}, {}
        shape = list(self.cache_shape.k.shape)
        shape[1] //= self.dp  # one shard's pool, as the programs see it
        rows = [b for b in self.batch_buckets if b >= TUNE_ROWS] if tune else []
        length = min(self.max_len // 2, TUNE_LENGTH) // self.page_size * self.page_size or self.page_size
        # flat steps: every slot's next token beside a chunk, and beside a prompt budget (without the flat step,
        # `ragged` serves prefill calls: the budget's chunks alone)
        sizes, beside = (tuple(sorted({bucket(self.per_shard + self.chunk, self.flat_buckets),
                                       self.flat_buckets[-1]})), self.per_shard) if self.flat else (
            (max(self.rc.max_prefill_tokens, self.chunk),), 0)
        t0, plan, ragged = time.perf_counter(), {}, {}

        def make():
            k, v = (x.addressable_shards[0].data for x in (self.cache.k, self.cache.v))
            plan, times, left = pallas_gpu.tune(k, v, cfg.num_heads, tuple(rows), length, cfg.dtype,
                                                interpret=interpret) if rows else ({}, {}, {})
            ragged, flat_times, flat_left = pallas_gpu.tune_ragged(k, v, cfg.num_heads, beside, sizes, length,
                                                                   cfg.dtype, interpret=interpret)
            for choice, why in (left | flat_left).items():
                log.warning("sparkler: attention %s left out: %s", choice, why)
            for b in rows:  # every choice's time, for the docs
                kv = 2 * b * length * k.shape[0] * k.shape[3] * k.dtype.itemsize  # the K/V bytes a call reads
                log.info("decode attention at %d rows of %d keys (K/V at %.0f GB/s), ms a layer: %s", b, length,
                         kv / min(times[b].values(), default=float("inf")) / 1e9,
                         "; ".join(f"{c} {t * 1e3:.3f}" for c, t in sorted(times[b].items(), key=lambda ct: ct[1])))
            for n in sizes:
                log.info("flat attention over %d tokens (%d rows of %d keys, the rest new prompts), ms a layer: %s",
                         n, min(beside, n - 1), length,
                         "; ".join(f"{c} {t * 1e3:.3f}" for c, t in sorted(flat_times[n].items(),
                                                                            key=lambda ct: ct[1])))
            if not all(times.values()):
                raise RuntimeError(f"no decode choice ran at {[b for b in rows if not times[b]]} rows")
            if not all(flat_times.values()):
                raise RuntimeError(f"no ragged choice ran over {[n for n in sizes if not flat_times[n]]} tokens")
            return {"decode": {str(b): dataclasses.asdict(c) for b, c in plan.items()},
                    "ragged": {str(n): dataclasses.asdict(c) for n, c in ragged.items()}}

        if tune:
            key = (shape, str(self.cache_shape.k.dtype), cfg.dtype, cfg.num_heads, tuple(rows), length, sizes,
                   beside)
            group = jax.process_count() > 1
            try:
                kept, was = (multihost.from_leader(make), False) if group else kept_result("attention-plan", key,
                                                                                           make)
            except Exception as e:  # noqa: BLE001  (no pool, or nothing ran: the defaults, nothing kept)
                log.warning("sparkler: attention not tuned (%s: %s); the kernels' defaults", type(e).__name__, e)
            else:
                plan = {int(b): pallas_gpu.DecodeChoice(**c) for b, c in kept["decode"].items()}
                ragged = {int(n): pallas_gpu.RaggedChoice(**c) for n, c in kept["ragged"].items()}
                how = "kept from before" if was else (
                    "timed on process 0" if jax.process_index() else "timed on this card")
                log.info("attention plan %s in %.1f s: %s%s", how, time.perf_counter() - t0,
                         "".join(f"{b} rows: {c}; " for b, c in plan.items()),
                         "; ".join(f"{n} tokens: {c}" for n, c in ragged.items()))
        pallas_gpu.use(jax.ShapeDtypeStruct(shape, self.cache_shape.k.dtype), plan, ragged)
        return plan, ragged

    @property
    def cache(self) -> KVCache:
        """The KV page pool (waits for it to be zeroed the first time)."""
        if self._zeroing is not None:
            self._cache, self._zeroing = self._zeroing.result(), None
        return self._cache

    @cache.setter
    def cache(self, value: KVCache) -> None:
        self._cache, self._zeroing = value, None

    def release_pool(self) -> int:
        """Delete the KV pool on the devices (sleep mode: `Engine.sleep`); the bytes given back."""
        return sleeping.offload(self.cache, keep=False).nbytes

    def restore_pool(self) -> None:
        """A zeroed KV pool again, after `release_pool`."""
        self.cache = self._zeros()

    def pool_error(self) -> BaseException | None:
        """Why zeroing the KV pool failed, if it has (without waiting for it)."""
        zeroing = self._zeroing
        return zeroing.exception() if zeroing is not None and zeroing.done() else None

    def warm_jobs(self, full: bool = False, constrained: bool = False, drafts: bool = False) -> list[Job]:
        """The shapes to compile before serving, those of `first_jobs` first: prefill of short prompts (several per
        call) and of a first chunk, fresh or after a cached prefix within the shortest attended length, the first
        draw, sampler-row and page copies, and decode at every batch bucket for the shortest attended length (on an
        accelerator, for every attended length, and of one step too: a decode compiled there mid-serve stalls every
        stream for seconds). `full`: every attended length for decode and prefill too (minutes the first time, seconds
        once the caches hold them). `constrained`: decode of one step too (decoding while long prompts are
        prefilled runs one step per dispatch), and the forward pass of one (`decode_logits`: structured output). Then
        prompt-logprob (echo) prefills (`_echo_jobs`), and with n-gram drafting or `drafts` (a draft model) verify at
        decode's widths."""
        jobs = self.first_jobs()
        for size in self.prefill_buckets if not self.flat else ():
            budget = max(self.rc.max_prefill_tokens, size)
            rows = [r for r in self.prefill_rows if size <= BATCHED_PREFILL or r * size <= budget]
            starts = (0, *(self.attend if full else self.attend[:1]))  # a fresh prompt, and a cached prefix's
            for nb in (self.dp * r for r in rows):
                jobs += [self._prefill_job(nb, size, self.covered(start, size)) for start in starts]
        jobs += [self._flat_job(size) for size in (self.flat_buckets if self.flat else ())]
        jobs += [self._first_job(self.dp * b, v) for b in self.batch_buckets for v in self.variants]
        jobs += [self._rows_job(k) for k in self.row_buckets]
        jobs += [self._copy_job(k) for k in self.copy_buckets]
        accelerator = self.model.mesh.devices.flat[0].platform != "cpu"
        one = constrained or accelerator or self.flat  # a prompt waiting for pages between flat steps: one step
        steps = sorted({self.rc.decode_steps, 1} if one else {self.rc.decode_steps})
        needs = self.warm_lengths(full)
        for b in self.batch_buckets:
            widths = sorted({self.attended(b, a) for a in needs})
            jobs += [self._decode_job(self.dp * b, attend, k, v) for attend in widths for k in steps
                     for v in self.variants]
            jobs += [self._logits_job(self.dp * b, attend) for attend in widths if constrained]
        jobs += self._echo_jobs()  # scoring prompts (lm-eval's loglikelihood requests), a compile each otherwise
        if self.rc.ngram or drafts:  # every request may draft, at decode's widths (a prediction's: on first use)
            w = self.rc.draft_tokens + 1
            jobs += [self._verify_job(self.dp * b, attend, v) for b in self.batch_buckets
                     for attend in sorted({self.attended(b, a, w) for a in needs}) for v in self.variants]
        jobs += self._lora_jobs(jobs, mixes=True)  # (a request may mix adapters: llama.cpp's `lora` lists)
        seen, unique = set(), []
        for job in jobs:  # the first jobs come again in the loops above
            key = (id(job[0]), shape_key(job[1], job[2]))
            if key not in seen:
                seen.add(key)
                unique.append(job)
        return unique

    def warm_lengths(self, full: bool) -> tuple[int, ...]:
        """The attended lengths the warm-up compiles decode and verify at: every one on an accelerator or when
        `full` (a program compiled mid-serve stalls every stream there), else the shortest."""
        accelerator = self.model.mesh.devices.flat[0].platform != "cpu"
        return self.attend if full or accelerator else self.attend[:1]

    def first_jobs(self) -> list[Job]:
        """The programs a first short request needs (one prompt of up to BATCHED_PREFILL tokens, its first draw,
        its sampler row, decode at the smallest batch size): the server answers once these are ready and compiles
        the rest behind."""
        nb = self.dp * self.batch_buckets[0]  # the rows a first request's draw and decode run at
        prefill = ([self._flat_job(size) for size in self.flat_buckets if size <= BATCHED_PREFILL] if self.flat else
                   [self._prefill_job(self.dp, size, self.covered(0, size)) for size in self.prefill_buckets
                    if size <= BATCHED_PREFILL])
        attend = self.attended(self.batch_buckets[0], 1)
        variants = [v for v in self.variants if v != "dry"]  # DRY's program compiles behind serving
        jobs = (prefill + [self._first_job(nb, v) for v in variants] + [self._rows_job(1), self._copy_job(1)] +
                [self._decode_job(nb, attend, self.rc.decode_steps, v) for v in variants])
        return jobs + self._lora_jobs(jobs)

    def _lora_jobs(self, jobs: list[Job], mixes: bool = False) -> list[Job]:
        """With LoRA slots, the LoRA variants of `jobs`' step programs (for steps with a row on an adapter: the
        adapters, their last argument, arrays instead of None; with `mixes`, for steps where a row mixes several
        too: `_adapters`)."""
        if self.lora_weights is None:
            return []
        steps = (self._prefill, self._flat, self._decode, self._logits, self._verify)
        widths = sorted({1, self.lora_weights.shape[1] if mixes else 1})
        forms = [(np.full((self.slots, m), -1, np.int32), np.ones((self.slots, m), np.float32)) for m in widths]
        return [(fn, (*args[:-1], form), kw) for form in forms for fn, args, kw in jobs
                if fn in steps and args[-1] is None]

    @property
    def variants(self) -> tuple[str, ...]:
        """The sampler's variants (`branches`) each decode and first-draw shape compiles for
        (`RunnerConfig.sampler_branches`)."""
        return {"cond": ("cond",), "plain": ("cond", "plain"),
                "select": ("select", "lean", "plain", "dry")}[self.branches]

    def _prefill_job(self, nb: int, size: int, attend: int, echo: bool = False) -> Job:
        table = _i32(nb, -(-attend // self.page_size))
        args = (self.model.params, self.cache_shape, self.last_logits, _i32(nb, size), _i32(nb), _i32(nb), table,
                np.int32(0), _i32(nb), None)
        return self._prefill, args, dict(echo=echo)

    def _echo_jobs(self) -> list[Job]:
        """Prompt-logprob (echo) prefills, one prompt a call (`prefill_chunk`): a first chunk of every size, and a
        long prompt's later chunks at each table width they reach (one size there: `echo_size`)."""
        firsts = [(size, self.covered(0, size)) for size in self.prefill_buckets]
        later = sorted({self.covered(start, self.chunk) for start in range(self.chunk, self.max_len, self.chunk)})
        return [self._prefill_job(self.dp, size, attend, echo=True)
                for size, attend in firsts + [(self.chunk, attend) for attend in later]]

    def _flat_job(self, size: int) -> Job:
        r = self.slots + 1
        return (self._flat, (self.model.params, self.cache_shape, self.last_logits, _i32(size), _i32(size),
                             _i32(size), _i32(r, self.max_pages), _i32(r), _i32(r), _i32(size), _i32(r), self.drawn,
                             _i32(size), None), {})

    def _rows_job(self, k: int) -> Job:
        rows = lambda tree: jax.tree.map(lambda x: np.zeros((k, *x.shape[1:]), x.dtype), tree)  # noqa: E731
        return self._set_rows, (self.state, self.params, _i32(k), rows(self.state), rows(self.params)), {}

    def _copy_job(self, k: int) -> Job:
        return self._copy, (self.cache_shape, _i32(self.dp * k), _i32(self.dp * k)), {}

    def _first_job(self, nb: int, branches: str = "cond") -> Job:
        return self._first, (self.state, self.params, self.last_logits, _i32(nb), _i32(nb), self.all_allowed[:nb],
                             self.drawn), dict(branches=branches)

    def _decode_job(self, nb: int, attend: int, steps: int, branches: str = "cond") -> Job:
        return (self._decode, (self.model.params, self.cache_shape, self.state, self.params, _i32(nb), _i32(nb),
                               np.zeros(nb, bool), _i32(nb, attend // self.page_size), self.drawn,
                               np.zeros(nb, bool), None), dict(steps=steps, branches=branches))

    def _logits_job(self, nb: int, attend: int) -> Job:
        return (self._logits, (self.model.params, self.cache_shape, self.last_logits, _i32(nb), _i32(nb),
                               np.zeros(nb, bool), _i32(nb, attend // self.page_size), self.drawn,
                               np.zeros(nb, bool), None), {})

    def _verify_job(self, nb: int, attend: int, branches: str = "cond") -> Job:
        w = self.rc.draft_tokens + 1
        return (self._verify, (self.model.params, self.cache_shape, self.state, self.params, _i32(nb, w), _i32(nb),
                               _i32(nb), np.zeros(nb, bool), _i32(nb, -(-(w + attend) // self.page_size)),
                               self.wide_allowed(np.arange(nb), w), None), dict(branches=branches))

    # ---- host-facing operations -------------------------------------------------------------------------------

    def idle(self) -> None:
        """Called between steps while there is no work (a multi-host `Leader` checks its group here)."""

    def shard_of(self, slot: int) -> int:
        """The data shard that owns `slot` (its sampler row and the pages its table names)."""
        return slot // self.per_shard

    def call_rows(self, nb: int) -> np.ndarray:
        """The global slots of a call's rows: the first `nb` slots of each shard, shard by shard."""
        return (np.arange(self.dp)[:, None] * self.per_shard + np.arange(nb)[None, :]).reshape(-1)

    def read_back(self, tree, rows: np.ndarray, axis: int = 0):
        """A call's outputs on the host as numpy, indexed by slot (`by_slot`); waits for the devices."""
        t = time.perf_counter()
        out = jax.tree.map(lambda x: self.by_slot(np.asarray(x), rows, axis), tree)
        self.read_seconds += time.perf_counter() - t
        return out

    def by_slot(self, x: np.ndarray, rows: np.ndarray, axis: int = 0) -> np.ndarray:
        """A call's outputs (along `axis`, the global slot of each in `rows`; past the slots: padding) indexed by
        global slot (a call over the first slots of one shard already is)."""
        if self.dp == 1 and rows[-1] == len(rows) - 1:  # rows ascend: they are the first slots
            return x
        cut = (slice(None),) * axis
        full = np.zeros(x.shape[:axis] + (self.slots + 1,) + x.shape[axis + 1:], x.dtype)
        full[cut + (np.minimum(rows, self.slots),)] = x
        return full[cut + (slice(0, self.slots),)]

    def attended(self, rows: int, need: int, queries: int = 1) -> int:
        """The attended length (table width, in positions) of a decode or verify call of `rows` rows per shard,
        `queries` per row, whose longest row needs `need` positions: the smallest bucket holding it. But the `cpu`
        kernel reads each row's keys up to its own length, whatever the table's width, so its calls (decode, verify
        chunks of up to `CPU_CHUNK` queries) take the whole context: one program per batch size and step count
        instead of one per attended length, and none to compile when a sequence outgrows a bucket
        (`backends.reads_by_length`; elsewhere the work grows with the width)."""
        if backends.reads_by_length(self.model.module.backend, rows, queries, self.model.cfg.matmul):
            return self.max_len
        return bucket(min(need, self.max_len), self.attend)

    def table(self, rows: np.ndarray, attend: int) -> np.ndarray:
        """Page-table rows cut (or padded with scratch) to the pages `attend` positions need."""
        n = -(-attend // self.page_size)
        out = np.zeros((rows.shape[0], n), np.int32)
        out[:, :min(n, rows.shape[1])] = rows[:, :n]
        return out

    def covered(self, start: int, size: int) -> int:
        """Positions a prefill's table covers for a chunk of `size` (a bucket) at `start`: the chunk after the
        earlier positions rounded up to an attended-length bucket (none at the start of a prompt), so attention
        reads the earlier keys from at most that bucket and the chunk's own from no page (`models.backends.paged.
        prefill`). The `cpu` kernel reads the earlier keys by length, so there it is the whole context: one program
        per chunk size and rows, whatever the start."""
        if self._reads_by_length(size):
            return self.max_len
        return size + (bucket(start, self.attend) if start else 0)

    def echo_size(self, start: int, n: int) -> int:
        """The bucket an echo chunk of `n` tokens at `start` runs at: its own, but a later chunk of a long prompt
        takes the whole chunk's where the table's width follows the start (not the `cpu` kernel's), so the warm-up
        names one program per width there rather than one per width and size (the padding: under a chunk, once
        per prompt)."""
        size = bucket(n, self.prefill_buckets)
        return self.chunk if start and not self._reads_by_length(size) else size

    def _reads_by_length(self, queries: int) -> bool:
        """Whether a one-row call of `queries` tokens a row reads the earlier keys by each row's length
        (`backends.reads_by_length`)."""
        return backends.reads_by_length(self.model.module.backend, 1, queries, self.model.cfg.matmul)

    def prefill_chunk(self, slot: int, table: np.ndarray, tokens: list[int], start: int, echo: bool = False):
        """Write one chunk of the sequence in `slot` (positions `start .. start + chunk`) into the pages of its
        `table` row; its last logits go to `last_logits[slot]`. Returns, for echo, the chunk's per-position `(logprob of
        the next prompt token, top ids, top logprobs, its rank)`. The other shards' rows are padding."""
        d = self.shard_of(slot)
        piece = tokens[start:start + self.chunk]
        size = self.echo_size(start, len(piece)) if echo else bucket(len(piece), self.prefill_buckets)
        toks = np.zeros((self.dp, size), np.int32)
        toks[d, :len(piece)] = piece
        starts, lengths = np.zeros(self.dp, np.int32), np.ones(self.dp, np.int32)
        starts[d], lengths[d] = start, len(piece)
        tables = np.zeros((self.dp, self.max_pages), np.int32)
        tables[d] = table
        nxt = tokens[start + len(piece)] if start + len(piece) < len(tokens) else 0
        attend = self.covered(start, size)
        dest = np.full(self.dp, self.per_shard, np.int32)  # the other shards' rows: dropped
        dest[d] = slot % self.per_shard
        self.drawable.add(slot)
        self.cache, self.last_logits, extra = self._prefill(
            self.model.params, self.cache, self.last_logits, toks, starts, lengths, self.table(tables, attend),
            np.int32(nxt), dest, self._adapters([slot]), echo=echo)
        return [np.asarray(x[d])[:len(piece)] for x in extra] if echo else None

    def prefill(self, slot: int, table: np.ndarray, tokens: list[int], start: int = 0, echo: bool = False):
        """Write the K/V of the sequence in `slot` from `start` on, chunk by chunk (its last logits go to
        `last_logits[slot]`); returns, for echo, the concatenated per-position logprobs (see `prefill_chunk`)."""
        pieces = [self.prefill_chunk(slot, table, tokens, s, echo) for s in range(start, len(tokens), self.chunk)]
        return join_pieces(pieces) if echo else None

    def prefill_many(self, items: list[tuple[int, np.ndarray, list[int], int]]) -> None:
        """Prefill `(slot, table row, tokens, start)` items; each one's last logits go to `last_logits[slot]`. Items
        with up to one chunk of tokens to compute share calls (grouped by length and attended-length bucket, up to
        `prefill_rows[-1]` rows per shard, padded to a power of two); longer ones go through the chunked `prefill`."""
        groups: dict[tuple[int, int], list[list[int]]] = {}
        for i, (slot, table, tokens, start) in enumerate(items):
            n = len(tokens) - start
            if n <= self.chunk:
                size = bucket(n, self.prefill_buckets)
                key = (size, self.covered(start, size))
                groups.setdefault(key, [[] for _ in range(self.dp)])[self.shard_of(slot)].append(i)
            else:
                self.prefill(slot, table, tokens, start)
        for (size, attend), per in groups.items():
            while any(per):
                most = self.prefill_rows[-1]
                parts, per = [idx[:most] for idx in per], [idx[most:] for idx in per]
                nb = bucket(max(map(len, parts)), self.prefill_rows)
                toks = np.zeros((self.dp * nb, size), np.int32)
                lengths, starts = np.ones(self.dp * nb, np.int32), np.zeros(self.dp * nb, np.int32)
                tables = np.zeros((self.dp * nb, self.max_pages), np.int32)  # padding rows: all scratch
                dest = np.full(self.dp * nb, self.per_shard, np.int32)  # padding rows' logits: dropped
                for d, part in enumerate(parts):
                    for r, i in enumerate(part, d * nb):
                        slot, table, tokens, start = items[i]
                        n = len(tokens) - start
                        toks[r, :n], lengths[r], starts[r], tables[r] = tokens[start:], n, start, table
                        dest[r] = slot % self.per_shard
                        self.drawable.add(slot)
                self.cache, self.last_logits, _ = self._prefill(
                    self.model.params, self.cache, self.last_logits, toks, starts, lengths,
                    self.table(tables, attend), np.int32(0), dest,
                    self._adapters([items[i][0] for part in parts for i in part]), echo=False)

    def prefill_flat(self, items: list[tuple[int, np.ndarray, list[int], int]],
                     riders: list[tuple[int, np.ndarray, int, int]] = ()) -> None:
        """One flat step (`RunnerConfig.flat_step`): compute `(slot, table row, tokens, start)` items
        (`tokens[start:]`: prompts and chunks within the step's budget) and, for `riders` (`(slot, table row, token,
        position)`: running choices, each a sequence of one token), the next logits, in one forward pass over their
        tokens one after another. Every sequence's last logits go to `last_logits[slot]`: `draw` draws the
        riders' next tokens with the prompts' first ones. A rider's token None: its last drawn token, still on the
        devices (`drawn`)."""
        seqs = [(slot, table, tokens[start:], start) for slot, table, tokens, start in items]
        seqs += [(slot, table, [token], pos) for slot, table, token, pos in riders]
        part, size = [], 0
        for seq in seqs:  # more than the largest bucket (short prompts beside a full budget of chunks): two calls
            if part and size + len(seq[2]) > self.flat_buckets[-1]:
                self._flat_call(part, size)
                part, size = [], 0
            part.append(seq)
            size += len(seq[2])
        self._flat_call(part, size)

    def _flat_call(self, seqs: list[tuple[int, np.ndarray, list[int], int]], n: int) -> None:
        size = bucket(n, self.flat_buckets)
        r = self.slots + 1
        tokens, positions, owner = np.zeros(size, np.int32), np.zeros(size, np.int32), np.full(size, r - 1, np.int32)
        tables, starts, lengths = np.zeros((r, self.max_pages), np.int32), np.zeros(r, np.int32), np.zeros(r, np.int32)
        dest = np.full(r, self.slots, np.int32)  # past the slots: dropped
        from_drawn = np.full(size, -1, np.int32)  # the slot whose `drawn` token a position takes (-1: `tokens`')
        at = 0
        for i, (slot, table, piece, start) in enumerate(seqs):
            n = len(piece)
            if piece == [None]:
                piece, from_drawn[at] = [0], slot
            tokens[at:at + n], positions[at:at + n], owner[at:at + n] = piece, np.arange(start, start + n), i
            tables[i], starts[i], lengths[i], dest[i] = table, start, n, slot
            self.drawable.add(slot)
            at += n
        pages = tables[owner, positions // self.page_size]  # each token's page (padding: the scratch page)
        self.cache, self.last_logits = self._flat(self.model.params, self.cache, self.last_logits, tokens, positions,
                                                  owner, tables, starts, lengths, pages, dest, self.drawn, from_drawn,
                                                  self._adapters([seq[0] for seq in seqs]))

    def embed_calls(self, lengths: list[int], budget: int = EMBED_TOKENS) -> list[tuple[int, int, list[int], bool]]:
        """The calls `embed` makes for inputs of `lengths` (each at most `embed_sizes[-1]`): `(rows, size, input
        indices, pieced)`, shortest inputs first, each call a rectangle of `rows` (a power of two, at most EMBED_ROWS)
        by `size` (its longest input's bucket in `embed_sizes`) of at most `budget` padded tokens; an input longer
        than the budget is `pieced`: alone, in pieces (`Pieces`). So the shapes are bounded by the budget, whatever
        the inputs."""
        calls: list[tuple[int, int, list[int], bool]] = []
        part: list[int] = []
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            rows, size = bucket(len(part) + 1, doubling(1, 1 << 30)), bucket(lengths[i], self.embed_sizes)
            if part and (rows > EMBED_ROWS or rows * size > budget):
                calls.append(self._embed_call(part, lengths, budget))
                part = []
            part.append(i)
        if part:
            calls.append(self._embed_call(part, lengths, budget))
        return calls

    def _embed_call(self, part: list[int], lengths: list[int], budget: int) -> tuple[int, int, list[int], bool]:
        """`embed_calls`' call of the inputs `part` (shortest first)."""
        rows, size = bucket(len(part), doubling(1, EMBED_ROWS)), bucket(lengths[part[-1]], self.embed_sizes)
        return rows, size, part, len(part) == 1 and lengths[part[0]] > budget

    def embed_compile(self, lengths: list[int], mode: str, adapters: int, budget: int = EMBED_TOKENS) -> None:
        """Compile (or load) the programs `embed` runs for inputs of `lengths` on a mix of `adapters` LoRA adapters
        (0: the base model), so a thread other than the engine's can pay for a new shape."""
        mix = ((0, 1.0),) * adapters
        for nb, size, part, pieced in self.embed_calls(lengths, budget):
            if pieced:  # its pieces' program
                size = self.piece_size(budget)
                pages = self._pool_pages(lengths[part[0]], size)
                pool = jax.eval_shape(lambda: KVCache.zeros(self.model.cfg, pages, self.page_size))
                pool = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pool,
                                    self._piece_pool)
                self._embed_piece.compile(self.model.params, pool, _i32(1, size), np.int32(0), _i32(1),
                                          _i32(1, pages), _lora(1, mix), mode=mode)
                continue
            self._embed.compile(self.model.params, _i32(nb, size), _i32(nb), _lora(nb, mix), mode=mode)

    def embed(self, inputs: list[list[int]], mode: str, mix: Mix = (), budget: int = EMBED_TOKENS) -> np.ndarray:
        """Each input's final hidden states pooled by `mode` (`models.pooling`), float32 `[len(inputs), hidden]`,
        on LoRA adapters `mix` (`Mix`; (): the base model), in the calls `embed_calls` plans; the KV pool is not
        touched."""
        out = np.zeros((len(inputs), self.model.cfg.hidden_size), np.float32)
        for nb, size, part, pieced in self.embed_calls([len(x) for x in inputs], budget):
            if pieced:
                pieces = Pieces(inputs[part[0]], mode, self.piece_size(budget))
                while not pieces.done:
                    self.embed_next(pieces, mix)
                out[part] = pieces.pooled
                continue
            toks, lengths = np.zeros((nb, size), np.int32), np.ones(nb, np.int32)
            for r, i in enumerate(part):
                toks[r, :len(inputs[i])], lengths[r] = inputs[i], len(inputs[i])
            out[part] = np.asarray(self._embed(self.model.params, toks, lengths, _lora(nb, mix), mode=mode))[:len(part)]
        return out

    def piece_size(self, budget: int) -> int:
        """Tokens a piece of a long input (`Pieces`) for a call budget of `budget` tokens: a chunk, or fewer pages."""
        ps = self.page_size  # (a page multiple: the pool's pages hold its pieces exactly)
        return max(ps, min(self.chunk // ps * ps, budget // ps * ps))

    def _pool_pages(self, length: int, size: int) -> int:
        """Pages of a long input's own pool (`embed_next`): its pieces' tokens, doubled up from a piece."""
        tokens = size
        while tokens < length:
            tokens *= 2
        return tokens // self.page_size

    def embed_next(self, pieces: Pieces, mix: Mix = ()) -> None:
        """Embed the next chunk of `pieces` (on LoRA adapters `mix`), attending to its earlier chunks'
        keys, and pool it: `last` keeps the last piece's, `cls` the first's, `mean` sums each piece's mean times its
        tokens and divides by all of them at the end."""
        if pieces.pool is None:
            pieces.pool = self._embed_pool(self._pool_pages(len(pieces.ids), pieces.size))
        part = pieces.ids[pieces.start:pieces.start + pieces.size]
        toks = np.zeros((1, pieces.size), np.int32)
        toks[0, :len(part)] = part
        table = np.arange(pieces.pool.k.shape[1] // self.model.cfg.num_layers, dtype=np.int32)[None]
        pooled, pieces.pool = self._embed_piece(self.model.params, pieces.pool, toks, np.int32(pieces.start),
                                                np.array([len(part)], np.int32), table, _lora(1, mix),
                                                mode=pieces.mode)
        vector = np.asarray(pooled)[0]
        if pieces.mode == "mean":
            pieces.pooled = vector * len(part) + (0 if pieces.pooled is None else pieces.pooled)
        elif pieces.mode == "last" or pieces.pooled is None:  # (`cls`: the first piece's)
            pieces.pooled = vector
        pieces.start += len(part)
        if pieces.done:
            pieces.pool = None  # its memory back at once
            if pieces.mode == "mean":
                pieces.pooled = pieces.pooled / len(pieces.ids)

    def copy_pages(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy pages `(shard, src, dst)` within their shard's pool (each choice of n > 1 gets its own copy of the
        prompt's partial last page; a prompt, the cached page it goes on from), the fewest a call (`copy_buckets`:
        every slot's, padded, took 4-18 ms on the 2-core CPU for one page)."""
        per = [[(a, b) for d, a, b in copies if d == shard] for shard in range(self.dp)]
        while any(per):
            k = bucket(min(max(map(len, per)), self.per_shard), self.copy_buckets)
            src = np.zeros((self.dp, k), np.int32)  # padding: scratch onto scratch
            dst = np.zeros((self.dp, k), np.int32)
            for d, pairs in enumerate(per):
                part = pairs[:k]
                if part:
                    src[d, :len(part)], dst[d, :len(part)] = zip(*part)
            per = [pairs[k:] for pairs in per]
            self.cache = self._copy(self.cache, src.reshape(-1), dst.reshape(-1))

    def seat_adapters(self, adapters: dict[int, Mix]) -> None:
        """`{slot: its LoRA adapters}` (`Mix`; (): the base model) for the sequences just seated in those slots."""
        for slot, mix in adapters.items():
            self.lora_weights[slot] = 0.0
            for adapter, scale in mix:
                self.lora_weights[slot, adapter] = scale

    def _adapters(self, slots) -> tuple[np.ndarray, np.ndarray] | None:
        """Each slot's LoRA slots and scales (`models.lora.delta`'s `[slots, M]`) as the argument of a step over
        `slots` (new arrays: the host's change while steps are queued), or None where none of them uses an adapter:
        that step's program leaves the LoRA terms out, so requests on the base model run as fast as without slots (a
        second program per shape). M is 1 where each of `slots` runs on one adapter at most, else every LoRA slot
        (a third program per shape, for llama.cpp's mixes)."""
        w = self.lora_weights
        if w is None:
            return None
        on = w != 0
        widest = on[np.asarray(slots, np.int64)].sum(1).max(initial=0)
        if widest == 0:
            return None
        if widest == 1:  # one adapter a row: its slot and scale
            ids = np.where(on.any(1), on.argmax(1), -1)
            return ids[:, None].astype(np.int32), w[np.arange(len(w)), np.maximum(ids, 0)][:, None]
        return np.where(on, np.arange(w.shape[1], dtype=np.int32), -1).astype(np.int32), w.copy()

    def fresh_row(self, settings: dict, prompt: list[int], seed_key: np.ndarray) -> smp.SamplerState:
        """A request's fresh sampler state (no tokens counted, its prompt's tokens marked, mirostat's mu at twice
        its target, its seed's key, its prompt's last tokens for DRY), on the host, for `install_rows`."""
        vocab = self.model.cfg.vocab_size
        prompt_row = np.zeros(vocab, bool)
        prompt_row[np.asarray(prompt, np.int64)] = True
        return smp.SamplerState(np.zeros(vocab, np.int32), prompt_row,
                                np.float32(2.0 * settings.get("mirostat_tau", 5.0)),
                                np.asarray(seed_key, np.uint32), np.int32(0), smp.history_row(prompt))

    def save_row(self, row: int) -> smp.SamplerState:
        """The sampler state of one row, on the host (a preempted sequence takes it along)."""
        return jax.tree.map(lambda x: np.asarray(x[row]), self.state)

    def install_rows(self, rows: dict[int, tuple[dict, smp.SamplerState]]) -> None:
        """Put sampler rows on the devices in one call: `{slot: (settings, state)}`, a request's settings
        (`SamplingParams.sampler_row` and its logit bias) and its state (fresh, or saved at preemption). Only those
        rows travel: a burst of new requests is one launch of a few rows, not every slot's settings."""
        slots = sorted(rows)
        k = bucket(len(slots), self.row_buckets)  # at most every slot
        idx = np.full(k, self.slots, np.int32)  # padding rows: past the slots, dropped
        idx[:len(slots)] = slots
        settings = smp.neutral_params(k, self.model.cfg.vocab_size)
        for j, slot in enumerate(slots):
            for name, value in rows[slot][0].items():
                settings[name][j] = value
            row = {name: x[j] for name, x in settings.items()}
            self.plain_rows[slot], self.lean_rows[slot] = smp.is_plain(row), smp.is_lean(row)
            self.dry_rows[slot] = row["dry_multiplier"] > 0
        states = [rows[slot][1] for slot in slots]
        states = jax.tree.map(lambda *xs: np.stack(xs + (np.zeros_like(xs[0]),) * (k - len(xs))), *states)
        self.state, self.params = self._set_rows(self.state, self.params, idx, states, smp.SamplerParams(**settings))

    def draw(self, sources: dict[int, int], allowed: np.ndarray | None = None) -> Dispatched:
        """Draw a token for slots, each from the logits a prefill or `decode_logits` left in the row of the slot
        `sources` names for it (the first tokens of one request's choices share its prompt's). The sampler runs on
        those rows alone, at the smallest batch bucket holding each shard's share. `allowed`: `[slots, W]` bitmasks
        (see `sampler.sample`). Returns at once; `.result()` waits for the outputs, indexed by slot. The tokens also
        go to `drawn`, for a next step dispatched before they are read back."""
        slots = sorted(sources)
        drawn = set(sources.values())
        if not drawn <= self.drawable or any(self.shard_of(sources[s]) != self.shard_of(s) for s in slots):
            raise ValueError(f"draw: no logits to draw from in this shard for {sources}")
        self.drawable -= drawn
        mine = [[s for s in slots if self.shard_of(s) == d] for d in range(self.dp)]
        k = bucket(max(map(len, mine)), self.batch_buckets)
        rows = np.full((self.dp, k), self.per_shard, np.int32)  # each call row's slot in its shard (padding: past)
        source = np.zeros((self.dp, k), np.int32)
        where = np.full((self.dp, k), self.slots)  # each call row's global slot (padding: past the slots)
        for d, these in enumerate(mine):
            where[d, :len(these)] = these
            rows[d, :len(these)] = [s % self.per_shard for s in these]
            source[d, :len(these)] = [sources[s] % self.per_shard for s in these]
        where = where.reshape(-1)
        branches = self.branches_for(slots, allowed)
        allowed = (self.all_allowed if allowed is None else allowed)[np.minimum(where, self.slots - 1)]
        self.state, out, self.drawn = self._first(self.state, self.params, self.last_logits, rows.reshape(-1),
                                                  source.reshape(-1), allowed, self.drawn, branches=branches)
        return Dispatched(out, where, self, axis=0)

    def branches_for(self, slots, allowed: np.ndarray | None) -> str:
        """The sampler variant of a call drawing for `slots` (`RunnerConfig.sampler_branches`): `plain` where that
        is compiled and none of them needs what it leaves out, nor does a grammar constrain the call; under `select`,
        `lean` where none needs what that leaves out, `dry` where one uses DRY."""
        if self.branches != "cond" and allowed is None and self.plain_rows[slots].all():
            return "plain"
        if self.branches == "select":
            return "lean" if self.lean_rows[slots].all() else "dry" if self.dry_rows[slots].any() else "select"
        return "cond"

    def wide_allowed(self, rows: np.ndarray, w: int) -> np.ndarray:
        """Every token allowed at each of a verify step's `w` positions, for `rows`: `[rows, w, vocab / 32]`."""
        return np.broadcast_to(self.all_allowed[rows][:, None], (len(rows), w, self.all_allowed.shape[1]))

    def device_seconds(self) -> float:
        """Seconds spent in calls to the devices: launching the step programs (not compiling them) and reading their
        outputs back. On a GPU both wait while the devices are busy, so, with work kept queued, their share of the
        wall time is about the devices' busy share."""
        return self.read_seconds + sum(f.seconds for f in self._step_programs)

    def prefill_calls(self) -> int:
        """Prefill programs launched so far (flat steps included)."""
        return self._prefill.calls + self._flat.calls

    def programs(self) -> int:
        """Executables loaded or compiled so far (a call that changes it compiled something)."""
        return sum(len(f.exes) for f in self._step_programs)

    def rows_for(self, slots: list[int]) -> int:
        """The batch bucket (rows per shard) a call over `slots` takes."""
        return bucket(max(s % self.per_shard for s in slots) + 1, self.batch_buckets)

    def _step_inputs(self, tokens, positions, active, tables, steps: int, fresh) -> tuple:
        """A decode call's rows (the smallest batch bucket holding every active slot of each shard), the active
        slots among them, and its inputs: tokens, positions, active rows, page tables at the attended width, and
        `fresh` rows."""
        nb = self.rows_for(np.flatnonzero(active).tolist())
        rows = self.call_rows(nb)
        positions, active = positions[rows], active[rows]
        fresh = np.zeros(len(rows), bool) if fresh is None else fresh[rows] & active
        live = positions[active]
        attend = self.attended(nb, int(live.max()) + steps if live.size else 1)
        return rows, rows[active], (tokens[rows].astype(np.int32), positions.astype(np.int32), active,
                                    self.table(tables[rows], attend), self.drawn, fresh,
                                    self._adapters(rows[active]))

    def decode(self, tokens: np.ndarray, positions: np.ndarray, active: np.ndarray, tables: np.ndarray,
               steps: int, fresh: np.ndarray | None = None) -> Dispatched:
        """Dispatch `steps` decode steps over the smallest batch bucket holding every active slot of each shard,
        each reading the pages of its `tables` row. Returns at once; `.result()` waits for the outputs, stacked
        `[steps, slots, ...]` as numpy, indexed by slot. `fresh` (`[slots]` bool): rows whose input is their last
        drawn token still on the devices (`drawn`, written by the call that drew it; `tokens` is ignored there): the
        engine dispatches a step before reading back the one before it."""
        rows, slots, inputs = self._step_inputs(tokens, positions, active, tables, steps, fresh)
        self.cache, self.state, outs, self.drawn = self._decode(self.model.params, self.cache, self.state, self.params,
                                                                *inputs, steps=steps,
                                                                branches=self.branches_for(slots, None))
        return Dispatched(outs, rows, self, axis=1)

    def decode_logits(self, tokens: np.ndarray, positions: np.ndarray, active: np.ndarray, tables: np.ndarray,
                      fresh: np.ndarray | None = None) -> None:
        """Dispatch one decode step's forward pass (arguments as `decode`'s): each active slot's logits go to its
        row of `last_logits`, for `draw` to draw from, so the host can fill grammar masks for the draw while
        the devices run the model (SGLang's overlap of grammar and forward)."""
        _, slots, inputs = self._step_inputs(tokens, positions, active, tables, 1, fresh)
        self.drawable |= set(slots.tolist())
        self.cache, self.last_logits = self._logits(self.model.params, self.cache, self.last_logits, *inputs)

    def verify(self, tokens: np.ndarray, positions: np.ndarray, ndraft: np.ndarray, active: np.ndarray,
               tables: np.ndarray, allowed: np.ndarray | None = None) -> tuple[smp.SampleOut, np.ndarray]:
        """Score each active slot's last token and its draft (`tokens [slots, draft_tokens + 1]`, the first at
        `positions`, `ndraft` drafted tokens after it) in one forward pass and sample every position in order
        (`allowed`: `[slots, draft_tokens + 1, W]` bitmasks, one per position). Returns the outputs
        `[draft_tokens + 1, slots, ...]` and which of them a slot keeps (`[draft_tokens + 1, slots]`: its accepted
        drafts and the token after them), as numpy indexed by slot."""
        nb = self.rows_for(np.flatnonzero(active).tolist())
        rows = self.call_rows(nb)
        w = tokens.shape[1]
        live = positions[rows][active[rows]]
        attend = self.attended(nb, int(live.max()) if live.size else 1, w)
        table = self.table(tables[rows], w + attend)
        positions = np.where(active[rows], positions[rows], table.shape[1] * self.page_size)  # padding: past it
        self.cache, self.state, outs, kept = self._verify(
            self.model.params, self.cache, self.state, self.params, tokens[rows].astype(np.int32),
            positions.astype(np.int32), ndraft[rows].astype(np.int32), active[rows], table,
            self.wide_allowed(rows, w) if allowed is None else allowed[rows], self._adapters(rows[active[rows]]),
            branches=self.branches_for(rows[active[rows]], allowed))
        return self.read_back((outs, kept), rows, axis=1)
