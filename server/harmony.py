"""gpt-oss's harmony output, read as it streams: the model writes messages on channels, each
`<|channel|>NAME [to=RECIPIENT] [<|constrain|>TYPE]<|message|>BODY` ended by `<|end|>` (then
`<|start|>assistant` and the next message's header), `<|return|>` or `<|call|>`. The `analysis` channel is the
reasoning; `final`, and `commentary` addressed to no one (a preamble), are the answer; a message to
`functions.NAME` is a call of that function with the body as its JSON arguments, handed on in the answer as a
`<tool_call>` block that `tool_calls` reads like any other; messages to the built-in tools (`browser.*`, `python`)
count as reasoning, since this server runs no such tool.

Why not the `openai-harmony` package: it parses token ids of its own o200k vocabulary, which it downloads on first
use; this server runs offline and reads any tokenizer's text, with the special tokens kept for harmony models.
Text that does not open a harmony header is all answer.

Structured output and forced calls follow the channels: `answer_grammar` lets the model think on the analysis channel
first and applies the request's grammar to the final message; `call_grammar` makes the reply, after any analysis, one
message to an offered function whose body is JSON its parameters accept (llguidance composes the grammars, the
special tokens written as such).
"""

from __future__ import annotations

import json
import re

from engine.grammar import schema_grammar
from server.reasoning import held

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                                           "<|constrain|>", "<|return|>", "<|call|>")
ENDS = (END, RETURN, CALL)
OPENERS = (CHANNEL, START)
FUNCTIONS = "functions."


ANALYSIS = ('analysis: <|channel|> "analysis" <|message|> THINKING <|end|> <|start|> "assistant"\n'
            "THINKING: /(?s:.*)/\n")


def _entries(grammar: str) -> list[dict]:
    """An llguidance grammar's list of grammars (a Lark or GBNF text is one)."""
    return json.loads(grammar)["grammars"] if grammar.lstrip().startswith("{") else [{"lark_grammar": grammar}]


def answer_grammar(grammar: str) -> str:
    """`grammar` applied to the final channel's message, after any analysis message."""
    first, *rest = _entries(grammar)
    outer = 'start: analysis? <|channel|> "final" <|message|> @answer\n' + ANALYSIS
    return json.dumps({"grammars": [{"name": "harmony", "lark_grammar": outer}, {**first, "name": "answer"}, *rest]})


def call_grammar(functions: list[dict]) -> str:
    """After any analysis message, one message to one of `functions` with JSON its parameters accept."""
    entries, calls = [], []
    for i, f in enumerate(functions):
        entries.append({**_entries(schema_grammar(f["parameters"]))[0], "name": f"args{i}"})
        calls.append(f'<|channel|> "commentary to={FUNCTIONS}{f["name"]} " <|constrain|> "json" <|message|> @args{i}')
    outer = "start: analysis? call\ncall: " + " | ".join(calls) + "\n" + ANALYSIS
    return json.dumps({"grammars": [{"name": "harmony", "lark_grammar": outer}, *entries]})


def template_is_harmony(chat_template) -> bool:
    """Whether a chat template writes harmony messages (gpt-oss's)."""
    return isinstance(chat_template, str) and CHANNEL in chat_template and MESSAGE in chat_template


def route(header: str) -> tuple[str, str | None]:
    """`("reasoning" | "answer" | "call", function name)` for a message's header."""
    plain = header.replace(START, " ").replace(CHANNEL, " <channel>").replace(CONSTRAIN, " ")
    channel = re.search(r"<channel>\s*([\w-]+)", plain)
    recipient = re.search(r"\bto=([^\s<]+)", plain)
    if recipient is not None:
        to = recipient.group(1)
        return ("call", to[len(FUNCTIONS):]) if to.startswith(FUNCTIONS) else ("reasoning", None)
    return ("reasoning" if channel is not None and channel.group(1) == "analysis" else "answer"), None


class Reader:
    """One choice's harmony text as `(reasoning, answer)` pieces, in `reasoning.Splitter`'s manner: feeding a text
    in any pieces gives what feeding it whole gives. `calls`: the request offered tools, so a message to a function
    becomes a `<tool_call>` block (otherwise its body is reasoning: no one would read the call)."""

    def __init__(self, calls: bool = True):
        self.calls = calls
        self.state = "header"  # header: before a message's <|message|>; body; plain: not harmony
        self.buf = ""
        self.kind: str | None = None  # the body's route
        self.first = True  # the first header may start with its recipient (the prompt wrote `<|start|>assistant`)

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and the answer text that `piece` completes; `final`: the text ends here."""
        self.buf += piece
        out = {"reasoning": "", "answer": ""}
        while True:
            if self.state == "plain":
                out["answer"] += self.buf
                self.buf = ""
                break
            if self.state == "header":
                head = self.buf.lstrip()
                openers = OPENERS + (("to=",) if self.first else ())
                if not any(head.startswith(m) or m.startswith(head) for m in openers):
                    self.state = "plain"  # text that opens no header is all answer
                    continue
                k = self.buf.find(MESSAGE)
                if k < 0:
                    if final:  # a header cut off: structure, not text
                        self.buf = ""
                    break
                self.kind, name = route(self.buf[:k])
                if self.kind == "call" and not self.calls:
                    self.kind = "reasoning"
                self.buf, self.state, self.first = self.buf[k + len(MESSAGE):], "body", False
                if self.kind == "call":
                    out["answer"] += '<tool_call>{"name": ' + json.dumps(name) + ', "arguments": '
                continue
            ends = [(self.buf.find(e), e) for e in ENDS if e in self.buf]
            target = "reasoning" if self.kind == "reasoning" else "answer"
            if ends:
                k, mark = min(ends)
                out[target] += self.buf[:k]
                if self.kind == "call":
                    out["answer"] += "}</tool_call>"
                self.buf, self.state = self.buf[k + len(mark):], "header"
                continue
            keep = 0 if final else held(self.buf, *ENDS)
            out[target] += self.buf[:len(self.buf) - keep]
            self.buf = self.buf[len(self.buf) - keep:]
            if final and self.kind == "call":  # the call's end is its end of sequence (`<|call|>`)
                out["answer"] += "}</tool_call>"
            break
        return out["reasoning"], out["answer"]


def reasoning_tokens(ids: list[int], text_of) -> int:
    """Tokens a reply spent thinking: up to the end of its last message routed to reasoning, headers and end
    included (all of them if it was cut off while thinking); `text_of(id)` is a token's text, special or not."""
    reader, spent = Reader(), 0
    for i, t in enumerate(ids):
        thinking = reader.state == "body" and reader.kind == "reasoning"
        reader.feed(text_of(t))
        if thinking or (reader.state == "body" and reader.kind == "reasoning"):
            spent = i + 1
    return spent
