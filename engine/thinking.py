"""Thinking blocks in the engine: after `budget` tokens inside a thinking block the engine draws the block's closing
token itself, and the answer follows; a request's grammar (structured output, forced tool calls) applies to the
answer only, from the token after the close (with or without a budget).

`Gate` stands where a grammar matcher stands in the engine (`fill`, `advance`, `done`, `closed`), so preemption,
masks and finishing treat both alike. The engine runs one decode step per dispatch only while some gate is `active`:
near its budget, at the first token (which may open the block), or while its grammar constrains the answer. While
a gate would not be active over its tokens in flight and the next dispatch's, the engine leaves it out of the masks
and works ahead of the read-back (`Engine._masked`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Budget:
    """A request's thinking block: at most `budget` tokens (None: no limit but max_tokens) between the tokens
    `open_id` and `close_id`; `opened`: the prompt already opened the block (the model thinks from its first
    token)."""

    budget: int | None
    open_id: int
    close_id: int
    opened: bool = False


class Gate:
    """One choice's place in its thinking block, and its answer's grammar matcher (if any)."""

    def __init__(self, spec: Budget, inner: Any = None):
        self.spec, self.inner = spec, inner
        self.state = "think" if spec.opened else "start"  # start: the first token may open the block; then answer
        self.count = 0  # thinking tokens drawn

    def active(self, steps: int) -> bool:
        """Whether the next `steps` tokens after the last one it was handed need a mask each (else one mask, which
        allows every token, serves them all)."""
        if self.state == "start":
            return True
        if self.state == "think":  # with a grammar, each token is looked at: the close may come at any step
            budget = self.spec.budget
            return self.inner is not None or (budget is not None and self.count + steps > budget)
        return self.inner is not None

    def fill(self, row: np.ndarray, closing: bool = False) -> None:
        """Write the allowed next tokens into `row` (all allowed on entry): only the close at the budget; the
        answer's grammar after the block (and at the start, beside the open token)."""
        if self.state == "think":
            if self.spec.budget is not None and self.count >= self.spec.budget:
                row[:] = 0
                _allow(row, self.spec.close_id)
            return
        if self.inner is not None:
            self.inner.fill(row, closing=closing)
            if self.state == "start":
                _allow(row, self.spec.open_id)

    def advance(self, token: int) -> None:
        """Consume the token drawn."""
        if self.state == "start":
            self.state = "think" if token == self.spec.open_id else "answer"
            if self.state == "think":
                return
        if self.state == "think":
            if token == self.spec.close_id:
                self.state = "answer"
            else:
                self.count += 1
            return
        if self.inner is not None:
            self.inner.advance(token)

    @property
    def done(self) -> bool:
        """The answer's grammar is complete."""
        return self.state == "answer" and self.inner is not None and self.inner.done

    @property
    def error(self) -> str | None:
        """Why the answer's grammar failed, if it did."""
        return self.inner.error if self.inner is not None else None

    @property
    def closed(self) -> bool:
        """The answer's grammar was narrowed to close JSON at the token budget."""
        return self.inner is not None and self.inner.closed


def _allow(row: np.ndarray, token: int) -> None:
    if token // 32 < len(row):
        row[token // 32] |= np.int32(np.uint32(1 << (token % 32)).view(np.int32))
