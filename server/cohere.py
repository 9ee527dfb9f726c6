"""Cohere's Command R7B and Command A replies, read as they stream: the model writes blocks between special tokens,
`<|START_THINKING|>…<|END_THINKING|>` (the reasoning), `<|START_RESPONSE|>…<|END_RESPONSE|>` (the answer; Command A
Reasoning's templates write `<|START_TEXT|>…<|END_TEXT|>`) and `<|START_ACTION|>[{"tool_call_id", "tool_name",
"parameters"}, …]<|END_ACTION|>` (its tool calls), with the grounded spans of an answer marked `<co>…</co: 0:[1]>`.
The reasoning goes to `reasoning_content`, the answer's text (its citation marks dropped) to the content, and an
action's calls on as `<tool_call>` blocks that `tool_calls` reads like any other: what vLLM's `cohere_command3` and
`cohere_command4` parsers and llama.cpp's Command R7B format give. Text outside the blocks is answer; whitespace
between blocks is dropped.

Structured output and forced calls follow the blocks: the engine lets the model think first where the thinking tags
are single tokens (`engine.thinking`), and the grammar (`answer_grammar`, `call_grammar`) then asks for a response
block holding the requested answer, or an action block whose calls name offered functions with JSON their
parameters accept (llguidance composes the grammars, the special tokens written as such).
"""

from __future__ import annotations

import json
import re

from engine.grammar import schema_grammar
from server.harmony import _entries
from server.reasoning import held

THINKING = ("<|START_THINKING|>", "<|END_THINKING|>")
ACTION = ("<|START_ACTION|>", "<|END_ACTION|>")
RESPONSE, TEXT = ("<|START_RESPONSE|>", "<|END_RESPONSE|>"), ("<|START_TEXT|>", "<|END_TEXT|>")
BLOCKS = {THINKING[0]: ("reasoning", THINKING[1]), ACTION[0]: ("action", ACTION[1]),
          RESPONSE[0]: ("answer", RESPONSE[1]), TEXT[0]: ("answer", TEXT[1])}
CITED = re.compile(r"<co>|</co:[^<>]*>")  # a grounded span's marks (the text between them stays)
NAMES = ("cohere_command3", "cohere_command4")  # vLLM's parser names; both are read alike here


def template_is_cohere(chat_template) -> bool:
    """Whether a chat template writes Command R7B's or Command A's blocks."""
    return isinstance(chat_template, str) and ACTION[0] in chat_template and (
        RESPONSE[0] in chat_template or TEXT[0] in chat_template)


def answer_tags(chat_template) -> tuple[str, str]:
    """The tags an answer is written between under this template (Command A Reasoning's are `TEXT`)."""
    return TEXT if isinstance(chat_template, str) and TEXT[0] in chat_template else RESPONSE


def _cite_tail(text: str) -> int:
    """Length of the end of `text` that may still become a citation mark."""
    k = text.rfind("<")
    tail = text[k:] if k >= 0 else ""
    if tail and ("<co>".startswith(tail) or "</co:".startswith(tail) or tail.startswith("</co:") and ">" not in tail):
        # (a mark holds no `<`: an earlier one left open is text)
        return len(tail)
    return 0


class Reader:
    """One choice's Cohere text as `(reasoning, answer)` pieces, in `reasoning.Splitter`'s manner: feeding a text in
    any pieces gives what feeding it whole gives. `calls`: the request offered tools, so an action's calls become
    `<tool_call>` blocks (otherwise its text is answer); `opened`: the prompt opened a thinking block. Whitespace at
    either end of a block's text, or of the text between blocks, is dropped."""

    def __init__(self, calls: bool = True, opened: bool = False):
        self.calls = calls
        self.buf, self.action = "", ""
        # the open block's kind (reasoning, answer or action; None: between blocks) and closing tag; `opened`: the
        # prompt opened a thinking block
        self.kind, self.end = ("reasoning", THINKING[1]) if opened else (None, "")
        self.lead = True  # nothing of this block (or gap) sent yet

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and the answer text that `piece` completes; `final`: the text ends here."""
        self.buf += piece
        out = {"reasoning": "", "answer": ""}
        while True:
            if self.kind is None:
                found = [(self.buf.find(m), m) for m in BLOCKS if m in self.buf]
                k, mark = min(found) if found else (-1, "")
            else:
                k, mark = self.buf.find(self.end), self.end
            ends = k >= 0 or final  # the text before `k` (or all of it) is all there is of this block
            body = self.buf[:k] if k >= 0 else self.buf
            if not ends:
                body = body[:len(body) - held(body, *((self.end,) if self.kind else BLOCKS))]
            if self.kind == "action":
                self.action, used = self.action + body, len(body)
                if ends:
                    out["answer"] += self._calls(self.action)
                    self.action = ""
            else:
                used = self._text(out, "reasoning" if self.kind == "reasoning" else "answer", body, ends)
            self.buf = self.buf[used:]
            if k < 0:
                self.buf = "" if final else self.buf
                break
            self.buf, self.lead = self.buf[len(mark):], True
            self.kind, self.end = BLOCKS[mark] if self.kind is None else (None, "")
        return out["reasoning"], out["answer"]

    def _text(self, out: dict, target: str, body: str, ends: bool) -> int:
        """Send what `body` completes of a block's text (or the gap's) to `out[target]`; the characters used."""
        start = len(body) - len(body.lstrip()) if self.lead else 0
        text = body[start:]
        bare = text.rstrip()  # trailing whitespace waits for what follows (at the end: dropped)
        sent = bare if ends else bare[:len(bare) - _cite_tail(bare)]  # ... as does a citation mark arriving
        if sent:
            out[target] += CITED.sub("", sent)
            self.lead = False
        return start + len(sent) if not ends else len(body)

    def _calls(self, text: str) -> str:
        """An action's calls as `<tool_call>` blocks; its text as it is where it holds no list of calls (or no
        tools were offered)."""
        try:
            calls = json.loads(text)
        except (ValueError, RecursionError):  # (a model stuck writing `[`)
            return text.strip()
        if not self.calls or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("tool_name"), str) for c in calls):
            return text.strip()
        return "".join("<tool_call>" + json.dumps({"name": c["tool_name"], "arguments": c.get("parameters", {})})
                       + "</tool_call>" for c in calls)


def answer_grammar(grammar: str, chat_template) -> str:
    """`grammar` applied to the text of one response block."""
    first, *rest = _entries(grammar)
    start, end = answer_tags(chat_template)
    outer = f"start: {start} @answer {end}\n"
    return json.dumps({"grammars": [{"name": "cohere", "lark_grammar": outer}, {**first, "name": "answer"}, *rest]})


def call_grammar(functions: list[dict], parallel: bool) -> str:
    """One action block of calls (one, unless `parallel`) to `functions`, each with JSON its parameters accept."""
    one = [{"type": "object", "required": ["tool_call_id", "tool_name", "parameters"], "additionalProperties": False,
            "properties": {"tool_call_id": {"type": "string", "pattern": "^[0-9]{1,3}$"},
                           "tool_name": {"const": f["name"]}, "parameters": f["parameters"]}} for f in functions]
    calls = {"type": "array", "minItems": 1, "maxItems": 8 if parallel else 1,
             "items": one[0] if len(one) == 1 else {"anyOf": one}}
    outer = f"start: {ACTION[0]} @calls {ACTION[1]}\n"
    first, *rest = _entries(schema_grammar(calls))
    return json.dumps({"grammars": [{"name": "cohere", "lark_grammar": outer}, {**first, "name": "calls"}, *rest]})
