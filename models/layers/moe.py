"""Mixture of experts: a router picks `k` experts per token, the (token, expert) pairs are grouped by expert and
multiplied with a grouped matmul, and each token sums its experts' outputs weighted by the router. Every pair is
computed: no capacity limit, no dropped tokens.

The grouped matmul has two forms (`grouped_matmul`): `jax.lax.ragged_dot_general` over the pairs sorted by expert
(GPU and TPU lower it to grouped kernels), and tiles of the sorted pairs padded per expert, each multiplied with
its expert's weight, gathered (a tile of one pair is a matrix-vector product with that pair's expert). On a CPU,
XLA turns `ragged_dot` into a dense product per expert, so `tile_for` picks per number of pairs the form measured
fastest there (docs/PERFORMANCE.md). `dense_reference` is the einsum over all experts the tests compare with.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers.linear import projection
from models.layers.mlp import MLP


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax routing: `logits [T, E]` (float32) -> the top `k` experts' probabilities and ids `[T, k]`, the
    probabilities renormalized to sum to 1 when `normalize` (Mixtral always; Qwen's `norm_topk_prob`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids


def tile_for(pairs: int, experts: int, platform: str | None = None) -> int:
    """The grouped matmul's form for `pairs` (token, expert) pairs (static): 0 is `ragged_dot`, n > 0 tiles of n
    pairs. GPU and TPU: `ragged_dot`. CPU: one-pair tiles while fewer than half the experts can be touched (only
    their weights are read), `ragged_dot` up to 8 pairs per expert, then 64-pair tiles (ragged_dot's dense
    lowering does every expert's product for every pair)."""
    if (platform or jax.default_backend()) != "cpu":
        return 0
    return 1 if 2 * pairs <= experts else 0 if pairs <= 8 * experts else 64


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, tile: int = 0) -> jax.Array:
    """`x [P, in]`, rows sorted by group with `sizes [E]` rows per group, times each group's `w [E, out, in]`
    transposed: `[P, out]`. `tile` 0: `ragged_dot`; n > 0: tiles of n rows padded per group."""
    if tile == 0:
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
        return jax.lax.ragged_dot_general(x, w, sizes, dims, preferred_element_type=x.dtype)
    p, e = x.shape[0], w.shape[0]
    group = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=p)  # each row's group
    padded = (sizes + tile - 1) // tile * tile
    ends = jnp.cumsum(padded)
    slot = (ends - padded)[group] + jnp.arange(p) - (jnp.cumsum(sizes) - sizes)[group]  # row -> padded slot
    tiles = p if tile == 1 else -(-p // tile) + min(e, p)  # enough for any sizes: each group wastes < one tile
    rows = jnp.full((tiles * tile,), p, jnp.int32).at[slot].set(jnp.arange(p, dtype=jnp.int32))
    xt = jnp.concatenate([x, jnp.zeros_like(x[:1])])[rows].reshape(tiles, tile, x.shape[1])
    owner = jnp.minimum(jnp.searchsorted(ends, jnp.arange(tiles) * tile, side="right"), e - 1)
    y = jnp.einsum("nti,noi->nto", xt, w[owner]).reshape(tiles * tile, -1)
    return y[slot]


def experts(x: jax.Array, weights: jax.Array, ids: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
            act, tile: int = 0) -> jax.Array:
    """Gated-MLP experts: token rows `x [T, H]`, routing `weights`/`ids [T, k]`, stacked `gate`/`up [E, I, H]` and
    `down [E, H, I]` -> `[T, H]`, the weighted sum of each token's experts."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert
    token = order // k
    sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
    xs = x[token]
    mm = functools.partial(grouped_matmul, sizes=sizes, tile=tile)
    h = act(mm(xs, gate)) * mm(xs, up)
    y = mm(h, down) * weights.reshape(-1)[order][:, None].astype(x.dtype)
    return jnp.zeros_like(x).at[token].add(y)


def dense_reference(x, weights, ids, gate, up, down, act):
    """`experts` as an einsum over every expert for every token (the tests' reference, never served)."""
    h = act(jnp.einsum("th,eih->tei", x, gate)) * jnp.einsum("th,eih->tei", x, up)
    y = jnp.einsum("tei,ehi->teh", h, down)
    mix = jnp.zeros(ids.shape[:1] + (gate.shape[0],), x.dtype).at[jnp.arange(ids.shape[0])[:, None], ids].add(
        weights.astype(x.dtype))
    return jnp.einsum("teh,te->th", y, mix)


class Stacked(nn.Module):
    """One weight per expert, stacked: `weight [experts, out, in]` (the HF checkpoint's per-expert `[out, in]`)."""

    shape: tuple[int, int, int]
    axes: tuple[str, str, str]
    dtype: str = "float32"

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
        return self.param("weight", init, self.shape, jnp.dtype(self.dtype))


class Experts(nn.Module):
    """The routed experts' stacked weights and their grouped product (`experts`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, rows: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """Token `rows [T, H]` and their routing `weights`/`ids [T, k]` -> `[T, H]`."""
        cfg = self.cfg
        e, inter, hidden = cfg.num_experts, cfg.moe_intermediate_size, rows.shape[-1]
        gate = Stacked((e, inter, hidden), ("expert", "mlp", "embed"), cfg.dtype, name="gate_proj")
        up = Stacked((e, inter, hidden), ("expert", "mlp", "embed"), cfg.dtype, name="up_proj")
        down = Stacked((e, hidden, inter), ("expert", "embed", "mlp"), cfg.dtype, name="down_proj")
        act = jax.nn.silu if cfg.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
        return experts(rows, weights, ids, gate(), up(), down(), act, tile_for(ids.size, e))


class MoE(nn.Module):
    """A sparse MoE block: router `gate`, routed `experts`, and Qwen2-MoE's `shared_expert` scaled by
    `sigmoid(shared_expert_gate(x))` where the config has one."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer=None, stacks=None):
        """`x [B, S, H]`; `layer` and `stacks` as for `MLP` (the router is a projection like any other)."""
        cfg = self.cfg
        b, s, hidden = x.shape
        rows = x.reshape(b * s, hidden)
        proj = functools.partial(projection, cfg, layer=layer, stacks=stacks)
        logits = proj("gate", cfg.num_experts, ("expert", "embed"), rows)
        weights, ids = route(logits.astype(jnp.float32), cfg.experts_per_token, cfg.norm_topk_prob)
        out = Experts(cfg, name="experts")(rows, weights, ids)
        if cfg.shared_expert_size:
            shared = MLP(cfg, cfg.shared_expert_size, name="shared_expert")(rows, layer,
                                                                             stacks and stacks["shared_expert"])
            out = out + jax.nn.sigmoid(proj("shared_expert_gate", 1, (None, "embed"), rows)) * shared
        return out.reshape(b, s, hidden)


def feed_forward(cfg: ModelConfig, layer) -> nn.Module:
    """Layer `layer`'s feed-forward block: `MoE` where the config routes experts, else the dense `MLP` (scanned
    layers are all of one kind, `models.build`)."""
    moe = cfg.moe_layers[layer if isinstance(layer, int) else 0] if cfg.moe_layers else False
    return MoE(cfg, name="mlp") if moe else MLP(cfg, name="mlp")
