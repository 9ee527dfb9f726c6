"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), translated onto the chat path.

`system`, `messages` (text, `tool_use` and `tool_result` blocks), `tools` with `input_schema`, `tool_choice`,
`thinking`, `stop_sequences` and the sampling fields become a chat-completions body that `protocol.parse` validates
like any other; the reply is read through a `Turn` and written as content blocks (`thinking`, `text`, `tool_use`),
whole or as Anthropic's event stream. Errors take Anthropic's shape (`error_body`); `x-api-key` is accepted beside
`Authorization: Bearer` (the server's middleware).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from engine.params import CONTEXT
from server import protocol
from server.protocol import ApiError, bad, text_of
from server.shapes import sse_event
from server.turn import Piece, Turn

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}
PARAMS = {"stop": "stop_sequences", "response_format": "output_config"}
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def routes(app: web.Application, server) -> None:
    """Add the Messages routes to `app`."""
    api = Messages(server)
    app.router.add_post("/v1/messages", api.create)
    app.router.add_post("/v1/messages/count_tokens", api.count_tokens)


def error_body(e: ApiError) -> dict:
    """An error in Anthropic's shape."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


def _message(m: Any, i: int, last: bool, called: set[str], lead: int = 0) -> list[dict]:
    """One Anthropic message as chat messages: tool results become tool turns (before the user's text), tool_use
    blocks the assistant's tool calls (their ids added to `called`, which a later tool_result must name), its
    thinking blocks its reasoning (which templates that interleave thinking with tool calls read back; redacted ones
    are dropped). `lead`: text blocks put before the message's own (`_led`), left out of the indices errors name."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
        raise bad(f"{where} must be an object with role 'user' or 'assistant'", "messages")
    role, content = m["role"], m.get("content")
    if content in ("", []) and not (last and role == "assistant"):  # Anthropic's rule: only a prefill may be empty
        raise bad(f"{where}.content must not be empty (only a final assistant message may be)", "messages")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content blocks", "messages")
    text, calls, results, thought = [], [], [], []
    for k, b in enumerate(content, start=-lead):  # (the led blocks' indices below 0: they are text)
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            if not isinstance(b.get("text"), str):
                raise bad(f"{where}.content[{k}]: a text block needs a string 'text'", "messages")
            text.append({"type": "text", "text": b["text"]})
        elif kind == "image" and role == "user":  # a picture, as chat's image part (`server.images`)
            src = b.get("source") if isinstance(b.get("source"), dict) else {}
            if src.get("type") == "base64" and isinstance(src.get("data"), str):
                url = f"data:{src.get('media_type', 'image/*')};base64,{src['data']}"
            elif src.get("type") == "url" and isinstance(src.get("url"), str):
                url = src["url"]
            else:
                raise bad(f"{where}.content[{k}]: an image block needs a source {{'type': 'base64', 'media_type', "
                          "'data'}} or {'type': 'url', 'url'}", "messages")
            text.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "document" and role == "user":
            text.append({"type": "text", "text": _document(b, f"{where}.content[{k}]")})
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or \
                    not isinstance(b.get("input", {}), dict):
                raise bad(f"{where}.content[{k}]: a tool_use block needs a string id and name and an object input",
                          "messages")
            called.add(b["id"])
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(b.get("tool_use_id"), str):
                raise bad(f"{where}.content[{k}]: a tool_result block needs a string tool_use_id", "messages")
            if b["tool_use_id"] not in called:
                raise bad(f"{where}.content[{k}]: the tool_result's tool_use_id {b['tool_use_id']!r} names no "
                          "tool_use block of an earlier message", "messages")
            out = text_of(b.get("content", ""), f"{where}.content[{k}].content", "messages")
            results.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                            "content": ("Error: " + out) if b.get("is_error") else out})
        elif kind == "thinking" and role == "assistant":
            if not isinstance(b.get("thinking"), str):
                raise bad(f"{where}.content[{k}]: a thinking block needs a string 'thinking'", "messages")
            thought.append(b["thinking"])
        elif kind != "redacted_thinking":
            raise bad(f"{where}.content[{k}]: blocks of type {kind!r} are not supported here (text, image, "
                      "document and tool_result in user turns, text, tool_use and thinking in assistant turns)",
                      "messages")
    out = results
    if text or calls or thought or not results:
        pictures = any(p["type"] == "image_url" for p in text)
        one = {"role": role, "content": text if pictures else "".join(p["text"] for p in text)}
        if calls:
            one["tool_calls"] = calls
        if thought:
            one["reasoning_content"] = "".join(thought)
        out = out + [one]
    return out


def _led(texts: list[str], content: Any) -> Any:
    """A user message's content with `texts` (system messages before it) first; a tool result's turn keeps its
    results first (`_message` puts them before the user's text)."""
    if isinstance(content, str):
        return "\n\n".join([*texts, content])
    if isinstance(content, list):
        return [*({"type": "text", "text": t} for t in texts), *content]
    return content  # (a 400 in `_message`)


def _document(block: dict, where: str) -> str:
    """A text document block as the text the model reads: its `title` and `context` lines, then its text (a
    `text` source's `data`, or a `content` source's text blocks); a PDF or file source is a 400 (this server reads
    no PDFs)."""
    src = block.get("source") if isinstance(block.get("source"), dict) else {}
    if src.get("type") == "text" and isinstance(src.get("data"), str):
        body = src["data"]
    elif src.get("type") == "content":
        body = text_of(src.get("content"), f"{where}.source.content", "messages")
    else:
        raise bad(f"{where}: a document block needs a text source ({{'type': 'text', 'media_type': 'text/plain', "
                  "'data'}} or {'type': 'content', 'content': [...]}); PDF and file sources are not read here",
                  "messages")
    head = [block[k] for k in ("title", "context") if isinstance(block.get(k), str) and block[k]]
    return "\n".join([*head, body])


def _tools(body: dict) -> dict:
    tools, choice, out = body.get("tools"), body.get("tool_choice"), {}
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("'tools' must be a list of {'name', 'description', 'input_schema'}", "tools")
        funcs = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type", "custom") != "custom" or not isinstance(t.get("input_schema"),
                                                                                                  dict):
                raise bad(f"tools[{i}] must be a custom tool {{'name', 'description', 'input_schema'}}", "tools")
            funcs.append({"type": "function", "function": {"name": t.get("name"),
                                                           "description": t.get("description") or "",
                                                           "parameters": t["input_schema"]}})
        out["tools"] = funcs or None
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none") or (kind == "tool" and not isinstance(choice.get("name"), str)):
            raise bad("'tool_choice' must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}",
                      "tool_choice")
        if kind != "none" or out.get("tools"):
            out["tool_choice"] = ({"type": "function", "function": {"name": choice["name"]}} if kind == "tool"
                                  else {"any": "required"}.get(kind, kind))
        if not isinstance(choice.get("disable_parallel_tool_use", False), bool):
            raise bad("'tool_choice.disable_parallel_tool_use' must be a boolean", "tool_choice")
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    if out.get("tools") is None:
        out.pop("tools", None)
        if out.get("tool_choice") not in (None, "none", "auto"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        out.pop("tool_choice", None)
    return out


def chat_body(body: Any, counting: bool = False, interleaved: bool = False) -> dict:
    """A chat-completions body for a Messages body (`counting`: for count_tokens, where max_tokens is not needed;
    `interleaved`: the interleaved-thinking beta, where a thinking budget may pass max_tokens, being the turn's)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    out: dict = {"messages": [], "stream": protocol._flag(body, "stream")}
    system = [] if body.get("system") is None else [text_of(body["system"], "'system'", "system")]
    pending = []  # system messages within the conversation (Claude Code's mid-conversation-system beta)
    called: set[str] = set()  # the tool_use ids of the messages so far
    said = [i for i, m in enumerate(msgs) if not (isinstance(m, dict) and m.get("role") == "system")]
    for i, m in enumerate(msgs):
        if isinstance(m, dict) and m.get("role") == "system":
            text = text_of(m.get("content"), f"messages[{i}].content", "messages")
            (pending if out["messages"] else system).append(text)
            continue
        lead = 0
        if pending and isinstance(m, dict) and m.get("role") == "user" and m.get("content") not in ("", [], None):
            lead = len(pending) if isinstance(m.get("content"), list) else 0
            m, pending = {**m, "content": _led(pending, m.get("content"))}, []  # its first text (an empty one: 400)
        out["messages"] += _message(m, i, i == said[-1] if said else False, called, lead)
    if not out["messages"]:
        raise bad("'messages' must hold a user or assistant message, not system messages alone", "messages")
    if pending and out["messages"][-1]["role"] == "assistant" and not out["messages"][-1].get("tool_calls"):
        system += pending  # after a prefill, which the reply continues: read with the system prompt
    elif pending:
        out["messages"].append({"role": "user", "content": "\n\n".join(pending)})
    if system:
        out["messages"].insert(0, {"role": "system", "content": "\n\n".join(system)})
    last = out["messages"][-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):  # a prefill: the reply continues it
        out["continue_final_message"] = True
    if isinstance(body.get("temperature"), (int, float)) and not 0 <= body["temperature"] <= 1:
        raise bad("'temperature' must be in [0, 1]", "temperature")  # Anthropic's range (chat's goes to 2)
    if not counting:
        mt = body.get("max_tokens")
        if mt is None:
            raise bad("'max_tokens' is required", "max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise bad(f"'max_tokens' must be an integer >= 1, not {mt!r}", "max_tokens")
        out["max_tokens"] = mt
    for k in ("temperature", "top_p", "top_k", "min_p", "typical_p", "frequency_penalty", "presence_penalty",
              "repetition_penalty", "seed", "ignore_eos", "chat_template_kwargs", "reasoning_effort",
              "prompt_cache_isolation_key", "priority"):
        if k in body:
            out[k] = body[k]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("'stop_sequences' must be a list of strings", "stop_sequences")
        out["stop"] = stops
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or not isinstance(meta.get("user_id", ""), (str, type(None)))):
        raise bad("'metadata' must be an object, its user_id a string", "metadata")
    if body.get("service_tier") not in (None, "auto", "standard_only"):
        raise bad("'service_tier' must be 'auto' or 'standard_only'", "service_tier")
    thinking = body.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        budget = thinking.get("budget_tokens") if kind == "enabled" else None
        if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0:
            if not counting and not interleaved and budget >= out["max_tokens"]:
                raise bad(f"'thinking.budget_tokens' ({budget}) must be less than 'max_tokens' ({out['max_tokens']})",
                          "thinking")
            out.setdefault("reasoning_effort", budget)
        elif kind in ("disabled", "adaptive"):
            out.setdefault("reasoning_effort", "none" if kind == "disabled" else True)
        else:
            raise bad("'thinking' must be {'type': 'enabled', 'budget_tokens': N >= 0}, {'type': 'adaptive'} or "
                      "{'type': 'disabled'}", "thinking")
    config = body.get("output_config")
    if body.get("output_format") is not None:  # the structured-outputs beta's name for output_config.format
        if isinstance(config, dict) and config.get("format") is not None:
            raise bad("'output_format' is the beta's name for 'output_config.format': give one", "output_format")
        if config is None or isinstance(config, dict):
            config = {**(config or {}), "format": body["output_format"]}
    if config is not None:
        fmt = config.get("format") if isinstance(config, dict) else None
        if not isinstance(config, dict) or config.get("effort") not in (None, *EFFORTS) or (
                fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"
                                         and isinstance(fmt.get("schema"), dict))):
            raise bad("'output_config' must be like {'format': {'type': 'json_schema', 'schema': {...}}, 'effort': "
                      "'low' | 'medium' | 'high'}", "output_config")
        if fmt is not None:
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                             "schema": fmt.get("schema")}}
        if config.get("effort") is not None:
            out.setdefault("reasoning_effort", EFFORTS[config["effort"]])
    out.update(_tools(body))
    if not out.get("tools") and any(m.get("tool_calls") or m["role"] == "tool" for m in out["messages"]):
        raise bad("messages with tool_use or tool_result blocks need the tools defined in 'tools'", "tools")
    return out


class Blocks:
    """A message's content blocks as the reply's pieces arrive, and the stream events that announce them."""

    def __init__(self):
        self.blocks: list[dict] = []
        self.open: str | None = None  # the kind of the last block while it is being written
        self.args: dict[int, str] = {}  # tool-call index -> its input's JSON text
        self.calls: dict[int, int] = {}  # tool-call index -> block index

    def add(self, piece: Piece) -> list[dict]:
        """Events for one piece of the reply."""
        ev = []
        if piece.reasoning:
            ev += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.blocks[-1]["thinking"] += piece.reasoning
            ev.append(self._delta({"type": "thinking_delta", "thinking": piece.reasoning}))
        if piece.text:
            ev += self._start("text", {"type": "text", "text": ""})
            self.blocks[-1]["text"] += piece.text
            ev.append(self._delta({"type": "text_delta", "text": piece.text}))
        for d in piece.calls:
            k = d["index"]
            if "id" in d:
                ev += self.close()
                own = d["id"].startswith("call_")  # else the model's own (Kimi's), which its template reads back
                tid = "toolu_" + d["id"].removeprefix("call_") if own else d["id"]
                ev += self._start(f"tool{k}", {"type": "tool_use", "id": tid, "name": d["function"]["name"],
                                               "input": {}})
                self.calls[k], self.args[k] = len(self.blocks) - 1, ""
            args = d["function"].get("arguments", "")
            if args:
                self.args[k] += args
                if self.open == f"tool{k}":
                    ev.append(self._delta({"type": "input_json_delta", "partial_json": args}))
        return ev

    def finish(self) -> list[dict]:
        """Close the last block; tool inputs become objects."""
        ev = self.close()
        for k, b in self.calls.items():
            try:
                value = json.loads(self.args[k] or "{}")
            except ValueError:
                value = {}
            self.blocks[b]["input"] = value if isinstance(value, dict) else {}
        if not self.blocks:
            self.blocks.append({"type": "text", "text": ""})
        return ev

    def _start(self, kind: str, block: dict) -> list[dict]:
        if self.open == kind:
            return []
        ev = self.close()
        self.blocks.append(block)
        self.open = kind
        return ev + [{"type": "content_block_start", "index": len(self.blocks) - 1,
                      "content_block": json.loads(json.dumps(block))}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}

    def close(self) -> list[dict]:
        """Events that end the open block."""
        if self.open is None:
            return []
        self.open = None
        ev = []
        if self.blocks[-1]["type"] == "thinking":
            ev.append(self._delta({"type": "signature_delta", "signature": ""}))
        return ev + [{"type": "content_block_stop", "index": len(self.blocks) - 1}]


class Stream:
    """One reply as a message and its event stream (`Server.sse`'s face)."""

    def __init__(self, api: "Messages", call, turn: Turn):
        self.api, self.call, self.turn, self.blocks = api, call, turn, Blocks()
        self.req = call.reqs[0]
        self.choice = self.req.choices[0]

    encode = staticmethod(sse_event)

    @staticmethod
    def ping() -> bytes:
        """Anthropic's keep-alive, sent while the reply is quiet (`Server.sse`)."""
        return sse_event({"type": "ping"})

    def stop(self) -> tuple[str, str | None]:
        """`(stop_reason, stop_sequence)` of the finished reply."""
        if self.turn.finish == "tool_calls":
            return "tool_use", None
        if self.turn.finish == "length":
            return "max_tokens", None
        if self.choice.stop_hit is not None:
            return "stop_sequence", self.choice.stop_hit
        return "end_turn", None

    def usage(self) -> dict:
        """Anthropic's usage: prompt tokens outside and inside the prefix cache, output tokens."""
        req = self.req
        return {"input_tokens": len(req.prompt_ids) - req.cached_tokens, "output_tokens": len(self.choice.token_ids),
                "cache_read_input_tokens": req.cached_tokens, "cache_creation_input_tokens": 0}

    def message(self, content: list, stop: tuple[str | None, str | None]) -> dict:
        """The message object."""
        return {"id": self.call.rid, "type": "message", "role": "assistant", "model": self.api.server.served(self.call),
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1], "usage": self.usage()}

    def opening(self) -> list[dict]:
        """message_start."""
        return [{"type": "message_start", "message": self.message([], (None, None))}]

    def add(self, piece: Piece) -> list[dict]:
        """The events of one piece."""
        return self.blocks.add(piece)

    def closing(self) -> list[dict]:
        """The last block's end, message_delta and message_stop."""
        ev = self.blocks.finish()
        stop = self.stop()
        return ev + [{"type": "message_delta", "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]},
                      "usage": self.usage()}, {"type": "message_stop"}]

    @staticmethod
    def failed(e: ApiError) -> list[dict]:
        """An error event."""
        return [error_body(e)]


class Messages:
    """The Messages routes of one `Server`."""

    def __init__(self, server):
        self.server = server

    async def _job(self, request: web.Request, body: Any, counting: bool = False) -> protocol.Job:
        betas = request.headers.get("anthropic-beta", "")
        chat = chat_body(body, counting, interleaved="interleaved-thinking" in betas)
        try:
            return await self.server.parse(chat, "chat")
        except ApiError as e:
            e.message = e.message.replace(".function.parameters", ".input_schema")  # a tool's schema, by its name here
            raise e.renamed(PARAMS) from None

    async def count_tokens(self, request: web.Request) -> web.Response:
        """POST /v1/messages/count_tokens: the prompt's length in tokens, as the template renders it."""
        async def answer(body, call) -> web.Response:
            return web.json_response({"input_tokens": len((await self._job(request, body, counting=True)).prompts[0])})
        return await self.server.serve(request, answer, model=False)


    async def create(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages."""
        async def answer(body, call) -> web.StreamResponse:
            job = await self._job(request, body)
            try:
                parts, events = self.server.admit(job, call, "msg_")
            except ApiError as e:
                if e.code == CONTEXT and e.param == "messages":  # Anthropic's words, which Claude Code compacts on
                    most = self.server.engine.max_len - 1  # the longest prompt: the context holds a reply's token too
                    e.message = f"prompt is too long: {len(job.prompts[0])} tokens > {most} maximum"
                raise e.renamed(PARAMS) from None
            turn = Turn(job)
            face = Stream(self, call, turn)
            if job.stream:
                return await self.server.sse(request, call, events, turn, face)
            await self.server.collect(events, call)
            face.add(turn.feed(face.choice.text, face.choice.finish_reason))
            face.closing()
            return web.json_response(face.message(face.blocks.blocks, face.stop()))
        return await self.server.serve(request, answer)
