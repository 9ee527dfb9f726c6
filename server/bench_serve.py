"""`sparkler bench serve`: a serving load against any OpenAI-compatible server (this one, vLLM, SGLang, llama.cpp's),
measured from the client as `vllm bench serve` measures it: random prompts of a fixed length in tokens, streamed
completions or chat completions of a fixed length (`ignore_eos`), sent all at once, at a Poisson request rate, or
capped at a concurrency; then request and token throughput, time to first token (TTFT), time per output token after
the first (TPOT), the gaps between streamed chunks (ITL) and end-to-end latency, mean / median / p99 (or the
`--metric-percentiles` asked), and with `--goodput` the requests per second that met its SLOs. vLLM's random
dataset's options shape the load: a prefix every prompt shares (`--random-prefix-len`), lengths drawn from a range
(`--random-range-ratio`), and gamma-distributed arrivals (`--burstiness`); or `--dataset-name sharegpt` sends a
ShareGPT file's conversations (`sharegpt`), as vLLM's standard benchmark does.

A prompt is a list of token ids (the completions API takes them; no tokenizer is needed, and its length is exact),
drawn from `--token-range` so it is valid in any common vocabulary; chat sends those ids' text as the user message,
read from the server's `/detokenize` (vLLM's, llama.cpp's and this server's; as vLLM's random dataset decodes its
ids), else as many words (a server without it); either way a count of tokens that differs by what the template and
tokenizer's merges make of it. A chunk counts when it carries generated text, reasoning or tool calls. A
token count comes from the stream's `usage` (`stream_options.include_usage`), else one per chunk. Failed requests
are counted and the first error shown; the exit status is 1 if any failed. Each request opens its own connection
(a loopback connect: well under a millisecond; no server's keep-alive limit can drop a request). `bench/gpu_serve.py`
drives its load through `request` too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import numpy as np

GENERATED = ("content", "reasoning_content", "reasoning", "tool_calls")  # a chat delta's generated parts
WORDS = ("river mountain lantern copper violet harbor meadow signal orchard marble canyon ember falcon glacier "
         "thistle quartz willow beacon").split()


@dataclasses.dataclass
class Result:
    """One request as the client saw it: seconds to the first token and to the end, the chunks' arrival times,
    the tokens in and out, and the error if it failed."""

    ttft: float = 0.0
    latency: float = 0.0
    arrivals: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def prompts(n: int, length: int, seed: int, low: int = 1000, high: int = 20000, prefix: int = 0,
            ratio: float = 0.0) -> list[list[int]]:
    """`n` prompts of token ids in `[low, high)`: `prefix` ids shared by all (vLLM's `--random-prefix-len`), then
    `length` ids each (a length drawn from `lengths` where `ratio` > 0), each its own from there."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(low, high, prefix).tolist() if prefix else []
    return [shared + rng.integers(low, high, k).tolist() for k in lengths(n, length, ratio, rng)]


def lengths(n: int, length: int, ratio: float, rng: np.random.Generator) -> list[int]:
    """`n` lengths uniform over `[length * (1 - ratio), length * (1 + ratio)]`, at least 1 (vLLM's
    `--random-range-ratio`); all `length` at ratio 0."""
    if ratio == 0:
        return [length] * n
    return rng.integers(max(1, math.floor(length * (1 - ratio))), math.ceil(length * (1 + ratio)) + 1, n).tolist()


def arrivals(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Each request's send time from the first (at 0): gaps drawn from a gamma distribution of shape `burstiness` and
    mean 1 / `rate` (vLLM's: 1 is a Poisson process, less is burstier, more steadier); all at 0 at an infinite rate."""
    if not math.isfinite(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1 / (rate * burstiness), n)
    return np.concatenate([[0.0], np.cumsum(gaps)[:-1]])


def body(endpoint: str, model: str, prompt: list[int] | str, tokens: int, ignore_eos: bool = True) -> dict:
    """The streamed request of one prompt: its ids (completions), or a user message (chat) of its text (`texts`)
    or, given ids, as many words."""
    out = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": True,
           "stream_options": {"include_usage": True}}
    if ignore_eos:
        out["ignore_eos"] = True
    if endpoint == "chat":
        text = prompt if isinstance(prompt, str) else " ".join(WORDS[t % len(WORDS)] for t in prompt)
        return {**out, "messages": [{"role": "user", "content": text}]}
    return {**out, "prompt": prompt}


def _post(url: str, path: str, body: dict, api_key: str | None) -> dict | None:
    """The server's JSON answer to a POST, None where it has no such route or answers otherwise."""
    import urllib.request

    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.load(r)
    except (OSError, ValueError):  # (urllib's HTTPError is an OSError)
        return None
    return reply if isinstance(reply, dict) else None


def texts(url: str, ids: list[list[int]], api_key: str | None = None) -> list[str] | None:
    """Each prompt's text from the server's `POST /detokenize` (vLLM's answer `prompt`, llama.cpp's `content`);
    None where the server has no such route or answers otherwise."""
    out = []
    for prompt in ids:
        reply = _post(url, "/detokenize", {"tokens": prompt}, api_key) or {}
        text = reply.get("prompt", reply.get("content"))
        if not isinstance(text, str) or not text:
            return None
        out.append(text)
    return out


def count(url: str, text: str, api_key: str | None = None) -> int | None:
    """`text`'s tokens by the server's `POST /tokenize` (vLLM's `prompt`, llama.cpp's `content`), None without it."""
    reply = _post(url, "/tokenize", {"prompt": text, "content": text}, api_key) or {}
    return len(reply["tokens"]) if isinstance(reply.get("tokens"), list) else None


def sharegpt(path: str, n: int, seed: int, url: str, api_key: str | None = None,
             output_len: int | None = None) -> tuple[list[str], list[int]]:
    """`n` prompts of a ShareGPT file (vLLM's `--dataset-name sharegpt`: a JSON list of `{"conversations": [{"from",
    "value"}, ...]}`), shuffled by `seed`: each conversation's first turn as the prompt, and the second's length in
    the server's tokens as the reply's (or `output_len`); as vLLM's sampler, pairs of fewer than 4 tokens either
    side, a prompt past 1,024 tokens or a pair past 2,048 are skipped. `(prompts, output lengths)`; ValueError where
    the file holds too few, or the server counts no tokens (`/tokenize`)."""
    import random

    with open(path) as f:
        data = json.load(f)
    pairs = [(c[0]["value"], c[1]["value"]) for c in (d.get("conversations") for d in data if isinstance(d, dict))
             if isinstance(c, list) and len(c) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                            for t in c[:2])]
    random.Random(seed).shuffle(pairs)
    prompts_, lens = [], []
    for prompt, reply in pairs:
        if len(prompts_) == n:
            break
        given = count(url, prompt, api_key)
        made = output_len or count(url, reply, api_key)
        if given is None or made is None:
            raise ValueError(f"{url} counts no tokens (POST /tokenize): pass --sharegpt-output-len")
        if given < 4 or made < 4 or given > 1024 or given + made > 2048:
            continue
        prompts_.append(prompt)
        lens.append(made)
    if len(prompts_) < n:
        raise ValueError(f"{path} holds {len(prompts_)} usable conversations, fewer than --num-prompts {n}")
    return prompts_, lens


async def request(session, url: str, endpoint: str, payload: dict, headers: dict | None = None) -> Result:
    """Send one streamed request and time it (`aiohttp` session; `url` the server's root)."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    res, usage, chunks = Result(), None, 0
    t0 = time.perf_counter()
    try:
        async with session.post(url + path, json=payload, headers=headers or {}) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    res.error = json.dumps(chunk["error"])[:300]
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                if any(c.get("text") or c.get("token_ids") or any((c.get("delta") or {}).get(k) for k in GENERATED)
                       for c in choices):
                    res.arrivals.append(time.perf_counter() - t0)
                    chunks += 1
    except Exception as e:  # noqa: BLE001  (a dropped connection, a bad chunk: this request failed, the run goes on)
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - t0
    res.ttft = res.arrivals[0] if res.arrivals else res.latency
    res.prompt_tokens = (usage or {}).get("prompt_tokens", 0)
    res.output_tokens = (usage or {}).get("completion_tokens", chunks)
    if res.error is None and not res.arrivals:
        res.error = "the stream carried no tokens"
    return res


async def run(url: str, endpoint: str, model: str, ids: list[list[int]] | list[str], tokens: int | list[int],
              concurrency: int | None = None,
              rate: float = math.inf, seed: int = 0, api_key: str | None = None,
              ignore_eos: bool = True, burstiness: float = 1.0) -> tuple[list[Result], float]:
    """Send every prompt for `tokens` each (or its own count of a list), at most `concurrency` in flight, at `rate`
    requests/s (`arrivals`: Poisson at `burstiness` 1; all at once where infinite); the results, in prompt order, and
    the wall time from the first send to the last answer."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency or len(ids))
    starts = arrivals(len(ids), rate, burstiness, seed)
    asked = tokens if isinstance(tokens, list) else [tokens] * len(ids)

    async def one(session, i: int, prompt: list[int] | str) -> Result:
        await asyncio.sleep(float(starts[i]))
        async with gate:
            return await request(session, url, endpoint, body(endpoint, model, prompt, asked[i], ignore_eos), headers)

    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    # a connection per request: no server's keep-alive limit (llama.cpp's closes after a few) can drop one
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True)) \
            as session:
        t = time.perf_counter()
        results = await asyncio.gather(*(one(session, i, p) for i, p in enumerate(ids)))
        return list(results), time.perf_counter() - t


def _tpot(r: Result) -> float | None:
    """A request's seconds per output token after the first (None for one token)."""
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def summary(results: list[Result], wall: float, percentiles: tuple[float, ...] = (99,),
            goodput: dict[str, float] | None = None) -> dict:
    """vLLM's figures of a run: counts, throughputs, TTFT / TPOT / ITL / E2E in ms (mean, median and each of
    `percentiles`), and with `goodput` (SLOs in ms of "ttft", "tpot", "e2el") the requests per second that met
    every one."""
    ok = [r for r in results if r.error is None]
    out = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": wall,
           "total_input_tokens": sum(r.prompt_tokens for r in ok),
           "total_output_tokens": sum(r.output_tokens for r in ok),
           "request_throughput": len(ok) / wall if wall else 0.0}
    out["output_throughput"] = out["total_output_tokens"] / wall if wall else 0.0
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / wall if wall else 0.0
    tpot = [t for t in map(_tpot, ok) if t is not None]
    itl = [b - a for r in ok for a, b in zip(r.arrivals, r.arrivals[1:])]
    for name, xs in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl), ("e2el", [r.latency for r in ok])):
        ms = [x * 1000 for x in xs] or [0.0]
        out.update({f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms)})
        out.update({f"p{p:g}_{name}_ms": float(np.percentile(ms, p)) for p in percentiles})
    if goodput:
        def met(r: Result) -> bool:
            figures = {"ttft": r.ttft, "tpot": _tpot(r) or 0.0, "e2el": r.latency}
            return all(figures[k] * 1000 <= slo for k, slo in goodput.items())
        out["request_goodput"] = sum(map(met, ok)) / wall if wall else 0.0
    out["first_error"] = next((r.error for r in results if r.error is not None), None)
    return out


def table(s: dict, percentiles: tuple[float, ...] = (99,)) -> str:
    """`summary` as a markdown table."""
    rows = [("Successful requests", f"{s['completed']}"), ("Failed requests", f"{s['failed']}"),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
            ("Total input tokens", f"{s['total_input_tokens']}"),
            ("Total generated tokens", f"{s['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}")]
    if "request_goodput" in s:
        rows.append(("Request goodput (req/s)", f"{s['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s)", f"{s['output_throughput']:.1f}"),
             ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.1f}")]
    for name, what in (("ttft", "Time to first token"), ("tpot", "Time per output token (after the first)"),
                       ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        rows += [(f"{what}, {k} (ms)", f"{s[f'{k}_{name}_ms']:.2f}") for k in
                 ("mean", "median", *(f"p{p:g}" for p in percentiles))]
    return "\n".join(["| measurement | value |", "| --- | ---: |", *(f"| {a} | {b} |" for a, b in rows)])


def _percentiles(text: str) -> tuple[float, ...]:
    """`--metric-percentiles`' comma-separated values, each in (0, 100]."""
    out = tuple(float(x) for x in text.split(","))
    if not all(0 < p <= 100 for p in out):
        raise ValueError(text)
    return out


def _goodput(items: list[str]) -> dict[str, float]:
    """`--goodput`'s `KEY:MS` pairs (KEY: ttft, tpot or e2el; MS > 0)."""
    out = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not float(value) > 0:
            raise ValueError(item)
        out[key] = float(value)
    return out


def _served_model(url: str, api_key: str | None) -> str:
    """The server's first model id (`/v1/models`)."""
    import urllib.request

    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["data"][0]["id"]


def main(argv: list[str]) -> int:
    """`sparkler bench serve ...`: run the load, print the table (and save the figures as JSON where asked)."""
    ap = argparse.ArgumentParser(prog="sparkler bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("SPARKLER_URL", "http://127.0.0.1:8000"),
                    help="the server's root (default: $SPARKLER_URL or http://127.0.0.1:8000)")
    ap.add_argument("--api-key", default=os.environ.get("SPARKLER_API_KEY"))
    ap.add_argument("--model", default=None, help="model id (default: the server's first)")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all)")
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests per second, Poisson arrivals (default: inf, all at once)")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="the arrivals' gamma shape: 1 Poisson, less burstier, more steadier (vLLM's)")
    ap.add_argument("--input-len", "--random-input-len", type=int, default=512, help="prompt tokens")
    ap.add_argument("--output-len", "--random-output-len", type=int, default=128, help="tokens to generate")
    ap.add_argument("--dataset-name", choices=("random", "sharegpt"), default="random",
                    help="random token ids, or a ShareGPT file's conversations (vLLM's)")
    ap.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file")
    ap.add_argument("--sharegpt-output-len", type=int, default=None,
                    help="tokens to generate for every ShareGPT prompt (default: its reply's length)")
    ap.add_argument("--random-prefix-len", type=int, default=0,
                    help="tokens of a prefix every prompt shares, before its own --input-len (the prefix cache's)")
    ap.add_argument("--random-range-ratio", type=float, default=0.0,
                    help="input and output lengths drawn from [len * (1 - r), len * (1 + r)] (0 <= r < 1)")
    ap.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles to report (vLLM's)")
    ap.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                    help="SLOs (ttft, tpot, e2el in ms) a request must meet to count in the goodput")
    ap.add_argument("--token-range", type=int, nargs=2, default=(1000, 20000), metavar=("LOW", "HIGH"),
                    help="the prompts' token ids are drawn from [LOW, HIGH)")
    ap.add_argument("--no-ignore-eos", action="store_true", help="let replies end at an end of sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-result", default=None, metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or (args.max_concurrency or 1) < 1:
        ap.error("--num-prompts, --input-len, --output-len and --max-concurrency must be positive")
    if not args.request_rate > 0:
        ap.error("--request-rate must be positive (inf: all at once)")
    if not 0 <= args.token_range[0] < args.token_range[1]:
        ap.error("--token-range: 0 <= LOW < HIGH")
    if args.random_prefix_len < 0 or not 0 <= args.random_range_ratio < 1 or not args.burstiness > 0:
        ap.error("--random-prefix-len >= 0, 0 <= --random-range-ratio < 1 and --burstiness > 0")
    if (args.dataset_name == "sharegpt") != (args.dataset_path is not None):
        ap.error("--dataset-path names the ShareGPT file of --dataset-name sharegpt (and only that)")
    if args.sharegpt_output_len is not None and args.sharegpt_output_len < 1:
        ap.error("--sharegpt-output-len must be positive")
    try:
        percentiles = _percentiles(args.metric_percentiles)
        goodput = _goodput(args.goodput or [])
    except ValueError as e:
        ap.error(f"--metric-percentiles: numbers in (0, 100]; --goodput: ttft|tpot|e2el:MS (got {e})")
    url = args.url.rstrip("/").removesuffix("/v1")
    try:
        model = args.model or _served_model(url, args.api_key)
    except OSError as e:
        print(f"sparkler bench serve: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, IndexError, TypeError):
        print(f"sparkler bench serve: {url}/v1/models names no model: pass --model", file=sys.stderr)
        return 1
    ids = prompts(args.num_prompts, args.input_len, args.seed, *args.token_range, args.random_prefix_len,
                  args.random_range_ratio)
    asked = lengths(args.num_prompts, args.output_len, args.random_range_ratio, np.random.default_rng(args.seed + 1))
    chat_prompts = None
    if args.dataset_name == "sharegpt":
        try:
            ids, asked = sharegpt(args.dataset_path, args.num_prompts, args.seed, url, args.api_key,
                                  args.sharegpt_output_len)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"sparkler bench serve: --dataset-path {args.dataset_path}: {e}", file=sys.stderr)
            return 1
    elif args.endpoint == "chat":
        written = texts(url, ids, args.api_key)
        chat_prompts = "words" if written is None else "detokenized"
        ids = written or ids
    shape = "ShareGPT's" if args.dataset_name == "sharegpt" else f"{args.input_len} tokens in, {args.output_len} out,"
    print(f"{args.num_prompts} requests of {shape} to {model} at {url} "
          f"({args.endpoint}{f', {chat_prompts} prompts' if chat_prompts else ''}; concurrency "
          f"{args.max_concurrency or 'unbounded'}, rate {args.request_rate})",
          file=sys.stderr)
    results, wall = asyncio.run(run(url, args.endpoint, model, ids, asked, args.max_concurrency,
                                    args.request_rate, args.seed, args.api_key, not args.no_ignore_eos,
                                    args.burstiness))
    figures = summary(results, wall, percentiles, goodput)
    print(table(figures, percentiles))
    if figures["first_error"]:
        print(f"first error: {figures['first_error']}", file=sys.stderr)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({**figures, "model": model, "endpoint": args.endpoint, "chat_prompts": chat_prompts,
                       "dataset_name": args.dataset_name,
                       "num_prompts": args.num_prompts,
                       "input_len": args.input_len, "output_len": args.output_len,
                       "random_prefix_len": args.random_prefix_len,
                       "random_range_ratio": args.random_range_ratio, "burstiness": args.burstiness,
                       "goodput": goodput or None, "max_concurrency": args.max_concurrency,
                       "request_rate": args.request_rate if math.isfinite(args.request_rate) else None}, f, indent=1)
    return 1 if figures["failed"] else 0
