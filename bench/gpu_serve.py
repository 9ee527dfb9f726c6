"""GPU serving benchmark (issue 21): `python -m server` on a Llama-3.1-8B-shaped HF folder of random bfloat16 weights
with the packaged model's tokenizer, through HTTP, beside the engine alone on the same folder, in one run; prints one
markdown table with the card and versions.

What it does, in order (partial results are written to `--out` as it goes, so a timeout still leaves them):
1. writes the folder (`config.json`, safetensors shards, the tokenizer files of `--tokenizer`);
2. starts the server cold (an empty `$SPARKLER_CACHE`) and times until it answers; stops it;
3. starts it warm (the same cache) and times that; waits for its background compilation, then drives streaming
   `/v1/completions` with token-id prompts (512 tokens, each request's own, so no prefix is shared) and 256 new
   tokens (`ignore_eos`, greedy) at 1, 64 and 256 concurrent, every request sent at once: output tokens over wall
   time, and the time to first token (p50 / max) at each level; a short round at each level first compiles
   whatever the load reaches;
4. runs the engine alone (`engine.LLM`, the server's flags and warm-up) on the same folder: first the card's own
   matmul rate and copy bandwidth, and from them each level's tok/s at the card's pace and the first token's floor
   (`floors`, a roofline: the figures above as a share of what the card allows), then the same levels, then
   the top level once more under `jax.profiler` (`bench/device_idle.py`): the share of the wall time in which the
   devices ran a program, and the longest gaps between programs, with what ran on either side.

On the GPU host (no network, no venv): prepare the tokenizer files on the CPU side first, where the packaged GGUF is
(`python bench/gpu_serve.py --write-tokenizer .gpu_tok`), carry that folder, and run
`PYTHONPATH=. python3 bench/gpu_serve.py --tokenizer .gpu_tok --out $OUT` (`make bench-gpu-serve`). `--smoke` shrinks
the model and the load so the whole script runs on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_idle import summary, traced  # noqa: E402
from serve import ROOT, stop, wait_ready, wait_warm  # noqa: E402

sys.path.insert(0, ROOT)
from server import bench_serve  # noqa: E402  (the load's requests, as `sparkler bench serve` sends them)

VOCAB = 49152  # SmolLM2's tokenizer: text round-trips through the random model
LLAMA_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=4096,
                intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
SMOKE = dict(LLAMA_8B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
NAME = "llama-8b-random"


def write_tokenizer(to: str) -> None:
    """The packaged default model's tokenizer files, normalized, into `to` (run where the GGUF is)."""
    from models import load_model
    from models.loading.tokenizer import FILES

    folder = load_model("smollm2-135m-instruct").tokenizer.folder
    os.makedirs(to, exist_ok=True)
    for name in FILES:
        if os.path.exists(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), os.path.join(to, name))


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama HF checkpoint of `cfg`'s shape, by name."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                    p + "mlp.down_proj.weight": (h, inter)})
    return out


def write_folder(path: str, cfg: dict, tokenizer: str, shard_gb: float = 2.0) -> float:
    """An HF folder of `cfg` with random bfloat16 weights (slices of one random pool: speed does not depend on the
    values) and the tokenizer files; its weight bytes."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 26, generator=gen) * 0.02).to(torch.bfloat16)
    shards, shard, size, total, offset = [], {}, 0, 0, 0
    for name, shape in tensor_shapes(cfg).items():
        n = math.prod(shape)
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            reps = -(-n // pool.numel())
            t = (pool.repeat(reps)[:n] if reps > 1 else pool[offset % (pool.numel() - n + 1):][:n]).clone()
            t = t.view(shape)
        offset += 7919
        shard[name] = t
        size += 2 * n
        total += 2 * n
        if size >= shard_gb * 1e9:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    index = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        index.update({k: fname for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), os.path.join(path, name))
    return total


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    """`n` token-id prompts of `length` tokens, each its own from its first token (no shared prefix)."""
    return bench_serve.prompts(n, length, seed, 100, VOCAB - 100)


async def one(session, url: str, prompt: list[int], tokens: int) -> tuple[float, float, int]:
    """One streamed completion (`sparkler bench serve`'s request): (seconds to first token, seconds to the end,
    completion tokens)."""
    r = await bench_serve.request(session, url, "completions", bench_serve.body("completions", NAME, prompt, tokens))
    if r.error is not None:
        raise RuntimeError(f"a request failed: {r.error}")
    return r.ttft, r.latency, r.output_tokens


async def counters(session, url: str) -> dict[str, float]:
    """The engine's counters from `/metrics` (time in device calls, decodes ahead, steps, each part of the engine's
    step as `step_<phase>`, and the CPU time of the engine and event-loop threads as `cpu_<thread>`), read with
    prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    wanted = {f"sparkler_{name}_total": name for name in ("device_call_seconds", "decodes_ahead", "steps")}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out[wanted[s.name]] = s.value
            elif s.name == "sparkler_engine_step_seconds_total":
                out["step_" + s.labels["phase"]] = s.value
            elif s.name == "sparkler_thread_cpu_seconds_total":
                out["cpu_" + s.labels["thread"]] = s.value
    return out


async def load(url: str, levels: list[int], length: int, tokens: int, warm_tokens: int) -> dict:
    """Every level's tok/s and first-token times, after a short round at each level."""
    import aiohttp

    out = {}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        for n in levels:
            await asyncio.gather(*(one(s, url, p, warm_tokens) for p in prompts(n, length, 1000 + n)))
        for n in levels:
            before = await counters(s, url)
            t = time.perf_counter()
            res = await asyncio.gather(*(one(s, url, p, tokens) for p in prompts(n, length, n)))
            wall = time.perf_counter() - t
            after = await counters(s, url)
            ttft = sorted(r[0] for r in res)
            out[n] = dict(tok_s=sum(r[2] for r in res) / wall, ttft_p50=statistics.median(ttft), ttft_max=ttft[-1],
                          tokens=sum(r[2] for r in res), wall=wall,
                          **{k: after.get(k, 0) - before.get(k, 0) for k in after})
            print(f"  http, {n} concurrent: {out[n]}", flush=True)
    return out


def server_flags(folder: str, args) -> list[str]:
    """The server's flags for the folder, which the engine alone is built from too."""
    return ["--model", folder, "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-gb", str(args.kv_cache_gb),
            "--max-model-len", str(args.max_model_len), *args.server_args.split()]


def server(folder: str, cache: str, args, port: int, log: str):
    """Start `python -m server` on the folder; (process, seconds until it answered)."""
    cmd = [sys.executable, "-m", "server", *server_flags(folder, args), "--served-name", NAME, "--port", str(port)]
    env = dict(os.environ, SPARKLER_CACHE=cache, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, limit=args.ready_limit)
    except BaseException:
        stop(proc)
        print(open(log).read()[-3000:], flush=True)
        raise
    return proc, time.perf_counter() - t


def engine_alone(folder: str, cache: str, args, levels: list[int]) -> dict:
    """The engine in this process on the folder, with the server's flags: tok/s per level."""
    import dataclasses

    os.environ["SPARKLER_CACHE"] = cache
    from engine import LLM, SamplingParams
    from engine.compile import use_caches
    from models.loading.source import cache_root
    from server.__main__ import load as load_flags, parse_args, runner_config

    use_caches(cache_root())
    flags = parse_args(server_flags(folder, args))
    llm = LLM(load_flags(flags), **dataclasses.asdict(runner_config(flags)))
    llm.engine.warmup()  # the server's shapes, all loaded before measuring (from the store the server filled): left
    # to load on first use, they stalled the first levels (session 27: one stream at half the server's rate)
    try:
        out = {"floors": floors(llm.engine.model, args, levels)}
    except Exception as e:  # the card's own measures are extras: an OOM here must not lose the engine's
        out = {"floors_error": f"{type(e).__name__}: {e}"[:300]}
    print(f"  the card's floors: {out.get('floors', out.get('floors_error'))}", flush=True)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=args.warm_tokens, ignore_eos=True)
    for n in levels:
        llm.generate(prompts(n, args.prompt, 1000 + n), warm)
        waited, ahead, t = llm.engine.runner.device_seconds(), llm.engine.ahead, time.perf_counter()
        res = llm.generate(prompts(n, args.prompt, n), params)
        wall = time.perf_counter() - t
        out[n] = dict(tok_s=sum(len(r.outputs[0].token_ids) for r in res) / wall, wall=wall,
                      device_call_seconds=llm.engine.runner.device_seconds() - waited,
                      decodes_ahead=llm.engine.ahead - ahead)
        print(f"  engine alone, {n} concurrent: {out[n]}", flush=True)
    out["structured"] = structured(llm.engine, args, sorted(levels)[len(levels) // 2], params)
    print(f"  engine alone, structured output: {out['structured']}", flush=True)
    top = max(levels)  # the top level once more under the profiler: what the devices did between programs
    t = time.perf_counter()
    res, fig = traced(lambda: llm.generate(prompts(top, args.prompt, top + 1), params), os.path.join(args.out, "trace"))
    out["trace"] = dict(fig, level=top, tok_s=sum(len(r.outputs[0].token_ids) for r in res) / fig["wall_s"],
                        read_s=time.perf_counter() - t - fig["wall_s"])
    print(f"  engine alone, {top} concurrent, traced: {summary(fig)}", flush=True)
    return out


def floors(model, args, levels: list[int]) -> dict:
    """What the card allows this load, from its matmul rate and copy bandwidth measured here (a roofline): a prompt
    token's FLOPs (2 a weight of the layers' matrices, and attention over half the prompt on average) at the rate of
    one bfloat16 product of the MLP's shape over 8,192 tokens; a decode step's bytes (every weight but the
    embedding, and each row's K/V) at the copy bandwidth. Per level: the first token's p50 if the prompts are
    prefilled one after another at that rate (every order of equal prompts gives the same median: half of them,
    and one more, must be prefilled first: a floor for any schedule), and the tok/s of the serial schedule at the
    card's pace, every prompt prefilled and then every step decoded at its floor (not a ceiling: a step that puts
    prompt tokens beside memory-bound decode rows uses compute those rows leave idle). Measures of the card, not of
    Sparkler."""
    import jax
    import jax.numpy as jnp

    from gpu import copy_bandwidth, param_bytes, timed

    from engine.runner import kv_bytes_per_token

    cfg = model.cfg
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (8192, cfg.hidden_size), jnp.bfloat16)
    b = jax.random.normal(kb, (cfg.hidden_size, cfg.intermediate_size), jnp.bfloat16)
    rate = 2 * a.shape[0] * a.shape[1] * b.shape[1] / timed(jax.jit(jnp.matmul), a, b)
    del a, b
    bandwidth = copy_bandwidth((64 if args.smoke else 512) << 20)
    layers = param_bytes(model.params, skip=("embed", "embed_rows", "lm_head"), elements=True)  # weights
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.prompt / 2
    per_token = 2 * layers + attention  # FLOPs of a prompt token
    weights, kv = param_bytes(model.params), kv_bytes_per_token(model)
    step = lambda n, context: (weights + n * context * kv) / bandwidth  # noqa: E731  (a decode step's floor, s)
    context = args.prompt + args.tokens / 2  # a decode step's mean context (the first token comes from prefill)
    out = dict(matmul_tflops=rate / 1e12, copy_gbs=bandwidth / 1e9, gflop_per_prompt_token=per_token / 1e9,
               decode_gb_per_step_at_top=(weights + max(levels) * context * kv) / 1e9)
    for n in levels:
        prefill = n * args.prompt * per_token / rate
        decode = (args.tokens - 1) * step(n, context)
        first = (n + 1) / 2 * args.prompt * per_token / rate  # the median's prompts (two averaged where n is even)
        out[n] = dict(ttft_p50=first, tok_s=n * args.tokens / (prefill + decode), prefill_s=prefill, decode_s=decode)
    return out


RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                         "city": {"type": "string", "maxLength": 40}}}


def structured(eng, args, n: int, params) -> dict:
    """`n` concurrent requests, one in eight under a JSON schema (each step's masks are filled while its forward pass
    runs): the free requests' tok/s and the share of wall time the engine thread spent in device calls."""
    from engine.grammar import grammar_text

    grammar = grammar_text({"type": "json_schema", "json_schema": RECORD})
    reqs = [eng.make_request(p, params, grammar=grammar if i % 8 == 0 else None)
            for i, p in enumerate(prompts(n, args.prompt, 3 * n + 7))]
    waited, t = eng.runner.device_seconds(), time.perf_counter()
    for r in reqs:
        eng.add(r)
    while eng.has_work():
        eng.step()
    wall = time.perf_counter() - t
    free = sum(len(r.choices[0].token_ids) for i, r in enumerate(reqs) if i % 8)
    return dict(level=n, free_tok_s=free / wall, free_rows=sum(1 for i in range(n) if i % 8), wall=wall,
                device_call_seconds=eng.runner.device_seconds() - waited,
                constrained_tokens=[len(r.choices[0].token_ids) for r in reqs[::8]])


def environment() -> str:
    """The card, driver and versions, one line."""
    import jax

    card = ""
    if shutil.which("nvidia-smi"):
        card = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip().replace("\n", "; ")
    dev = jax.devices()[0]
    return f"{card or getattr(dev, 'device_kind', dev.platform)}; jax {jax.__version__} ({dev.platform})"


def table(res: dict, args) -> str:
    """The markdown table."""
    http, alone = res.get("http", {}), res.get("alone", {})
    targets = {1: ">= 150", 64: ">= 5,000", 256: ">= 10,000"}
    lines = ["| measurement | through HTTP | engine alone | HTTP / engine | target (H100) |",
             "| --- | ---: | ---: | ---: | --- |"]
    for n in args.levels:
        h, a = http.get(n, {}).get("tok_s"), alone.get(n, {}).get("tok_s")
        lines.append(f"| {'single stream' if n == 1 else f'{n} concurrent'} (tok/s) | {h or 0:,.1f} | {a or 0:,.1f} | "
                     f"{h / a if h and a else 0:.2f} | {targets.get(n, '') if not args.smoke else ''} |")
    fl = alone.get("floors")
    if alone.get("floors_error"):
        lines.append(f"| the card's floors: not measured ({alone['floors_error'][:100]}) | | | | |")
    if fl:
        lines.append(f"| the card, measured here: bfloat16 matmul (TFLOP/s), copy bandwidth (GB/s) | "
                     f"{fl['matmul_tflops']:,.1f}, {fl['copy_gbs']:,.0f} | | | |")
        for n in args.levels:
            h, f = http.get(n, {}).get("tok_s"), fl.get(n, fl.get(str(n)))
            share = h / f["tok_s"] if h else 0
            lines.append(f"| {n} concurrent at the card's pace, serially (tok/s: every prompt at the matmul rate, "
                         f"then decode at the copy bandwidth); HTTP / that | {f['tok_s']:,.0f} | | {share:.2f} | |")
    for n in args.levels:
        h, a = http.get(n, {}), alone.get(n, {})
        share = lambda r: f"{r['device_call_seconds'] / r['wall']:.1%}" if r.get("wall") else ""  # noqa: E731
        lines.append(f"| engine thread in device calls at {n}, share of wall time | {share(h)} | {share(a)} | | "
                     f"{'> 95% (idle < 5%)' if n == max(args.levels) else ''} |")
    st = alone.get("structured")
    if st:
        plain = alone.get(st["level"], {}).get("tok_s")
        ratio = f" ({st['free_tok_s'] / (plain * st['free_rows'] / st['level']):.2f}x of free alone)" if plain else ""
        lines.append(f"| {st['level']} concurrent, one in eight under a JSON schema: the free ones' tok/s; engine "
                     f"thread in device calls | | {st['free_tok_s']:,.1f}{ratio}; "
                     f"{st['device_call_seconds'] / st['wall']:.1%} | | |")
    tr = alone.get("trace")
    if tr:
        busy = " / ".join(f"{tr[k]:.1%}" if tr.get(k) is not None else "-" for k in ("programs", "kernels"))
        lines.append(f"| devices busy at {tr['level']}, engine alone under the profiler ({tr['tok_s']:,.0f} tok/s), "
                     f"programs / kernels, share of wall time | | {busy} | | {'> 95%' if not args.smoke else ''} |")
        for kind in ("programs", "kernels"):  # where the device time went
            top = ", ".join(f"{name[:48]} {sec:.2f} s ({n})" for name, sec, n in tr.get(f"{kind}_top", [])[:5])
            lines.append(f"| device time by {kind[:-1]}, traced round (seconds, calls) | | {top} | | |")
    for n in args.levels:
        parts = {k[5:]: v / http[n]["wall"] for k, v in http.get(n, {}).items() if k.startswith("step_")}
        if parts:
            lines.append(f"| engine step at {n} over HTTP, share of wall time by part | "
                         + ", ".join(f"{k} {v:.0%}" for k, v in parts.items()) + " | | | |")
    for n in args.levels:
        h = http.get(n, {})
        if h.get("tokens") and "cpu_engine" in h:
            lines.append(f"| host CPU per token at {n} over HTTP, engine thread / event loop (us) | "
                         f"{1e6 * h['cpu_engine'] / h['tokens']:.1f} / {1e6 * h['cpu_event_loop'] / h['tokens']:.1f} "
                         "| | | |")
    top = max(args.levels)
    if top in http:
        lines.append(f"| first token at {top} concurrent, p50 / max (s) | {http[top]['ttft_p50']:.2f} / "
                     f"{http[top]['ttft_max']:.2f} | | | {'<= 1.0 (p50)' if not args.smoke else ''} |")
        f = (fl or {}).get(top, (fl or {}).get(str(top)))
        if f:
            lines.append(f"| first token at {top} concurrent, p50 if the prompts before it were prefilled at the "
                         f"matmul rate (s); HTTP / that | {f['ttft_p50']:.2f} | | "
                         f"{http[top]['ttft_p50'] / f['ttft_p50']:.2f} | |")
    for line in res.get("plan", []):
        lines.append(f"| {'the KV pool' if line.startswith('KV pool') else 'attention, tuned'} at the cold "
                     f"start | {line} | | | |")
    for kind, target in (("cold", "<= 90"), ("warm", "<= 20")):
        if kind in res:
            target = "" if args.smoke else target
            lines.append(f"| ready after start, {kind} (s) | {res[kind]:.1f} | | | {target} |")
    head = (f"`bench/gpu_serve.py{' --smoke' if args.smoke else ''}`: {res['env']}; "
            f"{'smoke config' if args.smoke else 'Llama-3.1-8B shape'}, random bfloat16 weights "
            f"({res['weights'] / 1e9:.1f} GB), vocab {VOCAB}; {args.prompt}-token prompts, {args.tokens} new tokens, "
            f"streaming /v1/completions, greedy; server flags `--max-num-seqs {args.max_num_seqs} --kv-cache-gb "
            f"{args.kv_cache_gb} --max-model-len {args.max_model_len} {args.server_args}`; "
            f"{time.strftime('%Y-%m-%d')}")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    """Write the folder, measure, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model and load: checks the script end to end on a CPU")
    ap.add_argument("--write-tokenizer", metavar="DIR", help="only write the packaged tokenizer's files to DIR")
    ap.add_argument("--tokenizer", help="tokenizer files (default: written here from the packaged model)")
    ap.add_argument("--out", default="/tmp/gpu_serve", help="the folder, caches, logs and results")
    ap.add_argument("--results", default="", help="where the results and server logs go as they come (default: --out)")
    ap.add_argument("--levels", default="", help="concurrent requests per level (default 1,64,256)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: cold, engine")
    ap.add_argument("--server-args", default="", help="more server flags, e.g. '--attention-backend xla'")
    ap.add_argument("--port", type=int, default=8195)
    ap.add_argument("--max-num-seqs", type=int, default=0, help="the server's slots (default 256; 8 with --smoke)")
    args = ap.parse_args()
    if args.write_tokenizer:
        return write_tokenizer(args.write_tokenizer)
    if args.smoke:
        cfg, args.levels, args.prompt, args.tokens, args.warm_tokens = SMOKE, args.levels or "1,4,8", 64, 16, 2
        args.kv_cache_gb, args.max_model_len, args.ready_limit = 0.05 * max(1, args.max_num_seqs / 8), 256, 900
        args.max_num_seqs = args.max_num_seqs or 8
    else:
        cfg, args.levels, args.prompt, args.tokens, args.warm_tokens = LLAMA_8B, args.levels or "1,64,256", 512, 256, 8
        args.kv_cache_gb, args.max_model_len, args.ready_limit = 28, 1024, 420
        args.max_num_seqs = args.max_num_seqs or 256
    args.levels = [int(x) for x in args.levels.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    args.results = args.results or args.out
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = os.path.join(args.out, "tokenizer")
        write_tokenizer(tokenizer)
    res = {"env": environment()}
    print(res["env"], flush=True)

    def record():
        with open(os.path.join(args.results, "gpu_serve.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.results, "gpu_serve.md"), "w") as f:
            f.write(table(res, args) + "\n")

    folder, cache = os.path.join(args.out, "model"), os.path.join(args.out, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    res["weights"] = write_folder(folder, cfg, tokenizer)
    print(f"folder written in {time.perf_counter() - t:.1f} s", flush=True)
    url = f"http://127.0.0.1:{args.port}"
    if "cold" not in skip:
        proc, res["cold"] = server(folder, cache, args, args.port, os.path.join(args.results, "server-cold.log"))
        print(f"ready cold in {res['cold']:.1f} s", flush=True)
        wait_warm(url)  # what the warm start then loads
        stop(proc)
        with open(os.path.join(args.results, "server-cold.log")) as f:  # the card's choice of attention kernels,
            marks = {"decode attention": "decode attention", "flat attention": "flat attention",  # and the pool's
                     "attention plan": "attention plan", "sparkler: attention ": "attention ",  # size
                     "sparkler: KV pool ": "KV pool "}
            res["plan"] = [name + line.split(mark, 1)[1].rstrip() for line in f for mark, name in marks.items()
                           if mark in line]
        print("\n".join(res["plan"]), flush=True)
        record()
    proc, res["warm"] = server(folder, cache, args, args.port, os.path.join(args.results, "server-warm.log"))
    print(f"ready warm in {res['warm']:.1f} s", flush=True)
    try:
        wait_warm(url)
        res["http"] = asyncio.run(load(url, args.levels, args.prompt, args.tokens, args.warm_tokens))
    finally:
        stop(proc)
        record()
    if "engine" not in skip:
        res["alone"] = engine_alone(folder, cache, args, args.levels)
        record()
    print(table(res, args), flush=True)


if __name__ == "__main__":
    main()
