"""Drafts for speculative decoding (host side, plain Python): prompt lookup in a request's prediction or in its own
tokens, and when a verify step is worth its cost.

A draft is a guess of the next tokens. The device step (`Runner.verify`) scores a row's last token and its draft in
one forward pass and samples each position in order with the row's own sampler state; a drafted token is kept while
it equals the token sampled at its position. That is exact rejection sampling for a deterministic draft (Leviathan
et al. 2023, Chen et al. 2023): the draft `x` is kept with probability `p(x)` under the row's full transformed
distribution, and on a rejection the token is the draw from `p` conditioned on not being `x`. With the same seed the
tokens are the ones decoding without drafts would have drawn.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_NGRAM = 4  # the longest suffix looked up
MIN_NGRAM = 2  # n-gram drafts from the request's own tokens need at least this much context to match
EMA = 0.5  # weight of the last outcome in a choice's expected accepted tokens
PROBE = 8  # while decoding wins, a draft model drafts anyway after this many steps (unverified: `Drafter.shadow`),
PROBE_SHARE = 0.1  # ... then when that costs at most this share of the decoding since (`Engine._probe_due`)


@dataclasses.dataclass
class Drafter:
    """Where one choice's drafts come from, and how well they have done.

    `source`: the prediction's tokens (the draft continues the prediction after the output's last tokens), or None
    for n-gram drafts from the choice's prompt and output. `at`: the index in the searched tokens just after the
    last match used, so a lookup prefers the next occurrence over an earlier one (a prediction is followed in
    order, and a quoted prompt is read forwards). `model`: the engine's draft model drafts instead (`source` None).
    `expect`: accepted tokens per verify (moving average), learnt from
    verify steps and, while the engine decodes instead, from how its unverified drafts compare with the tokens
    decoded (`shadow`), so a prediction that falls back in step is taken up again at once."""

    source: np.ndarray | None
    min_n: int
    at: int = 0
    expect: float = 1.0
    drafted: int = 0
    accepted: int = 0
    unverified: list[int] | None = None  # the draft of a dispatch that decoded instead
    model: bool = False  # drafts come from the engine's draft model (`engine.draft_model`), not `propose`

    def propose(self, prompt: list[int], output: list[int], k: int) -> list[int]:
        """Up to `k` tokens to follow `output` (empty when nothing matches)."""
        if k <= 0:
            return []
        if self.source is None:
            tokens = np.asarray(prompt + output, np.int64)
            context = tokens
            searched = tokens[:-1]  # the suffix's own occurrence is not a match
        else:
            tokens, context = self.source, np.asarray(output[-MAX_NGRAM:], np.int64)
            searched = tokens
        opening = self.source is not None and not self.at and len(output) <= MAX_NGRAM  # the reply has just begun
        if opening and len(output) < len(tokens) and (tokens[:len(output)] == output).all():
            return tokens[len(output):len(output) + k].tolist()  # so far the reply is the prediction's start
        for n in range(min(MAX_NGRAM, len(context)), self.min_n - 1, -1):
            if n == 1 and opening:  # no longer match yet: the prediction's start
                return tokens[:k].tolist()
            at = match(searched, context[-n:], self.at)
            if at is not None:
                self.at = at
                return tokens[at:at + k].tolist()
        return tokens[:k].tolist() if opening else []

    def record(self, drafted: int, accepted: int) -> None:
        """Count a verify's outcome for this choice."""
        self.drafted += drafted
        self.accepted += accepted
        self.expect = (1 - EMA) * self.expect + EMA * accepted

    def shadow(self, decoded: list[int]) -> None:
        """Learn from the draft that was not verified: how many of its tokens the decoded ones repeat. Where the
        decoded run repeats the draft to the run's end and the draft goes on, a verify would have kept at least
        the run: that outcome counts as the run plus what the choice has been keeping (`expect`), at most the
        draft. Counting only the run capped `expect` at the decode steps, so at 8 streams a prediction that had
        fallen back in step was never verified again (editing went from 1.60x to 0.92x of no drafts)."""
        draft, self.unverified = self.unverified, None
        if not draft or not decoded:
            return
        same = next((i for i, (a, b) in enumerate(zip(draft, decoded)) if a != b), min(len(draft), len(decoded)))
        if same == len(decoded) < len(draft):  # borne out through the whole run: censored
            same = min(len(draft), same + self.expect)
        self.expect = (1 - EMA) * self.expect + EMA * same


def match(tokens: np.ndarray, suffix: np.ndarray, hint: int) -> int | None:
    """The index just after an occurrence of `suffix` in `tokens` that is followed by at least one token: the
    first such index >= `hint`, else the last one before it; None when there is none."""
    n = len(suffix)
    if len(tokens) <= n:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
    ends = np.flatnonzero((windows == suffix).all(axis=1)) + n
    if not ends.size:
        return None
    later = ends[ends >= hint]
    return int(later[0] if later.size else ends[-1])


def worth_verifying(rows: list[tuple[int, float]], steps: int, verify_s: float | None, decode_s: float | None) -> bool:
    """Whether a verify step yields more tokens per second than a decode dispatch of `steps` steps, by the measured
    seconds of each at this batch size. `rows`: per running choice, the tokens it may still draw and its expected
    accepted drafts (a verify gives it 1 + those, a decode dispatch `steps`, both at most what it may draw). An
    unmeasured kind is tried: verify first, then decode (at a full batch some row nearly always has a draft, so a
    decode that waited for a draftless dispatch would never be measured, and verifying would go on unchecked)."""
    if verify_s is None:
        return True
    if decode_s is None:
        return False
    by_verify = sum(min(1 + expect, left) for left, expect in rows)
    by_decode = sum(min(steps, left) for left, _ in rows)
    return by_verify / verify_s > by_decode / decode_s
