"""`sparkler run-batch`: a file of requests in OpenAI's batch format answered offline, as vLLM's `run-batch` does.

Each input line is `{"custom_id", "method": "POST", "url", "body"}`; each output line, in the input's order, is
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`: the body the server's own route
answers (an API error keeps its status and error body), or `"response": null` and an `error` for a line that names
no batchable route or is not such an object. The model loads with `serve`'s flags and the requests go through the
server's routes on a loopback port, so validation, defaults and replies are the server's own; up to
`--max-concurrency` requests are in flight at once (default: twice `--max-num-seqs`); one the server refuses for a
full queue (429) is sent again after its `Retry-After` while other requests are in flight (else the 429 is its
answer). Each result is written as soon as the lines before it are, so a stopped run keeps what it finished.
An API error is a response with its status and error body, as OpenAI's batches return it (vLLM's `run-batch`
puts it under `error` with a null body instead).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/score",
        "/v1/rerank", "/score", "/rerank", "/v2/rerank")
log = logging.getLogger("sparkler.batch")


def _flags(ap) -> None:
    ap.add_argument("-i", "--input-file", required=True, help="the requests, one JSON object per line ('-': stdin)")
    ap.add_argument("-o", "--output-file", required=True, help="where the results go, one line each ('-': stdout)")
    ap.add_argument("--max-concurrency", type=int, default=0,
                    help="requests in flight at once (0: twice --max-num-seqs)")


def main(argv: list[str] | None = None, prog: str = "sparkler run-batch") -> int:
    """Load the model as `serve` does, answer every line of the input file, and write each result as soon as the
    lines before it are written."""
    from server.__main__ import build, parse_args

    args = parse_args(argv, prog, more=_flags, description=__doc__)
    if args.num_processes > 1:
        raise SystemExit("sparkler: run-batch runs in one process (--num-processes 1)")
    try:
        lines = _read(args.input_file)
        sink = sys.stdout if args.output_file == "-" else open(args.output_file, "w", encoding="utf-8")
    except OSError as e:  # before the model loads
        raise SystemExit(f"sparkler: {e}") from None
    args.files_dir = ""  # not the default folder a server keeps its batches in: no lock taken on it
    server, what = build(args)
    log.info("sparkler: %d requests (%s)", len(lines), what)
    t0 = time.monotonic()
    try:
        failed = asyncio.run(answer(server, lines, args.max_concurrency or 2 * args.max_num_seqs, sink))
    finally:
        if server.engine.background is not None:
            server.engine.background.cancel()
        if sink is not sys.stdout:
            sink.close()
    log.info("sparkler: %d requests answered in %.1f s, %d of them with an error", len(lines),
             time.monotonic() - t0, failed)
    return 0


def _read(path: str) -> list[str]:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8", errors="surrogateescape").read()
    return lines_of(text)


def lines_of(text: str) -> list[str]:
    """A JSONL text's non-blank lines, split at newlines only (JSON text may hold U+2028 and the like raw, which
    `str.splitlines` would split at)."""
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def check(line: str) -> tuple[dict | None, str | None]:
    """`(the request, None)` for a valid input line, else `(None, why not)`."""
    if any("\udc80" <= ch <= "\udcff" for ch in line):  # bytes that were no UTF-8, as the file was read
        return None, "the line is not UTF-8 text"
    try:
        req = json.loads(line)
    except ValueError as e:
        return None, f"the line is not JSON: {e}"
    except RecursionError:
        return None, "the line is not JSON this server reads: it nests too deeply"
    if not isinstance(req, dict) or not isinstance(req.get("body"), dict):
        return None, "each line must be an object with 'custom_id', 'method', 'url' and a 'body' object"
    if req.get("method", "POST") != "POST":
        return None, f"'method' must be POST, got {req.get('method')!r}"
    if req.get("url") not in URLS:
        return None, f"'url' must be one of {', '.join(URLS)}, got {req.get('url')!r}"
    if req["body"].get("stream"):
        return None, "a batch request cannot stream ('stream': true)"
    if req["body"].get("encoding_format") in ("bytes", "bytes_only"):
        return None, "a batch request's result is JSON: 'encoding_format' must be 'float' or 'base64'"
    if req["body"].get("background"):
        return None, "a batch request is answered when done: it cannot run in the background ('background': true)"
    return req, None


def custom_id(line: str):
    """A line's `custom_id` as far as it reads (None where it does not, or is no UTF-8)."""
    try:
        cid = json.loads(line).get("custom_id")
        if isinstance(cid, str):
            cid.encode()  # no bytes that were no UTF-8 (`check`)
        return cid
    except (ValueError, AttributeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None


async def answer(server, lines: list[str], concurrency: int, sink) -> int:
    """Answer each line through `server`, listening on a loopback port for the duration, and write the results to
    `sink` in the input's order as they complete; the number of lines that got no 200."""
    loopback = Loopback(server)
    state = {"written": 0, "failed": 0}

    def write(out: dict) -> None:
        sink.write(json.dumps(out, ensure_ascii=False) + "\n")
        state["failed"] += failed(out)
        state["written"] += 1
        if state["written"] % 100 == 0:
            sink.flush()
            log.info("sparkler: %d of %d requests answered", state["written"], len(lines))

    try:
        await send(await loopback.start(), loopback.headers, lines, concurrency, InOrder(len(lines), write).put)
        return state["failed"]
    finally:
        sink.flush()
        await loopback.close()
        server.close()


def failed(out: dict) -> bool:
    """Whether a result line is an error: no response, or a status other than 200."""
    return out["error"] is not None or out["response"]["status_code"] != 200


class InOrder:
    """Results written in their lines' order as they complete: `put(i, out)` holds a result until the lines before it
    are written; `rest()` the results still held (a stopped batch's), in order."""

    def __init__(self, n: int, write):
        self.held: dict[int, dict] = {}
        self.next, self.n, self.write = 0, n, write

    def put(self, i: int, out: dict) -> None:
        """Take line `i`'s result, and write every result now in order."""
        self.held[i] = out
        while self.next in self.held:
            self.write(self.held.pop(self.next))
            self.next += 1

    def rest(self) -> list[int]:
        """Write the results held (past a line with none), and return the lines that have none."""
        missing = [i for i in range(self.next, self.n) if i not in self.held]
        for i in sorted(self.held):
            self.write(self.held.pop(i))
        return missing


class Loopback:
    """The server's routes on a loopback port of their own, where batch lines are sent (so validation, defaults and
    replies are the routes' own)."""

    def __init__(self, server):
        self.server, self.runner, self.base = server, None, ""
        self.headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
        self.starting = asyncio.Lock()  # batches starting at once wait for one listener

    async def start(self) -> str:
        """The base URL, listening from the first call on."""
        from aiohttp import web

        async with self.starting:
            if self.runner is None:
                runner = web.AppRunner(self.server.app(loopback=True), handler_cancellation=True, access_log=None)
                await runner.setup()
                try:
                    await web.TCPSite(runner, "127.0.0.1", 0).start()
                except BaseException:
                    await runner.cleanup()
                    raise
                self.runner, self.base = runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self.base

    async def close(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


async def send(base: str, headers: dict, lines: list[str], concurrency: int, done) -> None:
    """POST each valid line's body to its route under `base`, from `concurrency` workers that each take the next line
    as they finish one (so a batch of 50,000 lines is not parsed at once on the event loop), and call `done(i, out)`
    with line `i`'s result as it completes (at once for a line `check` refuses). A 429 is sent again after its
    `Retry-After` while other lines are in flight (they make room); else it is the line's answer."""
    import aiohttp

    state = {"sending": 0}
    work = iter(enumerate(lines))  # shared by the workers: each line is taken (and parsed) once, when it is sent

    async def post(session, req: dict) -> tuple[int, object]:
        while True:
            async with session.post(base + req["url"], json=req["body"], headers=headers) as r:
                body = await r.json(content_type=None)
                if r.status != 429 or state["sending"] <= 1:
                    return r.status, body
                wait = r.headers.get("Retry-After", "1")
            state["sending"] -= 1
            await asyncio.sleep(float(wait) if wait.replace(".", "", 1).isdigit() else 1.0)
            state["sending"] += 1

    async def one(session, i: int, line: str) -> None:
        out = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id(line), "response": None, "error": None}
        req, why = check(line)
        if why is not None:
            out["error"] = {"code": "invalid_request", "message": why}
            return done(i, out)
        state["sending"] += 1
        try:
            status, body = await post(session, req)
        except Exception as e:  # the connection, or a reply that is not JSON: this line's error, not the run's
            out["error"] = {"code": "request_failed", "message": f"{type(e).__name__}: {e}"}
            return done(i, out)
        finally:
            state["sending"] -= 1
        rid = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
        out["response"] = {"status_code": status, "request_id": rid or f"req_{uuid.uuid4().hex}", "body": body}
        done(i, out)

    async def worker(session) -> None:
        for i, line in work:
            await one(session, i, line)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(max(1, min(concurrency, len(lines))))))
