"""GPU benchmark: Sparkler's engine on a Llama-3.1-8B-shaped model (random bfloat16 weights) beside transformers'
`generate` on the same config and weights, in one run; prints a markdown table. `--shape` picks another model's
shape: the mixtures of experts `deepseek-v2-lite` (15.7B, MLA, 64 experts, ~31 GB), `qwen3-30b-a3b` (30.5B, 128
experts, ~61 GB: an H200, or `--layers` fewer on an H100) and `gpt-oss-20b` (dense bfloat16 experts, ~42 GB); their
roofline counts the bytes a single-stream step reads, the routed experts' at `k / E` of their total.

Runs with the host's preinstalled JAX, Flax and PyTorch and no network (`PYTHONPATH=. python3 bench/gpu.py`, or
`make bench-gpu`). `--smoke` shrinks everything so the whole script runs in a minute on a CPU.

Figures: single-stream decode tokens/s and its share of the HBM roofline (weight bytes read per step over the step
time, against the device-to-device copy bandwidth measured here); aggregate tokens/s at several concurrencies
(512-token prompts, 256 new tokens, every request submitted at once; generated tokens over wall time, prefill
included); time to first token at 512 and 2,048 prompt tokens; transformers at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # leave room for the PyTorch side
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import models  # noqa: E402,F401  (sets Sparkler's XLA flags before any backend starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models.layers.causal_lm import layer_groups  # noqa: E402

LLAMA_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
SMOKE = dict(LLAMA_8B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
DEEPSEEK_V2_LITE = dict(architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048,
                        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
                        num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0,
                        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                        max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                             mscale=0.707, mscale_all_dim=0.707, beta_fast=32.0, beta_slow=1.0,
                                             rope_theta=10000.0))
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
                     intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False)
GPT_OSS_20B = dict(architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                   num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   num_local_experts=32, num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True,
                   rope_parameters=dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096,
                                        beta_fast=32.0, beta_slow=1.0, truncate=False, rope_theta=150000.0))
SHAPES = {"llama-3.1-8b": LLAMA_8B, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "qwen3-30b-a3b": QWEN3_30B_A3B,
          "gpt-oss-20b": GPT_OSS_20B}
# --smoke: each shape shrunk to run in a minute on a CPU (the same families and routing, tiny widths)
SHRINK = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
SMOKE_MOE = {"deepseek-v2-lite": dict(num_key_value_heads=4, moe_intermediate_size=64, n_routed_experts=8,
                                      num_experts_per_tok=2, kv_lora_rank=32, qk_nope_head_dim=16,
                                      qk_rope_head_dim=16, v_head_dim=16),
             "qwen3-30b-a3b": dict(head_dim=32, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2),
             "gpt-oss-20b": dict(head_dim=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                                 sliding_window=16)}


def random_model(hf_config: dict, dtype: str, attention: str, scan: bool = True, quantization: str = "none"):
    """A `Model` of the config's shape with random weights (no tokenizer: the engine works in token ids)."""
    import dataclasses

    from models import ModelConfig, Model, build, init_params
    from models.sharding import make_mesh

    cfg = dataclasses.replace(ModelConfig.from_hf(hf_config, dtype), quantization=quantization)
    module = build(cfg, attention, scan)
    params = (random_params(module) if quantization == "none" and cfg.num_experts
              else init_params(module, 0, make_mesh(1, jax.devices()[:1])))
    return Model("random-" + hf_config["architectures"][0], cfg, module, params, make_mesh(1, jax.devices()[:1]),
                 None, {}, (), "random")


def random_params(module):
    """Random parameters of `module`'s shapes on the default device, made leaf by leaf (one small program per
    distinct shape and dtype; norms are ones): a mixture's unscanned layers made `init_params`' single program take
    124 s for deepseek-v2-lite on an H200. Speed does not depend on the values."""
    import functools

    from models import abstract_params

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def fill(key, shape, dtype, ones):
        return jnp.ones(shape, dtype) if ones else (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

    boxed = abstract_params(module)
    leaves, tree = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, boxed, is_leaf=lambda x: hasattr(x, "unbox")))
    key = jax.random.key(0)
    made = [fill(jax.random.fold_in(key, i), tuple(x.shape), x.dtype, "norm" in jax.tree_util.keystr(path))
            for i, (path, x) in enumerate(leaves)]
    return jax.tree.unflatten(tree, made)


def copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second; the best of a float32 and a bfloat16
    elementwise pass over `nbytes`)."""
    best = 0.0
    for dt in (jnp.float32, jnp.bfloat16):
        x = jnp.ones((nbytes // jnp.dtype(dt).itemsize,), dt)
        f = jax.jit(lambda a: a * jnp.asarray(2, a.dtype))
        best = max(best, 2 * x.nbytes / timed(f, x))
        del x
    return best


def timed(f, *args, reps: int = 5) -> float:
    """Best wall time of `f(*args)` over `reps` runs after one warm-up (compile) run."""
    jax.block_until_ready(f(*args))
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def diagnose(args) -> None:
    """Where a decode step's time goes: the forward pass alone (scanned and unrolled layers), the sampler alone,
    and the runner's multi-step decode, at batch 1 and the largest concurrency."""
    from engine import RunnerConfig
    from engine import sampler as smp
    from engine.runner import Runner

    top, steps = max(args.concurrency), args.decode_steps
    kinds = (args.quantization, "none") if args.quantization != "none" else ("none",)  # the baseline after it
    for scan, kind in [(scan, kind) for scan in ((True,) if args.scan_only else (True, False)) for kind in kinds]:
        model = random_model(args.hf_config, "bfloat16", args.attention_backend, scan, kind)
        print(f"  {kind} weights: {param_bytes(model.params, model.cfg) / 1e9:.3f} GB read a step", flush=True)
        runner = Runner(model, RunnerConfig(max_num_seqs=top, max_model_len=1024, kv_cache_gb=args.kv_gb / 2,
                                            decode_steps=steps))
        per = 40
        tables = (1 + np.arange(top * per, dtype=np.int32) % (runner.num_pages - 1)).reshape(top, per)
        tables = np.pad(tables, ((0, 0), (0, runner.max_pages - per)))
        fwd = jax.jit(lambda p, c, t, pos, tab: model.module.apply(p, t, pos, tab, c),  # noqa: F821  (the del below)
                      donate_argnums=(1,))
        for nb in (1, top):
            pos = np.full((nb, 1), 600, np.int32)
            tab = jnp.asarray(tables[:nb, :64])
            inputs = (jnp.zeros((nb, 1), jnp.int32), pos, tab)
            t = time.perf_counter()
            step = fwd.lower(model.params, runner.cache, *inputs).compile()  # compiled once: its text is read below
            logits, runner.cache = step(model.params, runner.cache, *inputs)
            jax.block_until_ready(logits)
            first = time.perf_counter() - t
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                logits, runner.cache = step(model.params, runner.cache, *inputs)
                jax.block_until_ready(logits)
                best = min(best, time.perf_counter() - t)
            print(f"  scan={scan} {kind} batch {nb}: forward {best * 1000:.2f} ms (first call {first:.1f} s)",
                  flush=True)
            if kind == "fp8" and nb == top:  # did the card's compiler keep the float8 products, or widen them?
                text = step.as_text()
                found = sorted({m for m in ("cublas$lt$matmul$f8", "__cublas$lt$matmul", "triton_gemm", "f8e4m3fn")
                                if m in text})
                print(f"  fp8 program: {', '.join(found) or 'no float8 left'}", flush=True)
            if scan:
                active = np.ones(nb, bool)
                run = lambda: runner.decode(  # noqa: E731, F821  (the del below)
                    np.zeros(nb, np.int32), np.full(nb, 600, np.int32), active, tables[:nb], steps).result()
                t = time.perf_counter()
                run()
                first = time.perf_counter() - t
                t = time.perf_counter()
                for _ in range(3):
                    run()
                per_step = (time.perf_counter() - t) / 3 / steps
                print(f"  scan={scan} {kind} batch {nb}: runner.decode {per_step * 1000:.2f} ms per step "
                      f"(first call {first:.1f} s)", flush=True)
                vocab = model.cfg.vocab_size
                sp = smp.SamplerParams(**{k: jnp.asarray(v) for k, v in smp.neutral_params(nb, vocab).items()})
                st = smp.init_state(nb, vocab)
                lg = jax.random.normal(jax.random.key(0), (nb, vocab))
                f = jax.jit(smp.sample)
                print(f"  batch {nb}: sampler {timed(f, lg, sp, st, jnp.ones(nb, bool)) * 1000:.2f} ms", flush=True)
        if scan:  # a prefill's forward pass: 8 prompts (fewer when the top is smaller) of the load's length
            n, plen = min(8, top), min(args.prompt, 64 * runner.page_size)
            pos = np.broadcast_to(np.arange(plen, dtype=np.int32), (n, plen))
            tab = jnp.asarray(tables[:n, :64])
            best = 1e9
            for _ in range(4):
                t = time.perf_counter()
                logits, runner.cache = fwd(model.params, runner.cache, jnp.zeros((n, plen), jnp.int32), pos, tab)
                jax.block_until_ready(logits)
                best = min(best, time.perf_counter() - t)
            print(f"  scan={scan} {kind} prefill {n} x {plen}: forward {best * 1000:.2f} ms "
                  f"({n * plen / best:.0f} tok/s)", flush=True)
        del runner, model, fwd


def param_bytes(params, cfg=None, skip: tuple[str, ...] = ("embed", "embed_rows"), elements: bool = False) -> int:
    """Bytes of the parameters one single-stream decode step reads (the embedding table is only gathered from; a
    mixture's routed experts count `k / E` of theirs, the share one token's route reads); `elements`: their count."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", None) for k in path]
        if not any(k in skip for k in keys):
            share = cfg.experts_per_token / cfg.num_experts if cfg is not None and "experts" in keys else 1
            total += leaf.size * (1 if elements else leaf.dtype.itemsize) * share
    return int(total)


def engine_round(eng, rng, n: int, prompt: int, new: int, sampling: dict | None = None) -> float:
    """Seconds for `n` requests of random `prompt`-token prompts (no prefix cache) and `new` tokens each (greedy,
    unless `sampling` sets otherwise), all added at once, through `eng`."""
    from engine import SamplingParams

    vocab = eng.model.cfg.vocab_size
    settings = {"temperature": 0.0, **(sampling or {}), "max_tokens": new, "ignore_eos": True}
    reqs = [eng.make_request(rng.integers(10, vocab - 10, prompt).tolist(), SamplingParams(**settings),
                             prompt_cache_max_len=0)
            for _ in range(n)]
    t = time.perf_counter()
    for r in reqs:
        eng.add(r)
    while eng.has_work():
        eng.step()
    assert all(len(r.choices[0].token_ids) == new for r in reqs)
    return time.perf_counter() - t


def engine_numbers(model, args) -> dict:
    """Start-up, single stream, aggregate at each concurrency, TTFT."""
    from engine import Engine, RunnerConfig

    t0 = time.perf_counter()
    top = max(args.concurrency)
    rc = RunnerConfig(max_num_seqs=top, max_model_len=args.max_len, kv_cache_gb=args.kv_gb, page_size=args.page_size,
                      decode_steps=args.decode_steps, max_prefill_tokens=args.max_prefill_tokens)
    eng = Engine(model, rc)
    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size

    def run(n: int, prompt: int, new: int) -> float:
        return engine_round(eng, rng, n, prompt, new)  # noqa: F821  (the del below)

    out = {}
    for n in args.concurrency:  # compile every shape the timed runs use
        t = time.perf_counter()
        run(n, args.prompt, args.new)
        print(f"  warm-up at {n} concurrent: {time.perf_counter() - t:.1f} s, {eng.runner.compiles} compiles",
              flush=True)
    out["ready_s"] = time.perf_counter() - t0
    t1 = min(run(1, args.prompt, 1) for _ in range(3))
    tn = run(1, args.prompt, args.new)
    out["single"] = (args.new - 1) / (tn - t1)
    out["step_s"] = 1 / out["single"]
    for n in args.concurrency:
        out[f"agg{n}"] = n * args.new / run(n, args.prompt, args.new)
        print(f"  {n} concurrent: {out[f'agg{n}']:.0f} tok/s", flush=True)
    for plen in args.ttft:
        pages = eng.sched.pools[0].allocate(-(-plen // eng.page_size))
        row = np.zeros(eng.runner.max_pages, np.int32)
        row[:len(pages)] = pages
        ts = []
        for _ in range(3):
            toks = rng.integers(10, vocab - 10, plen).tolist()
            t = time.perf_counter()
            eng.runner.prefill(0, row, toks)
            jax.block_until_ready(eng.runner.last_logits)
            ts.append(time.perf_counter() - t)
        eng.sched.pools[0].release(pages)
        out[f"ttft{plen}"] = min(ts)
    out["compiles"] = eng.runner.compiles
    del eng
    return out


def hf_numbers(model, args) -> dict:
    """transformers' greedy `generate` (bfloat16, static cache) on the same config and weights."""
    import torch
    import transformers

    arch = args.hf_config["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = config_cls(**{k: v for k, v in args.hf_config.items() if k != "architectures"})
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        ref = getattr(transformers, arch)(cfg).to(torch.bfloat16).eval()
    ours = flat_params(model.params["params"])
    groups = layer_groups(model.cfg, model.module.scan)

    def ours_at(key: str, layer: int):
        if key not in ours:  # scanned layers: one stacked array per parameter and group
            start, _, name = next(g for g in groups if g[0] <= layer < g[1])
            return ours[key.replace(f"layers_{layer}/", f"{name}/")][layer - start]
        return ours[key]

    with torch.no_grad():
        for name, p in ref.named_parameters():
            key, layer = hf_name(name)
            p.copy_(to_torch(expert_tensor(key, layer, ours_at, arch == "GptOssForCausalLM"), p.device))
    out = {}
    for b in args.hf_batches:
        ids = torch.randint(10, cfg.vocab_size - 10, (b, args.prompt), device=ref.device)
        kw = dict(do_sample=False, pad_token_id=0, cache_implementation="static")
        with torch.no_grad():  # warm-up with the timed shapes (a static cache compiles per shape)
            ref.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
            if ref.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            ref.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
            if ref.device.type == "cuda":
                torch.cuda.synchronize()
        out[f"b{b}"] = b * args.new / (time.perf_counter() - t)
        print(f"  transformers batch {b}: {out[f'b{b}']:.0f} tok/s", flush=True)
    return out


def flat_params(tree, prefix: str = "") -> dict:
    """`{"layers_0/self_attn/q_proj/weight": array}` from a nested parameter dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def expert_tensor(key: str, layer: int, ours_at, gpt_oss: bool):
    """Our parameter `key` of `layer`, or what transformers' fused experts hold of ours: `gate_up_proj` (gate then
    up, `[E, 2I, H]`; gpt-oss's interleaved and inputs first, `[E, H, 2I]`), `down_proj` (gpt-oss's `[E, I, H]`)
    and gpt-oss's biases."""
    base = key.rsplit("/", 1)[0]
    if key.endswith("experts/gate_up_proj"):
        gate, up = ours_at(f"{base}/gate_proj/weight", layer), ours_at(f"{base}/up_proj/weight", layer)
        if gpt_oss:
            return jnp.stack([gate, up], axis=2).reshape(gate.shape[0], -1, gate.shape[2]).swapaxes(1, 2)
        return jnp.concatenate([gate, up], axis=1)
    if key.endswith("experts/gate_up_proj_bias"):
        gate, up = ours_at(f"{base}/gate_proj_bias", layer), ours_at(f"{base}/up_proj_bias", layer)
        return jnp.stack([gate, up], axis=2).reshape(gate.shape[0], -1)
    if key.endswith("experts/down_proj"):
        down = ours_at(f"{base}/down_proj/weight", layer)
        return down.swapaxes(1, 2) if gpt_oss else down
    return ours_at(key, layer)


def hf_name(name: str) -> tuple[str, int]:
    """transformers' parameter name -> ours and the layer (`model.layers.3.mlp.up_proj.weight` ->
    `("layers_3/mlp/up_proj/weight", 3)`; -1 outside the layers). Routers are our `gate`, shared experts our
    `shared_expert`."""
    name = name.removeprefix("model.").replace("mlp.router.", "mlp.gate.").replace(".shared_experts.",
                                                                                ".shared_expert.")
    if name == "embed_tokens.weight":
        return "embed", -1
    parts = name.split(".")
    if parts[0] == "layers":
        return "/".join([f"layers_{parts[1]}", *parts[2:]]), int(parts[1])
    return "/".join(parts), -1


def to_torch(x, device):
    """A JAX array as a torch tensor on `device` (through DLPack where the device allows, else through the host)."""
    import torch

    try:
        return torch.from_dlpack(x).to(device)
    except Exception:  # noqa: BLE001  (a backend without DLPack for this dtype)
        host = np.asarray(x)
        return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).to(device)


def main() -> None:
    """Measure both sides and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny config and sizes: checks the script end to end")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--diagnose", action="store_true", help="time the forward pass, sampler and decode loop apart")
    ap.add_argument("--scan-only", action="store_true", help="--diagnose: scanned layers only")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-prefill-tokens", type=int, default=16384)
    ap.add_argument("--quantization", default="none", choices=("none", "int8", "fp8"),
                    help="int8: int8 weights with 32-input group scales; fp8: float8 weights and products (no "
                         "transformers side; --diagnose measures bfloat16 weights beside them)")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=tuple(SHAPES), help="the model shape measured")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the shape's (to fit the card)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.0, help="the KV pool (0: 30 GB for the 8B, 8 for MoE)")
    args = ap.parse_args()
    args.no_transformers |= args.quantization != "none"
    if args.smoke:
        args.hf_config = SMOKE if args.shape == "llama-3.1-8b" else {**SHAPES[args.shape], **SHRINK,
                                                                    **SMOKE_MOE[args.shape]}
        args.concurrency, args.prompt, args.new, args.ttft = (1, 4), 64, 16, (64, 256)
        args.hf_batches, args.max_len, args.kv_gb, args.copy_bytes = (1, 4), 512, 0.05, 1 << 26
    else:
        args.hf_config, args.concurrency, args.prompt, args.new, args.ttft = SHAPES[args.shape], (1, 16, 64, 256), \
            512, 256, (512, 2048)
        args.hf_batches, args.max_len, args.copy_bytes = (1, 64), 2560, 4 << 30
        args.kv_gb = args.kv_cache_gb or (30.0 if args.shape == "llama-3.1-8b" else 8.0)
    if args.layers:
        args.hf_config = {**args.hf_config, "num_hidden_layers": args.layers}
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.platform}: {getattr(dev, 'device_kind', dev)}", flush=True)
    bw = copy_bandwidth(args.copy_bytes)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    if args.diagnose:
        return diagnose(args)
    t = time.perf_counter()
    model = random_model(args.hf_config, "bfloat16", args.attention_backend, quantization=args.quantization)
    print(f"random weights: {time.perf_counter() - t:.1f} s, backend {model.module.backend}, "
          f"scan {model.module.scan}", flush=True)
    weights = param_bytes(model.params, model.cfg)
    e = engine_numbers(model, args)
    hf = {} if args.no_transformers else hf_numbers(model, args)
    roof = weights / e["step_s"] / bw
    top = max(args.concurrency)
    rows = [("single-stream decode (tok/s)", f"{e['single']:.1f}", f"{hf.get('b1', 0):.1f}",
             f"{e['single'] / hf['b1']:.2f}x" if hf else "", ""),
            ("single stream: share of HBM roofline", f"{roof * 100:.0f}%", "", "", ">= 70%")]
    for n in args.concurrency:
        h = hf.get(f"b{n}")
        rows.append((f"aggregate, {n} concurrent (tok/s)", f"{e[f'agg{n}']:.0f}", f"{h:.0f}" if h else "",
                     f"{e[f'agg{n}'] / h:.2f}x" if h else "", ">= 5000" if n == top == 256 else ""))
    for plen in args.ttft:
        rows.append((f"TTFT, {plen}-token prompt (ms)", f"{e[f'ttft{plen}'] * 1000:.0f}", "", "", ""))
    rows.append(("engine ready: every shape compiled (s)", f"{e['ready_s']:.0f}", "", "", ""))
    lines = ["| metric | sparkler | transformers | ratio | target |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    layers = f", {args.layers} layers" if args.layers else ""
    print(f"\n{'smoke config of the ' if args.smoke else ''}{args.shape} shape{layers}, bfloat16"
          f"{f', {args.quantization} weights' if args.quantization != 'none' else ''}, random weights; "
          f"weights read per step {weights / 1e9:.2f} GB; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"{e['compiles']} compiles; decode steps per dispatch {args.decode_steps}, page size {args.page_size}\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
