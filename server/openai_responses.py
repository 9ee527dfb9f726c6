"""OpenAI's Responses API (`/v1/responses`), translated onto the chat path.

A request's `input` (a string, or items: messages, `function_call`, `function_call_output`, their `custom_tool_call`
twins), its `instructions`, function and custom `tools`, `text.format` and sampling fields become a chat-completions
body that `protocol.parse` validates like any other, so tools, structured output, reasoning, metrics, back-pressure
and timeouts are shared. The reply is read through a `Turn` and written as output items (reasoning, message, function
and custom tool calls), whole or as the official event stream. Stored responses (`store`, default true) keep their
conversation in SQLite (`server.store`), which `previous_response_id` continues. A background response
(`background: true`) runs apart from its call (`server.background`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
import types
import uuid
from typing import Any

from aiohttp import web

from server import protocol
from server.background import Background, stored_status
from server.batches import page
from server.protocol import ApiError, bad, text_of
from server.shapes import chat_logprobs, sse_event
from server.turn import Piece, Turn

log = logging.getLogger("sparkler.server")
PASSED = ("temperature", "top_p", "top_k", "min_p", "typical_p", "frequency_penalty", "presence_penalty",
          "repetition_penalty", "mirostat_target", "mirostat_lr", "seed", "logit_bias", "ignore_eos", "stop",
          "prompt_cache_max_len", "prompt_cache_isolation_key", "context_length_exceeded_behavior",
          "prompt_truncate_len", "chat_template_kwargs", "reasoning_effort", "parallel_tool_calls", "priority",
          # vLLM's sampling extras (some of which its own Responses API takes), taken here as on chat
          "cache_salt", "min_tokens", "stop_token_ids", "bad_words", "allowed_token_ids", "skip_special_tokens",
          "include_stop_str_in_output", "structured_outputs", "truncate_prompt_tokens")
INCLUDES = ("message.output_text.logprobs", "reasoning.encrypted_content", "message.input_image.image_url",
            "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
            "computer_call_output.output.image_url", "code_interpreter_call.outputs")  # OpenAI's `include` values
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
TEXT_PARTS = ("input_text", "output_text", "text")
COMPACTED = "sparkler-compaction-v1:"  # a compaction item's encrypted_content: this, then its summary in base64
SUMMARY_HEAD = "A summary of the conversation so far:\n\n"  # how the model reads a compaction item
EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high", "none": "none"}


def routes(app: web.Application, server) -> "Responses":
    """Add the Responses routes to `app`; their `Responses`."""
    api = Responses(server)
    app.router.add_post("/v1/responses", api.create)
    app.router.add_post("/v1/responses/input_tokens", api.input_tokens)
    app.router.add_get("/v1/responses/{id}", api.retrieve)
    app.router.add_delete("/v1/responses/{id}", api.delete)
    app.router.add_get("/v1/responses/{id}/input_items", api.input_items)
    app.router.add_post("/v1/responses/{id}/cancel", api.cancel)
    return api


def new_id(prefix: str) -> str:
    """A new object id: `prefix`, an underscore and 24 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def stored(items: list[dict]) -> list[dict]:
    """Normalized input items (`items_of`) as a conversation keeps and lists them: each with a new id and a status,
    a message's content as parts (`input_text`, `input_image`; an assistant's `output_text`)."""
    out = []
    for it in items:
        if it["type"] == "message":
            said = it["role"] == "assistant"
            parts = [{"type": "input_text", "text": it["content"]}] if isinstance(it["content"], str) else [
                {**p, "detail": "auto"} if p["type"] == "input_image" else p for p in it["content"]]
            if said:
                parts = [{"type": "output_text", "text": p["text"], "annotations": [], "logprobs": []} for p in parts]
            out.append({"id": new_id("msg"), "type": "message", "status": "completed", "role": it["role"],
                        "content": parts})
        else:
            prefix = {"function_call": "fc", "function_call_output": "fco", "custom_tool_call": "ctc",
                      "custom_tool_call_output": "ctco", "reasoning": "rs", "compaction": "cmp"}[it["type"]]
            out.append({**it, "id": new_id(prefix), "status": "completed"})
    return out


def identified(items: list[dict]) -> list[dict]:
    """Normalized items as a stored response and a conversation keep them (`stored`'s form): each keeps its id or
    gets one, so the ids `input_items` lists are ones a later input may reference."""
    return [{**stored([it])[0], **({"id": it["id"]} if it.get("id") else {})} for it in items]


STORED = object()  # a key marking an input item `referenced` read from the store (no JSON body can hold it)


def items_of(value: Any, kept: bool = False) -> list[dict]:
    """`input` as normalized items: messages with text content, function calls and their outputs, and reasoning
    items (a model's earlier thinking, which templates that interleave it with tool calls read back). An item keeps
    its `id` only where it was read from the store (`kept`: all of them, a stored history; else those `referenced`
    marked): a client's own ids are never indexed, so none can name, or take, another's item."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("'input' must be a string or a non-empty list of items", "input")
    out = []
    for i, it in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise bad(f"{where} must be an object", "input")
        kind = it.get("type", "message")
        if kind == "message":
            if it.get("role") not in ("user", "system", "developer", "assistant"):
                raise bad(f"{where}.role must be user, system, developer or assistant", "input")
            content = _content(it, where)
            out.append({"type": "message", "role": it["role"], "content": content})
        elif kind == "function_call":
            if not all(isinstance(it.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad(f"{where}: a function_call needs string call_id, name and arguments", "input")
            out.append({"type": "function_call", "call_id": it["call_id"], "name": it["name"],
                        "arguments": it["arguments"]})
        elif kind == "custom_tool_call":
            if not all(isinstance(it.get(k), str) for k in ("call_id", "name", "input")):
                raise bad(f"{where}: a custom_tool_call needs string call_id, name and input", "input")
            out.append({"type": "custom_tool_call", "call_id": it["call_id"], "name": it["name"],
                        "input": it["input"]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            # (Codex sends its goal's objective as an output with a `name` and no call_id)
            named = it.get("call_id") is None and isinstance(it.get("name"), str)
            if not isinstance(it.get("call_id"), str) and not named:
                raise bad(f"{where}: a {kind} needs a string call_id", "input")
            out.append({"type": kind, **({"name": it["name"]} if named else {"call_id": it["call_id"]}),
                        "output": text_of(it.get("output"), f"{where}.output", "input", TEXT_PARTS)})
        elif kind == "reasoning":
            out.append(_reasoning(it, where))
        elif kind == "compaction":
            summary_of(it, where)
            out.append({"type": "compaction", "encrypted_content": it["encrypted_content"]})
        else:
            raise bad(f"{where}: items of type {kind!r} are not supported (message, function_call, "
                      "function_call_output, custom_tool_call, custom_tool_call_output, reasoning, compaction)",
                      "input")
        if isinstance(it.get("id"), str) and (kept or STORED in it):
            out[-1]["id"] = it["id"]
    return out


def answered(history: list[dict], own: list[dict]) -> None:
    """OpenAI's check of tool outputs: each output item of `own` (this `input`, by its index) answers a call with its
    `call_id` made before it, in `history` or in `own` (an output by `name` alone, Codex's goal, answers none)."""
    called = {it["call_id"] for it in history if it["type"] in ("function_call", "custom_tool_call")}
    for i, it in enumerate(own):
        if it["type"] in ("function_call", "custom_tool_call"):
            called.add(it["call_id"])
        elif it["type"].endswith("_output") and "call_id" in it and it["call_id"] not in called:
            raise bad(f"input[{i}]: no tool call found for the {it['type']} with call_id {it['call_id']!r}", "input")


def compaction(summary: str) -> dict:
    """A compaction item holding `summary` (`/v1/responses/compact`); its `encrypted_content` is this server's
    own encoding, not a secret."""
    return {"id": new_id("cmp"), "type": "compaction",
            "encrypted_content": COMPACTED + base64.b64encode(summary.encode()).decode()}


def summary_of(item: dict, where: str = "input") -> str:
    """The summary a compaction item of this server holds; a 400 for another's (OpenAI's is encrypted)."""
    content = item.get("encrypted_content")
    if isinstance(content, str) and content.startswith(COMPACTED):
        try:
            return base64.b64decode(content[len(COMPACTED):], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            pass
    raise bad(f"{where}: a compaction item must be one this server made (/v1/responses/compact); another "
              "server's encrypted_content cannot be read here", "input")


def _reference(item: Any) -> bool:
    """Whether an input item is an `item_reference` (its `type` may be left out: an item with only an `id`)."""
    return isinstance(item, dict) and (item.get("type") == "item_reference" or item.keys() == {"id"} or (
        item.keys() == {"id", "type"} and item["type"] is None))


def _conversation_id(body: dict) -> str | None:
    """The request's `conversation`: an id, or `{"id": ...}` (None when there is none)."""
    conv = body.get("conversation")
    if isinstance(conv, dict):
        conv = conv.get("id", 0)
    if conv is not None and not isinstance(conv, str):
        raise bad("'conversation' must be a conversation id or {'id': ...}", "conversation")
    return conv


def _reasoning(item: dict, where: str) -> dict:
    """A reasoning item sent back, checked: its `content` (`reasoning_text` parts) and `summary` (`summary_text`
    parts); an `encrypted_content` is another server's and is not read."""
    out = {"type": "reasoning", **({"id": item["id"]} if isinstance(item.get("id"), str) else {})}
    for key, part in (("summary", "summary_text"), ("content", "reasoning_text")):
        parts = item.get(key) or []
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                  for p in parts):
            raise bad(f"{where}.{key} must be a list of {{'type': '{part}', 'text': str}}", "input")
        out[key] = [{"type": part, "text": p["text"]} for p in parts]
    return out


def _content(item: dict, where: str) -> str | list[dict]:
    """A message item's content: its text, or where a user message holds `input_image` parts, its parts as
    `input_text` and `input_image` (kept so with a stored response; `messages_of` turns them into chat's)."""
    content = item.get("content")
    if item["role"] != "user" or not isinstance(content, list) or not any(
            isinstance(p, dict) and p.get("type") == "input_image" for p in content):
        return text_of(content, where, "input", TEXT_PARTS)
    parts = []
    for k, p in enumerate(content):
        if isinstance(p, dict) and p.get("type") == "input_image":
            if not isinstance(p.get("image_url"), str):
                raise bad(f"{where}.content[{k}]: an input_image needs an image_url (a file_id is not served here)",
                          "input")
            parts.append({"type": "input_image", "image_url": p["image_url"]})
        else:
            parts.append({"type": "input_text", "text": text_of([p], f"{where}.content[{k}]", "input", TEXT_PARTS)})
    return parts


def _chat_parts(content: str | list[dict]) -> str | list[dict]:
    """A message item's content as chat's: text as it is, `input_text` / `input_image` parts as chat's parts."""
    if isinstance(content, str):
        return content
    return [{"type": "image_url", "image_url": {"url": p["image_url"]}} if p["type"] == "input_image"
            else {"type": "text", "text": p["text"]} for p in content]


def messages_of(items: list[dict], instructions: str | None) -> list[dict]:
    """Chat messages for a conversation's items: `instructions` and every system or developer message in one
    system message first (most templates take no other), and consecutive calls in the assistant turn before
    them; a reasoning item's text (its content, else its summary) is the reasoning of the assistant turn after
    it."""
    system = [instructions] if instructions else []
    msgs, thought = [], []

    def said(msg: dict) -> dict:
        if thought:
            msg["reasoning_content"] = msg.get("reasoning_content", "") + "".join(thought)
            thought.clear()
        return msg

    for it in items:
        if it["type"] == "message" and it["role"] in ("system", "developer"):
            system.append(it["content"])
        elif it["type"] == "reasoning":
            thought.extend(p["text"] for p in it["content"] or it["summary"])
        elif it["type"] == "compaction":  # the earlier turns it replaces, as the model reads them
            msgs.append({"role": "user", "content": SUMMARY_HEAD + summary_of(it)})
            thought.clear()
        elif it["type"] == "message":
            msg = {"role": it["role"], "content": _chat_parts(it["content"])}
            msgs.append(said(msg) if it["role"] == "assistant" else msg)
            thought.clear()  # thinking that no assistant turn followed is of no turn
        elif it["type"] in ("function_call", "custom_tool_call"):
            kind, body = ("function", "arguments") if it["type"] == "function_call" else ("custom", "input")
            call = {"id": it["call_id"], "type": kind, kind: {"name": it["name"], body: it[body]}}
            if msgs and msgs[-1]["role"] == "assistant" and not thought:
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append(said({"role": "assistant", "content": "", "tool_calls": [call]}))
        else:  # a call's output: by its call's id, or (Codex's goal) by a name
            answers = {"tool_call_id": it["call_id"]} if "call_id" in it else {"name": it["name"]}
            msgs.append({"role": "tool", **answers, "content": it["output"]})
            thought.clear()
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + msgs


def _tools(body: dict) -> dict:
    """Function and custom tools, and tool_choice, in chat's shape."""
    tools, choice, out = body.get("tools"), body.get("tool_choice"), {}
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return out
    if not isinstance(tools, list):
        raise bad("'tools' must be a list of function tools", "tools")
    funcs = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise bad(f"tools[{i}] must be a tool object with a 'type'", "tools")
        inner = t.get("tools") if t["type"] == "namespace" and isinstance(t.get("tools"), list) else [t]
        for f in inner:  # a namespace's function tools are served as functions (`namespaces` marks their calls)
            kind = f.get("type") if isinstance(f, dict) else None
            if kind not in ("function", "custom"):  # hosted tools (web_search, ...) are the provider's: none here
                log.info("tools[%d] of type %r ignored: only function and custom tools are served here", i, kind)
                continue
            keys = ("name", "description", "parameters") if kind == "function" else ("name", "description", "format")
            funcs.append({"type": kind, kind: {k: f[k] for k in keys if f.get(k) is not None}})
    if not funcs:
        if choice not in (None, "none", "auto"):
            raise bad("'tool_choice' needs function tools", "tool_choice")
        return out
    out["tools"] = funcs
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":  # Responses' flat shape, as chat's
        picks = choice.get("tools")
        picks = [{"type": p["type"], p["type"]: {"name": p.get("name")}} for p in picks  # hosted tools: none here
                 if isinstance(p, dict) and p.get("type") in ("function", "custom")] if isinstance(picks, list) \
            else picks
        choice = {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": picks}}
    elif isinstance(choice, dict):
        if choice.get("type") not in ("function", "custom") or not isinstance(choice.get("name"), str):
            raise bad("'tool_choice' must be 'none', 'auto', 'required', {'type': 'function' | 'custom', 'name': "
                      "...} or {'type': 'allowed_tools', 'mode', 'tools'}", "tool_choice")
        choice = {"type": choice["type"], choice["type"]: {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    return out


def namespaces(body: dict) -> dict[str, str]:
    """Each function of a `namespace` tool (Codex's sub-agent tools) -> that namespace, which its calls carry."""
    out, tools = {}, body.get("tools")
    for t in tools if isinstance(tools, list) else []:
        if isinstance(t, dict) and t.get("type") == "namespace" and isinstance(t.get("tools"), list):
            out.update({f["name"]: t.get("name") for f in t["tools"] if isinstance(f, dict)
                        and isinstance(f.get("name"), str)})
    return out


def _format(body: dict) -> dict | None:
    """`text.format` as chat's response_format."""
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad("'text' must be an object like {'format': {'type': 'json_schema', ...}}", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad("'text.format' must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad("'text.format.schema' (a JSON schema object) is required for type 'json_schema'", "text.format")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema")}}
    return fmt


def metadata(meta: Any) -> dict:
    """`metadata` as OpenAI checks it: at most 16 string values, keys to 64 characters, values to 512 ({} for
    none)."""
    if meta is not None and not (isinstance(meta, dict) and len(meta) <= 16 and all(
            isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in meta.items())):
        raise bad("'metadata' must be an object of at most 16 string values (keys up to 64 characters, values up "
                  "to 512)", "metadata")
    return meta or {}


def _echoed(body: dict) -> None:
    """OpenAI's checks of the fields a response only echoes back (and stores): `metadata` (at most 16 string
    values, keys to 64 characters, values to 512), `user`, `truncation`, `include`, `background` (a boolean, only
    with `store`)."""
    metadata(body.get("metadata"))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string", "user")
    if body.get("truncation") not in (None, "auto", "disabled"):
        raise bad("'truncation' must be 'auto' or 'disabled'", "truncation")
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(i in INCLUDES for i in include)):
        raise bad(f"'include' must be a list of these: {', '.join(INCLUDES)} (only the logprobs change anything "
                  "here: no tool runs on this server)", "include")
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise bad("'top_logprobs' must be an integer in [0, 20]", "top_logprobs")
    background = body.get("background", False)
    if background is not None and not isinstance(background, bool):
        raise bad("'background' must be a boolean", "background")
    if background and body.get("store", True) is False:
        raise bad("background responses are stored: 'background' needs 'store' true", "background")


def chat_body(body: dict, history: list[dict]) -> tuple[dict, list[dict]]:
    """`(chat-completions body, the conversation's items: history then this input)` for a Responses body."""
    own = items_of(body.get("input"))
    answered(history, own)
    items = history + own
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("'instructions' must be a string", "instructions")
    _echoed(body)
    out = {k: body[k] for k in PASSED if k in body}
    out["messages"] = messages_of(items, instructions)
    out.update(_tools(body))
    fmt = _format(body)
    if fmt is not None:
        out["response_format"] = fmt
    if body.get("max_output_tokens") is not None:
        n = body["max_output_tokens"]
        if isinstance(n, int) and not isinstance(n, bool) and n < 1:  # (chat's 0 scores a prompt: no echo here)
            raise bad(f"'max_output_tokens' must be at least 1, not {n}", "max_output_tokens")
        out["max_tokens"] = n
    effort = body.get("reasoning")
    if effort is not None:
        level = effort.get("effort") if isinstance(effort, dict) else "?"
        if level is not None and (not isinstance(level, str) or level not in EFFORT):
            raise bad("'reasoning' must be an object like {'effort': 'low' | 'medium' | 'high' | 'none'}", "reasoning")
        if level is not None and "reasoning_effort" not in out:
            out["reasoning_effort"] = EFFORT[level]
    if "message.output_text.logprobs" in (body.get("include") or []):  # and `top_logprobs` alternatives each
        out.update(logprobs=True, top_logprobs=body.get("top_logprobs") or 0)
    out["stream"] = protocol._flag(body, "stream")
    opts = body.get("stream_options")  # OpenAI's one option, `include_obfuscation`, pads events: none here
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_obfuscation", False), bool):
            raise bad("'stream_options' must be an object like {'include_obfuscation': false}", "stream_options")
        if not out["stream"]:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return out, items


class Output:
    """A response's output items as the reply's pieces arrive, and the stream events that announce them."""

    def __init__(self, spaces: dict[str, str] | None = None):
        self.spaces = spaces or {}  # a namespaced function -> its namespace (`namespaces`)
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written
        self.calls: dict[int, dict] = {}  # tool-call index -> its item
        self.pending: list[dict] = []  # logprobs of tokens whose text is held back (a tag's possible start)

    def add(self, piece: Piece, logprobs: list[dict] = ()) -> list[dict]:
        """Events for one piece: items opened and closed, text, reasoning and argument deltas; `logprobs`, its
        tokens' (when asked for), go with the answer's text (with those held back before it; a piece of thinking
        or tool calls alone drops them)."""
        ev = []
        self.pending += logprobs
        if piece.reasoning:
            ev += self._start("reasoning")
            self.open["content"][0]["text"] += piece.reasoning
            ev.append(self._at("response.reasoning_text.delta", content_index=0, delta=piece.reasoning))
        if piece.text:
            ev += self._start("message")
            part, lps, self.pending = self.open["content"][0], self.pending, []
            part["text"] += piece.text
            part["logprobs"].extend(lps)
            ev.append(self._at("response.output_text.delta", content_index=0, delta=piece.text, logprobs=lps))
        elif piece.reasoning or piece.calls:
            self.pending = []
        if piece.finish is not None and self.pending and self.open is not None and self.open["type"] == "message":
            self.open["content"][0]["logprobs"].extend(self.pending)  # the last tokens (an end of turn) have no text
            self.pending = []
        for d in piece.calls:
            custom = d.get("type") == "custom"  # (sent whole: its input at once)
            if "id" in d:
                ev += self._open_call(d, custom)
            if custom:
                self.open["input"] = d["custom"]["input"]
                ev.append(self._at("response.custom_tool_call_input.delta", delta=d["custom"]["input"]))
                continue
            args = d["function"].get("arguments", "")
            item = self.calls[d["index"]]
            if args:
                item["arguments"] += args
                if item is self.open:
                    ev.append(self._at("response.function_call_arguments.delta", delta=args))
        return ev

    def _open_call(self, d: dict, custom: bool) -> list[dict]:
        """Events that close the open item and open the item of the call whose first delta is `d`."""
        ev = self.close()
        kind, prefix, body = ("custom_tool_call", "ctc", "input") if custom else ("function_call", "fc", "arguments")
        name = d["custom" if custom else "function"]["name"]
        self.open = {"id": new_id(prefix), "type": kind, "call_id": d["id"], "name": name,
                     **({"namespace": self.spaces[name]} if name in self.spaces else {}), body: "",
                     "status": "in_progress"}
        self.calls[d["index"]] = self.open
        return ev + self._added()

    def finish(self, incomplete: bool = False) -> list[dict]:
        """Close the last item (an empty message when the reply had nothing), `incomplete` where the token budget
        cut it."""
        status = "incomplete" if incomplete else "completed"
        ev = self.close(status)
        if not self.items:
            ev += self._start("message") + self.close(status)
        return ev

    def _at(self, kind: str, **fields) -> dict:
        return {"type": kind, "item_id": self.open["id"], "output_index": len(self.items) - 1, **fields}

    def _added(self) -> list[dict]:
        self.items.append(self.open)
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": json.loads(json.dumps(self.open))}]

    def _start(self, kind: str) -> list[dict]:
        if self.open is not None and self.open["type"] == kind:
            return []
        ev = self.close()
        if kind == "reasoning":
            head = {"id": new_id("rs"), "type": "reasoning", "summary": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            head = {"id": new_id("msg"), "type": "message", "role": "assistant"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.open = {**head, "status": "in_progress", "content": [json.loads(json.dumps(part))]}  # its own lists
        ev += self._added()
        ev[-1]["item"]["content"] = []
        ev.append(self._at("response.content_part.added", content_index=0, part=part))
        return ev

    def close(self, status: str = "completed") -> list[dict]:
        """Events that finish the open item, with `status`."""
        item = self.open
        if item is None:
            return []
        item["status"] = status
        ev = []
        if item["type"] == "function_call":
            ev.append(self._at("response.function_call_arguments.done", arguments=item["arguments"],
                               name=item["name"]))
        elif item["type"] == "custom_tool_call":
            ev.append(self._at("response.custom_tool_call_input.done", input=item["input"]))
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {} if item["type"] == "reasoning" else {"logprobs": part["logprobs"]}
            ev.append(self._at(done, content_index=0, text=part["text"], **extra))
            ev.append(self._at("response.content_part.done", content_index=0, part=part))
        ev.append({"type": "response.output_item.done", "output_index": len(self.items) - 1,
                   "item": json.loads(json.dumps(item))})
        self.open = None
        return ev


class Stream:
    """One reply as a response object and its event stream (`Server.sse`'s face); the result is stored at the end
    when `items` (the conversation before it) are given, and its input and output items added to conversation
    `conv[0]` when `conv` (that id and this input's items) is."""

    def __init__(self, api: "Responses", shell: dict, job, call, items: list[dict] | None,
                 conv: tuple[str, list[dict]] | None = None):
        self.api, self.shell, self.job, self.call, self.items, self.conv = api, shell, job, call, items, conv
        self.out, self.seq, self.result = Output(namespaces(shell)), 0, None
        self.thinking: bool | None = None  # with logprobs: in the thinking block still (None: no token seen yet)

    def encode(self, ev: dict) -> bytes:
        """An event framed for SSE, numbered."""
        self.seq += 1
        return sse_event({**ev, "sequence_number": self.seq - 1})

    def opening(self) -> list[dict]:
        """The events before the first piece."""
        return [{"type": "response.created", "response": self.shell},
                {"type": "response.in_progress", "response": self.shell}]

    def ping(self) -> bytes:
        """A keep-alive while the reply is quiet (`Server.sse`): `response.in_progress` again, an event, since
        Codex's idle timer, like other clients', does not count SSE comments."""
        return self.encode({"type": "response.in_progress", "response": self.shell})

    def add(self, piece: Piece) -> list[dict]:
        """The events of one piece (with logprobs, those of the answer's tokens: after the thinking block's close,
        as `Responses.create` takes them from a whole reply)."""
        k, entries = self.job.logprobs, piece.entries
        if k is None:
            return self.out.add(piece)
        close = self.api.server.think_ids[1] if self.api.server.think_ids else None
        if self.thinking is None:  # the first piece: does the reply open with a block?
            t = self.job.thinking
            self.thinking = t is not None and t.form != "harmony" and close is not None and (
                t.opened or bool(entries) and entries[0][0] == self.api.server.think_ids[0])
        if self.thinking:
            ids = [e[0] for e in entries]
            if close in ids:
                entries, self.thinking = entries[ids.index(close) + 1:], False
            else:
                entries = []
        return self.out.add(piece, chat_logprobs(self.api.server.vocab, entries, k)["content"])

    def closing(self) -> list[dict]:
        """The last item's end and the finished response (stored now)."""
        ev = self.out.finish(self.call.reqs[0].choices[0].finish_reason == "length")
        self.result = self.api.finished(self.shell, self.out, self.job, self.call.reqs[0])
        if self.items is not None:
            self.api.server.store.put(self.result, self.items + self.out.items)
        if self.conv is not None:  # (a conversation deleted meanwhile takes nothing)
            self.api.server.store.add_items(self.conv[0], self.conv[1] + self.out.items)
        kind = "response.incomplete" if self.result["status"] == "incomplete" else "response.completed"
        return ev + [{"type": kind, "response": self.result}]

    def failed(self, e: ApiError) -> list[dict]:
        """An error event and the failed response."""
        return [{"type": "error", "code": e.code, "message": e.message, "param": e.param},
                {"type": "response.failed", "response": {**self.shell, "status": "failed", "output": self.out.items,
                                                         "error": {"code": e.code or "server_error",
                                                                   "message": e.message}}}]


class Responses:
    """The Responses routes of one `Server`."""

    def __init__(self, server):
        self.server = server
        self.running: dict[str, Background] = {}  # background responses not ended yet, by id
        self.writing: set[str] = set()  # conversations a response is adding to now (one at a time, as OpenAI's)

    def history(self, body: dict) -> tuple[list[dict], str | None, str | None]:
        """`(the items before this input, previous_response_id, conversation id)`: a stored response's
        conversation, or a conversation's items (404 where neither is stored; 400 where both are named, or where
        they are more than one request may carry)."""
        prev, conv = body.get("previous_response_id"), _conversation_id(body)
        if conv is not None:
            if prev is not None:
                raise bad("'previous_response_id' and 'conversation' cannot both be given", "conversation")
            if self.server.store.conversation(conv) is None:
                raise ApiError(404, f"no conversation with id {conv!r}", "conversation", code="not_found")
            self._carried(self.server.store.items_size(conv), f"conversation {conv!r}", "conversation")
            found = self.server.store.items(conv)
            return (items_of(found, kept=True) if found else []), None, conv
        if prev is None:
            return [], None, None
        if not isinstance(prev, str):
            raise bad("'previous_response_id' must be a string", "previous_response_id")
        if prev in self.running:
            raise bad(f"background response {prev!r} has not ended yet: continue it once it has",
                      "previous_response_id")
        size = self.server.store.size(prev)
        if size is not None:
            self._carried(size, f"the conversation stored under {prev!r}", "previous_response_id")
        found = None if size is None else self.server.store.get(prev)
        if found is None:  # never stored, or deleted since size() looked
            raise ApiError(404, f"no stored response with id {prev!r}", "previous_response_id",
                           code="previous_response_not_found")
        return (items_of(found[1], kept=True) if found[1] else []), prev, None

    def referenced(self, body: dict) -> dict:
        """`body` with each `item_reference` of its `input` replaced by the stored item it names (a stored
        response's output item, or a conversation's item: what the Vercel AI SDK sends for earlier turns); 404 for
        an id none holds."""
        value = body.get("input")
        if not isinstance(value, list) or not any(map(_reference, value)):
            return body
        out, size = [], 0
        for i, it in enumerate(value):
            if _reference(it):
                found = self.server.store.item(it["id"]) if isinstance(it.get("id"), str) else None
                if found is None:
                    raise ApiError(404, f"input[{i}]: no stored item with id {it.get('id')!r}", "input",
                                   code="not_found")
                size += len(json.dumps(found))
                self._carried(size, "the items 'input' references", "input")  # each may be large, and named often
                it = {**found, STORED: True}
            out.append(it)
        return {**body, "input": out}

    def _carried(self, size: int, what: str, param: str) -> None:
        """A 400 where stored items are more than one request may carry (a chain cannot grow on past it)."""
        if size > self.server.max_body:
            raise bad(f"{what} holds {size} characters of items, past the {self.server.max_body} bytes a request "
                      "may carry (--max-body-mb); start a new conversation with the items it needs", param)

    def _shell(self, body: dict, rid: str, created: float, prev: str | None, model: str, conv: str | None) -> dict:
        """The response object before its output: the settings it echoes back (`model`: the served model's name, or
        the LoRA adapter's; `conv`: the conversation it adds to)."""
        effort = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        return {"id": rid, "object": "response", "created_at": created, "status": "in_progress", "error": None,
                "incomplete_details": None, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
                "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": prev,
                "reasoning": {"effort": effort.get("effort"), "summary": effort.get("summary")},
                "store": body.get("store", True) is not False, "temperature": body.get("temperature"),
                "text": body.get("text") or {"format": {"type": "text"}},
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
                "top_p": body.get("top_p"), "top_logprobs": body.get("top_logprobs"),
                "truncation": "disabled", "usage": None, "user": body.get("user"),
                "metadata": body.get("metadata") or {}, "background": bool(body.get("background")),
                **({"conversation": {"id": conv}} if conv is not None else {})}

    def usage(self, job, req) -> dict:
        """A finished reply's usage in the Responses API's shape (its one choice's tokens)."""
        choice = req.choices[0]
        prompt, made = len(req.prompt_ids), len(choice.token_ids)
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": req.cached_tokens},
                "output_tokens": made,
                "output_tokens_details": {"reasoning_tokens": self.server.reasoning_tokens(job, choice)},
                "total_tokens": prompt + made}

    def finished(self, shell: dict, out: Output, job, req) -> dict:
        """The response once the reply has ended."""
        incomplete = req.choices[0].finish_reason == "length"
        return {**shell, "status": "incomplete" if incomplete else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "output": out.items, "usage": self.usage(job, req), "completed_at": time.time()}

    async def parse(self, chat: dict) -> protocol.Job:
        """`Server.parse` of a chat body made from a Responses body, its errors in the Responses API's names."""
        try:
            return await self.server.parse(chat, "chat")
        except ApiError as e:
            raise e.renamed(PARAMS) from None

    def admit(self, job: protocol.Job, call) -> Any:
        """`Server.admit`'s events for a parsed Responses job, its errors (a prompt past the context) in the
        Responses API's names ('input')."""
        try:
            return self.server.admit(job, call, "resp_")[1]
        except ApiError as e:
            raise e.renamed(PARAMS) from None

    async def _job(self, body: Any) -> tuple[protocol.Job, list[dict], list[dict], str | None, str | None]:
        """A Responses body parsed as chat: `(job, the items before its input, all its items,
        previous_response_id, conversation id)`."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        history, prev, conv = await self.server.off_loop(self.history, body)  # reads up to --max-body-mb
        chat, items = chat_body(await self.server.off_loop(self.referenced, body), history)
        return await self.parse(chat), history, items, prev, conv

    async def input_tokens(self, request: web.Request) -> web.Response:
        """POST /v1/responses/input_tokens: the prompt's length in tokens that a response with this body would
        read (its history, instructions and tools as the template renders them)."""
        async def answer(body, call) -> web.Response:
            job = (await self._job(body))[0]
            return web.json_response({"object": "response.input_tokens", "input_tokens": len(job.prompts[0])})
        return await self.server.serve(request, answer, model=False)

    async def create(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/responses."""
        async def answer(body, call) -> web.StreamResponse:
            store = body.get("store", True) if isinstance(body, dict) else True
            if not isinstance(store, bool):
                raise bad("'store' must be a boolean", "store")
            conv = _conversation_id(body) if isinstance(body, dict) else None
            if conv is not None and conv in self.writing:  # (held from before its items are read)
                raise ApiError(400, "Another process is currently operating on this conversation. Please retry in "
                               "a few seconds.", "conversation", code="conversation_locked")
            if conv is not None:
                self.writing.add(conv)
            handed = False  # to a background response, which lets go of the conversation as it ends
            try:
                job, history, items, prev, conv = await self._job(body)
                items = identified(items) if store or conv is not None else items
                events = self.admit(job, call)
                turn = Turn(job)
                shell = self._shell(body, call.rid, time.time(), prev, self.server.served(call), conv)
                face = Stream(self, shell, job, call, items if store else None,
                              None if conv is None else (conv, items[len(history):]))
                if shell["background"]:
                    handed = True
                    return await self._background(request, face, job.stream, events, turn)
                return await self._reply(face, request, events, turn)
            finally:
                if not handed:
                    self.writing.discard(conv)
        return await self.server.serve(request, answer)

    async def _reply(self, face: Stream, request: web.Request, events, turn: Turn) -> web.StreamResponse:
        """A response's reply, streamed or whole."""
        job, call = face.job, face.call
        if job.stream:
            return await self.server.sse(request, call, events, turn, face)
        await self.server.collect(events, call)
        choice = call.reqs[0].choices[0]
        piece = turn.feed(choice.text, choice.finish_reason)
        harmony = job.thinking is not None and job.thinking.form == "harmony"  # (else `Stream.add` finds the close)
        piece.entries = choice.logprobs[self.server.reasoning_tokens(job, choice) if harmony else 0:]
        face.add(piece)
        face.closing()
        return web.json_response(face.result)

    async def _background(self, request: web.Request, face: Stream, stream: bool, events, turn: Turn):
        """Start a background response: its queued response, or its event stream followed."""
        bg = Background(face, stream)
        bg.publish([{"type": "response.created", "response": bg.response()},
                    {"type": "response.queued", "response": bg.response()}])
        face.call.detached = True
        self.running[face.shell["id"]] = bg
        bg.task = self.server.detach(self._run(bg, events, turn))
        await asyncio.sleep(0)  # the task holds the events now: cancelling it from here on aborts them
        if stream:
            return await self._follow(request, face.shell["id"], bg.follow(-1))
        return web.json_response(bg.response())

    async def _run(self, bg: Background, events, turn: Turn) -> None:
        """A background response's reply, its events kept in `bg`; stored `queued` first (so a restart finds it),
        it ends stored and accounted as completed, incomplete, failed (an engine error, a grammar's failure, a
        drain) or cancelled."""
        face, call, status = bg.face, bg.face.call, 200
        try:
            async with contextlib.aclosing(events) as events:
                self.server.store.put(bg.response(), face.items)
                async for batch in events:
                    out = []
                    if bg.status == "queued":  # its first tokens: it holds a slot
                        bg.status = "in_progress"
                        out.append({"type": "response.in_progress", "response": bg.response()})
                    more, error = self.server.pieces(batch, call, turn, face)
                    bg.publish(out + more)
                    if error is not None:
                        raise error
            bg.publish(face.closing())  # stored as it ends
            bg.end(face.result)
        except ApiError as e:
            status = e.status
            self._ended(bg, face.failed(e))
        except asyncio.CancelledError:  # cancelled by `cancel`, or cut by a shutdown
            status = 499 if bg.cancelled else 503
            error = None if bg.cancelled else {"code": "server_error", "message": "the server shut down before "
                                                                                   "this background response ended"}
            result = {**bg.response(), "status": "cancelled" if bg.cancelled else "failed", "error": error}
            self._ended(bg, [{"type": "response.failed", "response": result}] if error else [], result)
        except Exception:  # noqa: BLE001  (logged; the response ends failed rather than stay in progress)
            log.exception("unexpected error in background response %s", call.rid)
            status = 500
            self._ended(bg, face.failed(ApiError(500, "internal server error", type_="server_error",
                                                 code="internal_error")))
        finally:
            del self.running[face.shell["id"]]
            self.writing.discard(face.conv[0] if face.conv else None)
            self.server.account("/v1/responses", status, call.rid, call.reqs, call.took)
            if bg.stream:
                self._keep(self.server.store.put_events, face.shell["id"], bg.events)

    def _ended(self, bg: Background, events: list[dict], result: dict | None = None) -> None:
        """End `bg` with `events` (the last one's response, or `result`), stored with the output so far."""
        bg.publish(events)
        result = result or events[-1]["response"]
        bg.end(result)
        self._keep(self.server.store.put, result, bg.face.items + bg.face.out.items)

    @staticmethod
    def _keep(put, *args) -> None:
        """A store write at a background response's end: one that fails is logged (the response has ended)."""
        try:
            put(*args)
        except Exception:  # noqa: BLE001  (a full disk, a locked file)
            log.exception("could not store background response %s", args[0] if isinstance(args[0], str)
                          else args[0]["id"])

    async def _follow(self, request: web.Request, rid: str, events) -> web.StreamResponse:
        """Stream framed events (background response `rid`'s, as they come) to the client; its going away, or not
        reading, ends this stream only (`Server.streaming`)."""
        from server.app import Call  # (server.app imports this module)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        async with self.server.streaming(request, resp, Call(rid=rid), None):
            await resp.prepare(request)
            async for data in events:
                await self.server.write(resp, data)
        return resp

    def _stored(self, request: web.Request) -> tuple[dict, list[dict]]:
        found = self.server.store.get(request.match_info["id"])
        if found is None:
            raise ApiError(404, f"no stored response with id {request.match_info['id']!r}", code="not_found")
        return found

    def _current(self, request: web.Request) -> dict:
        """A response as it stands: a background one running, or as stored."""
        bg = self.running.get(request.match_info["id"])
        return bg.response() if bg is not None else stored_status(self._stored(request)[0])

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/responses/{id}: a stored response, or a background one as it stands; with `stream=true`, a
        streamed background response's events after `starting_after` (a sequence number), to its end."""
        if request.query.get("stream", "false").lower() not in ("true", "1"):
            return web.json_response(self._current(request))
        after = request.query.get("starting_after", "-1")
        if not re.fullmatch(r"-1|\d{1,9}", after):
            raise bad("'starting_after' must be an event's sequence number (an integer from 0)", "starting_after")
        rid, after = request.match_info["id"], int(after)
        if (bg := self.running.get(rid)) is not None:
            if not bg.stream:
                raise bad(f"response {rid!r} was not created with 'stream': true; poll it without 'stream'", "stream")
            return await self._follow(request, rid, bg.follow(after))
        self._stored(request)
        kept = self.server.store.events(rid)
        if kept is None:
            raise bad(f"response {rid!r} has no stream to join: only a background response created with 'stream': "
                      "true has one", "stream")

        async def replay():
            yield b"".join(kept[after + 1:])
        return await self._follow(request, rid, replay())

    async def cancel(self, request: web.Request) -> web.Response:
        """POST /v1/responses/{id}/cancel: end a background response as `cancelled` (what it wrote so far kept);
        one that has ended is returned as it is (cancelling is idempotent); a synchronous one is a 400."""
        bg = self.running.get(request.match_info["id"])
        if bg is None:
            response = self._current(request)
            if not response.get("background"):
                raise bad("Cannot cancel a synchronous response: only a background response can be cancelled")
            return web.json_response(response)
        await self._stop(bg)
        return web.json_response(bg.response())

    @staticmethod
    async def _stop(bg: Background) -> None:
        """Cancel a running background response and wait for it to end (stored `cancelled`)."""
        bg.cancelled = True
        bg.task.cancel()
        await asyncio.wait([bg.task])

    async def input_items(self, request: web.Request) -> web.Response:
        """GET /v1/responses/{id}/input_items: the conversation items that led to a stored response, `limit` (1 to
        100, 20) at a time after the id `after` names, newest first unless `order` is "asc" (OpenAI's paging)."""
        response, items = self._stored(request)
        inputs = items[:len(items) - len(response["output"])]
        data = [{"id": it.get("id") or f"item_{k}", **it} for k, it in enumerate(inputs)]
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad("'order' must be 'asc' or 'desc'", "order")
        listed = [types.SimpleNamespace(id=d["id"], item=d) for d in (data[::-1] if order == "desc" else data)]
        return web.json_response({"object": "list", **page(listed, request, 20, 100, lambda x: x.item)})

    async def delete(self, request: web.Request) -> web.Response:
        """DELETE /v1/responses/{id} (a background response still running is cancelled first)."""
        rid = request.match_info["id"]
        if (bg := self.running.get(rid)) is not None:
            await self._stop(bg)
        if not self.server.store.delete(rid):
            raise ApiError(404, f"no stored response with id {rid!r}", code="not_found")
        return web.json_response({"id": rid, "object": "response", "deleted": True})
