"""The causal LM around a family's decoder layers: embedding, the layer stack (scanned or unrolled), final norm and
LM head. Every module is pure: the KV cache comes in as an argument and goes out updated."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from models import quant
from models.backends import cpu_matmul
from models.backends.paged import Flat, KVCache
from models.config import ModelConfig
from models.layers.attention import Attention
from models.layers.linear import Linear, dtype_of, int8_init, norm, packed_params, scale_init
from models.layers.mla import MLAttention
from models.layers.moe import feed_forward


class Block(nn.Module):
    """A family's decoder layer as `CausalLM` calls it: `(carry, layer, positions, table, stacks, adapters) ->
    (carry, None)`, `carry = (x, k_cache, v_cache)` (the `lax.scan` shape). `layer` is its index in its group of
    layers (traced when scanned), `first` the group's first layer's index in the model (`layer_groups`), `stacks`
    the group's parameter stacks where packed projections and experts read them (`Linear`), `adapters` each token's
    LoRA slot and scale (`models.lora`) or None."""

    cfg: ModelConfig
    backend: str = "xla"
    first: int = 0

    def attend(self, x, positions, table, k_cache, v_cache, layer, stacks, adapters):
        """The layer's attention (`self_attn`: latent attention where the config has a KV latent) over `x`, inside
        its call: `(out, k_cache, v_cache)`."""
        kind = MLAttention if self.cfg.kv_lora_rank else Attention
        return kind(self.cfg, self.backend, name="self_attn")(x, positions, table, k_cache, v_cache, layer,
                                                              stacks and stacks["self_attn"], self.first, adapters)

    def feed_forward(self, x, layer, stacks, adapters):
        """The layer's feed-forward block (`mlp`: a mixture of experts where the config routes them) over `x`."""
        return feed_forward(self.cfg, self.first)(x, layer, stacks and stacks["mlp"], adapters)


def layer_groups(cfg: ModelConfig, scan: bool) -> list[tuple[int, int, str]]:
    """The decoder layers as groups `(start, stop, name)`. Scanned, each run of consecutive layers of one kind (dense
    or mixture of experts) is one stack under `lax.scan`: `layers` where the run is every layer, `layers_{start}-{last}`
    otherwise, and a run of one layer stays unrolled (`layers_{start}`): DeepSeek-V3's 61 layers are two bodies to
    compile (3 dense, 58 MoE), not 61. Unrolled, each layer is its own group."""
    kinds = cfg.moe_layers or (False,) * cfg.num_layers
    if not scan:
        return [(i, i + 1, f"layers_{i}") for i in range(cfg.num_layers)]
    starts = [i for i in range(cfg.num_layers) if i == 0 or kinds[i] != kinds[i - 1]]
    runs = list(zip(starts, starts[1:] + [cfg.num_layers]))
    if len(runs) == 1:
        return [(0, cfg.num_layers, "layers")]
    return [(a, b, f"layers_{a}" if b - a == 1 else f"layers_{a}-{b - 1}") for a, b in runs]


class CausalLM(nn.Module):
    """Embedding, a stack of family-specific decoder layers, final norm and LM head.

    `__call__(tokens [B,S], positions [B,S], table [B,n], cache, last_index, all_logits)` returns
    `(logits, cache)`: logits `[B, S, V]` if `all_logits` else `[B, V]` for each row's last position. A flat batch
    (`table` a `paged.Flat`, tokens `[1, T]`) gives `[R, V]`, at each sequence's last token (`last_index`). With `scan`
    each run of layers of one kind has its weights stacked (leading axis = layer; `params["layers"]` where every layer
    is alike, see `layer_groups`) and one layer body traced and run under `lax.scan`, so compile time does not grow
    with depth; without, layers are unrolled (`layers_0`, ...). `adapters` (each token's LoRA `(slot, scale)`, shaped
    like `tokens` or broadcast to it; slot -1: none) picks the LoRA terms of a config with `lora_slots` (`models.lora`).
    `features` returns the final norm's hidden states `[B, S, H]` in place of logits (embeddings: `models.pooling`).
    With a "soft" collection (`{"rows": [N, H]}`, a model that reads images: `engine.images`), a token id `vocab + i`
    embeds as row `i` of it; with `cfg.image_block` (Gemma 3) a picture's rows, `image_block` of them in order, also
    attend to each other both ways: the layers get `(positions, horizons)`, each token's last visible key position
    (`horizons`), the end of its picture for its rows (the call holds the whole picture: `Scheduler.chunks`).
    """

    cfg: ModelConfig
    layer_cls: Callable[..., nn.Module]
    backend: str = "xla"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens, positions, table, cache: KVCache, last_index=None, all_logits=False, adapters=None,
                 features=False):
        cfg = self.cfg
        shape = (cfg.vocab_size, cfg.hidden_size)
        quantized, pk = cfg.quantization != "none", cfg.matmul == "cpu"  # int4 too keeps the table int8
        soft = self.get_variable("soft", "rows") if self.has_variable("soft", "rows") else None
        ids = tokens if soft is None else jnp.minimum(tokens, cfg.vocab_size - 1)
        packed_table = quantized and pk and cfg.tie_embeddings and quant.packable(*shape)
        if packed_table:  # the tied LM head multiplies with the int8 kernel; the lookup reads packed rows
            embed, rows = packed_params(self, ("embed", "embed_rows"), shape, ("vocab", "embed"))
            x = quant.unpack_rows(embed, rows, ids, dtype_of(cfg))
        elif quantized:  # one scale per vocabulary row and group serves the lookup and a tied LM head
            embed = self.param("embed", nn.with_logical_partitioning(int8_init, ("vocab", "embed")), shape, jnp.int8)
            rows = self.param("embed_rows", nn.with_logical_partitioning(scale_init, ("vocab", None)),
                              (shape[0], quant.groups(shape[1])), jnp.float32)
            x = quant.dequantize(embed[ids], rows[ids], dtype_of(cfg))
        else:
            embed = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                               shape, dtype_of(cfg))
            x = embed[ids]
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if soft is not None:  # ids past the vocabulary read rows of image features (`engine.images`)
            picked = soft[jnp.clip(tokens - cfg.vocab_size, 0, soft.shape[0] - 1)].astype(x.dtype)
            x = jnp.where((tokens >= cfg.vocab_size)[..., None], picked, x)
        carry = (x, cache.k, cache.v)
        if soft is not None and cfg.image_block:
            row = (tokens - cfg.vocab_size) % cfg.image_block
            positions = (positions, positions + jnp.where(tokens >= cfg.vocab_size, cfg.image_block - 1 - row, 0))
        for start, stop, name in layer_groups(cfg, self.scan):
            if name == f"layers_{start}":  # one layer, unrolled
                carry, _ = self.layer_cls(cfg, self.backend, first=start, name=name)(carry, 0, positions, table, None,
                                                                                     adapters)
                continue
            stacks = None  # packed weights and experts read each layer from the whole stacks (`Linear`, `moe`)
            if (pk or cfg.num_experts) and not self.is_initializing():
                stacks = self.variables["params"][name]
            stack = nn.scan(self.layer_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=stop - start,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            carry, _ = stack(cfg, self.backend, first=start, name=name)(carry, jnp.arange(stop - start), positions,
                                                                        table, stacks, adapters)
        x, k_cache, v_cache = carry
        x = norm(cfg, "norm")(x)
        if features:
            return x, KVCache(k_cache, v_cache)
        if isinstance(table, Flat):  # a flat batch: logits at each sequence's last token (`last_index [R]`)
            x = x[0, last_index]
        elif not all_logits:
            idx = last_index if last_index is not None else jnp.full((x.shape[0],), x.shape[1] - 1)
            x = x[jnp.arange(x.shape[0]), idx]
        if packed_table:
            logits = cpu_matmul.matmul(x, embed, rows)
        elif cfg.tie_embeddings and quantized:
            logits = quant.dot(x, embed, rows, jnp.float32)
        elif cfg.tie_embeddings:
            logits = jnp.dot(x, embed.T, preferred_element_type=jnp.float32)
        else:
            head = quant.HEADS.get(cfg.quantization, cfg.quantization)  # fp8: float, as vLLM's; int4: int8
            logits = Linear(cfg.vocab_size, ("vocab", "embed"), cfg.lm_head_bias, cfg.dtype, True, head, pk,
                            name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cfg.logits_scaling != 1.0:  # Granite, Cohere
            logits = logits / cfg.logits_scaling
        if cfg.final_softcap:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits, KVCache(k_cache, v_cache)
