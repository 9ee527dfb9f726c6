"""llama.cpp's own API (`/completion`, `/infill`, `/apply-template`, `/props`, `/slots` and `/embedding`), translated
onto the completions and embeddings paths.

A llama.cpp body (`prompt` as text, token ids or both, `n_predict`, `repeat_penalty`, `mirostat` 2 with its tau and eta,
`n_probs` and `post_sampling_probs`, `logit_bias` as pairs, and the fields both APIs name alike: the sampling ones,
`stop`, `grammar`, `json_schema`, DRY, XTC, ...) becomes a completions body that `protocol.parse` validates like any
other; the reply is written in llama.cpp's shape (`content`, `stop`, `stop_type`, `tokens_predicted`, `timings`, ...),
whole or as its stream of `data:` lines (no `[DONE]`). Its bookkeeping fields are accepted and have nothing to do here:
`cache_prompt` (the prefix cache is always on), `id_slot`, `samplers` (the sampler's order is fixed:
docs/ARCHITECTURE.md), `n_keep`. `n_indent` and `t_max_predict_ms` (code completion's limits: `engine.output`) pass
through. `repeat_last_n` 0 turns the penalties off, as llama.cpp's; another window is the whole prompt and reply, as
this server's penalties always are. A null field, or an empty `grammar` or `json_schema`, is one not given. Absent
fields take the model's defaults, as in the other APIs here (llama.cpp's own are 0.8, top_k 40, top_p 0.95, min_p 0.05).
Errors keep the OpenAI shape the rest of the server uses. `/infill` is `/completion` over the prompt `server.infill`
arranges (and 501 for a model that cannot infill, as llama.cpp answers).

`/slots` shows each of the engine's slots as llama.cpp's monitoring route does (a snapshot taken on the engine's
thread between steps): whether it is processing, the admission number (`id_task`) and id of the request holding it,
its settings and how far it has got; `?fail_on_no_slot=1` answers 503 when none is free. Saving and restoring a
slot's KV cache (`POST /slots/{id}?action=...`) is not served: 501, as llama.cpp answers without `--slot-save-path`.
`/embedding` (and `/embeddings`) is llama.cpp's own embeddings shape, not OpenAI's: `input` (or `content`) as a
prompt is given to `/completion` (text, ids, both mixed, or several of these), and a list of `{"index", "embedding":
[vector]}`. The vector is pooled as `/v1/embeddings` pools it (`--pooling`; the
per-token vectors of llama.cpp's pooling `none` are not served), then normalized by `embd_normalize` (llama.cpp's:
-1 none, 0 by the largest magnitude into int16's range, 1 taxicab, 2 Euclidean, the default, p > 2 the p-norm).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import time
from typing import Any

import numpy as np
from aiohttp import web

from engine.params import InvalidRequest
from engine.sampler import LOGPROB_FLOOR
from server import infill, protocol
from server.protocol import ApiError, bad
from server.turn import Piece, Turn

SAME = ("temperature", "top_k", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty", "ignore_eos",
        "grammar", "json_schema", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
        "dry_sequence_breakers", "xtc_probability", "xtc_threshold", "top_n_sigma", "dynatemp_range",
        "dynatemp_exponent", "n_indent", "t_max_predict_ms", "stream")
RENAMED = {"repeat_penalty": "repetition_penalty"}
NAMES = {"repetition_penalty": "repeat_penalty", "max_tokens": "n_predict", "mirostat_target": "mirostat_tau",
         "mirostat_lr": "mirostat_eta", "return_token_ids": "return_tokens"}  # ours -> llama.cpp's, in errors
STOP_TYPES = {"stop": "eos", "length": "limit"}  # and "word" where a stop string ended it


def routes(app: web.Application, server, embeddings) -> None:
    """Add llama.cpp's routes to `app` (its embeddings through `embeddings`, `server.embeddings.Embeddings`)."""
    api = LlamaCpp(server, embeddings)
    app.router.add_post("/completion", api.completion)
    app.router.add_post("/infill", api.infill)
    app.router.add_post("/apply-template", api.apply_template)
    app.router.add_get("/props", api.props)
    app.router.add_get("/slots", api.slots)
    app.router.add_post("/slots/{id}", api.slot_action)
    for path in ("/embedding", "/embeddings"):
        app.router.add_post(path, api.embedding)


def completion_body(body: Any, tok) -> tuple[dict, list[str], int, bool]:
    """A completions body for a llama.cpp `/completion` body, with its stop strings, `n_probs` (both checked here:
    llama.cpp allows more of each than the OpenAI API's bounds) and `post_sampling_probs`."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    # llama.cpp's clients send null, and an empty grammar or schema (SillyTavern's default), for "none"
    body = {k: v for k, v in body.items() if v is not None and not (k in ("grammar", "json_schema") and not v)}
    if isinstance(body.get("top_k"), int) and body["top_k"] < 0:
        body["top_k"] = 0  # llama.cpp: any top_k <= 0 keeps the whole vocabulary
    if body.get("repeat_last_n") == 0:  # llama.cpp: no penalty window, no penalties
        body = {k: v for k, v in body.items() if k not in ("repeat_penalty", "presence_penalty", "frequency_penalty")}
    out = {k: body[k] for k in SAME if k in body}
    out.update({ours: body[theirs] for theirs, ours in RENAMED.items() if theirs in body})
    out["prompt"] = _prompt(body.get("prompt"), tok)
    n = body.get("n_predict")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < -1:
            raise bad("'n_predict' must be an integer >= -1 (-1: until the end of sequence or the context)",
                      "n_predict")
        if n >= 0:
            out["max_tokens"] = n
    seed = body.get("seed")
    if seed is not None and seed not in (-1, 0xFFFFFFFF):  # llama.cpp's "a random seed"
        out["seed"] = seed
    out.update(mirostat(body))
    if body.get("logit_bias") is not None:
        out["logit_bias"] = _logit_bias(body["logit_bias"], tok)
    if not isinstance(body.get("stop", []), list):  # llama.cpp's is an array
        raise bad("'stop' must be a list of strings", "stop")
    stops = protocol.stop_strings(body.get("stop"))
    probs = body.get("n_probs", 0)
    if isinstance(probs, bool) or not isinstance(probs, int) or not 0 <= probs <= 20:
        raise bad("'n_probs' must be an integer in [0, 20]", "n_probs")
    post = body.get("post_sampling_probs", False)
    if not isinstance(post, bool):
        raise bad("'post_sampling_probs' must be a boolean", "post_sampling_probs")
    return out, stops, probs, post


def mirostat(fields: dict, where: str = "") -> dict:
    """llama.cpp's `mirostat` (2: v2, with `mirostat_tau` and `mirostat_eta`; 0: off), also Ollama's options (their
    names under `where`), as the completions API's fields."""
    m = fields.get("mirostat", 0)
    if m not in (0, 2):
        raise bad(f"'{where}mirostat' must be 0 (off) or 2 (mirostat v2; v1 is not served)", f"{where}mirostat")
    return {"mirostat_target": fields.get("mirostat_tau", 5.0), "mirostat_lr": fields.get("mirostat_eta", 0.1)} \
        if m == 2 else {}


def _prompt(p: Any, tok) -> Any:
    """llama.cpp's prompt as the completions API's: text, token ids, or text and ids mixed (the text tokenized in
    place, the special tokens only before text that comes first); or several of these (a list of strings, or of
    lists), a completion each."""
    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):  # llama.cpp's: a list with no id
        return [_one(x, tok) for x in p]  # is a list of prompts (ids beside ids or text are one prompt)
    return _one(p, tok)


def _one(p: Any, tok) -> str | list[int]:
    """One prompt: text, token ids, or both mixed."""
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in p):
        if all(isinstance(x, int) for x in p):
            return p
        if tok is None:
            raise bad("a prompt with text needs the model's tokenizer", "prompt")
        if isinstance(p[0], str):  # llama.cpp's: text first takes the special tokens (a BOS), later text none
            return tok.encode(p[0]) + infill.text_ids(p[1:], tok, "prompt")
        return infill.text_ids(p, tok, "prompt")
    raise bad("'prompt' must be a string, a list of token ids, a list of strings and token ids, or a list of "
              "such prompts", "prompt")


def _logit_bias(v: Any, tok) -> dict[str, float]:
    """llama.cpp's logit_bias: `[[token id or text, bias or false], ...]`, or an object of the same by token id or
    text; `false` (never) is the strongest bias the API allows, -100; text biases each of its tokens."""
    if isinstance(v, dict):
        v = [[int(k) if protocol.TOKEN_ID.fullmatch(k) else k, b] for k, b in v.items()]
    if not isinstance(v, list) or not all(isinstance(e, list) and len(e) == 2 for e in v):
        raise bad("'logit_bias' must be a list of [token, bias] pairs or an object by token id", "logit_bias")
    out: dict[str, float] = {}
    for key, bias in v:
        bias = -100.0 if bias is False else bias
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise bad("a 'logit_bias' bias must be a number or false", "logit_bias")
        if isinstance(key, str):
            if tok is None:
                raise bad("a text 'logit_bias' needs the model's tokenizer", "logit_bias")
            ids = tok.encode(key, add_special_tokens=False)
        elif isinstance(key, int) and not isinstance(key, bool):
            ids = [key]
        else:
            raise bad("a 'logit_bias' token must be a token id or text", "logit_bias")
        for t in ids:
            out[str(t)] = bias
    return out


def settings(req, stops: list[str], n_probs: int) -> dict:
    """A request's resolved sampling settings under llama.cpp's names (a reply's `generation_settings`, a busy
    slot's `params`)."""
    p = req.params  # resolved: the model's defaults where the request set nothing
    return {"n_predict": req.max_tokens, "seed": p.seed, "temperature": p.temperature, "top_k": p.top_k,
            "top_p": p.top_p, "min_p": p.min_p, "typical_p": p.typical_p, "repeat_penalty": p.repetition_penalty,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty, "stop": stops,
            "n_probs": n_probs, "ignore_eos": p.ignore_eos, "dry_multiplier": p.dry_multiplier,
            "xtc_probability": p.xtc_probability, "top_n_sigma": p.top_n_sigma, "dynatemp_range": p.dynatemp_range,
            "dynatemp_exponent": p.dynatemp_exponent, "post_sampling_probs": p.post_sampling_probs}


def slots(engine) -> list[dict]:
    """Every slot of `engine` as llama.cpp's `/slots` shows it (run on the engine's thread: a consistent snapshot)."""
    sched = engine.sched
    held = dict(sched.running)  # slot -> (request, choice)
    for pf in (*sched.admitting, *sched.prefilling):  # holding slots, their prompts being written
        held.update((c.slot, (pf.req, c)) for c in pf.choices if c.slot >= 0)
    out = []
    for slot in range(engine.runner.slots):
        entry = {"id": slot, "n_ctx": engine.max_len, "speculative": False, "is_processing": slot in held}
        if slot in held:  # (an idle slot shows only these, as llama.cpp's slot that has run nothing yet)
            req, c = held[slot]
            prompt = len(req.client_ids)
            entry.update(
                id_task=c.order, request_id=req.id, speculative=c.drafter is not None, n_prompt_tokens=prompt,
                n_prompt_tokens_processed=prompt - req.cached_tokens, n_prompt_tokens_cache=req.cached_tokens,
                params={**settings(req, list(req.params.stop), req.params.top_logprobs), "max_tokens": req.max_tokens},
                next_token=[{"has_next_token": c.finish_reason is None, "has_new_line": "\n" in c.text,
                             "n_remain": req.max_tokens - len(c.token_ids), "n_decoded": len(c.token_ids)}])
        out.append(entry)
    return out


def named(defaults: dict) -> dict:
    """The served default settings (OpenAI's names) under llama.cpp's names too (`/props`' `params`)."""
    return {**defaults, **{NAMES[k]: v for k, v in defaults.items() if k in NAMES}}


def normalized(vectors: np.ndarray, norm: int) -> np.ndarray:
    """Pooled `vectors [N, H]` scaled as llama.cpp's `embd_normalize` asks: -1 not at all, 0 so the largest magnitude
    is 32760 (int16's range), 2 to unit length, any other p > 0 to unit p-norm (1: taxicab); a zero vector stays
    zero."""
    v = vectors.astype(np.float64)
    if norm == -1:
        size = np.ones((len(v), 1))
    elif norm == 0:
        size = np.abs(v).max(axis=1, keepdims=True) / 32760.0
    else:
        size = (np.abs(v) ** norm).sum(axis=1, keepdims=True) ** (1.0 / norm)
    return (v * np.where(size > 0, 1.0 / np.where(size > 0, size, 1.0), 0.0)).astype(np.float32)


class Reply:
    """One completion in llama.cpp's shape, whole or as its stream (`Server.sse`'s face)."""

    def __init__(self, server, call, job: protocol.Job, stops: list[str], index: int = 0):
        self.server, self.call, self.job, self.stops, self.index = server, call, job, stops, index
        self.req = call.reqs[index]  # the call's request of prompt `index` (one choice each)
        self.choice = self.req.choices[0]
        self.sent = 0  # tokens streamed

    @staticmethod
    def encode(ev: dict) -> bytes:
        """A `data:` line, as llama.cpp streams."""
        return b"data: " + json.dumps(ev).encode() + b"\n\n"

    def opening(self) -> list[dict]:
        """Nothing: llama.cpp's stream starts with the first piece."""
        return []

    def add(self, piece: Piece) -> list[dict]:
        """A chunk: its text and tokens (and with `n_probs` theirs)."""
        if not piece.text and not piece.token_ids:
            return []
        start, self.sent = self.sent, self.sent + len(piece.token_ids)
        chunk = {"index": 0, "content": piece.text, "tokens": piece.token_ids, "stop": False, "id_slot": -1,
                 "tokens_predicted": self.sent, "tokens_evaluated": len(self.req.prompt_ids)}
        if self.job.logprobs:  # the choice's entries run with its tokens; these were added before this piece came
            chunk["completion_probabilities"] = self.probabilities(self.choice.logprobs[start:self.sent])
        return [chunk]

    def closing(self) -> list[dict]:
        """The last chunk: the whole reply's settings and figures, no content (its probabilities came with it)."""
        return [self.result(content="", tokens=[], probabilities=False)]

    def probabilities(self, entries: list[tuple]) -> list[dict]:
        """llama.cpp's `completion_probabilities` of logprob entries `(id, logprob, top pairs)`: logprobs, or with
        `post_sampling_probs` probabilities (`prob`, `top_probs`) of the candidates drawn from (those a transform
        removed, at probability 0, left out, as llama.cpp lists its candidates only)."""
        vocab, k = self.server.vocab, self.job.logprobs
        post = self.job.params.post_sampling_probs
        value, top_name = ("prob", "top_probs") if post else ("logprob", "top_logprobs")

        def entry(t, lp):
            return {"id": t, "token": vocab.text(t), "bytes": list(vocab.bytes(t)),
                    value: math.exp(lp) if post else lp}

        return [{**entry(t, lp), top_name: [entry(a, v) for a, v in (top or [])[:k]
                                            if not post or v > LOGPROB_FLOOR]} for t, lp, top in entries]

    @staticmethod
    def failed(e) -> list[dict]:
        """An error chunk."""
        return [e.body()]

    def result(self, content: str, tokens: list[int], probabilities: bool = True) -> dict:
        """The completion object (llama.cpp's `/completion` reply)."""
        c, req = self.choice, self.req
        took, now = self.call.took, time.monotonic()
        first = took.first if took.first is not None else now
        prompt_ms = (first - took.start) * 1000
        predicted_ms = max(now - first, 1e-6) * 1000
        n_out, n_in = len(c.token_ids), len(req.prompt_ids)
        fresh = n_in - req.cached_tokens  # prompt tokens computed, not found in the prefix cache
        stop_type = "word" if c.stop_hit is not None else STOP_TYPES.get(c.finish_reason, "none")
        out = {"index": self.index, "content": content, "tokens": tokens, "id_slot": -1, "stop": True,
               "model": self.server.served(self.call), "tokens_predicted": n_out, "tokens_evaluated": n_in,
               "generation_settings": settings(req, self.stops, self.job.logprobs or 0),
               "prompt": self.job.prompt_texts[self.index], "has_new_line": "\n" in c.text, "truncated": False,
               "stop_type": stop_type, "stopping_word": c.stop_hit or "", "tokens_cached": n_in + n_out - 1,
               "timings": {"cache_n": req.cached_tokens, "prompt_n": fresh, "prompt_ms": prompt_ms,
                           "prompt_per_token_ms": prompt_ms / max(fresh, 1),
                           "prompt_per_second": fresh / max(prompt_ms / 1000, 1e-9),
                           "predicted_n": n_out, "predicted_ms": predicted_ms,
                           "predicted_per_token_ms": predicted_ms / max(n_out, 1),
                           "predicted_per_second": n_out / (predicted_ms / 1000)}}
        if self.job.logprobs and probabilities:
            out["completion_probabilities"] = self.probabilities(c.logprobs)
        return out


class LlamaCpp:
    """llama.cpp's routes of one `Server` (`embeddings`: its `/v1/embeddings`, whose path `/embedding` takes)."""

    def __init__(self, server, embeddings):
        self.server, self.embeddings = server, embeddings

    async def slots(self, request: web.Request) -> web.Response:
        """GET /slots: each slot's state (`slots`); 503 with `?fail_on_no_slot=1` when every slot is busy."""
        out = await self.server.on_engine(slots)
        if request.query.get("fail_on_no_slot") and all(slot["is_processing"] for slot in out):  # (any value:
            raise ApiError(503, "no slot available", type_="unavailable_error")  # llama.cpp's)
        return web.json_response(out)

    async def slot_action(self, request: web.Request) -> web.Response:
        """POST /slots/{id}?action=save|restore|erase: not served (501, as llama.cpp without `--slot-save-path`)."""
        raise ApiError(501, "This server does not save, restore or erase slots: the prefix cache keeps prompts "
                       "already seen (send them again)", type_="not_supported_error")

    async def embedding(self, request: web.Request) -> web.Response:
        """POST /embedding and /embeddings: llama.cpp's own embeddings (see the module doc)."""
        async def answer(body, call) -> web.Response:
            inputs, norm = await self.server.off_loop(self._embedding_body, body)
            vectors = normalized(await self.embeddings.vectors(call, inputs, "embd"), norm)
            return web.json_response([{"index": i, "embedding": [v.tolist()]} for i, v in enumerate(vectors)])
        return await self.server.serve(request, answer)

    def _embedding_body(self, body: Any) -> tuple[list[list[int]], int]:
        """A `/embedding` body's prompts as token ids, and its `embd_normalize`."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        param = "input" if "input" in body else "content"  # (llama.cpp's order)
        if body.get(param) is None:
            raise bad('"input" or "content" must be provided', "content")
        norm = body.get("embd_normalize", 2)
        if isinstance(norm, bool) or not isinstance(norm, int) or norm < -1:
            raise bad("'embd_normalize' must be an integer >= -1", "embd_normalize")
        tok = self.server.engine.tok
        try:
            prompts = _prompt(body[param], tok)
        except ApiError as e:
            raise e.renamed({"prompt": param}) from None
        prompts = prompts if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) else [prompts]
        return self.embeddings.tokens(prompts, {}, param), norm

    async def completion(self, request: web.Request) -> web.StreamResponse:
        """POST /completion."""
        return await self.server.serve(request, lambda body, call: self._answer(request, body, call))

    async def infill(self, request: web.Request) -> web.StreamResponse:
        """POST /infill: fill in the middle (`server.infill`), answered as `/completion` answers."""
        async def answer(body, call) -> web.StreamResponse:
            tok = self.server.engine.tok
            if tok is None or tok.fim is None:
                raise ApiError(501, f"Infill is not supported by this model: {infill.NO_FIM}",
                               type_="not_supported_error")
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            try:  # tokenizing a long prefix is work for a parse thread, not the event loop
                ids = await self.server.off_loop(infill.infill_prompt, body, tok, self.server.engine.max_len)
            except InvalidRequest as e:
                raise bad(str(e), e.param) from None
            rest = {k: v for k, v in body.items() if k not in ("input_prefix", "input_suffix", "input_extra")}
            return await self._answer(request, {**rest, "prompt": ids}, call, ends=tok.fim.ends)
        return await self.server.serve(request, answer)

    async def apply_template(self, request: web.Request) -> web.Response:
        """POST /apply-template: the prompt the chat template makes of a chat body (messages, tools, template
        arguments), generating nothing."""
        async def answer(body, call) -> web.Response:
            return web.json_response({"prompt": (await self.server.parse(body, "chat")).prompt_texts[0]})
        return await self.server.serve(request, answer, model=False)  # (it runs no model: answered while asleep)

    async def _answer(self, request: web.Request, body: Any, call, ends: list[int] = ()) -> web.StreamResponse:
        """A `/completion` body's reply, whole or streamed; `ends`: more tokens that end it (an infill's)."""
        tok = self.server.engine.tok
        plain, stops, probs, post = completion_body(body, tok)
        try:  # errors name llama.cpp's fields
            job = await self.server.parse(plain, "completion", protocol.HOT)
            job.params.stop = stops
            job.params.stop_token_ids = [*job.params.stop_token_ids, *ends]
            if probs:
                job.logprobs, job.params.logprobs, job.params.top_logprobs = probs, True, probs
            job.params.post_sampling_probs = post  # (its reply's settings say so, with n_probs or without)
            if job.stream and len(job.prompts) > 1:
                raise bad("a stream is of one prompt (several are for whole replies)", "prompt")
            parts, events = self.server.admit(job, call, "cmpl-")
        except ApiError as e:
            raise e.renamed(NAMES) from None
        if job.stream:
            return await self.server.sse(request, call, events, Turn(job), Reply(self.server, call, job, stops))
        await self.server.collect(events, call)
        out = []
        for i in range(len(parts)):
            face = Reply(self.server, call, job, stops, i)
            out.append(face.result(face.choice.text, list(face.choice.token_ids)
                                   if body.get("return_tokens") is True else []))
        return web.json_response(out[0] if len(out) == 1 else out)  # llama.cpp's: a list for several prompts

    async def props(self, request: web.Request) -> web.Response:
        """GET /props: the server's settings as llama.cpp's web page and clients read them."""
        s = self.server
        tok = s.engine.tok
        special = tok.special_tokens_map if tok is not None else {}
        return web.json_response({
            "default_generation_settings": {"n_ctx": s.engine.max_len, "params": named(json.loads(
                s.options_header["fireworks-sampling-options"]))},
            "total_slots": s.engine.runner.slots, "model_path": s.model.source, "model_alias": s.name,
            "chat_template": (tok.chat_template or "") if tok is not None else "",
            "bos_token": special.get("bos_token", ""), "eos_token": special.get("eos_token", ""),
            "modalities": {"vision": s.engine.images is not None, "audio": False},
            "build_info": f"sparkler {importlib.metadata.version('sparkler')}"})
