"""`sparkler run-batch`: a file of requests in OpenAI's batch format answered offline, as vLLM's `run-batch` does.

Each input line is `{"custom_id", "method": "POST", "url", "body"}`; each output line, in the input's order, is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`: the body the server's own route
answers (an API error keeps its status and error body), or `"response": null` and an `error` for a line that names
no batchable route or is not such an object. The model loads with `serve`'s flags and the requests go through the
server's routes on a loopback port, so validation, defaults and replies are the server's own; up to
`--max-concurrency` requests are in flight at once (default: twice `--max-num-seqs`), and one the server refuses
for a full queue (429) is sent again after its `Retry-After`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/score", "/v1/rerank")
log = logging.getLogger("sparkler.batch")


def _flags(ap) -> None:
    ap.add_argument("-i", "--input-file", required=True, help="the requests, one JSON object per line ('-': stdin)")
    ap.add_argument("-o", "--output-file", required=True, help="where the results go, one line each ('-': stdout)")
    ap.add_argument("--max-concurrency", type=int, default=0,
                    help="requests in flight at once (0: twice --max-num-seqs)")


def main(argv: list[str] | None = None, prog: str = "sparkler run-batch") -> int:
    """Load the model as `serve` does, answer every line of the input file, write the output file."""
    from server.__main__ import build, parse_args

    args = parse_args(argv, prog, more=_flags, description=__doc__)
    if args.num_processes > 1:
        raise SystemExit("sparkler: run-batch runs in one process (--num-processes 1)")
    try:
        lines = _read(args.input_file)
    except OSError as e:
        raise SystemExit(f"sparkler: cannot read {args.input_file}: {e}") from None
    server, what = build(args)
    log.info("sparkler: %d requests (%s)", len(lines), what)
    t0 = time.monotonic()
    try:
        results = asyncio.run(answer(server, lines, args.max_concurrency or 2 * args.max_num_seqs))
    finally:
        if server.engine.background is not None:
            server.engine.background.cancel()
    out = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output_file == "-":
        sys.stdout.write(out)
    else:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.write(out)
    failed = sum(r["error"] is not None or r["response"]["status_code"] != 200 for r in results)
    log.info("sparkler: %d requests answered in %.1f s, %d of them with an error", len(results),
             time.monotonic() - t0, failed)
    return 0


def _read(path: str) -> list[str]:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    return [line for line in text.splitlines() if line.strip()]


def check(line: str) -> tuple[dict | None, str | None]:
    """`(the request, None)` for a valid input line, else `(None, why not)`."""
    try:
        req = json.loads(line)
    except ValueError as e:
        return None, f"the line is not JSON: {e}"
    if not isinstance(req, dict) or not isinstance(req.get("body"), dict):
        return None, "each line must be an object with 'custom_id', 'method', 'url' and a 'body' object"
    if req.get("method", "POST") != "POST":
        return None, f"'method' must be POST, got {req.get('method')!r}"
    if req.get("url") not in URLS:
        return None, f"'url' must be one of {', '.join(URLS)}, got {req.get('url')!r}"
    if req["body"].get("stream"):
        return None, "a batch request cannot stream ('stream': true)"
    return req, None


async def answer(server, lines: list[str], concurrency: int) -> list[dict]:
    """Each line's result, in order, from `server` listening on a loopback port for the duration."""
    import aiohttp
    from aiohttp import web

    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    gate, done = asyncio.Semaphore(max(1, concurrency)), [0]

    async def one(session, line: str) -> dict:
        req, why = check(line)
        custom_id = req.get("custom_id") if req is not None else None
        out = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": None}
        if why is not None:
            try:
                out["custom_id"] = json.loads(line).get("custom_id")
            except (ValueError, AttributeError):
                pass
            out["error"] = {"code": "invalid_request", "message": why}
            return out
        async with gate:
            while True:
                async with session.post(base + req["url"], json=req["body"], headers=headers) as r:
                    if r.status == 429:
                        await asyncio.sleep(float(r.headers.get("Retry-After", 1)))
                        continue
                    body = await r.json(content_type=None)
                    break
        rid = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
        out["response"] = {"status_code": r.status, "request_id": rid or f"req_{uuid.uuid4().hex}", "body": body}
        done[0] += 1
        if done[0] % 100 == 0:
            log.info("sparkler: %d of %d requests answered", done[0], len(lines))
        return out

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            return await asyncio.gather(*(one(session, line) for line in lines))
    finally:
        await runner.cleanup()
        server.close()
