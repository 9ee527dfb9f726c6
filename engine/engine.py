"""The engine's loop: requests in, tokens out, over the scheduler's decisions and the runner's device calls.

`Engine.step()` is the whole loop body: take aborts; have the scheduler seat queued work, prefill what it seated and
the next chunks of long prompts, install sampler rows and draw first tokens (n > 1 maps the prompt's pages into every
choice); have it reserve every running sequence the pages of its next steps (preempting when the pool is dry);
dispatch one multi-step decode (or verify drafts, read back at once); then read back what the step before dispatched
(append tokens, detokenize and stop: `engine.output`; offer newly full pages to the prefix cache). So the scheduler
works one step ahead: a step's work is on the devices' queue before the host reads back and postprocesses the last
one's, its inputs the tokens still on the devices (`Choice.lag`), and the devices need not wait for the host. When a
step needs the host to know the last tokens first (drafts, a preemption) it reads everything back before scheduling
(`_sync`); grammar masks are filled while the step's forward pass runs, and drawn under behind it (`_masked_step`).
Plain Python: who holds slots and pages is `engine.scheduler`'s, the device work `engine.runner`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from typing import Any, Callable

import jax
import numpy as np

from engine.params import CONTEXT, DEFAULT_MAX_TOKENS, InvalidRequest, SamplingParams
from engine.draft_model import DraftModel
from engine.speculative import MIN_NGRAM, PROBE, PROBE_SHARE, Drafter, worth_verifying
from engine.compile import Background, compile_all
from engine.detok import Detok
from engine import output
from engine import sleep as sleeping
from engine.grammar import Grammars
from engine.images import ImageRows
from engine.requests import Choice, Delta, Prefill, Request
from engine.scheduler import Scheduler
from engine.thinking import Budget, Gate
from engine.runner import EMBED_TOKENS, Dispatched, Pieces, Runner, RunnerConfig, join_pieces, kv_bytes_per_token
from engine.sampler import BAD_TOKENS, MAX_BAD, MAX_ENDS, seed_keys
from models import Model, lora, pooling

log = logging.getLogger("sparkler.engine")
CLOSE_MARGIN = 12  # tokens before the budget ends from which a JSON reply is steered to close (grammar.Matcher.fill)
# The parts of an engine step: seat queued work and launch prefills; install sampler rows and draw first tokens;
# reserve pages and dispatch the next decode (or verify drafts); read back the draws of the step before and hand
# their tokens to their choices (`collect`), and the deltas to the streams (`stream`).
PHASES = ("collect", "prefill", "first", "stream", "decode")


@dataclasses.dataclass
class Inflight:
    """A draw dispatched and not yet read back: a decode of `steps` steps, or first tokens (`steps` 1); the choices it
    draws for (by slot: a slot may have a new occupant by the time it is read back), and, for a decode, its timing
    key and start, and whether its wall time is not a step's (`compiled`: dispatching it compiled a program, or it
    ran behind a prefill dispatched in the same engine step)."""

    out: Dispatched
    choices: list[tuple[int, Choice]]
    steps: int
    key: tuple | None = None
    start: float = 0.0
    compiled: bool = True


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A LoRA adapter the engine holds: its name, folder, rank, slot, the number of its load (0, 1, ... over the
    engine's life, never reused: llama.cpp's adapter id), its file's task name and prompt prefix (`lora.Adapter`),
    and the salt of its cached pages (one per load: pages of an adapter loaded again under the name are not
    reused)."""

    name: str
    path: str
    rank: int
    slot: int
    id: int
    task_name: str = ""
    prompt_prefix: str = ""

    @property
    def salt(self) -> str:
        """The prefix-cache salt of this load's pages."""
        return f"{self.name}#{self.id}"


def _slots(mix: tuple[tuple[Loaded, float], ...]) -> tuple[tuple[int, float], ...]:
    """A mix of held adapters (`Engine._mix`) as the runner takes it: each adapter's LoRA slot and scale."""
    return tuple((a.slot, x) for a, x in mix)


class Engine:
    """Continuous batching of up to `max_num_seqs` sequences over one model's KV page pools (one per data shard)."""

    def __init__(self, model: Model, rc: RunnerConfig = RunnerConfig(), draft: Model | None = None):
        """`draft`: a smaller model of the same tokenizer that drafts every request's next `rc.draft_tokens` tokens
        (speculative decoding with a draft model; its KV pool is paged as the target's: `engine.draft_model`)."""
        self.model, self.tok = model, model.tokenizer
        # before the programs are made; one process only (another host's devices would not see the rows written)
        self.images = ImageRows(model, rc.max_images) if model.vision is not None and jax.process_count() == 1 \
            else None
        if draft is not None:
            rc = dataclasses.replace(rc, extra_kv_bytes=kv_bytes_per_token(draft))
        self.runner = Runner(model, rc)
        self.draft = DraftModel(draft, self.runner, rc.draft_tokens) if draft is not None else None
        self.max_len, self.page_size = self.runner.max_len, self.runner.page_size
        self.sched = Scheduler(self.runner, self.runner.save_row, rc.scheduling_policy)
        self.aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.incoming: queue.Queue[Request] = queue.Queue()  # (not SimpleQueue: `loads` reads what it holds)
        self._ids = itertools.count()
        self.eos = np.asarray(model.eos_ids, np.int64)
        self.steps_run = 0
        self.aborted = 0  # requests cancelled so far (a client went away)
        self.generated = 0  # tokens drawn so far
        self.finished = 0  # requests ended so far
        self.background: Background | None = None  # warm-up compiling behind serving (`warmup(background=True)`)
        self._grammars: Grammars | None = None
        self._bad: dict[tuple[str, ...], tuple] = {}  # vLLM's bad words -> what the sampler holds (`bad_words`)
        self._breakers: dict[tuple[str, ...], np.ndarray] = {}  # DRY's sequence breakers -> their tokens (`breakers`)
        self._grammars_made = threading.Lock()  # the server's parse threads, its loop and this engine's thread ask
        # (kind, batch rows, steps, a row on a LoRA adapter) -> seconds per dispatch (moving average)
        self.timing: dict[tuple, float] = {}
        self.verifies = self.drafts = 0  # verify steps run so far (speculative decoding), and the rows' drafts in them
        self.drafted = self.accepted = 0  # drafted tokens verified so far, and those kept
        # steps in a row that decoded rather than verify drafts; the seconds of their decode dispatches since the
        # draft model last drafted anyway (a probe: `_probe_due`), and what that probe took
        self.declined, self.since_probe, self.probe_s = 0, 0.0, None
        self.verify_always = False  # verify whenever a choice has a draft, whatever the timings say (tests)
        self.pending: list[Inflight] = []  # draws dispatched and not yet read back, in order
        self.overlap = True  # dispatch a step's work before reading back the step before it, when nothing needs it
        self.ahead = 0  # decodes dispatched so, some input token still on the devices (counted for the tests)
        self._prefilled = False  # this step ran a prefill (a decode dispatched after it is not timed)
        self.riders: list[int] = []  # running slots whose next token this step's flat prefill computed
        self.rode = 0  # tokens drawn so (counted for the tests)
        self._read = 0.0  # when the last decode was read back (`_collect`'s timing)
        # Host seconds spent in each part of `step` (`PHASES`), waits for the devices included: where the loop's time
        # goes, beside `Runner.device_seconds` (what of it was spent in device calls).
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self._nested = self._mark = 0.0  # seconds parts inside others counted (`_nest`), and at the last `_spent`
        # Called once first tokens read back are handed to `on_delta` (while the next draws run): a consumer that
        # batches what it gets passes them on then (`AsyncEngine`: time to first token).
        self.handed: Callable[[], None] = lambda: None
        self.adapters: dict[str, Loaded] = {}  # LoRA adapters by name (`load_adapter`)
        self._loads = itertools.count()
        # every request made with an adapter and still alive (made, queued or running): its slot is not reused
        # while the request may still run, whether or not the engine has seen it yet
        self._on_adapters: weakref.WeakValueDictionary[int, Request] = weakref.WeakValueDictionary()
        self._on_adapters_lock = threading.Lock()  # the server's threads make requests; the engine's thread loads
        self.embedded = self.embedded_tokens = 0  # inputs and their tokens embedded (`embed`)
        # what `sleep` gave back, by tag: the KV pools' bytes; the weights' `engine.sleep.Offloaded` (own, rest)
        self.asleep: dict[str, Any] = {}
        self.held: str | None = None  # generation paused (`hold`): "in_place" or "retract"; None: running

    # ---- requests ---------------------------------------------------------------------------------------------

    @property
    def default_max_tokens(self) -> int:
        """A request's max_tokens when it sets none: the generation config's `max_new_tokens` (the model's, or
        `--override-generation-config`'s), else `DEFAULT_MAX_TOKENS`; lowered to what the context leaves."""
        n = self.model.generation_config.get("max_new_tokens")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else DEFAULT_MAX_TOKENS

    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     on_delta=None, truncate: bool = True, first_choice: int = 0,
                     prompt_cache_max_len: int | None = None, prompt_cache_isolation_key: str | None = None,
                     grammar: str | None = None, thinking: Budget | None = None,
                     prediction: list[int] | None = None, grammar_checked: bool = False,
                     adapter: str | dict[str, float] | None = None, priority: int = 0,
                     images: list | None = None) -> Request:
        """Validate and resolve a request (raises `InvalidRequest`); it is queued by `add`.

        max_tokens defaults to 2048 and is lowered to fit the context; with `truncate=False` an explicit max_tokens
        that does not fit is an error instead (Fireworks' `context_length_exceeded_behavior="error"`). Choices are
        numbered from `first_choice` (a caller splitting n over several requests keeps each choice's seed stream).
        `prompt_cache_max_len` caps the prompt tokens reused from the prefix cache (0: none); requests share cached
        pages only under the same `prompt_cache_isolation_key`. `grammar` (from `engine.grammar`) constrains every
        choice; the choice ends with "stop" when the grammar is complete. `thinking` (`engine.thinking.Budget`): after
        its budget of tokens in a thinking block the engine draws the block's close itself; the grammar applies to
        the answer after the block. `prediction`: token ids the output is expected to resemble; the engine drafts
        from them (speculative decoding), which changes the speed, never the tokens. `adapter`: the name of a LoRA
        adapter held (`load_adapter`) the request runs with (None: the base model), or `{name: scale}` of those it
        runs with, each at `scale` times the scale it was trained with (llama.cpp's `lora` mixes and scales; pages
        cached under one mix serve that mix only).
        `priority`: its place in line under the priority scheduling policy (lower sooner; any other than 0 is an
        error under `fcfs`). Raises `engine.sleep.Asleep` while the engine sleeps."""
        self.awake()
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        for t in params.logit_bias:
            if not 0 <= int(t) < vocab:
                raise InvalidRequest(f"logit_bias key {t} is not a token id of this vocabulary", "logit_bias")
        if params.allowed_token_ids is not None and not (
                params.allowed_token_ids and all(0 <= t < vocab for t in params.allowed_token_ids)):
            raise InvalidRequest(f"allowed_token_ids must be a non-empty list of token ids in [0, {vocab})",
                                 "allowed_token_ids")
        if not all(0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be token ids of this vocabulary, in [0, {vocab})",
                                 "stop_token_ids")
        if params.min_tokens and len(ends := set(self.model.eos_ids) | set(params.stop_token_ids)) > MAX_ENDS:
            raise InvalidRequest(f"with min_tokens, stop_token_ids and this model's {len(self.model.eos_ids)} "
                                 f"end-of-sequence ids make {len(ends)} ending tokens; at most {MAX_ENDS}",
                                 "stop_token_ids")
        if params.n > self.runner.per_shard:  # every choice of a request sits on one data shard
            where = " of a data shard" if self.runner.dp > 1 else ""
            raise InvalidRequest(f"n={params.n} exceeds the {self.runner.per_shard} decode slots{where}", "n")
        room = self.max_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(f"This model's maximum context length is {self.max_len} tokens. However, your "
                                 f"prompt has {len(prompt_ids)} tokens, which leaves no room for a reply. Please "
                                 "reduce the length of the prompt.", "prompt", CONTEXT)
        if self.sched.pages_to_admit(len(prompt_ids), params.n) > self.sched.pools[0].capacity:
            raise InvalidRequest(f"the prompt ({len(prompt_ids)} tokens) with n={params.n} needs more KV pages than "
                                 f"the pool holds ({self.sched.pools[0].capacity} of {self.page_size} tokens)", "n")
        mix = self._mix(adapter)
        if prompt_cache_max_len is not None and prompt_cache_max_len < 0:
            raise InvalidRequest("prompt_cache_max_len must be >= 0", "prompt_cache_max_len")
        if priority and self.sched.policy != "priority":
            raise InvalidRequest("a priority other than 0 needs priority scheduling (--scheduling-policy priority)",
                                 "priority")
        p = params.resolved(self.model.generation_config)
        if not truncate and p.max_tokens is not None and p.max_tokens > room:
            raise InvalidRequest(f"This model's maximum context length is {self.max_len} tokens. However, you "
                                 f"requested {len(prompt_ids) + p.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                                 f"{p.max_tokens} in max_tokens). Please reduce the length of the prompt or "
                                 "max_tokens.", "max_tokens", CONTEXT)
        max_tokens = min(p.max_tokens if p.max_tokens is not None else self.default_max_tokens, room)
        rid = request_id or f"req-{next(self._ids)}"
        choices = [Choice(first_choice + i) for i in range(p.n)]
        if p.dry_multiplier > 0:  # off the engine's thread (the server's parse threads made them already)
            self.breakers(tuple(p.dry_sequence_breakers))
        self.bad_words(tuple(p.bad_words), p.allowed_token_ids)  # checked here; its settings use the same, cached
        if grammar is not None and not grammar_checked:  # the server checks it off its event loop, then says so
            self.grammars().check(grammar)
        if thinking is not None and ((thinking.budget or 0) < 0 or not 0 <= thinking.close_id < vocab):
            raise InvalidRequest("the thinking budget must be >= 0 and its close a token id", "reasoning_effort")
        salt = mix[0][0].salt if len(mix) == 1 and mix[0][1] == 1 else "+".join(f"{a.salt}*{x!r}" for a, x in mix)
        key = (salt, prompt_cache_isolation_key) if mix else prompt_cache_isolation_key
        if images or (self.images is not None and self.model.vision.image_token_id in prompt_ids):
            self._check_images(prompt_ids, images or [], p)
        req = Request(rid, list(prompt_ids), p, max_tokens, choices, on_delta=on_delta,
                      cache_max_len=prompt_cache_max_len, cache_key=key, grammar=grammar,
                      thinking=thinking, prediction=list(prediction) if prediction else None,
                      adapters=_slots(mix), priority=int(priority))
        if images:
            self.images.place(req, images)
        if mix:
            with self._on_adapters_lock:
                self._on_adapters[id(req)] = req
            for a, _ in mix:
                if self.adapters.get(a.name) is not a:  # unloaded meanwhile: its slot may be another's already
                    raise InvalidRequest(f"no LoRA adapter {a.name!r} is loaded", "model")
        return req

    def _mix(self, adapter: str | dict[str, float] | None) -> tuple[tuple[Loaded, float], ...]:
        """The LoRA adapters `adapter` names (as `make_request` takes it) and their scales, those at scale 0 left
        out, in slot order. Raises InvalidRequest for an adapter not loaded or a scale `lora.scale_ok` refuses."""
        named = {} if adapter is None else {adapter: 1.0} if isinstance(adapter, str) else adapter
        if not isinstance(named, dict):
            raise InvalidRequest(f"a request's LoRA adapters: a name or {{name: scale}}, not {adapter!r}", "lora")
        mix = []
        for name, scale in named.items():
            if (loaded := self.adapters.get(name)) is None:
                raise InvalidRequest(f"no LoRA adapter {name!r} is loaded", "model")
            if not lora.scale_ok(scale):
                raise InvalidRequest(f"a LoRA adapter's scale must be a number within ±{lora.MAX_SCALE:g}, not "
                                     f"{scale!r}", "lora")
            if scale != 0:
                mix.append((loaded, float(scale)))
        return tuple(sorted(mix, key=lambda pair: pair[0].slot))

    def _check_images(self, prompt_ids: list[int], images: list, p: SamplingParams) -> None:
        """A request's images fit its prompt: the model reads images, the prompt holds `tokens_per_image` image
        tokens for each, and it asks for no prompt logprobs (no text to score at an image's rows)."""
        if self.images is None:
            raise InvalidRequest("the served model reads text only here; it takes no images", "prompt")
        size, image = self.images.size, self.model.vision.image_token_id
        if (have := sum(t == image for t in prompt_ids)) != size * len(images):
            raise InvalidRequest(f"the prompt holds {have} image tokens for {len(images)} images of {size} tokens "
                                 "each", "prompt")
        if p.echo:
            raise InvalidRequest("prompt logprobs (echo) are not given for prompts with images", "logprobs")

    def breakers(self, strings: tuple[str, ...]) -> np.ndarray:
        """DRY's sequence breakers as a vocabulary mask: the tokens whose own text holds one of `strings`, as
        llama.cpp finds a breaker of one token (none without a tokenizer). Cached, a few sets."""
        mask = self._breakers.get(strings)
        if mask is None:
            mask = np.zeros(self.model.cfg.vocab_size, bool)
            if self.tok is not None:
                texts = self.tok.token_texts[:len(mask)]
                mask[:len(texts)] = [any(b in text for b in strings) for text in texts]
            if len(self._breakers) >= 8:
                self._breakers.clear()
            self._breakers[strings] = mask
        return mask

    def bad_words(self, words: tuple[str, ...], allowed: list[int] | None = None
                  ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """vLLM's `bad_words` as the sampler holds them: the words of one token (for a -inf bias), and the others'
        token sequences right-aligned in `[MAX_BAD, BAD_TOKENS]` with their lengths. Each word counts as vLLM
        tokenizes it: its text, left-stripped, and again after a space where that gives other tokens of the same
        count. Cached, a few sets; 400 past the sampler's bounds, without a tokenizer, or where they leave none of
        `allowed` (allowed_token_ids) to draw."""
        got = self._bad.get(words) or self._bad_words(words)
        if words and allowed and set(allowed) <= set(got[0]):
            raise InvalidRequest("bad_words leave none of allowed_token_ids to draw", "bad_words")
        return got

    def _bad_words(self, words: tuple[str, ...]) -> tuple[list[int], np.ndarray, np.ndarray]:
        if not words:
            return [], None, None
        if self.tok is None:
            raise InvalidRequest("bad_words needs the model's tokenizer", "bad_words")
        sequences = []
        for word in words:
            plain = self.tok.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tok.encode(" " + word.lstrip(), add_special_tokens=False)
            sequences += [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])
        single = sorted({s[0] for s in sequences if len(s) == 1})
        longer = [s for s in sequences if len(s) > 1]
        if len(longer) > MAX_BAD or any(len(s) > BAD_TOKENS for s in longer):
            raise InvalidRequest(f"bad_words: at most {MAX_BAD} token sequences of 2 to {BAD_TOKENS} tokens (as the "
                                 f"words tokenize, with and without a leading space), got {len(longer)} of up to "
                                 f"{max(map(len, longer))}", "bad_words")
        ids = np.zeros((MAX_BAD, BAD_TOKENS), np.int32)
        lengths = np.zeros(MAX_BAD, np.int32)
        for i, s in enumerate(longer):
            ids[i, BAD_TOKENS - len(s):], lengths[i] = s, len(s)
        if len(self._bad) >= 8:
            self._bad.clear()
        self._bad[words] = got = (single, ids, lengths)
        return got

    def grammars(self) -> Grammars:
        """The grammar cache for this model's tokenizer (made on first use)."""
        with self._grammars_made:
            if self._grammars is None:
                if self.tok is None:
                    raise InvalidRequest("structured output needs the model's tokenizer", "response_format")
                self._grammars = Grammars(self.tok, self.model.eos_ids)
        return self._grammars

    def close(self) -> None:
        """Stop the grammar sandbox's child process, if one was started (the engine itself holds nothing else)."""
        with self._grammars_made:
            if self._grammars is not None:
                self._grammars.sandbox.close()

    def add(self, req: Request) -> None:
        """Queue a request (thread-safe)."""
        self.incoming.put(req)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slots and pages are free at the next step (thread-safe)."""
        self.aborts.put(request_id)

    def stats(self) -> dict:
        """Slot and page occupancy and counters (read from other threads; values are a snapshot)."""
        sched = self.sched
        total = lambda attr: sum(getattr(pool, attr) for pool in sched.pools)  # noqa: E731  (over data shards)
        queried, hit = total("queried"), total("hit")
        return dict(slots=self.runner.slots, free_slots=len(sched.free), running=len(sched.running),
                    prefilling=len(sched.prefilling), waiting=sched.queued() + self.incoming.qsize(),
                    aborted=self.aborted, finished=self.finished, generated_tokens=self.generated,
                    steps=self.steps_run, compiles=self.runner.compiles, max_model_len=self.max_len,
                    kv_pages_total=total("capacity"), kv_pages_free=total("num_free"),
                    kv_pages_cached=total("num_cached"), kv_page_size=self.page_size,
                    prefix_cache_queried_tokens=queried, prefix_cache_hit_tokens=hit,
                    prefix_cache_hit_rate=round(hit / queried, 4) if queried else 0.0,
                    preemptions=sched.preemptions, step_seconds=dict(self.phase_seconds),
                    device_call_seconds=round(self.runner.device_seconds(), 6),
                    decodes_ahead=self.ahead, data_parallel_size=self.runner.dp,
                    warmup_shapes_ready=self.background.ready if self.background else 0,
                    warmup_shapes_total=self.background.total if self.background else 0,
                    lora_slots=self.model.cfg.lora_slots, lora_adapters=len(self.adapters),
                    sleep_level=self.sleep_level,
                    embedded_inputs=self.embedded, embedded_tokens=self.embedded_tokens,
                    image_slots=self.images.capacity if self.images else 0,
                    images_held=len(self.images.held) if self.images else 0,
                    images_encoded=self.images.encoded if self.images else 0,
                    spec_decode_verifies=self.verifies, spec_decode_drafts=self.drafts,
                    spec_decode_draft_tokens=self.drafted,
                    spec_decode_accepted_tokens=self.accepted,
                    spec_decode_draft_calls=self.draft.calls if self.draft else 0)

    def loads(self) -> list[dict]:
        """SGLang's load report (`/get_load`; `Scheduler.loads`), requests not yet queued counted as waiting; read
        from other threads (a snapshot)."""
        with self.incoming.mutex:  # (`queue.Queue`'s own lock: a copy of what it holds)
            arriving = tuple(self.incoming.queue)
        return self.sched.loads(arriving)

    def has_work(self) -> bool:
        """Anything waiting, running or queued."""
        sched = self.sched
        return bool(sched.queued() or sched.running or sched.prefilling or not self.incoming.empty()
                    or not self.aborts.empty() or self.pending)

    def runnable(self) -> bool:
        """Whether `step` has anything to do: any work, or while held (`hold`) or asleep (`sleep`) only what is in
        flight to read back, aborts to take, requests to queue, or running work to retract."""
        if self.held is None and not self.asleep:
            return self.has_work()
        return bool(self.pending or not self.aborts.empty() or not self.incoming.empty()
                    or self.held == "retract" and (self.sched.running or self.sched.prefilling))

    def hold(self, mode: str = "in_place") -> None:
        """Pause generating (SGLang's `/pause_generation`) from the next step on: what is in flight is read back
        and nothing more is dispatched until `release`; "in_place" keeps the running work seated with its KV
        pages, "retract" preempts it back to the queue (recomputed from its tokens when released). Engine
        thread."""
        if mode not in ("in_place", "retract"):
            raise ValueError(f"hold mode: in_place or retract, not {mode!r}")
        self.held = mode

    def release(self) -> None:
        """Generate again after `hold` (SGLang's `/continue_generation`)."""
        self.held = None

    def parked(self) -> bool:
        """Idle but for work held in the queue (`hold` after a retraction): nothing seated, nothing in flight."""
        return not self.runnable() and not self.sched.running and not self.sched.prefilling

    def flush_cache(self) -> bool:
        """Forget every cached prompt prefix (SGLang's `/flush_cache`), when nothing is seated or in flight (`parked`):
        True; else nothing is flushed (a running request may be reading them): False. Engine thread."""
        if not self.parked():
            return False
        flushed = sum(pool.flush() for pool in self.sched.pools)
        log.info("prefix cache flushed: %d pages", flushed)
        return True

    def swap_weights(self, new: Model) -> bool:
        """Serve `new`'s weights (a model of the same config and shapes, as `Server.update_weights` checks) from the
        next step on, when nothing is seated or in flight (`parked`): True, with the prefix cache and held pictures
        forgotten (computed with the old weights); else nothing changes: False. Weights asleep wake up as `new`'s
        (the KV pool sleeps on). Held after a retraction (`hold`), the work queued is recomputed with the new
        weights when released. Call it on the engine's thread."""
        if not self.parked():
            return False
        if "weights" in self.asleep:
            self._wake_weights(new)
        else:
            self.model.params = {**self.model.params, "params": new.params["params"]}
            self.model.vision_params = new.vision_params
        if self.images is not None:
            self.images.forget()
        flushed = sum(pool.flush() for pool in self.sched.pools)
        log.info("weights swapped; prefix cache flushed: %d pages", flushed)
        return True

    def sleep(self, tags: tuple[str, ...] = sleeping.TAGS, keep_weights: bool = True) -> bool:
        """Give back the devices' memory of `tags` (`engine.sleep`: "weights", "kv_cache") when nothing is seated or
        in flight (`parked`): True; else nothing changes: False. The KV pools
        are deleted (the prefix cache flushed); the weights copied to the host first, or with `keep_weights` False
        (vLLM's level 2) the model's own weights and vision tower's discarded (`wake_up` then takes new ones), the rest
        (LoRA slots, a draft model) kept; weights asleep on the host are discarded then. Warm-up shapes compiling
        meanwhile go on (they read the arrays' shapes only). Until every tag wakes up no request may be made. Engine
        thread."""
        if not self.parked():
            return False
        if "kv_cache" in tags and "kv_cache" not in self.asleep:
            flushed = sum(pool.flush() for pool in self.sched.pools)
            self.asleep["kv_cache"] = sum(p.release_pool() for p in self._pools())
            log.info("asleep: the KV pool given back (%.2f GB; %d cached pages forgotten)",
                     self.asleep["kv_cache"] / 1e9, flushed)
        if "weights" in tags and "weights" not in self.asleep:
            self._offload_weights(keep_weights)
        elif "weights" in tags and not keep_weights:  # level 2 after level 1: the host copy goes too
            self.asleep["weights"][0].host = None
        return True

    def _offload_weights(self, keep: bool) -> None:
        """`sleep`'s weights: the model's own and vision tower's kept (`keep`) or discarded, the rest kept."""
        with self._params_lock():
            own = {"params": self.model.params["params"], "vision": self.model.vision_params}
            rest = {"model": {k: v for k, v in self.model.params.items() if k != "params"},
                    "draft": self.draft.model.params if self._own_draft() else None}
            self.asleep["weights"] = sleeping.offload(own, keep), sleeping.offload(rest)
        log.info("asleep: the weights given back (%.2f GB, %s)", sum(o.nbytes for o in self.asleep["weights"]) / 1e9,
                 "kept on the host" if keep else "the model's own discarded")

    def wake_up(self, tags: tuple[str, ...] = sleeping.TAGS, new: Model | None = None) -> None:
        """Take back the devices' memory `sleep` gave back for `tags`: the weights as they were, or `new`'s where
        they were discarded (required then; a model of the same config and shapes), and the KV pools zeroed.
        Engine thread."""
        if "weights" in tags and "weights" in self.asleep:
            self._wake_weights(new)
        if "kv_cache" in tags and "kv_cache" in self.asleep:
            for pool in self._pools():
                pool.restore_pool()
            del self.asleep["kv_cache"]  # (only now: a pool that failed to come back leaves the engine asleep)
            log.info("awake: the KV pool zeroed")

    @property
    def weights_discarded(self) -> bool:
        """Whether `sleep` discarded the model's own weights (level 2): waking them takes new ones."""
        weights = self.asleep.get("weights")
        return weights is not None and weights[0].host is None

    @property
    def sleep_level(self) -> int:
        """What `sleep` has given back: 0 nothing, 1 the KV pool or the weights kept on the host, 2 the model's
        weights discarded (vLLM's levels)."""
        return 2 if self.weights_discarded else int(bool(self.asleep))

    def awake(self) -> None:
        """Raise `engine.sleep.Asleep` unless every tag is awake."""
        if self.asleep:
            raise sleeping.Asleep(f"the model is asleep ({' and '.join(sorted(self.asleep))} given back): wake it "
                                  "up first (POST /wake_up)")

    def _wake_weights(self, new: Model | None) -> None:
        """The weights back on the devices: `new`'s where given (or where they were discarded), else the host
        copy's; the LoRA slots and a draft model's as they were."""
        own, rest = self.asleep["weights"]
        if new is None and own.host is None:
            raise ValueError("the weights were discarded (level 2): wake them with new ones")
        own = {"params": new.params["params"], "vision": new.vision_params} if new is not None else \
            sleeping.restore(own)
        rest = sleeping.restore(rest)
        with self._params_lock():
            self.model.params = {"params": own["params"], **rest["model"]}
            self.model.vision_params = own["vision"]
        if self._own_draft():
            self.draft.model.params = rest["draft"]
        del self.asleep["weights"]  # (only now: weights that failed to come back leave the engine asleep)
        log.info("awake: the weights on the devices again")

    def _pools(self) -> list:
        """What holds a KV pool: the runner, and a draft model."""
        return [self.runner] + ([self.draft] if self.draft is not None else [])

    def _params_lock(self):
        """The lock under which `model.params` is replaced (the pictures' rows are written into it too), or none."""
        return self.images.lock if self.images is not None else contextlib.nullcontext()

    def _own_draft(self) -> bool:
        """A draft model other than the model itself (whose weights sleep and wake with the model's)."""
        return self.draft is not None and self.draft.model is not self.model

    def load_adapter(self, name: str, adapter: lora.Adapter) -> Loaded:
        """Hold `adapter` (`models.lora.read` for this model) under `name`, in a LoRA slot no other adapter holds
        and no request made with an adapter and not finished uses (an adapter unloaded stays with the requests using
        it until they end). Raises InvalidRequest where the model has no slots, the name is taken or no slot is
        free; `engine.sleep.Asleep` while asleep. Call on the engine's thread."""
        slots = self.model.cfg.lora_slots
        if not slots:
            raise InvalidRequest("this server holds no LoRA adapters (start it with --enable-lora)", "lora_name")
        self.awake()  # (its slots' arrays are given back while asleep)
        if name in self.adapters:
            raise InvalidRequest(f"the LoRA adapter {name!r} has already been loaded", "lora_name")
        with self._on_adapters_lock:
            using = [r for ref in self._on_adapters.valuerefs() if (r := ref()) is not None and not r.finished]
        busy = {a.slot for a in self.adapters.values()} | {slot for r in using for slot, _ in r.adapters}
        free = [s for s in range(slots) if s not in busy]
        if not free:
            raise InvalidRequest(f"each of the {slots} LoRA slots (--max-loras) holds an adapter or serves "
                                 "requests; unload one first", "lora_name")
        with self._params_lock():
            self.model.params = lora.install(self.model.params, free[0], adapter)
        self.adapters[name] = Loaded(name, adapter.path, adapter.rank, free[0], next(self._loads), adapter.task_name,
                                     adapter.prompt_prefix)
        log.info("LoRA adapter %s (rank %d) from %s in slot %d", name, adapter.rank, adapter.path, free[0])
        return self.adapters[name]

    def unload_adapter(self, name: str) -> None:
        """Forget the LoRA adapter `name`: new requests cannot name it; those queued or running finish with it.
        Raises InvalidRequest where none is held by that name."""
        if self.adapters.pop(name, None) is None:
            raise InvalidRequest(f"no LoRA adapter {name!r} is loaded", "lora_name")

    def embed(self, inputs: list[list[int]], mode: str, adapter: str | dict[str, float] | None = None,
              budget: int = EMBED_TOKENS) -> np.ndarray:
        """Embeddings of token lists: each one's final hidden states pooled by `mode` (`models.pooling`), float32
        `[len(inputs), hidden]`, with the LoRA adapters `adapter` names (as `make_request` takes it), not
        normalized, in calls of at most `budget` padded tokens (`Runner.embed_calls`). Runs at once, between steps
        (call on the engine's thread); the KV pool and its prefix cache are not touched.
        Raises InvalidRequest for an empty input, one longer than `runner.embed_sizes[-1]`, an adapter not loaded or
        a scale `lora.scale_ok` refuses; `engine.sleep.Asleep` while the engine sleeps."""
        mix = self._embedding(inputs, mode, adapter)
        out = self.runner.embed(inputs, mode, _slots(mix), budget)
        self.embedded += len(inputs)
        self.embedded_tokens += sum(map(len, inputs))
        return out

    def _embedding(self, inputs: list[list[int]], mode: str, adapter) -> tuple[tuple[Loaded, float], ...]:
        """What `embed` and `embed_next` check (awake, the pooling, each input's length, the adapters loaded at
        scales `lora.scale_ok` takes), and the adapters `adapter` names with their scales (`_mix`)."""
        self.awake()
        if mode not in pooling.POOLINGS:
            raise InvalidRequest(f"pooling: one of {pooling.POOLINGS}, not {mode!r}", "pooling")
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequest(f"input {i} has no tokens", "input")
            if len(ids) > self.runner.embed_sizes[-1]:
                raise InvalidRequest(f"input {i} has {len(ids)} tokens; at most {self.runner.embed_sizes[-1]} are "
                                     "embedded (this model's context, up to runner.EMBED_MAX_LEN)", "input")
        return self._mix(adapter)

    def embed_next(self, pieces: Pieces, adapter: str | dict[str, float] | None = None) -> None:
        """The next piece of a long input `embed` would run in one call (`Runner.embed_next`), so a server steps
        between pieces, every piece with the same adapters and scales (call on the engine's thread; one process only:
        a piece's pool is this process's, so a multi-host group embeds through the mirrored `embed`). Raises as
        `embed` does."""
        if jax.process_count() > 1:
            raise RuntimeError("a process group embeds a long input through `embed`, not piece by piece")
        mix = self._embedding([pieces.ids], pieces.mode, adapter)
        # unloaded or loaded anew since the first piece, or another scale: not a vector mixing two adapters' keys
        if pieces.start and mix != pieces.adapters:
            raise InvalidRequest(f"the LoRA adapters {adapter!r} (or their scales) changed while the input was "
                                 "embedded", "model")
        pieces.adapters = mix
        self.runner.embed_next(pieces, _slots(mix))
        if pieces.done:
            self.embedded += 1
            self.embedded_tokens += len(pieces.ids)

    def idle(self) -> None:
        """Called by a serving loop while there is no work (see `Runner.idle`)."""
        self.runner.idle()

    def warmup(self, full: bool = False, background: bool = False) -> None:
        """Compile (or load) the common shapes ahead of time, several at once (see `Runner.warm_jobs`; one-step
        decode too when the model has a tokenizer, for structured output); nothing is run. `background`: only
        `Runner.first_jobs` now, the rest on a thread while the engine serves (`self.background`; a step that needs
        a shape still compiling waits for it)."""
        jobs = self.runner.warm_jobs(full, constrained=self.tok is not None, drafts=self.draft is not None)
        jobs += self.draft.warm_jobs(self.runner.warm_lengths(full)) if self.draft is not None else []
        if self.images is not None:
            self.images.warm()
        if not background:
            compile_all(jobs, desc="compiling shapes")
            return
        compile_all(self.runner.first_jobs(), desc="first shapes")
        # a compile takes one core: a quarter of the cores compile at once (one here, four on a 16-core GPU host,
        # where the accelerators' warm-up compiles every attended length), the rest serve
        self.background = Background(jobs, workers=max(1, (os.cpu_count() or 1) // 4), yield_to=self.runnable)

    # ---- the loop body ----------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Admit and prefill, dispatch the next decode (several steps per dispatch; verify drafts at once), then read
        back what the step before dispatched. Returns requests that finished. The scheduler works one step ahead of
        the read-back: this step's work is queued on the devices before the host postprocesses the last one's, so
        tokens reach their streams one step late; a step that needs the last tokens on the host first reads them
        back before scheduling (`_sync`, and `_ahead` says when).

        A stream gets one delta per dispatch read back: each choice's tokens of all its steps, detokenized together
        (the host's work per token is then mostly per dispatch; SGLang's `--stream-interval` does the like)."""
        while not self.incoming.empty():
            self.sched.enqueue(self.incoming.get())
        done: list[Request] = []
        changed: dict[str, Request] = {}
        t = time.perf_counter()
        self._take_aborts()  # before anything in flight is read back: an aborted choice takes none of it
        if self.held is not None or self.asleep:  # paused: what is in flight read back, nothing more dispatched
            self._sync(changed, done)
            if self.held == "retract":
                self.sched.retract()
            self._emit(changed, done)
            return done
        older = list(self.pending)  # the last step's draws: read back once this step's work is dispatched
        if older and not self._ahead():
            self._sync(changed, done)
        t, programs, self._mark = time.perf_counter(), self.runner.programs(), self._nested
        prefills = self.runner.prefill_calls()
        ready = self._admit(changed, done)
        self._prefilled = self.runner.prefill_calls() != prefills  # a decode now queues behind it: not timed
        t = self._spent("prefill", t)
        self._install(ready, changed)
        t = self._spent("first", t)
        if self.sched.running and not self.riders:  # riders took this step's token with the prefill
            self._decode(changed, done)
            self._spent("decode", t)
        t = time.perf_counter()
        for inf in older:
            inf.compiled |= self.runner.programs() != programs  # a compile stalled the host inside its measured time
        while self.pending and any(self.pending[0] is inf for inf in older):
            self._collect(self.pending.pop(0), changed, done)
        self._emit(changed, done)  # and what ended without a draw (scoring a prompt alone: max_tokens 0)
        self._spent("collect", t)
        return done

    def _ahead(self) -> bool:
        """Whether this step may be scheduled and dispatched before the last step's draws are read back: no running
        choice drafts (a draft depends on its last token; a mask does too, but is filled while the step's forward
        pass runs: `_masked_step`). A choice ending in those draws (an EOS, a stop string) then runs one more step,
        whose tokens are dropped: its writes land past its tokens, in pages it held at the dispatch, and any later
        use of a freed page is dispatched after it. A draft model's rows do not hold it back while decoding wins
        and the next step is no probe (`_drafts` reads back first where it drafts after all)."""
        return self.overlap and all(c.drafter is None or (c.drafter.model and self._idle_drafts())
                                    for _, c in self.sched.running.values())

    def _idle_drafts(self) -> bool:
        """Whether the draft model will not draft next step: decoding has won and no probe is due (`_drafts`)."""
        return self.declined > 0 and not self._probe_due()

    def _probe_due(self) -> bool:
        """Whether a draft model that decoding keeps beating drafts anyway this step: after `PROBE` steps at first,
        then once the decode dispatches since the last probe took `1 / PROBE_SHARE` times what it did (a probe
        writes the tokens decoded since into the draft pool: its cost grows with the wait, its share does not)."""
        if self.probe_s is None:
            return self.declined + 1 >= PROBE
        return self.since_probe >= self.probe_s / PROBE_SHARE

    @staticmethod
    def _masked(choice: Choice, steps: int) -> bool:
        """Whether a choice may need a mask within its tokens in flight and the next `steps`: a grammar's always, a
        thinking budget's at the first token and near its end (`Gate.active`); the others draw unmasked."""
        return choice.matcher is not None and choice.matcher.active(choice.lag + steps)

    def _sync(self, changed, done) -> None:
        """Read back every draw in flight, in order, and hand out its tokens: the host then knows every token."""
        t, nested = time.perf_counter(), self._nested
        while self.pending:
            self._collect(self.pending.pop(0), changed, done)
        self._nest("collect", t, nested)

    def _reserve(self, steps: int, changed, done, more: dict[int, int] | None = None) -> None:
        """The scheduler's `reserve`; while draws are in flight, without preempting (a preempted choice is recomputed
        from its tokens, which the host must hold): if the pages run out, read everything back, then preempt."""
        if self.pending and self.sched.reserve(steps, more, preempt=False):
            return
        if self.pending:
            self._sync(changed, done)
        self.sched.reserve(steps, more)

    def _spent(self, phase: str, since: float) -> float:
        """Add the time since `since` to a phase of the step, less what parts inside it counted as theirs
        (`_nest`); returns now."""
        now = time.perf_counter()
        self.phase_seconds[phase] += now - since - (self._nested - self._mark)
        self._mark = self._nested
        return now

    def _nest(self, phase: str, since: float, nested: float) -> None:
        """Count the time since `since` to `phase`, a part inside another (handing deltas out, reading back in the
        middle of a step), less what parts inside it counted (`nested`: `_nested` at `since`): each second once."""
        took = time.perf_counter() - since - (self._nested - nested)
        self.phase_seconds[phase] += took
        self._nested += took

    def _emit(self, changed: dict[str, Request], done: list[Request]) -> None:
        """Hand each changed request its deltas since the last call."""
        t, nested = time.perf_counter(), self._nested
        for req in changed.values():
            deltas = [d for c in req.choices if (d := output.delta(c)) is not None]
            if req.on_delta and deltas:
                req.on_delta(req, deltas)
            if any(d.finish_reason for d in deltas) and req.finished:  # its last choice's final delta is here
                done.append(req)
                self.finished += 1
        changed.clear()
        self._nest("stream", t, nested)

    def _take_aborts(self) -> None:
        ids = set()
        while not self.aborts.empty():
            ids.add(self.aborts.get())
        if ids:
            cancelled = self.sched.cancel(ids)
            self.aborted += len(cancelled)
            for req in cancelled:  # their last deltas (finish_reason "abort"), to a consumer still listening
                deltas = [d for c in req.choices if (d := output.delta(c)) is not None]
                if req.on_delta and deltas:
                    req.on_delta(req, deltas)

    # ---- admission and prefill ------------------------------------------------------------------------------

    def _admit(self, changed, done) -> list[Prefill]:
        """Seat queued work (the scheduler's `admit`) and prefill: short prompts now, several per call; the next
        chunks of long ones (one chunk of one prompt at a time for prompt logprobs), so the streams already running
        keep flowing meanwhile. With the flat step (`Runner.flat`) they are one call, and the running choices'
        next tokens ride in it (`riders`; not while any drafts, nor while any may need a mask: a draft and a mask
        depend on tokens not read back yet, and a masked step fills its masks while its own forward pass runs; a
        rider's token not read back yet is taken on the devices). Returns the work now prefilled, to install."""
        sched, tables, flat = self.sched, self.sched.tables, self.runner.flat
        self.riders = []
        riding = flat and sched.running and all((c.drafter is None or (c.drafter.model and self._idle_drafts()))
                                                and not self._masked(c, 1) for _, c in sched.running.values())
        if riding:  # the running choices' next positions first, before seating more (it may preempt the newest)
            self._reserve(1, changed, done)
        preempt = sched.outranked()  # more urgent work waits behind less urgent seats (the priority policy)
        if preempt and self.pending:  # a preempted choice is recomputed from its tokens: the host must hold them
            self._sync(changed, done)
        admitted = sched.admit(preempt)
        if self.runner.lora_weights is not None and admitted:
            self.runner.seat_adapters({c.slot: pf.req.adapters for pf in admitted for c in pf.choices})
        if sched.copies:  # cached pages that admitted prompts go on from, copied before anything writes them
            self.runner.copy_pages(sched.copies)
            sched.copied()
        short = [pf for pf in admitted if pf.short]
        items = [(pf.choices[0].slot, tables[pf.choices[0].slot], pf.tokens, pf.start) for pf in short]
        if short and not flat:
            self.runner.prefill_many(items)
        work = sched.chunks()
        if work and work[0][0].echo:
            pf = work[0][0]
            slot = pf.choices[0].slot
            # the whole prompt: the chunk's last logprob reads the token after it (echo is refused with pictures, so
            # `_whole` never cuts an echo chunk)
            pf.pieces.append(self.runner.prefill_chunk(slot, tables[slot], pf.tokens, pf.start, True))
        elif work:
            chunks = [(pf.choices[0].slot, tables[pf.choices[0].slot], pf.tokens[:pf.start + n], pf.start)
                      for pf, n in work]
            if not flat:
                self.runner.prefill_many(chunks)
            items += chunks
        if flat and items:
            batch = sched.batch() if riding else None
            self.riders = self._going() if riding else []
            self.runner.prefill_flat(items, [(s, tables[s], None if batch.fresh[s] else batch.tokens[s],
                                              batch.positions[s]) for s in self.riders])
        ready = sched.advance(work)
        for pf in ready:
            if pf.echo:
                pf.req.prompt_logprobs = join_pieces(pf.pieces)
        return short + ready

    def _install(self, ready: list[Prefill], changed) -> None:
        """Prefilled choices start decoding. New requests: map the prompt's full pages into every choice and copy a
        partial last page, install sampler rows, draw first tokens. Resumed choices: put their sampler row back."""
        sched, new_rows, copies = self.sched, {}, []  # new slot -> the slot whose prefill logits it draws from
        rows = {}  # sampler rows to install (settings, state): fresh ones, and resumed choices' saved ones
        for pf in ready:
            req, first = pf.req, pf.choices[0]
            sched.register(req, first)
            if pf.resume:
                rows[first.slot], first.saved = (self._settings(req), first.saved), None
                sched.running[first.slot] = (req, first)
                continue
            if req.max_tokens == 0:  # scoring only (echo + logprobs): no token is drawn
                for choice in req.choices:
                    sched.unseat(choice)
                    choice.finish_reason = "length"
                changed[req.id] = req
                continue
            p = req.params
            copies += sched.fork(req)
            settings = self._settings(req)
            for choice, key in zip(req.choices, seed_keys(p.seed, len(req.choices))):
                if req.grammar is not None:
                    choice.matcher = self.grammars().matcher(req.grammar)
                if req.thinking is not None:
                    choice.matcher = Gate(req.thinking, choice.matcher)
                rows[choice.slot] = settings, self.runner.fresh_row(settings, req.client_ids, key)
                choice.stops = p.stop
                choice.drafter = self._drafter(req)
                choice.detok = Detok(self.tok, req.params.skip_special_tokens) if self.tok is not None else None
                sched.running[choice.slot] = (req, choice)
                new_rows[choice.slot] = first.slot
        sched.admitting = []
        if copies:
            self.runner.copy_pages(copies)
        if rows:
            self.runner.install_rows(rows)
        sources = {**new_rows, **{slot: slot for slot in self.riders}}  # riders draw from their own rows
        if not sources:
            return
        choices = [(slot, sched.running[slot][1]) for slot in sorted(sources)]
        self.pending.append(Inflight(self.runner.draw(sources, self._allowed(sources, 1)), choices, 1))
        for _, choice in choices:
            choice.lag += 1
        if self.riders:
            self.steps_run += 1
            self.rode += len(self.riders)

    def _settings(self, req: Request) -> dict:
        """A request's sampler row: its settings, logit bias (EOS suppressed for ignore_eos, every token but the
        allowed_token_ids, bad words of one token), ending tokens (what min_tokens holds back), bad words of more, and
        where DRY is on its sequence breakers."""
        p = req.params
        vocab = self.model.cfg.vocab_size
        bias = np.zeros(vocab, np.float32)
        if p.allowed_token_ids is not None:
            bias[:] = -np.inf
            bias[np.asarray(p.allowed_token_ids, np.int64)] = 0.0
        for t, b in p.logit_bias.items():
            bias[int(t)] += b
        if p.ignore_eos:
            bias[self.eos] = -np.inf
        ends = np.full(MAX_ENDS, vocab, np.int32)  # past the vocabulary: no token
        if p.min_tokens:
            held = sorted(set(self.model.eos_ids) | set(p.stop_token_ids))
            ends[:len(held)] = held
        single, ids, lengths = self.bad_words(tuple(p.bad_words))
        bias[single] = -np.inf
        row = {**p.sampler_row(), "bias": bias, "ends": ends}
        if ids is not None:
            row.update(bad_words=ids, bad_len=lengths)
        if p.dry_multiplier > 0:
            row["breakers"] = self.breakers(tuple(p.dry_sequence_breakers))
        return row

    # ---- decode and preemption --------------------------------------------------------------------------------

    def _allowed(self, slots, steps: int) -> np.ndarray | None:
        """Bitmasks of the next allowed tokens for the choices in `slots` that may need a mask within a dispatch of
        `steps` (`_masked`; None: none does, so the call is unconstrained)."""
        running = self.sched.running
        rows = {s: running[s][1].matcher for s in slots if self._masked(running[s][1], steps)}
        if not rows:
            return None
        allowed = self.runner.all_allowed.copy()
        for slot, m in rows.items():
            req, choice = running[slot]
            m.fill(allowed[slot], closing=self._left(req, choice) <= min(CLOSE_MARGIN, req.max_tokens // 3))
        return allowed

    def _limit(self, req: Request) -> int:
        """The most tokens a choice of `req` may hold (max_tokens, and the context)."""
        return min(req.max_tokens, self.max_len - len(req.prompt_ids))

    def _left(self, req: Request, choice: Choice) -> int:
        """Tokens a running choice may still draw."""
        return self._limit(req) - len(choice.token_ids)

    def _drafter(self, req: Request) -> Drafter | None:
        """A new choice's draft source: the request's prediction, else n-gram lookup when the engine drafts so; none
        under a thinking budget (the block's close is drawn by the host)."""
        if req.thinking is not None or not self.runner.rc.draft_tokens:
            return None
        if req.prediction:
            return Drafter(np.asarray(req.prediction, np.int64), 1, expect=self.runner.rc.draft_tokens / 2)
        if self.draft is not None:
            return Drafter(None, 0, expect=self.runner.rc.draft_tokens / 2, model=True)
        return Drafter(None, MIN_NGRAM) if self.runner.rc.ngram else None

    def _drafts(self, steps: int, changed, done) -> dict[int, list[int]]:
        """Each running choice's draft (slots without one left out), when a verify step is expected to give more
        tokens per second than a decode dispatch of `steps` (by the timings measured at this batch size, a draft
        model's call counted with the verify); else {}. A draft model drafts only once that is decided, and while
        decoding wins, at probes (`_probe_due`), whose unverified drafts keep the expectations current; it reads the
        draws in flight back first."""
        drafts, k, running = {}, self.runner.rc.draft_tokens, self.sched.running
        left = {slot: self._left(req, choice) for slot, (req, choice) in running.items()}
        rooms = {slot: room for slot, (req, choice) in running.items()  # none under a thinking budget
                 if choice.drafter is not None and (room := self._room(req, choice, left[slot])) > 0}
        modelled = [slot for slot in rooms if running[slot][1].drafter.model]
        for slot, room in rooms.items():
            req, choice = running[slot]
            if not choice.drafter.model:
                draft = choice.drafter.propose(req.client_ids, choice.token_ids, min(k, room))
                if choice.matcher is not None:
                    draft = choice.matcher.accepted(draft)
                if draft:
                    drafts[slot] = draft
        if not drafts and not modelled:
            return {}
        nb = self.runner.rows_for(list(running))
        # per running choice: (tokens it may still draw, expected accepted drafts)
        sizes = {**{slot: len(d) for slot, d in drafts.items()}, **{slot: min(k, rooms[slot]) for slot in modelled}}
        rows = [(left[slot], min(sizes[slot], choice.drafter.expect) if slot in sizes else 0.0)
                for slot, (_, choice) in running.items()]
        lora = self._on_lora(list(running))
        verify_s, decode_s = self.timing.get(("verify", nb, 1, lora)), self.timing.get(("decode", nb, steps, lora))
        if modelled and verify_s is not None:
            draft_s = self.timing.get(("draft", self.runner.rows_for(modelled)))
            verify_s = None if draft_s is None else verify_s + draft_s  # untimed: tried first
        verifying = self.verify_always or worth_verifying(rows, steps, verify_s, decode_s)
        probe = not verifying and self._probe_due()
        if modelled and (verifying or probe) and self.pending:  # the draft model needs the last tokens
            self._sync(changed, done)
            return self._drafts(steps, changed, done)
        if verifying:
            self.declined, self.since_probe = 0, 0.0
        else:
            self.declined += 1
            self.since_probe += decode_s or 0.0
        if modelled and (verifying or probe):
            start = time.perf_counter()
            drafts.update(self._model_drafts(modelled, rooms, timed=verifying))
            if probe:
                self.probe_s, self.since_probe = time.perf_counter() - start, 0.0
        if verifying:
            return drafts
        for slot, draft in drafts.items():  # decoded instead: the tokens will tell how the draft would have done
            running[slot][1].drafter.unverified = draft
        return {}

    def _model_drafts(self, slots: list[int], rooms: dict[int, int], timed: bool) -> dict[int, list[int]]:
        """The draft model's drafts for running `slots` (each cut to its room and, constrained, to what its grammar
        accepts), their positions' pages reserved first where the pool has them (elsewhere the draft's K/V go to
        the scratch page and only its acceptance suffers). `timed`: the call's time is what a verify step adds
        (a probe's catches up on the tokens decoded since the last: not timed)."""
        k, running = self.runner.rc.draft_tokens, self.sched.running
        self.sched.reserve(1, {slot: min(k, rooms[slot]) - 1 for slot in slots}, preempt=False)
        args = ({slot: ((id(running[slot][1]), running[slot][1].order), running[slot][0].prompt_ids,
                        running[slot][1].token_ids) for slot in slots}, self.sched.tables)
        got = (self._timed_call(("draft", self.runner.rows_for(slots)), self.draft.propose, *args) if timed
               else self.draft.propose(*args))
        out = {}
        for slot, draft in got.items():
            draft = draft[:rooms[slot]]
            if (matcher := running[slot][1].matcher) is not None:
                draft = matcher.accepted(draft)
            if draft:
                out[slot] = draft
        return out

    def _room(self, req: Request, choice: Choice, left: int) -> int:
        """The most tokens a running choice may draft: one less than it may draw, and none into a constrained
        choice's closing window (its masks depend on the draw)."""
        if choice.matcher is not None:
            return min(left - 1, left - min(CLOSE_MARGIN, req.max_tokens // 3) - 1)
        return left - 1

    def _on_lora(self, slots) -> int:
        """Which programs the running choices in `slots` run, timed apart (`Runner._adapters`): 0, those without the
        LoRA terms; 1, with them, each row on one adapter at most; 2, some row mixes several."""
        running = self.sched.running
        return min(2, max((len(running[s][0].adapters) for s in slots if s in running), default=0))

    def _timed_call(self, key: tuple, fn, *args):
        """Run a device call and fold its wall time into `timing[key]` (unless it compiled a program)."""
        count = lambda: self.runner.programs() + (self.draft.programs() if self.draft else 0)  # noqa: E731
        start, programs = time.perf_counter(), count()
        out = fn(*args)
        if count() == programs:
            self._time(key, time.perf_counter() - start)
        return out

    def _time(self, key: tuple, took: float) -> None:
        self.timing[key] = took if key not in self.timing else 0.7 * self.timing[key] + 0.3 * took

    def _decode(self, changed, done) -> None:
        """Verify drafts (read back at once), or dispatch a decode (read back by the next step)."""
        sched, running = self.sched, self.sched.running
        if self.pending and not self._ahead():
            self._sync(changed, done)  # a draft needs the last token on the host
        steps = self.runner.rc.decode_steps
        if sched.prefilling:  # prompts' chunks wait: their next chunks (and first tokens) come after one step, while
            steps = 1  # the running streams still get a token each step (vLLM's chunked prefill)
        masked = any(self._masked(c, steps) for _, c in running.values())
        if masked:
            steps = 1  # the host gives each constrained token its mask
        drafts = self._drafts(steps, changed, done)
        if drafts:
            self._reserve(1, changed, done, {slot: len(d) for slot, d in drafts.items()})
        else:
            self._reserve(steps, changed, done)
        going = self._going()
        if not going:
            return
        batch = sched.batch(going)
        drafts = {slot: d for slot, d in drafts.items() if slot in running}  # not preempted by the reserve
        if not drafts:
            if masked:
                self._masked_step(batch, changed, done)
            else:
                self._dispatch(batch, steps)
            return
        allowed = self._allowed(going, steps)
        nb = self.runner.rows_for(going)
        b, w = self.runner.slots, self.runner.rc.draft_tokens + 1
        wide, ndraft = np.zeros((b, w), np.int32), np.zeros(b, np.int32)
        wide[:, 0] = batch.tokens
        for slot, d in drafts.items():
            wide[slot, 1:1 + len(d)], ndraft[slot] = d, len(d)
        masks = None
        if allowed is not None:  # this step's masks, then a constrained draft's for each prefix it drafts
            masks = np.repeat(allowed[:, None], w, axis=1)
            for slot, d in drafts.items():
                if running[slot][1].matcher is not None:
                    running[slot][1].matcher.draft_masks(d, masks[slot])
        outs, kept = self._timed_call(("verify", nb, 1, self._on_lora(going)), self.runner.verify, wide,
                                      batch.positions, ndraft, batch.active, sched.tables, masks)
        self.verifies += 1
        self.drafts += len(drafts)
        for slot, d in drafts.items():
            accepted = int(kept[:, slot].sum()) - 1
            running[slot][1].drafter.record(len(d), accepted)
            self.drafted += len(d)
            self.accepted += accepted
        self.steps_run += 1
        self._take(outs, kept, [(slot, running[slot][1]) for slot in going], changed, done)

    def _dispatch(self, batch, steps: int) -> None:
        """Dispatch a decode of `steps` over the batch's active slots (the inputs of its `fresh` rows still on the
        devices); it is read back by the next step (`_collect`)."""
        slots = np.flatnonzero(batch.active).tolist()
        key = ("decode", self.runner.rows_for(slots), steps, self._on_lora(slots))
        programs = self.runner.programs()
        out = self.runner.decode(batch.tokens, batch.positions, batch.active, self.sched.tables, steps, batch.fresh)
        choices = [(slot, self.sched.running[slot][1]) for slot in slots]
        for _, choice in choices:
            choice.lag += steps
        self.pending.append(Inflight(out, choices, steps, key, time.perf_counter(),
                                     self._prefilled or self.runner.programs() != programs))
        self.ahead += bool(batch.fresh.any())
        self.steps_run += steps

    def _masked_step(self, batch, changed, done) -> None:
        """A step some draw of which needs a mask, which depends on the tokens in flight: dispatch the step's forward
        pass, read those tokens back and fill the masks while it runs, then dispatch the draw under them, read back
        by the next step as a decode of one step is (SGLang overlaps grammar and forward so). A choice that ended in
        the tokens read back draws nothing; its forward pass wrote past its tokens, as `_ahead` says."""
        slots = np.flatnonzero(batch.active).tolist()
        choices = [(slot, self.sched.running[slot][1]) for slot in slots]
        start, programs = time.perf_counter(), self.runner.programs()
        self.runner.decode_logits(batch.tokens, batch.positions, batch.active, self.sched.tables, batch.fresh)
        self.ahead += bool(batch.fresh.any())
        self._sync(changed, done)
        live = [(slot, c) for slot, _, c in self._seated(choices) if c.finish_reason is None]
        if not live:
            return
        sources = {slot: slot for slot, _ in live}
        out = self.runner.draw(sources, self._allowed(sources, 1))
        for _, choice in live:
            choice.lag += 1
        # read back as a decode of one step is (timed as one: what a verify step is weighed against)
        key = ("decode", self.runner.rows_for(slots), 1, self._on_lora(slots))
        self.pending.append(Inflight(out, live, 1, key, start,
                                     self._prefilled or self.runner.programs() != programs))
        self.steps_run += 1

    def _collect(self, inf: Inflight, changed, done) -> None:
        """Read a dispatched draw back and hand its tokens to their choices (those still running: not ended, nor
        aborted, meanwhile)."""
        outs = inf.out.result()
        end = time.perf_counter()
        for _, choice in inf.choices:
            choice.lag -= inf.steps
        if inf.key is None:  # first tokens (and riders' next ones)
            running = self.sched.running
            for slot, req, choice in self._seated(inf.choices):
                if choice.finish_reason is None:
                    self._add(req, choice, output.append, outs, (slot,))
                    changed[req.id] = req
            self._emit(changed, done)
            self.handed()
            for req, choice in running.values():
                self.sched.register(req, choice)  # pages the riders filled, to the prefix cache
            return
        if not inf.compiled:  # its device time began when it was dispatched, or when the one before it ended
            self._time(inf.key, end - max(inf.start, self._read))
        self._read = end
        if outs.token.ndim == 1:  # a masked step's draw (`_masked_step`): one step's outputs
            outs = dataclasses.replace(outs, **{f.name: getattr(outs, f.name)[None] for f in dataclasses.fields(outs)})
        self._take(outs, np.ones((outs.token.shape[0], self.runner.slots), bool), inf.choices, changed, done)

    def _seated(self, choices: list[tuple[int, Choice]]) -> list[tuple[int, Request, Choice]]:
        """Those of `(slot, choice)` still running in their slot (a slot may have a new occupant), with requests."""
        running = self.sched.running
        return [(slot, running[slot][0], c) for slot, c in choices if slot in running and running[slot][1] is c]

    def _going(self) -> list[int]:
        """The running slots whose tokens in flight do not reach their end (the next step draws for them)."""
        return [s for s, (req, c) in sorted(self.sched.running.items()) if self._left(req, c) > c.lag]

    def _take(self, outs, kept: np.ndarray, choices: list[tuple[int, Choice]], changed, done) -> None:
        """Hand each still-running choice of `choices` (slot, choice) its kept outputs (`[steps, slots]`) at once, one
        delta for all of them; then offer newly full pages to the prefix cache."""
        sched = self.sched
        mine = self._seated(choices)
        shadows = [(c, len(c.token_ids)) for _, _, c in mine if c.drafter and c.drafter.unverified]
        for slot, req, choice in mine:
            steps = np.flatnonzero(kept[:, slot])
            if choice.finish_reason is None and steps.size:
                self._add(req, choice, output.extend, outs, steps, slot)
                changed[req.id] = req
        self._emit(changed, done)
        for choice, n in shadows:
            choice.drafter.shadow(choice.token_ids[n:])
        for req, choice in sched.running.values():
            sched.register(req, choice)

    def _add(self, req: Request, choice: Choice, add: Callable, *args) -> None:
        """Hand a choice tokens drawn for it (`output.extend` or `output.append` with `args`), count them, and
        retire it if they end it."""
        n = len(choice.token_ids)
        reason = add(choice, req.params, *args, self._limit(req), self.model.eos_ids)
        self.generated += len(choice.token_ids) - n
        if reason:
            self._finish(choice, reason)

    def _finish(self, choice: Choice, reason: str) -> None:
        if choice.detok is not None and reason in ("stop", "length") and not choice.cut:
            choice.text += choice.detok.flush()  # tokens of a character that never finished
        choice.finish_reason = reason
        self.sched.retire(choice)

    def fail_all(self) -> list[tuple[Request, list[Delta]]]:
        """After a step raised: end every request in flight (queued, admitted, prefilling, preempted, running) with
        finish_reason "error", free every slot and page they held, and return each with the final deltas to hand it."""
        while not self.incoming.empty():
            self.sched.enqueue(self.incoming.get())
        self.pending = []  # their outputs are dropped
        out = []
        for req in self.sched.clear():
            ended = [c for c in req.choices if c.finish_reason is None]
            for c in ended:
                c.finish_reason = "error"
            out.append((req, [Delta(c.index, "", [], [], "error") for c in ended]))
        return out
