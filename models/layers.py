"""Shared Flax building blocks: linear layers in the `[out, in]` layout, RMSNorm, RoPE, attention over paged K/V.

Every module is pure: the KV cache comes in as an argument and goes out updated. Parameters carry logical axis
names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`) that `models.sharding` maps onto a device mesh.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention, cpu_matmul, quant
from models.attention import KVCache
from models.config import ModelConfig


def _dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def _int8_init(key, shape, dtype=jnp.int8):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)


def _scale_init(key, shape, dtype=jnp.float32):
    return jnp.full(shape, 0.02 / 73, dtype)  # random int8 weights then have a std of ~0.02


def _uint8_init(key, shape, dtype=jnp.uint8):
    return jax.random.randint(key, shape, 1, 256, jnp.int32).astype(dtype)  # packed: int8 + 128


def _packed_params(module: nn.Module, names: tuple[str, str], shape: tuple[int, int], axes: tuple[str, str]):
    """A `[out, in]` int8 weight and its scales declared in the int8 kernel's packed layout (`quant.pack`)."""
    (out, inputs), lanes = shape, quant.LANES
    w = module.param(names[0], nn.with_logical_partitioning(_uint8_init, (*axes, None)),
                     (out // lanes, inputs // 4, 4 * lanes), jnp.uint8)
    scale = module.param(names[1], nn.with_logical_partitioning(_scale_init, (axes[0], None, None)),
                         (out // lanes, inputs // quant.GROUP, lanes), jnp.float32)
    return w, scale


class Linear(nn.Module):
    """`y = x @ w.T (+ b)` with `w` stored `[out, in]`: the layout XLA's CPU matvec reads fastest. `int8`: `w` is
    int8 with a float32 `scale` per output row and group of 32 inputs (`models.quant`); `packed` (the `cpu` matmul
    backend) keeps both in the int8 kernel's layout and multiplies with it (`models.cpu_matmul`)."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: str = "float32"
    float32_out: bool = False  # accumulate and return float32 (the LM head: logits stay float32)
    int8: bool = False
    packed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, layer=None, stack: dict | None = None) -> jax.Array:
        """`stack` (packed, scanned layers): this weight's whole stack, read at `layer` by the kernel in place."""
        shape = (self.features, x.shape[-1])
        if self.int8 and self.packed and quant.packable(*shape):
            w, scale = _packed_params(self, ("weight", "scale"), shape, self.axes)
            if stack is not None:  # XLA copies a slice of the stack for a custom call; the kernel indexes it instead
                w, scale = stack["weight"], stack["scale"]
            y = cpu_matmul.matmul(x, w, scale, None if stack is None else layer)
            y = y.astype(jnp.float32 if self.float32_out else x.dtype)
        elif self.int8:
            w = self.param("weight", nn.with_logical_partitioning(_int8_init, self.axes), shape, jnp.int8)
            scale = self.param("scale", nn.with_logical_partitioning(_scale_init, (self.axes[0], None)),
                               (shape[0], quant.groups(shape[1])), jnp.float32)
            y = quant.dot(x, w, scale, jnp.float32 if self.float32_out else None)
        else:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
            w = self.param("weight", init, shape, jnp.dtype(self.dtype))
            y = jnp.dot(x, w.T, preferred_element_type=jnp.float32 if self.float32_out else None)
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[:1]),
                           (self.features,), jnp.dtype(self.dtype))
            y = y + b
        return y


def _projection(cfg: ModelConfig, name: str, features: int, axes: tuple[str, str], x: jax.Array, bias: bool = False,
                layer=None, stacks: dict | None = None) -> jax.Array:
    """The calling module's projection `name` of `x`, a `Linear` quantized and packed as `cfg` says; `stacks` (packed
    weights of scanned layers) holds its whole stack, which the kernel reads at `layer`."""
    mod = Linear(features, axes, bias, cfg.dtype, int8=cfg.quantization == "int8", packed=cfg.matmul == "cpu",
                 name=name)
    return mod(x, layer, stacks and stacks[name])


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


def rope(x: jax.Array, positions: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
    """Rotary embedding, `rotate_half` convention: x `[B, S, H, D]`, positions `[B, S]`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # inv_freq may be traced
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention that writes this call's K/V into its layer's pages and attends over the pages in
    `table`. `layer` is a Python int (unrolled layers) or a traced index (scanned layers)."""

    cfg: ModelConfig
    backend: str = "xla"

    @nn.compact
    def __call__(self, x, positions, table, k_cache, v_cache, layer, stacks=None):
        """`stacks`: the scanned layers' parameter stacks (every layer's), where packed projections read theirs
        at `layer` (see `Linear`), or None."""
        cfg, dt = self.cfg, self.cfg.dtype
        b, s, _ = x.shape
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        proj = functools.partial(_projection, cfg, layer=layer, stacks=stacks)
        q = proj("q_proj", h * d, ("heads", "embed"), x, cfg.attention_bias).reshape(b, s, h, d)
        k = proj("k_proj", kvh * d, ("kv_heads", "embed"), x, cfg.attention_bias).reshape(b, s, kvh, d)
        v = proj("v_proj", kvh * d, ("kv_heads", "embed"), x, cfg.attention_bias).reshape(b, s, kvh, d)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_eps, cfg.norm_offset, dt, name="q_norm")(q)
            k = RMSNorm(cfg.rms_eps, cfg.norm_offset, dt, name="k_norm")(k)
        window, inv_freq = 0, cfg.rope_global
        if cfg.sliding_window:  # this layer's kind is looked up by its index (data, when layers are scanned)
            sliding = jnp.asarray(cfg.layer_sliding)[layer]
            window = jnp.where(sliding, cfg.sliding_window, 0)
            inv_freq = jnp.where(sliding, jnp.asarray(cfg.rope_local), jnp.asarray(cfg.rope_global))
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)

        pages = table + layer * (k_cache.shape[1] // cfg.num_layers)  # this layer's pages in the pool
        k_cache = attention.write(k_cache, k, positions, pages)
        v_cache = attention.write(v_cache, v, positions, pages)
        backend = self.backend
        if backend == "cpu" and b == 1 and cfg.matmul != "cpu":  # one row, XLA's float products: the reference
            backend = "xla"  # fuses with them; around the kernel the next projection ran ~5x slower (99 -> 78 tok/s)
        out = attention.paged_attention(backend, q, k, v, k_cache, v_cache, pages, positions, cfg.scale,
                                        cfg.attn_softcap, window)
        out = proj("o_proj", cfg.hidden_size, ("embed", "heads"), out)
        return out, k_cache, v_cache


class MLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer=None, stacks=None):
        """`layer` and `stacks`: the scanned layers' index and parameter stacks for packed projections (`Linear`)."""
        cfg = self.cfg
        proj = functools.partial(_projection, cfg, layer=layer, stacks=stacks)
        gate = proj("gate_proj", cfg.intermediate_size, ("mlp", "embed"), x)
        up = proj("up_proj", cfg.intermediate_size, ("mlp", "embed"), x)
        act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return proj("down_proj", cfg.hidden_size, ("embed", "mlp"), act * up)


class CausalLM(nn.Module):
    """Embedding, a stack of family-specific decoder layers, final norm and LM head.

    `__call__(tokens [B,S], positions [B,S], table [B,n], cache, last_index, all_logits)` returns
    `(logits, cache)`: logits `[B, S, V]` if `all_logits` else `[B, V]` for each row's last position. With `scan`
    the layers' weights are stacked (`params["layers"]`, leading axis = layer) and one layer body is traced and run
    under `lax.scan`, so compile time does not grow with depth; without, layers are unrolled (`layers_0`, ...).
    """

    cfg: ModelConfig
    layer_cls: Callable[..., nn.Module]
    backend: str = "xla"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens, positions, table, cache: KVCache, last_index=None, all_logits=False):
        cfg = self.cfg
        shape = (cfg.vocab_size, cfg.hidden_size)
        q8, pk = cfg.quantization == "int8", cfg.matmul == "cpu"
        packed_table = q8 and pk and cfg.tie_embeddings and quant.packable(*shape)
        if packed_table:  # the tied LM head multiplies with the int8 kernel; the lookup reads packed rows
            embed, rows = _packed_params(self, ("embed", "embed_rows"), shape, ("vocab", "embed"))
            x = quant.unpack_rows(embed, rows, tokens, _dtype(cfg))
        elif q8:  # one scale per vocabulary row and group serves the lookup and a tied LM head
            embed = self.param("embed", nn.with_logical_partitioning(_int8_init, ("vocab", "embed")), shape, jnp.int8)
            rows = self.param("embed_rows", nn.with_logical_partitioning(_scale_init, ("vocab", None)),
                              (shape[0], quant.groups(shape[1])), jnp.float32)
            x = quant.dequantize(embed[tokens], rows[tokens], _dtype(cfg))
        else:
            embed = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                               shape, _dtype(cfg))
            x = embed[tokens]
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        carry = (x, cache.k, cache.v)
        if self.scan:
            stacks = None  # packed weights: the kernel reads each layer from the whole stacks (`Linear`)
            if pk and not self.is_initializing():
                stacks = self.variables["params"]["layers"]
            stack = nn.scan(self.layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            carry, _ = stack(cfg, self.backend, name="layers")(carry, jnp.arange(cfg.num_layers), positions, table,
                                                               stacks)
        else:
            for i in range(cfg.num_layers):
                carry, _ = self.layer_cls(cfg, self.backend, name=f"layers_{i}")(carry, i, positions, table)
        x, k_cache, v_cache = carry
        x = RMSNorm(cfg.rms_eps, cfg.norm_offset, cfg.dtype, name="norm")(x)
        if not all_logits:
            idx = last_index if last_index is not None else jnp.full((x.shape[0],), x.shape[1] - 1)
            x = x[jnp.arange(x.shape[0]), idx]
        if packed_table:
            logits = cpu_matmul.matmul(x, embed, rows)
        elif cfg.tie_embeddings and q8:
            logits = quant.dot(x, embed, rows, jnp.float32)
        elif cfg.tie_embeddings:
            logits = jnp.dot(x, embed.T, preferred_element_type=jnp.float32)
        else:
            logits = Linear(cfg.vocab_size, ("vocab", "embed"), False, cfg.dtype, True, q8, pk, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cfg.final_softcap:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits, KVCache(k_cache, v_cache)
