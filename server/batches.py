"""OpenAI's Files and Batches APIs, as SGLang's server answers them: upload a JSONL file of requests
(`POST /v1/files`, purpose `batch`), start a batch over it (`POST /v1/batches`), poll it (`GET /v1/batches/{id}`), and
download its output and error files (`GET /v1/files/{id}/content`); list, cancel and delete.

A batch runs in the server's event loop: its input is checked first (each line an object with a unique `custom_id`,
`method` POST, the batch's `url` and a `body`; a batch with bad lines fails with an error for each, as OpenAI's do),
then its lines go through the server's own routes on a loopback port (`server.batch.send`, as `sparkler run-batch`
sends them), up to `--batch-concurrency` at once, beside every other client's requests. Results are written in the
input's order: a line answered with 200 to the output file, any other to the error file. A cancelled batch keeps
what finished; one past its 24-hour window expires, and its unanswered lines go to the error file
(`batch_expired`). A fault of the server's own (not of a line) ends the batch `failed`, its unanswered lines in the
error file (`server_error`). Files live in a temporary folder that goes with the server: nothing survives a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import uuid

from aiohttp import web

from server.batch import InOrder, Loopback, URLS, check, failed, lines_of, send
from server.protocol import ApiError, bad

log = logging.getLogger("sparkler")

MAX_LINES = 50_000  # requests in one batch, as OpenAI allows
WINDOW = 24 * 3600  # seconds a batch may run (its `completion_window`: OpenAI's only one is "24h")
ERRORS_SHOWN = 20  # bad input lines a failed batch reports
SERVER_ERROR = "the server failed while sending this batch's requests (its log says why)"


def routes(app: web.Application, server) -> None:
    """Add the Files and Batches routes to `app`."""
    api = server.batches
    app.router.add_post("/v1/files", api.upload)
    app.router.add_get("/v1/files", api.list_files)
    app.router.add_get("/v1/files/{id}", api.get_file)
    app.router.add_get("/v1/files/{id}/content", api.content)
    app.router.add_delete("/v1/files/{id}", api.delete_file)
    app.router.add_post("/v1/batches", api.create)
    app.router.add_get("/v1/batches", api.list_batches)
    app.router.add_get("/v1/batches/{id}", api.get_batch)
    app.router.add_post("/v1/batches/{id}/cancel", api.cancel)


@dataclasses.dataclass
class File:
    """An uploaded or written file: its bytes are at `path`."""

    id: str
    filename: str
    purpose: str
    bytes: int
    path: str
    created_at: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def body(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}


@dataclasses.dataclass
class Batch:
    """A batch and where it stands; `task` runs it."""

    id: str
    endpoint: str
    input_file_id: str
    metadata: dict | None
    created_at: int = dataclasses.field(default_factory=lambda: int(time.time()))
    status: str = "validating"
    errors: list[dict] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict = dataclasses.field(default_factory=dict)  # in_progress_at, finalizing_at, completed_at, ...
    counts: dict = dataclasses.field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    task: asyncio.Task | None = None

    def to(self, status: str) -> None:
        """Move to `status`, stamping its time."""
        self.status = status
        self.times[f"{status}_at"] = int(time.time())

    def body(self) -> dict:
        """OpenAI's batch object."""
        stamps = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint,
                "errors": None if self.errors is None else {"object": "list", "data": self.errors},
                "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "expires_at": self.created_at + WINDOW,
                **{f"{s}_at": self.times.get(f"{s}_at") for s in stamps},
                "request_counts": dict(self.counts), "metadata": self.metadata}


def page(items: list, request: web.Request, default: int, most: int, body, after: str = "after",
         before: str | None = None) -> dict:
    """A list answer over `items` (in their order): `limit` of them (1 to `most`; `default`) after the id the query's
    `after` names, or the page just before the id its `before` names; each as `body(item)`."""
    try:
        limit = int(request.query.get("limit", default))
    except ValueError:
        raise bad("'limit' must be an integer", "limit") from None
    if not 1 <= limit <= most:
        raise bad(f"'limit' must be between 1 and {most}", "limit")
    back = before is not None and after not in request.query and before in request.query
    mark, ids = request.query.get(before if back else after), [x.id for x in items]
    if mark is not None:
        items = (items[:ids.index(mark)] if back else items[ids.index(mark) + 1:]) if mark in ids else []
    more, items = len(items) > limit, items[-limit:] if back else items[:limit]
    data = [body(x) for x in items]
    return {"data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
            "has_more": more}


def found(table: dict, request: web.Request, what: str):
    """The item of `table` the route's `{id}` names, or a 404 saying there is no such `what`."""
    item = table.get(request.match_info["id"])
    if item is None:
        raise ApiError(404, f"no {what} with id {request.match_info['id']!r}", code="not_found")
    return item


def validate(lines: list[str], endpoint: str) -> tuple[list[dict], list[dict]]:
    """The requests of a batch's lines, and an error for each bad line (OpenAI's shape: code, message, param, line
    numbered from 1)."""
    reqs, errors, seen = [], [], set()
    for n, line in enumerate(lines, 1):
        req, why = check(line)
        code = "invalid_request"
        if req is not None:
            cid = req.get("custom_id")
            if not isinstance(cid, str) or not cid:
                why, code = "each line needs a 'custom_id' string", "missing_custom_id"
            elif cid in seen:
                why, code = f"the custom_id {cid!r} is used by an earlier line", "duplicate_custom_id"
            elif req["url"] != endpoint:
                why, code = f"the line's url {req['url']!r} is not the batch's endpoint {endpoint!r}", "mismatched_url"
            seen.add(cid)
        if why is not None:
            errors.append({"code": code, "message": why, "param": None, "line": n})
        reqs.append(req)
    return reqs, errors


def _with_priority(lines: list[str], priority: int) -> list[str]:
    """A batch's lines with each body at `priority` unless it names its own (a line that is not a request as it
    was)."""
    out = []
    for line in lines:
        req, _ = check(line)
        if req is None or not isinstance(req.get("body"), dict) or "priority" in req["body"]:
            out.append(line)
        else:
            out.append(json.dumps({**req, "body": {**req["body"], "priority": priority}}))
    return out


class Batches:
    """The files and batches of one `Server`."""

    def __init__(self, server, concurrency: int = 0, max_file_mb: float = 200.0, priority: int = 1):
        self.server = server
        # under the priority policy a line without a `priority` runs at this one (1: after a client's request at the
        # default 0); under first come first served, lines go as written
        self.priority = priority if server.engine.sched.policy == "priority" else None
        self.concurrency = concurrency or server.engine.runner.slots
        self.max_file = int(max_file_mb * (1 << 20))
        self.files: dict[str, File] = {}
        self.batches: dict[str, Batch] = {}
        self.folder: str | None = None  # made at the first file
        self.loopback = Loopback(server)
        self.running: set[asyncio.Task] = set()  # the tasks of batches sending their lines (`run`)
        self.stopped = False  # set at the server's shutdown (`stop`)

    def path(self, fid: str) -> str:
        """Where the file `fid` is kept (the folder is made at the first)."""
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="sparkler-files-")
        return os.path.join(self.folder, fid)

    @staticmethod
    def _listed(items: list, request: web.Request, default: int) -> dict:
        """OpenAI's list answer: newest first (`order` asc: oldest), `limit` items after the id `after`."""
        items = sorted(items, key=lambda x: x.created_at, reverse=request.query.get("order", "desc") != "asc")
        return {"object": "list", **page(items, request, default, 10_000, lambda x: x.body())}

    def _file(self, request: web.Request) -> File:
        return found(self.files, request, "file")

    def _batch(self, request: web.Request) -> Batch:
        return found(self.batches, request, "batch")

    # ---- files --------------------------------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        """POST /v1/files: a multipart form with `file` and `purpose` ("batch"); the file is streamed to disk, up to
        `--max-file-mb` (then a 413)."""
        if not request.content_type.startswith("multipart/"):
            raise bad("send the file as multipart/form-data, with the fields 'file' and 'purpose'", "file")
        fid, purpose, name, size = f"file-{uuid.uuid4().hex}", None, None, 0
        path = self.path(fid)
        try:
            reader = await request.multipart()
            async for part in reader:
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    name = part.filename or "upload.jsonl"
                    with open(path, "wb") as out:
                        while chunk := await part.read_chunk(1 << 20):
                            size += len(chunk)
                            if size > self.max_file:
                                raise ApiError(413, f"the file exceeds {self.max_file} bytes (--max-file-mb)", "file",
                                               code="file_too_large")
                            out.write(chunk)
            if name is None:
                raise bad("the form has no 'file' field", "file")
            if purpose != "batch":
                raise bad(f"'purpose' must be 'batch' (this server runs batches), not {purpose!r}", "purpose")
        except ValueError as e:  # a malformed multipart body
            if os.path.exists(path):
                os.remove(path)
            raise bad(f"the multipart body could not be read: {e}", "file") from None
        except BaseException:
            if os.path.exists(path):
                os.remove(path)
            raise
        self.files[fid] = File(fid, name, purpose, size, path)
        return web.json_response(self.files[fid].body())

    async def list_files(self, request: web.Request) -> web.Response:
        """GET /v1/files: the files, newest first (`purpose`, `limit`, `after`, `order`)."""
        purpose = request.query.get("purpose")
        files = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        return web.json_response(self._listed(files, request, 10_000))

    async def get_file(self, request: web.Request) -> web.Response:
        """GET /v1/files/{id}: the file object, or 404."""
        return web.json_response(self._file(request).body())

    async def content(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/files/{id}/content: the file's bytes."""
        f = self._file(request)
        return web.FileResponse(f.path, headers={"Content-Type": "application/octet-stream"})

    async def delete_file(self, request: web.Request) -> web.Response:
        """DELETE /v1/files/{id}: forget the file and remove its bytes (a batch already running keeps its lines)."""
        f = self._file(request)
        del self.files[f.id]
        if os.path.exists(f.path):
            os.remove(f.path)
        return web.json_response({"id": f.id, "object": "file", "deleted": True})

    # ---- batches ------------------------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        """POST /v1/batches: `{input_file_id, endpoint, completion_window: "24h", metadata}`; the batch starts
        validating at once and is answered in that state."""
        if self.server.draining:
            raise ApiError(503, "the server is shutting down", type_="service_unavailable", code="shutting_down")
        body = await self.server._body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        fid = body.get("input_file_id")
        if not isinstance(fid, str) or fid not in self.files:
            raise ApiError(404, f"no file with id {fid!r}", "input_file_id", code="not_found")
        if self.files[fid].purpose != "batch":
            raise bad(f"the file {fid!r} was not uploaded for a batch", "input_file_id")
        if body.get("endpoint") not in URLS:
            raise bad(f"'endpoint' must be one of {', '.join(URLS)}, got {body.get('endpoint')!r}", "endpoint")
        if body.get("completion_window", "24h") != "24h":
            raise bad("'completion_window' must be '24h'", "completion_window")
        meta = body.get("metadata")
        if meta is not None and (not isinstance(meta, dict) or len(meta) > 16 or
                                 not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
            raise bad("'metadata' must be an object of at most 16 string values", "metadata")
        text = await self.server.off_loop(lambda: open(self.files[fid].path, encoding="utf-8", errors="replace").read())
        lines = lines_of(text)
        batch = Batch(f"batch_{uuid.uuid4().hex}", body["endpoint"], fid, meta)
        self.batches[batch.id] = batch
        batch.task = asyncio.get_running_loop().create_task(self._run(batch, lines))
        return web.json_response(batch.body())

    async def list_batches(self, request: web.Request) -> web.Response:
        """GET /v1/batches: the batches, newest first (`limit`, `after`)."""
        return web.json_response(self._listed(list(self.batches.values()), request, 20))

    async def get_batch(self, request: web.Request) -> web.Response:
        """GET /v1/batches/{id}: the batch object, or 404."""
        return web.json_response(self._batch(request).body())

    async def cancel(self, request: web.Request) -> web.Response:
        """POST /v1/batches/{id}/cancel: no more lines are sent, those in flight are stopped, and the batch ends
        `cancelled` with what finished in its files; a batch that has ended is answered as it is."""
        batch = self._batch(request)
        if batch.status in ("validating", "in_progress"):
            if batch.status == "in_progress":  # one being checked stops when the check ends
                batch.task.cancel()
            batch.to("cancelling")
        return web.json_response(batch.body())

    async def _run(self, batch: Batch, lines: list[str]) -> None:
        """Check the lines (on a parse thread), send them, and write the output and error files."""
        batch.counts["total"] = len(lines)
        errors = [{"code": "too_many_requests", "message": f"a batch holds at most {MAX_LINES} requests, this one "
                   f"{len(lines)}", "param": None, "line": None}] if len(lines) > MAX_LINES else []
        if not lines:
            errors.append({"code": "empty_file", "message": "the input file has no requests", "param": None,
                           "line": None})
        loop = asyncio.get_running_loop()
        errors += (await loop.run_in_executor(self.server.parse_pool, validate, lines, batch.endpoint))[1]
        if errors:
            batch.errors = errors[:ERRORS_SHOWN]
            return batch.to("failed")
        if batch.status == "cancelling":  # cancelled while it was checked
            return batch.to("cancelled")
        batch.to("in_progress")
        ids = {kind: f"file-{uuid.uuid4().hex}" for kind in ("output", "error")}
        files = {kind: open(self.path(fid), "w", encoding="utf-8") for kind, fid in ids.items()}
        written = {"output": 0, "error": 0}

        def write(out: dict) -> None:
            kind = "error" if failed(out) else "output"
            batch.counts["failed" if kind == "error" else "completed"] += 1
            files[kind].write(json.dumps(out, ensure_ascii=False) + "\n")
            written[kind] += 1

        ended, unanswered = await self.run(lines, batch.created_at + WINDOW, write)
        batch.to("finalizing")
        if ended == "failed":
            batch.errors = [{"code": "server_error", "message": SERVER_ERROR, "param": None, "line": None}]
        if ended in ("expired", "failed"):  # every line not answered is in the error file
            error = ({"code": "batch_expired", "message": "the batch expired before this request ran"}
                     if ended == "expired" else {"code": "server_error", "message": SERVER_ERROR})
            await asyncio.get_running_loop().run_in_executor(self.server.parse_pool, lambda: [write(
                {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": check(lines[i])[0]["custom_id"],
                 "response": None, "error": error}) for i in unanswered])
        for kind, f in files.items():
            f.close()
            if written[kind]:
                self.files[ids[kind]] = File(ids[kind], f"{batch.id}_{kind}.jsonl", "batch_output",
                                             os.path.getsize(f.name), f.name)
                setattr(batch, f"{kind}_file_id", ids[kind])
            else:
                os.remove(f.name)
        batch.to(ended)

    async def run(self, lines: list[str], deadline: float, write) -> tuple[str, list[int]]:
        """Send a batch's lines through the loopback routes, calling `write(out)` with each result in the lines'
        order, until every line is answered ("completed"), the task is cancelled ("cancelled": the cancel route, or
        the server's shutdown), `deadline` (a time.time()) passes ("expired") or the server fails ("failed", logged);
        how it ended, and the lines with no result (those written past the first gap are written then)."""
        order = InOrder(len(lines), write)
        ended = "completed"
        if self.stopped:  # the server is shutting down: nothing more is sent
            return "cancelled", order.rest()
        self.running.add(task := asyncio.current_task())
        try:
            async with asyncio.timeout(deadline - time.time()):
                if self.priority is not None:  # on a parse thread: a batch holds up to 50,000 lines
                    lines = await asyncio.get_running_loop().run_in_executor(
                        self.server.parse_pool, _with_priority, lines, self.priority)
                await send(await self.loopback.start(), self.loopback.headers, lines, self.concurrency, order.put)
        except TimeoutError:
            ended = "expired"
        except asyncio.CancelledError:  # keep what finished
            ended = "cancelled"
        except Exception:  # a fault of the server's (the loopback listener did not start, say), not of a line
            log.exception("sparkler: a batch stopped")
            ended = "failed"
        finally:
            self.running.discard(task)
        return ended, order.rest()

    async def stop(self, app: web.Application) -> None:
        """Cancel the batches still sending and stop the loopback listener (the server's shutdown)."""
        self.stopped = True
        running = list(self.running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await self.loopback.close()

    def close(self) -> None:
        """Remove the files' folder."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
