"""Benchmark: Sparkler's engine beside transformers' `generate` on the same model and precision, in one run.

Prints a markdown table (ratios included) and writes it to docs/PERFORMANCE.md. Not a test: numbers are noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


NOTES = "## Notes"


def engine_numbers(model, slots: int, new_tokens: int) -> dict:
    """Single stream, TTFT at 32 and 512 prompt tokens, aggregate at 1/8/32 concurrent, sampler share."""
    from engine import Engine, RunnerConfig, SamplingParams
    from engine import sampler as smp

    eng = Engine(model, RunnerConfig(max_num_seqs=slots, max_model_len=1024))
    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size

    def run(n_req: int, prompt_len: int, max_tokens: int, settings: dict | None = None) -> float:
        reqs = [eng.make_request(rng.integers(100, vocab - 100, prompt_len).tolist(),
                                 SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i, **(settings or {
                                     "temperature": 0}))) for i in range(n_req)]
        for r in reqs:
            eng.add(r)
        t = time.perf_counter()
        while eng.has_work():
            eng.step()
        return time.perf_counter() - t

    out = {}
    for n in (1, 8, 32):  # warm every bucket first
        run(n, 32, 16)
    run(1, 512, 2)
    dt1 = run(1, 32, new_tokens)
    out["single"] = new_tokens / dt1
    for plen in (32, 512):
        ts = []
        pages = eng.sched.pools[0].allocate(plen // eng.page_size)
        row = np.zeros(eng.runner.max_pages, np.int32)
        row[:len(pages)] = pages
        for _ in range(3):
            t = time.perf_counter()
            eng.runner.prefill(0, row, rng.integers(100, 1000, plen).tolist())
            jax.block_until_ready(eng.runner.last_logits)
            ts.append(time.perf_counter() - t)
        eng.sched.pools[0].release(pages)
        out[f"ttft{plen}"] = min(ts)
    for n in (1, 8, 32):
        out[f"agg{n}"] = n * new_tokens / run(n, 32, new_tokens)
    b = 32
    hp = smp.neutral_params(b, vocab)
    hp.update(temperature=np.full(b, 0.8, np.float32), top_k=np.full(b, 40, np.int32),
              top_p=np.full(b, 0.9, np.float32),
              min_p=np.full(b, 0.02, np.float32), typical_p=np.full(b, 0.95, np.float32),
              repetition_penalty=np.full(b, 1.1, np.float32), frequency_penalty=np.full(b, 0.2, np.float32),
              presence_penalty=np.full(b, 0.2, np.float32))
    p = smp.SamplerParams(**{k: jnp.asarray(v) for k, v in hp.items()})
    s = smp.init_state(b, vocab)
    logits = jax.random.normal(jax.random.key(0), (b, vocab)) * 3
    f = jax.jit(smp.sample)
    jax.block_until_ready(f(logits, p, s, jnp.ones(b, bool)))
    t = time.perf_counter()
    for _ in range(10):
        jax.block_until_ready(f(logits, p, s, jnp.ones(b, bool)))
    out["sampler_ms"] = (time.perf_counter() - t) / 10 * 1000
    step_s = 1 / out["agg32"] * 32
    out["sampler_share"] = out["sampler_ms"] / 1000 / step_s
    return out


def hf_numbers(path: str, new_tokens: int) -> dict:
    """transformers' greedy generate, float32, at batch 1 and 8."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 2)
    if os.path.isdir(path):  # an HF folder
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        folder, name = os.path.dirname(path), os.path.basename(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    out = {}
    for b in (1, 8):
        ids = torch.randint(100, 1000, (b, 32))
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))
            t = time.perf_counter()
            model.generate(ids, **kw)
        out[f"b{b}"] = b * new_tokens / (time.perf_counter() - t)
    return out


# Small mixtures of experts with random weights and the default model's vocabulary size, tied embeddings: a
# Qwen3-MoE shape (Qwen3-30B-A3B's routing, 32 experts, top 4, shrunk: 8 layers, hidden 512, experts 256 wide; ~140M
# parameters, ~40M active per token) and a DeepSeek-V2 one (V2-Lite's: latent attention, a dense first layer then
# MoE ones with a shared expert, scanned in two groups; the same widths).
MOE_SHAPES = {
    "Qwen3-MoE": ("qwen3-moe-small", "Qwen3MoeConfig", dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=32, norm_topk_prob=True)),
    "DeepSeek-V2": ("deepseek-v2-small", "DeepseekV2Config", dict(
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=128, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64)),
}


def moe_folder(path: str, kind: str) -> str:
    """A `MOE_SHAPES[kind]` HF folder with random float32 weights at `path` (written once)."""
    import torch
    import transformers

    if not os.path.exists(os.path.join(path, "config.json")):
        _, config, extra = MOE_SHAPES[kind]
        cfg = getattr(transformers, config)(vocab_size=49152, hidden_size=512, intermediate_size=1536,
                                            num_hidden_layers=8, num_experts_per_tok=4, moe_intermediate_size=256,
                                            max_position_embeddings=2048, tie_word_embeddings=True, **extra)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)
    return path


def moe_rows(new_tokens: int) -> list[tuple]:
    """The MoE rows: the engine beside transformers' generate on the same small folder, for each shape."""
    from models import load_model
    from models.loading.source import cache_root

    rows = []
    for kind, (folder, _, _) in MOE_SHAPES.items():
        path = moe_folder(os.path.join(cache_root(), "bench", folder), kind)
        hf = hf_numbers(path, new_tokens)
        e = engine_numbers(load_model(path, with_tokenizer=False), 32, new_tokens)
        name = f"MoE (small {kind})"
        rows += [(f"{name}: single-stream decode (tok/s)", f"{e['single']:.1f}", f"{hf['b1']:.1f}",
                  f"{e['single'] / hf['b1']:.2f}x", ""),
                 (f"{name}: aggregate, 8 concurrent (tok/s)", f"{e['agg8']:.1f}", f"{hf['b8']:.1f} (batch 8)",
                  f"{e['agg8'] / hf['b8']:.2f}x", ""),
                 (f"{name}: aggregate, 32 concurrent (tok/s)", f"{e['agg32']:.1f}", "", "", "")]
    return rows


def main() -> None:
    """Run both sides and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--moe-only", action="store_true", help="print the MoE rows alone (docs are not rewritten)")
    args = ap.parse_args()
    import torch  # noqa: F401  (the reference side; imported before transformers)

    from models import load_model
    from models.loading.packaged import resolve

    if args.moe_only:
        print("\n".join("| " + " | ".join(r) + " |" for r in moe_rows(args.tokens)))
        return
    hf = hf_numbers(resolve(args.model), args.tokens)
    e = engine_numbers(load_model(args.model), 32, args.tokens)
    quantized = {kind: engine_numbers(load_model(args.model, quantization=kind), 32, args.tokens)
                 for kind in ("int8", "int4")}
    rows = [
        ("single-stream decode (tok/s)", f"{e['single']:.1f}", f"{hf['b1']:.1f}", f"{e['single'] / hf['b1']:.2f}x",
         ">= 0.95x"),
        ("aggregate, 8 concurrent (tok/s)", f"{e['agg8']:.1f}", f"{hf['b8']:.1f} (batch 8)",
         f"{e['agg8'] / hf['b8']:.2f}x", ""),
        ("aggregate, 32 concurrent (tok/s)", f"{e['agg32']:.1f}", f"{hf['b1']:.1f} (single)",
         f"{e['agg32'] / hf['b1']:.2f}x", ">= 10x"),
        ("aggregate, 1 concurrent (tok/s)", f"{e['agg1']:.1f}", "", "", ""),
        *[row for kind, q in quantized.items() for row in [
            (f"{kind} weights: single-stream decode (tok/s)", f"{q['single']:.1f}", f"{hf['b1']:.1f}",
             f"{q['single'] / hf['b1']:.2f}x", ""),
            (f"{kind} weights: aggregate, 32 concurrent (tok/s)", f"{q['agg32']:.1f}", "",
             f"{q['agg32'] / e['agg32']:.2f}x float32", "")]],
        ("TTFT, 32-token prompt (ms)", f"{e['ttft32'] * 1000:.0f}", "", "", ""),
        ("TTFT, 512-token prompt (ms)", f"{e['ttft512'] * 1000:.0f}", "", "", ""),
        ("sampler, batch 32, all transforms (ms)", f"{e['sampler_ms']:.1f}", "",
         f"{e['sampler_share'] * 100:.0f}% of a step", "<= 15%"),
        *moe_rows(args.tokens),
    ]
    lines = ["| metric | sparkler | transformers | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}"
    head = (f"Latest `make bench` ({args.model}, float32, greedy, {args.tokens} new tokens; "
            f"{time.strftime('%Y-%m-%d')}; {machine}).\n\n{table}\n\nThe int8 and int4 rows are the same engine "
            "with `--quantization int8` (a quarter of float32's bytes plus one scale per 32\nweights) and `int4` "
            "(Q4_1: an eighth, plus a float16 scale and minimum per 32); on a CPU with AVX2 their\nproducts run in the "
            "C++ kernel (`--matmul-backend auto`). Their last ratio is against the float32 row of the same run.\n")
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "PERFORMANCE.md")
    old = open(path).read() if os.path.exists(path) else ""
    rest = old[old.index("\n## ") + 1:] if "\n## " in old else NOTES + "\n"
    with open(path, "w") as f:  # the top table is rewritten; every section below it is kept
        f.write(f"# Performance\n\n{head}\n{rest}")


if __name__ == "__main__":
    main()
