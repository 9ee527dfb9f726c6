"""One generated choice as the three APIs see it: thinking, answer text and tool calls, piece by piece as the text
streams, accumulated for the whole reply. Chat completions, Responses and Messages all read a choice through a
`Turn`, so reasoning and tool calls are parsed once, the same way for every API.
"""

from __future__ import annotations

import dataclasses

from server import cohere, harmony, reasoning, tool_calls
from server.protocol import Job


@dataclasses.dataclass
class Piece:
    """What one stretch of text added: thinking, answer text, and OpenAI tool-call deltas (`tool_calls.CallStream`'s);
    and the tokens that made it (`token_ids`, for an API that streams them: llama.cpp's; `entries`, their logprobs,
    for Responses'), and whose they are (`source`, for an API that streams several choices at once: SGLang's)."""

    reasoning: str = ""
    text: str = ""
    calls: list[dict] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    source: tuple[int, int] | None = None  # (the call's request, the choice) it is of, where a stream has several
    finish: str | None = None  # the finish reason of the engine's text it was fed with (its last piece only)
    entries: list[tuple] = dataclasses.field(default_factory=list)  # its tokens' logprob entries, when asked for


class Turn:
    """A choice's reasoning, answer and tool calls so far (`feed` the engine's text pieces in order)."""

    def __init__(self, job: Job):
        offered = job.tools is not None and job.tools.offered
        t = job.thinking
        self.split = None if t is None else harmony.Reader(offered) if t.form == "harmony" else \
            cohere.Reader(offered, t.opened) if t.form == "cohere" else \
            reasoning.Splitter(t.opened, reasoning.TAGS[t.form])
        harmonic = job.thinking is not None and job.thinking.form == "harmony"  # (gpt-oss writes calls in its channel)
        self.raw = job.tools.raw if offered and not harmonic else None  # a named custom tool: the answer is its input
        self.custom = job.tools.custom() if offered else {}
        self.stream = tool_calls.CallStream(job.tools) if offered and self.raw is None else None
        self.reasoning, self.text, self.raw_text = "", "", ""
        self.calls: list[dict] = []  # {"id", "name", "arguments"} in order ("input" too: a custom tool's)
        self.finish: str | None = None

    def feed(self, text: str, finish: str | None = None, token_ids: list[int] = ()) -> Piece:
        """The next piece of generated text (`finish`: the choice ended with that reason, this is its last), made of
        `token_ids`."""
        final = finish is not None
        thought, answer = self.split.feed(text, final) if self.split is not None else ("", text)
        piece = Piece(reasoning=thought, token_ids=list(token_ids), finish=finish)
        if self.raw is not None:  # the whole answer is the call's input, sent at the end
            self.raw_text += answer
            if final:
                piece.calls = [{"index": 0, "id": tool_calls.new_call_id(), "function": {"name": self.raw["name"],
                                                                                           "arguments": self.raw_text}}]
        elif self.stream is not None:
            piece.text, piece.calls, _ = self.stream.feed(answer, finish)
        else:
            piece.text = answer
        self.reasoning += piece.reasoning
        self.text += piece.text
        for d in piece.calls:
            if "id" in d:
                self.calls.append({"id": d["id"], "name": d["function"]["name"], "arguments": ""})
            self.calls[d["index"]]["arguments"] += d["function"].get("arguments", "")
        if self.custom:
            piece.calls = self._custom(piece.calls, final)
        if final:
            self.finish = "tool_calls" if self.calls and finish == "stop" else finish
        return piece

    def _custom(self, deltas: list[dict], final: bool) -> list[dict]:
        """`deltas` up to the first call to a custom tool; that call and every later one are sent at the end, one
        delta each, in order: `{"index", "id", "type": "custom", "custom": {"name", "input"}}` (the input is a JSON
        string's value until then), or a function call whole."""
        first = next((k for k, c in enumerate(self.calls) if c["name"] in self.custom), None)
        if first is None:
            return deltas
        out = [d for d in deltas if d["index"] < first]
        for k, c in enumerate(self.calls[first:] if final else (), first):
            if c["name"] in self.custom:
                c["input"] = c["arguments"] if self.raw is not None else tool_calls.custom_input(c["arguments"])
                out.append({"index": k, "id": c["id"], "type": "custom", "custom": {"name": c["name"],
                                                                                    "input": c["input"]}})
            else:
                out.append({"index": k, "id": c["id"], "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]}})
        return out

    def openai_calls(self) -> list[dict]:
        """The tool calls in chat completions' shape."""
        return [{"id": c["id"], "type": "custom", "custom": {"name": c["name"], "input": c["input"]}} if "input" in c
                else {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.calls]
