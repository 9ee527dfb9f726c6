"""Offline API in the manner of vLLM's `LLM`, and the async streaming front the server uses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import queue
import threading
from typing import Any, AsyncIterator

import jax
import numpy as np

from engine import beam
from engine import sleep as sleeping
from engine.draft_model import from_config
from engine.engine import Engine
from engine.grammar_sandbox import SERVING_STACK, Busy
from engine.requests import Delta, Request
from engine.params import SamplingParams
from engine.runner import RunnerConfig
from models import Model, load_model, lora, vision
from models import pooling as pooling_of

log = logging.getLogger("sparkler.engine")


@dataclasses.dataclass
class CompletionOutput:
    """One choice: text, token ids, per-token logprobs `(id, logprob, [(id, logprob)...])`, finish reason."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[tuple]
    finish_reason: str | None
    cumulative_logprob: float | None = None  # beam search: the tokens' summed log-probability


@dataclasses.dataclass
class RequestOutput:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    drafted: int = 0  # drafted tokens verified (speculative decoding)
    accepted: int = 0  # drafted tokens kept


def to_output(req: Request) -> RequestOutput:
    """Snapshot a request's result."""
    return RequestOutput(req.id, req.client_ids, req.prompt_logprobs,
                         [CompletionOutput(c.index, c.text, list(c.token_ids), list(c.logprobs), c.finish_reason)
                          for c in req.choices], req.cached_tokens, req.drafted, req.accepted)


def encode_prompt(model: Model, prompt: str | list[int]) -> list[int]:
    """Token ids of a completion prompt (ids pass through; text gets the tokenizer's special tokens)."""
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt)
    return list(prompt)


def chat_prompt(model: Model, messages: list[dict]) -> str:
    """The chat template applied with the generation prompt."""
    return model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(model: Model, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt (the template writes any special tokens itself)."""
    return model.tokenizer.encode(chat_prompt(model, messages), add_special_tokens=False)


class LLM:
    """`LLM(model).generate(prompts, params)` / `.chat(conversations, params)` for offline batches. With
    `enable_lora`, `max_loras` LoRA adapters of rank up to `max_lora_rank` (`load_lora`) serve prompts that name
    them (`lora=`)."""

    def __init__(self, model: str | Model = "smollm2-135m-instruct", enable_lora: bool = False, max_loras: int = 4,
                 max_lora_rank: int = 16, speculative_config: dict | None = None, **runner: Any):
        """`speculative_config`: vLLM's, `{"model": a draft model (name, folder, file or `Model`),
        "num_speculative_tokens": K}` or `{"method": "ngram", ...}` (`engine.draft_model.from_config`)."""
        draft, spec = from_config(speculative_config) if speculative_config else (None, {})
        runner = {**spec, **runner}
        # what loads the model's weights again after a sleep of level 2 (None: a `Model` was given)
        self._reload = None if isinstance(model, Model) else functools.partial(
            load_model, model, max_model_len=runner.get("max_model_len", 0))  # (the context picks LongRoPE's
        if not isinstance(model, Model):  # factors: `config._inv_freq`)
            model = self._reload()
        if draft is not None and not isinstance(draft, Model):
            draft = load_model(draft, max_model_len=runner.get("max_model_len", 0))
        self.model = model
        if enable_lora:
            self.model = lora.attach(self.model, max_loras, max_lora_rank)
        self.engine = Engine(self.model, RunnerConfig(**runner), draft=draft)

    def load_lora(self, name: str, path: str) -> None:
        """Load the LoRA adapter at `path` (a PEFT folder or a GGUF file) as `name`."""
        self.engine.load_adapter(name, lora.read(path, self.model))

    def sleep(self, level: int = 1) -> None:
        """Give back the devices' memory (vLLM's `LLM.sleep`): level 1 keeps the weights on the host, level 2
        discards them (`wake_up` then loads them again); the KV pool is dropped. Generating meanwhile raises
        `engine.sleep.Asleep`."""
        if level not in (1, 2):
            raise ValueError(f"sleep level: 1 or 2, not {level!r}")
        if level == 2 and self._reload is None:
            raise ValueError("sleep level 2 discards the weights: it needs an LLM that loaded its model by name")
        if not self.engine.sleep(keep_weights=level == 1):
            raise RuntimeError("the engine has work in flight: it cannot sleep now")

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory back (vLLM's `LLM.wake_up`), for `tags` ("weights", "kv_cache"; all by default)."""
        tags = tuple(tags or sleeping.TAGS)
        if unknown := set(tags) - set(sleeping.TAGS):
            raise ValueError(f"wake_up tags: {sorted(unknown)} are not among {list(sleeping.TAGS)}")
        discarded = "weights" in tags and self.engine.weights_discarded
        self.engine.wake_up(tags, self._reload() if discarded else None)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, predictions=None,
                 lora: str | dict | list[str | dict | None] | None = None, **cache: Any) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion; outputs in prompt order. A model that reads images takes
        vLLM's prompt dicts too, `{"prompt": text (or "prompt_token_ids": ids), "multi_modal_data": {"image": a PIL
        image or a list}}`, one image token in the prompt for each picture. `predictions`: the expected output of
        each prompt (text or token ids, None for none; speculative decoding drafts from it). `lora`: the LoRA
        adapter of every prompt, or of each (None: the base model; `{name: scale}`: several, each at a multiple of
        its own scale, llama.cpp's mixes). `cache` takes `prompt_cache_max_len` and
        `prompt_cache_isolation_key` (see `Engine.make_request`)."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)) \
            else prompts
        pictured = [self._pictured(p) for p in prompts]
        return self._run([ids for ids, _ in pictured], params, predictions, lora, cache,
                         [pictures for _, pictures in pictured])

    def _pictured(self, prompt) -> tuple[list[int], list]:
        """A prompt's ids, each image token repeated to a picture's length, and its pictures as `Engine.make_request`
        takes them (`engine.images`)."""
        if not isinstance(prompt, dict):
            return encode_prompt(self.model, prompt), []
        if "prompt_token_ids" not in prompt and "prompt" not in prompt:
            raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
        ids = encode_prompt(self.model, prompt["prompt_token_ids"] if "prompt_token_ids" in prompt
                            else prompt["prompt"])
        pictures = (prompt.get("multi_modal_data") or {}).get("image", [])
        pictures = list(pictures) if isinstance(pictures, (list, tuple)) else [pictures]
        if any(isinstance(p, np.ndarray) for p in pictures):  # vLLM takes HWC uint8 arrays too
            from PIL import Image

            pictures = [Image.fromarray(np.asarray(p, np.uint8)) if isinstance(p, np.ndarray) else p
                        for p in pictures]
        if pictures and self.engine.images is None:
            raise ValueError("multi_modal_data: this model reads text only")
        if not pictures:
            return ids, []
        try:
            ids = vision.expand(ids, self.model.vision, len(pictures))
        except ValueError as e:
            raise ValueError(f"the prompt {e} (one each)") from None
        return ids, [self.engine.images.encode(vision.preprocess(p, self.model.vision)) for p in pictures]

    def chat(self, conversations, params: SamplingParams | list[SamplingParams] | None = None, predictions=None,
             lora: str | dict | list[str | dict | None] | None = None, **cache: Any) -> list[RequestOutput]:
        """Run one conversation (a list of messages) or several through the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([encode_chat(self.model, c) for c in conversations], params, predictions, lora, cache)

    def beam_search(self, prompts, beam_width: int = 4, max_tokens: int = 16, length_penalty: float = 1.0,
                    ignore_eos: bool = False) -> list[RequestOutput]:
        """Beam search per prompt (text or token ids; vLLM's `LLM.beam_search`, transformers' `num_beams`
        algorithm: `engine.beam`): each output's `beam_width` hypotheses, best first by summed log-probability over
        length ** `length_penalty`, with their `cumulative_logprob`. Every step runs each running beam as a
        one-token request; the prefix cache serves what the beams share."""
        ids = [encode_prompt(self.model, p) for p in ([prompts] if isinstance(prompts, str) or
                                                       (prompts and isinstance(prompts[0], int)) else prompts)]
        eos = self.model.eos_ids
        beam.check_width(beam_width, eos, ignore_eos, self.engine.runner.rc.logprobs_mode)
        if max_tokens < 1 or not -10 <= length_penalty <= 10:
            raise ValueError(f"beam search needs max_tokens >= 1 and length_penalty in [-10, 10], got {max_tokens} "
                             f"and {length_penalty}")
        room = [self.engine.max_len - len(p) for p in ids]  # each beam's prompt and tokens within the context
        if min(room, default=1) < 1:
            raise ValueError(f"a prompt fills the context ({self.engine.max_len} tokens)")
        searches = [beam.BeamSearch(beam_width, min(max_tokens, r), eos, length_penalty, ignore_eos) for r in room]
        while ran := beam.runs(searches, ids):
            outs = self.generate([seq for _, seq in ran], [beam.step_params(s) for s, _ in ran])
            if bad := next((o for o in outs if o.outputs[0].finish_reason not in ("stop", "length")), None):
                raise RuntimeError(f"a beam's step ended with finish_reason {bad.outputs[0].finish_reason!r}")
            beam.advance(ran, [o.outputs[0].logprobs for o in outs])
        tok = self.model.tokenizer
        return [RequestOutput(f"beam-{i}", p, None, [
            CompletionOutput(j, beam.text(tok, b) if tok else "", list(b.tokens), [],
                             "stop" if b.ended else "length", b.logprob)
            for j, b in enumerate(s.finished)]) for i, (s, p) in enumerate(zip(searches, ids))]

    def embed(self, prompts, pooling: str | None = None, normalize: bool | None = None,
              lora: str | dict | None = None) -> np.ndarray:
        """Embeddings of prompts (text or token ids; vLLM's `LLM.embed`): float32 `[len(prompts), hidden]`, the
        final hidden states pooled (`models.pooling`: as the model folder asks, or by `pooling`) and normalized
        (as it asks, or as `normalize` says), with LoRA adapter `lora` (None: the base model; `{name: scale}`: as
        `generate` takes it)."""
        prompts = _prompts(prompts)
        mode, norm = pooling_of.default(self.model.source)
        vectors = self.engine.embed([encode_prompt(self.model, p) for p in prompts], pooling or mode, lora)
        return pooling_of.finish(vectors, norm if normalize is None else normalize)

    def score(self, text_1, text_2, pooling: str | None = None, lora: str | dict | None = None) -> np.ndarray:
        """Scores of text pairs (as vLLM's `LLM.score`, as an array), one `text_1` against every `text_2` or the two
        lists item by item; float32 `[len(text_2)]`: a cross-encoder's relevance of each pair of strings joined by
        the tokenizer (a folder of `...ForSequenceClassification` with one label; `pooling` does not apply), else
        the cosine similarity of each pair's pooled vectors."""
        one, two = _prompts(text_1), _prompts(text_2)
        if len(one) not in (1, len(two)) or not two:
            raise ValueError(f"score: {len(one)} text_1 for {len(two)} text_2 (give one, or as many)")
        if (head := self._head) is not None:
            if head.weight.shape[0] != 1 or not all(isinstance(t, str) for t in one + two):
                raise ValueError("score: a cross-encoder scores pairs of strings, with a head of one label")
            tok, firsts = self.model.tokenizer, one * len(two) if len(one) == 1 else one
            pairs = [tok.encode(a, text_pair=b) for a, b in zip(firsts, two)]
            return pooling_of.relevance(self.engine.embed(pairs, "last", lora), head)
        vectors = self.embed(one + two, pooling, False, lora)
        left = [0] * len(two) if len(one) == 1 else list(range(len(one)))
        return pooling_of.cosines(vectors[left], vectors[len(one):])

    @functools.cached_property
    def _head(self) -> pooling_of.Head | None:
        """The served cross-encoder's classification head (None: not a cross-encoder)."""
        return pooling_of.classifier(self.model.source)

    def _run(self, ids: list[list[int]], params, predictions, adapters, cache: dict,
             pictures: list | None = None) -> list[RequestOutput]:
        params = params or SamplingParams()
        pictures = pictures or [None] * len(ids)
        plist = params if isinstance(params, list) else [params] * len(ids)
        preds = [self._prediction(p) for p in (predictions or [None] * len(ids))]
        adapters = adapters if isinstance(adapters, list) else [adapters] * len(ids)
        if len(adapters) != len(ids):
            raise ValueError(f"lora: {len(adapters)} adapters for {len(ids)} prompts")
        reqs = []
        for p, sp, pred, a, pics in zip(ids, plist, preds, adapters, pictures):
            while True:
                try:
                    reqs.append(self.engine.make_request(p, sp, prediction=pred, adapter=a, images=pics, **cache))
                    break
                except Busy:  # every picture slot read by a request made before: run those first
                    if not self.engine.has_work():
                        raise
                    self.engine.step()
            self.engine.add(reqs[-1])
        while self.engine.has_work():
            self.engine.step()
        return [to_output(r) for r in reqs]

    def _prediction(self, p) -> list[int] | None:
        return self.model.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p


def _prompts(x) -> list:
    """One prompt (a string or a list of token ids) or a list of them, as a list."""
    return [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)


class StreamOverflow(Exception):
    """A consumer fell too far behind its stream (a client that stopped reading); its requests were aborted."""


class AsyncEngine:
    """One engine thread serving many asyncio requests: `async for deltas in stream(req)`; cancel aborts."""

    def __init__(self, engine: Engine, max_buffer: int = 1024):
        self.engine = engine
        self.max_buffer = max_buffer  # undelivered events per stream before it is cut
        self._wake = threading.Event()
        self._stop = False
        self._fail_requested = False
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # (fn, future): run on the engine thread between steps
        self.error: BaseException | None = None
        self._steps = itertools.count()  # engine steps run (marked in a profile: `server.profile`)
        self._held: list = []  # the streams that took deltas during this engine step, to hand them over after it
        engine.handed = self._hand_over  # and first tokens as soon as they are read back
        stack = threading.stack_size(SERVING_STACK)  # it compiles grammars' matchers: room past the sandbox's check
        try:
            self._thread = threading.Thread(target=self._loop, name="sparkler-engine", daemon=True)
            self._thread.start()
        finally:
            threading.stack_size(stack)

    def _loop(self) -> None:
        while not self._stop:
            self._run_calls()
            if self._fail_requested:
                self._fail_requested = False
                self._fail_all()
            if not self.engine.runnable():
                self.engine.idle()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with jax.profiler.StepTraceAnnotation("engine_step", step_num=next(self._steps)):  # (a profile's)
                    self.engine.step()
            except BaseException as e:  # keep serving: fail the requests in flight, not the process
                log.exception("engine step failed")
                self.error = e
                self._fail_all()
            self._hand_over()

    def _run_calls(self) -> None:
        for _ in range(self._calls.qsize()):  # those queued by now: one queued meanwhile waits for a step
            fn, future = self._calls.get()
            if not future.set_running_or_notify_cancel():  # its caller went away: not run
                continue
            try:
                result = fn(self.engine)
            except BaseException as e:  # the caller's to handle; the thread keeps serving, as after a failed step
                future.set_exception(e)
            else:
                future.set_result(result)

    async def call(self, fn) -> Any:
        """`fn(engine)` run on the engine thread between steps (what touches its scheduler and pages), awaited."""
        if not self.alive:
            raise RuntimeError("the engine has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is serving (not stopped, not dead)."""
        return not self._stop and self._thread.is_alive()

    def _fail_all(self) -> None:
        for req, deltas in self.engine.fail_all():
            if req.on_delta and deltas:
                req.on_delta(req, deltas)
        self._hand_over()

    def _hand_over(self) -> None:
        """Pass each stream what it took during the step: one wake-up of each event loop for all its streams (one
        per stream, or per token, woke the loop as often and traded the GIL with it each time)."""
        held, self._held = self._held, []
        by_loop: dict = {}
        for s in held:
            items, s.taken = s.taken, []
            by_loop.setdefault(s.loop, []).append((s, items))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:  # the consumers' event loop is gone: nobody is listening
                pass

    @property
    def thread_ident(self) -> int | None:
        """The engine thread's `threading` ident."""
        return self._thread.ident

    def fail_everything(self) -> None:
        """End every request in flight with finish_reason "error" (at the engine thread's next turn)."""
        self._fail_requested = True
        self._wake.set()

    def close(self) -> None:
        """Stop the engine thread and the engine's grammar sandbox."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        while not self._calls.empty():  # never run: their callers would wait for ever
            future = self._calls.get()[1]
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the engine has stopped"))
        self.engine.close()

    def stream(self, *reqs: Request) -> AsyncIterator[list[tuple[int, list[Delta]]]]:
        """Submit requests now and return an async iterator of batches of `(request index, deltas)`: each batch is
        every event handed over since the consumer last took one (one engine step's, or several if it fell behind),
        so a consumer writes each batch at once. Leaving it early, or closing it before it has started, aborts what
        is unfinished. A consumer more than `max_buffer` events behind gets `StreamOverflow`."""
        s = _Stream(asyncio.get_running_loop())
        left = {}

        def deliver(i: int, deltas: list[Delta]) -> None:  # on the engine thread, during the step
            if not s.taken:
                self._held.append(s)
            s.taken.append((i, deltas))

        for i, req in enumerate(reqs):
            req.on_delta = lambda r, ds, i=i: deliver(i, ds)
            left[i] = len(req.choices)
        for req in reqs:
            self.engine.add(req)
        self._wake.set()

        def finish() -> None:  # abort what is unfinished (once)
            for i, n in left.items():
                if n:
                    self.engine.abort(reqs[i].id)
                    left[i] = 0
            self._wake.set()
        return _Events(self._events(s, left, finish), finish)

    async def _events(self, s: "_Stream", left: dict, finish) -> AsyncIterator[list[tuple[int, list[Delta]]]]:
        try:
            while any(left.values()):
                await s.woken.wait()
                s.woken.clear()
                if len(s.ready) > self.max_buffer:
                    raise StreamOverflow(f"more than {self.max_buffer} undelivered events")
                batch, s.ready = s.ready, []  # never empty: only `_put_all` wakes it, with events
                for i, deltas in batch:
                    left[i] -= sum(1 for d in deltas if d.finish_reason)
                yield batch
        finally:
            finish()


class _Events:
    """`AsyncEngine.stream`'s iterator: closing it aborts what is unfinished, also before its first step (an async
    generator closed before it started skips its `finally`: a call cut while its response was being prepared held
    its slots until `max_tokens`)."""

    def __init__(self, gen, finish):
        self.gen, self.finish = gen, finish

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.gen.__anext__()

    async def aclose(self) -> None:
        """Close the events, aborting what is unfinished."""
        await self.gen.aclose()
        self.finish()


class _Stream:
    """One `stream` call's events on their way from the engine thread (`taken` during a step) to its event loop
    (`ready` until the consumer takes them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.taken: list = []
        self.ready: list = []
        self.woken = asyncio.Event()


def _put_all(pairs: list[tuple[_Stream, list]]) -> None:
    """On the event loop: hand each stream its events and wake its consumer."""
    for s, items in pairs:
        s.ready += items
        s.woken.set()
