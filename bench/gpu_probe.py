"""Probe for the GPU decode step: the 8B layers' matrix-vector products alone, weights stored `[out, in]` (as the
model does) or `[in, out]`, at batch 1 and 256; run under different `XLA_FLAGS` to compare compiler settings."""

import sys
import time

import jax
import jax.numpy as jnp

SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def main() -> None:
    """Time 32 layers of projections in both layouts."""
    layers = 2 if "--smoke" in sys.argv else 32
    key = jax.random.key(0)
    ws = [jax.random.normal(key, s, jnp.bfloat16) * 0.02 for s in SHAPES for _ in range(1)]
    nbytes = sum(w.nbytes for w in ws) * layers
    for layout in ("out,in", "in,out"):
        mats = ws if layout == "out,in" else [w.T.copy() for w in ws]
        stacked = [jnp.stack([m] * layers) for m in mats]

        def f(x, stacked):
            def body(x, ms):
                for m, (o, i) in zip(ms, SHAPES):
                    xi = x[:, :i]
                    y = jnp.dot(xi, m.T) if layout == "out,in" else jnp.dot(xi, m)
                    x = jnp.pad(y, ((0, 0), (0, 14336 - o)))
                return x, None
            return jax.lax.scan(body, x, stacked)[0]

        g = jax.jit(f)
        for b in (1, 256):
            x = jnp.ones((b, 14336), jnp.bfloat16)
            jax.block_until_ready(g(x, stacked))
            t = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(g(x, stacked))
            dt = (time.perf_counter() - t) / 5
            print(f"  gemv {layout} batch {b}: {dt * 1000:.2f} ms, {nbytes / dt / 1e9:.0f} GB/s", flush=True)
        del stacked


if __name__ == "__main__":
    main()
