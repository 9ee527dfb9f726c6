"""What tensor parallelism moves between devices: the collectives in the compiled decode step, per configuration.

Runs itself on 4 virtual CPU devices (`--xla_force_host_platform_device_count=4`): speed means nothing there (one
physical CPU), so this reads the optimized HLO of one decode forward pass (batch 16, one token per row, unrolled
layers so each layer's collectives appear once) and prints, per model and tensor-parallel size, each collective's
count and the bytes its results hold per step. The design expects one all-reduce after the attention block and one
after the MLP per layer when heads, KV heads and MLP width divide T; what does not divide stays replicated.
"""

from __future__ import annotations

import os
import re
import sys

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "s8": 1, "pred": 1, "f16": 2}
LLAMA_8_4 = dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=512, intermediate_size=1536,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """`{op: (count, bytes of its results)}` from optimized HLO text (async pairs counted once, at `-start`)."""
    out: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        m = re.search(r"= (\(?[^=]*?\)?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * BYTES.get(dtype, 4)
        c = out.setdefault(m.group(2), [0, 0])
        c[0] += 1
        c[1] += size
    return {k: (v[0], v[1]) for k, v in out.items()}


def decode_hlo(model, tp: int, batch: int = 16, pages: int = 4) -> str:
    """Optimized HLO of one decode forward pass of `model` (a Model) on a 1 x tp mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import KVCache
    from models.sharding import cache_sharding

    cfg = model.cfg
    cache = KVCache.zeros(cfg, 1 + batch * pages, 16)
    sh = cache_sharding(cfg.num_kv_heads, model.mesh)
    cache = KVCache(jax.device_put(cache.k, sh), jax.device_put(cache.v, sh))
    tokens, positions = jnp.ones((batch, 1), jnp.int32), jnp.full((batch, 1), 20, jnp.int32)
    table = jnp.asarray(1 + np.arange(batch * pages).reshape(batch, pages), jnp.int32)
    fwd = jax.jit(lambda p, c: model.module.apply(p, tokens, positions, table, c))
    return fwd.lower(model.params, cache).compile().as_text()


def main() -> None:
    """Print the table."""
    import jax

    from models import Model, ModelConfig, build, init_params, load_model
    from models.sharding import make_mesh

    rows = ["| model | T | collective: count, bytes per step | total bytes per step | per layer |",
            "| --- | --- | --- | --- | --- |"]
    for tp in (1, 2, 4):
        mesh = make_mesh(tp)
        smol = load_model("smollm2-135m-instruct", tp=tp, scan=False, with_tokenizer=False)
        cfg = ModelConfig.from_hf(LLAMA_8_4)
        module = build(cfg, scan=False)
        llama = Model("llama-8h-4kv", cfg, module, init_params(module, 0, mesh), mesh, None, {}, (), "random")
        for name, model in (("smollm2-135m (9 heads, 3 KV heads)", smol), ("llama shape (8 heads, 4 KV heads)", llama)):
            found = collectives(decode_hlo(model, tp))
            total = sum(b for _, b in found.values())
            desc = "; ".join(f"{k} x{n}, {b / 1024:.0f} KiB" for k, (n, b) in sorted(found.items())) or "none"
            layers = model.cfg.num_layers
            per = "; ".join(f"{k} {n / layers:g}" for k, (n, _) in sorted(found.items())) or "-"
            rows.append(f"| {name} | {tp} | {desc} | {total / 1024:.0f} KiB | {per} |")
    print(f"jax {jax.__version__}, {len(jax.devices())} virtual CPU devices, decode batch 16, unrolled layers\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
