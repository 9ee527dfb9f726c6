"""Side-by-side embeddings benchmark: Sparkler's `/v1/embeddings` and llama.cpp's `llama-server --embeddings` on the
same GGUF, one after the other, driven by the same client.

Per server: the time of a first pass over a corpus of texts of 8 to ~300 words in requests of `--batch` inputs,
`--concurrency` requests at once (Sparkler compiles a program per call shape there: see `Runner.embed_calls`), the
median latency of one short input alone, then inputs/s and tokens/s over the corpus again. Then how far the two
agree: the cosine similarity of the two servers' vectors for each text (both pool the last token and normalize:
Sparkler by default for a model that says nothing, llama.cpp with `--pooling last`) and whether they counted the same
tokens.
Prints one markdown table with the ratios; `make bench-embed`. Not a test: read the ratios. `llama-server` comes from
`../shared/peers/llama-server.sh` (or `--llama-server PATH`); without it only Sparkler runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import ROOT, WORDS, find_llama_server, stop, wait_ready, wait_warm  # noqa: E402

MODEL = "smollm2-135m-instruct"


def corpus(n: int, seed: int = 0) -> list[str]:
    """`n` texts of 8 to ~300 words (most short, as search passages and queries are)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(min(300, int(8 * rng.paretovariate(1.0))))) + "."
            for _ in range(n)]


async def post(session, url: str, texts: list[str]) -> tuple[list[list[float]], int]:
    """One `/v1/embeddings` call: the vectors, in input order, and the tokens the server counted."""
    body = {"model": MODEL, "input": texts, "encoding_format": "float"}
    async with session.post(url + "/v1/embeddings", json=body) as r:
        out = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {out}")
    vectors = [d["embedding"] for d in sorted(out["data"], key=lambda d: d["index"])]
    return vectors, out["usage"]["prompt_tokens"]


async def measure(url: str, texts: list[str], batch: int, concurrency: int) -> dict:
    """Every figure of one server, and its vectors: a first pass over the corpus (what compiles or allocates lazily
    does it there), one short input alone, then the corpus again."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
        sem = asyncio.Semaphore(concurrency)

        async def run(b):
            async with sem:
                return await post(s, url, b)

        t = time.perf_counter()
        await asyncio.gather(*(run(b) for b in batches))
        first = time.perf_counter() - t
        one = []
        for i in range(11):
            t = time.perf_counter()
            await post(s, url, [f"A short query about {WORDS[i % len(WORDS)]}."])
            one.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = await asyncio.gather(*(run(b) for b in batches))
        took = time.perf_counter() - t
    vectors = [v for vs, _ in res for v in vs]
    tokens = sum(n for _, n in res)
    return {"inputs_s": len(texts) / took, "tokens_s": tokens / took, "one_ms": 1000 * statistics.median(one),
            "first_s": first, "tokens": tokens, "vectors": np.asarray(vectors, np.float32)}


def serve_and_measure(cmd: list[str], port: int, texts, batch, concurrency, log: str) -> dict:
    """Start a server, measure it, stop it."""
    import subprocess

    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_ready(url, proc)
            if "server" in cmd:  # Sparkler: its background warm-up done first (it takes a core)
                wait_warm(url)
            out = asyncio.run(measure(url, texts, batch, concurrency))
            if "server" in cmd:
                with urllib.request.urlopen(url + "/health", timeout=10) as r:
                    out["compiles"] = json.loads(r.read())["compiles"]
            return out
        finally:
            stop(proc)


def main() -> None:
    """Run both servers one after the other and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--sparkler-args", default="", help="extra server flags, e.g. '--quantization int8'")
    args = ap.parse_args()
    from models.loading.packaged import resolve

    gguf, texts = resolve(args.model), corpus(args.texts)
    res = {"sparkler": serve_and_measure(
        [sys.executable, "-m", "server", "--model", args.model, "--port", "8193", "--max-num-seqs", "8",
         "--max-model-len", "2048", *args.sparkler_args.split()], 8193, texts, args.batch, args.concurrency,
        "/tmp/bench-embed-sparkler.log")}
    peer = None if args.no_peer else find_llama_server(args.llama_server)
    if peer:  # one slot per concurrent request; a batch of inputs is one llama.cpp batch (-b, -ub) of sequences
        res["llama"] = serve_and_measure(
            [peer, "-m", gguf, "--embeddings", "--pooling", "last", "-np", str(args.concurrency), "-c",
             str(args.concurrency * 4096), "-b", "4096", "-ub", "4096", "-t", str(os.cpu_count() or 2), "--host",
             "127.0.0.1", "--port", "8194"], 8194, texts, args.batch, args.concurrency, "/tmp/bench-embed-llama.log")
    print(table(res, args))


def table(res: dict, args) -> str:
    """The markdown table (ratios are Sparkler / llama.cpp)."""
    s, l = res["sparkler"], res.get("llama")
    lines = [f"{args.texts} texts of 8-300 words, {args.batch} a request, {args.concurrency} requests at once; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "",
             "| metric | sparkler | llama.cpp server | ratio |", "| --- | --- | --- | --- |"]
    for key, name, fmt in (("inputs_s", "inputs/s", "{:.1f}"), ("tokens_s", "tokens/s", "{:.0f}"),
                           ("one_ms", "one short input alone, median (ms)", "{:.1f}"),
                           ("first_s", "first pass over the corpus (s)", "{:.1f}"),
                           ("tokens", "tokens counted", "{:d}")):
        peer = fmt.format(l[key]) if l else "-"
        ratio = f"{s[key] / l[key]:.2f}" if l else "-"
        lines.append(f"| {name} | {fmt.format(s[key])} | {peer} | {ratio} |")
    if l:
        a, b = s["vectors"], l["vectors"]
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        lines.append(f"| cosine of the two servers' vectors, mean / min | {cos.mean():.5f} / {cos.min():.5f} | | |")
    lines.append(f"| programs traced by the server (all of them) | {s['compiles']} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
