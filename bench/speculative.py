"""Speculative decoding over HTTP with the default model on this machine: each workload with and without drafts, in
one run, at 1, 8 and 32 concurrent streams (greedy chat completions, streamed).

- editing: a ~600-token Python file and the request to rename one of its variables; with speculation the original
  file is the request's `prediction`. A wrong prediction (another file) is measured too.
- extraction: quote the lines of a long prompt that mention one word; with speculation the server drafts by n-gram
  lookup (`--speculative-ngram K`).
- chat: stories with nothing to copy, with n-gram drafting on; and with a draft model (`--speculative-model`;
  `--draft`, by default the model itself, the only real weights a package ships here: it shows what a draft
  model's drafting costs and how many of its drafts the verify keeps, not the speed-up of a smaller draft).
- json editing: a JSON record and the request to change one field, under `response_format` json_object; with
  speculation the original record is the prediction (drafts cut to what the grammar accepts, each drafted position
  verified under its own mask).

The servers run one after the other: one as started by default (no n-gram drafts; a prediction still drafts), one with
`--speculative-ngram K` and one with a draft model. Output tokens per second are counted from each request's first token
to its last (the prompt's prefill is the same either way) and summed over the streams of a level; the table gives the
ratios and the share of drafted tokens kept. `make bench-spec`. Not a test: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import ROOT, WORDS, chunks, has_text, stop, wait_ready, wait_warm  # noqa: E402

MODEL = "smollm2-135m-instruct"
COLOURS = ("red", "green", "blue", "amber", "grey")


def code_file(seed: int = 0) -> str:
    """A ~600-token Python file: the page allocator's first 2,400 characters as of session 12 (`bench/editing.txt`,
    frozen: when the live file's docstring changed by a few words in session 14, SmolLM2-135M described the code
    instead of editing it, and the row measured nothing), or for `seed` > 0 the sampler's (another file)."""
    path = os.path.join(ROOT, "bench", "editing.txt") if seed == 0 else os.path.join(ROOT, "engine", "sampler.py")
    with open(path) as f:
        return f.read()[:2400]


def edit_messages(i: int) -> list[dict]:
    """Ask to rename a variable in the code file (`i` varies the new name, so no prompt cache serves it all). The
    phrasing is one SmolLM2-135M follows: it answers with the file (others get a description of the code)."""
    return [{"role": "system", "content": "You are a code editor. Reply with the complete edited file and nothing "
                                          "else."},
            {"role": "user", "content": f"```python\n{code_file()}```\n\nRename `known` to `seen{i + 1}` everywhere."}]


def inventory(i: int) -> str:
    """Forty lines of an inventory, some of which mention 'copper'."""
    lines = []
    for j in range(40):
        word = "copper" if j % 3 == 0 else WORDS[(i + j * 5) % len(WORDS)]
        lines.append(f"Shelf {j + 1}: a {COLOURS[(i + j) % len(COLOURS)]} {word} box holds "
                     f"{(i * 31 + j * 7) % 90 + 10} "
                     f"{WORDS[(i * 3 + j) % len(WORDS)]} tokens.")
    return "\n".join(lines)


def extract_messages(i: int) -> list[dict]:
    """Quote the inventory's copper lines."""
    return [{"role": "user", "content": f"{inventory(i)}\n\nQuote every line above that mentions copper, exactly as "
                                        f"written, one per line."}]


def record(i: int) -> str:
    """A JSON record of 24 fields (~400 tokens)."""
    import json

    fields = {f"{WORDS[(i + j) % len(WORDS)]}_{j}": f"{COLOURS[j % len(COLOURS)]} {WORDS[(j * 7) % len(WORDS)]}"
              if j % 2 else (i * 37 + j * 11) % 1000 for j in range(24)}
    return json.dumps(fields, indent=1)


def json_messages(i: int) -> list[dict]:
    """Change one field of the record and reply with all of it, as JSON."""
    return [{"role": "system", "content": "You edit JSON. Reply with the complete edited JSON and nothing else."},
            {"role": "user", "content": f"{record(i)}\n\nSet the last field to {i + 1}."}]


def chat_messages(i: int) -> list[dict]:
    """A story with nothing to copy."""
    return [{"role": "user", "content": f"Write a long story about a {WORDS[i % len(WORDS)]} and a "
                                        f"{WORDS[(i * 7 + 3) % len(WORDS)]}, number {i}."}]


async def one(session, url: str, messages: list[dict], max_tokens: int, prediction: str | None = None,
              extra: dict | None = None) -> dict:
    """One streamed greedy chat request (`extra`: more body fields): first and last token times, tokens, accepted
    and rejected drafts."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    t0 = time.perf_counter()
    first = last = None
    usage = {}
    async for chunk in chunks(session, url, body):
        usage = chunk.get("usage") or usage
        if has_text(chunk):
            first = first or time.perf_counter()
            last = time.perf_counter()
    details = usage.get("completion_tokens_details") or {}
    return dict(first=(first or t0) - t0, last=(last or t0) - t0, tokens=usage.get("completion_tokens", 0),
                accepted=details.get("accepted_prediction_tokens", 0),
                rejected=details.get("rejected_prediction_tokens", 0))


async def level(url: str, make, n: int, max_tokens: int, prediction=None, extra: dict | None = None) -> dict:
    """`n` concurrent requests (`prediction`: one for all, or a function of the request's index): output tokens
    per second per stream (first to last token), summed; drafts kept."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        res = await asyncio.gather(*(one(s, url, make(i), max_tokens, prediction(i) if callable(prediction)
                                         else prediction, extra) for i in range(n)))
    rate = sum((r["tokens"] - 1) / max(r["last"] - r["first"], 1e-6) for r in res)
    drafted = sum(r["accepted"] + r["rejected"] for r in res)
    return dict(rate=rate, tokens=sum(r["tokens"] for r in res),
                kept=sum(r["accepted"] for r in res) / drafted if drafted else None)


def start(args: list[str], port: int, log: str):
    """A server process with `args`, once it answers."""
    import subprocess

    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", MODEL, "--port", str(port), *args],
                            stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_ready(f"http://127.0.0.1:{port}", proc)
    wait_warm(f"http://127.0.0.1:{port}")  # a warm-up compiling behind serving would share the cores with the rows
    return proc


def main() -> None:
    """Both servers, every workload and level, then the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--ngram", type=int, default=8, help="K of the n-gram server")
    ap.add_argument("--tokens", type=int, default=256, help="max_tokens of every request")
    ap.add_argument("--smoke", action="store_true", help="one level of 1, 32 tokens: check that it runs")
    ap.add_argument("--only", default="editing,json,extraction,chat,draft", help="the workloads to run")
    ap.add_argument("--draft", default=MODEL, help="the draft model of the draft-model server")
    ap.add_argument("--draft-tokens", type=int, default=4, help="K of the draft-model server")
    args = ap.parse_args()
    levels = (1,) if args.smoke else tuple(int(x) for x in args.levels.split(","))
    tokens = 32 if args.smoke else args.tokens
    common = ["--max-num-seqs", str(max(levels)), "--max-model-len", "2048"]
    rows = {}

    def run(url, name, make, pred_on=None, pred_off=None, on_url=None, extra=None):
        for n in levels:
            asyncio.run(level(url, make, n, tokens, extra=extra))  # warm this level's shapes, with drafts and without
            asyncio.run(level(on_url or url, make, n, tokens, pred_on, extra))
            off = asyncio.run(level(url, make, n, tokens, pred_off, extra))
            on = asyncio.run(level(on_url or url, make, n, tokens, pred_on, extra))
            rows[(name, n)] = (off, on)
            print(name, n, off, on, flush=True)

    plain, ngram, drafting = start(common, 8193, "/tmp/bench-spec-plain.log"), None, None
    try:
        url, only = "http://127.0.0.1:8193", args.only.split(",")
        if "editing" in only:
            run(url, "editing, its prediction", edit_messages, pred_on=code_file())
            run(url, "editing, a wrong prediction", edit_messages, pred_on=code_file(1))
        if "json" in only:  # each request's own record is its prediction
            run(url, "json editing, its prediction", json_messages, pred_on=record,
                extra={"response_format": {"type": "json_object"}})
        ngram = start([*common, "--speculative-ngram", str(args.ngram)], 8194, "/tmp/bench-spec-ngram.log")
        if "extraction" in only:
            run(url, "extraction, n-gram drafts", extract_messages, on_url="http://127.0.0.1:8194")
        if "chat" in only:
            run(url, "chat, n-gram drafts", chat_messages, on_url="http://127.0.0.1:8194")
        stop(ngram)
        ngram = None
        if "draft" in only:
            drafting = start([*common, "--speculative-model", args.draft, "--num-speculative-tokens",
                              str(args.draft_tokens)], 8195, "/tmp/bench-spec-draft.log")
            run(url, f"chat, drafts of {args.draft}", chat_messages, on_url="http://127.0.0.1:8195")
    finally:
        for proc in (plain, ngram, drafting):
            if proc is not None:
                stop(proc)
    print(f"\nSpeculative decoding, {MODEL}, greedy, {tokens} tokens max, n-gram K = {args.ngram}; output tok/s per "
          f"stream (first to last token) summed over the streams\n")
    print("| workload | streams | tok/s without | tok/s with | ratio | drafts kept |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, n), (off, on) in rows.items():
        kept = "" if on["kept"] is None else f"{on['kept']:.0%}"
        print(f"| {name} | {n} | {off['rate']:.1f} | {on['rate']:.1f} | {on['rate'] / off['rate']:.2f} | {kept} |")


if __name__ == "__main__":
    main()
