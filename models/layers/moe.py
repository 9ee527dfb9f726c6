"""Mixture of experts: a router picks `k` experts per token, the (token, expert) pairs are grouped by expert and
multiplied with a grouped matmul, and each token sums its experts' outputs weighted by the router. Every pair is
computed: no capacity limit, no dropped tokens.

The grouped product has two forms: `jax.lax.ragged_dot_general` over the pairs sorted by expert (`grouped_matmul`;
GPU and TPU lower it to grouped kernels), and on a CPU, where XLA turns `ragged_dot` into a dense product per
expert, a loop over tiles of one expert's pairs, as many as they fill (`expert_loop`). `tile_for` picks by the
number of pairs. `dense_reference` is the einsum over all experts the tests compare with.

Under `--quantization fp8` an expert's weights are a pair, float8 rows and a float32 scale each `[E, out, 1]`
(`quant.quantize_fp8`), and each pair's row is rounded to float8 at its own scale (`quant.fp8_rows`): `ragged_dot`
multiplies the two float8 operands, and the CPU's loop widens a tile's expert and multiplies the rounded rows, the
same values.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models import quant
from models.config import ModelConfig
from models.layers.linear import Weight, projection
from models.layers.mlp import MLP, glu


def route(logits: jax.Array, k: int, normalize: bool, scoring: str = "softmax", bias: jax.Array | None = None,
          groups: int = 1, top_groups: int = 1, scale: float = 1.0, group_score: str = "top2"
          ) -> tuple[jax.Array, jax.Array]:
    """Router `logits [T, E]` -> the chosen experts' weights and ids `[T, k]`. Scores are the softmax (Mixtral,
    Qwen) or the sigmoid (DeepSeek-V3) of the logits. The choice ranks the scores plus `bias` (DeepSeek-V3's
    `e_score_correction_bias`, for selection only), within the `top_groups` of `groups` expert groups whose two best
    scores sum highest (`group_score` "top2", V3) or whose best is highest ("max", V2); the weights are the chosen
    scores, renormalized to sum to 1 when `normalize` (Mixtral always; `norm_topk_prob`), times `scale`
    (`routed_scaling_factor`)."""
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    if groups > 1:
        t, e = choice.shape
        grouped = choice.reshape(t, groups, e // groups)
        best = jax.lax.top_k(grouped, 2)[0].sum(-1) if group_score == "top2" else grouped.max(-1)
        keep = jnp.zeros((t, groups), bool).at[jnp.arange(t)[:, None], jax.lax.top_k(best, top_groups)[1]].set(True)
        choice = jnp.where(jnp.repeat(keep, e // groups, axis=1), choice, -jnp.inf)
    ids = jax.lax.top_k(choice, k)[1]
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scale, ids


def tile_for(pairs: int, experts: int, platform: str | None = None) -> int:
    """The grouped product's form for `pairs` (token, expert) pairs (static): 0 is `ragged_dot` (GPU and TPU); on a
    CPU n > 0, the loop over tiles of n pairs of one expert (`expert_loop`): one pair per tile up to 4 pairs per
    expert, 8 up to 16, then 64 (measured fastest at each, docs/PERFORMANCE.md)."""
    if (platform or jax.default_backend()) != "cpu":
        return 0
    return 1 if pairs <= 4 * experts else 8 if pairs <= 16 * experts else 64


def grouped_matmul(x: jax.Array, w, sizes: jax.Array, group: jax.Array | None = None) -> jax.Array:
    """`x [P, in]`, rows sorted by group with `sizes [E]` rows per group, times each group's `w [E, out, in]`
    transposed: `[P, out]`, by `ragged_dot`. `w` may be fp8's `(weight, scale)`: the rows are rounded to float8
    (`quant.fp8_rows`), multiplied as float8, and scaled back by theirs and by each row's `group`'s."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    if not isinstance(w, tuple):
        return jax.lax.ragged_dot_general(x, w, sizes, dims, preferred_element_type=x.dtype)
    (w, scale), (xq, top) = w, quant.fp8_rows(x)
    y = jax.lax.ragged_dot_general(xq, w, sizes, dims, preferred_element_type=jnp.float32)
    return (y * top * scale[group, :, 0]).astype(x.dtype)


def _expert(w, at, dtype) -> jax.Array:
    """One expert's weights `w[at]`: fp8's `(weight, scale)` widened with its scales to `dtype`, float as they are."""
    return quant.dequantize(w[0][at], w[1][at], dtype) if isinstance(w, tuple) else w[at]


def _seen(w, x: jax.Array) -> jax.Array:
    """Rows `x` as a product with `w` sees them: rounded to float8 at their own scales for fp8's `(weight, scale)`
    (`quant.fp8_rows`, widened back), as they are for float weights."""
    if not isinstance(w, tuple):
        return x
    xq, top = quant.fp8_rows(x)
    return (xq.astype(jnp.float32) * top).astype(x.dtype)


def expert_loop(x: jax.Array, sizes: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, glu,
                tile: int, layer=None, biases=()) -> jax.Array:
    """The experts' MLP of rows `x [P, H]` sorted by expert (`sizes [E]` each) as a loop over tiles of `tile` rows
    of one expert, only as many as the rows fill (a trip count known on the device): each tile reads its expert's
    weights once and runs the whole gated MLP. On a CPU this beat `ragged_dot` (a dense product per expert) and a
    dense einsum at every batch measured. With `layer` (scanned layers) the weights are every layer's stacks and a
    tile reads its expert of that layer: taking the layer's slice first made XLA copy all its experts every step."""
    p, e = x.shape[0], jax.tree.leaves(gate)[0].shape[-3]
    per = (sizes + tile - 1) // tile  # tiles of each expert
    ends = jnp.cumsum(per)
    items = jnp.arange(-(-p // tile) + min(e, p))  # enough for any sizes: each expert wastes less than a tile
    owner = jnp.minimum(jnp.searchsorted(ends, items, side="right"), e - 1)
    bounds = jnp.cumsum(sizes)  # one past each expert's rows
    first = (bounds - sizes)[owner] + (items - (ends - per)[owner]) * tile  # a tile's first row
    last = bounds[owner]
    xp = jnp.concatenate([x, jnp.zeros((tile, x.shape[1]), x.dtype)])

    def body(i, out):
        k, r = owner[i], first[i]
        at = k if layer is None else (layer, k)
        xt = jax.lax.dynamic_slice_in_dim(xp, r, tile)
        xt = _seen(gate, xt)  # (gate and up are the same kind)
        g, u = xt @ _expert(gate, at, xt.dtype).T, xt @ _expert(up, at, xt.dtype).T
        if biases:
            g, u = g + biases[0][at], u + biases[1][at]
        h = _seen(down, glu(g, u))
        y = h @ _expert(down, at, h.dtype).T
        if biases:
            y = y + biases[2][at]
        keep = (r + jnp.arange(tile) < last[i])[:, None]  # rows past the expert's belong to the next tile
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, y, jax.lax.dynamic_slice_in_dim(out, r, tile)),
                                                   r, 0)

    return jax.lax.fori_loop(0, ends[-1], body, jnp.zeros_like(xp))[:p]


def experts(x: jax.Array, weights: jax.Array, ids: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
            glu, tile: int = 0, layer=None, biases=()) -> jax.Array:
    """Gated-MLP experts: token rows `x [T, H]`, routing `weights`/`ids [T, k]`, stacked `gate`/`up [E, I, H]` and
    `down [E, H, I]` (each float, or fp8's `(weight, scale)`) -> `[T, H]`, the weighted sum of each token's experts.
    `glu(gate, up)` is the gated unit (`layers.mlp.glu`); `biases` (gpt-oss) the projections' `([E, I], [E, I],
    [E, H])`, or none. `tile` as `tile_for`; `layer`: the weights (and biases) are every layer's `[L, E, ...]` and
    this is the layer's index (the loop form only)."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert
    token = order // k
    sizes = jnp.bincount(flat, length=jax.tree.leaves(gate)[0].shape[-3]).astype(jnp.int32)
    xs = x[token]
    if tile:
        y = expert_loop(xs, sizes, gate, up, down, glu, tile, layer, biases)
    else:
        expert = flat[order]  # each row's expert, for its biases (and fp8's scales)
        g, u = grouped_matmul(xs, gate, sizes, expert), grouped_matmul(xs, up, sizes, expert)
        if biases:
            g, u = g + biases[0][expert], u + biases[1][expert]
        y = grouped_matmul(glu(g, u), down, sizes, expert)
        if biases:
            y = y + biases[2][expert]
    y = y * weights.reshape(-1)[order][:, None].astype(x.dtype)
    return jnp.zeros_like(x).at[token].add(y)


def dense_reference(x, weights, ids, gate, up, down, glu, biases=()):
    """`experts` as an einsum over every expert for every token (the tests' reference, never served)."""
    g, u = jnp.einsum("th,eih->tei", x, gate), jnp.einsum("th,eih->tei", x, up)
    if biases:
        g, u = g + biases[0], u + biases[1]
    y = jnp.einsum("tei,ehi->teh", glu(g, u), down)
    if biases:
        y = y + biases[2]
    mix = jnp.zeros(ids.shape[:1] + (gate.shape[0],), x.dtype).at[jnp.arange(ids.shape[0])[:, None], ids].add(
        weights.astype(x.dtype))
    return jnp.einsum("teh,te->th", y, mix)


class Experts(nn.Module):
    """The routed experts' stacked weights (and gpt-oss's biases, `{gate,up,down}_proj_bias`) and their grouped
    product (`experts`); split over `tp` by their width, or with expert parallelism (`ModelConfig.expert_mesh`)
    each whole on one `tp` shard (`expert_parallel`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, rows: jax.Array, weights: jax.Array, ids: jax.Array, layer=None, stacks=None) -> jax.Array:
        """Token `rows [T, H]` and their routing `weights`/`ids [T, k]` -> `[T, H]`; `stacks` (scanned layers):
        every layer's expert weights, which the CPU's loop reads at `layer` in place."""
        cfg = self.cfg
        e, inter, hidden = cfg.num_experts, cfg.moe_intermediate_size, rows.shape[-1]
        names = ("gate_proj", "up_proj", "down_proj")
        fp8 = cfg.quantization == "fp8"
        gate = Weight((e, inter, hidden), ("expert", "expert_mlp", "embed"), cfg.dtype, fp8, name="gate_proj")
        up = Weight((e, inter, hidden), ("expert", "expert_mlp", "embed"), cfg.dtype, fp8, name="up_proj")
        down = Weight((e, hidden, inter), ("expert", "embed", "expert_mlp"), cfg.dtype, fp8, name="down_proj")
        biases = ()
        if cfg.expert_bias:
            init = nn.initializers.zeros
            biases = tuple(self.param(f"{n}_bias", nn.with_logical_partitioning(init, ("expert", axis)), (e, width),
                                      jnp.dtype(cfg.dtype))
                           for n, axis, width in zip(names, ("expert_mlp", "expert_mlp", "embed"),
                                                     (inter, inter, hidden)))
        tile, ws, at = tile_for(ids.size, e), (gate(), up(), down()), None
        if tile and stacks is not None:  # the loop reads this layer's experts from the whole stacks
            ws, at = tuple((stacks[n]["weight"], stacks[n]["scale"]) if fp8 else stacks[n]["weight"]
                           for n in names), layer
            biases = biases and tuple(stacks[f"{n}_bias"] for n in names)
        if cfg.expert_mesh:
            return expert_parallel(rows, weights, ids, ws, biases, glu(cfg), tile, at, cfg.expert_mesh)
        return experts(rows, weights, ids, *ws, glu(cfg), tile, at, biases)


def expert_parallel(rows, weights, ids, ws, biases, glu, tile, layer, mesh_shape) -> jax.Array:
    """`experts` with the experts split over the mesh's `tp` axis (expert parallelism, vLLM's
    `--enable-expert-parallel`): every shard takes all the tokens, computes the pairs of its own experts (the others'
    weights set to 0 and their ids past its experts, so they group last and are skipped) and the shards' partial
    sums are added (one all-reduce over `tp`). `ws`/`biases` are the whole arrays, split on their expert axis (the
    second where `layer` says they are every layer's stacks)."""
    lead = (None,) if layer is not None else ()
    split = P(*lead, "tp")
    at = None if layer is None else jnp.asarray(layer)  # traced outside: an argument, not closed over

    def local(rows, weights, ids, ws, biases, at):
        n = jax.tree.leaves(ws[0])[0].shape[-3]  # this shard's experts
        mine = ids - jax.lax.axis_index("tp") * n
        ours = (mine >= 0) & (mine < n)
        y = experts(rows, jnp.where(ours, weights, 0), jnp.where(ours, mine, n), *ws, glu, tile, at, biases)
        return jax.lax.psum(y, "tp")

    context = jax.sharding.get_abstract_mesh()  # set inside the runner's shard_map over `data`
    mesh = context if not context.empty else jax.sharding.AbstractMesh(tuple(mesh_shape), ("data", "tp"))
    specs = jax.tree.map(lambda _: split, tuple(ws))  # fp8's scales split with their weights
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), specs, (split,) * len(biases), P()),
                         out_specs=P(), axis_names={"tp"}, check_vma=False)(rows, weights, ids, tuple(ws), biases, at)


class Router(nn.Module):
    """The router `gate`: a float `weight [experts, hidden]` applied in float32 (never quantized: it is small and
    decides everything), gpt-oss's `bias` on its logits, and the selection bias of DeepSeek-V3 (sigmoid scores) and
    ERNIE 4.5 (softmax scores). gpt-oss softmaxes the top-k logits: the same weights as Mixtral's renormalized
    top-k softmax."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token `rows [T, H]` -> routing weights and expert ids `[T, k]` (`route`)."""
        cfg = self.cfg
        # Replicated on every device (`router` maps to no mesh axis): every device routes every token, and under
        # expert parallelism an `expert` axis split over tp would gather the logits back before the top-k.
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("router", "embed"))
        w = self.param("weight", init, (cfg.num_experts, rows.shape[-1]), jnp.dtype(cfg.dtype))
        bias, logit_bias = None, 0.0
        if cfg.router_bias:  # gpt-oss: a bias on the logits themselves
            logit_bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("router",)),
                                    (cfg.num_experts,), jnp.dtype(cfg.dtype)).astype(jnp.float32)
        if cfg.selection_bias:
            bias = self.param("e_score_correction_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                                      ("router",)),
                              (cfg.num_experts,), jnp.float32)
        logits = jnp.dot(rows.astype(jnp.float32), w.astype(jnp.float32).T) + logit_bias
        return route(logits, cfg.experts_per_token, cfg.norm_topk_prob, cfg.scoring, bias, cfg.expert_groups,
                     cfg.top_groups, cfg.routed_scale, cfg.group_score)


class MoE(nn.Module):
    """A sparse MoE block: `Router` `gate`, routed `experts`, and a `shared_expert` where the config has one (Qwen2-MoE
    scales it by `sigmoid(shared_expert_gate(x))`; DeepSeek's `n_shared_experts` are one expert that wide)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer=None, stacks=None, adapters=None):
        """`x [B, S, H]`; `layer` and `stacks` as for `MLP` (the experts' loop reads its stacks too). LoRA adapters
        (`adapters`) do not reach a mixture: its layers' attention takes them."""
        cfg = self.cfg
        b, s, hidden = x.shape
        rows = x.reshape(b * s, hidden)
        weights, ids = Router(cfg, name="gate")(rows)
        out = Experts(cfg, name="experts")(rows, weights, ids, layer, stacks and stacks["experts"])
        if cfg.shared_expert_size:
            shared = MLP(cfg, cfg.shared_expert_size, lora=False, name="shared_expert")(
                rows, layer, stacks and stacks["shared_expert"])
            if cfg.shared_expert_gate:
                gate = projection(cfg, "shared_expert_gate", 1, (None, "embed"), rows, layer=layer, stacks=stacks)
                shared = jax.nn.sigmoid(gate) * shared
            out = out + shared
        return out.reshape(b, s, hidden)


def feed_forward(cfg: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s feed-forward block: `MoE` where the config routes experts, else the dense `MLP` (a group of
    scanned layers is all of one kind, `layers.causal_lm.layer_groups`)."""
    moe = cfg.moe_layers[layer] if cfg.moe_layers else False
    return MoE(cfg, name="mlp") if moe else MLP(cfg, name="mlp")
