"""The `cpu` int8 product (`--matmul-backend`): int8 weights times int8 activations with a small C++ kernel
(`models/csrc/int8_matmul.cc`, AVX-512 VNNI) that XLA calls through its FFI.

XLA's CPU backend multiplies int8 weights by widening them to float32 first, then runs a float32 product at
~100-200 GFLOP/s on this machine's two cores; the batched decode step and prefill are mostly those products. The
kernel rounds each row of activations per group of 32 to int8 in two levels (llama.cpp's Q8_0, then the remainder
256 times finer: one level alone tripled the divergence from float32 and failed the quality guard), multiplies in
int32 and scales each group's sum in float32 (docs/PERFORMANCE.md). The weights stay in the layout the kernel
reads (`quant.pack`). Its XLA reference is `quant.dot(quant.activations(x), ...)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models import native

TARGET = "sparkler_int8_matmul"


def available() -> bool:
    """Whether the kernel compiles on this machine (it needs AVX-512 VNNI) and is registered with XLA."""
    return native.available("int8_matmul", "SparklerInt8Matmul", TARGET)


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """`x [..., K] @ W.T` as float32 `[..., N]`, for W packed by `quant.pack` (`w [N/16, K/4, 64]` uint8,
    `scale [N/16, K/32, 16]`), with x's rows quantized per group of 32 in two int8 levels on the way in
    (`quant.activations`). With `layer`, `w` and `scale` are a stack `[L, ...]` and the kernel reads that layer
    in place (scanned layers: XLA would copy a slice of the stack for every call)."""
    if not available():
        raise RuntimeError("the cpu matmul backend needs a C++ compiler and a CPU with AVX-512 VNNI")
    if layer is None:
        w, scale, layer = w[None], scale[None], 0
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[1] * 16
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((math.prod(lead), n), jnp.float32),
                            vmap_method="sequential")
    out = call(x.reshape(-1, k).astype(jnp.float32), w, scale, jnp.asarray(layer, jnp.int32))
    return out.reshape(*lead, n)
