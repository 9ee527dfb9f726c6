"""The `cpu` matmul kernel as a decode step or a prefill meets it: every projection of SmolLM2-135M's 30 layers (q, k,
v, o, gate, up, down; each layer its own weights, so they stream from memory as in the model), int4 and int8, at a
call's rows. Prints a markdown table of the kernel beside XLA's product of the same weights widened to float32 (the
`xla` matmul backend), ms per pass over the 30 layers and the weight bytes read per second. Not a test: numbers are
noisy; compare builds by running this script from each checkout in turn, alternated.

    .venv/bin/python bench/cpu_matmul.py [--rows 1 2 4 8 32 128] [--reps 31]
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

from models import quant  # noqa: E402
from models.backends import cpu_matmul  # noqa: E402

LAYERS = 30
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)


def weights(kind: str, rng) -> list[tuple]:
    """Each projection's stack of LAYERS weights, quantized and packed for the kernel, and as the XLA product reads
    them (`quant.quantize` / `quantize4`)."""
    out = []
    for n, k in SHAPES:
        w = rng.normal(size=(LAYERS, n, k)).astype(np.float32) * 0.05
        if kind == "int4":
            parts = [np.stack(p) for p in zip(*[quant.quantize4(w[i]) for i in range(LAYERS)])]
            packed = quant.pack4(*parts)
        else:
            parts = [np.stack(p) for p in zip(*[quant.quantize(w[i]) for i in range(LAYERS)])]
            packed = quant.pack(*parts)
        out.append((tuple(map(jnp.asarray, packed)), tuple(map(jnp.asarray, parts))))
    return out


def one_pass(backend: str, kind: str):
    """A jitted pass over the layers: each projection of each layer applied to the rows (their sums carried, so
    nothing is left out)."""
    def product(x, w, layer):
        packed, parts = w
        if backend == "cpu":
            return cpu_matmul.matmul(x, packed[0], packed[1], layer, *packed[2:])
        mine = [p[layer] for p in parts]
        return quant.dot4(x, *mine) if kind == "int4" else quant.dot(x, *mine)

    @jax.jit
    def run(x, ws):
        def body(x, layer):
            total = x
            for w, (n, k) in zip(ws, SHAPES):
                y = product(jnp.tile(x, (1, k // x.shape[1])), w, layer)
                total = total + y.sum(1, keepdims=True) * 1e-6
            return total, None
        return jax.lax.scan(body, x, jnp.arange(LAYERS))[0]
    return run


def timed(run, x, ws, reps: int) -> float:
    """Median seconds of a pass over `reps` calls, after one that compiles it."""
    run(x, ws).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run(x, ws).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32, 128])
    ap.add_argument("--reps", type=int, default=31)
    args = ap.parse_args()
    if not cpu_matmul.available():
        sys.exit(f"the kernel needs {cpu_matmul.NEEDS}")
    rng = np.random.default_rng(0)
    print("| weights | rows | kernel (ms a pass) | XLA widened (ms) | XLA / kernel | kernel weight GB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in ("int4", "int8"):
        ws = weights(kind, rng)
        nbytes = sum(a.nbytes for packed, _ in ws for a in packed)
        kernel, xla = one_pass("cpu", kind), one_pass("xla", kind)
        for rows in args.rows:
            x = jnp.asarray(rng.normal(size=(rows, 192)).astype(np.float32))
            k, r = timed(kernel, x, ws, args.reps), timed(xla, x, ws, max(3, args.reps // 4))
            print(f"| {kind} | {rows} | {k * 1e3:.2f} | {r * 1e3:.2f} | {r / k:.2f}x | {nbytes / k / 1e9:.1f} |")


if __name__ == "__main__":
    main()
