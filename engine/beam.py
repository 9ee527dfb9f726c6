"""Beam search (host side, plain Python): transformers' `generate(num_beams=...)` algorithm, step by step, over the
next-token log-probabilities the engine computes for each running beam.

Each step takes every running beam's top `keep` next tokens (`keep` = max(2, 1 + the EOS ids) x the width, as
transformers' `_beam_search`: enough that `width` beams go on whatever ends), scores each candidate by its beam's
summed log-probability plus its own, and keeps the best `keep` over all beams (the best over every beam and token:
any of them is among its own beam's top `keep`). Of those, the `width` best that do not end (an EOS id, or
`max_tokens` reached) run on; those among the `width` best that end join the finished ones, scored by their sum
over their length ** `length_penalty`, and the `width` best finished are kept. The search stops when every
candidate ends, or (transformers' `early_stopping=False` heuristic) once the best running beam, at its current
length, could no longer beat the worst of a full set of finished ones. The result: the finished beams, best first.

Where the log-probabilities come from is the caller's: the engine runs each running beam as a one-token request
over its prompt and tokens (`runs`, `advance`: `LLM.beam_search`, the server's `use_beam_search`), and the prefix
cache serves the pages the beams share (vLLM's beam search works so).
"""

from __future__ import annotations

import dataclasses

from engine.detok import Detok
from engine.params import SamplingParams
from engine.sampler import TOP_LOGPROBS

NEG = -1.0e9  # transformers' score for what may not be chosen


@dataclasses.dataclass
class Beam:
    """A hypothesis: the tokens after the prompt, their summed log-probability, and (once finished) its score."""

    tokens: list[int]
    logprob: float = 0.0
    score: float = NEG
    ended: bool = False  # its last token is an EOS id (not: it ran out of tokens)


class BeamSearch:
    """One prompt's search: `running` beams wait for their next tokens' log-probabilities (`advance`) until `done`;
    then `finished` holds the `width` best hypotheses, best first."""

    def __init__(self, width: int, max_tokens: int, eos_ids, length_penalty: float = 1.0, ignore_eos: bool = False):
        self.width, self.max_tokens, self.length_penalty = width, max_tokens, length_penalty
        self.eos = frozenset() if ignore_eos else frozenset(int(e) for e in eos_ids)
        self.keep = max(2, 1 + len(self.eos)) * width  # candidates per step (transformers' `beams_to_keep`)
        self.running = [Beam([])]
        self.finished: list[Beam] = []
        self.improvable = True  # the early-stop heuristic has not ruled out a better finished beam
        self.done = False

    def advance(self, tops: list[list[tuple[int, float]]]) -> None:
        """One step: `tops[i]` is running beam i's best next tokens `(id, log-probability)`, at least `keep` of
        them (or the whole vocabulary), best first."""
        cands = sorted(((beam.logprob + lp, i, tok) for i, (beam, top) in enumerate(zip(self.running, tops))
                        for tok, lp in top[:self.keep]), key=lambda c: -c[0])[:self.keep]
        length = len(self.running[0].tokens) + 1
        beams = [Beam(self.running[i].tokens + [tok], lp, ended=tok in self.eos) for lp, i, tok in cands]
        hits = [b.ended or length >= self.max_tokens for b in beams]
        if self.improvable:  # the best `width` candidates that end join the finished ones
            for beam in (b for b, hit in zip(beams[:self.width], hits) if hit):
                beam.score = beam.logprob / length ** self.length_penalty
                self.finished.append(beam)
            self.finished = sorted(self.finished, key=lambda b: -b.score)[:self.width]
        self.running = [b for b, hit in zip(beams, hits) if not hit][:self.width]
        full = len(self.finished) == self.width
        best = self.running[0].logprob / length ** self.length_penalty if self.running else NEG
        self.improvable = self.improvable and (not full or best > self.finished[-1].score)
        self.done = not self.improvable or all(hits) or not self.running


def check_width(width: int, eos_ids, ignore_eos: bool = False, logprobs_mode: str = "raw_logprobs") -> None:
    """Raise `ValueError` unless `width` beams fit: each step reads `keep` alternatives a beam from the sampler's
    top `TOP_LOGPROBS`, which must be logprobs (`logprobs_mode`: a greedy row's processed ones are its raw ones)."""
    if not logprobs_mode.endswith("logprobs"):
        raise ValueError(f"beam search ranks beams by their summed log-probabilities; this engine reports logits "
                         f"(--logprobs-mode {logprobs_mode})")
    factor = max(2, 1 + (0 if ignore_eos else len(set(eos_ids))))
    if not 1 <= width <= TOP_LOGPROBS // factor:
        raise ValueError(f"the beam width must be in [1, {TOP_LOGPROBS // factor}] ({factor} x the width alternatives "
                         f"a beam are read from the top {TOP_LOGPROBS}), got {width}")


def step_params(search: BeamSearch) -> SamplingParams:
    """What each running beam of `search` runs as: one greedy token, with `keep` alternatives' log-probabilities
    (those of the raw logits: the sampler's logprobs)."""
    return SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=search.keep)


def runs(searches: list[BeamSearch], prompts: list[list[int]]) -> list[tuple[BeamSearch, list[int]]]:
    """Every running beam of the searches not done, in order: `(its search, its prompt and tokens)`, each to run as
    a one-token request (`step_params`)."""
    return [(s, p + b.tokens) for s, p in zip(searches, prompts) if not s.done for b in s.running]


def advance(ran: list[tuple[BeamSearch, list[int]]], logprobs: list[list[tuple]]) -> None:
    """One step of each search in `ran` (`runs`' list), from its beams' one-token requests' logprobs entries, in
    the same order."""
    by = iter(logprobs)
    for s in dict.fromkeys(s for s, _ in ran):
        s.advance([[(int(t), float(lp)) for t, lp in next(by)[0][2]] for _ in s.running])


def text(tokenizer, beam: Beam, skip_special_tokens: bool = True) -> str:
    """A finished beam's text (its EOS left out), decoded as a stream's is (`engine.detok`)."""
    detok = Detok(tokenizer, skip_special_tokens)
    return detok.add(beam.tokens[:-1] if beam.ended else beam.tokens) + detok.flush()
