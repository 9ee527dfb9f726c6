"""Background responses (`background: true` on `/v1/responses`, OpenAI's background mode).

The reply runs in a task of its own (`Server.detach`), apart from the call that asked for it: the call answers at
once with the response `queued` (or, with `stream: true`, follows its events), and a client that goes away ends
nothing. The task reads the engine's events through the same `Turn` and `Output` as a streamed reply and keeps each
event it would send, numbered and framed (`Background.publish`), so a stream can be joined again after any sequence
number: from memory while the response runs, and from the store once it has ended (`ResponseStore.put_events`).
`GET /v1/responses/{id}` shows it as it stands; `POST /v1/responses/{id}/cancel` ends it `cancelled`.
"""

from __future__ import annotations

import asyncio
import json

from server.shapes import sse_event

ENDED = ("completed", "incomplete", "failed", "cancelled")


class Background:
    """One background response while it runs: its face (`openai_responses.Stream`: the response shell, the output
    items so far), its status, the events sent so far (SSE-framed) and, once it has ended, the final response."""

    def __init__(self, face, stream: bool):
        self.face, self.stream = face, stream
        self.status = "queued"
        self.events: list[bytes] = []
        self.result: dict | None = None
        self.task: asyncio.Task | None = None
        self.cancelled = False  # by `POST .../cancel` (not by a shutdown)
        self._tick = asyncio.Event()

    def response(self) -> dict:
        """The response as it stands: the final one, or the shell with the output so far."""
        if self.result is not None:
            return self.result
        return {**self.face.shell, "status": self.status, "output": json.loads(json.dumps(self.face.out.items))}

    def publish(self, events: list[dict]) -> None:
        """Number and frame `events` (each its `sequence_number`), keep them, and wake the streams that follow
        (a response created without `stream` keeps none: it has no stream to join)."""
        if not self.stream:
            return
        for ev in events:
            self.events.append(sse_event({**ev, "sequence_number": len(self.events)}))
        if events:
            self._wake()

    def end(self, result: dict) -> None:
        """The response has ended as `result`."""
        self.result, self.status = result, result["status"]
        self._wake()

    def _wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def follow(self, after: int):
        """The framed events after sequence number `after`, as they come, until the response has ended."""
        seen = after + 1
        while True:
            tick = self._tick
            if seen < len(self.events):  # all that came since, in one write
                data, seen = b"".join(self.events[seen:]), len(self.events)
                yield data
            if self.result is not None and seen >= len(self.events):
                return
            await tick.wait()


def stored_status(response: dict) -> dict:
    """A stored background response as it reads after a restart: one the server stopped before it ended (stored
    `queued` or `in_progress`, and no longer running) is `failed`."""
    if response.get("status") in ENDED:
        return response
    return {**response, "status": "failed",
            "error": {"code": "server_error", "message": "the server stopped before this background response ended"}}
