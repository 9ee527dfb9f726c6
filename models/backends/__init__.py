"""Attention and matmul backends, each kernel beside the reference it is tested against.

- `paged`: the paged KV cache and the plain-XLA attention over it (the reference, and prefill's causal blocks);
- `cpu_attention` (C++), `pallas_gpu` and `pallas_tpu`: attention kernels over the same pool (decode; `pallas_gpu`
  also chunks of queries, `ragged`; `cpu_attention` verify chunks and a prefill chunk's earlier positions);
- `cpu_matmul`: the int8 and int4 C++ matmul kernel (its references are `models.quant.dot` and `dot4`); `native`
  builds the C++ in `csrc/`.

This module chooses the attention backend (`resolve_backend`) and dispatches to it (`paged_attention`). The kernels
import `paged`, never this module, so nothing imports in a circle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.backends import paged
from models.config import ModelConfig

BACKENDS = ("xla", "cpu", "pallas-gpu", "pallas-tpu")
# Chunks of at most this many queries per row go through the `cpu` kernel whole (it reads each key once for all of a
# row's queries and scores only up to each query's length) rather than `paged.prefill`: verify passes (K + 1 = 17
# positions by default: a SmolLM2 forward over 17 positions at an ~800-token context, 42 -> 33 ms on an AVX-512 host;
# on an AVX2 one the attention of such a pass takes 0.36x the reference's time, docs/PERFORMANCE.md). A prefill chunk
# (32 tokens and up) attends over its own keys in XLA (`paged.prefill`'s causal blocks: several times faster than the
# kernel there) and over its earlier positions through the kernel, by length (0.4-0.6x the time of gathering their
# pages for XLA), so that one program serves a chunk at any start.
CPU_CHUNK = 24


def call_backend(backend: str, rows: int, matmul: str, queries: int = 1) -> str:
    """The backend a call of `rows` rows (per shard) of `queries` queries runs: one row of a few queries over XLA's
    float products takes the reference instead of the `cpu` kernel (XLA fuses it with them; around the kernel the
    next projection ran ~5x slower, 99 -> 78 tok/s)."""
    few = rows == 1 and queries <= CPU_CHUNK
    return "xla" if backend == "cpu" and few and matmul != "cpu" else backend


def reads_by_length(backend: str, rows: int, queries: int, matmul: str) -> bool:
    """Whether a call's attention reads each row's keys (a prefill chunk: its earlier positions) up to its length
    alone, whatever its table's width: the `cpu` kernel (the reference and the other kernels' chunks work over the
    whole table)."""
    return call_backend(backend, rows, matmul, queries) == "cpu"


def default_backend(platform: str | None = None) -> str:
    """The backend a platform runs best: the Pallas kernels on GPU and TPU, the C++ kernel on a CPU."""
    platform = platform or jax.default_backend()
    return {"gpu": "pallas-gpu", "cuda": "pallas-gpu", "tpu": "pallas-tpu", "cpu": "cpu"}.get(platform, "xla")


def resolve_backend(name: str, cfg: ModelConfig | None = None, platform: str | None = None, tp: int = 1) -> str:
    """Check a `--attention-backend` value (`auto` picks by platform). A kernel that cannot serve the model's
    attention (a sliding window, logit soft-capping, latent attention, sinks; for `pallas-gpu`, a head dimension
    that is not a power of two; for `pallas-tpu`, a pool in another dtype than the model's, as float8) falls back
    to `xla` for that model. Under `auto` so do the Pallas kernels on a mesh with `tp` > 1, and the `cpu` kernel for
    a model or pool that is not float32, a mesh with `tp` > 1, or a machine without a C++ compiler; an explicit ask
    for a kernel there fails."""
    auto = name == "auto"
    name = default_backend(platform) if auto else name
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    unserved = cfg is not None and (not cfg.plain_attention or cfg.kv_lora_rank
                                    or (name == "pallas-gpu" and cfg.head_dim & (cfg.head_dim - 1))  # Triton: 2^k
                                    or (name == "pallas-tpu" and cfg.cache_dtype != cfg.dtype))  # a float8 pool
    if name != "xla" and unserved:
        return "xla"
    if name in ("pallas-gpu", "pallas-tpu") and tp > 1:  # XLA cannot split a kernel's call over devices: it
        if not auto:  # would gather every head's pages to each device for it (jax-ml/jax#19748)
            raise ValueError(f"the {name} kernels do not split over tp: use -tp 1, or --attention-backend xla")
        return "xla"
    if name == "cpu":
        from models.backends import cpu_attention

        floats = {cfg.dtype, cfg.cache_dtype} if cfg is not None else {"float32"}
        why = ("it runs float32 models and pools only" if floats != {"float32"} else
               "it does not split over tp" if tp > 1 else
               "it needs a C++ compiler (g++)" if not cpu_attention.available() else "")
        if why and not auto:
            raise ValueError(f"the cpu attention backend cannot serve here: {why}")
        return "xla" if why else name
    return name


def paged_attention(backend: str, q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    table: jax.Array, positions: jax.Array, scale: float, softcap: float = 0.0, window=0,
                    sinks: jax.Array | None = None, horizons: jax.Array | None = None) -> jax.Array:
    """Attention through `backend`, after this call's keys and values `k`/`v [B, S, kvh, d]` were written: a chunk
    (S > 1) runs `pallas_gpu.ragged` on `pallas-gpu`, the `cpu` kernel for its short chunks (a verify pass) and the
    earlier positions of its long ones (`paged.prefill` for the rest), else `paged.prefill`; decode (one query per
    row) runs the kernels, or `paged.reference` for the `xla` backend, a window, soft-capping, sinks or `horizons`
    (a picture's tokens seeing each other both ways). Other arguments as `paged.reference`."""
    b, s, h, d = q.shape
    plain = not softcap and sinks is None and isinstance(window, int) and window == 0 and horizons is None
    if s > CPU_CHUNK and backend == "cpu" and plain:
        return _cpu_prefill(q, k, v, k_cache, v_cache, table, positions, scale)
    if s > 1 and backend == "pallas-gpu" and plain:  # each row a sequence of `s` queries in one flat batch
        out = _ragged(q.reshape(b * s, h, d), k_cache, v_cache, table, positions[:, 0].astype(jnp.int32),
                      jnp.full((b,), s, jnp.int32), scale)
        return out.reshape(b, s, h * d)
    if s > 1 and not (backend == "cpu" and plain and s <= CPU_CHUNK):
        return paged.prefill(q, k, v, k_cache, v_cache, table, positions, scale, softcap, window, sinks,
                             horizons=horizons)
    if backend == "xla" or not plain:
        return paged.reference(q, k_cache, v_cache, table, positions, scale, softcap, window, sinks, horizons)
    lengths = positions.astype(jnp.int32) + 1
    qs = q * jnp.asarray(scale, q.dtype)
    if backend == "cpu":  # a row past its table (padding: its keys went to the scratch page) reads one key, not all
        lengths = jnp.where(positions < table.shape[1] * k_cache.shape[2], lengths, 1)
        from models.backends import cpu_attention

        return cpu_attention.chunk(qs, k_cache, v_cache, table, lengths).reshape(b, s, h * d)
    if backend == "pallas-gpu":
        from models.backends import pallas_gpu as kernel
        native = "gpu"
    else:
        from models.backends import pallas_tpu as kernel
        native = "tpu"
    interpret = jax.default_backend() != native  # elsewhere (a CPU, say) the kernel runs in Pallas' interpreter
    return kernel.decode(qs[:, 0], k_cache, v_cache, table, lengths[:, 0], interpret).reshape(b, 1, h * d)


def _cpu_prefill(q, k, v, k_cache, v_cache, table, positions, scale: float) -> jax.Array:
    """A prefill chunk on the `cpu` backend: `paged.prefill` over its own keys, merged with its earlier positions,
    which the kernel reads up to each row's start (none at the start of a prompt), whatever the table's width."""
    from models.backends import cpu_attention

    b, s = positions.shape
    start = jnp.broadcast_to(positions[:, :1].astype(jnp.int32), (b, s))
    prior = lambda: cpu_attention.chunk(q * jnp.asarray(scale, q.dtype), k_cache, v_cache, table, start,  # noqa: E731
                                        lse=True)
    return paged.prefill(q, k, v, k_cache, v_cache, table, positions, scale, prior=prior)


def flat_attention(backend: str, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, flat: paged.Flat,
                   positions: jax.Array, scale: float, softcap: float = 0.0, window=0,
                   sinks: jax.Array | None = None, horizons: jax.Array | None = None) -> jax.Array:
    """Attention of a flat batch (`paged.Flat`, its tables with the layer offset applied; queries `q [T, h, d]` at
    `positions [T]`, after their keys and values were written): `pallas_gpu.ragged` on `pallas-gpu`, else
    `paged.flat_reference`. Returns `[T, h * d]`."""
    t, h, d = q.shape
    plain = not softcap and sinks is None and isinstance(window, int) and window == 0 and horizons is None
    if backend == "pallas-gpu" and plain:
        return _ragged(q, k_cache, v_cache, flat.tables, flat.starts, flat.lengths, scale).reshape(t, h * d)
    return paged.flat_reference(q, k_cache, v_cache, flat, positions, scale, softcap, window, sinks, horizons)


def _ragged(q, k_cache, v_cache, tables, starts, lengths, scale: float) -> jax.Array:
    """`pallas_gpu.ragged` over queries `q [T, h, d]` scaled here (interpreted off a GPU)."""
    from models.backends import pallas_gpu

    return pallas_gpu.ragged(q * jnp.asarray(scale, q.dtype), k_cache, v_cache, tables, starts, lengths,
                             interpret=jax.default_backend() != "gpu")
