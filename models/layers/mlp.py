"""The gated MLP of dense decoder layers (and of shared experts)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from models.config import ModelConfig
from models.layers.linear import projection


class MLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`, `size` wide (0: the config's `intermediate_size`)."""

    cfg: ModelConfig
    size: int = 0

    @nn.compact
    def __call__(self, x, layer=None, stacks=None):
        """`layer` and `stacks`: the scanned layers' index and parameter stacks for packed projections (`Linear`)."""
        cfg = self.cfg
        proj = functools.partial(projection, cfg, layer=layer, stacks=stacks)
        gate = proj("gate_proj", self.size or cfg.intermediate_size, ("mlp", "embed"), x)
        up = proj("up_proj", self.size or cfg.intermediate_size, ("mlp", "embed"), x)
        act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return proj("down_proj", cfg.hidden_size, ("embed", "mlp"), act * up)
