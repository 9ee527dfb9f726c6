"""What a mesh moves between devices: the collectives in the engine's compiled decode step, per configuration.

Runs itself on 4 virtual CPU devices (`--xla_force_host_platform_device_count=4`): speed means nothing there (one
physical CPU), so this reads the optimized HLO of the runner's decode step (batch 16, one step: forward pass,
sampler, outputs gathered for the host; unrolled layers so each layer's collectives appear once) and prints, per
model and data x tensor-parallel size, each collective's count and the bytes its results hold per step. The design
expects, under tensor parallelism, one all-reduce after the attention block and one after the MLP per layer when
heads, KV heads and MLP width divide T (what does not divide stays replicated); under data parallelism nothing in
the layers, since each shard owns its rows and pages, only the gather of the sampled outputs. With expert
parallelism (`--enable-expert-parallel`, the "EP" rows) an MoE layer's experts are whole on their devices: every
device takes all the tokens and the partial sums meet in one all-reduce, as with experts split by width.
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
QWEN3_MOE = dict(LLAMA_8_4, architectures=["Qwen3MoeForCausalLM"], num_experts=16, num_experts_per_tok=4,
                 moe_intermediate_size=256, norm_topk_prob=True)
DEEPSEEK_V3 = dict(LLAMA_8_4, architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=8, n_routed_experts=16,
                   num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                   moe_intermediate_size=256, kv_lora_rank=128, q_lora_rank=192, qk_nope_head_dim=64,
                   qk_rope_head_dim=32, v_head_dim=64)


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


def step_hlo(model, batch: int = 16) -> str:
    """Optimized HLO of the engine's compiled decode step (one step: forward pass, sampler, outputs gathered for the
    host) at `batch` rows, on the model's mesh."""
    import jax

    from engine import RunnerConfig
    from engine.compile import _abstract
    from engine.runner import Runner

    runner = Runner(model, RunnerConfig(max_num_seqs=batch, max_model_len=256, kv_cache_gb=0.02, decode_steps=1))
    fn, args, statics = next(j for j in runner.warm_jobs() if j[0] is runner._decode and j[1][4].shape[0] == batch)
    return fn.fn.lower(*jax.tree.map(_abstract, args), **statics).compile().as_text()


def main() -> None:
    """Print the table."""
    import jax

    from models import Model, ModelConfig, build, init_params, load_model, with_expert_parallel
    from models.sharding import make_mesh

    rows = ["| model | D x T | collective: count, bytes per step | total bytes per step | per layer |",
            "| --- | --- | --- | --- | --- |"]
    for dp, tp in ((1, 1), (1, 2), (1, 4), (2, 1), (4, 1), (2, 2)):
        mesh = make_mesh(tp, dp=dp)
        smol = load_model("smollm2-135m-instruct", tp=tp, dp=dp, scan=False, with_tokenizer=False)

        def random(shape: dict, expert_parallel: bool = False) -> Model:
            cfg = ModelConfig.from_hf(shape)
            module = build(with_expert_parallel(cfg, dp, tp) if expert_parallel else cfg, scan=False)
            return Model("random", module.cfg, module, init_params(module, 0, mesh), mesh, None, {}, (), "random")

        models = [("smollm2-135m (9 heads, 3 KV heads)", lambda: smol),
                  ("llama shape (8 heads, 4 KV heads)", lambda: random(LLAMA_8_4)),
                  ("qwen3-moe shape (16 experts, top 4)", lambda: random(QWEN3_MOE)),
                  ("deepseek-v3 shape (MLA, 16 experts, a dense first layer)", lambda: random(DEEPSEEK_V3))]
        if tp > 1:
            models += [("qwen3-moe shape, EP", lambda: random(QWEN3_MOE, True)),
                       ("deepseek-v3 shape, EP", lambda: random(DEEPSEEK_V3, True))]
        for name, make in models:
            model = make()
            found = collectives(step_hlo(model))
            total = sum(b for _, b in found.values())
            desc = "; ".join(f"{k} x{n}, {b / 1024:.0f} KiB" for k, (n, b) in sorted(found.items())) or "none"
            layers = model.cfg.num_layers
            per = "; ".join(f"{k} {n / layers:g}" for k, (n, _) in sorted(found.items())) or "-"
            rows.append(f"| {name} | {dp} x {tp} | {desc} | {total / 1024:.0f} KiB | {per} |")
            print(rows[-1], flush=True)
    print(f"\njax {jax.__version__}, {len(jax.devices())} virtual CPU devices, engine decode step at batch 16, "
          "unrolled layers\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
