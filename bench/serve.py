"""Side-by-side serving benchmark: Sparkler's server and llama.cpp's `llama-server` on the same model file, one after
the other, driven over HTTP by the same client (streaming chat completions, `ignore_eos`).

Per server: seconds until ready (and, for Sparkler, until its background warm-up is done: the rest is measured
after it), single-stream decode tokens/s (first token to last), TTFT for a short and a fresh
~650-token prompt (a unique head defeats both prompt caches) and for that prompt repeated, and aggregate tokens/s at
1, 8, 32 and 96 concurrent requests (128 new tokens each, first request sent to last token). Sparkler's engine alone
at 32 concurrent (same prompts, in-process) gives the HTTP path's share, and transformers' float32 `generate` the
single-stream reference. Prints one markdown table with the ratios; `make bench-serve`. Not a test: read the ratios.
`llama-server` comes from `../shared/peers/llama-server.sh` (or `--llama-server PATH`); without it only Sparkler runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_SCRIPT = os.path.join(ROOT, "..", "shared", "peers", "llama-server.sh")
MODEL = "smollm2-135m-instruct"  # the name requests carry (llama-server accepts any)
WORDS = ("river mountain lantern copper violet harbor meadow signal orchard marble canyon ember falcon glacier "
         "thistle quartz willow beacon").split()


def long_prompt(tag: int, words: int = 560) -> str:
    """A user message of ~650 tokens (560 words) whose first words are unique to `tag` (no prompt cache can serve
    it)."""
    body = " ".join(WORDS[(tag * 7 + i * 5 + i // 3) % len(WORDS)] for i in range(words))
    return f"Request {tag} {tag * 7919 % 10007}. Summarise these notes: {body}"


async def chunks(session, url: str, body: dict):
    """The JSON chunks of one streamed chat completion."""
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                yield json.loads(line[6:])


def has_text(chunk: dict) -> bool:
    """A chunk carries reply text."""
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


async def chat(session, url: str, content: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed chat request: (seconds to first token, seconds to last token, tokens received)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, pieces, usage = None, 0, None
    async for chunk in chunks(session, url, body):
        usage = chunk.get("usage") or usage
        if has_text(chunk):
            first = first or time.perf_counter()
            pieces += 1
    done = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or pieces
    return (first or done) - t0, done - t0, tokens


async def measure(url: str, tokens: int, levels: tuple[int, ...]) -> dict:
    """Every HTTP figure of one server."""
    import aiohttp

    out: dict = {}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        for n in levels:  # a full round at each level first: whatever compiles or allocates lazily does it here
            await asyncio.gather(*(chat(s, url, f"Warm up {i}.", tokens) for i in range(n)))
        ttft, last, n = await chat(s, url, "Tell me a long story about a lighthouse keeper.", tokens)
        out["single"] = (n - 1) / (last - ttft)
        ttft, last, n = await chat(s, url, long_prompt(2000, 700), tokens)  # ~830 tokens of context, then decode
        out["single_long"] = (n - 1) / (last - ttft)
        out["ttft_short"] = min([(await chat(s, url, f"Say hi, number {i}.", 1))[0] for i in range(3)])
        out["ttft_long"] = min([(await chat(s, url, long_prompt(1000 + i), 1))[0] for i in range(3)])
        await chat(s, url, long_prompt(7), 1)
        out["ttft_repeat"] = min([(await chat(s, url, long_prompt(7), 1))[0] for i in range(3)])
        for n in levels:
            t = time.perf_counter()
            res = await asyncio.gather(*(chat(s, url, f"Write a story about {WORDS[i % len(WORDS)]} #{i}.", tokens)
                                         for i in range(n)))
            out[f"agg{n}"] = sum(r[2] for r in res) / (time.perf_counter() - t)
    return out


def wait_ready(url: str, proc: subprocess.Popen, limit: float = 900) -> float:
    """Seconds from now until `url` answers /v1/models (the process dying is an error)."""
    import urllib.request

    t = time.perf_counter()
    while time.perf_counter() - t < limit:
        if proc.poll() is not None:
            hint = ("; an illegal instruction: ../shared/peers/llama-server.sh builds llama.cpp with -DGGML_AVX512=ON, "
                    "so on a CPU without AVX-512 build it with -DGGML_AVX512=OFF and pass --llama-server"
                    if proc.returncode == -signal.SIGILL else "")
            raise RuntimeError(f"server exited with {proc.returncode}{hint}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {limit} s")


def serve_and_measure(cmd: list[str], port: int, tokens: int, levels, log: str) -> dict:
    """Start a server, time its start-up, measure it, stop it."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_ready(url, proc)
            out = {"ready": time.perf_counter() - t}
            wait_warm(url)  # Sparkler compiles its other shapes behind serving, on a core the measurements need
            out["warm"] = time.perf_counter() - t
            out.update(asyncio.run(measure(url, tokens, levels)))
        finally:
            stop(proc)
    return out


def wait_warm(url: str, limit: float = 900) -> float:
    """Seconds from now until the server's background warm-up has compiled every shape (`/health`)."""
    import urllib.request

    t = time.perf_counter()
    while time.perf_counter() - t < limit:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            health = json.loads(r.read())
        if health.get("warmup_shapes_ready", 0) >= health.get("warmup_shapes_total", 0):
            return time.perf_counter() - t
        time.sleep(0.5)
    raise RuntimeError(f"{url}: the warm-up did not finish within {limit:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM a server, and kill it if it has not exited after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def engine_alone(model_name: str, n: int, tokens: int, server_args: list[str]) -> float:
    """Sparkler's engine in this process, built from the server's flags, at `n` concurrent requests (the chat
    prompts of the HTTP run), tok/s."""
    import dataclasses

    from engine import LLM, SamplingParams
    from server.__main__ import load, parse_args, runner_config

    flags = parse_args(["--model", model_name, *server_args])
    llm = LLM(load(flags), **dataclasses.asdict(runner_config(flags)))
    chats = [[{"role": "user", "content": f"Write a story about {WORDS[i % len(WORDS)]} #{i}."}] for i in range(n)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.chat(chats, params)  # compiles what this load reaches
    t = time.perf_counter()
    llm.chat(chats, params)
    return n * tokens / (time.perf_counter() - t)


def transformers_single(path: str, tokens: int) -> float:
    """transformers' greedy float32 `generate`, one stream, tok/s."""
    code = ("import sys, json; sys.path.insert(0, 'bench'); import torch, bench; "
            f"print(json.dumps(bench.hf_numbers({path!r}, {tokens})['b1']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def find_llama_server(given: str | None) -> str | None:
    """The peer's binary: `--llama-server`, else the build script's (it builds once, minutes), else PATH."""
    if given:
        return given
    if os.path.exists(PEER_SCRIPT):
        try:
            return subprocess.run(["bash", PEER_SCRIPT], capture_output=True, text=True, check=True).stdout.strip()
        except subprocess.CalledProcessError as e:
            print(f"could not build llama-server: {e.stderr[-500:]}", file=sys.stderr)
    return shutil.which("llama-server")


def main() -> None:
    """Run both servers one after the other and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--levels", default="1,8,32,96")
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--sparkler-args", default="", help="extra server flags, e.g. '--quantization int8'")
    args = ap.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    global MODEL
    MODEL = args.model
    from models.loading.packaged import resolve

    gguf = resolve(args.model)
    sp_args = ["--max-num-seqs", str(max(levels)), "--max-model-len", "2048", *args.sparkler_args.split()]
    res = {}
    res["sparkler"] = serve_and_measure([sys.executable, "-m", "server", "--model", args.model, "--port", "8191",
                                         *sp_args], 8191, args.tokens, levels, "/tmp/bench-serve-sparkler.log")
    peer = None if args.no_peer else find_llama_server(args.llama_server)
    if peer:
        slots = max(levels)
        res["llama"] = serve_and_measure([peer, "-m", gguf, "-np", str(slots), "-c", str(slots * 1024), "-t",
                                          str(os.cpu_count() or 2), "--host", "127.0.0.1", "--port", "8192"],
                                         8192, args.tokens, levels, "/tmp/bench-serve-llama.log")
    alone = engine_alone(args.model, 32, args.tokens, sp_args) if 32 in levels else None
    hf = None if args.no_transformers else transformers_single(gguf, 64)
    print(table(res, alone, hf, levels, args))


def table(res: dict, alone: float | None, hf: float | None, levels, args) -> str:
    """The markdown table (ratios are Sparkler / llama.cpp)."""
    s, l = res["sparkler"], res.get("llama", {})

    def row(name, key, fmt="{:.1f}", scale=1.0, note=""):
        a, b = s.get(key), l.get(key)
        ratio = f"{a / b:.2f}x" if a and b else ""
        return (f"| {name} | {fmt.format(a * scale) if a is not None else ''} | "
                f"{fmt.format(b * scale) if b is not None else ''} | {ratio} | {note} |")

    lines = ["| metric | sparkler | llama.cpp server | ratio | target |", "| --- | --- | --- | --- | --- |",
             row("ready after start (s)", "ready"),
             row("every shape compiled, after start (s)", "warm", note="the rows below are measured after it"),
             row("single-stream decode (tok/s)", "single", note=">= 0.6x (stretch 1.0x)"),
             row("single-stream decode after a ~830-token prompt (tok/s)", "single_long"),
             row("TTFT, short prompt (ms)", "ttft_short", "{:.0f}", 1000),
             row("TTFT, fresh ~650-token prompt (ms)", "ttft_long", "{:.0f}", 1000, "<= 0.5x"),
             row("TTFT, the same prompt repeated (ms)", "ttft_repeat", "{:.0f}", 1000)]
    for n in levels:
        note = ">= 1.5x" if n == 32 else ""
        if n == 96 and l.get("agg32"):
            note = f">= 2x llama.cpp at 32: {s['agg96'] / l['agg32']:.2f}x"
        lines.append(row(f"aggregate, {n} concurrent (tok/s)", f"agg{n}", note=note))
    if alone:
        lines.append(f"| engine alone, 32 concurrent (tok/s) | {alone:.1f} | | HTTP/engine "
                     f"{s['agg32'] / alone:.2f} | HTTP >= 0.9x engine |")
    if hf:
        lines.append(f"| transformers float32, single stream (tok/s) | {hf:.1f} | | sparkler/transformers "
                     f"{s['single'] / hf:.2f}x | >= 1.2x |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    head = (f"`make bench-serve` ({args.model}, {args.tokens} new tokens per request, streaming chat, greedy; "
            f"sparkler flags: `{args.sparkler_args or 'defaults'}`; {time.strftime('%Y-%m-%d')}; {machine})")
    return head + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
