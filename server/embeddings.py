"""OpenAI's embeddings API, `POST /v1/embeddings`: vectors of the served model's (or a LoRA adapter's) final hidden
states, pooled (`models.pooling`), for one input or a batch, as floats, base64 or vLLM's binary body.

The body is OpenAI's: `input` (a string, a list of strings, a list of token ids or a list of such lists; at most
MAX_INPUTS), `encoding_format` (`float`, or `base64`: each vector's float32 bytes, which the `openai` client asks for
by default), `dimensions` (the first that many components, normalized again: Matryoshka embeddings) and `user`; with
vLLM's `add_special_tokens` (default true: a tokenizer that ends every input with EOS, as Qwen3-Embedding's, needs
it), `truncate_prompt_tokens` (each input's last tokens, as for completions; `truncation_side` "right": its first),
`normalize` or `use_activation` (default: what the model folder asks for, `--pooling` picks the pooling), and vLLM's
chat form: `messages` in place of `input`, one input templated as chat completions template it (but no reply opened
unless `add_generation_prompt`; `continue_final_message`, `chat_template_kwargs`; `add_special_tokens` default false:
the template writes them). vLLM's encodings: `embed_dtype` (`float32`, `float16`, `bfloat16`, `fp8_e4m3`,
`fp8_e5m2`) and `endianness` (`native`, `little`, `big`) shape the bytes of `base64`, and of `bytes` (the vectors'
bytes as the body, one after another, with vLLM's `metadata` header saying where each lies) and `bytes_only` (no
header). The inputs run on the engine's thread
between its steps (`Engine.embed`), a slice of at most a step's prompt budget at a time (`_embed`), each slice's
programs compiled first on a parse thread, so streams keep their pace.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from aiohttp import web

from engine.params import InvalidRequest
from engine.runner import Pieces
from models import pooling
from server import images, protocol
from server.protocol import ApiError, bad, bounded, busy

MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs
ENCODINGS = ("float", "base64", "bytes", "bytes_only")  # OpenAI's two and vLLM's binary bodies
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16, "fp8_e4m3": jnp.float8_e4m3fn,
          "fp8_e5m2": jnp.float8_e5m2}  # vLLM's `embed_dtype`: the bytes of a base64 or binary vector
ENDIANNESS = ("native", "little", "big")


def routes(app: web.Application, server) -> Embeddings:
    """Add `/v1/embeddings` to `app`; the route's `Embeddings`, which the score routes share."""
    api = Embeddings(server)
    app.router.add_post("/v1/embeddings", api.create)
    return api


@dataclasses.dataclass(frozen=True)
class Ask:
    """A parsed embeddings request."""

    inputs: list[list[int]]
    encoding: str  # one of ENCODINGS
    dimensions: int | None
    normalize: bool
    dtype: str = "float32"  # a key of DTYPES
    endianness: str = "native"

    def binary(self, vector: np.ndarray) -> bytes:
        """A vector's bytes in the asked dtype and byte order."""
        out = vector.astype(DTYPES[self.dtype])
        if self.endianness not in ("native", sys.byteorder):
            out = out.byteswap()
        return out.tobytes()


def binary(ask: Ask, vectors: np.ndarray, head: dict) -> web.Response:
    """vLLM's binary body (`encoding_format` `bytes` or `bytes_only`): the vectors' bytes one after another, in the
    call's dtype and byte order; for `bytes`, the reply's other fields (`head`) and each vector's place in the body
    (`start`, `end`, `shape`) in its `metadata` header."""
    parts = [ask.binary(v) for v in vectors]
    ends = np.cumsum([len(p) for p in parts]).tolist()
    items = [{"index": i, "embed_dtype": ask.dtype, "endianness": ask.endianness, "start": end - len(p), "end": end,
              "shape": list(v.shape)} for i, (p, v, end) in enumerate(zip(parts, vectors, ends))]
    headers = {} if ask.encoding == "bytes_only" else {"metadata": json.dumps({**head, "data": items})}
    return web.Response(body=b"".join(parts), content_type="application/octet-stream", headers=headers)


class Embeddings:
    """The embeddings route of one `Server`; `mode` and `normalize` are the served model's pooling."""

    def __init__(self, server):
        self.server = server
        mode, self.normalize = pooling.default(server.model.source)
        self.mode = server.pooling or mode
        self.waiting = 0  # calls admitted and not answered
        self.long = asyncio.Lock()  # held by the input in pieces: one pool of its keys at a time (`Pieces`)

    async def create(self, request: web.Request) -> web.Response:
        """POST /v1/embeddings."""
        return await self.server.serve(request, self.embedded)

    async def embedded(self, body, call) -> web.Response:
        """An embeddings body's reply (`Server.serve`'s answer)."""
        srv = self.server
        ask = await srv.off_loop(self.parse, body)
        vectors = await self.vectors(call, ask.inputs, "embd")
        return await srv.off_loop(self._reply, ask, vectors, srv.served(call), call.rid)  # megabytes: off the loop

    async def vectors(self, call, inputs: list[list[int]], kind: str, mode: str | None = None) -> np.ndarray:
        """The parsed call's inputs' vectors pooled by `mode` (None: the server's pooling), not normalized, by its
        deadline: 503 when the engine stopped, 429 when `--max-queued` embedding calls wait already; names the call
        `{kind}-...`."""
        srv = self.server
        srv._stage(call, None)
        if not srv.aengine.alive:
            raise srv.engine_stopped()
        if self.waiting >= srv.max_queued:
            raise busy(f"the server is busy ({self.waiting} embedding requests waiting)")
        call.rid = f"{kind}-{uuid.uuid4().hex[:24]}"
        self.waiting += 1
        try:
            async with asyncio.timeout_at(srv.deadline()):
                return await self._embed(inputs, call.adapter, mode or self.mode)
        except TimeoutError:
            raise srv.timed_out() from None
        finally:
            self.waiting -= 1

    @staticmethod
    def _reply(ask: Ask, vectors: np.ndarray, model: str, rid: str) -> web.Response:
        """The response: OpenAI's list of embedding objects and the usage, or vLLM's binary body (`bytes`: the
        rest in its `metadata` header)."""
        vectors = pooling.finish(vectors, ask.normalize, ask.dimensions)
        tokens = sum(map(len, ask.inputs))
        head = {"id": rid, "object": "list", "created": int(time.time()), "model": model}
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        if ask.encoding in ("bytes", "bytes_only"):
            return binary(ask, vectors, {**head, "usage": usage})
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(ask.binary(v)).decode()
                 if ask.encoding == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        return web.Response(body=json.dumps({**head, "data": data, "usage": usage}).encode(),
                            content_type="application/json")

    async def _embed(self, inputs: list[list[int]], adapter: str | dict[str, float] | None, mode: str) -> np.ndarray:
        """The inputs' pooled vectors: shortest first, a call (`Runner.embed_calls`) of at most a step's prompt budget
        of padded tokens (`--max-prefill-tokens`, or a chunk; a longer input alone, a chunk a call: `Pieces`) at a
        time, its program compiled on a parse thread and the call run on the engine's thread between its steps."""
        srv, runner = self.server, self.server.engine.runner
        budget = max(runner.rc.max_prefill_tokens, runner.chunk)
        out = np.zeros((len(inputs), srv.model.cfg.hidden_size), np.float32)
        width = sum(x != 0 for x in adapter.values()) if isinstance(adapter, dict) else int(adapter is not None)
        srv.engine_calls += 1  # a sleep or weight swap waits for the call's every part
        try:
            for _, _, part, pieced in runner.embed_calls([len(x) for x in inputs], budget):
                batch = [inputs[i] for i in part]
                await srv.off_loop(runner.embed_compile, [len(x) for x in batch], mode, width, budget)
                try:
                    if pieced and jax.process_count() == 1:  # pieces, and
                        # other requests' steps between them (a group runs them in one mirrored call); one input at
                        # a time, so concurrent long inputs do not each hold a pool (up to twice its length, every
                        # layer's keys and values, outside the memory plan)
                        async with self.long:
                            pieces = Pieces(batch[0], mode, runner.piece_size(budget))
                            while not pieces.done:
                                await srv.on_engine(lambda engine: engine.embed_next(pieces, adapter))
                        out[part] = pieces.pooled
                    else:
                        out[part] = await srv.on_engine(
                            lambda engine: engine.embed(batch, mode, adapter, budget))
                except InvalidRequest as e:
                    if e.param == "model":  # its LoRA adapter was unloaded since the call named it
                        raise ApiError(404, str(e), "model", code="model_not_found") from None
                    raise bad(str(e), e.param) from None
        finally:
            srv.engine_calls -= 1
        return out

    def tokens(self, items: list, body: dict, param: str, pair_param: str = "") -> list[list[int]]:
        """`items` (strings, lists of token ids, or pairs of strings, which the tokenizer joins as a cross-encoder's
        input; `pair_param` names their first string) as token ids, with the body's `add_special_tokens` and
        `truncate_prompt_tokens` (400s for items that are none of these, empty, or longer than the server embeds;
        for pairs, truncation, which would cut the first string)."""
        srv = self.server
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise bad("'add_special_tokens' must be a boolean", "add_special_tokens")
        vocab, inputs = srv.model.cfg.vocab_size, []
        for item in items:
            if isinstance(item, (str, tuple)):
                if srv.model.tokenizer is None:
                    raise bad(f"text in '{param}' needs the model's tokenizer; give token ids", param)
            if isinstance(item, str):
                ids = srv.vocab.tok.encode(bounded(srv.model, item, param), add_special_tokens=special)
            elif isinstance(item, tuple):
                first, second = bounded(srv.model, item[0], pair_param), bounded(srv.model, item[1], param)
                ids = srv.vocab.tok.encode(first, add_special_tokens=special, text_pair=second)
            elif isinstance(item, list) and _is_ids(item):
                if not all(0 <= t < vocab for t in item):
                    raise bad(f"token ids must be in [0, {vocab})", param)
                ids = list(item)
            else:
                raise bad(f"each item of '{param}' must be a string or a list of token ids", param)
            if not ids:
                raise bad(f"{param} {len(inputs)} is empty", param)
            inputs.append(ids)
        keep, side = body.get("truncate_prompt_tokens"), body.get("truncation_side") or "left"
        most = srv.engine.runner.embed_sizes[-1]
        if side not in ("left", "right"):
            raise bad("'truncation_side' must be 'left' (keep the last tokens) or 'right' (the first)",
                      "truncation_side")
        if keep is not None:
            if pair_param:
                raise bad("'truncate_prompt_tokens' would cut a cross-encoder's first text; send "
                          "max_tokens_per_doc (rerank) or shorter texts", "truncate_prompt_tokens")
            if not _is_int(keep) or not (keep == -1 or keep >= 1):
                raise bad("'truncate_prompt_tokens' must be -1 or a positive integer", "truncate_prompt_tokens")
            keep = most if keep == -1 else keep
            inputs = [ids[-keep:] if side == "left" else ids[:keep] for ids in inputs]
        for i, ids in enumerate(inputs):
            if len(ids) > most:
                raise bad(f"{param} {i} has {len(ids)} tokens; this server embeds at most {most} (send "
                          "truncate_prompt_tokens to keep the last ones)", param)
        return inputs

    def inputs(self, body) -> list[list[int]]:
        """A body's `input` (OpenAI's forms, at most MAX_INPUTS), or vLLM's `messages` (`chat`: one input), as token
        ids (`tokens`); 400 for a body that is not a JSON object or an `input` of another shape."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        if body.get("messages") is not None:
            if body.get("input") is not None:
                raise bad("send 'input' or 'messages', not both", "messages")
            return self.tokens([self.chat(body)], body, "messages")
        raw = body.get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and _is_ids(raw)):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise bad("'input' must be a string, a list of strings, a list of token ids or a list of such lists "
                      "(not empty)", "input")
        if len(raw) > MAX_INPUTS:
            raise bad(f"'input' has {len(raw)} items; at most {MAX_INPUTS}", "input")
        return self.tokens(raw, body, "input")

    def chat(self, body: dict) -> list[int]:
        """vLLM's chat-form input: the token ids of `messages` through the chat template, ending after the last
        message unless `add_generation_prompt` (its other template fields as chat completions take them), with the
        tokenizer's special tokens on top where `add_special_tokens` (default false)."""
        srv = self.server
        if srv.model.tokenizer is None:
            raise bad("'messages' needs the model's tokenizer and chat template; give 'input' as token ids", "messages")
        special = body.get("add_special_tokens", False)
        if not isinstance(special, bool):
            raise bad("'add_special_tokens' must be a boolean", "add_special_tokens")
        messages = body["messages"]
        if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) and any(
                isinstance(p, dict) and p.get("type") in images.IMAGE_PARTS for p in m["content"]) for m in messages):
            raise bad("pictures are not embedded here: send the messages' text", "messages")  # (before fetching any)
        kwargs = protocol.template_kwargs({**body, "add_generation_prompt": body.get("add_generation_prompt") or False})
        ids, text, _ = protocol.chat_ids(srv.model, messages, None, None, kwargs[0], srv.media)
        return srv.vocab.tok.encode(text, add_special_tokens=True) if special else ids

    def parse(self, body) -> Ask:
        """The request's inputs as token ids, and its options (400s for what is not OpenAI's or vLLM's shape)."""
        srv = self.server
        inputs = self.inputs(body)
        fmt, dtype, order = (d if body.get(k) is None else body[k] for k, d in (
            ("encoding_format", "float"), ("embed_dtype", "float32"), ("endianness", "native")))  # null: the default
        for value, allowed, param in ((fmt, ENCODINGS, "encoding_format"), (dtype, tuple(DTYPES), "embed_dtype"),
                                      (order, ENDIANNESS, "endianness")):
            if not isinstance(value, str) or value not in allowed:
                raise bad(f"'{param}' must be one of {', '.join(allowed)}", param)
        dims, hidden = body.get("dimensions"), srv.model.cfg.hidden_size
        if dims is not None and (not _is_int(dims) or not 1 <= dims <= hidden):
            raise bad(f"'dimensions' must be an integer in [1, {hidden}]", "dimensions")
        given = {k: body[k] for k in ("normalize", "use_activation") if body.get(k) is not None}  # vLLM's names
        if len(set(map(repr, given.values()))) > 1:
            raise bad("'normalize' and 'use_activation' disagree: send one", "use_activation")
        normalize = next(iter(given.values()), self.normalize)
        if not isinstance(normalize, bool):
            raise bad(f"'{next(iter(given))}' must be a boolean", next(iter(given)))
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise bad("'user' must be a string", "user")
        return Ask(inputs, fmt, dims, normalize, dtype, order)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_ids(x: list) -> bool:
    return all(_is_int(t) for t in x)
