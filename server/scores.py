"""Scores of text pairs: vLLM's score API (`POST /v1/score`, `/score`), the rerank API (`POST /v1/rerank`, `/rerank`:
Jina's and vLLM's shape; `/v2/rerank`: Cohere's, which its `cohere` client posts), and vLLM's `POST /classify` and
`POST /pooling`.

A pair's score is, as vLLM gives it:
- for a cross-encoder (a folder of `...ForSequenceClassification` with one label, as decoder rerankers such as
  Qwen3-Reranker's sequence-classification conversions are saved), the head's sigmoid over the last token of the
  pair joined by the tokenizer (`tokenizer(text_1, text_2)`: a model that expects a prompt template around them
  gets it from the client, as with vLLM), in [0, 1];
- for any other model, the cosine similarity of its two texts' pooled vectors (`models.pooling`, `--pooling`), in
  [-1, 1], each distinct text embedded once (a query against a thousand documents embeds the query once).
The inputs run through `/v1/embeddings`' path (`Embeddings.vectors`: the engine's thread between its steps, the
same 429 and deadline).

- score: `text_1` and `text_2` (or vLLM's other names for them: `queries` and `documents` or `items`, `data_1` and
  `data_2`), each a string or a list of strings; one `text_1` is scored against every `text_2`,
  else the two lists pair up item by item (the same length). The reply is a list of `{"index", "object": "score",
  "score"}` in `text_2`'s order.
- rerank: `query` and `documents` (strings, or Cohere v1's `{"text": ...}` objects); `top_n` (0 or absent: all),
  `return_documents` (each result carries `{"text": ...}`; default true, as Jina and vLLM, but false on Cohere's
  `/v2/rerank`), Cohere's `max_tokens_per_doc` (a document's first tokens, cut in its text); the results run from
  the most relevant down.
- classify (a classifier's folder only): `input`, a string, token ids or a list of such; each input's label, the
  probabilities of every label (a sigmoid for one label, else a softmax; the logits under vLLM's `use_activation`
  false) and their count.
- pooling (vLLM's `POST /pooling`): the pooled output itself, `{"index", "object": "pooling", "data"}` per input:
  `task` "embed" (the default, but on a classifier) is `/v1/embeddings`' vector under its options (`input` or
  `messages`, `dimensions`, `normalize`, `encoding_format` float, base64, or bytes and bytes_only: vLLM's binary
  body), "classify" a classifier's probabilities; the per-token tasks (`token_embed`, `token_classify`) are not served.

All take `/v1/embeddings`' `add_special_tokens` and `truncate_prompt_tokens` (not for a cross-encoder's pairs:
keeping a joined pair's last tokens would cut its query). Usage counts the tokens embedded (vLLM counts a query
once per pair).
"""

from __future__ import annotations

import base64
import functools
import time

import numpy as np
from aiohttp import web

from models import pooling
from models.pooling import cosines
from server.embeddings import MAX_INPUTS, Embeddings, _is_int, binary
from server.protocol import bad, bounded


POOLING_TASKS = ("embed", "classify")  # vLLM's /pooling tasks served
# A score request's two sides, under each of vLLM's names for them (`text_1` and `text_2` its first)
SCORE_FIELDS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


def routes(app: web.Application, embeddings: Embeddings) -> Scores:
    """Add the score, rerank and classify routes, embedding through `embeddings`; their `Scores`."""
    api = Scores(embeddings)
    for path in ("/v1/score", "/score"):
        app.router.add_post(path, api.score)
    for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking"):  # the last two: llama.cpp's names
        app.router.add_post(path, api.rerank)
    app.router.add_post("/v2/rerank", api.cohere_rerank)
    app.router.add_post("/classify", api.classify)
    app.router.add_post("/pooling", api.pool)
    return api


class Scores:
    """The score, rerank and classify routes of one `Server`; `head` is the served cross-encoder's classification
    head (None: an embedding model, scored by cosines), `labels` its labels' names."""

    def __init__(self, embeddings: Embeddings):
        self.embeddings = embeddings
        self.server = embeddings.server
        self.head = pooling.classifier(self.server.model.source)
        self.labels = [] if self.head is None else pooling.labels(self.server.model.source, len(self.head.weight))

    async def score(self, request: web.Request) -> web.Response:
        """POST /v1/score (vLLM's score API)."""
        return await self.server.serve(request, self.scored)

    async def rerank(self, request: web.Request) -> web.Response:
        """POST /v1/rerank and /rerank (Jina's and vLLM's: each result carries its document unless told not to)."""
        return await self.server.serve(request, functools.partial(self.reranked, show_documents=True))

    async def cohere_rerank(self, request: web.Request) -> web.Response:
        """POST /v2/rerank (Cohere's: results carry no documents unless asked)."""
        return await self.server.serve(request, functools.partial(self.reranked, show_documents=False))

    async def classify(self, request: web.Request) -> web.Response:
        """POST /classify (vLLM's classification API)."""
        return await self.server.serve(request, self.classified)

    async def pool(self, request: web.Request) -> web.Response:
        """POST /pooling (vLLM's pooling API)."""
        return await self.server.serve(request, self.pooled)

    async def pooled(self, body, call) -> web.Response:
        """A pooling body's reply: each input's embedding (`task` "embed") or a classifier's probabilities
        ("classify"); the default is what the served model gives."""
        srv = self.server
        task = body.get("task") if isinstance(body, dict) else None
        task = ("classify" if self.head is not None else "embed") if task is None else task
        if task not in POOLING_TASKS:
            raise bad(f"'task' must be one of {', '.join(POOLING_TASKS)} (per-token tasks are not served)", "task")
        ask = await srv.off_loop(self.embeddings.parse, body)
        if task == "classify":
            if self.head is None:
                raise bad("the served model is not a classifier (a ...ForSequenceClassification folder)", "task")
            out = await self._probabilities(call, ask.inputs, "pool", _activated(body))
        else:
            out = pooling.finish(await self.embeddings.vectors(call, ask.inputs, "pool"), ask.normalize,
                                 ask.dimensions)
        tokens = sum(map(len, ask.inputs))
        if ask.encoding in ("bytes", "bytes_only"):
            return binary(ask, np.asarray(out, np.float32), self._head(call, tokens))
        data = [{"index": i, "object": "pooling", "data": base64.b64encode(ask.binary(v)).decode()
                 if ask.encoding == "base64" else v.tolist()} for i, v in enumerate(out)]
        return self._listed(call, data, tokens)

    async def _probabilities(self, call, inputs: list[list[int]], kind: str, activated: bool):
        """The served classifier's label probabilities for each input (its head over the last token's state), or its
        logits where not `activated`."""
        logits = self.head.logits(await self.embeddings.vectors(call, inputs, kind, "last"))
        return pooling.probabilities(logits) if activated else logits

    def _head(self, call, tokens: int) -> dict:
        """vLLM's list reply's fields but its `data`: the usage of `tokens` prompt tokens."""
        return {"id": call.rid, "object": "list", "created": int(time.time()), "model": self.server.served(call),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    def _listed(self, call, data: list[dict], tokens: int) -> web.Response:
        """vLLM's list reply: `data`, and the usage of `tokens` prompt tokens."""
        return web.json_response({**self._head(call, tokens), "data": data})

    async def scored(self, body, call) -> web.Response:
        """A score body's reply (`Server.serve`'s answer)."""
        srv = self.server
        plan = await srv.off_loop(self._parse_score, body)
        scores, tokens = await self._pairs(call, "score", *plan)
        data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
        return self._listed(call, data, tokens)

    async def reranked(self, body, call, show_documents: bool) -> web.Response:
        """A rerank body's reply, its results carrying their documents by default if `show_documents`."""
        srv = self.server
        docs, top_n, show, plan = await srv.off_loop(self._parse_rerank, body, show_documents)
        scores, tokens = await self._pairs(call, "rerank", *plan)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n or None]
        results = [{"index": i, "relevance_score": float(scores[i])} for i in order]
        if show:
            for r in results:
                r["document"] = {"text": docs[r["index"]]}
        return web.json_response({"id": call.rid, "model": srv.served(call), "results": results,
                                  "usage": {"total_tokens": tokens}})

    async def classified(self, body, call) -> web.Response:
        """A classify body's reply (a 400 unless the served folder is a classifier)."""
        srv = self.server
        if self.head is None:
            raise bad("the served model is not a classifier (a ...ForSequenceClassification folder)", "model")
        texts = await srv.off_loop(self.embeddings.inputs, body)
        probs = await self._probabilities(call, texts, "classify", _activated(body))
        data = [{"index": i, "label": self.labels[int(p.argmax())], "probs": p.tolist(), "num_classes": len(p)}
                for i, p in enumerate(probs)]
        tokens = sum(map(len, texts))
        return self._listed(call, data, tokens)

    async def _pairs(self, call, kind: str, texts: list[list[int]], left: list[int] | None, right: list[int] | None):
        """The score of each pair, and the tokens embedded: a cross-encoder's relevance of each text (a pair joined,
        `left` None; pooled at its last token whatever `--pooling` says), else the cosine of `texts[left[i]]` and
        `texts[right[i]]`."""
        vectors = await self.embeddings.vectors(call, texts, kind, "last" if left is None else None)
        scores = pooling.relevance(vectors, self.head) if left is None else cosines(vectors[left], vectors[right])
        return scores, sum(map(len, texts))

    def _plan(self, body: dict, one: list[str], two: list[str], names: tuple[str, str]):
        """The token ids to embed for the pairs of `one` (a single text: against each of `two`) and `two`, and which
        of them each pair compares: each pair joined by the tokenizer for a cross-encoder (one label), else each
        distinct text once (`left` and `right` index them)."""
        if self.head is not None:
            if self.head.weight.shape[0] != 1:
                raise bad(f"the served classifier has {self.head.weight.shape[0]} labels; scores need one (use "
                          "/classify)", "model")
            pairs = list(zip(one * len(two) if len(one) == 1 else one, two))
            return self.embeddings.tokens(pairs, body, names[1], names[0]), None, None
        ids = self.embeddings.tokens(one, body, names[0]) + self.embeddings.tokens(two, body, names[1])
        seen: dict[tuple[int, ...], int] = {}
        index = [seen.setdefault(tuple(x), len(seen)) for x in ids]
        left, right = index[:len(one)], index[len(one):]
        return [list(x) for x in seen], left * len(two) if len(one) == 1 else left, right

    def _parse_score(self, body):
        """A score request's plan (`_plan`): `text_1` against each `text_2`, or item by item."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        names = next((pair for pair in SCORE_FIELDS if pair[0] in body and pair[1] in body), SCORE_FIELDS[-1])
        one, two = (_strings(body.get(k), k) for k in names)
        if len(one) > 1 and len(one) != len(two):
            raise bad(f"'{names[0]}' has {len(one)} items and '{names[1]}' {len(two)}: give one '{names[0]}', or as "
                      f"many as '{names[1]}'", names[0])
        return self._plan(body, one, two, names)

    def _parse_rerank(self, body, show_documents: bool):
        """A rerank request's documents' texts, `top_n`, `return_documents` (default `show_documents`), and its plan
        (`_plan`)."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise bad("'query' must be a non-empty string", "query")
        raw = body.get("documents")
        if not isinstance(raw, list) or not raw:
            raise bad("'documents' must be a non-empty list of strings", "documents")
        docs = _strings([d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d for d in raw],
                        "documents")
        top_n = body.get("top_n")
        if top_n is not None and (not _is_int(top_n) or top_n < 0):
            raise bad("'top_n' must be a non-negative integer", "top_n")
        show = show_documents if body.get("return_documents") is None else body["return_documents"]
        if not isinstance(show, bool):
            raise bad("'return_documents' must be a boolean", "return_documents")
        if body.get("relevant_spans"):
            raise bad("'relevant_spans' is not supported", "relevant_spans")
        first = body.get("max_tokens_per_doc")
        if first is not None and (not _is_int(first) or first < 1):
            raise bad("'max_tokens_per_doc' must be a positive integer", "max_tokens_per_doc")
        cut = docs
        if first is not None:  # each document's first tokens, cut in the text (a cross-encoder joins it to the query)
            cut = [self.server.vocab.tok.prefix(bounded(self.server.model, d, "documents"), first) for d in docs]
        return docs, top_n or 0, show, self._plan(body, [query], cut, ("query", "documents"))

def _strings(x, param: str) -> list[str]:
    """A string or a non-empty list of strings as a list (400 otherwise, or past MAX_INPUTS items)."""
    x = [x] if isinstance(x, str) else x
    if not isinstance(x, list) or not x or not all(isinstance(s, str) for s in x):
        raise bad(f"'{param}' must be a string or a non-empty list of strings", param)
    if len(x) > MAX_INPUTS:
        raise bad(f"'{param}' has {len(x)} items; at most {MAX_INPUTS}", param)
    return x


def _activated(body: dict) -> bool:
    """vLLM's `use_activation` (its older name: `activation`): false gives a classifier's logits, not the sigmoid or
    softmax of them (default true)."""
    name = "use_activation" if "use_activation" in body else "activation"
    value = body.get(name, True)
    if value is None:
        return True
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean", name)
    return value
