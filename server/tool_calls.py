"""Tool calls read out of generated text, whole or as it streams, in the formats the served families write. Each is
known by its marker, so no flag names a parser (vLLM's `--tool-call-parser` picks one of these by hand):

- Hermes' `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen2.5, Qwen3, and the prompt of any
  template that renders `tools` this way);
- IBM Granite's JSON array of call objects after `<tool_call>` (3.1 on) or `<|tool_call|>` (3.0), with no closing
  mark;
- Qwen3-Coder's XML inside those blocks: `<tool_call><function=NAME><parameter=KEY>value</parameter>...</function>
  </tool_call>`, each value a string, or JSON where the function's schema types the parameter otherwise;
- GLM-4.5's and later GLM's keys and values inside them: `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>value
  </arg_value>...</tool_call>` (newlines between the parts or not), a value a string where the schema types the
  parameter so, else read as JSON or a Python literal, else a string (as vLLM's `glm45` reads them);
- Seed-OSS's `<seed:tool_call>` blocks, each holding Qwen3-Coder's XML;
- Kimi K2's `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{...}
  <|tool_call_end|>...<|tool_calls_section_end|>` (the call's id is the model's own, `functions.NAME:IDX`, as vLLM
  returns it: Kimi's template writes ids back as they are, and the model goes on counting them);
- MiniMax-M2's `<minimax:tool_call><invoke name="NAME"><parameter name="KEY">value</parameter>...</invoke>...
  </minimax:tool_call>` blocks, each value typed as Qwen3-Coder's are;
- DeepSeek's `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...
  <｜tool▁calls▁end｜>` (V3.1 and later), and V3's and R1's `function<｜tool▁sep｜>NAME` then the arguments in a
  ```json fence;
- Mistral's `[TOOL_CALLS]` (a special token, kept in the text where the chat template writes it:
  `server.protocol`): a JSON array of call objects after it (v0.3 to Small 3.1; another after each further mark), or,
  from its v11 tokenizer on (Small 3.2, Devstral, Magistral), `NAME[ARGS]{...}` after each (`[ARGS]` left out where
  special tokens are skipped, as vLLM's Mistral tokenizer skips it; a `[CALL_ID]ID` before it, as v13 writes: the
  call's id);
- a JSON call object or array of them as the whole text: the system-prompt fallback's, a forced call's grammar,
  Llama 3.x's `{"name": ..., "parameters": {...}}` (its `<|python_tag|>` is a special token, not text), Mistral's
  array where its `[TOOL_CALLS]` was skipped, and Phi-4-mini's, after its `functools` (text);
- OLMo 3's `<function_calls>` block of Python keyword calls, one a line (JSON's `null`, `true` and `false` read as
  Python's), read once the block closes;
- a Python list of keyword calls as the whole text, `[get_weather(city="Paris")]` (the pythonic format of Llama 3.2's
  and Llama 4's tool templates), read when the whole reply is one (a stream sends such calls at its end).

Text before the first call is content; calls that name no offered function, or arguments that are not a JSON object,
leave the whole text as content.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid

from server.reasoning import held
from server.tools import BAD_JSON, Tools

OPEN, CLOSE = "<tool_call>", "</tool_call>"
DS_OPEN, DS_CALL = "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>"
DS_SEP, DS_END, DS_CLOSE = "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"
FENCE = "```"
XML_FN, XML_FN_END, XML_PARAM, XML_PARAM_END = "<function=", "</function>", "<parameter=", "</parameter>"
GLM_KEY, GLM_KEY_END, GLM_VALUE, GLM_VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
MM_OPEN, MM_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"
SEED_OPEN, SEED_CLOSE = "<seed:tool_call>", "</seed:tool_call>"
OLMO_OPEN, OLMO_CLOSE = "<function_calls>", "</function_calls>"
KIMI_OPEN, KIMI_ONE = "<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"  # (some K2 checkpoints write one)
KIMI_CALL, KIMI_ARGS, KIMI_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
KIMI_ENDS = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
KIMI_ID = re.compile(r"(?:[A-Za-z0-9_-]+\.)?([A-Za-z0-9_-]+):\d+")  # functions.NAME:IDX
MM_INVOKE, MM_INVOKE_END, MM_PARAM = "<invoke name=", "</invoke>", "<parameter name="
MS_CALLS = "[TOOL_CALLS]"  # Mistral's
GRANITE = "<|tool_call|>"  # Granite 3.0's, before a JSON array (3.1 on write `<tool_call>` before it)
MS_HEAD = re.compile(r"\s*([A-Za-z0-9_-]+)(?:\s*\[CALL_ID\]\s*([A-Za-z0-9]*))?(?:\s*\[ARGS\])?\s*(?=\{)")  # v11's name
PHI = "functools"  # Phi-4-mini's word before its JSON array of calls
JSON_WORDS = {"null": None, "true": True, "false": False}  # as OLMo 3 writes values
MARKERS = (OPEN, DS_OPEN, MM_OPEN, MS_CALLS, SEED_OPEN, KIMI_OPEN, KIMI_ONE, OLMO_OPEN, GRANITE)
_DECODER = json.JSONDecoder()


@dataclasses.dataclass
class Partial:
    """A tool call as far as the text shows it: its name once complete, the raw text of its arguments so far."""

    name: str | None = None
    arguments: str | None = None  # raw JSON text of the value, possibly incomplete
    done: bool = False  # the call is closed as its format closes it
    id: str | None = None  # the call's id where the format writes one that the model reads back (Kimi's, Mistral v13's)


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
        except BAD_JSON:
            return None
    if s[i] not in "{[":  # a number or literal ends at a delimiter
        return next((j for j in range(i, len(s)) if s[j] in ",}] \t\r\n"), None)
    return _bracketed(s, i)[0]


def _bracketed(s: str, i: int, stop: int | None = None) -> tuple[int | None, bool]:
    """The JSON or Python value in brackets starting at `s[i]`, read up to `stop` (default: the end): the index just
    past it (None where it does not close before), and whether `s[stop]` lies inside one of its strings (JSON's
    "...", or Python's '...' too)."""
    depth, quote, esc = 0, "", False
    for j in range(i, len(s) if stop is None else stop):
        c = s[j]
        if quote:
            esc, quote = (False, quote) if esc else (c == "\\", "" if c == quote else quote)
        elif c in "\"'":
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1, False
    return None, bool(quote)


def _json_call(s: str, i: int) -> tuple[Partial, int | None]:
    """The call object starting at `s[i] == "{"` (its arguments under `arguments`, or Llama's `parameters`), and the
    index past it (None while incomplete or malformed)."""
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
        except BAD_JSON:
            return p, None
        j = _skip(s, j)
        if j >= len(s) or s[j] != ":":
            return p, None
        j = _skip(s, j + 1)
        end = _value_end(s, j)
        if key in ("arguments", "parameters"):
            p.arguments = s[j:end] if end is not None else s[j:]
        elif key == "name" and end is not None:
            try:
                p.name = json.loads(s[j:end])
            except BAD_JSON:
                return p, None
        if end is None or not isinstance(key, str):
            return p, None
        i = _skip(s, end)
    return p, None


def _xml_value(raw: str, schema) -> object:
    """A Qwen3-Coder parameter's value: its text less one newline each side, as a string unless the schema types
    it only otherwise (`null` where it allows null) and it reads as JSON."""
    raw = raw[1:] if raw.startswith("\n") else raw
    raw = raw[:-1] if raw.endswith("\n") else raw
    kinds = _types(schema)
    if not kinds or "string" in kinds:  # untyped parameters are text, as in vLLM's reading
        return None if raw == "null" and "null" in kinds else raw
    try:
        return json.loads(raw)
    except BAD_JSON:
        return raw


def _types(schema) -> set:
    """The JSON types a schema names, its `anyOf` / `oneOf` members' included."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    out = set(kind) if isinstance(kind, list) else ({kind} if isinstance(kind, str) else set())
    for key in ("anyOf", "oneOf"):
        for member in schema.get(key) or ():
            out |= _types(member)
    return out


def _properties(tools: Tools | None, name: str) -> dict:
    """The schemas of the parameters of the offered function `name` (none where it is not offered)."""
    params = next((f["parameters"] for f in tools.functions if f["name"] == name), {}) if tools else {}
    return params.get("properties", {}) if isinstance(params, dict) else {}


def _xml_call(block: str, i: int, tools: Tools | None) -> tuple[Partial, int | None]:
    """Qwen3-Coder's `<function=NAME>` call starting at `block[i]` and where it ends (None: not yet); its arguments
    appear once the function closes."""
    p, name_end = Partial(), block.find(">", i)
    if name_end < 0:
        return p, None
    p.name = block[i + len(XML_FN):name_end].strip()
    props = _properties(tools, p.name)
    args, j = {}, _skip(block, name_end + 1)
    while block.startswith(XML_PARAM, j):
        key_end, close = block.find(">", j), block.find(XML_PARAM_END, j)
        if key_end < 0 or close < 0 or close < key_end:
            return p, None
        key = block[j + len(XML_PARAM):key_end].strip()
        args[key] = _xml_value(block[key_end + 1:close], props.get(key))
        j = _skip(block, close + len(XML_PARAM_END))
    if not block.startswith(XML_FN_END, j):
        return p, None
    p.arguments, p.done = json.dumps(args, ensure_ascii=False), True
    return p, j + len(XML_FN_END)


def _invoke(block: str, i: int, tools: Tools | None) -> tuple[Partial, int | None]:
    """MiniMax-M2's `<invoke name="NAME">` call starting at `block[i]` and where it ends (None: not yet); its
    arguments appear once it closes."""
    p, name_end = Partial(), block.find(">", i)
    if name_end < 0:
        return p, None
    p.name = block[i + len(MM_INVOKE):name_end].strip().strip("\"'")
    props = _properties(tools, p.name)
    args, j = {}, _skip(block, name_end + 1)
    while block.startswith(MM_PARAM, j):
        key_end, close = block.find(">", j), block.find(XML_PARAM_END, j)
        if key_end < 0 or close < 0 or close < key_end:
            return p, None
        key = block[j + len(MM_PARAM):key_end].strip().strip("\"'")
        args[key] = _xml_value(block[key_end + 1:close], props.get(key))
        j = _skip(block, close + len(XML_PARAM_END))
    if not block.startswith(MM_INVOKE_END, j):
        return p, None
    p.arguments, p.done = json.dumps(args, ensure_ascii=False), True
    return p, j + len(MM_INVOKE_END)


def _glm_value(raw: str, schema) -> object:
    """A GLM parameter's value: its text where the schema types it a string, else JSON or a Python literal if it
    reads as one, else its text."""
    if "string" in _types(schema):
        return raw
    try:
        return json.loads(raw)
    except BAD_JSON:
        pass
    try:
        value = ast.literal_eval(raw.strip())
        json.dumps(value)  # a literal JSON can carry (not a set, bytes or a complex number)
        return value
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return raw


def _glm_call(block: str, i: int, tools: Tools | None) -> Partial:
    """GLM's `NAME<arg_key>...</arg_value>...` call starting at `block[i]` (after `<tool_call>`); its arguments appear
    once the block closes."""
    p = Partial()
    ends = [k for k in (block.find(GLM_KEY, i), block.find(CLOSE, i)) if k >= 0]
    if not ends:  # the name is still arriving
        return p
    p.name = block[i:min(ends)].strip()
    props = _properties(tools, p.name)
    args, j = {}, min(ends)
    while block.startswith(GLM_KEY, j):
        key_end = block.find(GLM_KEY_END, j)
        v = _skip(block, key_end + len(GLM_KEY_END)) if key_end >= 0 else -1
        value_end = block.find(GLM_VALUE_END, v) if v >= 0 and block.startswith(GLM_VALUE, v) else -1
        if value_end < 0:
            return p
        key = block[j + len(GLM_KEY):key_end].strip()
        args[key] = _glm_value(block[v + len(GLM_VALUE):value_end], props.get(key))
        j = _skip(block, value_end + len(GLM_VALUE_END))
    if block.startswith(CLOSE, j):
        p.arguments, p.done = json.dumps(args, ensure_ascii=False), True
    return p


def _json_then(s: str, marker: str) -> tuple[str, str | None]:
    """The JSON arguments at the start of `s` (as far as written), and the text after `marker` where only
    whitespace lies between them and it (None: not closed yet); a marker's text inside a JSON string is the
    string's."""
    i = _skip(s, 0)
    if i >= len(s):
        return "", None
    if s[i] != "{":  # not an object: up to the marker, for `extract` to refuse
        k = s.find(marker)
        return (s[i:k] if k >= 0 else s[i:]).strip(), s[k + len(marker):] if k >= 0 else None
    end = _value_end(s, i)
    if end is None:
        return s[i:], None
    after = s[end:].lstrip()
    return s[i:end], after[len(marker):] if after.startswith(marker) else None


def _in_order(s: str, mark: str, ends: tuple[str, ...], one) -> list[Partial]:
    """The calls in `s`, each after its `mark`, read one after another by `one` (a call and the text after its end,
    None while that is not there), so a mark inside a call's arguments is theirs (DeepSeek's, Kimi's); other text
    between them, or before one of `ends`, is no call (so no calls)."""
    calls, i = [], _skip(s, 0)
    while s.startswith(mark, i):
        p, rest = one(s[i + len(mark):])
        calls.append(p)
        if rest is None:
            return calls
        i = _skip(s, len(s) - len(rest))
    tail = s[i:]
    if tail and not tail.startswith(ends) and not any(m.startswith(tail) for m in (mark, *ends)):
        calls.append(Partial())
    return calls


def _deepseek_call(s: str) -> tuple[Partial, str | None]:
    """One DeepSeek call after its `<｜tool▁call▁begin｜>`: V3.1's `NAME<sep>{...}<end>` or V3's
    `function<sep>NAME\n```json\n{...}\n```<end>`; and the text after its end (None: not there yet)."""
    p, sep = Partial(), s.find(DS_SEP)
    if sep < 0:
        return p, None
    head, after = s[:sep].strip(), s[sep + len(DS_SEP):]
    if head != "function" or after.lstrip()[:1] == "{":
        p.name = head
        p.arguments, rest = _json_then(after, DS_END)
        p.done = rest is not None
        return p, rest
    line = after.find("\n")
    if line < 0:
        return p, None
    p.name, rest = after[:line].strip(), after[line + 1:].lstrip()
    if not rest.startswith(FENCE + "json"):
        return p, None
    p.arguments, tail = _json_then(rest[len(FENCE) + 4:], FENCE)
    tail = tail.lstrip() if tail is not None else ""
    p.done = tail.startswith(DS_END)
    return p, tail[len(DS_END):] if p.done else None


def _kimi_call(s: str) -> tuple[Partial, str | None]:
    """One Kimi K2 call after its `<|tool_call_begin|>`: `functions.NAME:IDX<|tool_call_argument_begin|>{...}
    <|tool_call_end|>`; and the text after its end (None: not there yet, or no call)."""
    k = s.find(KIMI_ARGS)
    head = KIMI_ID.fullmatch(s[:k].strip()) if k >= 0 else None
    if head is None:
        return Partial(), None
    args, rest = _json_then(s[k + len(KIMI_ARGS):], KIMI_END)
    return Partial(head.group(1), args, rest is not None, s[:k].strip()), rest


def _mistral_calls(s: str) -> list[Partial]:
    """v11 Mistral calls after the first `[TOOL_CALLS]`, each `NAME[ARGS]{...}`, the next after a `[TOOL_CALLS]`
    of its own: a name once its arguments' `{` follows, then the arguments (a call is done when its object closes
    with the next mark or the end after it; other text after it: not done, so no calls)."""
    calls, i = [], 0
    while (head := MS_HEAD.match(s, i)) is not None:
        j = head.end()
        end = _value_end(s, j)
        if end is None:
            return calls + [Partial(head.group(1), s[j:], id=head.group(2) or None)]
        k = _skip(s, end)
        calls.append(Partial(head.group(1), s[j:end], k == len(s) or s.startswith(MS_CALLS, k), head.group(2) or None))
        if not s.startswith(MS_CALLS, k):
            return calls
        i = k + len(MS_CALLS)
    return calls + [Partial()]  # no name yet, or text that is none


def _mistral_arrays(s: str, i: int) -> list[Partial]:
    """v0.3's calls: a JSON array (or object) of them at `s[i]`, and another after each `[TOOL_CALLS]` the model
    writes again after one; other text after a repeated mark is left out, as text after an array is."""
    calls = []
    while (end := _value_end(s, i)) is not None and s.startswith(MS_CALLS, k := _skip(s, end)):
        calls += _json_calls(s[:end], i)
        i = _skip(s, k + len(MS_CALLS))
        if s[i:i + 1] not in ("[", "{"):  # the next one not started yet, or text that is no call
            return calls
    return calls + _json_calls(s, i)


def _json_calls(text: str, i: int) -> list[Partial]:
    """The call object or array of call objects at `text[i]`. An array's element that is no call object, an array
    the text ends inside (cut off by `max_tokens`), or text after an object: an unnamed call, so no calls (as vLLM
    reads them: the text stays whole as content, where reading the first object would drop a second)."""
    if text[i] == "{":
        p, end = _json_call(text, i)
        return [p] if end is None or not text[end:].strip() else [p, Partial()]
    calls, i = [], _skip(text, i + 1)
    while i < len(text) and text[i] == "{":
        p, end = _json_call(text, i)
        calls.append(p)
        if end is None:
            break
        i = _skip(text, end)
        i = _skip(text, i + 1) if i < len(text) and text[i] == "," else i
    if i >= len(text) or text[i] != "]":  # not closed (yet), or an element that is no call object: no calls
        calls.append(Partial())
    return calls


def _each(block: str, i: int, mark: str, read, tools: Tools | None) -> tuple[list[Partial], int | None]:
    """The calls one after another from `block[i]`, each starting with `mark` and read by `read` (a call and the
    index past it, None while incomplete), and the index past the last (None: it is incomplete)."""
    calls, end = [], i
    while end is not None and block.startswith(mark, i):
        p, end = read(block, i, tools)
        calls.append(p)
        i = _skip(block, end) if end is not None else i
    return calls, i if end is not None else None


def _first_mark(text: str) -> tuple[int, str] | None:
    """Where the first format's marker is in `text`, and which (None: none, or only inside a string of the JSON or
    Python value the text starts with: a forced call's argument may hold any of them)."""
    found = [(text.index(m), m) for m in MARKERS if m in text]
    if not found:
        return None
    first, marker = min(found)
    i = _skip(text, 0)
    i = _skip(text, i + len(PHI)) if text.startswith(PHI, i) else i
    if i < first and text[i:i + 1] in ("[", "{") and _bracketed(text, i, first)[1]:
        return None
    return first, marker


def scan(text: str, tools: Tools | None = None) -> tuple[int | None, list[Partial]]:
    """Where tool calls start in `text` and the calls so far, in whichever format's marker comes first, else as a
    JSON call object or array of them from the first character. `(None, [])`: no calls (yet)."""
    found = _first_mark(text)
    if found:
        first, marker = found
        calls = []
        if marker in (OPEN, SEED_OPEN):  # Seed-OSS's blocks: Qwen3-Coder's XML
            for block in text[first:].split(marker)[1:]:
                i = _skip(block, 0)
                if block.startswith(XML_FN, i):  # one function or more (vLLM's qwen3_coder and seed_oss read all)
                    calls += _each(block, i, XML_FN, _xml_call, tools)[0]
                elif marker == SEED_OPEN:
                    calls += [Partial()] if block.strip() else []
                elif i < len(block) and block[i] == "{":
                    p, end = _json_call(block, i)
                    p.done = end is not None and block[end:].lstrip().startswith(CLOSE)
                    calls.append(p)
                elif i < len(block) and block[i] == "[":  # Granite 3.1's array after the mark, not closed
                    calls += _json_calls(block, i)
                elif i < len(block) and (block[i].isalpha() or block[i] == "_"):
                    calls.append(_glm_call(block, i, tools))
                else:  # nothing a call starts with: no call, unless the block is still empty
                    calls += [Partial()] if block.strip() else []
        elif marker == MM_OPEN:
            for block in text[first:].split(MM_OPEN)[1:]:
                found, end = _each(block, _skip(block, 0), MM_INVOKE, _invoke, tools)
                calls += found
                rest = block[end:].strip() if end is not None else ""
                if rest and not (rest.startswith(MM_CLOSE) or MM_CLOSE.startswith(rest) or MM_INVOKE.startswith(rest)):
                    calls.append(Partial())  # text in a block that is no call: no calls (after its end: as others)
        elif marker == OLMO_OPEN:  # the calls once the block closes (an unnamed call until then, or if unread)
            body, closed, _ = text[first + len(OLMO_OPEN):].partition(OLMO_CLOSE)
            calls = (_statements(body) if closed else None) or [Partial()]
        elif marker in (KIMI_OPEN, KIMI_ONE):
            calls = _in_order(text[first + len(marker):], KIMI_CALL, KIMI_ENDS, _kimi_call)
        elif marker in (MS_CALLS, GRANITE):
            after = text[first + len(marker):]
            i = _skip(after, 0)
            if after[i:i + 1] not in ("[", "{"):
                calls = _mistral_calls(after) if marker == MS_CALLS else [Partial()] if after.strip() else []
            elif marker == GRANITE:
                calls = _json_calls(after, i)
            else:
                calls = _mistral_arrays(after, i)
        else:
            calls = _in_order(text[first + len(DS_OPEN):], DS_CALL, (DS_CLOSE,), _deepseek_call)
        return first, calls
    i = start = _skip(text, 0)
    if text.startswith(PHI, i) and text[_skip(text, i + len(PHI)):][:1] == "[":
        i = _skip(text, i + len(PHI))
    if i >= len(text) or text[i] not in "[{":
        return None, []
    return start, _json_calls(text, i)


def _unprefixed(text: str) -> str:
    """The text without Phi-4-mini's `functools` before its array."""
    head = text.lstrip()
    return head[len(PHI):] if head.startswith(PHI) else text


def _marked(text: str) -> bool:
    return _first_mark(text) is not None


def _literal(node: ast.expr) -> object:
    """A call argument's value: a Python literal, JSON's `null` / `true` / `false` in it read as Python's."""
    if isinstance(node, ast.Name) and node.id in JSON_WORDS:
        return JSON_WORDS[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):  # a `**` spread
            raise ValueError("not a literal")
        return {ast.literal_eval(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def pythonic(text: str) -> list[Partial] | None:
    """The calls of a reply that is a Python list of keyword calls, `[get_weather(city="Paris"), ...]` (Llama 3.2's
    and Llama 4's pythonic format; read with `ast`, values as Python literals or JSON's `null`, `true` and `false`),
    else None."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return _keyword_calls(node.elts) if isinstance(node, ast.List) else None


def _statements(body: str) -> list[Partial] | None:
    """OLMo 3's block: Python statements, each a keyword call (a string may span lines); else its lines joined as
    a list, as vLLM's `olmo3` reads them (None: neither reads)."""
    try:
        nodes = ast.parse(body.strip(), mode="exec").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        return pythonic(f"[{', '.join(lines)}]")
    return _keyword_calls([n.value if isinstance(n, ast.Expr) else n for n in nodes])


def _keyword_calls(nodes: list) -> list[Partial] | None:
    """Each node a call of a plain name with keyword arguments of literal values, as calls (None: one is not)."""
    if not nodes:
        return None
    calls = []
    for c in nodes:
        if not (isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args
                and all(k.arg is not None for k in c.keywords)):
            return None
        try:
            raw = json.dumps({k.arg: _literal(k.value) for k in c.keywords}, ensure_ascii=False)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):  # not literals, or not JSON's
            return None
        calls.append(Partial(c.func.id, raw, True))
    return calls


def extract(text: str, tools: Tools) -> tuple[str | None, list[dict]]:
    """`(content, tool_calls)` from generated text (the formats above); plain text gives `(text, [])`. Arguments are
    the model's own JSON text (what a stream sends piece by piece)."""
    names = {f["name"] for f in tools.functions}
    start, parts = scan(text, tools)
    if start is not None and text[start] == "[" and (listed := pythonic(text)) is not None:
        start, parts = None, listed  # a Python list of calls: nothing before it
    if not parts:
        return text, []
    if not _marked(text) and start is not None:  # the whole text must be the JSON
        try:
            json.loads(_unprefixed(text))
        except BAD_JSON:
            return text, []
    calls = []
    for p in parts:
        raw = (p.arguments or "").strip() or "{}"  # a call without arguments takes none
        try:
            args = json.loads(raw) if p.done else None
        except BAD_JSON:
            return text, []
        if not (isinstance(p.name, str) and p.name in names and isinstance(args, (dict, str))):
            return text, []
        raw = args if isinstance(args, str) else raw
        calls.append({"id": own_id(p.id, [c["id"] for c in calls]), "type": "function",
                      "function": {"name": p.name, "arguments": raw}})
    return (text[:start].rstrip() or None) if _marked(text) and start is not None else None, calls


def new_call_id() -> str:
    """A new tool call's id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def own_id(given: str | None, taken: list[str]) -> str:
    """A call's id: the one the model wrote (`given`), unless it wrote none or one of the earlier calls' (`taken`);
    then a new one of ours."""
    return given if given and given not in taken else new_call_id()


def custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments of the function the template showed for it: its `input` string
    (the arguments as written where they hold something else)."""
    try:
        args = json.loads(arguments)
    except BAD_JSON:
        return arguments
    if isinstance(args, dict) and isinstance(args.get("input"), str) and len(args) == 1:
        return args["input"]
    return args if isinstance(args, str) else arguments


class CallStream:
    """One streamed choice's text as OpenAI deltas while it arrives: content as it comes (held while it may be the
    start of a call), each tool call's id and name once the name is complete, then its arguments piece by piece."""

    def __init__(self, tools: Tools):
        self.tools, self.names = tools, {f["name"] for f in tools.functions}
        self.whole = tools.forced  # required / named: the text is nothing but calls
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
                out += self._call(k, c["function"]["name"], c["function"]["arguments"], c["id"])
            return self._content(len(content or "")), out, True
        start, parts = scan(text, self.tools)
        if start is None:
            head = text.lstrip()
            if head[:len(PHI)] == PHI[:len(head)] and not head[len(PHI):].strip():  # may be Phi-4-mini's word
                return "", [], False
            if not self.whole and head[:1] not in ("[", "{"):  # plain text: send all but a possible tag
                end = len(text.rstrip())
                hold = held(text[:end], *MARKERS)
                return self._content(len(text[:end - hold].rstrip())), [], False
            return "", [], False
        out = self._known(text)
        return self._content(len(text[:start].rstrip())), out, bool(self.ids)

    def _known(self, text: str, final: bool = False) -> list[dict]:
        """Deltas for the calls `scan` reads in `text` so far, up to the first that names no known function
        (`final`: only those whose headers already went out)."""
        out = []
        for k, p in enumerate(scan(text, self.tools)[1]):
            if not (isinstance(p.name, str) and p.name in self.names) or (final and k >= len(self.ids)):
                break
            raw = p.arguments if p.arguments is not None and p.arguments[:1] == "{" else ""
            out += self._call(k, p.name, raw, p.id)
        return out

    def _content(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece

    def _call(self, k: int, name: str, args: str, call_id: str | None = None) -> list[dict]:
        out = []
        if k >= len(self.ids):
            self.ids.append(own_id(call_id, self.ids))
            self.args.append(0)
            out.append({"index": k, "id": self.ids[k], "type": "function", "function": {"name": name, "arguments": ""}})
        if len(args) > self.args[k]:
            out.append({"index": k, "function": {"arguments": args[self.args[k]:]}})
            self.args[k] = len(args)
        return out
