"""SGLang's native API (`/generate`, `/encode`, `/abort_request`, `/model_info`, `/server_info`, `/flush_cache`,
`/health_generate`, `/update_weights_from_disk`, `/get_weights_by_name`, `/get_load`), translated onto the
completions path and the engine, for the tools written against it (RL rollout frameworks, SGLang's router, its own
benchmarks and clients).

A `/generate` body (`text` or `input_ids`, one prompt or a batch of them, `sampling_params` with SGLang's names:
`max_new_tokens`, `min_new_tokens`, `stop` as a string or up to 64 strings, `no_stop_trim`, `sampling_seed`,
`top_k` -1 for the whole vocabulary, `json_schema` / `regex` / `ebnf`, ...) becomes a completions body that
`protocol.parse` validates like any other. The reply is SGLang's: `{"text", "output_ids", "meta_info"}` for one
prompt of one sample, else a list of them, prompt by prompt (`n` samples each); `meta_info` holds the id, the
`finish_reason` object (`{"type": "length", "length": n}`, `{"type": "stop", "matched": token id or stop string}`),
token counts, `cached_tokens` and `e2e_latency`, and with `return_logprob` the output tokens' `[logprob, id, text or
null]` (the text with `return_text_in_logprobs`) and `top_logprobs_num` alternatives each; a `logprob_start_len` of 0
or more adds the prompt's from there, the first entry's logprob null as SGLang's. A stream sends `data:` lines of the
whole text and ids so far (SGLang's default), each sample's last with its finish reason (with `index`, its place
among the call's samples, where there are several), then `data: [DONE]`. Errors keep the
OpenAI shape the rest of the server uses (SGLang's `{"error": {"message"}}` is part of it).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import time
import uuid
from typing import Any

import jax
from aiohttp import web

from engine.params import SamplingParams
from models import hf_weight, pooling
from server import protocol
from server.protocol import ApiError, bad
from server.turn import Piece, Turn

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's
UNBOUNDED = 1 << 30  # max_new_tokens null: the engine lowers it to what the context leaves
HEALTH_TIMEOUT = 20.0  # seconds /health_generate waits for its token (SGLang's default)
RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed",
           "no_stop_trim": "include_stop_str_in_output"}  # SGLang's sampling_params -> the completions body's
NAMES = {**{ours: theirs for theirs, ours in RENAMED.items()}, "prompt": "text", "model": "lora_path"}  # in errors
SAME = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
        "stop_token_ids", "ignore_eos", "skip_special_tokens", "n", "json_schema", "regex", "ebnf", "logit_bias",
        "typical_p", *protocol.LLAMA_CPP, "dry_sequence_breakers")
IGNORED = ("spaces_between_special_tokens", "custom_params", "stream_interval")  # accepted, nothing to do here
UNSERVED = ("input_embeds", "image_data", "video_data", "audio_data", "custom_logit_processor",
            "return_hidden_states", "session_params", "token_ids_logprob")
DONE = "[DONE]"
log = logging.getLogger("sparkler.server")


def routes(app: web.Application, server, embeddings) -> None:
    """Add SGLang's routes to `app` (`/encode` through `embeddings`, `server.embeddings.Embeddings`)."""
    api = SGLang(server, embeddings)
    app.router.add_post("/generate", api.generate)
    app.router.add_route("POST", "/encode", api.encode)
    app.router.add_route("PUT", "/encode", api.encode)
    app.router.add_post("/abort_request", api.abort_request)
    for path in ("/model_info", "/get_model_info"):  # the second is SGLang's older name
        app.router.add_get(path, api.model_info)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, api.server_info)
    app.router.add_get("/health_generate", api.health_generate)
    app.router.add_route("GET", "/flush_cache", api.flush_cache)
    app.router.add_route("POST", "/flush_cache", api.flush_cache)
    app.router.add_post("/reset_prefix_cache", api.reset_prefix_cache)  # vLLM's name for it
    for path in ("/reset_mm_cache", "/reset_encoder_cache"):  # vLLM's: the pictures' features held for reuse
        app.router.add_post(path, api.forget_pictures)
    app.router.add_post("/update_weights_from_disk", api.update_weights_from_disk)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/get_weights_by_name", api.get_weights_by_name)
    app.router.add_get("/get_load", api.get_load)
    app.router.add_post("/pause_generation", api.pause_generation)
    app.router.add_post("/continue_generation", api.continue_generation)


def generate_body(body: Any) -> tuple[dict, list[str], bool]:
    """A completions body for a `/generate` body, its stop strings (checked here, under SGLang's name), and whether the
    prompt was one (not a batch)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name in UNSERVED:
        if body.get(name) not in (None, False, [], {}):  # clients that send every field send these unset
            raise bad(f"'{name}' is not supported by this server", name)
    prompt, single = _prompt(body)
    params = body.get("sampling_params")
    if isinstance(params, list):  # one per prompt: served when they agree
        if not params or any(p != params[0] for p in params):
            raise bad("'sampling_params' as a list must hold the same settings for every prompt (one call serves "
                      "one set; send prompts that differ in separate calls)", "sampling_params")
        params = params[0]
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise bad("'sampling_params' must be an object", "sampling_params")
    for k in params:
        if k not in SAME and k not in RENAMED and k not in IGNORED and k != "stop":
            raise bad(f"'{k}' is not a sampling parameter this server knows", f"sampling_params.{k}")
    unbounded = "max_new_tokens" in params and params["max_new_tokens"] is None  # SGLang's: up to the context
    params = {k: v for k, v in params.items() if v is not None}
    out = {k: params[k] for k in SAME if k in params}
    out.update({ours: params[theirs] for theirs, ours in RENAMED.items() if theirs in params})
    out.setdefault("max_tokens", UNBOUNDED if unbounded else DEFAULT_MAX_NEW_TOKENS)
    if out.get("top_k") == -1:  # SGLang's whole vocabulary
        out["top_k"] = 0
    out["prompt"] = prompt
    out["stream"] = body.get("stream", False)
    adapter = _lora_path(body)  # a LoRA adapter's name: the completions body's model
    if adapter is not None:
        out["model"] = adapter
    priority = body.get("priority")  # SGLang's: higher values sooner (its default order); ours: lower sooner
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise bad(f"'priority' must be an integer, got {type(priority).__name__}", "priority")
        if not -(2**31) <= priority < 2**31:
            raise bad(f"'priority' must be a 32-bit integer, got {priority}", "priority")
        out["priority"] = min(-priority, 2**31 - 1)  # SGLang's lowest, -2**31, is ours the least urgent too
    return out, protocol.stop_strings(params.get("stop"), "sampling_params.stop"), single


def _lora_path(body: dict) -> str | None:
    """The LoRA adapter `lora_path` names (None, or empty: the base model); a list of one per prompt is served when
    they agree."""
    adapter = body.get("lora_path")
    if isinstance(adapter, list):
        if not adapter or any(a != adapter[0] for a in adapter):
            raise bad("'lora_path' as a list must name the same adapter for every prompt (send prompts for other "
                      "adapters in separate calls)", "lora_path")
        adapter = adapter[0]
    if adapter is not None and not isinstance(adapter, str):
        raise bad("'lora_path' must be the name of a loaded LoRA adapter", "lora_path")
    return adapter or None  # (an empty name: the base model, as none)


def _prompt(body: dict) -> tuple[Any, bool]:
    """The prompt(s), SGLang's way: `text` (a string, or a list of them: a batch) else `input_ids` (ids, or a list
    of id lists: a batch); and whether it was one prompt."""
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None and ids is not None:
        raise bad("give 'text' or 'input_ids', not both", "text")
    if text is not None:
        if isinstance(text, str):
            return text, True
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return text, False
        raise bad("'text' must be a string or a non-empty list of strings", "text")
    if ids is None:
        raise bad("Either text or input_ids should be provided.", "text")
    is_id = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if isinstance(ids, list) and ids and all(is_id(t) for t in ids):
        return ids, True
    if isinstance(ids, list) and ids and all(isinstance(p, list) and p and all(is_id(t) for t in p) for p in ids):
        return ids, False
    raise bad("'input_ids' must be a non-empty list of token ids, or a list of such lists", "input_ids")


def _logprob_options(body: dict, prompts: list[list[int]]) -> list[tuple[bool, int, int | None, bool]]:
    """Each prompt's `(return_logprob, top_logprobs_num, logprob_start_len or None, return_text_in_logprobs)`: the
    first three a value for all, or a list of one per prompt (SGLang's)."""
    def each(name: str, default, ok, what: str) -> list:
        v = body.get(name)
        vs = v if isinstance(v, list) else [v] * len(prompts)
        if len(vs) != len(prompts):
            raise bad(f"'{name}' as a list must hold one value per prompt", name)
        vs = [default if x is None else x for x in vs]
        if not all(ok(x) for x in vs):
            raise bad(f"'{name}' must be {what}, or a list of one per prompt", name)
        return vs

    integer = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    want = each("return_logprob", False, lambda x: isinstance(x, bool), "a boolean")
    k = each("top_logprobs_num", 0, lambda x: integer(x) and 0 <= x <= 20, "an integer in [0, 20]")
    start = each("logprob_start_len", -1, lambda x: integer(x) and x >= -1,
                 "an integer >= -1 (-1: the output's logprobs only)")
    text = body.get("return_text_in_logprobs") or False
    if not isinstance(text, bool):
        raise bad("'return_text_in_logprobs' must be a boolean", "return_text_in_logprobs")
    for ids, w, s in zip(prompts, want, start):
        if w and s > len(ids):
            raise bad(f"logprob_start_len ({s}) is higher than the number of input tokens ({len(ids)})",
                      "logprob_start_len")
    return [(w, n, s if w and s >= 0 else None, text) for w, n, s in zip(want, k, start)]


class Sample:
    """One sample (a choice) in SGLang's shape: whole, or the chunks of its part of a stream (`Stream`)."""

    def __init__(self, server, call, part: int, req, choice, rid: str, logprobs: tuple):
        self.server, self.call, self.req, self.choice, self.rid = server, call, req, choice, rid
        self.part = part  # its request's place among the call's
        self.want, self.k, self.start, self.texts = logprobs
        self.text, self.ids = "", []  # streamed so far
        self.ended = False  # its last chunk, with the finish reason, is out
        self.sent_prompt = False  # the prompt's logprobs went out (a stream's first chunk)

    def add(self, piece: Piece) -> list[dict]:
        """A chunk: the whole text and ids so far (SGLang's default stream); with the engine's delta that ended the
        choice (`piece.finish`: every token and all the text held back for stop strings are here), the last, with
        the finish reason (and a stop token's text trimmed)."""
        self.text += piece.text
        self.ids += piece.token_ids
        if self.ended:
            return []
        if piece.finish is not None:  # the delta that ends it: every token and all the text are here
            self.ended = True
            return [self.result(self.text, self.ids)]
        if not piece.text and not piece.token_ids:
            return []
        return [self.result(self.text, self.ids, final=False)]

    def result(self, text: str, ids: list[int], final: bool = True) -> dict:
        """The sample object: text, output ids and meta_info."""
        c, req = self.choice, self.req
        meta = {"id": self.rid, "finish_reason": self.finish() if final else None,
                "prompt_tokens": len(req.prompt_ids), "completion_tokens": len(ids),
                "cached_tokens": req.cached_tokens, "weight_version": self.server.weight_version}
        if final:
            meta["e2e_latency"] = time.monotonic() - self.call.took.start
        if self.want:
            entries = c.logprobs[:len(ids)]
            meta["output_token_logprobs"] = [self.triple(t, lp) for t, lp, _ in entries]
            if self.k:
                meta["output_top_logprobs"] = [None if top is None else [self.triple(a, v) for a, v in top[:self.k]]
                                               for _, _, top in entries]
            if final or not self.sent_prompt:  # a stream's first and last chunks (a long prompt's are large)
                self.sent_prompt = True
                meta["input_token_logprobs"], tops = self.prompt_logprobs()
                if self.k:
                    meta["input_top_logprobs"] = tops
        return {"text": self.trimmed(text) if final else text, "output_ids": list(ids), "meta_info": meta}

    def finish(self) -> dict | None:
        """SGLang's finish_reason object. A reply a grammar completed matched the end of sequence, as SGLang's does
        (its grammar then allows only that; here the engine ends the reply without drawing it)."""
        c, eos = self.choice, self.server.model.eos_ids
        if c.finish_reason == "length":
            return {"type": "length", "length": len(c.token_ids)}
        if c.finish_reason == "stop":
            if c.stop_hit is not None:
                return {"type": "stop", "matched": c.stop_hit}
            last = c.token_ids[-1] if c.token_ids else None
            ended = last in eos or last in self.req.params.stop_token_ids
            return {"type": "stop", "matched": last if ended else (eos[0] if eos else None)}
        if c.finish_reason is None:
            return None
        return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}

    def trimmed(self, text: str) -> str:
        """The whole reply's text without the text of the stop token that ended it (SGLang trims it, unless
        `no_stop_trim`; an end of sequence's, special, is not in the text)."""
        c, p = self.choice, self.req.params
        last = c.token_ids[-1] if c.token_ids else None
        if (c.finish_reason != "stop" or c.stop_hit is not None or p.include_stop_str_in_output
                or last not in p.stop_token_ids):
            return text
        piece = self.server.vocab.text(last)
        return text[:len(text) - len(piece)] if piece and text.endswith(piece) else text

    def triple(self, token: int, logprob: float | None) -> list:
        """`[logprob, token id, text or None]`."""
        return [logprob, token, self.server.vocab.text(token) if self.texts else None]

    def prompt_logprobs(self) -> tuple[list, list]:
        """The prompt's tokens from `logprob_start_len` on: `[logprob, id, text]` each (the first logprob None, as
        SGLang's, which computes none for the token where the range starts), and their alternatives."""
        if self.start is None or self.req.prompt_logprobs is None:
            return [], []
        chosen, top_ids, top_lps, _ = self.req.prompt_logprobs  # of prompt tokens 1..
        ids = self.req.prompt_ids
        values, tops = [], []
        for j in range(self.start, len(ids)):
            first = j == self.start or j == 0
            values.append(self.triple(ids[j], None if first else float(chosen[j - 1])))
            tops.append(None if first else [self.triple(a, v) for a, v in
                                            zip(top_ids[j - 1][:self.k].tolist(), top_lps[j - 1][:self.k].tolist())])
        return values, tops


class SGLang:
    """SGLang's routes of one `Server`."""

    def __init__(self, server, embeddings):
        self.server, self.embeddings = server, embeddings
        self.calls: dict[str, dict[str, list[str]]] = {}  # per call in flight: a caller's rid -> engine requests

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """POST /generate."""
        async def answer(body, call) -> web.StreamResponse:
            plain, stops, single = generate_body(body)
            try:  # errors name SGLang's fields
                call.adapter = self.server.adapter_of(plain)
                job = await self.server.parse(plain, "completion", protocol.HOT)
                job.params.stop = stops
                logprobs = _logprob_options(body, job.prompts)
                if any(w for w, _, _, _ in logprobs):
                    k = max(n for w, n, _, _ in logprobs if w)
                    job.logprobs, job.params.logprobs, job.params.top_logprobs = k, True, k
                if any(start is not None for _, _, start, _ in logprobs):
                    job.prompt_logprobs = max(n for _, n, start, _ in logprobs if start is not None)
                    job.params.echo = True  # the prompt's logprobs come from the echo prefill
                rid = body.get("rid")
                names = _names(rid, len(job.prompts)) if rid is not None else None  # checked before admitting
                parts, events = self.server.admit(job, call, "")
            except ApiError as e:  # (the prompt is `input_ids` where the body gave token ids)
                raise e.renamed({**NAMES, "prompt": "text" if "input_ids" not in body else "input_ids"}) from None
            names = names or _names(call.rid, len(job.prompts))
            n = job.params.n
            samples = [Sample(self.server, call, part, req, c, names[i] if n == 1 else f"{names[i]}_{c.index}",
                              logprobs[i]) for part, (i, req) in enumerate(parts) for c in req.choices]
            known = {name: [req.id for i, req in parts if names[i] == name] for name in names}
            if isinstance(rid, str):  # a batch's own rid aborts all of it
                known[rid] = [req.id for _, req in parts]
            self.calls[call.rid] = known
            try:
                if job.stream:
                    return await self.server.sse(request, call, events, Turn(job),
                                             Stream(samples, indexed=not single or n > 1))
                await self.server.collect(events, call)
            finally:
                del self.calls[call.rid]
            out = [s.result(s.choice.text, s.choice.token_ids) for s in samples]
            return web.json_response(out[0] if single and n == 1 else out)
        return await self.server.serve(request, answer)

    async def encode(self, request: web.Request) -> web.Response:
        """POST /encode: SGLang's embeddings, `text` or `input_ids` (one or a batch, as `/generate` takes them; with
        `rid` and `lora_path`, and `dimensions`), pooled and normalized as `/v1/embeddings` by default; the reply is
        `{"embedding", "meta_info"}` (its `id`, `prompt_tokens`, `finish_reason` and `e2e_latency`) for one input,
        else a list of them."""
        async def answer(body, call) -> web.Response:
            t0 = time.perf_counter()
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            for name in ("image_data", "audio_data", "video_data"):
                if body.get(name) not in (None, [], {}):
                    raise bad(f"'{name}' is not supported by this server", name)
            prompt, single = _prompt(body)
            param, adapter = "text" if body.get("text") is not None else "input_ids", _lora_path(body)
            try:
                call.adapter = self.server.adapter_of({"model": adapter})
            except ApiError as e:
                raise e.renamed({"model": "lora_path"}) from None
            items = [prompt] if single else prompt
            try:  # errors name SGLang's fields
                ask = await self.server.off_loop(self.embeddings.parse, {"input": items, **{
                    k: body[k] for k in ("dimensions",) if body.get(k) is not None}})
            except ApiError as e:
                raise e.renamed({"input": param}) from None
            names = _names(body["rid"], len(items)) if body.get("rid") is not None else None
            vectors = await self.embeddings.vectors(call, ask.inputs, "embd")
            names = names or _names(call.rid, len(items))
            took = time.perf_counter() - t0

            def reply() -> bytes:  # thousands of vectors' JSON: off the loop
                out = [{"embedding": v.tolist(), "meta_info": {
                    "id": name, "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": len(ids),
                    "completion_tokens": 0, "cached_tokens": 0, "e2e_latency": took}}
                    for name, ids, v in zip(names, ask.inputs, pooling.finish(vectors, ask.normalize, ask.dimensions))]
                return json.dumps(out[0] if single else out).encode()
            return web.Response(body=await self.server.off_loop(reply), content_type="application/json")
        return await self.server.serve(request, answer)

    async def abort_request(self, request: web.Request) -> web.Response:
        """POST /abort_request: end the `/generate` requests of `rid` (a prompt's, or a whole call's) or, with
        `abort_all`, every request in flight; their callers get what was generated so far, with an abort as the
        finish reason. 200 either way, as SGLang's."""
        body = await self.server._body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        rid, every = body.get("rid", ""), body.get("abort_all", False)
        if not isinstance(rid, str) or not isinstance(every, bool):
            raise bad("'rid' must be a string and 'abort_all' a boolean", "rid")
        ids = self.server.in_flight() if every else [i for known in self.calls.values() for i in known.get(rid, [])]
        for i in ids:
            self.server.engine.abort(i)
        log.info("/abort_request: %d requests aborted (%s)", len(ids), "all" if every else repr(rid))
        return web.Response(status=200)

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        """POST /update_weights_from_disk: serve the weights at `model_path` (a folder or file of this model's kind;
        `Server.update_weights`), as RL trainers call SGLang between rollouts; `abort_all_requests` aborts the
        calls in flight first, `weight_version` names the new weights (reported by `/model_info` and each
        `/generate` reply). `{"success", "message", "num_paused_requests"}`: 200, or 400 with success false."""
        try:
            body = await self.server._body(request)
            body = body if isinstance(body, dict) else {}
            path, abort, version = (body.get("model_path"), body.get("abort_all_requests", False),
                                    body.get("weight_version"))
            if not isinstance(path, str) or not path:
                raise bad("'model_path' must be a folder or file of weights", "model_path")
            if not isinstance(abort, bool) or (version is not None and not isinstance(version, str)):
                raise bad("'abort_all_requests' must be a boolean and 'weight_version' a string", "weight_version")
            if body.get("load_format") not in (None, "auto", "safetensors", "gguf"):
                raise bad("'load_format' must be auto, safetensors or gguf (as the path says)", "load_format")
            aborted = await self.server.update_weights(path, abort, version)
        except ApiError as e:
            return web.json_response({"success": False, "message": e.message, "num_paused_requests": 0},
                                     status=e.status)
        return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                                  "num_paused_requests": aborted})

    async def get_load(self, request: web.Request) -> web.Response:
        """GET /get_load, which SGLang's router polls to send each request where the load is least: a list of one
        entry per data shard (`Engine.loads`), with `ts_tic` the time it was read."""
        now = time.time()
        return web.json_response([{**load, "ts_tic": now} for load in self.server.engine.loads()])

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """GET or POST /get_weights_by_name (`{"name", "truncate_size"}`, 100 by default): the served parameter the
        checkpoint names `name` (`models.hf_weight`), its first `truncate_size` rows as float32 lists, as RL trainers
        read it back after `/update_weights_from_disk`; a 400 saying why for a name the model has not, weights held
        quantized or asleep, or a server over several processes."""
        body = await self.server._body(request)
        name, size = (body.get("name"), body.get("truncate_size", 100)) if isinstance(body, dict) else (None, None)
        if not isinstance(name, str) or not name:
            raise bad("'name' must name a parameter as the checkpoint does (model.layers.0.mlp.up_proj.weight)",
                      "name")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad(f"'truncate_size' must be a non-negative integer, not {size!r}", "truncate_size")
        srv = self.server
        if jax.process_count() > 1:
            raise bad("the weights cannot be read here: they are spread over several processes")
        srv.engine_calls += 1  # a sleep waits for the read (it would delete the arrays under it)
        try:
            if "weights" in srv.engine.asleep:
                raise bad("the weights cannot be read here: they are asleep (/wake_up first)")
            weight = await srv.off_loop(hf_weight, srv.engine.model, name, size)
        except (KeyError, ValueError) as e:
            raise bad(e.args[0], "name") from None
        except RuntimeError:  # a sleep that had begun deleted the arrays under the read
            if "weights" not in srv.engine.asleep:
                raise
            raise srv.asleep_error() from None
        finally:
            srv.engine_calls -= 1
        return web.json_response(weight.tolist())

    async def forget_pictures(self, request: web.Request) -> web.Response:
        """POST /reset_mm_cache or /reset_encoder_cache (vLLM's): forget the pictures whose features are held for
        reuse (`ImageRows.forget`; the rows running requests read stay theirs); an empty 200."""
        if self.server.engine.images is not None:
            self.server.engine.images.forget()
        return web.Response()

    async def pause_generation(self, request: web.Request) -> web.Response:
        """POST /pause_generation `{"mode": "abort" | "in_place" | "retract"}` (default abort;
        `Server.pause_generation`)."""
        mode = (await self.server.body_object(request)).get("mode", "abort")
        if mode not in ("abort", "in_place", "retract"):  # (SGLang's modes; vLLM's "wait" is /pause's)
            raise bad(f"mode: abort, in_place or retract, not {mode!r}", "mode")
        await self.server.pause_generation(mode)
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        """POST /continue_generation: the paused generation goes on (`Server.continue_generation`)."""
        await self.server.continue_generation()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def model_info(self, request: web.Request) -> web.Response:
        """GET /model_info: what SGLang's clients read of the model."""
        s = self.server
        return web.json_response({"model_path": s.model.source, "tokenizer_path": s.model.source,
                                  "is_generation": True, "preferred_sampling_params": None,
                                  "weight_version": s.weight_version,
                                  "has_image_understanding": s.model.vision is not None,
                                  "has_audio_understanding": False, "architectures": [s.model.cfg.arch]})

    async def server_info(self, request: web.Request) -> web.Response:
        """GET /server_info: the settings and limits SGLang's clients read (its flat object, a subset)."""
        s = self.server
        e = s.engine
        return web.json_response({
            "model_path": s.model.source, "served_model_name": s.name, "context_length": e.max_len,
            "max_running_requests": e.runner.slots, "max_total_num_tokens": e.stats()["kv_pages_total"] * e.page_size,
            "page_size": e.page_size, "status": "ready", "version": importlib.metadata.version("sparkler"),
            "internal_states": [{"avg_spec_accept_length": None, "last_gen_throughput": None}]})

    async def health_generate(self, request: web.Request) -> web.Response:
        """GET /health_generate: 200 once the engine has drawn a token (one greedy token after a one-token prompt)
        within `HEALTH_TIMEOUT` seconds; 503 while draining or asleep, or when it has not (SGLang's, which balancers
        poll)."""
        s = self.server
        if s.draining or s.engine.asleep:
            return web.Response(status=503)
        req = s.engine.make_request([0], SamplingParams(max_tokens=1, temperature=0.0), f"health-{uuid.uuid4().hex}")
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                async for _ in s.aengine.stream(req):  # leaving early aborts it
                    pass
        except TimeoutError:
            log.warning("/health_generate: no token within %g s", HEALTH_TIMEOUT)
        return web.Response(status=200 if req.choices[0].token_ids else 503)

    async def flush_cache(self, request: web.Request) -> web.Response:
        """GET or POST /flush_cache: forget every cached prompt prefix, when nothing is queued or running (else a
        400, as SGLang's: a running request may be reading them)."""
        try:
            done = await self.server.aengine.call(lambda engine: engine.flush_cache())
        except RuntimeError:  # the engine thread has stopped
            return web.Response(status=503, text="Cache not flushed: the engine has stopped.\n")
        return web.Response(status=200 if done else 400,
                            text="Cache flushed.\n" if done else "Cache not flushed: requests are queued or running; "
                                                                 "retry when they have finished.\n")

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """POST /reset_prefix_cache (vLLM's `/flush_cache`): an empty 200 once forgotten, as vLLM's; while requests
        are queued or running, nothing is flushed and the 400 is JSON in the OpenAI shape (vLLM answers in JSON)."""
        if not await self.server.on_engine(lambda engine: engine.flush_cache()):
            raise bad("the prefix cache was not reset: requests are queued or running; retry when they have finished")
        return web.Response(status=200)


class Stream:
    """A `/generate` stream (`Server.sse`'s face): each sample's chunks as its pieces come, with `index` (its place
    among the call's samples, prompt by prompt) when the call is a batch or asks for several; `[DONE]` last."""

    def __init__(self, samples: list[Sample], indexed: bool):
        self.samples, self.indexed = samples, indexed
        self.at = {(s.part, s.choice.index): (pos, s) for pos, s in enumerate(samples)}

    @staticmethod
    def encode(ev: dict | str) -> bytes:
        """A `data:` line, as SGLang streams (`[DONE]` last)."""
        return b"data: " + (ev.encode() if ev == DONE else json.dumps(ev).encode()) + b"\n\n"

    def opening(self) -> list[dict]:
        """Nothing: SGLang's stream starts with the first piece."""
        return []

    def add(self, piece: Piece) -> list[dict]:
        """The chunks of the sample the piece is of."""
        pos, sample = self.at[piece.source]
        chunks = sample.add(piece)
        return [{**c, "index": pos} for c in chunks] if self.indexed else chunks

    def closing(self) -> list:
        """The last chunks of samples that have not sent theirs (none, as a stream ends normally); `[DONE]`."""
        return [c for s in self.samples if not s.ended
                for c in self.add(Piece(source=(s.part, s.choice.index), finish=s.choice.finish_reason))] + [DONE]

    @staticmethod
    def failed(e: ApiError) -> list:
        """An error event (SGLang's shape is the message alone; this is the server's whole error), then `[DONE]`."""
        return [e.body(), DONE]


def _names(rid: Any, prompts: int) -> list[str]:
    """Each prompt's id from the caller's `rid`: a string (with `_i` per prompt of a batch), or a list of one per
    prompt."""
    if isinstance(rid, list):
        if len(rid) != prompts or not all(isinstance(r, str) for r in rid):
            raise bad("'rid' as a list must hold one string per prompt", "rid")
        return rid
    if isinstance(rid, str):
        return [rid] if prompts == 1 else [f"{rid}_{i}" for i in range(prompts)]
    raise bad("'rid' must be a string or a list of strings", "rid")
