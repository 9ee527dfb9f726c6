"""A live server's profile on demand: vLLM's and SGLang's `POST /start_profile` and `POST /stop_profile`, over
`jax.profiler` (XLA's own tracer: every program and kernel on the devices, the host's threads beside them; a trace
TensorBoard's profile plugin, XProf and Perfetto open), for finding where a serving load's time goes on a card
(`bench/device_idle.py` reads the same files).

The folder is the body's `output_dir` (SGLang's) or `--profiler-dir`; the trace lands in
`<folder>/plugins/profile/<time>/` (`*.xplane.pb`, `*.trace.json.gz`). SGLang's `num_steps` stops it by itself after
that many decode steps (a multi-step dispatch counts each), and `with_stack` traces Python calls too (off by default:
it slows the host loop it measures). Each engine step is marked (`engine_step`, its number) so the device's work
lines up with the steps.
"""

from __future__ import annotations

import asyncio
import logging
import os

import jax
from aiohttp import web

from server.protocol import bad

log = logging.getLogger("sparkler.server")
ACTIVITIES = ("CPU", "GPU", "MEM", "CUDA_PROFILER", "RPD")  # SGLang's; XLA's tracer records the host and devices


def routes(app: web.Application, server, folder: str | None) -> None:
    """Add `/start_profile` and `/stop_profile` to `app`, writing under `folder` unless a call names another."""
    api = Profiler(server, folder)
    app.router.add_post("/start_profile", api.start)
    app.router.add_post("/stop_profile", api.stop)


class Profiler:
    """At most one trace at a time, in this process (the profiler is the process's)."""

    def __init__(self, server, folder: str | None):
        self.server, self.folder = server, folder
        self.taking: str | None = None  # the folder of the trace being taken (until it is written)
        self.stopping = False  # being written
        self.until: asyncio.Task | None = None  # stops it after `num_steps`

    async def start(self, request: web.Request) -> web.Response:
        """POST /start_profile (`{"output_dir", "num_steps", "with_stack", "activities"}`, all optional; a 400 while
        one is being taken or written)."""
        body = await self.server.body_object(request)
        folder, steps = body.get("output_dir") or self.folder, body.get("num_steps")
        if not isinstance(folder, str) or not folder:
            raise bad("no folder for the profile: start the server with --profiler-dir, or name an 'output_dir'",
                      "output_dir")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise bad("'num_steps' must be a positive integer", "num_steps")
        activities = body.get("activities") or []
        if not isinstance(activities, list) or not set(map(str, activities)) <= set(ACTIVITIES):
            raise bad(f"'activities' is a list of names among {list(ACTIVITIES)}", "activities")
        if self.taking is not None:
            raise bad(f"a profile is being taken already (into {self.taking}): POST /stop_profile first")
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 1 if body.get("with_stack") else 0
        try:
            os.makedirs(folder, exist_ok=True)
            jax.profiler.start_trace(folder, profiler_options=options)
        except (OSError, RuntimeError, ValueError) as e:  # ValueError: a NUL in the path
            raise bad(f"the profiler could not start: {e}", "output_dir") from None
        self.taking = folder
        log.info("profiling into %s%s", folder, f" for {steps} engine steps" if steps else "")
        if steps:
            self.until = asyncio.get_running_loop().create_task(self._after(self.server.engine.steps_run + steps))
        return web.Response(text="Start profiling.\n")

    async def stop(self, request: web.Request) -> web.Response:
        """POST /stop_profile: the trace written (it takes a while), then answered."""
        if self.taking is None or self.stopping:
            raise bad("no profile is being taken (POST /start_profile first)")
        if self.until is not None:
            self.until.cancel()
        await self._stop()
        return web.Response(text="Stop profiling. This will take some time.\n")

    async def _after(self, step: int) -> None:
        while self.server.engine.steps_run < step:
            await asyncio.sleep(0.01)
        self.until = None
        await self._stop()

    async def _stop(self) -> None:
        self.stopping = True
        try:
            await self.server.off_loop(jax.profiler.stop_trace)
        finally:
            folder, self.taking, self.stopping = self.taking, None, False
        log.info("profile written under %s", os.path.join(folder, "plugins", "profile"))
