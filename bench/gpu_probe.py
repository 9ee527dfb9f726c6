"""Probe for the GPU decode step: the 8B layers' matrix-vector products alone, at batch 1 and 256, in bfloat16
(weights stored `[out, in]` as the model does, or `[in, out]`) and in int8 (`--int8`: the model's 32-input group
scales, `models.quant.dot`, beside one scale per output row applied after the product); run under different
`XLA_FLAGS` to compare compiler settings."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models import quant  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def product(form: str):
    """`(x, m) -> y` for one weight form."""
    if form == "out,in":
        return lambda x, m: jnp.dot(x, m.T)
    if form == "in,out":
        return lambda x, m: jnp.dot(x, m)
    if form == "int8 group":
        return lambda x, m: quant.dot(x, m[0], m[1])
    return lambda x, m: (jnp.dot(x, m[0].astype(x.dtype).T, preferred_element_type=jnp.float32)  # int8 row
                         * m[1][:, 0]).astype(x.dtype)


def weights(form: str, ws: list) -> list:
    """The bfloat16 weights `[out, in]` in `form`."""
    if form == "out,in":
        return ws
    if form == "in,out":
        return [w.T.copy() for w in ws]
    qs = [quant.quantize(jax.device_get(w)) for w in ws]
    if form == "int8 row":
        qs = [(q, s.max(axis=-1, keepdims=True)) for q, s in qs]
    return [(jnp.asarray(q), jnp.asarray(s)) for q, s in qs]


def main() -> None:
    """Time 32 layers of projections in each form."""
    layers = 2 if "--smoke" in sys.argv else 32
    forms = ("out,in", "int8 group", "int8 row") if "--int8" in sys.argv else ("out,in", "in,out")
    key = jax.random.key(0)
    ws = [jax.random.normal(key, s, jnp.bfloat16) * 0.02 for s in SHAPES]
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    for form in forms:
        mats, dot = weights(form, ws), product(form)
        stacked = [jax.tree.map(lambda a: jnp.stack([a] * layers), m) for m in mats]
        nbytes = sum(a.nbytes for a in jax.tree.leaves(stacked))

        def f(x, stacked):
            def body(x, ms):
                for m, (o, i) in zip(ms, SHAPES):
                    x = jnp.pad(dot(x[:, :i], m), ((0, 0), (0, 14336 - o)))
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
            print(f"  gemv {form} batch {b}: {dt * 1000:.2f} ms, {nbytes / 1e9:.2f} GB read at "
                  f"{nbytes / dt / 1e9:.0f} GB/s", flush=True)
        del stacked


if __name__ == "__main__":
    main()
