"""Sharding declared once: logical axis names on parameters, mapped onto a `("data", "tp")` mesh by `RULES`.

One device is the 1x1 mesh; the same code places parameters and caches on any mesh.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axis -> mesh axis. Tensor parallelism splits attention heads and MLP width; data parallelism splits the
# decode batch (slots) and the KV pool's pages (each data shard owns its sequences and their pages). Experts are
# replicated, each split over `tp` by its width (`expert_mlp`) like a dense MLP; with expert parallelism
# (`EXPERT_PARALLEL`) the experts themselves are split over `tp`, each whole on one device.
RULES = (("heads", "tp"), ("kv_heads", "tp"), ("mlp", "tp"), ("vocab", None), ("embed", None), ("batch", "data"),
         ("pages", "data"), ("expert", None), ("expert_mlp", "tp"), ("router", None))
EXPERT_PARALLEL = (("expert", "tp"), ("expert_mlp", None))


def make_mesh(tp: int = 1, devices=None, dp: int = 1) -> Mesh:
    """A `(data=dp, tp=tp)` mesh over the first `dp * tp` of `devices` (default: all visible); a mesh larger than
    the devices, or one whose size does not divide their number, is a ValueError that says so."""
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or dp < 1:
        raise ValueError(f"tensor- and data-parallel sizes must be >= 1 (got {tp} and {dp})")
    if len(devices) % (tp * dp):
        fit = "does not fit" if tp * dp > len(devices) else "does not divide"
        raise ValueError(f"a mesh of data-parallel size {dp} x tensor-parallel size {tp} = {dp * tp} devices {fit} "
                         f"the {len(devices)} visible {devices[0].platform} device(s)")
    return Mesh(np.asarray(devices[:dp * tp]).reshape(dp, tp), ("data", "tp"))


def spec_for(names: tuple, shape: tuple, mesh: Mesh, expert_parallel: bool = False) -> PartitionSpec:
    """PartitionSpec for logical `names` (experts split by `EXPERT_PARALLEL`'s rules where asked); an axis that does
    not divide evenly stays replicated."""
    rules = dict(RULES + (EXPERT_PARALLEL if expert_parallel else ()))
    out = []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if name else None
        out.append(axis if axis and dim % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*out)


def param_shardings(boxed_abstract, mesh: Mesh, expert_parallel: bool = False):
    """NamedShardings for a tree of `nn.Partitioned` abstract params (from `jax.eval_shape(module.init, ...)`)."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh, expert_parallel))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def cache_sharding(num_kv_heads: int, mesh: Mesh) -> NamedSharding:
    """The KV pool `[kv_heads, data * layers * pages, page_size, head_dim]`: kv heads split over `tp` when they divide
    it, the pages split over `data` (shard d's block is its own `[layers * pages]` pool)."""
    return NamedSharding(mesh, spec_for(("kv_heads", "pages", None, None), (num_kv_heads, 0, 0, 0), mesh))
