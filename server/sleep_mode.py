"""Sleep mode over HTTP, under vLLM's and SGLang's names: an idle server gives its devices' memory back (an RL
trainer between rollouts, another model on the card) and takes it again (`engine.sleep`, `Server.sleep`).

- vLLM: `POST /sleep?level=1` (level 1: the weights kept on the host, the KV pool dropped; level 2: the weights
  discarded too, read again from the model's source on waking), `POST /wake_up` (`?tags=weights&tags=kv_cache`,
  repeated; all by default), `GET /is_sleeping` (`{"is_sleeping": bool}`).
- SGLang: `POST` (or `GET`) `/release_memory_occupation` and `/resume_memory_occupation` with `{"tags": [...]}`
  ("weights", "kv_cache"; "cuda_graph" is taken and has nothing to give back; none: all), the weights kept on the
  host.

While anything sleeps, every call that runs the model is a 503 (`sleeping`); the others (`/tokenize`, `/v1/models`,
`/health`, counts of tokens) answer as ever. Sleeping waits for the calls in flight (new ones wait meanwhile).

vLLM's pause routes, which RL trainers call around a weight update, are here too (SGLang's are in `server.sglang`):
`POST /pause?mode=abort|wait|keep&clear_cache=true` (`Server.pause_generation`: abort the calls in flight, let them
finish, or keep them seated; the prefix cache flushed after an abort or a wait unless `clear_cache=false`),
`POST /resume`, `GET /is_paused`.
"""

from __future__ import annotations

from aiohttp import web

from engine import sleep as sleeping
from server.protocol import bad

SGLANG_TAGS = (*sleeping.TAGS, "cuda_graph")  # SGLang's; XLA's programs stay compiled, and take no pool of their own


def routes(app: web.Application, server) -> None:
    """Add vLLM's and SGLang's sleep-mode routes and vLLM's pause routes to `app`, answered by `server`
    (`Server.sleep`, `wake_up`, `pause_generation`, `continue_generation`)."""
    api = Sleep(server)
    app.router.add_post("/sleep", api.sleep)
    app.router.add_post("/wake_up", api.wake_up)
    app.router.add_get("/is_sleeping", api.is_sleeping)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/release_memory_occupation", api.release)
        app.router.add_route(method, "/resume_memory_occupation", api.resume)
    app.router.add_post("/pause", api.pause)
    app.router.add_post("/resume", api.go_on)
    app.router.add_get("/is_paused", api.is_paused)


def tags_of(given, names: tuple[str, ...], param: str) -> tuple[str, ...]:
    """The tags `given` names among `names` (None or empty: all), as `Engine.sleep` takes them; a 400 for others."""
    if given is None or given == []:
        return sleeping.TAGS
    if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
        raise bad(f"'{param}' is a list of names among {list(names)}", param)
    if unknown := sorted(set(given) - set(names)):
        raise bad(f"{param}: {unknown} are not among {list(names)}", param)
    return tuple(t for t in sleeping.TAGS if t in given)


class Sleep:
    """The sleep-mode routes' handlers."""

    def __init__(self, server):
        self.server = server

    async def sleep(self, request: web.Request) -> web.Response:
        """POST /sleep?level=1|2 (vLLM's): an empty 200 once asleep."""
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            raise bad(f"level: 1 (the weights kept on the host) or 2 (discarded), not {level!r}", "level")
        await self.server.sleep(sleeping.TAGS, keep_weights=level == "1")
        return web.Response()

    async def wake_up(self, request: web.Request) -> web.Response:
        """POST /wake_up[?tags=...] (vLLM's): an empty 200 once awake for those tags."""
        await self.server.wake_up(tags_of(request.query.getall("tags", None), sleeping.TAGS, "tags"))
        return web.Response()

    async def is_sleeping(self, request: web.Request) -> web.Response:
        """GET /is_sleeping (vLLM's): whether anything sleeps."""
        return web.json_response({"is_sleeping": bool(self.server.engine.asleep)})

    async def release(self, request: web.Request) -> web.Response:
        """/release_memory_occupation (SGLang's): `null` once the tags' memory is given back. The body is required,
        as SGLang's (`{}`: every tag), so a bare GET (a crawler's, a probe's) does not put the server to sleep."""
        if not request.can_read_body:
            raise bad("a JSON object body is required: {\"tags\": [...]}, or {} for every tag", "tags")
        await self.server.sleep(await self._tags(request))
        return web.json_response(None)

    async def resume(self, request: web.Request) -> web.Response:
        """/resume_memory_occupation (SGLang's): `null` once the tags' memory is taken back."""
        await self.server.wake_up(await self._tags(request))
        return web.json_response(None)

    async def pause(self, request: web.Request) -> web.Response:
        """POST /pause?mode=abort|wait|keep&clear_cache=true|false (vLLM's): `{"status": "paused"}` once nothing
        runs."""
        mode, clear = request.query.get("mode", "abort"), request.query.get("clear_cache", "true").lower()
        if mode not in ("abort", "wait", "keep"):
            raise bad(f"mode: abort, wait or keep, not {mode!r}", "mode")
        if clear not in ("true", "false", "1", "0"):
            raise bad(f"clear_cache: true or false, not {clear!r}", "clear_cache")
        await self.server.pause_generation("in_place" if mode == "keep" else mode, clear in ("true", "1"))
        return web.json_response({"status": "paused"})

    async def go_on(self, request: web.Request) -> web.Response:
        """POST /resume (vLLM's): `{"status": "resumed"}`."""
        await self.server.continue_generation()
        return web.json_response({"status": "resumed"})

    async def is_paused(self, request: web.Request) -> web.Response:
        """GET /is_paused (vLLM's)."""
        return web.json_response({"is_paused": self.server.paused_generation})

    async def _tags(self, request: web.Request) -> tuple[str, ...]:
        return tags_of((await self.server.body_object(request)).get("tags"), SGLANG_TAGS, "tags")
