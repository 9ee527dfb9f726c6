"""The aiohttp application: OpenAI/Fireworks chat and completions, OpenAI Responses and Anthropic Messages (their
modules translate onto the same core), streaming, /v1/models and /health.

Handlers read the body on the event loop, decode, parse and validate it on a worker thread (templating and tokenizing
can be long), hand engine requests to the `AsyncEngine` thread, and write either one JSON object or Server-Sent
Events. A client that goes away aborts its requests; their slots are free at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime
import errno
import importlib.metadata
import json
import logging
import math
import os
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import aiohttp_cors
import jax
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from engine import beam
from engine import sleep as sleeping
from engine.requests import Choice, Delta, Request
from engine.grammar_sandbox import Busy
from engine.thinking import Budget
from engine.llm import AsyncEngine, StreamOverflow
from engine.params import InvalidRequest, default_settings
from models import Model
from models.loading.source import cache_root
from server import (adapters, anthropic_messages, batches, compaction, conversations, embeddings, harmony, images,
                    llama_cpp, message_batches, ollama, openai_responses, protocol, reasoning, sagemaker, scores,
                    profile, sglang, sleep_mode, tools)
from server.protocol import ApiError, Job, bad, busy, unreadable
from server.metrics import Metrics
from server.store import ResponseStore
from server.turn import Turn
from server.shapes import (Vocab, chat_logprobs, completion_logprobs, prompt_entries, prompt_requests,
                              prompt_token_ids, raw_output, usage, vllm_prompt_logprobs)

log = logging.getLogger("sparkler.server")
MODEL_PREFIX = "accounts/"
STALL_TIMEOUT = 30.0  # seconds a write to a stream may wait for its client before the stream is cut
PING_EVERY = 15.0  # seconds a streamed Messages or Responses reply may go quiet before a keep-alive (a long prefill)
BODY_TIMEOUT = 60.0  # seconds a request body may take to arrive (less under --request-timeout)
ISOLATION_HEADER = "x-prompt-cache-isolation-key"  # Fireworks' header for the body's prompt_cache_isolation_key
PARSE_THREADS = 32  # requests parsed at once (threads mostly wait: on the tokenizer, which lets go of the GIL, or
#                     on the grammar sandbox's child)


# When the API call being answered must be done by (--request-timeout from its arrival, in the event loop's clock): set
# for the call's task in `Server.serve`, read by every wait of the call's (its body, its parse, its tokens).
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")  # the chat page's files


class Stalled(Exception):
    """A streaming client did not take a write within `Server.stall_timeout` seconds."""


PAUSE_MODES = ("abort", "wait", "in_place", "retract")  # `pause_generation`'s (vLLM's "keep" is "in_place")
SWAP_WAIT = 600.0  # seconds `update_weights` waits for the calls in flight to finish
# With /health* and /static/, what an API key leaves open (SGLang's rule; the probes of SageMaker, /ping, and of load
# balancers, /load, send no key)
OPEN = ("/", "/metrics", "/version", "/ping", "/load")
UNVERSIONED = {"/chat/completions": "chat", "/completions": "completions", "/models": "models"}  # /v1's, unprefixed


class Server:
    """One served model behind the OpenAI-compatible routes."""

    def __init__(self, model: Model, aengine: AsyncEngine, api_key: str | tuple[str, ...] | None = None,
                 max_body_mb: float = 8.0,
                 max_queued: int | None = None, request_timeout: float | None = None,
                 reasoning_parser: str = "auto", responses_db: str | None = None,
                 allowed_origins: tuple[str, ...] = (), pooling: str | None = None, batch_concurrency: int = 0,
                 max_file_mb: float = 200.0, batch_priority: int = 1, files_dir: str | None = None,
                 media: images.Media = images.NO_MEDIA, aliases: tuple[str, ...] = (),
                 loader: Callable[[str], Model] | None = None, profiler_dir: str | None = None):
        self.model, self.aengine, self.engine = model, aengine, aengine.engine
        self.loader = loader  # a folder's model loaded as this one was (`update_weights`; None: not offered)
        self.profiler_dir = profiler_dir  # where /start_profile writes unless told (`server.profile`)
        self.weight_version = "default"  # SGLang's name for the weights served (`update_weights` sets it)
        self.paused: asyncio.Future | None = None  # while weights are swapped, calls wait on it before admission
        self.holding: asyncio.Future | None = None  # ... and while generation is paused (`pause_generation`)
        self.pausing = asyncio.Lock()  # one pause or continue at a time
        self.engine_calls = 0  # calls running work on the engine outside its requests (embeddings, beam rounds)
        self.updating = asyncio.Lock()
        self.aliases = aliases  # more names the served model answers to (`--served-model-name A B ...`)
        # the adapters (their loads' ids) and scales of requests that name none (llama.cpp's /lora-adapters): by
        # id, so another adapter loaded later under its name is not one
        self.lora_default: dict[int, float] | None = None
        self.max_queued = max_queued if max_queued is not None else 4 * self.engine.runner.slots
        self.request_timeout = request_timeout
        self.draining = False  # set on SIGTERM/SIGINT: new requests get 503, /health turns 503
        self.active = 0  # completion requests being answered (background responses' tasks among them)
        self.detached: set[asyncio.Task] = set()  # tasks running past their calls (`detach`)
        self.stages = {"reading": 0, "parsing": 0}  # of those, the ones not admitted yet: bodies arriving, parsing
        self.stall_timeout = STALL_TIMEOUT
        self.ping_every = PING_EVERY  # seconds a stream of a face with a `ping` may go quiet before one is sent
        self.admitted: list[list[Request]] = []  # each admitted call's engine requests, oldest first
        self.loop_thread: int | None = None  # the event loop's thread (set when the app starts)
        self.prom = Metrics(self.engine.stats, lambda: {"engine": aengine.thread_ident, "event_loop": self.loop_thread},
                            model.name)
        self.api_keys = (api_key,) if isinstance(api_key, str) else tuple(api_key or ())  # any of them opens
        self.name, self.api_key = model.name, (self.api_keys or (None,))[0]  # the one the server's own calls send
        self.allowed_origins = allowed_origins  # CORS: web pages of these origins may call the API ('*': any)
        self.max_body = int(max_body_mb * (1 << 20))
        self.parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="sparkler-parse")
        self.vocab = Vocab(model)
        self.created = int(time.time())
        defaults = {**default_settings(model.generation_config), "max_tokens": self.engine.default_max_tokens,
                    "frequency_penalty": 0.0, "presence_penalty": 0.0, "mirostat_lr": 0.1}
        self.options_header = {"fireworks-sampling-options": json.dumps(defaults, sort_keys=True)}
        self.thinks, self.think_ids = reasoning.resolve(reasoning_parser, model.tokenizer)
        self.store = ResponseStore(responses_db or os.path.join(cache_root(), "responses.sqlite"))
        self.media = media  # where pictures may be fetched from (`server.images`)
        self.pooling = pooling  # /v1/embeddings' pooling (None: as the model folder asks, `models.pooling.default`)
        # /v1/files and /v1/batches
        self.batches = batches.Batches(self, batch_concurrency, max_file_mb, batch_priority, files_dir)
        self.message_batches = message_batches.MessageBatches(self)  # Anthropic's /v1/messages/batches

    def app(self, loopback: bool = False) -> web.Application:
        """The aiohttp application with its routes and the error/auth middleware (`loopback`: the one batches send
        their lines to, `server.batch.Loopback`)."""
        app = web.Application(client_max_size=self.max_body, middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        compaction.routes(app, openai_responses.routes(app, self))
        conversations.routes(app, self)
        anthropic_messages.routes(app, self)
        message_batches.routes(app, self)
        emb = embeddings.routes(app, self)
        sglang.routes(app, self, emb)
        sleep_mode.routes(app, self)
        profile.routes(app, self, self.profiler_dir)
        adapters.routes(app, self)
        batches.routes(app, self)
        llama_cpp.routes(app, self, emb)
        sagemaker.routes(app, self, emb, scores.routes(app, emb))
        ollama.routes(app, self, emb)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{name:.+}", self.model_card)
        for path, handler in UNVERSIONED.items():  # as llama.cpp's server: for clients given a base URL without /v1
            app.router.add_route("GET" if path == "/models" else "POST", path, getattr(self, handler))
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/load", self.load)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/", self.page)
        app.router.add_static("/static", STATIC, show_index=False)
        if self.allowed_origins:  # preflight OPTIONS answered, and CORS headers on every route's answers
            every = aiohttp_cors.ResourceOptions(allow_headers="*", allow_methods="*", expose_headers="*", max_age=600)
            cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(self.allowed_origins, every))
            for route in list(app.router.routes()):
                cors.add(route)
        app.on_startup.append(self._started)
        app.on_response_prepare.append(self._request_id)
        if not loopback:
            app.on_shutdown.append(self.stop_detached)
            app.on_startup.append(self.batches.load)
            app.on_shutdown.append(self.batches.stop)
        return app

    def close(self) -> None:
        """Stop the engine thread, the parse threads (a parse still queued is dropped) and the grammar sandbox's
        child, close the Responses store and remove the batches' files: after the HTTP side has stopped."""
        self.aengine.close()
        self.parse_pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        self.batches.close()

    async def _started(self, app: web.Application) -> None:
        self.loop_thread = threading.get_ident()

    @staticmethod
    async def _request_id(request: web.Request, response: web.StreamResponse) -> None:
        """Every answer names its call in `X-Request-Id` (as OpenAI's API, and vLLM's `--enable-request-id-headers`):
        the client's own header, else the call's id (the body's `id`), else a fresh one."""
        if "X-Request-Id" not in response.headers:
            call = request.get("call")
            response.headers["X-Request-Id"] = request.headers.get("X-Request-Id") or (
                call.rid if call is not None and call.rid != "-" else uuid.uuid4().hex)

    def detach(self, coro) -> asyncio.Task:
        """Run `coro` as a task past the call that started it (a background response): without the call's deadline,
        counted in `active` so a drain waits for it, and cancelled at shutdown (`stop_detached`)."""
        task = self._untimed(coro)
        self.active += 1
        self.detached.add(task)

        def done(t: asyncio.Task) -> None:
            self.active -= 1
            self.detached.discard(t)
        task.add_done_callback(done)
        return task

    async def stop_detached(self, app: web.Application | None = None) -> None:
        """Cancel the detached tasks still running and wait for them to end (shutdown, after the drain)."""
        running = list(self.detached)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    # ---- plumbing ---------------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        shape = anthropic_messages.error_body if request.path.startswith("/v1/messages") else \
            ollama.error_body if request.path.startswith("/api/") else ApiError.body
        try:
            guarded = request.method != "OPTIONS" and not (  # not preflights, nor what probes and the page read
                request.path in OPEN or request.path.startswith(("/health", "/static/")))
            if self.api_keys and guarded:
                bearer = request.headers.get("Authorization", "")
                sent = (bearer[7:] if bearer.startswith("Bearer ") else None, request.headers.get("x-api-key"))
                if not any(key in self.api_keys for key in sent):
                    raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>' or "
                                        "'x-api-key: <key>')", type_="authentication_error", code="invalid_api_key")
            return await handler(request)
        except ApiError as e:
            resp = web.json_response(shape(e), status=e.status, headers=e.headers)
            if e.headers.get("Connection") == "close":  # and no more is read from it (`protocol.unreadable`)
                resp.force_close()
            return resp
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = ApiError(e.status, e.reason or "error", code=e.reason.lower().replace(" ", "_"))
            return web.json_response(shape(err), status=e.status)
        except Exception as e:
            if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG and request.path.startswith("/static/"):
                return web.json_response(shape(ApiError(404, "Not Found", code="not_found")), status=404)
            log.exception("unexpected error in %s", request.path)
            err = ApiError(500, "internal server error", type_="server_error", code="internal_error")
            return web.json_response(shape(err), status=500)

    async def body_object(self, request: web.Request) -> dict:
        """An admin route's optional JSON object body (`_body`; no body: `{}`), a 400 for anything else."""
        body = await self._body(request) if request.can_read_body else {}
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    async def _body(self, request: web.Request):
        now = asyncio.get_running_loop().time()
        limit = min(BODY_TIMEOUT, (DEADLINE.get() or math.inf) - now)  # --request-timeout counts from the arrival
        try:
            async with asyncio.timeout(limit):
                raw = await request.read()
        except TimeoutError:  # a client that stalls while sending its body
            raise ApiError(408, f"the request body did not arrive within {limit:.3g} s",
                           code="request_timeout") from None
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"the request body exceeds {self.max_body} bytes", code="request_too_large") from None
        except RequestPayloadError as e:  # a Content-Encoding the body does not match, a cut chunked body
            raise unreadable(request, f"the request body could not be read: {str(e).strip()}") from None
        return await self.off_loop(protocol.decode_json, raw)  # up to --max-body-mb parsed and walked

    async def parse(self, body: Any, kind: str, bounds: dict | None = None) -> Job:
        """`protocol.parse` on a worker thread, and the job's tools and grammar checked against the tokenizer (in
        the grammar sandbox's child process): templating and tokenizing a long prompt, bisecting a
        `prompt_truncate_len` or compiling a grammar must not stall the event loop that streams every other
        request's tokens. New grammars queue for the one child; one that waited past its timeout is a 429, so
        queued grammars cannot hold every parse thread."""
        def parse() -> Job:
            try:
                return encoded(checked(protocol.parse(body, kind, self.model, self.thinks, bounds, self.media)))
            except Busy as e:
                raise busy(str(e)) from None

        def encoded(job: Job) -> Job:  # the images' features, computed here rather than on the loop
            if job.images and self.engine.images is None:  # a model that reads them, over several processes
                raise bad("the served model reads text only when served over several processes", "messages")
            job.images = [self.engine.images.encode(pixels) for pixels in job.images]
            return job

        def checked(job: Job) -> Job:
            self._keep_last(job)
            p = job.params
            try:  # the vocabulary's breaker mask (the first set reads every token's text) and bad words, cached
                if p.dry_multiplier > 0:
                    self.engine.breakers(tuple(p.dry_sequence_breakers))
                self.engine.bad_words(tuple(p.bad_words), p.allowed_token_ids)
            except InvalidRequest as e:
                raise bad(str(e), e.param) from None
            if self.engine.tok is None:
                return job
            grammars = self.engine.grammars()
            if job.tools is not None:
                tools.check(job.tools, grammars, bad)
            if job.grammar is not None:  # checked here, off the loop; make_request is told so (grammar_checked)
                try:
                    grammars.check(job.grammar, job.grammar_param)
                except InvalidRequest as e:
                    raise bad(str(e), e.param) from None
            return job
        return await self.off_loop(parse)

    async def off_loop(self, fn, *args):
        """`fn(*args)` on a parse thread, waited for until the call's deadline (then a 504; the thread finishes its
        work and it is dropped)."""
        try:
            async with asyncio.timeout_at(DEADLINE.get()):
                return await asyncio.get_running_loop().run_in_executor(self.parse_pool, fn, *args)
        except TimeoutError:
            raise self.timed_out() from None

    @staticmethod
    def deadline() -> float | None:
        """The current call's deadline on the event loop's clock (None: no --request-timeout)."""
        return DEADLINE.get()

    def served(self, call: "Call") -> str:
        """The model a call's reply names: its LoRA adapter's name where it runs on one, else the served model's."""
        one = [call.adapter] if isinstance(call.adapter, str) else list(call.adapter or ())
        return one[0] if len(one) == 1 else self.name

    def adapter_of(self, body) -> str | dict[str, float] | None:
        """The LoRA adapters a call runs on, as `Engine.make_request` takes them: the one its `model` names
        (`check_model`; at its own scale), or those its llama.cpp `lora` list gives scales (`adapters.picked`; a 400
        where the two differ), else the default of llama.cpp's `/lora-adapters` (None: the served model)."""
        named = self.check_model(body)
        if isinstance(body, dict) and body.get("lora") is not None:
            chosen = adapters.picked(adapters.ids(self.engine), body["lora"])
            if named is not None and set(chosen or ()) != {named}:
                raise bad(f"'model' names the adapter {named!r} and 'lora' picks {sorted(chosen or ()) or 'none'}; "
                          "give one", "lora")
            return chosen
        return named if named is not None else self.default_adapter()

    def default_adapter(self) -> dict[str, float] | None:
        """The adapters requests naming none run on and their scales (llama.cpp's `POST /lora-adapters`, or
        `--lora`), those still loaded; None: the served model."""
        table = adapters.ids(self.engine)
        return {table[i]: scale for i, scale in (self.lora_default or {}).items() if i in table} or None

    def check_model(self, body) -> str | None:
        """The LoRA adapter a body's `model` names (None: the served model, or no `model`); 404 for another."""
        name = body.get("model") if isinstance(body, dict) else None
        if name is None:
            return None
        if not isinstance(name, str):
            raise bad("'model' must be a string", "model")
        if name in self.engine.adapters:  # an adapter's own name first (it may look like Fireworks' path)
            return name
        short = name.rsplit("/models/", 1)[-1] if name.startswith(MODEL_PREFIX) else name
        short = short.removesuffix(":latest")  # Ollama's name for a model without a tag
        if short == self.name or short in self.aliases:
            return None
        if short in self.engine.adapters:
            return short
        names = ", ".join(repr(n) for n in [self.name, *self.aliases, *self.engine.adapters])
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {names}", "model",
                       code="model_not_found")

    def _requests(self, job: Job, rid: str, adapter: str | dict[str, float] | None) -> list[tuple[int, Request]]:
        """`(prompt index, engine request)` pairs, on the LoRA adapters `adapter` names (`adapter_of`; None: the
        served model); n beyond one data shard's decode slots is split over several requests."""
        out, n, slots = [], job.params.n, self.engine.runner.per_shard
        for i, ids in enumerate(job.prompts):
            for first in range(0, n, slots):
                params = dataclasses.replace(job.params, n=min(slots, n - first))
                try:
                    out.append((i, self.engine.make_request(
                        ids, params, f"{rid}-{i}-{first}", truncate=job.truncate, first_choice=first,
                        prompt_cache_max_len=job.cache_max_len, prompt_cache_isolation_key=job.cache_key,
                        grammar=job.grammar, thinking=self._budget(job), prediction=job.prediction,
                        grammar_checked=self.engine.tok is not None, adapter=adapter,
                        priority=job.priority, images=job.images)))
                except Busy as e:
                    raise busy(str(e)) from None
                except InvalidRequest as e:
                    raise invalid(job, e) from None
        return out

    def _keep_last(self, job: Job) -> None:
        """vLLM's `truncate_prompt_tokens`: each prompt's last tokens only (-1: as many as leave room for one more),
        and its text theirs (what `echo` returns)."""
        if job.keep_last is None:
            return
        keep = self.engine.max_len - 1 if job.keep_last == -1 else job.keep_last
        for i, ids in enumerate(job.prompts):
            if len(ids) > keep:
                if job.images and self.model.vision.image_token_id in ids[:-keep]:
                    raise bad(f"truncate_prompt_tokens={job.keep_last} would cut into a picture: keep at least "
                              f"{len(ids) - ids.index(self.model.vision.image_token_id)} tokens",
                              "truncate_prompt_tokens")
                job.prompts[i] = ids[-keep:]
                job.prompt_texts[i] = self.engine.tok.decode(ids[-keep:]) if self.engine.tok is not None else ""

    def _budget(self, job: Job) -> Budget | None:
        """The engine's view of a job's thinking block: its budget, and where a grammar may start (None: the
        engine need not know)."""
        t = job.thinking
        if t is None or (t.budget is None and job.grammar is None):
            return None
        if self.think_ids is None:
            if t.budget or (t.budget == 0 and t.budget_param == "thinking_token_budget"):  # (0 by reasoning_effort:
                # thinking off in the template)
                raise bad("this model's thinking cannot be cut at a token budget (its tags are not single tokens, or "
                          "it thinks on harmony's analysis channel)", t.budget_param)
            return None  # thinking off goes through the template alone; a grammar applies from the first token
        return Budget(t.budget, *self.think_ids, opened=t.opened)

    def reasoning_tokens(self, job: Job, choice) -> int:
        """Tokens a choice spent thinking: up to and including its block's close (all of them if it never closed)."""
        if job.thinking is not None and job.thinking.form == "harmony":
            return harmony.reasoning_tokens(choice.token_ids, self.vocab.tok.token_texts.__getitem__)
        if job.thinking is None or self.think_ids is None:
            return 0
        ids = choice.token_ids
        if self.think_ids[1] in ids:
            return ids.index(self.think_ids[1]) + 1
        return len(ids) if job.thinking.opened or ids[:1] == [self.think_ids[0]] else 0

    def _usage(self, job: Job, reqs: list[Request]) -> dict:
        """Chat and completions usage; with a reasoning parser, the thinking tokens among the completion's; with
        a prediction (or drafts), OpenAI's accepted and rejected prediction tokens."""
        used, details = usage(reqs), {}
        if job.thinking is not None:
            details["reasoning_tokens"] = sum(self.reasoning_tokens(job, c) for r in reqs for c in r.choices)
        drafted, accepted = sum(r.drafted for r in reqs), sum(r.accepted for r in reqs)
        if job.prediction or drafted:
            details.update(accepted_prediction_tokens=accepted, rejected_prediction_tokens=drafted - accepted)
        if details:
            used["completion_tokens_details"] = details
        return used

    # ---- routes -----------------------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the served model (once under each of its names) and its LoRA adapters."""
        cards = [self._card(), *(self._card(alias=a) for a in self.aliases),
                 *(self._card(name) for name in list(self.engine.adapters))]
        return web.json_response({"object": "list", "data": cards,  # Anthropic's list fields too: one page
                                  "has_more": False, "first_id": cards[0]["id"], "last_id": cards[-1]["id"]})

    def _card(self, adapter: str | None = None, alias: str | None = None) -> dict:
        """The served model's card (under `alias`, one of its other names), or a LoRA adapter's (vLLM's: `root` its
        folder, `parent` the model); OpenAI's fields and Anthropic's (`type`, `display_name`, `created_at`,
        `max_input_tokens`, `lifecycle`), which the `anthropic` client's `models` reads."""
        name = adapter or alias or self.name
        created = datetime.datetime.fromtimestamp(self.created, datetime.timezone.utc).isoformat()
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "sparkler",
                "type": "model", "display_name": name, "created_at": created, "max_input_tokens": self.engine.max_len,
                "lifecycle": "active",
                "max_model_len": self.engine.max_len, "dtype": self.model.cfg.dtype,
                "quantization": {"method": self.model.cfg.quantization, "products": self.model.cfg.matmul,
                                 "why": self.model.quantization_why},
                "input_modalities": ["text", "image"] if self.engine.images is not None else ["text"]}
        loaded = self.engine.adapters.get(adapter) if adapter else None
        if loaded is not None:
            card.update(root=loaded.path, parent=self.name, lora_rank=loaded.rank)
        return card

    async def model_card(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: the served model or a LoRA adapter, or 404."""
        name = request.match_info["name"]
        adapter = self.check_model({"model": name})
        return web.json_response(self._card(adapter, alias=name if name in self.aliases else None))

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize: token ids of `prompt` (vLLM's; `add_special_tokens`, default true) or `content`
        (llama.cpp's; `add_special`, default false; `with_pieces` pairs each id with its text), or of chat
        `messages` as templated (with `tools`, `chat_template_kwargs`, `add_generation_prompt`,
        `continue_final_message`, as chat completions take them); `return_token_strs`: each token's text too."""
        body = await self._body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        self.check_model(body)
        llama = "content" in body and "prompt" not in body
        if "messages" in body:  # templated as chat templates them: tools and the template's arguments too
            with_tools = tools.parse(body, bad)
            kwargs = protocol.template_kwargs(body)[0]
            ids, _, _ = await self.off_loop(protocol.chat_ids, self.model, body["messages"], None, with_tools, kwargs,
                                            self.media)
        else:
            text = body.get("content") if llama else body.get("prompt")
            if not isinstance(text, str):
                raise bad(f"'{'content' if llama else 'prompt'}' must be a string", "content" if llama else "prompt")
            special = body.get("add_special", False) if llama else body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise bad("'add_special' / 'add_special_tokens' must be a boolean", "add_special_tokens")
            ids = await self.off_loop(self.vocab.tok.encode, text, special)
        tokens = ([{"id": t, "piece": self.vocab.text(t)} for t in ids] if body.get("with_pieces") is True else ids)
        out = {"tokens": tokens, "count": len(ids), "max_model_len": self.engine.max_len}
        if body.get("return_token_strs") is True:  # vLLM's: each token's text
            out["token_strs"] = [self.vocab.text(t) for t in ids]
        return web.json_response(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize: the text of `tokens` (special tokens kept), as vLLM's `prompt` and llama.cpp's
        `content`."""
        body = await self._body(request)
        self.check_model(body)
        ids = body.get("tokens") if isinstance(body, dict) else None
        vocab = self.model.cfg.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise bad(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        text = self.vocab.tok.decode(ids, skip_special_tokens=False)
        return web.json_response({"prompt": text, "content": text})

    async def metrics(self, request: web.Request) -> web.Response:
        """GET /metrics: request counters, latency histograms and engine gauges in Prometheus' text format."""
        return web.Response(body=self.prom.render(), content_type="text/plain", charset="utf-8")

    async def page(self, request: web.Request) -> web.FileResponse:
        """GET /: the chat page (`server/static/`: plain HTML, CSS and JavaScript against this API)."""
        return web.FileResponse(os.path.join(STATIC, "index.html"))

    async def load(self, request: web.Request) -> web.Response:
        """GET /load: the calls being answered (vLLM's `--enable-server-load-tracking` route, for balancers)."""
        return web.json_response({"server_load": self.active})

    async def version(self, request: web.Request) -> web.Response:
        """GET /version: the installed sparkler's version (vLLM's route)."""
        return web.json_response({"version": importlib.metadata.version("sparkler")})

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: liveness plus slot and page occupancy and counters; 503 while draining, or if the engine
        thread has died."""
        status = "draining" if self.draining else "ok" if self.aengine.alive else "engine stopped"
        return web.json_response({"status": status, "model": self.name, **self.engine.stats()},
                                 status=200 if status == "ok" else 503)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._complete(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._complete(request, "completion")

    async def _complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        """Chat or completions: parse, admit, answer in one object or a stream."""
        return await self.serve(request, self.completer(request, kind))

    def completer(self, request: web.Request, kind: str) -> Callable:
        """The answer (`serve`'s `answer(body, call)`) of a chat or completions request."""
        async def answer(body, call: Call) -> web.StreamResponse:
            job = await self.parse(body, kind)
            if job.beam_search:
                return await self._beam_search(job, call, "chatcmpl-" if kind == "chat" else "cmpl-")
            parts, events = self.admit(job, call, "chatcmpl-" if kind == "chat" else "cmpl-")
            if job.stream:
                return await self._stream(request, job, parts, call, events)
            await self.collect(events, call)
            return self._respond(job, parts, call)
        return answer

    async def serve(self, request: web.Request, answer, model: bool = True) -> web.StreamResponse:
        """One API call with its accounting: 503 while draining; the JSON body read, then 503 while the model sleeps
        (`sleep`; unless the call does not run the `model`: a count of tokens), 429 when more calls wait
        to be parsed than could be seated or queued (bodies still arriving do not count: a crowd of stalled uploads
        must not lock others out; they end at the body timeout); the model checked, then `answer(body, call)`
        parses, `admit`s and writes the reply (each API's own shapes), all by the call's deadline
        (`--request-timeout` from now)."""
        call = request["call"] = Call()  # (its id names the answer: `_request_id`)
        status = 500
        self.active += 1
        deadline = DEADLINE.set(None if self.request_timeout is None
                                else asyncio.get_running_loop().time() + self.request_timeout)
        try:
            if self.draining:
                raise self.shutting_down()
            self._stage(call, "reading")
            body = isolated(await self._body(request), request.headers.get(ISOLATION_HEADER))
            await self._unpaused()
            if model and self.engine.asleep:
                raise self.asleep_error()
            if (parsing := self.stages["parsing"]) >= self.max_queued + self.engine.runner.slots:
                raise busy(f"the server is busy ({parsing} requests being parsed)")
            self._stage(call, "parsing")
            call.adapter = self.adapter_of(body)
            resp = await answer(body, call)
            status = 408 if call.cut else resp.status
            return resp
        except ApiError as e:
            status = e.status
            raise
        except sleeping.Asleep:  # a count of tokens that encodes a picture
            status = 503
            raise self.asleep_error() from None
        except asyncio.CancelledError:  # the client went away (nginx's 499), or shutdown cut the call short
            status = 503 if self.draining else 499
            raise
        finally:
            self.active -= 1
            self._stage(call, None)
            DEADLINE.reset(deadline)
            if not call.detached:  # else its task accounts for it when it ends
                self.account(request.path, status, call.rid, call.reqs, call.took, request.headers.get("X-Request-Id"))

    def in_flight(self) -> list[str]:
        """The ids of the engine requests of every admitted call."""
        return [r.id for reqs in self.admitted for r in reqs]

    def abort_in_flight(self) -> int:
        """Abort the engine requests of every admitted call (each answers what it drew); how many."""
        ids = self.in_flight()
        for rid in ids:
            self.engine.abort(rid)
        return len(ids)

    async def _unpaused(self) -> None:
        """Wait while weights are swapped (`update_weights`), by the call's deadline; before parsing, so that nothing
        is prepared with the old weights (a picture's features) and admitted after."""
        while (gate := self.paused or self.holding) is not None:
            deadline = DEADLINE.get()
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(gate)
            except TimeoutError:
                raise self.timed_out() from None

    async def update_weights(self, path: str, abort: bool = False, version: str | None = None) -> int:
        """Serve the weights of the folder or file at `path` (SGLang's `/update_weights_from_disk`), named `version`:
        loaded beside the ones served (`loader`, as this model was loaded), checked to be the same model's (config,
        shapes, dtypes), then swapped in once no call is being parsed or run, new calls waiting meanwhile (with
        `abort`, those in flight are aborted first; else they finish on the old weights, for up to `SWAP_WAIT`
        seconds); the prefix cache is flushed. Returns the calls aborted; a 400 (409 past the wait) saying why where
        the weights cannot be served (none are swapped). It runs to its end if its caller goes away."""
        if self.loader is None:
            raise bad("this server cannot load other weights (it runs over several processes, or was not started by "
                      "`python -m server`)", "model_path")
        return await asyncio.shield(asyncio.get_running_loop().create_task(self._update(path, abort, version)))

    async def _update(self, path: str, abort: bool, version: str | None) -> int:
        async with self.updating:
            instead = "pause with mode retract (or abort) to update the weights"
            await self._not_in_place("its seated requests hold KV pages the old weights wrote, which the new ones "
                                     f"would go on from; {instead}", "model_path")  # (before loading them)
            try:
                new = await self.off_loop(self.loader, path)
            except (OSError, ValueError, NotImplementedError, KeyError) as e:
                raise bad(f"could not load {path!r}: {e}", "model_path") from None
            differ = [f.name for f in dataclasses.fields(new.cfg) if getattr(new.cfg, f.name) != getattr(
                self.model.cfg, f.name)]
            shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), m.params["params"])  # noqa: E731
            if differ or shapes(new) != shapes(self.model):
                raise bad(f"{path!r} is not this model's kind: {', '.join(differ) or 'its weights shapes'} differ",
                          "model_path")
            aborted = await self._quiet(lambda e: e.swap_weights(new), "the weights are unchanged "
                                        "(abort_all_requests ends them first)", "model_path", abort,
                                        instead=instead)
            self.model.source = new.source
            self.weight_version = version or self.weight_version
        log.info("weights of %s served (%s)", path, self.weight_version)
        return aborted

    async def _quiet(self, fn: Callable[[Any], bool], unchanged: str, param: str | None = None,
                     abort: bool = False, *, instead: str) -> int:
        """`fn(engine)` on the engine thread once no call is being parsed or run (`fn` answers False while the
        engine has work; embeddings and beam searches, which run in parts, count in `engine_calls`), new calls
        waiting meanwhile (`paused`); with `abort`, those in flight are aborted first,
        else they finish, for up to `SWAP_WAIT` seconds (then a 409 that ends with `unchanged`). Generation paused
        in place with requests seated, while it waits, is a 400 that ends with `instead` (they would never
        finish). Returns the calls aborted."""
        loop = asyncio.get_running_loop()
        self.paused, end = loop.create_future(), loop.time() + SWAP_WAIT
        try:
            aborted = self.abort_in_flight() if abort else 0
            while self.stages["parsing"] or self.engine_calls or not await self.on_engine(fn):
                await self._not_in_place(f"the requests it holds seated would never finish; {instead}", param)
                if loop.time() > end:
                    raise ApiError(409, f"the calls in flight did not finish within {SWAP_WAIT:.0f} s; {unchanged}",
                                   param)
                await asyncio.sleep(0.02)  # the calls being parsed or run finish first
        finally:
            self.paused.set_result(None)
            self.paused = None
        return aborted

    async def _not_in_place(self, why: str, param: str | None) -> None:
        """A 400 saying `why` while generation is paused in place (`pause_generation`) with requests seated."""
        if await self.on_engine(lambda e: e.held == "in_place" and bool(e.sched.running or e.sched.prefilling)):
            raise bad(f"generation is paused in place: {why}", param)

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = False) -> None:
        """Pause generating (SGLang's `/pause_generation`, vLLM's `/pause`, as RL trainers call them around a weight
        update): new calls wait before parsing until `continue_generation` (by their deadlines); "abort" aborts the
        calls in flight (each answers what it drew, finish reason "abort"), "wait" lets them finish, "in_place"
        holds them seated with their KV pages, "retract" holds them back in the queue, to be recomputed
        (`Engine.hold`). Returns once nothing runs, the prefix cache flushed with `clear_cache` (after an abort or
        a wait; vLLM's `/pause` asks for it by default, SGLang's never); weights updated meanwhile serve the calls
        held when they go on. A wait that outlasts `SWAP_WAIT` is a 409 and pauses nothing; a wait while paused
        already changes nothing. It runs to its end if its caller goes away."""
        if mode not in PAUSE_MODES:
            raise bad(f"mode: one of {', '.join(PAUSE_MODES)}, not {mode!r}", "mode")
        await self._shielded(self._pause(mode, clear_cache))

    async def _pause(self, mode: str, clear_cache: bool) -> None:
        async with self.pausing:
            opened = self.holding is None
            if opened:
                self.holding = asyncio.get_running_loop().create_future()
            try:
                if mode == "abort":
                    self.abort_in_flight()
                if mode == "wait" and self.engine.held is not None:
                    return  # paused already: as it was (vLLM's pause again is nothing)
                end = asyncio.get_running_loop().time() + SWAP_WAIT
                while mode == "wait" and not self.draining and (self.stages["parsing"] or self.engine_calls
                                                                or await self.on_engine(lambda e: e.has_work())):
                    if asyncio.get_running_loop().time() > end:
                        raise ApiError(409, f"the calls in flight did not finish within {SWAP_WAIT:.0f} s; "
                                       "generation is not paused", "mode")
                    await asyncio.sleep(0.02)  # the calls in flight finish
                await self.on_engine(lambda e: e.hold("in_place" if mode == "in_place" else "retract"))
            except BaseException:
                if opened:
                    self._open_gate()
                raise
            while await self.on_engine(lambda e: e.runnable()):  # what was in flight read back, retracted
                await asyncio.sleep(0.01)
            if clear_cache and mode in ("abort", "wait") and not await self.on_engine(lambda e: e.flush_cache()):
                log.warning("paused; the prefix cache was not flushed (work is still seated)")

    @property
    def paused_generation(self) -> bool:
        """Whether generation is paused (`pause_generation`)."""
        return self.holding is not None or self.engine.held is not None

    async def continue_generation(self) -> None:
        """Generate again after `pause_generation`: the calls held go on, those waiting are parsed."""
        async with self.pausing:
            await self.on_engine(lambda e: e.release())
            self._open_gate()

    def _open_gate(self) -> None:
        """Let the calls waiting on a pause in."""
        if self.holding is not None:
            self.holding.set_result(None)
            self.holding = None

    async def sleep(self, tags: tuple[str, ...] = sleeping.TAGS, keep_weights: bool = True) -> None:
        """Give back the devices' memory of `tags` (`Engine.sleep`: vLLM's `/sleep`, SGLang's
        `/release_memory_occupation`) once the calls in flight have finished, new ones waiting meanwhile; then
        every call that needs the model is a 503 until `wake_up`. `keep_weights` False (vLLM's level 2) discards the
        model's weights: waking reads them again from where they were loaded (or `update_weights` serves new
        ones). A 400 where that cannot be done; a 409 when the calls in flight outlast `SWAP_WAIT`."""
        if not keep_weights and self.loader is None:
            raise bad("this server cannot load its weights again (it runs over several processes, or was not "
                      "started by `python -m server`): sleep at level 1", "level")
        if jax.process_count() > 1:
            raise bad("sleep mode is not offered across processes", "level")
        await self._shielded(self._sleep(tags, keep_weights))

    @staticmethod
    def _untimed(coro) -> asyncio.Task:
        """`coro` as a task without the calling request's deadline (a weight load must not be cut by it)."""
        context = contextvars.copy_context()
        context.run(DEADLINE.set, None)
        return asyncio.get_running_loop().create_task(coro, context=context)

    @classmethod
    async def _shielded(cls, coro):
        """`coro` run to its end whether or not its caller waits for it (`_untimed`; its error read either way)."""
        task = cls._untimed(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _sleep(self, tags: tuple[str, ...], keep_weights: bool) -> None:
        async with self.updating:
            await self._quiet(lambda e: e.sleep(tags, keep_weights), "nothing was given back", "tags",
                              instead="pause with mode retract (or abort) to sleep")

    async def wake_up(self, tags: tuple[str, ...] = sleeping.TAGS) -> None:
        """Take back what `sleep` gave back for `tags` (vLLM's `/wake_up`, SGLang's `/resume_memory_occupation`);
        weights discarded are loaded again from the model's source first. Nothing asleep: nothing to do."""
        await self._shielded(self._wake_up(tags))

    async def wake_for(self, call: "Call") -> None:
        """Wake the model up for a call being parsed (Ollama's, which loads a model on demand): the call waits out of
        the parsing stage, so a sleep or weight swap under way is not held up by it."""
        if not self.engine.asleep:
            return
        self._stage(call, None)
        try:
            await self.wake_up()
        finally:
            self._stage(call, "parsing")

    async def _wake_up(self, tags: tuple[str, ...]) -> None:
        async with self.updating:
            new = None
            if "weights" in tags and self.engine.weights_discarded:
                new = await self.off_loop(self.loader, self.model.source)
            await self.on_engine(lambda e: e.wake_up(tags, new))

    def asleep_error(self) -> ApiError:
        """The 503 of a call that needs the model while it sleeps."""
        return ApiError(503, f"the model is sleeping ({' and '.join(sorted(self.engine.asleep))} given back); wake "
                        "it up first (POST /wake_up)", type_="service_unavailable", code="sleeping")

    def _stage(self, call: "Call", stage: str | None) -> None:
        """Move a call to `stage` ("reading" its body, "parsing" it, or None: admitted or ended), counted in
        `stages`."""
        if call.stage is not None:
            self.stages[call.stage] -= 1
        if stage is not None:
            self.stages[stage] += 1
        call.stage = stage

    def admitted_nothing(self, call: "Call") -> None:
        """A call that runs nothing on the engine (Ollama's load and unload) is past parsing: a sleep it asks for
        does not wait for it (`_quiet`)."""
        self._stage(call, None)

    @property
    def unadmitted(self) -> int:
        """Calls still reading or parsing their bodies."""
        return sum(self.stages.values())

    def admit(self, job: Job, call: "Call", prefix: str) -> tuple[list[tuple[int, Request]], Any]:
        """The job's engine requests under an id of `prefix` (its separator included), submitted (429 when the queue
        is full): `(parts, events)` where parts are
        `(prompt index, request)` and events `AsyncEngine.stream`'s iterator."""
        parts = self._seat(job, call, prefix)
        call.reqs, call.grammar_param = [r for _, r in parts], job.grammar_param
        self.admitted.append(call.reqs)
        return parts, self.aengine.stream(*call.reqs)  # submitted now: the queue check above and this are one step

    def _seat(self, job: Job, call: "Call", prefix: str) -> list[tuple[int, Request]]:
        """The job's engine requests under an id of `prefix` (`_requests`), not submitted yet: 503 when the engine
        is gone, 429 when the queue is full (counted in choices: n x prompts of each waiting call)."""
        self._stage(call, None)
        if not self.aengine.alive:  # its thread died: nothing would ever answer
            raise self.engine_stopped()
        call.rid = f"{prefix}{uuid.uuid4().hex[:24]}"
        parts = self._requests(job, call.rid, call.adapter)
        queued = self.backlog(sum(len(r.choices) for _, r in parts))
        if queued is not None and queued >= self.max_queued:
            raise busy(f"the server is busy ({queued} sequences waiting for a slot)")
        return parts

    async def _beam_search(self, job: Job, call: "Call", prefix: str) -> web.Response:
        """vLLM's `use_beam_search`: `n` beams per prompt (`engine.beam`), each step's running beams as one-token
        requests through the engine (429 when the queue is full at the start, as any call), then one response whose
        choices are each prompt's beams, best first."""
        width, eos = job.params.n, self.engine.eos
        try:
            beam.check_width(width, eos, job.params.ignore_eos, self.engine.runner.rc.logprobs_mode)
        except ValueError as e:
            raise bad(str(e), "n") from None
        # the prompts as the engine takes them (truncated, max_tokens set), one seat each
        parts = self._seat(dataclasses.replace(job, params=dataclasses.replace(job.params, n=1)), call, prefix)
        call.reqs = [r for _, r in parts]
        searches = [beam.BeamSearch(width, r.max_tokens, eos, job.length_penalty, job.params.ignore_eos)
                    for _, r in parts]
        cached, step = [0] * len(parts), 0
        self.engine_calls += 1  # a sleep or weight swap waits for the search's every round
        try:
            while ran := beam.runs(searches, [r.prompt_ids for _, r in parts]):
                if not self.aengine.alive:
                    raise self.engine_stopped()
                try:
                    reqs = [self.engine.make_request(
                        seq, beam.step_params(s), f"{call.rid}-beam{step}-{j}", adapter=call.adapter,
                        prompt_cache_max_len=job.cache_max_len,
                        prompt_cache_isolation_key=job.cache_key, priority=job.priority)
                        for j, (s, seq) in enumerate(ran)]
                except InvalidRequest as e:
                    raise invalid(job, e) from None
                self.admitted.append(reqs)
                try:
                    async with contextlib.aclosing(self.aengine.stream(*reqs)) as events:
                        async with asyncio.timeout_at(DEADLINE.get()):
                            async for _ in events:
                                pass
                except TimeoutError:
                    raise self.timed_out() from None
                ends = {c.finish_reason for r in reqs for c in r.choices}
                if not ends <= {"stop", "length"}:  # an engine error, an abort (SGLang's /abort_request), a drain
                    raise self.failed(reqs) if "error" in ends or self.draining else ApiError(
                        503, "the beam search's requests were aborted", type_="server_error", code="aborted")
                if step == 0:
                    cached = [r.cached_tokens for r in reqs]  # each prompt's first beam: its prompt alone
                beam.advance(ran, [r.choices[0].logprobs for r in reqs])
                step += 1
        finally:
            self.engine_calls -= 1
        final = []
        for (pi, r), s, hit in zip(parts, searches, cached):
            req = dataclasses.replace(r, choices=[Choice(j) for j in range(width)], cached_tokens=hit)
            for choice, b in zip(req.choices, s.finished):
                choice.token_ids = list(b.tokens)
                choice.text = beam.text(self.engine.tok, b, job.params.skip_special_tokens)
                choice.finish_reason = "stop" if b.ended else "length"
            final.append((pi, req))
        call.reqs = [r for _, r in final]
        return self._respond(job, final, call)

    def backlog(self, seats: int) -> int | None:
        """None if a call needing `seats` slots would find them free, else the sequences (choices) of the calls
        already waiting for a slot, so one call of 128 prompts x n 128 weighs what 16,384 single calls do.
        Counted here, over the calls admitted and not finished, in order: the engine seats the oldest first, so a
        burst fills the free slots and then the queue, however far the engine thread has got."""
        self.admitted = [reqs for reqs in self.admitted if not all(r.finished or r.cancelled for r in reqs)]
        taken = waiting = 0
        for reqs in self.admitted:  # the slots a call still holds: its choices not finished
            need = sum(not c.finish_reason for r in reqs if not r.cancelled for c in r.choices)
            if waiting or taken + need > self.engine.runner.slots:
                waiting += need
            else:
                taken += need
        return None if not waiting and taken + seats <= self.engine.runner.slots else waiting

    async def collect(self, events, call: "Call") -> None:
        """Wait for every choice to finish (504 past --request-timeout; `failed`'s error if a choice ended with
        finish_reason "error")."""
        try:
            async with contextlib.aclosing(events) as events:
                async with asyncio.timeout_at(DEADLINE.get()):
                    async for batch in events:
                        for i, deltas in batch:
                            call.took.saw(i, deltas, self.prom)
        except TimeoutError:
            raise self.timed_out() from None
        if any(c.finish_reason == "error" for r in call.reqs for c in r.choices):
            raise self.failed(call.reqs, call.grammar_param)

    async def sse(self, request: web.Request, call: "Call", events, turn: Turn, face) -> web.StreamResponse:
        """Stream a call's choices as Server-Sent Events in an API's own events (one, unless the face tells them
        apart by `Piece.source`, and `turn` passes text through unchanged): `face.opening()`, `face.add(piece)` for
        each piece of the reply (read through `turn`), `face.closing()`; on failure `face.failed(error)`, each a
        list of events that `face.encode` frames. Timeouts, engine errors, slow readers and gone clients are
        handled here, the same for every API."""
        resp = web.StreamResponse(headers={"Content-Type": getattr(face, "content_type", "text/event-stream"),
                                           "Cache-Control": "no-cache"})

        async def send(evs: list[dict]) -> None:
            await self.write(resp, b"".join(face.encode(ev) for ev in evs))

        async with (contextlib.aclosing(events) as events,
                    self.streaming(request, resp, call, lambda e: send(face.failed(e)))):
            try:
                await resp.prepare(request)
                await send(face.opening())
                ping = getattr(face, "ping", None)
                try:
                    async with (asyncio.timeout_at(DEADLINE.get()),
                                contextlib.aclosing(pinged(events, self.ping_every if ping else None)) as batches):
                        async for batch in batches:
                            if batch is None:  # quiet for ping_every seconds (a long prefill, a long queue)
                                await self.write(resp, ping())
                                continue
                            out, error = self.pieces(batch, call, turn, face)  # one write for a batch's events
                            await send(out)
                            if error is not None:
                                raise error
                except TimeoutError:
                    raise self.timed_out() from None
                await send(face.closing())
            except ApiError as e:
                await send(face.failed(e))
            except (Stalled, StreamOverflow, ConnectionError):
                raise  # `streaming`'s
            except Exception:  # the stream has started: end it with an error event, not a second response
                log.exception("unexpected error while streaming %s", call.rid)
                await send(face.failed(ApiError(500, "internal server error", type_="server_error",
                                                code="internal_error")))
        return resp

    def pieces(self, batch, call: "Call", turn: Turn, face) -> tuple[list[dict], ApiError | None]:
        """A batch of a call's engine events read through `turn` into `face`'s events (timed for the metrics), and
        `failed`'s error if a choice ended with finish_reason "error" (the events before it are kept)."""
        out = []
        for i, deltas in batch:
            call.took.saw(i, deltas, self.prom)
            for d in deltas:
                if d.finish_reason == "error":
                    return out, self.failed(call.reqs, call.grammar_param)
                piece = turn.feed(d.text, d.finish_reason, d.token_ids)
                piece.source, piece.entries = (i, d.index), d.logprobs
                out += face.add(piece)
        return out, None

    async def write(self, resp: web.StreamResponse, data: bytes) -> None:
        """Write to a started stream: `Stalled` if the client has not taken it within `stall_timeout` seconds
        (aiohttp waits for the socket to drain once its buffer is full: a client that stopped reading, or one so
        slow that megabytes wait for it)."""
        if not data:
            return
        try:
            async with asyncio.timeout(self.stall_timeout):
                await resp.write(data)
        except TimeoutError:
            raise Stalled from None

    @contextlib.asynccontextmanager
    async def streaming(self, request: web.Request, resp: web.StreamResponse, call: "Call", fail):
        """Around a started stream: a client that fell more than `max_buffer` events behind (`StreamOverflow`)
        gets the error event `fail(error)` writes and the end of the stream; one a write waited on for
        `stall_timeout` seconds (`Stalled`) has its connection reset, so it cannot mistake the cut for an end;
        one that went away is logged. Either way the caller's closing of its events aborts its requests, and the
        call is accounted as 408."""
        try:
            try:
                yield
            except StreamOverflow:
                log.warning("%s: the client fell more than %d events behind; the stream was cut and its requests "
                            "aborted", call.rid, self.aengine.max_buffer)
                call.cut = True
                await fail(ApiError(408, f"the client fell more than {self.aengine.max_buffer} events behind; the "
                                         "stream was cut", type_="timeout_error", code="client_too_slow"))
                resp.force_close()
        except asyncio.CancelledError:  # the client went away, or shutdown cut the handler: never wait on its socket
            if request.transport is not None:
                request.transport.abort()
            raise
        except Stalled:
            log.warning("%s: a write waited %g s for the client to take it; the connection was reset and its "
                        "requests aborted", call.rid, self.stall_timeout)
            call.cut = True
            if (transport := request.transport) is not None:
                with contextlib.suppress(OSError, AttributeError):  # a reset, the unsent bytes dropped (if a socket)
                    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                  struct.pack("ii", 1, 0))
                transport.abort()
        except ConnectionError:
            log.info("client went away during %s; its requests were aborted", call.rid)

    def failed(self, reqs: list[Request], param: str | None = None) -> ApiError:
        """The error of a request a choice of which ended with finish_reason "error": a 400 saying how its grammar
        (asked for by `param`) failed; else, while draining, the 503 of a request the drain timeout ended; else the
        500 of an engine step that raised."""
        if why := next((c.error for r in reqs for c in r.choices if c.error), None):
            return ApiError(400, why, param, code="grammar_failed")
        if self.draining:
            return self.shutting_down()
        return ApiError(500, "the engine failed while generating", type_="server_error", code="engine_error")

    async def on_engine(self, fn) -> Any:
        """`fn(engine)` run on the engine thread between steps (`AsyncEngine.call`), awaited: a 503 `engine_stopped`
        when the engine has stopped (before the call, or with it queued), `sleeping` when it raises
        `engine.sleep.Asleep`; its other errors are raised as they are."""
        try:
            return await self.aengine.call(fn)
        except sleeping.Asleep:
            raise self.asleep_error() from None
        except RuntimeError:
            if self.aengine.alive:
                raise
            raise self.engine_stopped() from None

    @staticmethod
    def engine_stopped() -> ApiError:
        """The 503 of a request the engine thread cannot answer: it has stopped or died."""
        return ApiError(503, "the engine has stopped; retry on another instance", type_="service_unavailable",
                        code="engine_stopped")

    @staticmethod
    def shutting_down() -> ApiError:
        """The 503 of a request refused, or ended, because the server is shutting down."""
        return ApiError(503, "the server is shutting down; retry on another instance", type_="service_unavailable",
                        code="shutting_down", headers={"Retry-After": "5"})

    def timed_out(self) -> ApiError:
        """The 504 of a request cut by --request-timeout."""
        return ApiError(504, f"the request did not finish within {self.request_timeout} s; it was aborted",
                        type_="timeout_error", code="timeout")

    def _respond(self, job: Job, parts, call: "Call") -> web.Response:
        """A whole (non-streaming) response once every choice has finished."""
        rid, took = call.rid, call.took
        reqs = [r for _, r in parts]
        choices = [self._choice(job, i, r, c) for i, r in parts for c in r.choices]
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        used = self._usage(job, reqs)
        perf = perf_metrics(used, took, job)
        headers = {**self.options_header, **{f"fireworks-{k}": str(v) for k, v in perf.items()}}
        body = {"id": rid, "object": obj, "created": int(time.time()), "model": self.served(call), "choices": choices,
                "usage": used}
        if job.return_token_ids:  # Fireworks: the prompt's ids at the top level, each choice's on the choice
            body["prompt_token_ids"] = prompt_token_ids(reqs)
        if job.prompt_logprobs is not None and job.kind == "chat":
            body["prompt_logprobs"] = vllm_prompt_logprobs(self.vocab, reqs[0], job.prompt_logprobs)
        if job.perf_metrics:
            body["perf_metrics"] = perf
        return web.json_response(body, headers=headers)

    def account(self, route: str, status: int, rid: str, reqs: list[Request], took: "Took",
                trace: str | None = None) -> None:
        """Count the request, observe its latencies, and log one line for it (with the client's `X-Request-Id`,
        `trace`, if it sent one)."""
        reasons = {c.finish_reason for r in reqs for c in r.choices}
        reason = "none" if not reasons or None in reasons else (reasons.pop() if len(reasons) == 1 else "mixed")
        total = time.monotonic() - took.start
        self.prom.requests.labels(route, str(status), reason).inc()
        self.prom.e2e.observe(total)
        for r in reqs:
            if r.admitted is not None:
                self.prom.queue.observe(r.admitted - r.arrival)
        firsts = prompt_requests(reqs)
        prompt = sum(len(r.prompt_ids) for r in firsts)
        self.prom.prompt_tokens.inc(prompt)
        fields = dict(id=rid, **({"trace": trace} if trace else {}), route=route, status=status, prompt_tokens=prompt,
                      completion_tokens=sum(len(c.token_ids) for r in reqs for c in r.choices),
                      cached_tokens=sum(r.cached_tokens for r in firsts),
                      ttft_ms=None if took.first is None else round((took.first - took.start) * 1000, 1),
                      total_ms=round(total * 1000, 1), finish_reason=reason)
        log.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})

    # ---- response pieces --------------------------------------------------------------------------------------

    def _stop_reason(self, req: Request, choice) -> str | int | None:
        """vLLM's `stop_reason`: the stop string, or the stop token id (one of `stop_token_ids`), that ended a
        choice; None where an end of sequence, the length or anything else did."""
        if choice.finish_reason != "stop":
            return None
        if choice.stop_hit is not None:
            return choice.stop_hit
        last = choice.token_ids[-1] if choice.token_ids else None
        ended = last in req.params.stop_token_ids and not (last in self.model.eos_ids and not req.params.ignore_eos)
        return last if ended else None

    def _echo(self, job: Job, pi: int, req: Request) -> tuple[str, list[tuple]]:
        """The echoed prompt text and, with logprobs, its token entries."""
        if job.echo_last is not None:
            first = max(0, len(req.prompt_ids) - job.echo_last)
            text = self.vocab.tok.decode(req.client_ids[first:], skip_special_tokens=False)
        elif job.echo:
            first, text = 0, job.prompt_texts[pi]
        else:
            return "", []
        return text, (prompt_entries(req, first) if job.logprobs is not None else [])

    def _logprobs(self, job: Job, entries: list[tuple], offset: int = 0):
        if job.logprobs is None:
            return None
        if job.kind == "chat":
            return chat_logprobs(self.vocab, entries, job.logprobs, job.tokens_as_ids)
        return completion_logprobs(self.vocab, entries, job.logprobs, offset, job.tokens_as_ids)

    def _extras(self, job: Job, req: Request, choice, out: dict) -> dict:
        if choice.finish_reason is not None:
            out["stop_reason"] = self._stop_reason(req, choice)
        if job.prompt_logprobs is not None and job.kind != "chat":  # vLLM: on each choice (chat: the response's)
            out["prompt_logprobs"] = vllm_prompt_logprobs(self.vocab, req, job.prompt_logprobs)
        if job.raw_output:
            out["raw_output"] = raw_output(self.vocab, req, choice, job.logprobs)
        if job.return_token_ids:
            out["token_ids"] = list(choice.token_ids)
        return out

    def _choice(self, job: Job, pi: int, req: Request, c) -> dict:
        echo_text, entries = self._echo(job, pi, req)
        index = pi * job.params.n + c.index
        lps = self._logprobs(job, entries + c.logprobs)
        if job.kind == "chat":
            turn = Turn(job)
            turn.feed(c.text, c.finish_reason)
            msg = {"role": "assistant", "content": echo_text + turn.text}
            if job.thinking is not None:
                msg["reasoning"] = msg["reasoning_content"] = turn.reasoning or None  # vLLM's name, DeepSeek's
            if turn.calls:
                msg.update(content=(echo_text + turn.text) or None, tool_calls=turn.openai_calls())
            out = {"index": index, "message": msg, "logprobs": lps, "finish_reason": turn.finish}
        else:
            out = {"index": index, "text": echo_text + c.text, "logprobs": lps, "finish_reason": c.finish_reason}
        return self._extras(job, req, c, out)

    # ---- streaming --------------------------------------------------------------------------------------------

    async def _stream(self, request: web.Request, job: Job, parts: list[tuple[int, Request]], call: "Call",
                      events) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **self.options_header})
        created = int(time.time())
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        offsets: dict[int, int] = {}
        turns: dict[int, Turn] = {}
        rid, took = call.rid, call.took
        base = {"id": rid, "object": obj, "created": created, "model": self.served(call)}
        head = b"data: " + json.dumps(base)[:-1].encode() + b', "choices": '  # what every chunk starts with
        tail = b', "usage": null}\n\n' if job.include_usage else b"}\n\n"
        reqs = [r for _, r in parts]
        prompt, sent = usage(reqs)["prompt_tokens"], 0  # ... and the tokens streamed so far

        def chunk(choices: list[dict], **extra) -> bytes:  # json.dumps of the chunk, its fixed part encoded once
            if extra:  # the closing chunk (usage, when asked for, is in it)
                return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n"
            if job.continuous_usage:  # vLLM's continuous_usage_stats: the usage so far on every chunk
                so_far = {"prompt_tokens": prompt, "completion_tokens": sent, "total_tokens": prompt + sent}
                return head + json.dumps(choices).encode() + b', "usage": ' + json.dumps(so_far).encode() + b"}\n\n"
            return head + json.dumps(choices).encode() + tail

        async def send(choices: list[dict], **extra) -> None:
            await self.write(resp, chunk(choices, **extra))

        async def fail(err: ApiError) -> None:
            await self.write(resp, b"data: " + json.dumps(err.body()).encode() + b"\n\n")

        async with contextlib.aclosing(events) as events, self.streaming(request, resp, call, fail):
            await resp.prepare(request)
            for pi, req in parts:  # opening chunks: the role (chat) and the echoed prompt
                for c in req.choices:
                    text, entries = self._echo(job, pi, req)
                    index = pi * job.params.n + c.index
                    if job.kind == "chat" or text:
                        await send([self._chunk_choice(job, index, text, entries, None, offsets, first=True)])
            try:
                async with asyncio.timeout_at(DEADLINE.get()):
                    async for batch in events:  # one chunk per event, one write per batch
                        out, failed = [], False
                        for i, deltas in batch:
                            took.saw(i, deltas, self.prom)
                            pi, req = parts[i]
                            if any(d.finish_reason == "error" for d in deltas):
                                failed = True
                                break
                            sent += sum(len(d.token_ids) for d in deltas)
                            said = [c for d in deltas if not _empty(c := self._delta_choice(job, pi, req, d, offsets,
                                                                                              turns))]
                            if said:  # (text held back, a call's name not yet known: no chunk, as vLLM)
                                out.append(chunk(said))
                        await self.write(resp, b"".join(out))
                        if failed:
                            await fail(self.failed(reqs, job.grammar_param))
                            break
                    else:
                        used, extra = self._usage(job, reqs), {}
                        if job.include_usage:
                            extra["usage"] = used
                        if job.perf_metrics:
                            extra["perf_metrics"] = perf_metrics(used, took, job)
                        if job.return_token_ids:
                            extra["prompt_token_ids"] = prompt_token_ids(reqs)
                        if extra:
                            await send([], **extra)
            except TimeoutError:
                await fail(self.timed_out())
            await self.write(resp, b"data: [DONE]\n\n")
        return resp

    def _delta_choice(self, job: Job, pi: int, req: Request, d: Delta, offsets: dict, turns: dict) -> dict:
        index = pi * job.params.n + d.index
        if job.kind != "chat":
            out = self._chunk_choice(job, index, d.text, d.logprobs, d.finish_reason, offsets)
        else:  # thinking apart; content while it cannot be a call; tool calls as their names and arguments arrive
            turn = turns.setdefault(index, Turn(job))
            piece = turn.feed(d.text, d.finish_reason)
            out = self._chunk_choice(job, index, piece.text, d.logprobs, turn.finish, offsets)
            if piece.reasoning:
                out["delta"]["reasoning"] = out["delta"]["reasoning_content"] = piece.reasoning
            if piece.calls:
                out["delta"]["tool_calls"] = piece.calls
        if d.finish_reason:
            self._extras(job, req, req.choices[d.index - req.choices[0].index], out)
        return out

    def _chunk_choice(self, job: Job, index: int, text: str, entries: list[tuple], finish: str | None,
                      offsets: dict, first: bool = False) -> dict:
        offset = offsets.get(index, 0)
        offsets[index] = offset + sum(len(self.vocab.text(e[0])) for e in entries)
        lps = self._logprobs(job, entries, offset) if entries else None
        if job.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": finish}


def _empty(choice: dict) -> bool:
    """A chat chunk's choice that says nothing: no delta, no logprobs, no finish."""
    return choice.get("delta") == {} and choice["logprobs"] is None and choice["finish_reason"] is None and \
        len(choice) == 4


async def pinged(events, every: float | None):
    """`events` as they come, with a None wherever `every` seconds passed without one (None: never); the stream
    is only read ahead one item, and what is pending when the caller stops is cancelled and waited for, so
    `events` can then be closed."""
    if every is None:
        async for item in events:
            yield item
        return
    nxt = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait([nxt], timeout=every)
            if not done:
                yield None
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
            nxt = asyncio.ensure_future(anext(events))
    finally:
        nxt.cancel()
        cancelled = False
        while not nxt.done():  # its end, so `events` can be closed (not "already running"), even if this task is
            try:               # cancelled again meanwhile (that cancel is raised after)
                await asyncio.wait([nxt])
            except asyncio.CancelledError:
                cancelled = True
        if not nxt.cancelled():
            nxt.exception()  # retrieved, so an error it ended with is not reported as never retrieved
        if cancelled:
            raise asyncio.CancelledError


def invalid(job: Job, e: InvalidRequest) -> ApiError:
    """The API error of a request the engine refused: 404 where its LoRA adapter was unloaded since the call named
    it, else a 400 naming the field (a chat's prompt: its messages)."""
    if e.param == "model":
        return ApiError(404, str(e), "model", code="model_not_found")
    return ApiError(400, str(e), "messages" if job.kind == "chat" and e.param == "prompt" else e.param, code=e.code)


def isolated(body: Any, key: str | None) -> Any:
    """`body` with Fireworks' `x-prompt-cache-isolation-key` header's `key` as its `prompt_cache_isolation_key` (a
    400 where the body names another)."""
    if key is None or not isinstance(body, dict):
        return body
    if body.get("prompt_cache_isolation_key") not in (None, key):
        raise bad(f"the {ISOLATION_HEADER} header and 'prompt_cache_isolation_key' name different keys; give one",
                  "prompt_cache_isolation_key")
    return {**body, "prompt_cache_isolation_key": key}


def perf_metrics(used: dict, took: "Took", job: Job) -> dict:
    """Fireworks' perf_metrics (seconds; also sent as `fireworks-<name>` headers); with a prediction, its size in
    tokens and how many of its drafted tokens were kept."""
    now = time.monotonic()
    out = {"prompt-tokens": used["prompt_tokens"],
           "cached-prompt-tokens": used["prompt_tokens_details"]["cached_tokens"],
           "server-time-to-first-token": round((took.first or now) - took.start, 6),
           "server-processing-time": round(now - took.start, 6)}
    if job.prediction:
        out["speculation-prompt-tokens"] = len(job.prediction)
        out["speculation-prompt-matched-tokens"] = used["completion_tokens_details"]["accepted_prediction_tokens"]
    return out


@dataclasses.dataclass
class Call:
    """One API call as accounted: its id, its engine requests and its timings."""

    rid: str = "-"
    reqs: list[Request] = dataclasses.field(default_factory=list)
    took: "Took" = dataclasses.field(default_factory=lambda: Took())
    stage: str | None = None  # counted in `Server.stages` while "reading" or "parsing"
    cut: bool = False  # its stream was cut: the client fell behind or stopped reading (accounted as 408)
    # the LoRA adapters it runs on (`Server.adapter_of`: a name, or {name: scale}; None: the served model)
    adapter: str | dict[str, float] | None = None
    detached: bool = False  # its reply goes on in a task of its own (`Server.detach`), which accounts for it
    grammar_param: str | None = None  # the field that asked for its grammar, named if the grammar fails


class Took:
    """When a request arrived, when its first token came, and when each choice's last one did (for the metrics)."""

    def __init__(self):
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: dict[tuple[int, int], float] = {}

    def saw(self, i: int, deltas: list[Delta], metrics: Metrics) -> None:
        """Observe time to first token and inter-token latency for deltas of engine request `i`."""
        now = time.monotonic()
        for d in deltas:
            if not d.token_ids:
                continue
            if self.first is None:
                self.first = now
                metrics.ttft.observe(now - self.start)
            before = self.last.get((i, d.index))
            if before is not None:
                metrics.itl.observe(now - before, len(d.token_ids))
            self.last[(i, d.index)] = now
