"""The first five minutes, measured: `sparkler serve` with its default flags beside `--quantization none`, each
started cold (an empty `$SPARKLER_CACHE`: conversion, the C++ kernels' build and every compilation) and then warm
(the same cache again), through HTTP.

Per path: what `--quantization auto` chose, seconds from start to ready (`/v1/models` answers) and to the first
answered chat, cold and warm, then single-stream and 32-concurrent decode rates (bench/serve.py's client:
streamed chat, 128 new tokens, `ignore_eos`). Prints one markdown table; `make bench-startup`. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import ROOT, measure, stop, wait_ready, wait_warm  # noqa: E402

SPARKLER = os.path.join(os.path.dirname(sys.executable), "sparkler")


def first_answer(url: str) -> None:
    """One short greedy chat request (waits for whatever it needs)."""
    body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        json.load(r)


def start(flags: list[str], cache: str, port: int, log: str, rates: bool, tokens: int) -> dict:
    """Start the server on `cache`, time ready and first answer, optionally measure rates, stop it."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen([SPARKLER, "serve", "--port", str(port), *flags], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT, env={**os.environ, "SPARKLER_CACHE": cache})
        try:
            wait_ready(url, proc)
            out = {"ready": time.perf_counter() - t}
            first_answer(url)
            out["answer"] = time.perf_counter() - t
            if rates:  # once the background warm-up is done (it compiles on a core the rates need)
                wait_warm(url)
                out.update(asyncio.run(measure(url, tokens, (1, 32))))  # a round at each first: its shapes compile
        finally:
            stop(proc)
    chosen = re.search(r"quantization (\w+) \(([^)]*)\)", open(log).read())
    out["chosen"] = f"{chosen[1]} ({chosen[2]})" if chosen else "?"
    return out


def main() -> None:
    """Both paths, cold then warm, one table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for name, flags in (("default (`sparkler serve`)", []), ("`--quantization none`", ["--quantization", "none"])):
        with tempfile.TemporaryDirectory(prefix="sparkler-cache-") as cache:
            cold = start(flags, cache, 8193, "/tmp/bench-startup-cold.log", False, args.tokens)
            warm = start(flags, cache, 8193, "/tmp/bench-startup-warm.log", True, args.tokens)
        rows.append((name, warm["chosen"], cold, warm))
    print("| path | quantization chosen | ready cold (s) | first answer cold (s) | ready warm (s) | "
          "first answer warm (s) | single stream (tok/s) | 32 concurrent (tok/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, chosen, cold, warm in rows:
        print(f"| {name} | {chosen} | {cold['ready']:.1f} | {cold['answer']:.1f} | {warm['ready']:.1f} | "
              f"{warm['answer']:.1f} | {warm['single']:.1f} | {warm['agg32']:.1f} |")


if __name__ == "__main__":
    main()
