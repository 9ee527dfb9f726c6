"""The gated MLP of dense decoder layers (and of shared experts)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers.linear import projection


def glu(cfg: ModelConfig):
    """The gated unit `(gate, up) -> hidden` of the config's activation: `act(gate) * up` for SiLU and GELU-tanh;
    gpt-oss's clamped SwiGLU `(clip(up, ±limit) + 1) * g * sigmoid(alpha * g)` with `g = min(gate, limit)`."""
    if cfg.activation == "clamped_swiglu":
        alpha, limit = cfg.swiglu_alpha, cfg.swiglu_limit

        def clamped(gate, up):
            g = jnp.minimum(gate, limit)
            return (jnp.clip(up, -limit, limit) + 1) * (g * jax.nn.sigmoid(g * alpha))

        return clamped
    act = activation(cfg)
    return lambda gate, up: act(gate) * up


def activation(cfg: ModelConfig):
    """The config's activation: SiLU, GELU (exact), GELU's tanh approximation, or ReLU squared (Arcee's)."""
    if cfg.activation == "silu":
        return jax.nn.silu
    if cfg.activation == "relu2":
        return lambda x: jnp.square(jax.nn.relu(x))
    return functools.partial(jax.nn.gelu, approximate=cfg.activation == "gelu_tanh")


class MLP(nn.Module):
    """Gated MLP: `down(glu(gate(x), up(x)))`, `size` wide (0: the config's `intermediate_size`); where the config's
    is not gated (StarCoder2, Phi), `down(act(up(x)))`; biases where `mlp_bias`."""

    cfg: ModelConfig
    size: int = 0
    lora: bool = True  # its projections hold the config's LoRA slots (not a mixture's shared expert)

    @nn.compact
    def __call__(self, x, layer=None, stacks=None, adapters=None):
        """`layer` and `stacks`: the scanned layers' index and parameter stacks for packed projections (`Linear`);
        `adapters`: each token's LoRA slot and scale (`models.lora`), or None."""
        cfg = self.cfg
        proj = functools.partial(projection, cfg, layer=layer, stacks=stacks, adapters=adapters, lora=self.lora)
        width, bias = self.size or cfg.intermediate_size, cfg.mlp_bias
        up = proj("up_proj", width, ("mlp", "embed"), x, bias)
        if not cfg.mlp_gated:
            return proj("down_proj", cfg.hidden_size, ("embed", "mlp"), activation(cfg)(up), bias)
        gate = proj("gate_proj", width, ("mlp", "embed"), x, bias)
        return proj("down_proj", cfg.hidden_size, ("embed", "mlp"), glu(cfg)(gate, up), bias)
