"""Ollama's API, translated onto the chat, completions and embeddings paths: for the applications written against a
local Ollama (Open WebUI, LangChain's and LlamaIndex's Ollama classes, the `ollama` clients, editors' plugins).

- `POST /api/chat`: `messages` (with `thinking`, `tool_calls` whose arguments are objects, and `tool` results, each
  matched to the earlier call of its `tool_name`, or the oldest one unanswered), `tools`, `format` ("json" or a JSON
  schema), `think`, `options`, `logprobs` / `top_logprobs` and `stream` (default true) become a chat-completions
  body; the reply's `message` has `content`, `thinking` and `tool_calls` (arguments as objects), and `logprobs` its
  tokens' entries when asked.
- `POST /api/generate`: `prompt` with `system` through the chat template, or as it is with `raw`; with `suffix`,
  fill in the middle (`server.infill`); `context` (the ids an earlier reply returned) goes before the prompt, and
  the reply returns the conversation's ids again as `context`.
- `options`: `num_predict` (absent, -1, -2 or 0: until the end of sequence or the context), `temperature` (any),
  `top_k`, `top_p`, `min_p`, `typical_p`, `repeat_penalty`, `presence_penalty`, `frequency_penalty`, `seed` (-1:
  random), `stop` (up to 64), `mirostat` 2 with `mirostat_tau` and `mirostat_eta`; `repeat_last_n` 0 turns the
  penalties off (another window is the whole prompt and reply); the runner's options (`num_ctx`, `num_gpu`,
  `num_thread`, ...) are accepted and change nothing: the server was started with its context and devices.
  `keep_alive` likewise (the model stays loaded), but for an empty prompt with `keep_alive` 0 (`ollama stop`):
  that unloads the model from the devices (sleep mode, `Server.sleep`: the weights kept on the host), and the next
  Ollama request loads it again (the other APIs answer 503 meanwhile, as a sleeping server does). A null field is
  one not given; absent fields take the model's defaults, as the other APIs here do.
- Replies carry Ollama's figures: `done_reason`, `prompt_eval_count` (every prompt token, the cached ones too),
  `eval_count`, and the durations in nanoseconds. A stream is newline-delimited JSON, one object a piece, the last
  with `done: true` and the figures. An empty `messages` or `prompt` is Ollama's "load" reply.
- `POST /api/embed` (normalized vectors of one input or a list; `truncate`, default true, keeps each input's first
  tokens that fit, false makes an input too long a 400) and the older `POST /api/embeddings` (`prompt`, one vector
  as the model pools it).
- `GET /api/tags`, `POST /api/show`, `GET /api/ps` and `GET /api/version` describe the one served model; its name
  is also accepted as `name:latest`, as Ollama writes a name without a tag.

Errors are Ollama's `{"error": message}` with the same status codes as the other APIs (`error_body`). Images are a
400: the served models read text.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import time
from typing import Any

import jax
from aiohttp import web

from models import pooling
from server import llama_cpp, protocol
from server.protocol import ApiError, bad
from server.shapes import chat_logprobs
from server.turn import Piece, Turn

OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
           "typical_p": "typical_p", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}
NAMES = {ours: f"options.{theirs}" for theirs, ours in OPTIONS.items()} | {
    "max_tokens": "options.num_predict", "mirostat_target": "options.mirostat_tau",
    "mirostat_lr": "options.mirostat_eta", "response_format": "format", "reasoning_effort": "think"}
VERSION = "0.12.11"  # the Ollama API version whose shapes these are (what `/api/version` tells clients)


def routes(app: web.Application, server, embeddings) -> None:
    """Add Ollama's routes to `app`; `embeddings`: the server's `server.embeddings.Embeddings`."""
    api = Ollama(server, embeddings)
    app.router.add_post("/api/chat", api.chat)
    app.router.add_post("/api/generate", api.generate)
    app.router.add_post("/api/embed", api.embed)
    app.router.add_post("/api/embeddings", api.embeddings)
    app.router.add_get("/api/tags", api.tags)
    app.router.add_post("/api/show", api.show)
    app.router.add_get("/api/ps", api.ps)
    app.router.add_get("/api/version", api.version)
    app.router.add_post("/api/pull", api.pull)


def error_body(e: ApiError) -> dict:
    """An error in Ollama's shape."""
    return {"error": e.message}


def now() -> str:
    """The time now as Ollama writes it (RFC 3339, UTC)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def options(body: dict, max_len: int) -> dict:
    """The completions fields of a body's `options` (null ones are not given; 400s for a value of the wrong kind;
    the runner's options are dropped); a reply runs to the end of the context unless `num_predict` > 0 says less."""
    opts = body.get("options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise bad("'options' must be an object", "options")
    opts = {k: int(v) if isinstance(v, float) and v.is_integer() and k != "temperature" else v
            for k, v in opts.items() if v is not None}  # Ollama reads 128.0 as 128
    out = {ours: opts[theirs] for theirs, ours in OPTIONS.items() if theirs in opts}
    if out.get("seed") == -1:  # Ollama's and llama.cpp's "a random seed"
        del out["seed"]
    if isinstance(out.get("top_k"), int) and not isinstance(out["top_k"], bool) and out["top_k"] <= 0:
        out["top_k"] = 0  # the whole vocabulary
    n = opts.get("num_predict", -1)
    if isinstance(n, bool) or not isinstance(n, int) or not -2**63 <= n < 2**63:  # (Ollama's Go reads an int64)
        raise bad("'options.num_predict' must be an integer (0 or less: until the end)", "options.num_predict")
    out["max_tokens"] = n if n > 0 else max_len  # lowered to the room the prompt leaves
    if opts.get("repeat_last_n") == 0:  # no penalty window, no penalties (llama.cpp's, and so Ollama's)
        for k in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            out.pop(k, None)
    out.update(llama_cpp.mirostat(opts, "options."))
    if "stop" in out:
        out["stop"] = protocol.stop_strings(out["stop"], "options.stop")
    return out


def common(body: dict, max_len: int) -> dict:
    """The fields chat and generate share: options, `format`, `think`, `stream` (Ollama's default, null too: true)."""
    out = options(body, max_len)
    out["stream"] = True if body.get("stream") is None else body["stream"]
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt}}
    elif fmt not in (None, ""):
        raise bad("'format' must be \"json\" or a JSON schema (an object)", "format")
    if body.get("think") is not None:
        if not isinstance(body["think"], (bool, str)):
            raise bad("'think' must be a boolean or 'low', 'medium' or 'high'", "think")
        out["reasoning_effort"] = body["think"]
    return out


def logprobs(body: dict, chat: bool) -> dict:
    """Ollama's `logprobs` (a boolean) and `top_logprobs` (0 to 20 alternatives) as the chat or completions fields."""
    asked, top = body.get("logprobs"), body.get("top_logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise bad("'logprobs' must be a boolean", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise bad("'top_logprobs' must be an integer in [0, 20]", "top_logprobs")
    if not asked:
        if top:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return {}
    return {"logprobs": True, "top_logprobs": top or 0} if chat else {"logprobs": top or 0}


def _text(v: Any, where: str) -> str:
    """A text field (null: empty), or a 400."""
    if v is None:
        return ""
    if not isinstance(v, str):
        raise bad(f"{where} must be a string", where)
    return v


def _pictured(text: str, pictures: Any, where: str, param: str) -> str | list[dict]:
    """Text with Ollama's `images` (base64 strings) as chat content: the pictures' parts before the text (as LLaVA's
    prompts put them), or the text alone without any."""
    if not pictures:
        return text
    if not isinstance(pictures, list) or not all(isinstance(p, str) for p in pictures):
        raise bad(f"{where} must be a list of base64 strings", param)
    return [*({"type": "image_url", "image_url": {"url": f"data:image/*;base64,{p}"}} for p in pictures),
            {"type": "text", "text": text}]


def messages(msgs: Any) -> list[dict]:
    """Ollama's messages as chat completions' (tool calls numbered, each tool result matched to its call)."""
    if not isinstance(msgs, list):
        raise bad("'messages' must be a list", "messages")
    out, waiting = [], []  # waiting: (id, name) of calls not yet answered, oldest first
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise bad(f"{where} must be an object with a role of system, user, assistant or tool", "messages")
        msg = {"role": m["role"], "content": _pictured(_text(m.get("content"), f"{where}.content"),
                                                       m.get("images"), f"{where}.images", "messages")}
        if m["role"] == "assistant":
            if m.get("thinking"):
                msg["reasoning_content"] = _text(m["thinking"], f"{where}.thinking")
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls must be a list", "messages")
            msg_calls = []
            for j, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                        not isinstance(fn.get("arguments", {}), (dict, str)):
                    raise bad(f"{where}.tool_calls[{j}] must be {{'function': {{'name': ..., 'arguments': {{...}}}}}}",
                              "messages")
                args = fn.get("arguments", {})
                cid = c.get("id") if isinstance(c.get("id"), str) else f"call_{i}_{j}"
                msg_calls.append({"id": cid, "type": "function", "function": {
                    "name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
                waiting.append((cid, fn["name"]))
            if msg_calls:
                msg["tool_calls"] = msg_calls
        elif m["role"] == "tool":
            name, cid = m.get("tool_name"), m.get("tool_call_id")
            match = next((w for w in waiting if w[0] == cid), None) or \
                next((w for w in waiting if w[1] == name), waiting[0] if waiting else None)
            if match is None:
                raise bad(f"{where} is a tool result with no earlier assistant tool call to answer", "messages")
            waiting.remove(match)
            msg["tool_call_id"] = match[0]
        out.append(msg)
    return out


def ollama_calls(turn: Turn) -> list[dict]:
    """A turn's tool calls in Ollama's shape: arguments as an object (empty where they do not parse as one, as
    the Messages API's `tool_use` input)."""
    out = []
    for c in turn.calls:
        try:
            args = json.loads(c["arguments"] or "{}")
        except ValueError:
            args = {}
        args = args if isinstance(args, dict) else {}
        out.append({"id": c["id"], "function": {"name": c["name"], "arguments": args}})
    return out


def _without_id(entry: dict) -> dict:
    """A logprob entry in Ollama's shape: OpenAI's without `token_id`."""
    out = {k: v for k, v in entry.items() if k != "token_id"}
    if "top_logprobs" in out:
        out["top_logprobs"] = [_without_id(t) for t in out["top_logprobs"]]
    return out


class Reply:
    """One reply of chat (`message`) or generate (`response`), whole or as its stream (`Server.sse`'s face)."""

    content_type = "application/x-ndjson"

    def __init__(self, server, call, job: protocol.Job, turn: Turn, chat: bool):
        self.server, self.call, self.job, self.turn, self.chat = server, call, job, turn, chat
        self.req = call.reqs[0]
        self.choice = self.req.choices[0]
        self.pending: list[tuple] = []  # logprob entries of pieces whose text is held, for the next object

    @staticmethod
    def encode(ev: dict) -> bytes:
        """One line of newline-delimited JSON."""
        return json.dumps(ev).encode() + b"\n"

    def opening(self) -> list[dict]:
        """Nothing: the stream starts with the first piece."""
        return []

    def add(self, piece: Piece) -> list[dict]:
        """A piece's text and thinking (tool calls come whole, before the end), with its tokens' logprobs if
        asked (those of a piece whose text is held go with the next object)."""
        self.pending += piece.entries if self.job.logprobs is not None else []
        if not piece.text and not piece.reasoning:
            return []
        return [self.chunk(piece.text, piece.reasoning)]

    def chunk(self, text: str, thinking: str, calls: list[dict] | None = None, done: bool = False) -> dict:
        """An object of the reply: its text (and thinking, and tool calls) so far or whole."""
        out = {"model": self.server.served(self.call), "created_at": now()}
        if self.chat:
            msg = {"role": "assistant", "content": text}
            msg.update({"thinking": thinking} if thinking else {})
            msg.update({"tool_calls": calls} if calls else {})
            out["message"] = msg
        else:
            out["response"] = text
            out.update({"thinking": thinking} if thinking else {})
        if self.pending:  # OpenAI's entries less the token id: token, logprob, bytes and top_logprobs
            out["logprobs"] = [_without_id(e) for e in chat_logprobs(self.server.vocab, self.pending,
                                                                     self.job.logprobs)["content"]]
            self.pending = []
        out["done"] = done
        return out

    def closing(self) -> list[dict]:
        """The tool calls, if any, then the last object with the figures."""
        calls = ollama_calls(self.turn)
        return ([self.chunk("", "", calls)] if calls else []) + [self.final("", "")]

    def whole(self) -> dict:
        """The reply as one object."""
        self.pending = list(self.choice.logprobs) if self.job.logprobs is not None else []
        return self.final(self.turn.text, self.turn.reasoning, ollama_calls(self.turn))

    def final(self, text: str, thinking: str, calls: list[dict] | None = None) -> dict:
        """The last object: `done`, `done_reason`, counts and durations (ns); generate's `context`."""
        out = self.chunk(text, thinking, calls, done=True)
        took, end = self.call.took, time.monotonic()
        first = took.first if took.first is not None else end
        c, req = self.choice, self.req
        out.update(done_reason="length" if c.finish_reason == "length" else "stop",
                   total_duration=int((end - took.start) * 1e9), load_duration=0,
                   prompt_eval_count=len(req.prompt_ids), prompt_eval_duration=int((first - took.start) * 1e9),
                   eval_count=len(c.token_ids), eval_duration=int((end - first) * 1e9))
        if not self.chat:
            out["context"] = [*req.client_ids, *c.token_ids]
        return out

    @staticmethod
    def failed(e: ApiError) -> list[dict]:
        """An error object."""
        return [error_body(e)]


class Ollama:
    """Ollama's routes of one `Server`."""

    def __init__(self, server, embeddings):
        self.server, self.emb = server, embeddings
        self.modified = now()
        leaves = jax.tree.leaves(server.model.params)  # the served weights do not change: read once, not per call
        self.size, self.count = sum(x.nbytes for x in leaves), sum(x.size for x in leaves)
        self.digest = hashlib.sha256(f"{server.name}\0{server.model.source}".encode()).hexdigest()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /api/chat."""
        async def answer(body, call) -> web.StreamResponse:
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            if body.get("messages") in (None, []):
                return await self.loaded(body, {"message": {"role": "assistant", "content": ""}}, call)
            await self.server.wake_for(call)  # loaded on demand, as Ollama does
            plain = {**common(body, self.server.engine.max_len), **logprobs(body, True),
                     "messages": messages(body["messages"])}
            if body.get("tools"):  # the ollama client sends an empty list for none
                plain["tools"] = body["tools"]
            return await self._answer(request, plain, "chat", call)
        return await self.server.serve(request, answer, model=False)  # (`wake_for`)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """POST /api/generate."""
        async def answer(body, call) -> web.StreamResponse:
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            if body.get("images") and (body.get("raw") or body.get("suffix")):
                raise bad("'images' go through the chat template: not with raw or suffix", "images")
            if body.get("template"):
                raise bad("'template' (a Go template) is not served; the model's chat template applies, or send "
                          "raw: true with the prompt written out", "template")
            prompt, suffix = _text(body.get("prompt"), "prompt"), _text(body.get("suffix"), "suffix")
            context = body.get("context")
            if context is not None and not protocol.is_ids(context):
                raise bad("'context' must be a list of token ids", "context")
            if not prompt and not suffix and not context:
                return await self.loaded(body, {"response": ""}, call)
            await self.server.wake_for(call)  # loaded on demand, as Ollama does
            plain = common(body, self.server.engine.max_len)
            if suffix or body.get("raw"):
                plain.update(logprobs(body, False))
            if suffix:
                plain.update(prompt=prompt, suffix=suffix)
                return await self._answer(request, plain, "completion", call)
            if body.get("raw"):
                if body.get("system"):
                    raise bad("'system' goes through the template, and 'raw' asks for none", "system")
                if context:
                    prompt = [*context, *await self.server.off_loop(self._ids, prompt)]
                return await self._answer(request, {**plain, "prompt": prompt}, "completion", call)
            system = body.get("system")
            plain.update(logprobs(body, True))
            plain["messages"] = ([{"role": "system", "content": _text(system, "system")}] if system else []) + \
                [{"role": "user", "content": _pictured(prompt, body.get("images"), "images", "images")}]
            return await self._answer(request, plain, "chat", call, context or [], chat=False)
        return await self.server.serve(request, answer, model=False)  # (`wake_for`)

    def _ids(self, text: str) -> list[int]:
        """A raw prompt's ids after a `context` (on a parse thread)."""
        if self.server.engine.tok is None:
            raise bad("a text prompt needs the model's tokenizer", "prompt")
        return self.server.engine.tok.encode(protocol.bounded(self.server.model, text, "prompt"),
                                             add_special_tokens=False) if text else []

    async def _answer(self, request, plain: dict, kind: str, call, context: list[int] = (),
                      chat: bool | None = None) -> web.StreamResponse:
        """Parse a translated body, run it, and answer whole or streamed; `context`: ids before the prompt."""
        try:
            job = await self.server.parse(plain, kind, protocol.HOT)  # any temperature, as Ollama's
            if context:
                job.prompts[0] = protocol.in_vocab(self.server.model, list(context), "'context'", "context") + \
                    job.prompts[0]
            parts, events = self.server.admit(job, call, "ollama-")
        except ApiError as e:
            raise e.renamed(NAMES) from None
        turn = Turn(job)
        face = Reply(self.server, call, job, turn, kind == "chat" if chat is None else chat)
        if job.stream:
            return await self.server.sse(request, call, events, turn, face)
        await self.server.collect(events, call)
        turn.feed(face.choice.text, face.choice.finish_reason)
        return web.json_response(face.whole())

    async def loaded(self, body: dict, empty: dict, call) -> web.Response:
        """Ollama's reply to a request with nothing to generate: the model loaded (woken up where it sleeps), or
        with `keep_alive` 0 (`ollama stop`) unloaded: the server's sleep mode at level 1 (`Server.sleep`), its
        weights kept on the host, until an Ollama request loads it again."""
        reason = "unload" if body.get("keep_alive") in (0, "0", "0s", "0m") else "load"
        self.server.admitted_nothing(call)  # a sleep does not wait for this call
        await (self.server.sleep() if reason == "unload" else self.server.wake_up())
        return web.json_response({"model": body.get("model") or self.server.name, "created_at": now(), **empty,
                                  "done_reason": reason, "done": True})

    async def embed(self, request: web.Request) -> web.StreamResponse:
        """POST /api/embed: normalized vectors of `input` (a string or a list)."""
        async def answer(body, call) -> web.Response:
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            truncate = True if body.get("truncate") is None else body["truncate"]
            if not isinstance(truncate, bool):
                raise bad("'truncate' must be a boolean", "truncate")
            start, model = time.monotonic(), self.server.served(call)
            if body.get("input") in ("", []):  # Ollama's answer to nothing to embed
                return web.json_response({"model": model, "embeddings": []})
            await self.server.wake_for(call)  # loaded on demand, as Ollama does
            ask = await self.server.off_loop(self._embed_ask, body, truncate)
            vectors = pooling.finish(await self.emb.vectors(call, ask.inputs, "embd"), True, ask.dimensions)
            took = int((time.monotonic() - start) * 1e9)
            out = {"model": model, "embeddings": vectors.tolist(), "total_duration": took, "load_duration": 0,
                   "prompt_eval_count": sum(map(len, ask.inputs))}
            return web.Response(body=await self.server.off_loop(json.dumps, out), content_type="application/json")
        return await self.server.serve(request, answer, model=False)  # (`wake_for`)

    def _embed_ask(self, body: dict, truncate: bool):
        """An `/api/embed` body as the embeddings path's parsed request; with `truncate`, each input's first tokens
        that fit (Ollama keeps the start)."""
        raw = body.get("input")
        if truncate and self.server.engine.tok is not None:
            texts = [raw] if isinstance(raw, str) else raw
            if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
                most, tok = self.server.engine.runner.embed_sizes[-1], self.server.engine.tok
                raw = [tok.encode(protocol.bounded(self.server.model, t, "input"))[:most] for t in texts]
        return self.emb.parse({"input": raw, "dimensions": body.get("dimensions"), "normalize": True})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """POST /api/embeddings: Ollama's older route, one `prompt`'s vector as the model pools it."""
        async def answer(body, call) -> web.Response:
            if not isinstance(body, dict) or not isinstance(body.get("prompt"), (str, type(None))):
                raise bad("'prompt' must be a string", "prompt")
            if not body.get("prompt"):  # Ollama's answer to nothing to embed
                return web.json_response({"embedding": []})
            await self.server.wake_for(call)  # loaded on demand, as Ollama does
            ask = await self.server.off_loop(self.emb.parse, {"input": body["prompt"]})
            vectors = pooling.finish(await self.emb.vectors(call, ask.inputs, "embd"), ask.normalize, None)
            return web.json_response({"embedding": vectors[0].tolist()})
        return await self.server.serve(request, answer, model=False)  # (`wake_for`)

    def entry(self) -> dict:
        """The served model as `/api/tags` and `/api/ps` list it."""
        s = self.server
        return {"name": s.name, "model": s.name, "modified_at": self.modified, "size": self.size,
                "digest": self.digest, "details": self.details()}

    def details(self) -> dict:
        """The model's `details`: format, family, size and quantization."""
        cfg = self.server.model.cfg
        family = cfg.arch.removesuffix("ForCausalLM").lower() or "unknown"
        fmt = "gguf" if os.path.splitext(str(self.server.model.source))[1] == ".gguf" else "safetensors"
        count = self.count
        size = f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
        quant = cfg.quantization.upper() if cfg.quantization != "none" else str(cfg.dtype).upper()
        return {"parent_model": "", "format": fmt, "family": family, "families": [family], "parameter_size": size,
                "quantization_level": quant}

    async def tags(self, request: web.Request) -> web.Response:
        """GET /api/tags: the served model."""
        return web.json_response({"models": [self.entry()]})

    async def ps(self, request: web.Request) -> web.Response:
        """GET /api/ps: the served model, loaded on the devices until the server stops; none while it sleeps."""
        entry = self.entry()
        return web.json_response({"models": [] if self.server.engine.asleep else [
            {**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": entry["size"]}]})

    async def show(self, request: web.Request) -> web.Response:
        """POST /api/show: the served model's template, details, configuration and capabilities."""
        body = await self.server._body(request)
        self.server.check_model({"model": body.get("model") or body.get("name")} if isinstance(body, dict) else {})
        s, tok = self.server, self.server.engine.tok
        entry, template = self.entry(), (tok.chat_template or "") if tok is not None else ""
        caps = ["completion"] + (["tools"] if "tools" in template else []) + \
            (["insert"] if tok is not None and tok.fim is not None else []) + (["thinking"] if s.thinks else []) + \
            (["vision"] if s.model.vision is not None else [])
        cfg = s.model.cfg
        arch = entry["details"]["family"]
        info = {"general.architecture": arch, f"{arch}.context_length": s.engine.max_len,
                f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.block_count": cfg.num_layers,
                "general.parameter_count": self.count}
        return web.json_response({"modelfile": f"FROM {s.model.source}\n", "parameters": "", "template": template,
                                  "details": entry["details"], "model_info": info, "capabilities": caps,
                                  "modified_at": self.modified})

    async def pull(self, request: web.Request) -> web.Response:
        """POST /api/pull (the `ollama` client's `pull`, which scripts call before using a model): the served model
        (or an alias, or a loaded LoRA adapter) is here already, so the answer is Ollama's last progress line,
        `{"status": "success"}` (streamed as one NDJSON line unless `stream` is false); nothing is downloaded, and
        another model is a 404."""
        body = await self.server.body_object(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str):
            raise bad("'model' must name a model", "model")
        try:
            self.server.check_model({"model": name})
        except ApiError as e:
            e.message += " (this server does not download models: it serves the one it was started with)"
            raise
        if body.get("stream") is False:
            return web.json_response({"status": "success"})
        return web.Response(body=json.dumps({"status": "success"}) + "\n", content_type="application/x-ndjson")

    async def version(self, request: web.Request) -> web.Response:
        """GET /api/version: the Ollama API version served, and this server's."""
        return web.json_response({"version": VERSION, "sparkler": importlib.metadata.version("sparkler")})
