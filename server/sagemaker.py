"""Amazon SageMaker's serving contract, as vLLM serves it: `GET` / `POST /ping` (the container's health check, the
same answer as `/health`, open without an API key as SageMaker probes without one) and `POST /invocations`, which
answers each body through the route its fields name:

- `messages`: chat completions; `prompt`: completions;
- `input`: classification on a classifier's folder (vLLM's `/classify`), else embeddings;
- `query` and `documents`: rerank; `text_1` and `text_2` (or `queries` and `documents`, ...): score.

A body that names none of them is a 400 that lists them. Streaming, errors, 429 and 503 are the named route's. The
`X-Amzn-SageMaker-Adapter-Identifier` header (SageMaker's inference components) names the LoRA adapter to answer
with, as the body's `model` would.
"""

from __future__ import annotations

import functools
from typing import Callable

from aiohttp import web

from server.protocol import bad
from server.scores import SCORE_FIELDS

ADAPTER = "X-Amzn-SageMaker-Adapter-Identifier"
ROUTES = "'messages' (chat), 'prompt' (completions), 'input' (embeddings, or classification), 'query' and " \
    "'documents' (rerank), or 'text_1' and 'text_2' (score)"


def routes(app: web.Application, server, embeddings, scores) -> None:
    """Add `/ping` and `/invocations` to `app`, answering through `server`'s routes."""
    app.router.add_get("/ping", server.health)
    app.router.add_post("/ping", server.health)
    app.router.add_post("/invocations", functools.partial(invocations, server, embeddings, scores))


def answer_for(body, request: web.Request, server, embeddings, scores) -> Callable:
    """The answer (`Server.serve`'s `answer(body, call)`) of the route `body`'s fields name (see the module doc)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if "messages" in body:
        return server.completer(request, "chat")
    if "prompt" in body:
        return server.completer(request, "completion")
    if "input" in body:
        return scores.classified if scores.head is not None else embeddings.embedded
    if "query" in body and "documents" in body:
        return functools.partial(scores.reranked, show_documents=True)
    if any(one in body and two in body for one, two in SCORE_FIELDS):
        return scores.scored
    raise bad(f"/invocations: the body must have {ROUTES}")


async def invocations(server, embeddings, scores, request: web.Request) -> web.StreamResponse:
    """POST /invocations: the body answered by the route its fields name."""
    async def answer(body, call) -> web.StreamResponse:
        respond = answer_for(body, request, server, embeddings, scores)
        if (adapter := request.headers.get(ADAPTER)) is not None:
            body = {**body, "model": adapter}
            call.adapter = server.adapter_of(body)
        return await respond(body, call)
    return await server.serve(request, answer)
