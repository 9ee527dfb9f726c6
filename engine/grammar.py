"""Structured output with llguidance: a `response_format` becomes a grammar, compiled once per tokenizer (LRU by its
text), and each constrained choice gets a matcher that yields the packed allowed-token bitmask for its next token
(`[vocab / 32]` int32, bit `t % 32` of word `t // 32`) and advances by the token drawn.

Why llguidance: it compiles JSON schema, GBNF, Lark and regex to one token-level matcher (Rust, no torch), computes
a mask in tens of microseconds with no per-schema precompilation of the vocabulary, and is what vLLM and
sglang-jax use. outlines-core covers JSON schema and regex only (GBNF would need a converter) and builds an index
over the whole vocabulary per schema up front.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

import numpy as np

from engine.grammar_sandbox import Sandbox
from engine.params import InvalidRequest

# Whitespace between JSON tokens as models write it (newlines and indentation), at most 16 characters a gap: a
# constrained reply cannot run on in spaces. (No whitespace at all pushes models off their own formatting.)
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}
CACHE_SIZE = 256
STRING_MAX = 256  # characters of a string the schema leaves unbounded
INTEGER_MAX = 10**15  # magnitude of an integer the schema leaves unbounded
_FIXED = ("maxLength", "enum", "const", "pattern", "format")
_VALUES = ("enum", "const", "default", "examples")  # JSON values, not schemas
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
FREE_DEPTH, FREE_WIDTH = 3, 16  # nesting and members of the JSON object json_object asks for without a schema
_CONVERTER = Sandbox()  # GBNF to llguidance's grammar, in a child process (started on first use)


def any_object() -> dict:
    """The schema of json_object without a schema: any JSON object, nested at most `FREE_DEPTH` deep with at most
    `FREE_WIDTH` members per object or array, so a sampled reply is finite (strings bounded as in `bounded`)."""
    defs = {"v0": {"anyOf": [{"type": "string", "maxLength": STRING_MAX}, {"type": "number"}, {"type": "boolean"},
                             {"type": "null"}]}}
    for d in range(1, FREE_DEPTH + 1):
        below = {"$ref": f"#/$defs/v{d - 1}"}
        defs[f"v{d}"] = {"anyOf": [defs["v0"], {"type": "array", "maxItems": FREE_WIDTH, "items": below},
                                   {"type": "object", "maxProperties": FREE_WIDTH, "additionalProperties": below}]}
    return {"type": "object", "maxProperties": FREE_WIDTH, "additionalProperties": {"$ref": f"#/$defs/v{FREE_DEPTH}"},
            "$defs": defs}


def bounded(schema: Any) -> Any:
    """`schema` with free strings capped at `STRING_MAX` characters and free integers at `INTEGER_MAX`, so a
    sampled value cannot run on until max_tokens cuts the JSON short; a `propertyNames` that says only that keys are
    strings (zod's records, common in MCP tools; llguidance has no `propertyNames`) is dropped: JSON's keys are."""
    if isinstance(schema, list):
        return [bounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "propertyNames" and v == {"type": "string"}:
            continue
        if k in _VALUES:
            out[k] = v
        elif k in _MAPS and isinstance(v, dict):  # name -> schema: the names are not keywords
            out[k] = {name: bounded(sub) for name, sub in v.items()}
        else:
            out[k] = bounded(v)
    kind = out.get("type")
    if kind == "string" and not any(k in out for k in _FIXED):
        out["maxLength"] = STRING_MAX
    if kind == "integer" and not any(k in out for k in ("minimum", "exclusiveMinimum", "enum", "const")):
        out["minimum"] = -INTEGER_MAX
    if kind == "integer" and not any(k in out for k in ("maximum", "exclusiveMaximum", "enum", "const")):
        out["maximum"] = INTEGER_MAX
    return out


def grammar_text(fmt: Any, param: str = "response_format") -> str | None:
    """The llguidance grammar for an OpenAI/Fireworks `response_format` (None: unconstrained); 400 on bad input."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequest("response_format must be an object with a string 'type'", param)
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind in ("json_object", "json_schema"):
        schema = fmt.get("schema")
        js = fmt.get("json_schema")
        if schema is None and kind == "json_schema":
            if not isinstance(js, dict):
                raise InvalidRequest("response_format.json_schema must be an object", param)
            if not isinstance(js.get("name", ""), str) or not isinstance(js.get("strict", False), (bool, type(None))):
                raise InvalidRequest("response_format.json_schema: 'name' must be a string, 'strict' a boolean", param)
            schema = js.get("schema", js if "name" not in js else None)
        return json_grammar(schema, param)
    if kind == "grammar":
        return gbnf_grammar(fmt.get("grammar"), param, f"{param}.grammar")
    if kind == "structural_tag":
        return structural_tag_grammar(fmt, param)
    raise InvalidRequest(f"unknown response_format type {kind!r}; use text, json_object, json_schema, grammar or "
                         "structural_tag", param)


def json_grammar(schema: Any, param: str) -> str:
    """`schema_grammar` of a request's schema (None: any object, as `any_object`), or a 400 naming `param`."""
    if schema is None:
        schema = any_object()
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON schema object", param)
    try:
        return schema_grammar(schema)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"invalid JSON schema: {e}", param) from None
    except RecursionError:  # JSON text inside a body is not bounded as the body is
        raise InvalidRequest("the JSON schema nests too deeply", param) from None


def gbnf_grammar(text: Any, param: str, field: str | None = None) -> str:
    """The grammar of a GBNF text (llama.cpp's grammars; a Lark grammar passes too: llguidance tells them apart),
    converted in the sandbox's child; `field` names it in the message (`param` when None)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"'{field or param}' must be a non-empty GBNF (or Lark) grammar string", param)
    grammar, err = _CONVERTER.gbnf(text)
    if err:
        raise InvalidRequest(f"invalid grammar: {err}", param)
    return grammar


def structural_tag_grammar(spec: Any, param: str) -> str:
    """The grammar of free text in which each of `spec`'s structures, once one of its `triggers` is written, is its
    `begin`, JSON valid under its `schema`, then its `end` (xgrammar's structural tag, as vLLM and SGLang take it:
    `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`, or that as JSON text); llguidance's
    `StructTag` writes the Lark grammar (lazily matched triggers)."""
    import llguidance

    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except (ValueError, RecursionError) as e:
            raise InvalidRequest(f"'{param}' is not JSON this server reads: {e}", param) from None
    structures, triggers = (spec.get("structures"), spec.get("triggers")) if isinstance(spec, dict) else (0, 0)
    if not (isinstance(structures, list) and structures and isinstance(triggers, list) and triggers
            and all(isinstance(t, str) and t for t in triggers)):
        raise InvalidRequest(f"'{param}' must hold 'structures' (a non-empty list of {{'begin', 'schema', 'end'}}) "
                             "and 'triggers' (a non-empty list of strings)", param)
    tags = []
    for i, s in enumerate(structures):
        if not (isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end", ""), str)
                and isinstance(s.get("schema"), dict)):
            raise InvalidRequest(f"'{param}' structures[{i}] must be {{'begin': str, 'schema': object, 'end': str}}",
                                 param)
        trigger = max((t for t in triggers if s["begin"].startswith(t)), key=len, default=None)
        if trigger is None:
            raise InvalidRequest(f"'{param}' structures[{i}]: its begin {s['begin']!r} starts with no trigger", param)
        try:
            tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=bounded(s["schema"]),
                                             end=s.get("end", "")))
        except RecursionError:
            raise InvalidRequest(f"'{param}' structures[{i}]: its schema nests too deeply", param) from None
    try:
        return llguidance.grammar_from("lark", llguidance.StructTag.to_grammar(tags, assume_special=False))
    except (ValueError, TypeError, AssertionError, RecursionError) as e:
        raise InvalidRequest(f"invalid structural tag: {e}", param) from None


def regex_grammar(pattern: Any, param: str) -> str:
    """The grammar of text matching a regular expression (Rust's `regex` syntax, anchored at both ends)."""
    import llguidance

    if not isinstance(pattern, str) or not pattern:
        raise InvalidRequest(f"'{param}' must be a non-empty regular expression string", param)
    if (len(pattern) - len(pattern.rstrip("\\"))) % 2:  # llguidance would drop it and match the rest
        raise InvalidRequest(f"'{param}' ends in a lone backslash: not a regular expression", param)
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def choice_grammar(options: Any, param: str) -> str:
    """The grammar of exactly one of `options` (non-empty strings)."""
    import llguidance

    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
        raise InvalidRequest(f"'{param}' must be a non-empty list of non-empty strings", param)
    return llguidance.grammar_from("choice", options)


def schema_grammar(schema: dict, lenient: bool = False) -> str:
    """The grammar of JSON valid under `schema` (tool arguments); `lenient` ignores the keywords llguidance cannot
    enforce (`uniqueItems`, `not`, ...) instead of refusing them."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(bounded(schema)),
                                                         defaults={**JSON_OPTIONS, "lenient": lenient})


class Grammars:
    """Grammars checked against one tokenizer, kept in an LRU by their text; `matcher` starts a choice's matcher."""

    def __init__(self, tokenizer, eos_ids: tuple[int, ...]):
        import llguidance

        spec = tokenizer.backend.to_str()  # the tokenizer's JSON (megabytes), for llguidance here and in the child
        self.tok = llguidance.LLTokenizer(spec, eos_token=list(eos_ids) or None)
        self.sandbox = Sandbox(spec, list(eos_ids))  # checks new grammars where a crash is safe
        self.lru: collections.OrderedDict[str, str | None] = collections.OrderedDict()  # grammar -> why not usable
        self.lock = threading.Lock()
        self.texts = [self.tok.decode_bytes([t]) for t in range(self.tok.vocab_size)]
        *self.closers, self.blank = _closers(self.texts)

    def check(self, grammar: str, param: str = "response_format") -> str:
        """Validate a grammar against the tokenizer (cached), in the sandbox's child process; 400 with llguidance's
        message if it is unusable, or if compiling it crashed or ran past the sandbox's timeout."""
        with self.lock:
            known = grammar in self.lru
            if known:
                self.lru.move_to_end(grammar)
                err = self.lru[grammar]  # refusals are kept too: a grammar that crashes the child crashes it once
        if not known:
            err = self.sandbox.check(grammar)
            with self.lock:
                self.lru[grammar] = err
                if len(self.lru) > CACHE_SIZE:
                    self.lru.popitem(last=False)
        if err:
            raise InvalidRequest(f"the {param} cannot be used: {err}", param)
        return grammar

    def matcher(self, grammar: str) -> "Matcher":
        """A fresh matcher at the start of `grammar`."""
        import llguidance

        is_json = grammar.startswith('{"grammars":[{"name":"json_schema"')
        return Matcher(llguidance.LLMatcher(self.tok, grammar), self, is_json)


def _closers(texts: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed masks of the tokens that close JSON: outside a string `}` / `]` (with whitespace around them, not
    whitespace alone); inside a string a `"` followed by those; and of the tokens that are whitespace alone."""
    outside, inside, blank = (np.zeros((len(texts) + 31) // 32, np.uint32) for _ in range(3))
    for t, b in enumerate(texts):
        body = b.strip()
        if not body:
            if b:  # whitespace alone (a special token's text is empty)
                blank[t // 32] |= np.uint32(1 << (t % 32))
            continue
        if not body.strip(b"}]"):
            outside[t // 32] |= np.uint32(1 << (t % 32))
        if b.startswith(b'"') and not b[1:].strip().strip(b"}]"):
            inside[t // 32] |= np.uint32(1 << (t % 32))
    return outside.view(np.int32), inside.view(np.int32), blank.view(np.int32)


class Matcher:
    """One choice's position in its grammar."""

    def __init__(self, m, grammars: Grammars, is_json: bool):
        import llguidance.numpy as lln

        self.m, self.g, self.json = m, grammars, is_json  # a JSON-schema grammar: closing applies
        self.bits = lln.allocate_token_bitmask(1, grammars.tok.vocab_size)  # llguidance's own buffer, reused
        self.in_string = self.escaped = False  # JSON string state of the text so far (for closing)
        self.closed = False  # closing narrowed a mask: the budget, not the model, ended the reply

    def fill(self, row: np.ndarray, closing: bool = False) -> None:
        """Write the allowed next tokens into `row`, packed (`[vocab / 32]` int32): the tokenizer's extra ids
        beyond the model's vocabulary are cut; model ids past the tokenizer's are never allowed. `closing` (JSON,
        the token budget nearly spent) narrows them to tokens that close strings, objects and arrays, where the
        grammar allows one, else, outside a string, to tokens that are not whitespace alone (which would only spend
        the budget), so the reply ends as valid JSON."""
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(self.m, self.bits, 0)
        bits = self.bits[0]
        if closing and self.json and not self.escaped:  # after a backslash a quote would not close the string
            narrowed = bits & self.g.closers[self.in_string][:len(bits)]
            if not narrowed.any() and not self.in_string:
                narrowed = bits & ~self.g.blank[:len(bits)]
            if narrowed.any() and (narrowed != bits).any():
                bits, self.closed = narrowed, True
        n = min(len(row), len(bits))
        row[:n], row[n:] = bits[:n], 0

    def active(self, steps: int) -> bool:
        """A grammar needs a mask for every token."""
        return True

    def advance(self, token: int) -> None:
        """Consume the token drawn (a token the mask did not allow puts the matcher in its error state)."""
        self.m.consume_token(token)
        for c in self.g.texts[token] if token < len(self.g.texts) else b"":
            if self.escaped:
                self.escaped = False
            elif c == 0x5C and self.in_string:  # backslash
                self.escaped = True
            elif c == 0x22:  # quote
                self.in_string = not self.in_string

    def accepted(self, draft: list[int]) -> list[int]:
        """The longest start of `draft` the grammar accepts from here (a token no mask allows is never drawn)."""
        return draft[:self.m.validate_tokens(draft)] if draft else []

    def draft_masks(self, draft: list[int], out: np.ndarray) -> None:
        """A verify step's masks (speculative decoding) for a draft `accepted` returned: `out[j]` (`[W, vocab /
        32]`) gets the tokens allowed after the first `j` drafted tokens, for j >= 1 (`out[0]`, this step's own
        mask, is already filled). Never closing. The matcher is left where it was."""
        state = self.in_string, self.escaped
        for j, token in enumerate(draft, 1):
            self.advance(token)
            self.fill(out[j])
        if draft and not self.m.rollback(len(draft)):
            raise RuntimeError(f"llguidance could not roll back {len(draft)} drafted tokens: {self.m.get_error()}")
        self.in_string, self.escaped = state

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (or the matcher failed)."""
        return self.m.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a limit of llguidance's, such as "Too many items"), if it did."""
        return f"llguidance: {self.m.get_error().splitlines()[0]}" if self.m.is_error() else None
