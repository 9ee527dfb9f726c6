"""OpenAI tools: validate `tools` / `tool_choice` (and the legacy `functions` / `function_call`), put the tools into
the prompt, and build the grammar `required` or a named function imposes (`tool_calls` reads the calls back out).

A chat template that knows tools (Qwen's, DeepSeek V3.1's, Llama 3.1's) gets them as `tools=` and its model answers
in its own format; otherwise a system-prompt fallback asks for a JSON array of `{"name", "arguments"}` objects
(`FALLBACK`). Under `required` or a named function the output is constrained to that JSON (an array of calls when
parallel calls are allowed), so the arguments always validate against the function's parameters.

OpenAI's custom tools (`{"type": "custom", "custom": {"name", "description", "format"}}`: free text, or text in a
Lark or regex grammar) reach the template as functions of one string parameter, `input` (`custom_function`), whose
description holds the grammar; their calls come back as custom calls. A named custom tool's turn is its input alone,
shaped by its grammar through llguidance (the same Lark and regex engine as structured output): `Tools.raw`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from engine.grammar import gbnf_grammar, regex_grammar, schema_grammar
from engine.params import InvalidRequest

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PARALLEL = 8
MAX_TOOLS = 128  # OpenAI's limit
MISTRAL_CALLS = "[TOOL_CALLS]"
SPECIAL_MARKS = (MISTRAL_CALLS, "<|tool_calls_section_begin|>")  # (Kimi K2's)
MISTRAL_ID = 9  # the call id length Mistral's templates require (another id is renamed: `_cut`)
BAD_JSON = (ValueError, RecursionError)  # what reading JSON of a model or a client raises (the latter: nested too deep)
KEPT = ("reasoning_content", "name")  # message fields a template may read besides role, content and calls
FALLBACK = ("You can call these functions (JSON schemas of their parameters):\n{tools}\n"
            "To call functions, reply with only a JSON array of calls, each "
            '{{"name": <function name>, "arguments": <object>}}; otherwise reply normally.')


@dataclasses.dataclass
class Tools:
    """A request's functions and what it asks of them."""

    functions: list[dict]  # {"name", "description", "parameters"}
    choice: str  # "none", "auto", "required", or a function's name (`named`)
    parallel: bool = True
    named: bool = False  # `choice` is a function's name (one may be called "auto")

    @property
    def offered(self) -> bool:
        """Whether the model may call the tools (`tool_choice` is not "none")."""
        return self.named or self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether a call is forced (`required` or a named function), so a grammar constrains the output."""
        return self.named or self.choice == "required"

    @property
    def target(self) -> dict | None:
        """The tool `tool_choice` names, if it names one."""
        return next((f for f in self.functions if f["name"] == self.choice), None) if self.named else None

    @property
    def raw(self) -> dict | None:
        """The custom tool `tool_choice` names, if it does: the whole output is that tool's input."""
        return self.target if self.target is not None and self.target.get("custom") else None

    def custom(self) -> dict[str, dict]:
        """Each custom tool's name -> its input format."""
        return {f["name"]: f["custom"] for f in self.functions if f.get("custom")}

    def called(self) -> list[dict]:
        """The functions a forced call may call: the named one, or all under `required`."""
        return [self.target] if self.target is not None else self.functions

    def grammar(self) -> str | None:
        """The grammar `required` or a named function imposes (None: free output)."""
        if not self.forced:
            return None
        if self.raw is not None:
            return input_grammar(self.raw["custom"])
        named = self.target
        one = _call_schema(named) if named else {"anyOf": [_call_schema(f) for f in self.functions]}
        if named or not self.parallel:
            return schema_grammar(one)
        return schema_grammar({"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL, "items": one})


def input_grammar(fmt: dict) -> str | None:
    """The grammar of a custom tool's input (None: free text)."""
    if fmt["type"] == "text":
        return None
    return (regex_grammar if fmt["syntax"] == "regex" else gbnf_grammar)(fmt["definition"], "tools")


def custom_function(tool: dict, where: str, bad) -> dict:
    """A custom tool as the function the template shows (one string parameter, `input`), validated; its `custom`
    entry keeps the input's format (`{"type": "text"}`, or `{"type": "grammar", "syntax", "definition"}`)."""
    fmt = tool.get("format") or {"type": "text"}
    if isinstance(fmt, dict) and fmt.get("type") == "grammar" and isinstance(fmt.get("grammar"), dict):
        fmt = {"type": "grammar", **fmt["grammar"]}  # chat's shape; Responses' is flat
    if not (isinstance(fmt, dict) and (fmt.get("type") == "text" or fmt.get("type") == "grammar" and fmt.get(
            "syntax") in ("lark", "regex") and isinstance(fmt.get("definition"), str) and fmt["definition"].strip())):
        raise bad(f"{where}.format must be {{'type': 'text'}} or {{'type': 'grammar', 'grammar': {{'syntax': 'lark' | "
                  "'regex', 'definition': str}} (Responses: {'type': 'grammar', 'syntax', 'definition'})", "tools")
    fmt = {"type": "text"} if fmt["type"] == "text" else {k: fmt[k] for k in ("type", "syntax", "definition")}
    desc = tool.get("description") or ""
    if not isinstance(desc, str):
        raise bad(f"{where}.description must be a string", "tools")
    if fmt["type"] == "grammar":
        desc = (desc + "\n\n" if desc else "") + f"The input follows this {fmt['syntax']} grammar:\n{fmt['definition']}"
    string = {"type": "string", "description": "the tool's input, as free text" if fmt["type"] == "text" else
              f"text in the {fmt['syntax']} grammar above"}
    if fmt["type"] == "grammar" and fmt["syntax"] == "regex":  # (under `required`, the call's JSON holds it)
        string["pattern"] = fmt["definition"]
    return {"name": tool["name"], "description": desc, "custom": fmt,
            "parameters": {"type": "object", "properties": {"input": string}, "required": ["input"]}}


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
        kind = t.get("type") if isinstance(t, dict) else None
        f = t.get(kind) if kind in ("function", "custom") else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not NAME.match(f["name"]):
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': <1-64 letters, digits, _ or "
                      f"->, ...}}}} or {{'type': 'custom', 'custom': {{'name': ..., 'format': ...}}}}", "tools")
        if kind == "custom":
            functions.append(custom_function(f, f"tools[{i}].custom", bad))
            continue
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        desc = f.get("description") or ""  # (null: none, as OpenAI takes it)
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
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        functions, choice = _allowed(choice.get("allowed_tools"), functions, bad)
    elif isinstance(choice, dict) and choice.get("type", "function") in ("function", "custom"):
        kind = choice.get("type", "function")
        fn = choice.get(kind)
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise bad(f"tool_choice names a function that is not among the tools: {name!r}", "tool_choice")
        if bool(functions[names.index(name)].get("custom")) != (kind == "custom"):
            raise bad(f"tool_choice names {name!r} as a {kind} tool, which it is not", "tool_choice")
        return Tools(functions, name, _parallel(body, bad), named=True)
    elif choice not in ("none", "auto", "required"):
        raise bad("'tool_choice' must be 'none', 'auto', 'required', {'type': 'function', 'function': "
                  "{'name': ...}} or {'type': 'allowed_tools', 'allowed_tools': {'mode', 'tools'}}", "tool_choice")
    return Tools(functions, choice, _parallel(body, bad))


def _parallel(body: dict, bad) -> bool:
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return parallel


def _allowed(allowed, functions: list[dict], bad) -> tuple[list[dict], str]:
    """OpenAI's `allowed_tools` choice: `(the functions it names, its mode)`; `mode` "auto" lets the model call one
    of them or answer, "required" makes it call one. The others are left out of the prompt as well."""
    mode = allowed.get("mode") if isinstance(allowed, dict) else None
    picks = allowed.get("tools") if isinstance(allowed, dict) else None
    if mode not in ("auto", "required") or not isinstance(picks, list) or not picks:
        raise bad("'tool_choice' of type allowed_tools must be {'type': 'allowed_tools', 'allowed_tools': {'mode': "
                  "'auto' | 'required', 'tools': [{'type': 'function', 'function': {'name': ...}}, ...]}}",
                  "tool_choice")
    wanted = set()
    for p in picks:
        fn = p.get(p["type"]) if isinstance(p, dict) and p.get("type") in ("function", "custom") else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in [f["name"] for f in functions]:
            raise bad(f"tool_choice.allowed_tools names a function that is not among the tools: {name!r}",
                      "tool_choice")
        wanted.add(name)
    return [f for f in functions if f["name"] in wanted], mode


def check(tools: Tools, grammars, bad) -> None:
    """400 naming the first function whose `parameters` is not a JSON schema (llguidance's check against the
    tokenizer, in its sandbox). Leniently where nothing constrains the function's calls (`auto`, `none`, or another
    function named): keywords a forced call's grammar could not enforce (`uniqueItems`, `not`, ...; common in MCP
    tools) are fine there."""
    forced = [f["name"] for f in tools.called()] if tools.forced else []
    for i, f in enumerate(tools.functions):
        try:
            if f.get("custom"):  # (a named one's grammar is the request's, checked with it)
                if f["custom"]["type"] == "grammar" and f is not tools.raw:
                    grammars.check(input_grammar(f["custom"]), f"tools[{i}].custom.format")
            else:
                grammars.check(schema_grammar(f["parameters"], f["name"] not in forced),
                               f"tools[{i}].function.parameters")
        except InvalidRequest as e:
            raise bad(str(e), "tools") from None


def template_knows_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` argument."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def writes_special_marks(tokenizer) -> bool:
    """Whether the chat template writes call marks that are special tokens (Mistral's `[TOOL_CALLS]`, Kimi K2's
    `<|tool_calls_section_begin|>`): a reply to a request with tools is then detokenized with its special tokens,
    as vLLM's parsers for them ask."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return any(mark in template for mark in SPECIAL_MARKS)


def mistral_template(tokenizer) -> bool:
    """Whether the chat template writes Mistral's `[TOOL_CALLS]` (a special token its replies' calls start with;
    its templates take call ids of 9 characters)."""
    return MISTRAL_CALLS in (getattr(tokenizer, "chat_template", None) or "")


def render(messages: list[dict], tools: Tools | None, tokenizer) -> tuple[list[dict], dict]:
    """Messages and extra template arguments for a request with tools: the template's own tool support, or the
    system-prompt fallback; assistant tool calls and tool results become text where the template has no place for
    them."""
    if tools is None or not tools.offered:
        return [_plain(m) for m in messages], {}
    shown = [{k: v for k, v in f.items() if k != "custom"} for f in tools.functions]
    if template_knows_tools(tokenizer):
        specs = [{"type": "function", "function": f} for f in shown]
        cut = MISTRAL_ID if mistral_template(tokenizer) else None
        return [_native(m, cut) for m in messages], {"tools": specs}
    note = FALLBACK.format(tools=json.dumps(shown, indent=1))
    out = [_plain(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + note}
    else:
        out.insert(0, {"role": "system", "content": note})
    return out, {}


def _calls_of(m: dict) -> list[dict]:
    calls = []
    for c in m.get("tool_calls") or []:
        if isinstance(c, dict) and c.get("type") == "custom":  # as the template saw the custom tool: `input`
            calls.append({"name": c["custom"]["name"], "arguments": {"input": c["custom"]["input"]}})
            continue
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except BAD_JSON:  # not JSON, or nested past Python's limit: the template gets the text
            pass
        calls.append({"name": fn.get("name"), "arguments": args})
    return calls


def _kept(m: dict) -> dict:
    """What a message carries beside its role, content and calls: its earlier thinking, its author's name."""
    return {k: m[k] for k in KEPT if k in m}


def _plain(m: dict) -> dict:
    """A message as plain role + content (tool calls as their JSON, tool results as a user turn)."""
    if m["role"] == "tool":
        return {"role": "user", "content": f"Result of tool call {m.get('tool_call_id') or m.get('name', '')}: "
                                           f"{m['content']}"}
    calls = _calls_of(m)
    if calls:
        return {"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + json.dumps(calls),
                **_kept(m)}
    return {"role": m["role"], "content": m["content"], **_kept(m)}


def string_arguments(messages: list[dict]) -> list[dict] | None:
    """The messages with each tool call's arguments as JSON text, for templates that join them into the prompt as
    strings (DeepSeek's) where others write objects with `tojson` (Qwen's, Llama's); None if no call has object
    arguments."""
    if not any(isinstance(c["function"]["arguments"], dict) for m in messages for c in m.get("tool_calls", ())):
        return None
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]} if m.get("tool_calls") else m
            for m in messages]


def _native(m: dict, cut: int | None = None) -> dict:
    """A message for a template that knows tools (arguments as objects, as such templates expect; each call's id,
    and a tool result's, renamed to `cut` letters and digits where given)."""
    out = {"role": m["role"], "content": m["content"], **_kept(m)}
    calls = _calls_of(m)
    if calls:
        ids = [c.get("id") if isinstance(c, dict) else None for c in m["tool_calls"]]
        out["tool_calls"] = [{"id": _cut(i, cut), "type": "function", "function": f} for i, f in zip(ids, calls)]
    if m["role"] == "tool" and m.get("tool_call_id"):
        out["tool_call_id"] = _cut(m["tool_call_id"], cut)
    return out


def _cut(call_id, cut: int | None):
    """`call_id` as `cut` letters and digits (None: as it is): itself where it is so already, else the first `cut`
    hex digits of its SHA-1, so a call and the result answering it keep one name (vLLM keeps a longer id's last 9
    characters, which are not always letters and digits, and leaves a shorter one for the template to refuse)."""
    if not cut or not isinstance(call_id, str) or (len(call_id) == cut and call_id.isascii() and call_id.isalnum()):
        return call_id
    return hashlib.sha1(call_id.encode()).hexdigest()[:cut]
