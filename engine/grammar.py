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


def bounded(schema: Any) -> Any:
    """`schema` with free strings capped at `STRING_MAX` characters and free integers at `INTEGER_MAX`, so a
    sampled value cannot run on until max_tokens cuts the JSON short."""
    if isinstance(schema, list):
        return [bounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
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
    import llguidance

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
            schema = js.get("schema", js if "name" not in js else None)
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise InvalidRequest("the JSON schema must be an object", param)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(bounded(schema)), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"invalid JSON schema: {e}", param) from None
    if kind == "grammar":
        text = fmt.get("grammar")
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("response_format.grammar must be a non-empty GBNF string", param)
        try:
            return llguidance.grammar_from("gbnf", text)
        except ValueError as e:
            raise InvalidRequest(f"invalid grammar: {e}", param) from None
    raise InvalidRequest(f"unknown response_format type {kind!r}; use text, json_object, json_schema or grammar", param)


def schema_grammar(schema: dict) -> str:
    """The grammar of JSON valid under `schema` (tool arguments)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(bounded(schema)), defaults=JSON_OPTIONS)


class Grammars:
    """Grammars checked against one tokenizer, kept in an LRU by their text; `matcher` starts a choice's matcher."""

    def __init__(self, hf_tokenizer, eos_ids: tuple[int, ...]):
        import llguidance.hf

        from models.tokenizer import torch_hidden

        with torch_hidden():
            self.tok = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=list(eos_ids) or None)
        self.lru: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self.lock = threading.Lock()

    def check(self, grammar: str, param: str = "response_format") -> str:
        """Validate a grammar against the tokenizer (cached); 400 with llguidance's message if it is unusable."""
        import llguidance

        with self.lock:
            if grammar in self.lru:
                self.lru.move_to_end(grammar)
                return grammar
        err = llguidance.LLMatcher.validate_grammar(grammar, self.tok)
        if err:
            raise InvalidRequest(f"the {param} cannot be used: {err}", param)
        with self.lock:
            self.lru[grammar] = True
            if len(self.lru) > CACHE_SIZE:
                self.lru.popitem(last=False)
        return grammar

    def matcher(self, grammar: str) -> "Matcher":
        """A fresh matcher at the start of `grammar`."""
        import llguidance

        return Matcher(llguidance.LLMatcher(self.tok, grammar), self)


class Matcher:
    """One choice's position in its grammar."""

    def __init__(self, m, grammars: Grammars):
        import llguidance.numpy as lln

        self.m, self.g = m, grammars
        self.bits = lln.allocate_token_bitmask(1, grammars.tok.vocab_size)  # llguidance's own buffer, reused

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row`, packed (`[vocab / 32]` int32): the tokenizer's extra ids
        beyond the model's vocabulary are cut; model ids past the tokenizer's are never allowed."""
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(self.m, self.bits, 0)
        n = min(len(row), self.bits.shape[1])
        row[:n], row[n:] = self.bits[0, :n], 0

    def advance(self, token: int) -> None:
        """Consume the token drawn (a token the mask did not allow puts the matcher in its error state)."""
        self.m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (or the matcher failed)."""
        return self.m.is_stopped()
