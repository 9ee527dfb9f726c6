"""The KV pool's default size (`RunnerConfig.kv_cache_gb` 0), as vLLM's `--gpu-memory-utilization` and SGLang's
`--mem-fraction-static` size theirs: on a CPU a fixed 4 GiB (host memory is shared with everything else); on a GPU or
TPU, what each device's memory holds after the weights, within the utilization's share of the device, less a reserve
for the programs' working memory (`working_bytes`, an upper bound from the model's shape and the attention's path;
the server warns if a compiled program's own figure, `compile.PROGRAMS["working"]`, passes it).

vLLM measures the working memory by running a forward pass before sizing its pool; here every program's shapes
include the pool's, so the bound is computed instead, and checked against the programs once they are compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

log = logging.getLogger("sparkler.engine")
CPU_GB = 4.0  # the pool on a CPU
JAX_GPU_SHARE = 0.75  # JAX's GPU allocator takes this share of the card unless XLA_PYTHON_CLIENT_MEM_FRACTION says
SAMPLER_TEMPS = 16  # float32 arrays of a row's vocabulary the sampler may hold at once (`working_bytes`; DRY's
#                    block of comparisons, 2 x 1024 x 32 words a row, fits in them for a vocabulary past 4,096)
GRAIN = 1 << 28  # the pool is a whole number of these, so a warm start finds the same shapes (`compile`'s store)


@dataclasses.dataclass(frozen=True)
class Fit:
    """How the pool was sized on one device: the device's usable bytes (its share under the utilization), those in
    use after loading (the weights), the reserve for working memory, and the pool's bytes per data shard."""

    usable: int
    in_use: int
    reserve: int
    pool: int

    def __str__(self) -> str:
        gib = lambda n: f"{n / (1 << 30):.1f} GiB"  # noqa: E731
        return (f"{gib(self.pool)} a data shard: {gib(self.usable)} usable a device, {gib(self.in_use)} in use after "
                f"loading, {gib(self.reserve)} kept for the programs' working memory")


def working_bytes(cfg, tokens: int, rows: int, layer_bytes: int, reference: tuple[int, int, int] | None) -> int:
    """An upper bound of a step's working memory on one device, in float32 throughout: `tokens` tokens through one
    layer (the residual, its norm, the attention's queries, keys, values and output: 4 x hidden; the MLP's gate, up
    and their product: 3 x its width, an MoE's chosen experts' and shared expert's together); `rows` rows over the
    vocabulary (logits, and what the sampler keeps) and `SAMPLER_TEMPS` of its temporaries (a batch's temporaries,
    a row each, fit in `rows` where it counts a verify pass's rows for every slot); two layers' weights (a
    scanned layer's slice, and the next one's). Where attention goes through `paged.reference` (`reference`: at
    most that many queries, sequences and keys a call), also three arrays of its scores (the scores, their
    exponentials, the probabilities) and the sequences' keys and values gathered from the pool."""
    width = max(cfg.intermediate_size, cfg.experts_per_token * cfg.moe_intermediate_size + cfg.shared_expert_size)
    words = tokens * (4 * cfg.hidden_size + 3 * width) + (rows + SAMPLER_TEMPS) * cfg.vocab_size
    if reference:
        queries, seqs, context = reference
        words += context * (3 * queries * cfg.num_heads + seqs * cfg.cache_heads * sum(cfg.cache_widths))
    return 4 * words + 2 * layer_bytes


def usable_bytes(limit: int, platform: str, utilization: float) -> int:
    """A device's bytes under `utilization` of it: its allocator's `limit` is the whole of a TPU's memory and, on
    a GPU, XLA_PYTHON_CLIENT_MEM_FRACTION's share of the card (the server sets it to the utilization)."""
    if platform in ("gpu", "cuda", "rocm"):
        share = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_GPU_SHARE))
        return int(min(limit, utilization * limit / share))
    return int(utilization * limit)


def fit(usable: int, in_use: int, reserve: int, split: int) -> Fit:
    """The pool of a data shard whose `split` devices each hold a part of it, from one device's figures: a whole
    number of `GRAIN`s, so that loading's few bytes more or less do not change the programs' shapes."""
    pool = (usable - in_use - reserve) * split // GRAIN * GRAIN
    if pool <= 0:
        raise ValueError(f"no memory left for the KV pool: {usable / (1 << 30):.1f} GiB usable a device, "
                         f"{in_use / (1 << 30):.1f} GiB in use after loading and {reserve / (1 << 30):.1f} GiB kept "
                         "for working memory; raise --gpu-memory-utilization or pass --kv-cache-gb")
    return Fit(usable, in_use, reserve, pool)


def default_pool(model, tokens: int, rows: int, reference: tuple[int, int, int] | None, utilization: float,
                 stats: list[dict] | None = None) -> Fit | None:
    """The pool `kv_cache_gb` 0 means for `model` (loaded: its weights on the devices) with steps as
    `working_bytes`' arguments say, from `stats` (this process's devices' `memory_stats()`, asked of them by
    default): None (`CPU_GB`) on a CPU, where a device does not report its memory, or where attention through the
    reference over the whole context would leave no room (a warning says so). The device with the least left sets
    it, across processes too (every process builds the same pool)."""
    devices = [d for d in model.mesh.devices.flat if d.process_index == jax.process_index()]
    platform = devices[0].platform
    if stats is None:
        stats = [] if platform == "cpu" else [d.memory_stats() for d in devices]
    if not stats or not all(s and "bytes_limit" in s for s in stats):
        return None
    cfg = model.cfg
    tp = model.mesh.shape["tp"]
    split = tp if cfg.cache_heads % tp == 0 else 1  # the devices a data shard's pool is spread over
    layer = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(model.params)) // max(1, cfg.num_layers * tp)
    usable, in_use = min(((usable_bytes(s["bytes_limit"], platform, utilization), s["bytes_in_use"]) for s in stats),
                         key=lambda u: u[0] - u[1])  # the device with the least left
    if jax.process_count() > 1:  # the same pool on every process: the least left anywhere
        from jax.experimental import multihost_utils

        mib = np.int32((usable - in_use) >> 20)  # int32: without x64 the gather would cut an int64's bytes
        in_use = usable - (int(np.min(multihost_utils.process_allgather(mib))) << 20)
    try:
        return fit(usable, in_use, working_bytes(cfg, tokens, rows, layer, reference), split)
    except ValueError as e:
        if reference is None:
            raise
        # `paged.reference`'s scores over the model's whole context: a bound that would leave no pool
        log.warning("sparkler: %s; the KV pool takes %.0f GiB instead (attention through the reference at the full "
                    "context of %d tokens: --max-model-len lowers it)", e, CPU_GB, reference[2])
        return None
