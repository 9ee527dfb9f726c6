"""Soak test: N concurrent clients for M seconds against `python -m server` on loopback, mixing chat and completions,
streaming and not, n > 1, every sampler setting, clients that abandon streams, clients that read slowly, and bad
requests. At the end it asserts that every well-formed request either completed exactly (token counts and finish
reasons) or was refused with 429, that all slots and pages are free, that the server's RSS grew by less than a bound,
and that SIGTERM stops it with status 0; then prints a table. Bounded in time and count; loopback only.

    python bench/soak.py --clients 128 --seconds 600      # `make soak`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time

import urllib.request

import aiohttp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-instruct"
TOPICS = ["the sea", "a robot", "Paris", "bread", "rain", "chess", "a violin", "mountains", "tea", "a lighthouse"]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024


def settings(rng: random.Random) -> dict:
    """A random mix of every sampling field."""
    out = {"temperature": rng.choice([0, 0.3, 0.8, 1.2]), "seed": rng.randrange(1 << 30)}
    if rng.random() < 0.5:
        out |= {"top_k": rng.choice([0, 5, 40]), "top_p": rng.choice([1.0, 0.9]), "min_p": rng.choice([0, 0.05])}
    if rng.random() < 0.3:
        out |= {"typical_p": 0.9, "repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.3}
    if rng.random() < 0.2:
        out |= {"mirostat_target": 4.0, "mirostat_lr": 0.1}
    if rng.random() < 0.2:
        out |= {"logit_bias": {str(rng.randrange(100, 40000)): 5.0}}
    if rng.random() < 0.2:
        out |= {"logprobs": True, "top_logprobs": 3}
    return out


def bad_body(rng: random.Random) -> dict:
    """A request that must get a 400."""
    return rng.choice([{"messages": []}, {"messages": "hi"}, {"temperature": 7, "messages": [{"role": "user",
                       "content": "x"}]}, {"prompt": {"x": 1}}, {"messages": [{"role": "user", "content": "x"}],
                                                                 "n": 0}, {"prompt": "x", "top_k": -1}])


class Stats:
    """Outcomes and latencies of every request."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.tokens = 0
        self.errors: list[str] = []

    def add(self, what: str) -> None:
        """Count one outcome."""
        self.count[what] = self.count.get(what, 0) + 1


async def client(url: str, cid: int, until: float, stats: Stats) -> None:
    """One client: a random request after another until `until`."""
    rng = random.Random(cid)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        while time.monotonic() < until:
            kind = rng.choices(["chat", "completion", "stream", "abandon", "slow", "bad"], [3, 2, 3, 1, 1, 1])[0]
            max_tokens, n = rng.randint(1, 48), rng.choice([1, 1, 1, 2, 3])
            route = "/v1/completions" if kind == "completion" or (kind == "stream" and rng.random() < 0.5) \
                else "/v1/chat/completions"
            body = {"model": MODEL, "max_tokens": max_tokens, "n": n, "ignore_eos": True, **settings(rng)}
            topic = rng.choice(TOPICS)
            if route == "/v1/completions":
                body["prompt"] = f"A short story about {topic}:"
                body.pop("top_logprobs", None)
                if body.pop("logprobs", None):
                    body["logprobs"] = 2
            else:
                body["messages"] = [{"role": "user", "content": f"Tell me about {topic}."}]
            t0 = time.monotonic()
            try:
                if kind == "bad":
                    async with http.post("/v1/chat/completions", json=bad_body(rng)) as r:
                        text = await r.text()
                    stats.add("bad → 400" if r.status == 400 else f"bad → {r.status}")
                    if r.status != 400:
                        stats.errors.append(f"bad request answered {r.status}: {text[:200]}")
                    continue
                if kind in ("chat", "completion"):
                    async with http.post(route, json=body) as r:
                        text = await r.text()
                    if r.status == 429:
                        stats.add("refused (429)")
                        await asyncio.sleep(float(r.headers.get("Retry-After", 1)) + rng.uniform(0, 1))  # as told
                        continue
                    out = json.loads(text)
                    ok = r.status == 200 and out["usage"]["completion_tokens"] == n * max_tokens and all(
                        c["finish_reason"] == "length" for c in out["choices"]) and len(out["choices"]) == n
                    stats.add(f"{kind} ok" if ok else f"{kind} WRONG")
                    if not ok:
                        stats.errors.append(f"{route} {r.status}: {text[:300]}")
                    stats.latency.append(time.monotonic() - t0)
                    stats.tokens += out.get("usage", {}).get("completion_tokens", 0)
                    continue
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                async with http.post(route, json=body) as r:
                    if r.status == 429:
                        stats.add("refused (429)")
                        await r.read()
                        await asyncio.sleep(float(r.headers.get("Retry-After", 1)) + rng.uniform(0, 1))  # as told
                        continue
                    first, finished, used, events, done = None, {}, None, 0, False
                    async for raw in r.content:
                        line = raw.decode().rstrip("\r\n")
                        if not line.startswith("data: "):
                            continue
                        events += 1
                        if kind == "abandon" and events >= 3:
                            r.close()  # drop the connection mid-stream
                            break
                        if kind == "slow":
                            await asyncio.sleep(0.05)
                        if line == "data: [DONE]":
                            done = True
                            break
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            stats.errors.append(f"stream error: {chunk}")
                            break
                        for c in chunk.get("choices", []):
                            if first is None and (c.get("text") or (c.get("delta") or {}).get("content")):
                                first = time.monotonic() - t0
                            if c.get("finish_reason"):
                                finished[c["index"]] = c["finish_reason"]
                        used = chunk.get("usage") or used
                if kind == "abandon":
                    stats.add("abandoned")
                    continue
                ok = done and used and used["completion_tokens"] == n * max_tokens and sorted(finished) == list(
                    range(n)) and set(finished.values()) == {"length"}
                stats.add(f"{kind} ok" if ok else f"{kind} WRONG")
                if not ok:
                    stats.errors.append(f"stream {route}: done={done} usage={used} finished={finished}")
                if first is not None:
                    stats.ttft.append(first)
                stats.latency.append(time.monotonic() - t0)
                stats.tokens += used["completion_tokens"] if used else 0
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
                stats.add("client exception")
                stats.errors.append(f"{kind}: {type(e).__name__}: {e}")


def pct(xs: list[float], q: float) -> str:
    """A percentile in milliseconds."""
    return f"{np.percentile(xs, q) * 1000:.0f}" if xs else "-"


def main() -> None:
    """Run the soak and print the table; exit 1 if any check failed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-queued", type=int, default=64)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--rss-growth-mb", type=float, default=500)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from server.child import spawn

    child = spawn("--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "1024", "--kv-cache-gb",
                  str(args.kv_cache_gb), "--max-queued-requests", str(args.max_queued), "--log-format", "json")
    proc, url = child.proc, child.url
    stats = Stats()
    try:
        asyncio.run(client(url, -1, time.monotonic() + 5, Stats()))  # warm the common shapes, then measure RSS
        rss0 = rss_mb(proc.pid)
        t0 = time.monotonic()

        async def run():
            until = time.monotonic() + args.seconds
            await asyncio.gather(*(client(url, i, until, stats) for i in range(args.clients)))

        asyncio.run(run())
        wall = time.monotonic() - t0
        deadline, health = time.time() + 60, {}
        while time.time() < deadline:
            with urllib.request.urlopen(url + "/health", timeout=30) as h:
                health = json.loads(h.read())
            if health["free_slots"] == health["slots"] and not health["waiting"] and not health["running"]:
                break
            time.sleep(0.2)
        rss1 = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    checks = {
        "no wrong answers or errors": not stats.errors,
        "every slot free": health.get("free_slots") == health.get("slots"),
        "every page free": health.get("kv_pages_free") == health.get("kv_pages_total"),
        f"RSS grew < {args.rss_growth_mb:.0f} MB": rss1 - rss0 < args.rss_growth_mb,
        "SIGTERM exit status 0": code == 0,
    }
    total = sum(stats.count.values())
    rows = [("clients x seconds", f"{args.clients} x {args.seconds:.0f}"), ("requests", f"{total}"),
            *((k, str(v)) for k, v in sorted(stats.count.items())),
            ("tokens generated", f"{stats.tokens}"), ("tokens/s", f"{stats.tokens / wall:.1f}"),
            ("TTFT p50 / p99 (ms, streams)", f"{pct(stats.ttft, 50)} / {pct(stats.ttft, 99)}"),
            ("latency p50 / p99 (ms)", f"{pct(stats.latency, 50)} / {pct(stats.latency, 99)}"),
            ("server RSS start → end (MB)", f"{rss0:.0f} → {rss1:.0f}"),
            ("preemptions, prefix-cache hit rate",
             f"{health.get('preemptions')}, {health.get('prefix_cache_hit_rate')}"),
            ("errors", f"{len(stats.errors)}"),
            *((f"check: {k}", "pass" if v else "FAIL") for k, v in checks.items())]
    print("| soak | value |\n| --- | --- |")
    print("\n".join(f"| {k} | {v} |" for k, v in rows))
    for e in stats.errors[:20]:
        print("error:", e)
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
