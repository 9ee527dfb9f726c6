"""What the engine serves: requests, their choices (generated sequences), the deltas streamed back, and prompts
being prefilled. Plain data, shared by the scheduler (`engine.scheduler`) and the engine's loop (`engine.engine`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from engine.params import SamplingParams
from engine.runner import BATCHED_PREFILL
from engine.speculative import Drafter
from engine.thinking import Budget


@dataclasses.dataclass
class Delta:
    """What changed for one choice in one step (handed to streaming consumers)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[tuple]
    finish_reason: str | None


@dataclasses.dataclass
class Choice:
    """One generated sequence of a request (n > 1 gives several); while admitted it holds a slot and KV pages."""

    index: int
    slot: int = -1
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple] = dataclasses.field(default_factory=list)  # (id, logprob, [(id, logprob), ...])
    text: str = ""
    finish_reason: str | None = None
    pages: list[int] = dataclasses.field(default_factory=list)  # in order: position p is in pages[p // page_size]
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of its full pages registered so far
    order: int = 0  # admission stamp: the most recently admitted is preempted first
    saved: Any = None  # sampler row taken along by a preempted choice
    lag: int = 0  # tokens drawn on the devices and not read back yet (a step dispatched ahead of the read-back)
    matcher: Any = None  # its position in the request's grammar (structured output), if any
    error: str | None = None  # why it ended with finish_reason "error" when the request is at fault (its grammar)
    detok: Any = None  # its text so far, as an `engine.detok.Detok` (None without a tokenizer)
    _sent_text: int = 0
    _sent_tokens: int = 0
    _final_sent: bool = False
    stops: list[str] = dataclasses.field(default_factory=list)
    stop_hit: str | None = None  # the stop string that ended it, if one did
    cut: bool = False  # its text was cut short (at a stop string, or llama.cpp's n_indent): nothing held is added
    started: float | None = None  # when its first token was read back (llama.cpp's `t_max_predict_ms` counts from it)
    drafter: Drafter | None = None  # where its drafts come from (speculative decoding), if it drafts


@dataclasses.dataclass
class Request:
    """A prompt, its resolved settings and its choices."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int = 0
    choices: list[Choice] = dataclasses.field(default_factory=list)
    prompt_logprobs: Any = None
    on_delta: Callable[["Request", list[Delta]], None] | None = None
    cancelled: bool = False
    cache_max_len: int | None = None  # reuse at most this many cached prompt tokens (0: none)
    cache_key: str | tuple | None = None  # isolation key (with a LoRA adapter's: `(adapter, key)`): only requests
    # with the same key share pages
    # the LoRA slots it runs with (`models.lora`; (): the base model), each at a multiple of the scale the adapter
    # was trained with (llama.cpp's `lora` scales; several: its mixes)
    adapters: tuple[tuple[int, float], ...] = ()
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    admitted: float | None = None  # when it first got slots (queue time: admitted - arrival)
    grammar: str | None = None  # llguidance grammar every choice must follow (response_format, tools)
    thinking: Budget | None = None  # a budget of thinking tokens, closed by the engine (reasoning_effort)
    prediction: list[int] | None = None  # the expected output's tokens: drafts for speculative decoding
    priority: int = 0  # its place in line under the priority policy: lower sooner (`engine.scheduler`)
    # with pictures: the prompt as the client sent it, the image token at each picture's positions (`prompt_ids`
    # holds the ids of the picture's rows there: `engine.images`)
    pictured_ids: list[int] | None = None
    # with pictures: the prompt as the prefix cache hashes it, each picture's positions named by its digest, so its
    # pages are found again whatever rows it sits in next time, and never for another picture (`cache_tokens`)
    cache_ids: list[int] | None = None
    page_keys: list[bytes] | None = None  # the chained hashes of its prompt's full pages (`Scheduler._keys`)

    @property
    def client_ids(self) -> list[int]:
        """The prompt's ids as the client sees them (and the sampler counts them): image tokens, not rows."""
        return self.prompt_ids if self.pictured_ids is None else self.pictured_ids

    @property
    def drafted(self) -> int:
        """Drafted tokens its choices' verify steps scored."""
        return sum(c.drafter.drafted for c in self.choices if c.drafter)

    @property
    def accepted(self) -> int:
        """Drafted tokens its choices kept."""
        return sum(c.drafter.accepted for c in self.choices if c.drafter)

    @property
    def finished(self) -> bool:
        """All choices are done."""
        return bool(self.choices) and all(c.finish_reason for c in self.choices)


@dataclasses.dataclass
class Prefill:
    """Choices admitted and holding slots and pages whose tokens are being written: a new request (its first choice
    carries the prompt's pages; the others hold their own copy of a partial last page, if any) or a preempted choice
    coming back (`resume`: its prompt and all but its last generated token)."""

    req: Request
    choices: list[Choice]
    tokens: list[int]
    start: int = 0
    resume: bool = False
    pieces: list = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # the chained hashes of its tokens' full pages

    @property
    def echo(self) -> bool:
        """Prompt logprobs wanted (never recomputed for a resumed choice)."""
        return self.req.params.echo and not self.resume

    @property
    def short(self) -> bool:
        """Prefilled in one go at admission (else one chunk per step)."""
        return not self.echo and len(self.tokens) - self.start <= BATCHED_PREFILL


def cache_tokens(req: Request, tokens: list[int]) -> list[int]:
    """`tokens` (its prompt's, then generated ones) as the prefix cache keys them: a pictured prompt's by
    `cache_ids`, any other's as they are."""
    if req.cache_ids is None:
        return tokens
    n = len(req.cache_ids)
    return req.cache_ids + tokens[n:] if len(tokens) >= n else req.cache_ids[:len(tokens)]


def seq_tokens(req: Request, choice: Choice) -> list[int]:
    """The tokens whose K/V a choice's pages hold: its prompt and every generated token but the last."""
    return req.prompt_ids + choice.token_ids[:-1]
