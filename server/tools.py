"""OpenAI tools: validate `tools` / `tool_choice` (and the legacy `functions` / `function_call`), put the tools into
the prompt, build the grammar `required` or a named function imposes, and parse tool calls out of generated text.

Formats: a chat template that knows tools (Qwen2.5's, say) gets them as `tools=` and its model answers with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; otherwise a system-prompt fallback asks for a JSON
array of `{"name", "arguments"}` objects (`FALLBACK`). Both are parsed; plain text is left alone. Under `required` or
a named function the output is constrained to that JSON (an array of calls when parallel calls are allowed), so the
arguments always validate against the function's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

from engine.grammar import schema_grammar
from engine.params import InvalidRequest

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PARALLEL = 8
MAX_TOOLS = 128  # OpenAI's limit
FALLBACK = ("You can call these functions (JSON schemas of their parameters):\n{tools}\n"
            "To call functions, reply with only a JSON array of calls, each "
            '{{"name": <function name>, "arguments": <object>}}; otherwise reply normally.')
TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclasses.dataclass
class Tools:
    """A request's functions and what it asks of them."""

    functions: list[dict]  # {"name", "description", "parameters"}
    choice: str  # "none", "auto", "required", or a function's name
    parallel: bool = True

    @property
    def forced(self) -> bool:
        """Whether a call is forced (`required` or a named function), so a grammar constrains the output."""
        return self.choice not in ("none", "auto")

    def grammar(self) -> str | None:
        """The grammar `required` or a named function imposes (None: free output)."""
        if not self.forced:
            return None
        named = [f for f in self.functions if f["name"] == self.choice]
        one = _call_schema(named[0]) if named else {"anyOf": [_call_schema(f) for f in self.functions]}
        if named or not self.parallel:
            return schema_grammar(one)
        return schema_grammar({"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL, "items": one})


def _call_schema(f: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}}


def parse(body: dict, bad) -> Tools | None:
    """The request's tools, validated (`bad(message, param)` makes the 400); None when it has none."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None and body.get("functions") is not None:  # the legacy shape
        funcs = body["functions"]
        if not isinstance(funcs, list):
            raise bad("'functions' must be a list of function objects", "functions")
        tools = [{"type": "function", "function": f} for f in funcs]
        fc = body.get("function_call")
        choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
    if tools is None:
        if choice is not None and choice != "none":
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad("'tools' must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    if len(tools) > MAX_TOOLS:  # each new schema is a round trip to the grammar sandbox
        raise bad(f"'tools' takes at most {MAX_TOOLS} functions, got {len(tools)}", "tools")
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not NAME.match(f["name"]):
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': <1-64 letters, digits, _ or "
                      f"->, ...}}}}", "tools")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise bad(f"tools[{i}].function.description must be a string", "tools")
        functions.append({"name": f["name"], "description": desc, "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad("tool function names must be unique", "tools")
    if choice is None:
        choice = "auto"
    elif choice == "any":
        choice = "required"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise bad(f"tool_choice names a function that is not among the tools: {name!r}", "tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise bad("'tool_choice' must be 'none', 'auto', 'required', or {'type': 'function', 'function': "
                  "{'name': ...}}", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return Tools(functions, choice, parallel)


def check(tools: Tools, grammars, bad) -> None:
    """400 naming the first function whose `parameters` is not a JSON schema (llguidance's check against the
    tokenizer, in its sandbox). Under `auto` or `none` leniently: keywords a forced call's grammar could not enforce
    (`uniqueItems`, `not`, ...; common in MCP tools) are fine while nothing constrains the call."""
    for i, f in enumerate(tools.functions):
        try:
            grammars.check(schema_grammar(f["parameters"], not tools.forced), f"tools[{i}].function.parameters")
        except InvalidRequest as e:
            raise bad(str(e), "tools") from None


def template_knows_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` argument."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render(messages: list[dict], tools: Tools | None, tokenizer) -> tuple[list[dict], dict]:
    """Messages and extra template arguments for a request with tools: the template's own tool support, or the
    system-prompt fallback; assistant tool calls and tool results become text where the template has no place for
    them."""
    if tools is None or tools.choice == "none":
        return [_plain(m) for m in messages], {}
    if template_knows_tools(tokenizer):
        specs = [{"type": "function", "function": f} for f in tools.functions]
        return [_native(m) for m in messages], {"tools": specs}
    note = FALLBACK.format(tools=json.dumps(tools.functions, indent=1))
    out = [_plain(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + note}
    else:
        out.insert(0, {"role": "system", "content": note})
    return out, {}


def _calls_of(m: dict) -> list[dict]:
    calls = []
    for c in m.get("tool_calls") or []:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        calls.append({"name": fn.get("name"), "arguments": args})
    return calls


def _plain(m: dict) -> dict:
    """A message as plain role + content (tool calls as their JSON, tool results as a user turn)."""
    if m["role"] == "tool":
        return {"role": "user", "content": f"Result of tool call {m.get('tool_call_id', '')}: {m['content']}"}
    calls = _calls_of(m)
    if calls:
        return {"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + json.dumps(calls)}
    return {"role": m["role"], "content": m["content"]}


def _native(m: dict) -> dict:
    """A message for a template that knows tools (arguments as objects, as such templates expect)."""
    out = {"role": m["role"], "content": m["content"]}
    calls = _calls_of(m)
    if calls:
        out["tool_calls"] = [{"type": "function", "function": c} for c in calls]
    if m["role"] == "tool" and m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    return out


_DECODER = json.JSONDecoder()
OPEN = "<tool_call>"


@dataclasses.dataclass
class Partial:
    """A tool call as far as the text shows it: its name once complete, the raw text of its arguments so far."""

    name: str | None = None
    arguments: str | None = None  # raw JSON text of the value, possibly incomplete
    done: bool = False  # the call's object is closed


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _value_end(s: str, i: int) -> int | None:
    """Index just past the JSON value starting at `s[i]`, or None if the text ends inside it."""
    if i >= len(s):
        return None
    if s[i] == '"':
        try:
            return _DECODER.raw_decode(s, i)[1]
        except ValueError:
            return None
    if s[i] not in "{[":  # a number or literal ends at a delimiter
        return next((j for j in range(i, len(s)) if s[j] in ",}] \t\r\n"), None)
    depth, in_str, esc = 0, False, False
    for j in range(i, len(s)):
        c = s[j]
        if in_str:
            esc, in_str = (False, True) if esc else (c == "\\", c != '"')
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _call(s: str, i: int) -> tuple[Partial, int | None]:
    """The call object starting at `s[i] == "{"`, and the index past it (None while incomplete or malformed)."""
    p, i = Partial(), _skip(s, i + 1)
    while i < len(s):
        if s[i] == "}":
            p.done = True
            return p, i + 1
        if s[i] == ",":
            i = _skip(s, i + 1)
            continue
        try:
            key, j = _DECODER.raw_decode(s, i)
        except ValueError:
            return p, None
        j = _skip(s, j)
        if j >= len(s) or s[j] != ":":
            return p, None
        j = _skip(s, j + 1)
        end = _value_end(s, j)
        if key == "arguments":
            p.arguments = s[j:end] if end is not None else s[j:]
        elif key == "name" and end is not None:
            try:
                p.name = json.loads(s[j:end])
            except ValueError:
                return p, None
        if end is None or not isinstance(key, str):
            return p, None
        i = _skip(s, end)
    return p, None


def scan(text: str) -> tuple[int | None, list[Partial]]:
    """Where tool calls start in `text` and the calls so far: `<tool_call>` blocks, else a JSON call object or array
    of them from the first character. `(None, [])`: no calls (yet)."""
    if OPEN in text:
        first, calls = text.index(OPEN), []
        for block in text.split(OPEN)[1:]:
            i = _skip(block, 0)
            if i < len(block) and block[i] == "{":
                calls.append(_call(block, i)[0])
        return first, calls
    i = start = _skip(text, 0)
    if i >= len(text) or text[i] not in "[{":
        return None, []
    calls = []
    if text[i] == "{":
        calls.append(_call(text, i)[0])
    else:
        i = _skip(text, i + 1)
        while i < len(text) and text[i] == "{":
            p, end = _call(text, i)
            calls.append(p)
            if end is None:
                break
            i = _skip(text, end)
            i = _skip(text, i + 1) if i < len(text) and text[i] == "," else i
    return start, calls


def extract(text: str, tools: Tools) -> tuple[str | None, list[dict]]:
    """`(content, tool_calls)` from generated text: `<tool_call>` blocks, else the whole text as a JSON call or
    array of calls; calls naming an unknown function are not calls. Plain text gives `(text, [])`. Arguments are
    the model's own JSON text (what a stream sends piece by piece)."""
    names = {f["name"] for f in tools.functions}
    blocks = TAGGED.findall(text)
    try:
        whole = [json.loads(b) for b in blocks] if blocks else json.loads(text)
    except ValueError:
        return text, []
    found = whole if isinstance(whole, list) else [whole]
    start, parts = scan(text)
    if not found or len(parts) != len(found):
        return text, []
    calls = []
    for c, p in zip(found, parts):
        args = c.get("arguments", {}) if isinstance(c, dict) else None
        name = c.get("name") if isinstance(c, dict) else None
        if not (isinstance(name, str) and name in names and isinstance(args, (dict, str))):
            return text, []
        raw = args if isinstance(args, str) else (p.arguments.strip() if p.arguments else "{}")
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": c["name"], "arguments": raw}})
    return (text[:start].rstrip() or None) if blocks else None, calls


class CallStream:
    """One streamed choice's text as OpenAI deltas while it arrives: content as it comes (held while it may be the
    start of a call), each tool call's id and name once the name is complete, then its arguments piece by piece."""

    def __init__(self, tools: Tools):
        self.tools, self.names = tools, {f["name"] for f in tools.functions}
        self.whole = tools.choice != "auto"  # required / named: the text is nothing but calls
        self.text, self.sent = "", 0  # text so far, characters of content sent
        self.ids: list[str] = []  # per call whose header went out
        self.args: list[int] = []  # characters of its arguments sent

    def feed(self, piece: str, finish: str | None) -> tuple[str, list[dict], bool]:
        """`(content, tool-call deltas, whether the text holds calls)` for the next piece of text; `finish`: the
        choice ended with that reason (the last piece)."""
        self.text += piece
        text = self.text
        if finish is not None:
            content, calls = extract(text, self.tools) if finish in ("stop", "length") else (text, [])
            if not calls and self.ids:  # headers went out but the whole does not parse: end the calls as sent
                # (the non-streamed reply gives such text as content; a stream cannot take its deltas back)
                return "", self._known(text, final=True), True
            if not calls:
                return self._content(len(text)), [], False
            out = []
            for k, c in enumerate(calls):
                out += self._call(k, c["function"]["name"], c["function"]["arguments"])
            return self._content(len(content or "")), out, True
        start, parts = scan(text)
        if start is None:
            if not self.whole and text.lstrip()[:1] not in ("[", "{"):  # plain text: send all but a possible tag
                end = len(text.rstrip())
                hold = next((n for n in range(min(len(OPEN), end), 0, -1) if OPEN.startswith(text[end - n:end])), 0)
                return self._content(len(text[:end - hold].rstrip())), [], False
            return "", [], False
        out = self._known(text)
        return self._content(len(text[:start].rstrip())), out, bool(self.ids)

    def _known(self, text: str, final: bool = False) -> list[dict]:
        """Deltas for the calls `scan` reads in `text` so far, up to the first that names no known function
        (`final`: only those whose headers already went out)."""
        out = []
        for k, p in enumerate(scan(text)[1]):
            if not (isinstance(p.name, str) and p.name in self.names) or (final and k >= len(self.ids)):
                break
            raw = p.arguments if p.arguments is not None and p.arguments[:1] == "{" else ""
            out += self._call(k, p.name, raw)
        return out

    def _content(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    def _call(self, k: int, name: str, args: str) -> list[dict]:
        out = []
        if k >= len(self.ids):
            self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
            self.args.append(0)
            out.append({"index": k, "id": self.ids[k], "type": "function", "function": {"name": name, "arguments": ""}})
        if len(args) > self.args[k]:
            out.append({"index": k, "function": {"arguments": args[self.args[k]:]}})
            self.args[k] = len(args)
        return out
