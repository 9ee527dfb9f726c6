"""The `cpu` int8 product (`--matmul-backend`): int8 (or 4-bit) weights times int8 activations with a small C++ kernel
(`models/backends/csrc/int8_matmul.cc`, for AVX2 or AVX-512 VNNI) that XLA calls through its FFI.

XLA's CPU backend multiplies int8 weights by widening them to float32 first, then runs a float32 product at
~100-200 GFLOP/s on this machine's two cores; the batched decode step and prefill are mostly those products. The
kernel rounds each row of activations per group of 32 to int8 in two levels (llama.cpp's Q8_0, then the remainder
256 times finer: one level alone tripled the divergence from float32 and failed the quality guard), multiplies in
int32 and scales each group's sum in float32 (docs/PERFORMANCE.md). The weights stay in the layout the kernel
reads (`quant.pack`). Its XLA reference is `quant.dot(quant.activations(x), ...)`; for 4-bit weights (`quant.pack4`)
`quant.dot4(quant.activations(x), ...)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.backends import native

TARGET = "sparkler_int8_matmul"
TARGET4 = "sparkler_int4_matmul"
MATMULS = ("xla", "cpu")  # how quantized products run: widened to float in XLA (`quant.dot`, `dot4`), or this kernel
NEEDS = "a C++ compiler and a CPU with AVX2, FMA and F16C (AVX-512 VNNI: faster)"  # what `available` checks


def available() -> bool:
    """Whether the kernel compiles on this machine (it needs `NEEDS`) and both of its products are registered with
    XLA."""
    if not {"avx2", "fma", "f16c"} <= set(native.cpu_flags().split()):
        return False
    return (native.available("int8_matmul", "SparklerInt8Matmul", TARGET)
            and native.available("int8_matmul", "SparklerInt4Matmul", TARGET4))


def resolve_matmul(name: str, cfg, platform: str | None = None, tp: int = 1) -> str:
    """Check a `--matmul-backend` value: `auto` is `cpu` for int8 or int4 float32 models on a CPU with tp = 1 where
    the kernel compiles, else `xla`; an explicit `cpu` that cannot serve raises ValueError."""
    auto = name == "auto"
    if not auto and name not in MATMULS:
        raise ValueError(f"unknown matmul backend {name!r}; choose from auto, {', '.join(MATMULS)}")
    if name == "xla":
        return name
    why = ("it multiplies int8 and int4 weights only (--quantization)" if cfg.quantization in ("none", "fp8") else
           "it runs float32 models only" if cfg.dtype != "float32" else
           "it does not split over tp" if tp > 1 else
           "it runs on a CPU only" if (platform or jax.default_backend()) != "cpu" else
           f"it needs {NEEDS}" if not available() else "")
    if why and not auto:
        raise ValueError(f"the cpu matmul backend cannot serve here: {why}")
    return "xla" if why else "cpu"


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array, layer: jax.Array | None = None,
           minimum: jax.Array | None = None) -> jax.Array:
    """`x [..., K] @ W.T` as float32 `[..., N]`, for W packed by `quant.pack` (`w [N/16, K/4, 64]` uint8,
    `scale [N/16, K/32, 16]`), or with `minimum` by `quant.pack4` (4-bit), with x's rows quantized per group of 32
    in two int8 levels on the way in (`quant.activations`). With `layer`, the weights are a stack `[L, ...]` and the
    kernel reads that layer in place (scanned layers: XLA would copy a slice of the stack for every call)."""
    if not available():
        raise RuntimeError(f"the cpu matmul backend needs {NEEDS}")
    extra = () if minimum is None else (minimum,)
    if layer is None:
        w, scale, extra, layer = w[None], scale[None], tuple(e[None] for e in extra), 0
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[1] * 16
    call = jax.ffi.ffi_call(TARGET4 if extra else TARGET, jax.ShapeDtypeStruct((math.prod(lead), n), jnp.float32),
                            vmap_method="sequential")
    out = call(x.reshape(-1, k).astype(jnp.float32), w, scale, *extra, jnp.asarray(layer, jnp.int32))
    return out.reshape(*lead, n)
