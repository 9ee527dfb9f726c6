"""Decode attention on the CPU as a decode step meets it: 30 layers, each over its own pool pages, so nothing read by
one layer is in cache for the next (the weights stream through between them). Prints a markdown table of the `cpu`
kernel beside the XLA reference, time per layer and the K/V bytes read per second: decode (one query per row) and a
verify pass (17 queries per row, each over its own causal length). A second table times prefill chunks on the `cpu`
backend (the earlier positions through the kernel, by length) beside `paged.prefill` over their gathered pages (the
table cut to the attended-length bucket of the chunk's start, as the `xla` backend runs it). Not a test: numbers
are noisy.

    .venv/bin/python bench/cpu_attention.py [--heads 9 --kv-heads 3 --dim 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engine.runner import RunnerConfig, bucket, doubling  # noqa: E402
from models import backends  # noqa: E402
from models.backends import cpu_attention, paged  # noqa: E402

LAYERS, PAGE = 30, 16


def per_layer_of(step, args: tuple, reps: int) -> float:
    """Median seconds of one of `step`'s LAYERS layers over `reps` calls, after a first call that compiles it."""
    step(*args).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / LAYERS


def per_layer(fn, rows: int, context: int, queries: int, heads: int, kv_heads: int, dim: int, reps: int = 7) -> float:
    """Median seconds of one layer's attention for `rows` rows of `queries` queries, the last at `context` keys."""
    rng = np.random.default_rng(0)
    width = -(-context // PAGE)
    pages = LAYERS * rows * width + 1
    k, v = (jnp.asarray(rng.standard_normal((kv_heads, pages, PAGE, dim), dtype=np.float32)) for _ in range(2))
    tables = jnp.asarray(1 + rng.permutation(pages - 1)[:LAYERS * rows * width].reshape(LAYERS, rows, width),
                         jnp.int32)
    lengths = jnp.asarray(np.tile(np.arange(context - queries + 1, context + 1, dtype=np.int32), (rows, 1)))
    q = jnp.asarray(rng.standard_normal((rows, queries, heads, dim)), jnp.float32)

    @jax.jit
    def step(q, tables, k, v):
        return sum(fn(q, k, v, tables[i], lengths).sum() for i in range(LAYERS))

    return per_layer_of(step, (q, tables, k, v), reps)


def main() -> None:
    """Time each (rows, queries, context) cell with both backends and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    h, kvh, d = args.heads, args.kv_heads, args.dim
    kernel = cpu_attention.chunk
    reference = lambda q, k, v, table, lengths: paged.reference(q, k, v, table, lengths - 1, 1.0)  # noqa: E731
    print(f"Attention, {h} heads / {kvh} KV heads of {d}, float32 pool, pages of {PAGE}; "
          f"{LAYERS} layers on their own pages\n")
    print("| rows x queries x context | cpu kernel (us/layer) | K/V read (GB/s) | XLA reference (us/layer) | "
          "kernel speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for rows, queries, context in [(1, 1, 128), (1, 1, 512), (1, 1, 2048), (8, 1, 512), (32, 1, 512), (1, 17, 800),
                                   (8, 17, 800)]:
        t = per_layer(kernel, rows, context, queries, h, kvh, d)
        ref = per_layer(reference, rows, context, queries, h, kvh, d, reps=3)
        read = rows * context * kvh * d * 4 * 2
        print(f"| {rows} x {queries} x {context} | {t * 1e6:.1f} | {read / t / 1e9:.2f} | {ref * 1e6:.1f} | "
              f"{ref / t:.1f}x |", flush=True)
    print("\n| prefill chunk (one row) | cpu: earlier positions by the kernel (us/layer) | xla: pages gathered "
          "(us/layer) | cpu / xla |")
    print("| --- | ---: | ---: | ---: |")
    for start, size in [(0, 512), (512, 512), (1536, 512), (512, 128)]:
        t = prefill_layer("cpu", start, size, h, kvh, d)
        ref = prefill_layer("xla", start, size, h, kvh, d)
        print(f"| {size} tokens from {start} | {t * 1e6:.1f} | {ref * 1e6:.1f} | {t / ref:.2f} |", flush=True)


def prefill_layer(backend: str, start: int, size: int, heads: int, kv_heads: int, dim: int, reps: int = 5) -> float:
    """Median seconds of one layer's attention for a prefill chunk of `size` queries from position `start` (one row,
    every layer on its own pages, each layer's queries different so that XLA cannot share their work)."""
    rng = np.random.default_rng(0)
    width = -(-(start + size) // PAGE)
    if backend == "xla":  # the table the engine gives the `xla` backend (`Runner.covered`): the chunk after its
        attend = doubling(RunnerConfig().min_attend, 1 << 20)  # start's attended-length bucket
        width = -(-(size + (bucket(start, attend) if start else 0)) // PAGE)
    pages = LAYERS * width + 1
    k, v = (jnp.asarray(rng.standard_normal((kv_heads, pages, PAGE, dim), dtype=np.float32)) for _ in range(2))
    tables = jnp.asarray(1 + rng.permutation(pages - 1).reshape(LAYERS, 1, width), jnp.int32)
    q = jnp.asarray(rng.standard_normal((1, size, heads, dim)), jnp.float32)
    own = jnp.asarray(rng.standard_normal((1, size, kv_heads, dim)), jnp.float32)
    positions = jnp.arange(start, start + size, dtype=jnp.int32)[None]

    @jax.jit
    def step(q, own, tables, k, v):
        return sum(backends.paged_attention(backend, q + i, own + i, own, k, v, tables[i], positions, 0.125).sum()
                   for i in range(LAYERS))

    return per_layer_of(step, (q, own, tables, k, v), reps)


if __name__ == "__main__":
    main()
