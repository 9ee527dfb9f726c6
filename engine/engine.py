"""Host side of the engine: requests, continuous batching over fixed slots, detokenization and stopping.

`Engine.step()` is the whole loop body: take aborts, admit waiting requests into free slots (prefill once, copy the
cache for n > 1, install sampler rows, draw first tokens), run one multi-step decode over all slots, then append
tokens, detokenize and stop. Plain Python; the device work lives in `engine.runner`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
from typing import Any, Callable

import jax
import numpy as np

from engine.params import DEFAULT_MAX_TOKENS, InvalidRequest, SamplingParams
from engine.runner import BATCHED_PREFILL, PREFILL_ROWS, Runner, RunnerConfig, join_pieces
from models import Model

log = logging.getLogger("sparkler.engine")
DETOK_CONTEXT = 5  # prompt tokens kept as context so the first pieces decode with the right spacing


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
    """One generated sequence of a request (n > 1 gives several)."""

    index: int
    slot: int = -1
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[tuple] = dataclasses.field(default_factory=list)  # (id, logprob, [(id, logprob), ...])
    text: str = ""
    finish_reason: str | None = None
    _ids: list[int] = dataclasses.field(default_factory=list)
    _prefix: int = 0
    _read: int = 0
    _sent_text: int = 0
    _sent_tokens: int = 0
    _final_sent: bool = False
    stops: list[str] = dataclasses.field(default_factory=list)


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

    @property
    def finished(self) -> bool:
        """All choices are done."""
        return bool(self.choices) and all(c.finish_reason for c in self.choices)


@dataclasses.dataclass
class Prefill:
    """A long (or echo) prompt being prefilled one chunk per step, in slots already taken."""

    req: Request
    slots: list[int]
    start: int = 0
    pieces: list = dataclasses.field(default_factory=list)


class Engine:
    """Continuous batching over `max_num_seqs` slots of one model."""

    def __init__(self, model: Model, rc: RunnerConfig = RunnerConfig()):
        self.model, self.tok = model, model.tokenizer
        self.runner = Runner(model, rc)
        self.max_len = self.runner.max_len
        self.free = list(range(self.runner.slots))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, tuple[Request, Choice]] = {}
        self.aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._ids = itertools.count()
        self.eos = np.asarray(model.eos_ids, np.int64)
        self.steps_run = 0
        self.aborted = 0  # requests cancelled so far (a client went away)
        self.generated = 0  # tokens drawn so far
        self.finished = 0  # requests ended so far
        self.admitting: list[tuple[Request, list[int]]] = []  # given slots this step, not yet running
        self.prefilling: collections.deque[Prefill] = collections.deque()

    # ---- requests ---------------------------------------------------------------------------------------------

    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     on_delta=None, truncate: bool = True, first_choice: int = 0) -> Request:
        """Validate and resolve a request (raises `InvalidRequest`); it is queued by `add`.

        max_tokens defaults to 2048 and is lowered to fit the context; with `truncate=False` an explicit max_tokens
        that does not fit is an error instead (Fireworks' `context_length_exceeded_behavior="error"`). Choices are
        numbered from `first_choice` (a caller splitting n over several requests keeps each choice's seed stream)."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        for t in params.logit_bias:
            if not 0 <= int(t) < vocab:
                raise InvalidRequest(f"logit_bias key {t} is not a token id of this vocabulary", "logit_bias")
        if params.n > self.runner.slots:
            raise InvalidRequest(f"n={params.n} exceeds the {self.runner.slots} decode slots", "n")
        room = self.max_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_len}",
                                 "prompt")
        p = params.resolved(self.model.generation_config)
        if not truncate and p.max_tokens is not None and p.max_tokens > room:
            raise InvalidRequest(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({p.max_tokens}) exceeds "
                                 f"this model's context of {self.max_len} tokens", "max_tokens")
        max_tokens = min(p.max_tokens if p.max_tokens is not None else DEFAULT_MAX_TOKENS, room)
        rid = request_id or f"req-{next(self._ids)}"
        choices = [Choice(first_choice + i) for i in range(p.n)]
        return Request(rid, list(prompt_ids), p, max_tokens, choices, on_delta=on_delta)

    def add(self, req: Request) -> None:
        """Queue a request (thread-safe)."""
        self.incoming.put(req)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slots are free at the next step (thread-safe)."""
        self.aborts.put(request_id)

    def stats(self) -> dict:
        """Slot occupancy and counters (read from other threads; values are a snapshot)."""
        return dict(slots=self.runner.slots, free_slots=len(self.free), running=len(self.running),
                    prefilling=len(self.prefilling),
                    waiting=len(self.waiting) + self.incoming.qsize(), aborted=self.aborted, finished=self.finished,
                    generated_tokens=self.generated, steps=self.steps_run,
                    compiles=self.runner.compiles, max_model_len=self.max_len)

    def has_work(self) -> bool:
        """Anything waiting, running or queued."""
        return bool(self.waiting or self.running or self.prefilling or not self.incoming.empty()
                    or not self.aborts.empty())

    def warmup(self, full: bool = False) -> None:
        """Compile by running them: prefill shapes for short prompts, the first draw, and decode at every batch bucket
        for the shortest attended length (`full`: every attended length and long-prompt prefill too)."""
        req = self.make_request([0] * 8, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        self.add(req)
        while self.has_work():
            self.step()
        runner, nowhere = self.runner, self.runner.slots  # an out-of-range slot: warm-up prefills write nothing
        for size in runner.prefill_buckets:
            for rows in (1, 2, 4, PREFILL_ROWS) if size <= BATCHED_PREFILL else ((1,) if full else ()):
                runner.prefill_many([(nowhere, [0] * size)] * rows)
        runner.copy_slot(nowhere, nowhere)  # n > 1
        steps = runner.rc.decode_steps
        for attend in runner.attend if full else runner.attend[:1]:
            for nb in runner.batch_buckets:
                active = np.zeros(nb, bool)
                active[-1] = True  # a free slot: its cache row and sampler row are reset on admission
                positions = np.full(nb, max(attend - steps, 0), np.int32)
                runner.decode(np.zeros(nb, np.int32), positions, active, steps)

    # ---- the loop body ----------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Admit, decode once (several steps per dispatch), postprocess. Returns requests that finished.

        Streams get one delta per decode step (at most one token per choice), as OpenAI clients expect chunks."""
        while not self.incoming.empty():
            self.waiting.append(self.incoming.get())
        done: list[Request] = []
        self._take_aborts(done)
        changed: dict[str, Request] = {}
        self._admit(changed)
        self._emit(changed, done)
        if self.running:
            self._decode(changed, done)
        return done

    def _emit(self, changed: dict[str, Request], done: list[Request]) -> None:
        """Hand each changed request its deltas since the last call."""
        for req in changed.values():
            deltas = [d for c in req.choices if (d := self._delta(c)) is not None]
            if req.on_delta and deltas:
                req.on_delta(req, deltas)
            if req.finished:
                done.append(req)
                self.finished += 1
        changed.clear()

    def _take_aborts(self, done: list[Request]) -> None:
        ids = set()
        while not self.aborts.empty():
            ids.add(self.aborts.get())
        if not ids:
            return
        for req in [r for r in self.waiting if r.id in ids]:
            self.waiting.remove(req)
            req.cancelled = True
            self.aborted += 1
        for pf in [pf for pf in self.prefilling if pf.req.id in ids]:
            self.prefilling.remove(pf)
            self._release(pf.slots)
            pf.req.cancelled = True
            self.aborted += 1
            for choice in pf.req.choices:
                choice.finish_reason = "abort"
        for slot, (req, choice) in list(self.running.items()):
            if req.id in ids:
                self.aborted += not req.cancelled
                req.cancelled = True
                self._finish(choice, "abort")

    def _admit(self, changed) -> None:
        """Take waiting requests into free slots. Short prompts are prefilled now, several per call; a long (or echo)
        prompt is prefilled one chunk per step, so the streams already running keep flowing meanwhile."""
        batch = []
        while self.waiting and len(self.free) >= self.waiting[0].params.n:
            req = self.waiting.popleft()
            batch.append((req, [self.free.pop(0) for _ in req.choices]))
        self.admitting = batch
        is_short = lambda r: not r.params.echo and len(r.prompt_ids) <= self.runner.chunk  # noqa: E731
        short = [(r, s) for r, s in batch if is_short(r)]
        self.prefilling.extend(Prefill(r, s) for r, s in batch if not is_short(r))
        logits = self.runner.prefill_many([(s[0], r.prompt_ids) for r, s in short])
        ready = [(r, s, x) for (r, s), x in zip(short, logits)]
        if self.prefilling:
            pf = self.prefilling[0]
            x, piece = self.runner.prefill_chunk(pf.slots[0], pf.req.prompt_ids, pf.start, pf.req.params.echo)
            pf.start += self.runner.chunk
            pf.pieces.append(piece)
            if pf.start >= len(pf.req.prompt_ids):
                self.prefilling.popleft()
                if pf.req.params.echo:
                    pf.req.prompt_logprobs = join_pieces(pf.pieces)
                ready.append((pf.req, pf.slots, x))
        self._install(ready, changed)

    def _install(self, ready: list, changed) -> None:
        """Prefilled requests start decoding: copy the cache for n > 1, install sampler rows, draw first tokens."""
        new_rows: dict[int, Any] = {}
        for req, slots, logits in ready:
            p = req.params
            if req.max_tokens == 0:  # scoring only (echo + logprobs): no token is drawn
                self._release(slots)
                for choice in req.choices:
                    choice.finish_reason = "length"
                changed[req.id] = req
                continue
            base = jax.random.key_data(jax.random.PRNGKey(p.seed % (1 << 32)))
            row = p.sampler_row()
            bias = np.zeros(self.model.cfg.vocab_size, np.float32)
            for t, b in p.logit_bias.items():
                bias[int(t)] += b
            if p.ignore_eos:
                bias[self.eos] = -np.inf
            for choice, slot in zip(req.choices, slots):
                if slot != slots[0]:
                    self.runner.copy_slot(slots[0], slot)
                key = base if choice.index == 0 else jax.random.key_data(
                    jax.random.fold_in(jax.random.PRNGKey(p.seed % (1 << 32)), choice.index))
                self.runner.set_row(slot, {**row, "bias": bias}, req.prompt_ids, np.asarray(key))
                choice.slot, choice.stops = slot, p.stop
                choice._ids = req.prompt_ids[-DETOK_CONTEXT:]
                choice._prefix = choice._read = len(choice._ids)
                self.running[slot] = (req, choice)
                new_rows[slot] = logits
        self.admitting = []
        if not new_rows:
            return
        self.runner.push_params()
        out = self.runner.first_tokens(new_rows)
        for slot in new_rows:
            req, choice = self.running[slot]
            self._append(req, choice, out, slot)
            changed[req.id] = req

    def _decode(self, changed, done) -> None:
        b = self.runner.slots
        # Rows without a running sequence (free, or a prompt still prefilling) sit past the end of the cache, so
        # the K/V they write are dropped and never touch a slot in use.
        tokens, positions, active = np.zeros(b, np.int32), np.full(b, self.max_len, np.int32), np.zeros(b, bool)
        for slot, (req, choice) in self.running.items():
            tokens[slot] = choice.token_ids[-1]
            positions[slot] = len(req.prompt_ids) + len(choice.token_ids) - 1
            active[slot] = True
        outs = self.runner.decode(tokens, positions, active, self.runner.rc.decode_steps)
        self.steps_run += self.runner.rc.decode_steps
        for i in range(outs.token.shape[0]):
            one = jax.tree.map(lambda x: x[i], outs)
            for slot, (req, choice) in list(self.running.items()):
                if choice.finish_reason is None:
                    self._append(req, choice, one, slot)
                    changed[req.id] = req
            self._emit(changed, done)

    # ---- per-token postprocessing -----------------------------------------------------------------------------

    def _append(self, req: Request, choice: Choice, out, slot: int) -> None:
        tok = int(out.token[slot])
        p = req.params
        choice.token_ids.append(tok)
        self.generated += 1
        if p.logprobs or p.top_logprobs:
            k = p.top_logprobs
            tops = list(zip(out.top_ids[slot][:k].tolist(), out.top_logprobs[slot][:k].tolist()))
            choice.logprobs.append((tok, float(out.logprob[slot]), tops))
        is_eos = tok in self.model.eos_ids and not p.ignore_eos
        if is_eos:
            return self._finish(choice, "stop")
        before = len(choice.text)
        self._detok(choice, tok)
        if p.stop and self._check_stop(choice, p.stop, before):
            return self._finish(choice, "stop")
        if len(choice.token_ids) >= req.max_tokens or len(req.prompt_ids) + len(choice.token_ids) >= self.max_len:
            self._finish(choice, "length")

    def _detok(self, choice: Choice, tok: int) -> None:
        choice._ids.append(tok)
        skip = True
        prefix = self.tok.decode(choice._ids[choice._prefix:choice._read], skip_special_tokens=skip)
        full = self.tok.decode(choice._ids[choice._prefix:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            choice.text += full[len(prefix):]
            choice._prefix, choice._read = choice._read, len(choice._ids)

    def _check_stop(self, choice: Choice, stops: list[str], before: int) -> bool:
        start = max(0, before - max(len(s) for s in stops) + 1)
        hits = [i for s in stops if (i := choice.text.find(s, start)) >= 0]
        if hits:
            choice.text = choice.text[:min(hits)]
            return True
        return False

    def _finish(self, choice: Choice, reason: str) -> None:
        choice.finish_reason = reason
        if choice.slot in self.running and self.running[choice.slot][1] is choice:
            del self.running[choice.slot]
            self._release([choice.slot])

    def _release(self, slots) -> None:
        """Return slots to the free list, kept sorted: new requests take the lowest, so decode batches stay compact."""
        self.free = sorted([*self.free, *slots])

    def fail_all(self) -> list[tuple[Request, list[Delta]]]:
        """After a step raised: end every request in flight (queued, admitted, prefilling, running) with
        finish_reason "error", free every slot they held, and return each with the final deltas to hand it."""
        while not self.incoming.empty():
            self.waiting.append(self.incoming.get())
        held = [*self.admitting, *((pf.req, pf.slots) for pf in self.prefilling)]
        orphans = {s for _, slots in held for s in slots} - set(self.running) - set(self.free)
        reqs = {id(r): r for r in [*self.waiting, *(r for r, _ in held), *(r for r, _ in self.running.values())]}
        self.waiting.clear()
        self.prefilling.clear()
        self.admitting = []
        out = []
        for req in reqs.values():
            ended = [c for c in req.choices if c.finish_reason is None]
            for c in ended:
                self._finish(c, "error")
            out.append((req, [Delta(c.index, "", [], [], "error") for c in ended]))
        self._release(orphans)
        return out

    def _delta(self, choice: Choice) -> Delta | None:
        """New text (held back while it may still become a stop string), tokens and logprobs since last time."""
        hold = max((len(x) for x in choice.stops), default=1) - 1
        limit = len(choice.text) if choice.finish_reason else max(choice._sent_text, len(choice.text) - hold)
        text = choice.text[choice._sent_text:limit]
        toks = choice.token_ids[choice._sent_tokens:]
        lps = choice.logprobs[choice._sent_tokens:]
        final = choice.finish_reason is not None and not choice._final_sent
        if not text and not toks and not final:
            return None
        choice._sent_text, choice._sent_tokens = limit, len(choice.token_ids)
        choice._final_sent = choice._final_sent or final
        return Delta(choice.index, text, toks, lps, choice.finish_reason if final else None)
