"""LoRA adapters at run time. vLLM's routes: `POST /v1/load_lora_adapter` (`{"lora_name", "lora_path"}`) and
`POST /v1/unload_lora_adapter` (`{"lora_name"}`), answered with vLLM's plain-text lines. A loaded adapter is served
under its name as a `model` of every API (`Server.check_model`); `/v1/models` lists it.

llama.cpp's: `GET /lora-adapters` lists the adapters loaded, in load order, as `{"id", "path", "scale"}` (an id is
the adapter's load number, never reused: `ids`); `POST /lora-adapters` (`[{"id", "scale"}, ...]`, adapters left out
at scale 0) sets the adapters that requests naming none run on, and a request's own `lora` field (the same list)
picks its own. A scale multiplies the one the adapter was trained with (alpha / r, folded into its weights; each
token's adapters and scales are inputs of the step, `models.lora.delta`), so any scale and any mix of several
adapters (llama.cpp's default with several `--lora`) is served."""

from __future__ import annotations

from aiohttp import web

from engine.params import InvalidRequest
from models import lora
from server.protocol import ApiError, bad


def routes(app: web.Application, server) -> None:
    """Add the adapter routes to `app`."""
    api = Adapters(server)
    app.router.add_post("/v1/load_lora_adapter", api.load)
    app.router.add_post("/v1/unload_lora_adapter", api.unload)
    app.router.add_get("/lora-adapters", api.listed)
    app.router.add_post("/lora-adapters", api.scaled)


def picked(adapters: dict[int, str], scales: object, param: str = "lora") -> dict[str, float] | None:
    """The adapters a llama.cpp list of `{"id", "scale"}` gives a scale other than 0, from `adapters` (id -> name),
    by name with their scales (multiples of the ones they were trained with; None: the served model), or a 400: an
    id that is none of them, or a scale `lora.scale_ok` refuses."""
    if not isinstance(scales, list) or not all(isinstance(x, dict) for x in scales):
        raise bad(f"'{param}' must be a list of {{\"id\", \"scale\"}} objects", param)
    chosen: dict[int, float] = {}
    for x in scales:
        i, scale = x.get("id"), x.get("scale", 0.0)
        if not isinstance(i, int) or isinstance(i, bool) or i not in adapters:
            raise bad(f"'{param}': no LoRA adapter has the id {i!r} (loaded: {sorted(adapters) or 'none'}; "
                      "/lora-adapters lists them)", param)
        if not lora.scale_ok(scale):
            raise bad(f"'{param}': the scale of adapter {i} must be a number within ±{lora.MAX_SCALE:g}, not "
                      f"{scale!r}", param)
        chosen[i] = float(scale)
    return {adapters[i]: scale for i, scale in chosen.items() if scale != 0} or None


def ids(engine) -> dict[int, str]:
    """llama.cpp's adapter ids of the adapters `engine` holds: each one's load number (`Loaded.id`; an id is never
    reused, so a client's id cannot come to mean another adapter after an unload) -> its name."""
    return {a.id: name for name, a in engine.adapters.items()}


class Adapters:
    """The adapter routes of one `Server`."""

    def __init__(self, server):
        self.server = server

    async def _fields(self, request: web.Request, *names: str) -> list[str]:
        """The body's string fields `names` (400 where one is missing or not a non-empty string)."""
        body = await self.server._body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        for name in names:
            if not isinstance(body.get(name), str) or not body[name]:
                raise bad(f"'{name}' must be a non-empty string", name)
        if not self.server.engine.model.cfg.lora_slots:
            raise bad("this server holds no LoRA adapters (start it with --enable-lora)", names[0])
        return [body[name] for name in names]

    async def _on_engine(self, fn) -> None:
        """`fn(engine)` on the engine thread: its InvalidRequest a 400, a stopped engine a 503 (another error, such
        as the devices' out of memory, stays a 500)."""
        try:
            await self.server.on_engine(fn)
        except InvalidRequest as e:
            raise bad(str(e), e.param) from None
        except RuntimeError as e:  # the devices' own error (out of memory, say): a 500 that says so
            raise ApiError(500, f"the adapter could not be installed: {e}", type_="server_error") from None

    async def load(self, request: web.Request) -> web.Response:
        """POST /v1/load_lora_adapter: read the adapter at `lora_path` (a PEFT folder or a GGUF file, on a parse
        thread) and hold it as `lora_name` in a free LoRA slot; 400 where the name is taken, the path is not a LoRA
        adapter of this model, or every slot is held."""
        name, path = await self._fields(request, "lora_name", "lora_path")
        if name == self.server.name:
            raise bad(f"{name!r} is the served model's name", "lora_name")
        if name in self.server.engine.adapters:
            raise bad(f"the LoRA adapter {name!r} has already been loaded", "lora_name")
        try:
            adapter = await self.server.off_loop(lora.read, path, self.server.engine.model)
        except ValueError as e:
            raise bad(str(e), "lora_path") from None
        await self._on_engine(lambda engine: engine.load_adapter(name, adapter))
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def listed(self, request: web.Request) -> web.Response:
        """GET /lora-adapters (llama.cpp's): each adapter loaded, in load order, with its scale for requests that
        name none (the one `POST /lora-adapters`, `--lora` or `--lora-scaled` gave it; 0 for the others) and its
        GGUF file's task name and prompt prefix (empty where none)."""
        default = self.server.default_adapter() or {}
        return web.json_response([{"id": a.id, "path": a.path, "scale": default.get(name, 0.0),
                                   "task_name": a.task_name, "prompt_prefix": a.prompt_prefix}
                                  for name, a in self.server.engine.adapters.items()])

    async def scaled(self, request: web.Request) -> web.Response:
        """POST /lora-adapters (llama.cpp's): the adapters that requests naming none run on, and their scales
        (`picked`; every scale 0: the served model)."""
        body = await self.server._body(request)
        table = ids(self.server.engine)  # (one copy: the engine's thread may load or unload meanwhile)
        chosen = picked(table, body, "body") or {}
        self.server.lora_default = {i: chosen[n] for i, n in table.items() if n in chosen} or None
        return web.json_response({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        """POST /v1/unload_lora_adapter: forget `lora_name` (requests already using it finish with it); 400 where
        none is loaded by that name."""
        (name,) = await self._fields(request, "lora_name")
        await self._on_engine(lambda engine: engine.unload_adapter(name))
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
