"""Linear layers in the `[out, in]` layout (float, int8, int4 or float8, or packed for the `cpu` kernel) and RMSNorm.

Parameters carry logical axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `expert`) that `models.sharding`
maps onto a device mesh.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import lora, quant
from models.backends import cpu_matmul
from models.config import ModelConfig


def dtype_of(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def int8_init(key, shape, dtype=jnp.int8):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)


def scale_init(key, shape, dtype=jnp.float32):
    return jnp.full(shape, 0.02 / 73, dtype)  # random int8 weights then have a std of ~0.02


def fp8_init(key, shape, dtype=quant.FP8):
    return (jax.random.normal(key, shape) * 73).astype(dtype)  # with `scale_init`: a std of ~0.02


def uint8_init(key, shape, dtype=jnp.uint8):
    return jax.random.randint(key, shape, 1, 256, jnp.int32).astype(dtype)  # int8 + 128 packed, or two 4-bit values


def scale4_init(key, shape, dtype=jnp.float16):
    return jnp.full(shape, 0.02 / 4.6, dtype)  # random 4-bit weights (std 4.6 steps) then have a std of ~0.02


def minimum4_init(key, shape, dtype=jnp.float16):
    return jnp.full(shape, -7.5 * 0.02 / 4.6, dtype)  # centred on zero


def packed_params(module: nn.Module, names: tuple[str, ...], shape: tuple[int, int], axes: tuple[str, str]):
    """A `[out, in]` weight declared in the `cpu` kernel's packed layout: with `names` for a weight and its scales,
    int8 (`quant.pack`); with a third for minima, 4-bit with float16 scales and minima (`quant.pack4`)."""
    (out, inputs), lanes, four = shape, quant.LANES, len(names) == 3
    w = module.param(names[0], nn.with_logical_partitioning(uint8_init, (*axes, None)),
                     (out // lanes, inputs // 4, (2 if four else 4) * lanes), jnp.uint8)
    groups = (out // lanes, inputs // quant.GROUP, lanes)
    if not four:
        return w, module.param(names[1], nn.with_logical_partitioning(scale_init, (axes[0], None, None)), groups,
                               jnp.float32)
    return (w, module.param(names[1], nn.with_logical_partitioning(scale4_init, (axes[0], None, None)), groups,
                            jnp.float16),
            module.param(names[2], nn.with_logical_partitioning(minimum4_init, (axes[0], None, None)), groups,
                         jnp.float16))


class Linear(nn.Module):
    """`y = x @ w.T (+ b)` with `w` stored `[out, in]`: the layout XLA's CPU matvec reads fastest. `quantization`
    int8: `w` is int8 with a float32 `scale` per output row and group of 32 inputs; int4: `w` is 4-bit with a float16
    `scale` and `minimum` per group (`models.quant`; int8 where the inputs do not divide into groups); fp8: `w` is
    float8 e4m3 with a float32 `scale` per output row, multiplied in float8 (`quant.dot_fp8`); `packed` (the
    `cpu` matmul backend) keeps them in the kernel's layout and multiplies with it (`models.backends.cpu_matmul`)."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: str = "float32"
    float32_out: bool = False  # accumulate and return float32 (the LM head: logits stay float32)
    quantization: str = "none"
    packed: bool = False
    lora_slots: int = 0  # LoRA adapters beside the weight (`models.lora`), in the "lora" collection
    lora_rank: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, layer=None, stack: dict | None = None, adapters=None) -> jax.Array:
        """`stack` (packed, scanned layers): this weight's whole stack, read at `layer` by the kernel in place;
        `adapters` each token's LoRA `(slot, scale)` (slot -1: none; broadcast against `x`'s leading axes), or None."""
        shape = (self.features, x.shape[-1])
        four = self.quantization == "int4" and shape[1] % quant.GROUP == 0
        out_dtype = jnp.float32 if self.float32_out else None
        if self.quantization == "fp8":
            w = self.param("weight", nn.with_logical_partitioning(fp8_init, self.axes), shape, quant.FP8)
            scale = self.param("scale", nn.with_logical_partitioning(scale_init, (self.axes[0], None)), (shape[0], 1),
                               jnp.float32)
            y = quant.dot_fp8(x, w, scale, out_dtype)
        elif self.quantization != "none" and self.packed and quant.packable(*shape):
            names = ("weight", "scale", "minimum") if four else ("weight", "scale")
            w, scale, *minimum = packed_params(self, names, shape, self.axes)
            if stack is not None:  # XLA copies a slice of the stack for a custom call; the kernel indexes it instead
                w, scale, *minimum = (stack[name] for name in names)
            y = cpu_matmul.matmul(x, w, scale, None if stack is None else layer, *minimum)
            y = y.astype(out_dtype or x.dtype)
        elif four:
            w = self.param("weight", nn.with_logical_partitioning(uint8_init, self.axes), (shape[0], shape[1] // 2),
                           jnp.uint8)
            groups = (shape[0], shape[1] // quant.GROUP)
            scale = self.param("scale", nn.with_logical_partitioning(scale4_init, (self.axes[0], None)), groups,
                               jnp.float16)
            minimum = self.param("minimum", nn.with_logical_partitioning(minimum4_init, (self.axes[0], None)), groups,
                                 jnp.float16)
            y = quant.dot4(x, w, scale, minimum, out_dtype)
        elif self.quantization != "none":
            w = self.param("weight", nn.with_logical_partitioning(int8_init, self.axes), shape, jnp.int8)
            scale = self.param("scale", nn.with_logical_partitioning(scale_init, (self.axes[0], None)),
                               (shape[0], quant.groups(shape[1])), jnp.float32)
            y = quant.dot(x, w, scale, out_dtype)
        else:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
            w = self.param("weight", init, shape, jnp.dtype(self.dtype))
            y = jnp.dot(x, w.T, preferred_element_type=jnp.float32 if self.float32_out else None)
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[:1]),
                           (self.features,), jnp.dtype(self.dtype))
            y = y + b
        if self.lora_slots:
            n, r = self.lora_slots, self.lora_rank
            zeros = lambda axes: nn.with_logical_partitioning(jnp.zeros, axes)  # noqa: E731
            a = self.variable("lora", "lora_a", zeros((None, None, self.axes[1])), (n, r, shape[1]),
                              jnp.dtype(self.dtype)).value
            b = self.variable("lora", "lora_b", zeros((None, self.axes[0], None)), (n, shape[0], r),
                              jnp.dtype(self.dtype)).value
            if adapters is not None:
                y = y + lora.delta(x, a, b, adapters).astype(y.dtype)
        return y


def projection(cfg: ModelConfig, name: str, features: int, axes: tuple[str, str], x: jax.Array, bias: bool = False,
                layer=None, stacks: dict | None = None, adapters=None, lora: bool = False) -> jax.Array:
    """The calling module's projection `name` of `x`, a `Linear` quantized and packed as `cfg` says; `stacks` (packed
    weights of scanned layers) holds its whole stack, which the kernel reads at `layer`. With `lora` it holds the
    config's LoRA slots, applied by `adapters` (each token's slot and scale)."""
    slots = cfg.lora_slots if lora else 0
    mod = Linear(features, axes, bias, cfg.dtype, quantization=cfg.quantization, packed=cfg.matmul == "cpu",
                 lora_slots=slots, lora_rank=cfg.lora_rank if slots else 0, name=name)
    return mod(x, layer, stacks and stacks[name], adapters)


class Weight(nn.Module):
    """A bare `weight` parameter for products a `Linear` does not express: experts' stacks `[experts, out, in]`
    (the HF checkpoint's per-expert `[out, in]`), MLA's absorbed `kv_b_proj`. `fp8`: float8 e4m3 with a float32
    `scale` per row `[..., out, 1]`, returned as `(weight, scale)` (`quant.quantize_fp8`)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: str = "float32"
    fp8: bool = False

    @nn.compact
    def __call__(self) -> jax.Array | tuple[jax.Array, jax.Array]:
        if self.fp8:
            w = self.param("weight", nn.with_logical_partitioning(fp8_init, self.axes), self.shape, quant.FP8)
            return w, self.param("scale", nn.with_logical_partitioning(scale_init, (*self.axes[:-1], None)),
                                 (*self.shape[:-1], 1), jnp.float32)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
        return self.param("weight", init, self.shape, jnp.dtype(self.dtype))


def norm(cfg: ModelConfig, name: str) -> nn.Module:
    """The config's norm of a block's input or output: LayerNorm (Cohere's, StarCoder2's, Phi's; a bias where
    `norm_bias`) where `layer_norm`, else RMSNorm with the config's offset."""
    if cfg.layer_norm:
        return LayerNorm(cfg.rms_eps, cfg.norm_bias, cfg.dtype, name=name)
    return RMSNorm(cfg.rms_eps, cfg.norm_offset, cfg.dtype, name=name)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32: `(x - mean) / std * w (+ b)`."""

    eps: float
    bias: bool = False
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape, dt = (x.shape[-1],), jnp.dtype(self.dtype)
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (None,)), shape, dt)
        xf = x.astype(jnp.float32)
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
        out = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps) * w.astype(jnp.float32)
        if self.bias:
            out = out + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), shape,
                                   dt).astype(jnp.float32)
        return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; the scale is `offset + w` (offset 1 for Gemma)."""

    eps: float
    offset: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        w = self.param("weight", nn.with_logical_partitioning(init, (None,)), (x.shape[-1],), jnp.dtype(self.dtype))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma scales in float32 then casts
            return (xf * (self.offset + w.astype(jnp.float32))).astype(x.dtype)
        return w * xf.astype(x.dtype)
