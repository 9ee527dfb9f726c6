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
error file (`server_error`).

Files and batches are kept in `--files-dir` (default `$SPARKLER_CACHE/files`): each file's bytes and a JSON record of
each file and batch, rewritten whole at each change. A shutdown stops the batches sending (at the drain's start), and
the next server over the folder goes on with them: it sends the lines their output and error files do not answer yet,
appending. One server holds a folder at a time (a lock); another, or `--files-dir ''`, keeps its files in a temporary
folder removed at shutdown. Why JSON records and not SQLite (as the Responses store): the bytes must be files anyway,
a record changes at a handful of moments (created, each status), and one folder keeps a batch and its files together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from server.batch import InOrder, Loopback, URLS, check, custom_id, failed, lines_of, send
from server.protocol import ApiError, bad, unreadable

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
    parts: dict | None = None  # the ids of its output and error files while it runs
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
            if isinstance(cid, str):
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


def record(item) -> dict:
    """A file's or batch's fields as kept on disk (not its task, nor its path: the folder says where)."""
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.name not in ("task", "path")}


def revive(cls, rec: dict, **more):
    """A record read back as `cls` (fields it does not know left out: a record of another version), or None (with
    a warning) when it lacks one."""
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in rec.items() if k in known}, **more)
    except TypeError as e:
        log.warning("sparkler: skipping the record of %s: %s", rec["id"], e)
        return None


def unanswered(lines: list[str], results: list[dict]) -> list[int]:
    """The lines (by index) whose `custom_id` none of `results` holds."""
    ids = {r["custom_id"] for r in results}
    return [i for i, line in enumerate(lines) if custom_id(line) not in ids]


def answered(path: str) -> list[dict]:
    """The results a batch has written to `path` (none if it is not there yet); a last line cut short (the server
    was killed as it wrote) is dropped from the file, that request to be sent again."""
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    return [json.loads(x) for x in data[:end].splitlines()]


class Batches:
    """The files and batches of one `Server`."""

    def __init__(self, server, concurrency: int = 0, max_file_mb: float = 200.0, priority: int = 1,
                 folder: str | None = None):
        self.server = server
        # under the priority policy a line without a `priority` runs at this one (1: after a client's request at the
        # default 0); under first come first served, lines go as written
        self.priority = priority if server.engine.sched.policy == "priority" else None
        self.concurrency = concurrency or server.engine.runner.slots
        self.max_file = int(max_file_mb * (1 << 20))
        self.files: dict[str, File] = {}
        self.batches: dict[str, Batch] = {}
        self.folder = self.keep = None  # a kept folder (`_keep`), or a temporary one made at the first file
        if folder:
            self._keep(folder)
        self.loopback = Loopback(server)
        self.running: set[asyncio.Task] = set()  # the tasks of batches sending their lines (`run`)
        self.stopped = False  # set at the server's shutdown (`stop`)

    def _keep(self, folder: str) -> None:
        """Keep files and batches in `folder` (they survive a restart; batches a shutdown stopped go on at the next
        start), unless another server holds it: then in a temporary folder, with a warning."""
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            log.warning("sparkler: %s is used by another server: this one's files and batches go with it", folder)
            return
        self.folder, self.keep = folder, lock

    def save(self, item) -> None:
        """Write a file's or batch's record (kept folders only; written whole, then renamed over the old one)."""
        if self.keep:
            path = self.path(item.id) + ".json"
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(record(item), f)
            os.replace(path + ".tmp", path)

    def records(self) -> list[dict]:
        """The records a kept folder holds, oldest first."""
        names = [n for n in os.listdir(self.folder) if n.endswith(".json")] if self.keep else []
        out = []
        for name in names:
            try:
                with open(os.path.join(self.folder, name), encoding="utf-8") as f:
                    rec = json.load(f)
                if not (isinstance(rec, dict) and isinstance(rec.get("id"), str)
                        and isinstance(rec.get("created_at"), (int, float))):
                    raise ValueError("not a record")
                out.append(rec)
            except (OSError, ValueError) as e:
                log.warning("sparkler: skipping %s: %s", name, e)
        return sorted(out, key=lambda r: r["created_at"])

    async def load(self, app=None) -> None:
        """Read a kept folder's files and batches (the server's startup), and go on with the batches a shutdown
        stopped."""
        recs = await asyncio.get_running_loop().run_in_executor(self.server.parse_pool, self.records)
        for rec in recs:
            if rec["id"].startswith("file-") and (f := revive(File, rec, path=self.path(rec["id"]))):
                self.files[f.id] = f
            elif rec["id"].startswith("batch_") and (batch := revive(Batch, rec)):
                self.batches[batch.id] = batch
                if batch.status in ("validating", "in_progress", "finalizing", "cancelling"):
                    batch.task = asyncio.get_running_loop().create_task(self._guard(batch, self._resume(batch)))
        self.server.message_batches.load([r for r in recs if r["id"].startswith("msgbatch_")])

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
                if not isinstance(part, BodyPartReader):
                    raise bad("a part of the form is itself multipart: send 'file' and 'purpose' as plain fields",
                              "file")
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
        # a malformed multipart body or part header, a part in an unknown charset or transfer encoding (aiohttp's
        # RuntimeError: nothing else in the block raises one), a body that fails to decompress
        except (ValueError, LookupError, HttpProcessingError, RuntimeError, RequestPayloadError) as e:
            if os.path.exists(path):
                os.remove(path)
            why = f"the multipart body could not be read: {e}"
            if isinstance(e, RequestPayloadError):  # the stream itself
                raise unreadable(request, why, "file") from None
            raise bad(why, "file") from None
        except BaseException:
            if os.path.exists(path):
                os.remove(path)
            raise
        self.files[fid] = File(fid, name, purpose, size, path)
        self.save(self.files[fid])
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
        for path in (f.path, f.path + ".json"):
            if os.path.exists(path):
                os.remove(path)
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
        text = await self.server.off_loop(lambda: open(self.files[fid].path, encoding="utf-8",
                                                                  errors="surrogateescape").read())
        lines = lines_of(text)
        batch = Batch(f"batch_{uuid.uuid4().hex}", body["endpoint"], fid, meta)
        self.batches[batch.id] = batch
        self.save(batch)
        batch.task = asyncio.get_running_loop().create_task(self._guard(batch, self._run(batch, lines)))
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
            if batch.task in self.running:  # else it stops before it sends (checked, or its files read)
                batch.task.cancel()
            self._to(batch, "cancelling")
        return web.json_response(batch.body())

    def _to(self, batch: Batch, status: str) -> None:
        """Move a batch to `status` and keep its record."""
        batch.to(status)
        self.save(batch)

    async def _guard(self, batch: Batch, work) -> None:
        """Run a batch's work; a fault of the server's that escapes it (its files unreadable or the disk full, say)
        ends the batch `failed` (logged), never left running."""
        try:
            await work
        except Exception:
            log.exception("sparkler: batch %s failed", batch.id)
            batch.errors = [{"code": "server_error", "message": SERVER_ERROR, "param": None, "line": None}]
            batch.parts = None
            try:
                self._to(batch, "failed")
            except OSError:  # its record could not be written either: the next start tries it again
                batch.to("failed")

    async def _run(self, batch: Batch, lines: list[str]) -> None:
        """Check the lines (on a parse thread), then send them (`_send`)."""
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
            return self._to(batch, "failed")
        if batch.status == "cancelling":  # cancelled while it was checked
            return self._to(batch, "cancelled")
        batch.parts = {kind: f"file-{uuid.uuid4().hex}" for kind in ("output", "error")}
        self._to(batch, "in_progress")
        await self._send(batch, lines)

    async def _resume(self, batch: Batch) -> None:
        """Go on with a batch a shutdown stopped: check it again if it was being checked, else send the lines its
        files do not answer yet (its input file gone: it fails)."""
        source = self.files.get(batch.input_file_id)
        if source is None or not os.path.exists(source.path):
            batch.errors = [{"code": "server_error", "message": "the server restarted and the batch's input file "
                             "is gone", "param": None, "line": None}]
            return self._to(batch, "failed")
        text = await self.server.off_loop(lambda: open(source.path, encoding="utf-8", errors="replace").read())
        if batch.status == "validating" or batch.parts is None:
            await self._run(batch, lines_of(text))
        else:
            await self._send(batch, lines_of(text))

    async def _send(self, batch: Batch, lines: list[str]) -> None:
        """Send the lines that neither of the batch's files answers yet (every line at first; on a resume, those
        the last run left), append each result to its file, and end the batch with its files; a shutdown of a
        server that keeps its batches leaves it `in_progress`, to go on at the next start."""
        loop, pool = asyncio.get_running_loop(), self.server.parse_pool
        paths = {kind: self.path(fid) for kind, fid in batch.parts.items()}

        def todo() -> list[int]:
            done = {kind: answered(path) for kind, path in paths.items()}
            batch.counts["completed"], batch.counts["failed"] = len(done["output"]), len(done["error"])
            return unanswered(lines, done["output"] + done["error"])

        left = await loop.run_in_executor(pool, todo)
        with contextlib.ExitStack() as stack:
            files = {kind: stack.enter_context(open(path, "a", encoding="utf-8")) for kind, path in paths.items()}
            ended = await self._send_left(batch, lines, left, files)
        if ended is not None:
            self._finish(batch, ended)

    async def _send_left(self, batch: Batch, lines: list[str], left: list[int], files: dict) -> str | None:
        """Send the lines `left`, writing each result to its file in `files`; how the batch ended (None: the
        server's shutdown stopped it, to go on at the next start)."""
        loop, pool = asyncio.get_running_loop(), self.server.parse_pool

        def write(out: dict) -> None:
            kind = "error" if failed(out) else "output"
            batch.counts["failed" if kind == "error" else "completed"] += 1
            files[kind].write(json.dumps(out, ensure_ascii=False) + "\n")

        if batch.status == "cancelling":  # cancelled before it sent anything (or before a restart)
            ended, unanswered = "cancelled", []
        else:
            ended, unanswered = await self.run([lines[i] for i in left], batch.created_at + WINDOW, write)
        if ended == "cancelled" and self.stopped and self.keep and batch.status != "cancelling":
            return None  # its record still says in_progress
        self._to(batch, "finalizing")
        if ended == "failed":
            batch.errors = [{"code": "server_error", "message": SERVER_ERROR, "param": None, "line": None}]
        if ended in ("expired", "failed"):  # every line not answered is in the error file
            error = ({"code": "batch_expired", "message": "the batch expired before this request ran"}
                     if ended == "expired" else {"code": "server_error", "message": SERVER_ERROR})
            await loop.run_in_executor(pool, lambda: [write(
                {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id(lines[left[i]]),
                 "response": None, "error": error}) for i in unanswered])
        return ended

    def _finish(self, batch: Batch, ended: str) -> None:
        """End a batch as `ended`, its non-empty output and error files listed (the empty ones removed)."""
        for kind, fid in batch.parts.items():
            path = self.path(fid)
            if os.path.getsize(path):
                self.files[fid] = File(fid, f"{batch.id}_{kind}.jsonl", "batch_output", os.path.getsize(path), path)
                self.save(self.files[fid])
                setattr(batch, f"{kind}_file_id", fid)
            else:
                os.remove(path)
        batch.parts = None
        self._to(batch, ended)

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

    async def stop(self, app: web.Application | None = None) -> None:
        """Cancel the batches still sending and stop the loopback listener (the server's drain and shutdown)."""
        self.stopped = True
        running = list(self.running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await self.loopback.close()

    def close(self) -> None:
        """Remove a temporary folder, or let go of a kept one."""
        if self.keep:
            self.keep.close()
            self.keep = None
        elif self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
