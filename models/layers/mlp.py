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
    act = jax.nn.silu if cfg.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
    return lambda gate, up: act(gate) * up


class MLP(nn.Module):
    """Gated MLP: `down(glu(gate(x), up(x)))`, `size` wide (0: the config's `intermediate_size`)."""

    cfg: ModelConfig
    size: int = 0
    lora: bool = True  # its projections hold the config's LoRA slots (not a mixture's shared expert)

    @nn.compact
    def __call__(self, x, layer=None, stacks=None, adapters=None):
        """`layer` and `stacks`: the scanned layers' index and parameter stacks for packed projections (`Linear`);
        `adapters`: each token's LoRA slot (`models.lora`), or None."""
        cfg = self.cfg
        proj = functools.partial(projection, cfg, layer=layer, stacks=stacks, adapters=adapters, lora=self.lora)
        gate = proj("gate_proj", self.size or cfg.intermediate_size, ("mlp", "embed"), x)
        up = proj("up_proj", self.size or cfg.intermediate_size, ("mlp", "embed"), x)
        return proj("down_proj", cfg.hidden_size, ("embed", "mlp"), glu(cfg)(gate, up))
