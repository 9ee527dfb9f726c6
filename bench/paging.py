"""Benchmark of the paged KV cache, side by side in one run:

- aggregate decode tokens/s at 32 and 96 concurrent requests, this tree beside an older revision (a git worktree,
  default: the last commit with the contiguous cache), each in its own process, one after the other;
- time to first token through the HTTP server for a chat whose ~1,500-token system prompt was seen before, vs cold;
- how many 512-token conversations the default 4 GiB pool holds at once (was 32: one per slot);
- a burst of 64 prompts sharing an uncached 512-token prefix, offline: requests/s and prompt tokens computed, this tree
  beside the last revision before queued work waited for a prefix being computed (`--burst-before`); `--burst` runs
  these rows alone.

Prints a markdown table; `make bench-paging`. Not a test: numbers are noisy, read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "d79e86f"  # the last revision with the contiguous per-slot cache
BURST_BEFORE = "db5fc0c"  # the last revision where prompts sharing an uncached prefix each computed it


def aggregate(n: int, new_tokens: int, max_len: int) -> float:
    """Tokens/s of `n` concurrent greedy requests (32-token prompts) in one engine, prefill included."""
    import numpy as np

    from engine import Engine, RunnerConfig, SamplingParams
    from models import load_model

    model = load_model("smollm2-135m-instruct")
    eng = Engine(model, RunnerConfig(max_num_seqs=n, max_model_len=max_len))
    rng = np.random.default_rng(0)

    def run(tokens: int) -> float:
        reqs = [eng.make_request(rng.integers(100, 20000, 32).tolist(),
                                 SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)) for _ in range(n)]
        for r in reqs:
            eng.add(r)
        t = time.perf_counter()
        while eng.has_work():
            eng.step()
        return time.perf_counter() - t

    run(new_tokens)  # compiles every shape this load reaches
    return n * new_tokens / run(new_tokens)


def burst(n: int = 64, prefix: int = 512, own: int = 64, new_tokens: int = 32) -> dict:
    """`n` greedy requests in one offline batch (`engine.LLM.generate`, 32 slots), each `prefix` token ids they share
    (not cached before) then `own` of its own, to `new_tokens` tokens: requests/s, and prompt tokens computed (not
    from the cache). A first burst of another prefix compiles the shapes."""
    import numpy as np

    from engine import LLM, SamplingParams
    from models import load_model

    llm = LLM(load_model("smollm2-135m-instruct"), max_num_seqs=32, max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    rng = np.random.default_rng(0)

    def run() -> tuple[float, int]:
        shared = rng.integers(1000, 20000, prefix).tolist()
        prompts = [shared + rng.integers(1000, 20000, own).tolist() for _ in range(n)]
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        return time.perf_counter() - t, sum(len(o.prompt_token_ids) - o.cached_tokens for o in outs)

    run()
    took, computed = run()
    return {"rps": n / took, "computed": computed}


def in_tree(tree: str, call: str):
    """`call` (of this file's functions, as `paging.…`) run by a fresh interpreter on the sources of `tree`; its
    result, through JSON."""
    code = (f"import sys, json; sys.path.insert(0, {tree!r}); sys.path.insert(1, {os.path.join(ROOT, 'bench')!r}); "
            f"import paging; print(json.dumps({call}))")
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def worktree(rev: str) -> str:
    """A checkout of `rev` beside the repository (made once)."""
    path = os.path.join("/tmp", f"sparkler-{rev}")
    if not os.path.exists(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
    return path


def ttft_through_http(system_tokens: int = 1500) -> dict:
    """TTFT of a streamed chat with a long system prompt, cold (cache off) and after the prompt was seen once."""
    import asyncio
    import threading

    import openai
    from aiohttp import web

    from engine.engine import Engine
    from engine.llm import AsyncEngine, encode_chat
    from engine.runner import RunnerConfig
    from models import load_model
    from server.app import Server

    model = load_model("smollm2-135m-instruct")
    engine = Engine(model, RunnerConfig(max_num_seqs=8, max_model_len=4096, kv_cache_gb=1.0))
    engine.warmup()
    aengine = AsyncEngine(engine)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner = web.AppRunner(Server(model, aengine).app(), handler_cancellation=True)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    words = "The assistant follows the policy below carefully and answers in plain English. "
    system = {"role": "system", "content": words * (system_tokens // 14)}

    def ttft(question: str, **extra) -> float:
        t = time.perf_counter()
        stream = client.chat.completions.create(
            model=model.name, messages=[system, {"role": "user", "content": question}], max_tokens=4, temperature=0,
            stream=True, extra_body=extra)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                took = time.perf_counter() - t
                stream.close()
                return took
        return time.perf_counter() - t

    prompt_len = len(encode_chat(model, [system]))
    ttft("Warm-up question?", prompt_cache_max_len=0)  # compiles the chunk shapes
    cold = min(ttft(f"Cold question {i}?", prompt_cache_max_len=0) for i in range(2))
    ttft("First question?")
    warm = min(ttft(f"Another question {i}?") for i in range(3))
    aengine.close()
    return {"cold": cold, "warm": warm, "system_tokens": prompt_len}


def main() -> None:
    """Run every measurement and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=BEFORE, help="the revision to compare with")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--burst-before", default=BURST_BEFORE, help="the revision the burst rows compare with")
    ap.add_argument("--burst", action="store_true", help="the burst rows alone")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from engine import memory
    from engine.runner import RunnerConfig, kv_bytes_per_token, plan_pages
    from models import load_model

    rows = []
    before, after = in_tree(worktree(args.burst_before), "paging.burst()"), in_tree(ROOT, "paging.burst()")
    rows.append(("64 prompts sharing an uncached 512-token prefix, offline (requests/s)", f"{after['rps']:.2f}",
                 f"{before['rps']:.2f} ({args.burst_before})", f"{after['rps'] / before['rps']:.2f}x", ""))
    rows.append(("their prompt tokens computed", f"{after['computed']}", f"{before['computed']}",
                 f"{after['computed'] / before['computed']:.2f}x", ""))
    if args.burst:
        return _table(rows)
    old = worktree(args.before)
    for n in (32, 96):
        before, after = (in_tree(tree, f"paging.aggregate({n}, {args.tokens}, 512)") for tree in (old, ROOT))
        rows.append((f"aggregate, {n} concurrent (tok/s)", f"{after:.1f}", f"{before:.1f}", f"{after / before:.2f}x",
                     ">= 0.95x" if n == 32 else ""))
    t = ttft_through_http()
    rows.append((f"TTFT via HTTP, {t['system_tokens']}-token system prompt seen before (ms)", f"{t['warm'] * 1000:.0f}",
                 f"{t['cold'] * 1000:.0f} (cold)", f"{t['warm'] / t['cold']:.2f}x", "<= 0.2x"))
    model = load_model("smollm2-135m-instruct")
    rc = RunnerConfig(kv_cache_gb=memory.CPU_GB)  # the CPU's pool (0 is the runner's word for it)
    pages = plan_pages(model, rc) - 1
    per = 512 // rc.page_size
    rows.append(("512-token conversations held at once, 4 GiB pool", f"{pages // per}", "32 (one per slot)",
                 f"{pages // per / 32:.1f}x", ">= 128"))
    _table(rows)
    print(f"\n(pool: {pages} pages of {rc.page_size} tokens, {kv_bytes_per_token(model)} bytes of K/V per token)")


def _table(rows: list[tuple]) -> None:
    """Print the rows as the markdown table."""
    lines = ["| metric | paged | contiguous / cold / before | ratio | target |", "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]))


if __name__ == "__main__":
    main()
