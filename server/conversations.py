"""OpenAI's Conversations API (`/v1/conversations`): a conversation is a stored list of items that a response
named by `conversation` reads before its input and adds its input and output to (`server.openai_responses`).

Conversations and their items live in the same SQLite file as stored responses (`server.store`), so they survive a
restart. Items are checked as a Responses `input` is (`items_of`) and kept in the shape the API lists them
(`stored`): messages with parts, function calls, their outputs, and reasoning.
"""

from __future__ import annotations

import time
import types

from aiohttp import web

from server.batches import page
from server.openai_responses import items_of, metadata, new_id, stored
from server.protocol import ApiError, bad

MOST_ITEMS = 20  # items one call may add (OpenAI's limit)


def routes(app: web.Application, server) -> None:
    """Add the Conversations routes to `app`."""
    api = Conversations(server)
    app.router.add_post("/v1/conversations", api.create)
    app.router.add_get("/v1/conversations/{id}", api.retrieve)
    app.router.add_post("/v1/conversations/{id}", api.update)
    app.router.add_delete("/v1/conversations/{id}", api.delete)
    app.router.add_post("/v1/conversations/{id}/items", api.add)
    app.router.add_get("/v1/conversations/{id}/items", api.list_items)
    app.router.add_get("/v1/conversations/{id}/items/{item}", api.item)
    app.router.add_delete("/v1/conversations/{id}/items/{item}", api.delete_item)


def _items(body: dict, required: bool) -> list[dict]:
    """The body's `items` as a conversation keeps them: at most 20, each checked as a Responses input item."""
    items = body.get("items")
    if not required and items in (None, []):
        return []
    if not isinstance(items, list) or not items:
        raise bad("'items' must be a non-empty list of items", "items")
    if len(items) > MOST_ITEMS:
        raise bad(f"'items' may add at most {MOST_ITEMS} items at a time, not {len(items)}", "items")
    try:
        return stored(items_of(items))
    except ApiError as e:
        raise bad(e.message.replace("input[", "items["), "items") from None


def _missing(cid: str) -> ApiError:
    return ApiError(404, f"no conversation with id {cid!r}", code="not_found")


class Conversations:
    """The Conversations routes of one `Server`."""

    def __init__(self, server):
        self.server = server
        self.store = server.store

    async def _body(self, request: web.Request) -> dict:
        body = await self.server._body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    async def _found(self, request: web.Request) -> dict:
        """The conversation the route's `{id}` names, or a 404 (the store is read off the event loop, as every
        route here reads it)."""
        cid = request.match_info["id"]
        conv = await self.server.off_loop(self.store.conversation, cid)
        if conv is None:
            raise _missing(cid)
        return conv

    async def create(self, request: web.Request) -> web.Response:
        """POST /v1/conversations: a new conversation with `metadata` and up to 20 first `items`."""
        body = await self._body(request)
        conv = {"id": new_id("conv"), "object": "conversation", "created_at": int(time.time()),
                "metadata": metadata(body.get("metadata"))}
        await self.server.off_loop(self.store.put_conversation, conv, _items(body, required=False))
        return web.json_response(conv)

    async def retrieve(self, request: web.Request) -> web.Response:
        """GET /v1/conversations/{id}."""
        return web.json_response(await self._found(request))

    async def update(self, request: web.Request) -> web.Response:
        """POST /v1/conversations/{id}: replace its `metadata`."""
        body = await self._body(request)
        if "metadata" not in body:
            raise bad("'metadata' is required", "metadata")
        conv = {**await self._found(request), "metadata": metadata(body["metadata"])}
        if not await self.server.off_loop(self.store.set_metadata, conv["id"], conv["metadata"]):
            raise _missing(conv["id"])  # deleted meanwhile: not brought back
        return web.json_response(conv)

    async def delete(self, request: web.Request) -> web.Response:
        """DELETE /v1/conversations/{id}: forget it and its items (responses that used it stay stored)."""
        cid = request.match_info["id"]
        if not await self.server.off_loop(self.store.delete_conversation, cid):
            raise _missing(cid)
        return web.json_response({"id": cid, "object": "conversation.deleted", "deleted": True})

    async def add(self, request: web.Request) -> web.Response:
        """POST /v1/conversations/{id}/items: append up to 20 `items`; the list of those added."""
        conv, body = await self._found(request), await self._body(request)
        items = _items(body, required=True)
        if not await self.server.off_loop(self.store.add_items, conv["id"], items):  # deleted since `_found`
            raise _missing(conv["id"])
        return web.json_response({"object": "list", "data": items, "first_id": items[0]["id"],
                                  "last_id": items[-1]["id"], "has_more": False})

    async def list_items(self, request: web.Request) -> web.Response:
        """GET /v1/conversations/{id}/items: `limit` (1 to 100, 20) items after the id `after` names, newest first
        unless `order` is "asc" (OpenAI's paging)."""
        conv = await self._found(request)
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad("'order' must be 'asc' or 'desc'", "order")
        items = await self.server.off_loop(self.store.items, conv["id"])
        listed = [types.SimpleNamespace(id=it["id"], item=it) for it in (items[::-1] if order == "desc" else items)]
        return web.json_response({"object": "list", **page(listed, request, 20, 100, lambda x: x.item)})

    async def _item(self, request: web.Request) -> tuple[dict, dict]:
        conv, want = await self._found(request), request.match_info["item"]
        it = await self.server.off_loop(self.store.conversation_item, conv["id"], want)
        if it is None:
            raise ApiError(404, f"conversation {conv['id']!r} holds no item with id {want!r}", code="not_found")
        return conv, it

    async def item(self, request: web.Request) -> web.Response:
        """GET /v1/conversations/{id}/items/{item}."""
        return web.json_response((await self._item(request))[1])

    async def delete_item(self, request: web.Request) -> web.Response:
        """DELETE /v1/conversations/{id}/items/{item}: remove it; the conversation."""
        conv, it = await self._item(request)
        await self.server.off_loop(self.store.delete_item, conv["id"], it["id"])
        return web.json_response(conv)
