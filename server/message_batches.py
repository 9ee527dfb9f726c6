"""Anthropic's Message Batches API: `POST /v1/messages/batches` with `{"requests": [{"custom_id", "params"}]}`, each
`params` a Messages body; `GET /v1/messages/batches[/{id}]`, `POST .../{id}/cancel`, `DELETE .../{id}` and
`GET .../{id}/results` (JSONL, one `{"custom_id", "result"}` a request: `succeeded` with its message, `errored` with
its error body, `canceled` or `expired`).

The requests run as an OpenAI batch's do (`server.batches.Batches.run`): through the server's own `/v1/messages` on a
loopback port, beside every other client's requests, so each is checked and answered as it would be alone. Results
live in the batches' temporary folder until the batch is deleted or the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import re
import time
import uuid

from aiohttp import web

from server.batch import custom_id, failed, lines_of
from server.batches import SERVER_ERROR, WINDOW, answered, found, log, page, revive, unanswered
from server.protocol import ApiError, bad

MAX_REQUESTS = 100_000  # in one batch, as Anthropic allows
CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def routes(app: web.Application, server) -> None:
    """Add the Message Batches routes to `app`."""
    api = server.message_batches
    app.router.add_post("/v1/messages/batches", api.create)
    app.router.add_get("/v1/messages/batches", api.list)
    app.router.add_get("/v1/messages/batches/{id}", api.get)
    app.router.add_get("/v1/messages/batches/{id}/results", api.results)
    app.router.add_post("/v1/messages/batches/{id}/cancel", api.cancel)
    app.router.add_delete("/v1/messages/batches/{id}", api.delete)


def _stamp(t: float | None) -> str | None:
    """A time as RFC 3339, as Anthropic writes them."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass
class MessageBatch:
    """A message batch and where it stands; `task` runs it."""

    id: str
    total: int
    created_at: float = dataclasses.field(default_factory=time.time)
    status: str = "in_progress"  # then "canceling", and "ended"
    counts: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(
        ("succeeded", "errored", "canceled", "expired"), 0))
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    results: str | None = None  # the results file, once ended
    task: asyncio.Task | None = None

    def body(self, request: web.Request) -> dict:
        """Anthropic's message batch object (`results_url` on the host the request named)."""
        url = f"{request.scheme}://{request.host}/v1/messages/batches/{self.id}/results"
        return {"id": self.id, "type": "message_batch", "processing_status": self.status,
                "request_counts": {"processing": self.total - sum(self.counts.values()), **self.counts},
                "created_at": _stamp(self.created_at), "expires_at": _stamp(self.created_at + WINDOW),
                "ended_at": _stamp(self.ended_at), "cancel_initiated_at": _stamp(self.cancel_initiated_at),
                "archived_at": None, "results_url": url if self.status == "ended" else None}


def result(out: dict) -> dict:
    """A batch line's result (`server.batch.send`'s shape) as Anthropic's."""
    if not failed(out):
        return {"type": "succeeded", "message": out["response"]["body"]}
    body = out["response"] and out["response"]["body"]
    if not (isinstance(body, dict) and body.get("type") == "error"):  # not sent, or not the route's error body
        why = out["error"]["message"] if out["error"] else json.dumps(body)
        body = {"type": "error", "error": {"type": "invalid_request_error" if out["error"] and
                                           out["error"]["code"] == "invalid_request" else "api_error",
                                           "message": why}}
    return {"type": "errored", "error": body}


class MessageBatches:
    """The message batches of one `Server`; they run through its OpenAI batches' `Batches.run` and keep their results
    in its folder."""

    def __init__(self, server):
        self.server, self.store = server, server.batches
        self.batches: dict[str, MessageBatch] = {}

    def _batch(self, request: web.Request) -> MessageBatch:
        return found(self.batches, request, "message batch")

    async def create(self, request: web.Request) -> web.Response:
        """POST /v1/messages/batches: each request's `custom_id` checked (1 to 64 letters, digits, `-` or `_`, each
        once) and its `params` an object; what a `params` holds is checked when it runs (an `errored` result)."""
        if self.server.draining:
            raise ApiError(503, "the server is shutting down", type_="service_unavailable", code="shutting_down")
        body = await self.server._body(request)
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            raise bad("'requests' must be a non-empty list of {custom_id, params} objects", "requests")
        if len(reqs) > MAX_REQUESTS:
            raise bad(f"a batch holds at most {MAX_REQUESTS} requests, not {len(reqs)}", "requests")
        seen = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID.fullmatch(cid):
                raise bad(f"requests[{i}].custom_id must be 1 to 64 letters, digits, '-' or '_'", "requests")
            if cid in seen:
                raise bad(f"requests[{i}].custom_id {cid!r} is used by an earlier request", "requests")
            if not isinstance(r.get("params"), dict):
                raise bad(f"requests[{i}].params must be an object", "requests")
            seen.add(cid)
        lines = [json.dumps({"custom_id": r["custom_id"], "method": "POST", "url": "/v1/messages",
                             "body": r["params"]}) for r in reqs]
        batch = MessageBatch(f"msgbatch_{uuid.uuid4().hex}", len(reqs))
        await self.server.off_loop(lambda: self._write_input(batch, lines))
        self.batches[batch.id] = batch
        self.store.save(batch)
        batch.task = asyncio.get_running_loop().create_task(self._guard(batch, self._run(batch, lines)))
        return web.json_response(batch.body(request))

    def _write_input(self, batch: MessageBatch, lines: list[str]) -> None:
        with open(self.store.path(f"{batch.id}_input.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def load(self, recs: list[dict]) -> None:
        """Take the kept message batches' records (`Batches.load`) and go on with those a shutdown stopped."""
        for rec in recs:
            if (batch := revive(MessageBatch, rec)) is None:
                continue
            self.batches[batch.id] = batch
            if batch.results is not None:  # where the folder is now
                batch.results = self.store.path(f"{batch.id}_results")
            if batch.status != "ended":
                batch.task = asyncio.get_running_loop().create_task(self._guard(batch, self._resume(batch)))

    async def _guard(self, batch: MessageBatch, work) -> None:
        """Run a batch's work; a fault of the server's that escapes it (its files unreadable or the disk full, say)
        ends the batch (logged), its unanswered requests with no result, never left running."""
        try:
            await work
        except Exception:
            log.exception("sparkler: message batch %s failed", batch.id)
            path = self.store.path(f"{batch.id}_results")
            batch.results = path if os.path.exists(path) else None
            batch.status, batch.ended_at = "ended", time.time()
            with contextlib.suppress(OSError):
                self.store.save(batch)

    async def _resume(self, batch: MessageBatch) -> None:
        """Read a stopped batch's requests back and go on with it."""
        path = self.store.path(f"{batch.id}_input.jsonl")
        await self._run(batch, await self.server.off_loop(lambda: lines_of(open(path, encoding="utf-8").read())))

    async def _run(self, batch: MessageBatch, lines: list[str]) -> None:
        """Send the requests the results file does not answer yet (all at first; on a resume, those the last run
        left), append each result to it, and end the batch; a shutdown of a server that keeps its batches leaves it
        as it is, to go on at the next start."""
        path = self.store.path(f"{batch.id}_results")

        def todo() -> list[int]:
            done = answered(path)
            batch.counts = dict.fromkeys(batch.counts, 0)
            for r in done:
                batch.counts[r["result"]["type"]] += 1
            return unanswered(lines, done)

        left = await self.server.off_loop(todo)
        with open(path, "a", encoding="utf-8") as f:
            def write(out: dict, res: dict | None = None) -> None:
                res = res or result(out)
                batch.counts[res["type"]] += 1
                f.write(json.dumps({"custom_id": out["custom_id"], "result": res}, ensure_ascii=False) + "\n")

            if batch.status == "canceling":  # canceled before it sent anything
                ended, missing = "cancelled", list(range(len(left)))
            else:
                ended, missing = await self.store.run([lines[i] for i in left], batch.created_at + WINDOW, write)
            if ended == "cancelled" and self.store.stopped and self.store.keep and batch.status != "canceling":
                return  # the server's shutdown: its record still says in_progress
            res = ({"type": "errored", "error": {"type": "api_error", "message": SERVER_ERROR}} if ended == "failed"
                   else {"type": "expired" if ended == "expired" else "canceled"})
            for i in missing:
                write({"custom_id": custom_id(lines[left[i]])}, res)
        batch.results, batch.status, batch.ended_at = path, "ended", time.time()
        self.store.save(batch)

    async def get(self, request: web.Request) -> web.Response:
        """GET /v1/messages/batches/{id}."""
        return web.json_response(self._batch(request).body(request))

    async def list(self, request: web.Request) -> web.Response:
        """GET /v1/messages/batches: newest first, `limit` (1 to 1000, default 20) after `after_id` or before
        `before_id`."""
        items = sorted(self.batches.values(), key=lambda b: b.created_at, reverse=True)
        return web.json_response(page(items, request, 20, 1000, lambda b: b.body(request), "after_id", "before_id"))

    async def results(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/messages/batches/{id}/results: the results file (JSONL) of an ended batch."""
        batch = self._batch(request)
        if batch.results is None:
            raise ApiError(404, f"the message batch {batch.id!r} has not ended: its results are not ready",
                           code="not_found")
        return web.FileResponse(batch.results, headers={"Content-Type": "application/x-jsonl"})

    async def cancel(self, request: web.Request) -> web.Response:
        """POST /v1/messages/batches/{id}/cancel: no more requests are sent and those in flight are stopped; the rest
        end `canceled`. An ended batch is answered as it is."""
        batch = self._batch(request)
        if batch.status == "in_progress":
            batch.status, batch.cancel_initiated_at = "canceling", time.time()
            self.store.save(batch)
            if batch.task in self.store.running:  # else it stops before it sends
                batch.task.cancel()
        return web.json_response(batch.body(request))

    async def delete(self, request: web.Request) -> web.Response:
        """DELETE /v1/messages/batches/{id}: forget an ended batch and its results (400 while it runs)."""
        batch = self._batch(request)
        if batch.status != "ended":
            raise bad(f"the message batch {batch.id!r} is still running: cancel it first")
        del self.batches[batch.id]
        for path in (self.store.path(f"{batch.id}{end}") for end in ("_results", "_input.jsonl", ".json")):
            if os.path.exists(path):
                os.remove(path)
        return web.json_response({"id": batch.id, "type": "message_batch_deleted"})
