"""OpenAI's `POST /v1/responses/compact`: a long conversation shortened to its user messages and one compaction
item, which later responses read in place of the turns it replaces (the Agents SDK's
`OpenAIResponsesCompactionSession`, Codex's remote compaction).

The served model writes the summary: the conversation (a stored response's by `previous_response_id`, and/or
`input`) is sent through the chat path with one more user turn asking for it. The compaction item carries the
summary in this server's own encoding (`openai_responses.compaction`): OpenAI's is encrypted for its models, and
here the model that reads it is the one that wrote it. A later `input` holding the item reads it as a user turn
that opens with `SUMMARY_HEAD`.
"""

from __future__ import annotations

import time

from aiohttp import web

from server.openai_responses import answered, chat_body, compaction, items_of, new_id, stored
from server.protocol import bad
from server.turn import Turn

ASK = ("Write a summary of the conversation so far, for whoever continues it without seeing it: the goal, what "
       "was asked and answered, the facts and tool results that matter, what was decided, and what remains to be "
       "done. Write the summary only.")
MAX_SUMMARY = 2048  # tokens, unless `max_output_tokens` says otherwise


def routes(app: web.Application, responses) -> None:
    """Add `/v1/responses/compact` to `app`, over the `openai_responses.Responses` of the same server."""
    app.router.add_post("/v1/responses/compact", Compaction(responses).compact)


class Compaction:
    """The compact route of one `Server`'s Responses API."""

    def __init__(self, responses):
        self.responses, self.server = responses, responses.server

    async def compact(self, request: web.Request) -> web.Response:
        """POST /v1/responses/compact: the conversation's user messages (their ids new), then one compaction item
        holding the served model's summary of the whole; `usage` is the summary's turn."""
        async def answer(body, call) -> web.Response:
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            if body.get("stream") is not None and body["stream"] is not False:  # `0` or `""` too: not taken as false
                raise bad("/v1/responses/compact does not stream: its answer is one object", "stream")
            if body.get("input") is None and body.get("previous_response_id") is None:
                raise bad("'input' or 'previous_response_id' is required: the conversation to compact", "input")
            history, _, _ = await self.server.off_loop(self.responses.history, body)
            most = body.get("max_output_tokens")
            asked = {**{k: body[k] for k in ("instructions", "temperature", "top_p", "seed") if k in body},
                     "input": ASK, "max_output_tokens": MAX_SUMMARY if most is None else most}
            body = await self.server.off_loop(self.responses.referenced, body)
            own = items_of(body["input"]) if body.get("input") is not None else []
            answered(history, own)
            chat, _ = chat_body(asked, history + own)
            job = await self.responses.parse(chat)
            await self.server.collect(self.responses.admit(job, call), call)  # (past the context: 'input')
            choice = call.reqs[0].choices[0]
            summary = Turn(job).feed(choice.text, choice.finish_reason).text.strip()
            if not summary:  # (a thinking model that thought to the end of its budget, say): nothing to replace with
                raise bad(f"the model wrote no summary within {chat['max_tokens']} tokens; raise max_output_tokens",
                          "max_output_tokens")
            users = [it for it in history + own if it["type"] == "message" and it["role"] == "user"]
            output = stored(users) + [compaction(summary)]
            return web.json_response({"id": new_id("resp"), "object": "response.compaction",
                                      "created_at": int(time.time()), "output": output,
                                      "usage": self.responses.usage(job, call.reqs[0])})
        return await self.server.serve(request, answer)
