"""Scores of text pairs from the served model's embeddings: vLLM's score API (`POST /v1/score`, `/score`) and the
rerank API (`POST /v1/rerank`, `/rerank`: Jina's and vLLM's shape; `/v2/rerank`: Cohere's, which its `cohere`
client posts).

As vLLM scores with an embedding model (one that is not a cross-encoder), a pair's score is the cosine similarity of
its two texts' pooled vectors (`models.pooling`, `--pooling`), in [-1, 1]. The texts run through `/v1/embeddings`'
path (`Embeddings.vectors`: the engine's thread between its steps, the same 429 and deadline), each distinct text
once: a query against a thousand documents embeds the query once.

- score: `text_1` and `text_2`, each a string or a list of strings; one `text_1` is scored against every `text_2`,
  else the two lists pair up item by item (the same length). The reply is a list of `{"index", "object": "score",
  "score"}` in `text_2`'s order.
- rerank: `query` and `documents` (strings, or Cohere v1's `{"text": ...}` objects); `top_n` (0 or absent: all),
  `return_documents` (default true: each result carries `{"text": ...}`), Cohere's `max_tokens_per_doc` (a
  document's first tokens); the results run from the most relevant down.

Both take `/v1/embeddings`' `add_special_tokens` and `truncate_prompt_tokens`.
"""

from __future__ import annotations

import time

from aiohttp import web

from models.pooling import cosines
from server.embeddings import MAX_INPUTS, Embeddings, _is_int
from server.protocol import bad


def routes(app: web.Application, embeddings: Embeddings) -> None:
    """Add the score and rerank routes, scoring through `embeddings`."""
    api = Scores(embeddings)
    for path in ("/v1/score", "/score"):
        app.router.add_post(path, api.score)
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.router.add_post(path, api.rerank)


class Scores:
    """The score and rerank routes of one `Server`."""

    def __init__(self, embeddings: Embeddings):
        self.embeddings = embeddings
        self.server = embeddings.server

    async def score(self, request: web.Request) -> web.Response:
        """POST /v1/score (vLLM's score API)."""
        return await self.server.serve(request, self._score)

    async def rerank(self, request: web.Request) -> web.Response:
        """POST /v1/rerank, /rerank and /v2/rerank."""
        return await self.server.serve(request, self._rerank)

    async def _score(self, body, call) -> web.Response:
        srv = self.server
        texts, left, right = await srv.off_loop(self._parse_score, body)
        scores, tokens = await self._pairs(call, "score", texts, left, right)
        data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
        return web.json_response({"id": call.rid, "object": "list", "created": int(time.time()),
                                  "model": srv.served(call), "data": data,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    async def _rerank(self, body, call) -> web.Response:
        srv = self.server
        texts, docs, top_n, show = await srv.off_loop(self._parse_rerank, body)
        scores, tokens = await self._pairs(call, "rerank", texts, [0] * len(docs), list(range(1, len(texts))))
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n or None]
        results = [{"index": i, "relevance_score": float(scores[i])} for i in order]
        if show:
            for r in results:
                r["document"] = {"text": docs[r["index"]]}
        return web.json_response({"id": call.rid, "model": srv.served(call), "results": results,
                                  "usage": {"total_tokens": tokens}})

    async def _pairs(self, call, kind: str, texts: list[list[int]], left: list[int], right: list[int]):
        """The cosine of each pair (`texts[left[i]]`, `texts[right[i]]`), and the tokens embedded."""
        vectors = await self.embeddings.vectors(call, texts, kind)
        return cosines(vectors[left], vectors[right]), sum(map(len, texts))

    def _parse_score(self, body) -> tuple[list[list[int]], list[int], list[int]]:
        """The distinct texts of a score request as token ids, and the pairs as indices into them."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        one, two = (_strings(body.get(k), k) for k in ("text_1", "text_2"))
        if len(one) > 1 and len(one) != len(two):
            raise bad(f"'text_1' has {len(one)} items and 'text_2' {len(two)}: give one 'text_1', or as many as "
                      "'text_2'", "text_1")
        (ones, left), (twos, right) = _distinct(one * len(two) if len(one) == 1 else one), _distinct(two)
        texts = self.embeddings.tokens(ones, body, "text_1") + self.embeddings.tokens(twos, body, "text_2")
        return texts, left, [len(ones) + j for j in right]

    def _parse_rerank(self, body) -> tuple[list[list[int]], list[str], int, bool]:
        """A rerank request's query and documents as token ids (the query first), the documents' texts, `top_n`
        and `return_documents`."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise bad("'query' must be a non-empty string", "query")
        raw = body.get("documents")
        if not isinstance(raw, list) or not raw:
            raise bad("'documents' must be a non-empty list of strings", "documents")
        docs = [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d for d in raw]
        docs = _strings(docs, "documents")
        top_n = body.get("top_n")
        if top_n is not None and (not _is_int(top_n) or top_n < 0):
            raise bad("'top_n' must be a non-negative integer", "top_n")
        show = body.get("return_documents", True)
        if not isinstance(show, bool):
            raise bad("'return_documents' must be a boolean", "return_documents")
        if body.get("relevant_spans"):
            raise bad("'relevant_spans' is not supported", "relevant_spans")
        first = body.get("max_tokens_per_doc")
        if first is not None and (not _is_int(first) or first < 1):
            raise bad("'max_tokens_per_doc' must be a positive integer", "max_tokens_per_doc")
        texts = self.embeddings.tokens([query], body, "query") + self.embeddings.tokens(docs, body, "documents")
        if first is not None:
            texts[1:] = [ids[:first] for ids in texts[1:]]
        return texts, docs, top_n or 0, show


def _strings(x, param: str) -> list[str]:
    """A string or a non-empty list of strings as a list (400 otherwise, or past MAX_INPUTS items)."""
    x = [x] if isinstance(x, str) else x
    if not isinstance(x, list) or not x or not all(isinstance(s, str) for s in x):
        raise bad(f"'{param}' must be a string or a non-empty list of strings", param)
    if len(x) > MAX_INPUTS:
        raise bad(f"'{param}' has {len(x)} items; at most {MAX_INPUTS}", param)
    return x


def _distinct(texts: list[str]) -> tuple[list[str], list[int]]:
    """The distinct texts in first-seen order, and each text's index among them."""
    seen: dict[str, int] = {}
    ids = [seen.setdefault(t, len(seen)) for t in texts]
    return list(seen), ids
