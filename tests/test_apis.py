"""OpenAI's Responses and Anthropic's Messages through their official clients over a real loopback socket, on the
packaged SmolLM2 (the same live server as the chat tests)."""

import json
import re
import time
import urllib.request
from http.client import HTTPConnection

import anthropic
import jsonschema
import numpy as np
import openai
import pytest

from test_server import HELLO, MODEL, http
from test_tools import PARAMS, WEATHER

QUESTION = HELLO[0]["content"]
R_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]
A_TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]
GREEDY = {"temperature": 0}


@pytest.fixture()
def claude(api):
    """The official anthropic client pointed at the live server."""
    return anthropic.Anthropic(base_url=api.url, api_key="unused", max_retries=0, timeout=120)


def _chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, **kw)


# ---- /v1/responses ---------------------------------------------------------------------------------------------

def test_responses_text_and_stream_equal_chat(client):
    want = _chat(client, max_tokens=40)
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0)
    assert r.output_text == want.choices[0].message.content and r.object == "response"
    assert r.usage.input_tokens == want.usage.prompt_tokens
    assert r.usage.output_tokens == want.usage.completion_tokens
    assert r.status == ("incomplete" if want.choices[0].finish_reason == "length" else "completed")
    short = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, temperature=0)
    assert short.status == "incomplete" == short.output[-1].status  # the item the budget cut, as OpenAI marks it
    # streamed, ended by a stop sequence (a Fireworks extra): the official event sequence, and the same text
    stop = {"stop": ["Paris"]}
    cut = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0, extra_body=stop)
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0,
                                 extra_body={**stop, "stream_options": {"include_obfuscation": False}}) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == cut.output_text == "".join(e.delta for e in events if hasattr(e, "delta"))
    assert final.status == cut.status == "completed" and "Paris" not in cut.output_text
    for opts, stream in (({"include_obfuscation": "no"}, True), ([], True), ({}, False)):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input=QUESTION, stream=stream, extra_body={"stream_options": opts})
        assert e.value.body["param"] == "stream_options"


def test_responses_logprobs_are_the_chat_apis(client):
    """`include: ["message.output_text.logprobs"]` with `top_logprobs`: the answer's tokens with their alternatives,
    as chat gives them for the same request, whole and on the stream's text deltas."""
    want = _chat(client, max_tokens=12, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    kw = dict(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0, top_logprobs=3,
              include=["message.output_text.logprobs"])
    part = client.responses.create(**kw).output[0].content[0]
    # the same tokens and alternatives; the numbers as close as two batches' (a cached prefix is read, not recomputed)
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in part.logprobs] == \
        [(t.token, [a.token for a in t.top_logprobs]) for t in want]
    np.testing.assert_allclose([t.logprob for t in part.logprobs], [t.logprob for t in want], atol=5e-3)
    assert "".join(t.token for t in part.logprobs).startswith(part.text)
    with client.responses.stream(**kw) as s:
        deltas = [e for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response().output[0].content[0]
    assert [t.logprob for e in deltas for t in e.logprobs] == [t.logprob for t in final.logprobs]
    assert [t.token for t in final.logprobs] == [t.token for t in want]
    assert client.responses.create(**{**kw, "include": []}).output[0].content[0].logprobs == []


def test_responses_forced_tool_call_then_its_result(api, client):
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=R_TOOLS,
                                    tool_choice=choice, max_output_tokens=120, temperature=0)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and r.status == "completed"
        for c in calls:
            assert c.name == "get_weather" and c.call_id
            jsonschema.validate(json.loads(c.arguments), WEATHER)
    # the result in the next turn, by previous_response_id: the tool's output reaches the prompt
    nxt = client.responses.create(model=MODEL, previous_response_id=r.id, tools=R_TOOLS, max_output_tokens=16,
                                  temperature=0, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                         "output": "18 degrees and sunny"}])
    assert nxt.status in ("completed", "incomplete") and nxt.previous_response_id == r.id
    assert nxt.usage.input_tokens > r.usage.input_tokens
    # Codex's goal objective: an output with a name and a namespace and no call_id, read as that tool's result
    goal = {"type": "function_call_output", "name": "goal_objective", "namespace": "agent", "output": "Stay dry."}
    _, counted, _ = http(api, "POST", "/v1/responses/input_tokens", {
        "previous_response_id": r.id, "tools": R_TOOLS, "input": [goal]})
    assert counted["input_tokens"] > r.usage.input_tokens
    status, out, _ = http(api, "POST", "/v1/responses", {"input": [{**goal, "name": 7}], "max_output_tokens": 2})
    assert status == 400 and "call_id" in out["error"]["message"]
    # an output that answers no call is named by its own index in `input`, as OpenAI's 400 does
    lost = {"type": "function_call_output", "call_id": "call_nowhere", "output": "x"}
    for body in ({"input": ["hi", lost]}, {"previous_response_id": r.id, "input": [lost]}):
        body["input"] = [{"role": "user", "content": t} if isinstance(t, str) else t for t in body["input"]]
        status, out, _ = http(api, "POST", "/v1/responses", {**body, "max_output_tokens": 2})
        where = f"input[{len(body['input']) - 1}]"
        assert status == 400 and out["error"]["message"].startswith(where), out
        assert "call_nowhere" in out["error"]["message"] and "messages" not in out["error"]["message"]
    status, out, _ = http(api, "POST", "/v1/responses/compact", {"input": [lost]})
    assert status == 400 and out["error"]["message"].startswith("input[0]"), out
    for bad, param in (({"max_output_tokens": 0}, "max_output_tokens"), ({"stream": True}, "stream")):
        for path in ("/v1/responses/compact", "/v1/responses")[:1 if param == "stream" else 2]:
            status, out, _ = http(api, "POST", path, {"input": "hi", **bad})
            assert status == 400 and out["error"]["param"] == param, out
    for bad in ({"stream": 0}, {"max_output_tokens": ""}):  # falsy, not taken as their defaults
        status, out, _ = http(api, "POST", "/v1/responses/compact", {"input": "hi", **bad})
        assert status == 400 and out["error"]["param"] == next(iter(bad)), out
    status, items, _ = http(api, "GET", f"/v1/responses/{nxt.id}/input_items?order=asc")
    kinds = [it["type"] for it in items["data"]]
    assert status == 200 and kinds == ["message", "function_call", "function_call_output"]
    _, newest, _ = http(api, "GET", f"/v1/responses/{nxt.id}/input_items?limit=2")  # OpenAI's paging: newest first
    assert [it["type"] for it in newest["data"]] == kinds[:0:-1] and newest["has_more"]
    _, rest, _ = http(api, "GET", f"/v1/responses/{nxt.id}/input_items?limit=2&after={newest['last_id']}")
    assert [it["type"] for it in rest["data"]] == kinds[:1] and not rest["has_more"]
    for query, param in (("limit=0", "limit"), ("limit=x", "limit"), ("order=up", "order")):
        status, wrong, _ = http(api, "GET", f"/v1/responses/{nxt.id}/input_items?{query}")
        assert status == 400 and wrong["error"]["param"] == param
    # streamed: the call's arguments arrive as deltas and assemble to valid arguments
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=R_TOOLS, tool_choice="required",
                                 max_output_tokens=120, temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    call = next(o for o in final.output if o.type == "function_call")
    assert args == done[0].arguments == call.arguments
    jsonschema.validate(json.loads(args), PARAMS[call.name])


def test_responses_structured_output_instructions_and_storage(api, client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Name a city.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)
    told = client.responses.create(model=MODEL, input=QUESTION, instructions="Answer in one word.",
                                   max_output_tokens=4, temperature=0)
    plain = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4, temperature=0, store=False)
    _, tokens, _ = http(api, "POST", "/tokenize", {"messages": [{"role": "system", "content": "Answer in one word."},
                                                                *HELLO]})
    assert told.usage.input_tokens == tokens["count"] != plain.usage.input_tokens
    assert client.responses.retrieve(told.id).output_text == told.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(plain.id)  # store: false keeps nothing
    client.responses.delete(told.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(told.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id=told.id)
    assert e.value.body["param"] == "previous_response_id"
    hosted = client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}], max_output_tokens=2,
                                     temperature=0)  # sampled, two tokens may be blank
    assert hosted.output_text  # a hosted tool is the provider's: ignored here, as Codex and the Agents SDK send them
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "function", "parameters": {}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"type": "message", "role": "user", "content": 3}])
    assert e.value.body["param"] == "input"
    for bad in ({"metadata": {"k": 5}}, {"metadata": {f"k{i}": "v" for i in range(17)}}, {"user": 5},
                {"truncation": "bogus"}, {"include": "x"}, {"include": ["bogus"]}, {"top_logprobs": 21},
                {"background": "yes"}, {"background": True, "store": False}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="hi", max_output_tokens=2, **bad)
        assert e.value.body["param"] == next(iter(bad))
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=-1)
    assert e.value.body["param"] == "max_output_tokens" and "'max_output_tokens'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI requires the schema; it used to mean any object
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "json_schema", "name": "x"}})
    assert e.value.body["param"] == "text.format"


def test_background_responses_poll_resume_their_stream_and_cancel(api, client):
    """OpenAI's background mode through the official client: a response created with `background` answers at once
    (queued) and polls to what the same request gives in the foreground; a streamed one, its connection dropped, is
    joined again after the last event seen, and after it ended from any event (the store keeps them); cancel ends a
    running one `cancelled` and frees its slot, and is idempotent; a synchronous one cannot be cancelled."""
    import time

    ask = dict(model=MODEL, input=QUESTION, max_output_tokens=24, temperature=0)
    want = client.responses.create(**ask)
    r = client.responses.create(**ask, background=True)
    assert r.background and r.status in ("queued", "in_progress") and not want.background
    while (r := client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        time.sleep(0.05)
    assert (r.status, r.output_text, r.usage.output_tokens) == (want.status, want.output_text, want.usage.output_tokens)
    assert [(i.role, [(c.type, c.text) for c in i.content]) for i in client.responses.input_items.list(r.id).data] \
        == [("user", [("input_text", QUESTION)])]  # OpenAI's shape: content as parts

    stream = client.responses.create(**dict(ask, max_output_tokens=48), background=True, stream=True,
                                     extra_body={"ignore_eos": True})
    head = []
    for ev in stream:
        head.append(ev)
        if len(head) == 5:
            break
    stream.close()  # the client goes away: the response goes on
    rid = head[0].response.id
    assert head[0].type == "response.created" and head[0].response.status == "queued"
    assert [e.type for e in head[1:3]] == ["response.queued", "response.in_progress"]
    rest = list(client.responses.retrieve(rid, stream=True, starting_after=head[-1].sequence_number))
    events = head + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = rest[-1].response
    assert rest[-1].type == "response.incomplete" and final.usage.output_tokens == 48 and final.background
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert client.responses.retrieve(rid).output_text == final.output_text
    replay = list(client.responses.retrieve(rid, stream=True, starting_after=2))  # ended: from the store
    assert [e.sequence_number for e in replay] == list(range(3, len(events))) and replay[-1].response.id == rid
    with pytest.raises(openai.BadRequestError) as e:
        list(client.responses.retrieve(r.id, stream=True))  # created without stream: nothing to join
    assert e.value.body["param"] == "stream"
    for bad in ("-5", "--5", "x"):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.retrieve(rid, stream=True, extra_query={"starting_after": bad})
        assert e.value.body["param"] == "starting_after"

    long = client.responses.create(**dict(ask, max_output_tokens=900), background=True,
                                   extra_body={"ignore_eos": True})
    while not (now := client.responses.retrieve(long.id)).output_text:
        assert now.status in ("queued", "in_progress")
        time.sleep(0.05)
    with pytest.raises(openai.BadRequestError) as e:  # its answer is not there yet
        client.responses.create(model=MODEL, input="and?", previous_response_id=long.id, max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id"
    gone = client.responses.cancel(long.id)
    assert gone.status == "cancelled" and gone.output_text.startswith(now.output_text)
    assert client.responses.retrieve(long.id).status == "cancelled" == client.responses.cancel(long.id).status
    for _ in range(100):  # the engine drops the aborted sequence at its next step
        if api.engine.stats()["running"] == 0:
            break
        time.sleep(0.05)
    assert api.engine.stats()["running"] == 0
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(want.id)  # a synchronous response
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_none")
    # stored while running, and the server stopped before it ended: it reads as failed
    api.server.store.put({**want.model_dump(), "id": "resp_cut", "status": "in_progress", "background": True}, [])
    cut = client.responses.retrieve("resp_cut")
    assert cut.status == "failed" and cut.error.code == "server_error"
    client.responses.delete("resp_cut")


def test_a_responses_chain_cannot_grow_past_what_one_request_may_carry(api, client):
    """Each turn drops the big item from the prompt (prompt_truncate_len) but keeps it in the stored conversation:
    once that holds more than the 1 MiB a body may carry, previous_response_id gets a 400 (stored chains grew
    without bound, and each turn read and parsed all of it on the event loop)."""
    big = {"role": "user", "content": "word " * 90_000}  # 450 KB
    prev, sizes = None, []
    with pytest.raises(openai.BadRequestError) as e:
        for _ in range(4):
            r = client.responses.create(model=MODEL, input=[big, {"role": "user", "content": "hi"}],
                                        previous_response_id=prev, max_output_tokens=1,
                                        extra_body={"prompt_truncate_len": 100})
            prev = r.id
            sizes.append(api.server.store.size(prev))
    assert e.value.body["param"] == "previous_response_id" and "--max-body-mb" in e.value.message
    assert len(sizes) == 3 and sizes[1] <= (1 << 20) < sizes[2]  # refused exactly when the stored chain outgrew it


def test_responses_merge_instructions_and_developer_messages_into_one_system_message(api, client):
    r = client.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=2,
                                reasoning={"effort": None, "summary": "auto"},  # as the Agents SDK may send it
                                input=[{"role": "developer", "content": "Use French."},
                                       {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    _, tokens, _ = http(api, "POST", "/tokenize", {"messages": [
        {"role": "system", "content": "Be brief.\n\nUse French."}, *HELLO]})
    assert r.usage.input_tokens == tokens["count"]
    counted = client.responses.input_tokens.count(model=MODEL, instructions="Be brief.", previous_response_id=r.id,
                                                  input="And?")  # what the next turn would read
    nxt = client.responses.create(model=MODEL, instructions="Be brief.", previous_response_id=r.id, input="And?",
                                  max_output_tokens=1)
    assert counted.object == "response.input_tokens" and counted.input_tokens == nxt.usage.input_tokens


def test_responses_compact_keeps_the_user_messages_and_the_models_summary(api, client):
    """`/v1/responses/compact` (the Agents SDK's compaction session): the user messages, then a compaction item
    whose summary is the served model's greedy reply to the conversation and `compaction.ASK`; a later input reads
    the item as a user turn holding the summary."""
    from server.compaction import ASK
    from server.openai_responses import SUMMARY_HEAD, summary_of

    ask = dict(model=MODEL, max_output_tokens=8, temperature=0)
    r1 = client.responses.create(**ask, input="My name is Ada. What is 2+2?")
    r2 = client.responses.create(**ask, input="And 3+3?", previous_response_id=r1.id)
    c = client.responses.compact(model=MODEL, previous_response_id=r2.id,
                                 extra_body={"max_output_tokens": 24, "temperature": 0})
    assert c.object == "response.compaction" and [o.type for o in c.output] == ["message", "message", "compaction"]
    assert [o.content[0].text for o in c.output[:2]] == ["My name is Ada. What is 2+2?", "And 3+3?"]
    summary = summary_of(c.output[2].model_dump())
    talk = [{"role": "user", "content": "My name is Ada. What is 2+2?"},
            {"role": "assistant", "content": r1.output_text},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": r2.output_text}]
    want = client.chat.completions.create(model=MODEL, messages=[*talk, {"role": "user", "content": ASK}],
                                          max_tokens=24, temperature=0)
    assert summary and summary == want.choices[0].message.content.strip()
    assert c.usage.output_tokens == want.usage.completion_tokens
    again = client.responses.compact(model=MODEL, input=[{"role": m["role"], "content": m["content"]} for m in talk],
                                     extra_body={"max_output_tokens": 24, "temperature": 0})  # the same, as input
    assert summary_of(again.output[-1].model_dump()) == summary
    kept = [o.model_dump(exclude_none=True, warnings=False) for o in c.output]  # user messages: input_text, as OpenAI
    nxt = client.responses.create(**ask, input=[*kept, {"role": "user", "content": "Go on."}])
    _, tokens, _ = http(api, "POST", "/tokenize", {"messages": [talk[0], talk[2], {
        "role": "user", "content": SUMMARY_HEAD + summary}, {"role": "user", "content": "Go on."}]})
    assert nxt.usage.input_tokens == tokens["count"]
    with pytest.raises(openai.BadRequestError) as e:  # past the context: the code clients compact on, as 'input'
        client.responses.compact(model=MODEL, input="word " * api.engine.max_len)
    assert (e.value.body["param"], e.value.body["code"]) == ("input", "context_length_exceeded")
    foreign = {"type": "compaction", "encrypted_content": "gAAAAABo-not-ours"}
    for call in (lambda: client.responses.compact(model=MODEL),
                 lambda: client.responses.create(**ask, input=[foreign, {"role": "user", "content": "hi"}])):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["param"] == "input"


def test_responses_item_references_read_the_stored_items(client):
    """An `item_reference` (what the Vercel AI SDK sends for earlier assistant turns while `store` is on) reads the
    stored output item it names, or an input item by the id `input_items` lists; an unknown id is a 404.
    `reasoning.summary` is echoed back."""
    ask = dict(model=MODEL, max_output_tokens=8, temperature=0)
    r = client.responses.create(**ask, input=QUESTION, reasoning={"summary": "auto"})
    assert r.reasoning.summary == "auto"
    said = {"role": "user", "content": QUESTION}
    named = client.responses.create(**ask, input=[said, {"type": "item_reference", "id": r.output[0].id},
                                                  {"role": "user", "content": "And Spain?"}])
    spelled = client.responses.create(**ask, input=[said, {"role": "assistant", "content": r.output_text},
                                                    {"role": "user", "content": "And Spain?"}])
    assert named.usage.input_tokens == spelled.usage.input_tokens and named.output_text == spelled.output_text
    bare = client.responses.create(**ask, input=[said, {"id": r.output[0].id},  # `type` may be left out
                                                 {"role": "user", "content": "And Spain?"}])
    assert bare.usage.input_tokens == spelled.usage.input_tokens
    asked = client.responses.input_items.list(r.id).data
    assert len(asked) == 1 and asked[0].id.startswith("msg_") and asked[0].role == "user"
    again = client.responses.create(**ask, input=[{"type": "item_reference", "id": asked[0].id},
                                                  {"type": "item_reference", "id": r.output[0].id},
                                                  {"role": "user", "content": "And Spain?"}])
    assert again.usage.input_tokens == spelled.usage.input_tokens
    assert [i.id for i in client.responses.input_items.list(again.id, order="asc").data][:2] == [asked[0].id,
                                                                                                 r.output[0].id]
    mine = client.responses.create(**ask, input=[{**said, "type": "message", "id": "msg_mine", "_stored": True}])
    assert client.responses.input_items.list(mine.id).data[0].id not in ("msg_mine", asked[0].id)
    chained = client.responses.create(**ask, previous_response_id=r.id, input="And Spain?")
    client.responses.delete(r.id)  # the chain still holds r's items: they are still found by id
    held = client.responses.create(**ask, input=[{"type": "item_reference", "id": asked[0].id}])
    assert held.usage.input_tokens == client.responses.create(**ask, input=QUESTION).usage.input_tokens
    assert asked[0].id in [i.id for i in client.responses.input_items.list(chained.id).data]
    for nope in ("msg_nope", "msg_mine"):
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.create(**ask, input=[said, {"type": "item_reference", "id": nope}])
    assert e.value.body["param"] == "input"


def test_conversations_hold_items_that_responses_read_and_add_to(api, client):
    """OpenAI's Conversations API through its client: a response named by `conversation` reads the conversation's
    items before its input (the same reply as those items sent as input) and adds its input and output to it."""
    said = {"type": "message", "role": "user", "content": "Hi, I am Ada."}
    conv = client.conversations.create(items=[said], metadata={"topic": "intro"})
    assert conv.object == "conversation" and conv.metadata == {"topic": "intro"} and conv.id.startswith("conv_")
    ask = dict(model=MODEL, max_output_tokens=8, temperature=0)
    r = client.responses.create(**ask, conversation=conv.id, input=QUESTION)
    alone = client.responses.create(**ask, input=[said, {"role": "user", "content": QUESTION}], store=False)
    assert r.conversation.id == conv.id and r.output_text == alone.output_text
    assert r.usage.input_tokens == alone.usage.input_tokens
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert [(i.type, i.role) for i in items] == [("message", "user")] * 2 + [("message", "assistant")]
    assert items[0].content[0].type == "input_text" and items[0].content[0].text == said["content"]
    assert items[2].content[0].text == r.output_text and items[2].id == r.output[0].id
    # streamed, by {"id": ...}: the next turn reads all three, and adds two; while it runs, the conversation is
    # locked to others (OpenAI's `conversation_locked`)
    stream = client.responses.create(**ask, conversation={"id": conv.id}, input="And?", stream=True)
    events = [next(stream)]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**ask, conversation=conv.id, input="Meanwhile?")
    assert e.value.body["code"] == "conversation_locked" and e.value.body["param"] == "conversation"
    events += list(stream)
    done = events[-1].response
    assert done.conversation.id == conv.id and done.usage.input_tokens > r.usage.input_tokens
    newest = client.conversations.items.list(conv.id, limit=2)  # newest first, paged
    assert [i.role for i in newest.data] == ["assistant", "user"] and newest.has_more
    assert newest.data[1].content[0].text == "And?"
    # items added, read, deleted; metadata replaced
    added = client.conversations.items.create(conv.id, items=[{"role": "user", "content": "Bye."},
                                                               {"type": "function_call_output", "call_id": "c1",
                                                                "output": "42"}])
    assert [i.type for i in added.data] == ["message", "function_call_output"] and not added.has_more
    first = added.data[0].id
    assert client.conversations.items.retrieve(first, conversation_id=conv.id).content[0].text == "Bye."
    assert client.conversations.items.delete(first, conversation_id=conv.id).id == conv.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(first, conversation_id=conv.id)
    assert len(list(client.conversations.items.list(conv.id))) == 6
    assert client.conversations.update(conv.id, metadata={"topic": "bye"}).metadata == {"topic": "bye"}
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "bye"}
    # bad input: the API's errors
    for kw, param in ((dict(conversation=conv.id, previous_response_id=r.id), "conversation"),
                      (dict(conversation=7), "conversation")):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**ask, input="hi", **kw)
        assert e.value.body["param"] == param
    for items in ([said] * 21, [{"role": "robot", "content": "x"}], []):
        with pytest.raises(openai.BadRequestError) as e:
            client.conversations.items.create(conv.id, items=items)
        assert e.value.body["param"] == "items"
    with pytest.raises(openai.BadRequestError):
        client.conversations.create(metadata={"k": 3})
    assert client.conversations.delete(conv.id).deleted
    for call in (lambda: client.conversations.retrieve(conv.id),
                 lambda: client.responses.create(**ask, conversation=conv.id, input="hi")):
        with pytest.raises(openai.NotFoundError):
            call()


# ---- /v1/messages ----------------------------------------------------------------------------------------------

def test_messages_text_stream_and_stop_sequence(api, client, claude):
    want = _chat(client, max_tokens=40)
    m = claude.messages.create(model=MODEL, max_tokens=40, messages=HELLO, extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.content[0].text == want.choices[0].message.content
    assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[want.choices[0].finish_reason]
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == want.usage.prompt_tokens
    assert m.usage.output_tokens == want.usage.completion_tokens
    with claude.messages.stream(model=MODEL, max_tokens=40, messages=HELLO, extra_body=GREEDY) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == m.content[0].text and final.stop_reason == m.stop_reason
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    stopped = claude.messages.create(model=MODEL, max_tokens=40, messages=HELLO, stop_sequences=["Paris"],
                                     extra_body=GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert "Paris" not in stopped.content[0].text
    system = [{"type": "text", "text": "You are a geography teacher."}]
    count = claude.messages.count_tokens(model=MODEL, messages=HELLO, system=system)
    _, tokens, _ = http(api, "POST", "/tokenize", {"messages": [{"role": "system", "content": system[0]["text"]},
                                                                *HELLO]})
    assert count.input_tokens == tokens["count"]


def test_messages_forced_tool_use_then_its_result(claude):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        m = claude.messages.create(model=MODEL, max_tokens=120, messages=ask, tools=A_TOOLS, tool_choice=choice,
                                   extra_body=GREEDY)
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses
        for u in uses:
            assert u.name == "get_weather" and u.id.startswith("toolu_")
            jsonschema.validate(u.input, WEATHER)
    turn = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                "content": "18 degrees and sunny"}]}]
    nxt = claude.messages.create(model=MODEL, max_tokens=16, messages=turn, tools=A_TOOLS, extra_body=GREEDY)
    assert nxt.stop_reason in ("end_turn", "max_tokens", "tool_use")
    with_result = claude.messages.count_tokens(model=MODEL, messages=turn, tools=A_TOOLS).input_tokens
    without = claude.messages.count_tokens(model=MODEL, messages=turn[:2], tools=A_TOOLS).input_tokens
    assert with_result > without
    with claude.messages.stream(model=MODEL, max_tokens=120, messages=ask, tools=A_TOOLS,
                                tool_choice={"type": "any"}, extra_body=GREEDY) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    jsonschema.validate(next(b for b in final.content if b.type == "tool_use").input, WEATHER)


def test_messages_prefill_continues_the_last_assistant_turn(api, client, claude):
    prefill = HELLO + [{"role": "assistant", "content": "The capital of France is"}]
    m = claude.messages.create(model=MODEL, max_tokens=8, messages=prefill, extra_body=GREEDY)
    tok = api.model.tokenizer
    text = tok.apply_chat_template(prefill, tokenize=False, continue_final_message=True)
    assert text.endswith("The capital of France is")  # no end of turn, no new assistant header
    want = client.completions.create(model=MODEL, prompt=tok.encode(text, add_special_tokens=False), max_tokens=8,
                                     temperature=0)
    assert m.content[0].text == want.choices[0].text and m.usage.output_tokens == want.usage.completion_tokens


def test_messages_take_system_messages_within_the_conversation(api, client, claude):
    """Claude Code's mid-conversation-system beta: `role: system` in `messages` (every request it sends): a leading
    one joins the system prompt, a later one leads the next user turn's text; system messages alone are a 400."""
    msgs = [{"role": "system", "content": "Agents: none."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "system", "content": "Answer in French."}, *HELLO]
    counted = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=msgs)
    _, want, _ = http(api, "POST", "/tokenize", {"messages": [
        {"role": "system", "content": "Be brief.\n\nAgents: none."}, msgs[1], msgs[2],
        {"role": "user", "content": "Answer in French.\n\n" + QUESTION}]})
    assert counted.input_tokens == want["count"]
    m = claude.messages.create(model=MODEL, max_tokens=2, system="Be brief.", messages=msgs)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == want["count"]
    prefill = [*HELLO, {"role": "assistant", "content": "The capital"}, {"role": "system", "content": "Be brief."}]
    counted = claude.messages.count_tokens(model=MODEL, messages=prefill)  # after a prefill: with the system prompt
    _, want, _ = http(api, "POST", "/tokenize", {"messages": [{"role": "system", "content": "Be brief."},
                                                              *prefill[:2]], "continue_final_message": True,
                                                 "add_generation_prompt": False})
    assert counted.input_tokens == want["count"]
    status, out, _ = http(api, "POST", "/v1/messages", {"max_tokens": 2, "messages": [msgs[0]]})
    assert status == 400 and out["error"]["type"] == "invalid_request_error"
    long = [{"role": "user", "content": "word " * api.engine.max_len}]  # Anthropic's words, which Claude Code reads
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=2, messages=long)
    assert re.search(rf"prompt is too long: \d+ tokens > {api.engine.max_len - 1} maximum", e.value.message)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=long)
    assert e.value.body["param"] == "input" and e.value.body["code"] == "context_length_exceeded"


def _raw(api, path, body) -> str:
    req = urllib.request.Request(api.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


def test_quiet_agent_streams_are_kept_alive(api, client, claude, monkeypatch):
    """While a streamed reply is quiet (here a long prompt's prefill; `ping_every` shortened), Messages sends
    Anthropic's `ping` events and Responses `response.in_progress` again (an event: Codex's idle timer skips SSE
    comments), which the official clients take in stride (the same text as unstreamed); chat completions stay as
    vLLM streams them."""
    monkeypatch.setattr(api.server, "ping_every", 0.01)
    long = " ".join(f"item {i}" for i in range(api.engine.max_len // 6)) + ". " + QUESTION  # ~5/6 of the context
    ask = {"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": long}]}
    raw = _raw(api, "/v1/messages", {**ask, **GREEDY, "stream": True})
    assert "event: ping\ndata: {\"type\": \"ping\"}" in raw
    with claude.messages.stream(**ask, extra_body=GREEDY) as s:
        streamed = s.get_final_text()
    assert streamed == claude.messages.create(**ask, extra_body=GREEDY).content[0].text
    body = {"model": MODEL, "input": long, "max_output_tokens": 6, "temperature": 0}
    assert _raw(api, "/v1/responses", {**body, "stream": True}).count("event: response.in_progress") > 1
    events = list(client.responses.create(**body, stream=True))
    assert events[-1].response.output_text == client.responses.create(**body).output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    chat = _raw(api, "/v1/chat/completions", {"model": MODEL, "max_tokens": 6, "stream": True,
                                              "messages": ask["messages"]})
    assert "keep-alive" not in chat and "ping" not in chat
    # a client that leaves after a ping: its request is aborted and its slot freed, as on any stream
    before = api.engine.stats()["aborted"]
    conn = HTTPConnection(api.url.split("//")[1], timeout=120)
    conn.request("POST", "/v1/messages", json.dumps({**ask, "max_tokens": 900, "stream": True, "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    reply = conn.getresponse()
    seen = b""
    while b"event: ping" not in seen:
        seen += reply.read1(4096)
    conn.close()
    deadline = time.time() + 60
    while time.time() < deadline and not (api.engine.stats()["aborted"] > before and
                                          api.engine.stats()["free_slots"] == api.engine.runner.rc.max_num_seqs):
        time.sleep(0.1)
    assert api.engine.stats()["aborted"] == before + 1
    assert api.engine.stats()["free_slots"] == api.engine.runner.rc.max_num_seqs


def test_messages_read_text_documents_and_the_betas_output_format(api, claude):
    """A text `document` block is read as its title and text (a PDF is a 400); the structured-outputs beta's
    top-level `output_format` (what litellm sends for Claude-named models) constrains as `output_config.format`."""
    doc = {"type": "document", "title": "Memo", "source": {"type": "text", "media_type": "text/plain",
                                                            "data": "The launch moved to May."}}
    ask = {"type": "text", "text": "When is the launch?"}
    read = claude.messages.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": [doc, ask]}])
    same = claude.messages.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Memo\nThe launch moved to May."}, ask]}])
    seen = [m.usage.input_tokens + m.usage.cache_read_input_tokens for m in (read, same)]  # the same prompt
    assert seen[0] == seen[1] and same.usage.cache_read_input_tokens > 0
    pdf = {**doc, "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    status, out, _ = http(api, "POST", "/v1/messages", {"max_tokens": 4, "messages": [{"role": "user",
                                                                                        "content": [pdf, ask]}]})
    assert status == 400 and "PDF" in out["error"]["message"]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = claude.messages.create(model=MODEL, max_tokens=40, messages=HELLO, extra_body={
        "output_format": {"type": "json_schema", "schema": schema}, "temperature": 0})
    jsonschema.validate(json.loads(r.content[0].text), schema)
    fmt = {"type": "json_schema", "schema": schema}
    status, out, _ = http(api, "POST", "/v1/messages", {"max_tokens": 4, "messages": HELLO, "output_format": fmt,
                                                        "output_config": {"format": fmt}})
    assert status == 400 and "output_format" in out["error"]["message"]
    listed = claude.models.list()  # Anthropic's model list and card fields, beside OpenAI's
    assert [m.id for m in listed.data][:1] == [MODEL] and listed.data[0].type == "model" and not listed.has_more
    card = claude.models.retrieve(MODEL)
    assert card.display_name == MODEL and card.created_at.year >= 2026 and card.max_input_tokens > 0


def test_messages_errors_take_anthropics_shape(api, claude):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=0, messages=HELLO)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-opus", max_tokens=4, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error"
    status, out, _ = http(api, "POST", "/v1/messages", raw=b"{nope")
    assert status == 400 and out["error"]["type"] == "invalid_request_error"
    for bad in ({"thinking": {"type": "enabled", "budget_tokens": -5}}, {"stop_sequences": "end"},
                {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
                {"messages": [*HELLO, {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t1", "name": "f", "input": [1]}]}]}):
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(**{"model": MODEL, "max_tokens": 4, "messages": HELLO, **bad})
        assert e.value.body["error"]["type"] == "invalid_request_error"
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}
    for bad, param in (({"temperature": 1.5}, "temperature"), ({"max_tokens": 50, "thinking": {
            "type": "enabled", "budget_tokens": 100}}, "thinking"), ({"messages": [*HELLO, call]}, "tools"),
            ({"messages": [{"role": "user", "content": []}]}, "messages"),
            ({"output_config": {"format": {"type": "json_schema"}}}, "output_config"),
            ({"metadata": {"user_id": 5}}, "metadata"), ({"service_tier": "bogus"}, "service_tier"),
            ({"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {
                "type": "auto", "disable_parallel_tool_use": "yes"}}, "tool_choice")):
        status, out, _ = http(api, "POST", "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": HELLO, **bad})
        assert status == 400 and out["error"]["type"] == "invalid_request_error", (bad, out)
        assert param.split(".")[0] in out["error"]["message"] or param == "messages", (param, out)
    r = claude.messages.create(model=MODEL, max_tokens=4, messages=HELLO, thinking={  # a turn's budget: past max_tokens
        "type": "enabled", "budget_tokens": 100}, extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
        extra_body={"temperature": 0})  # greedy: a sampled reply may end within 4 tokens ("Paris.")
    assert r.stop_reason == "max_tokens"
    status, out, _ = http(api, "POST", "/v1/messages", {"max_tokens": 4, "messages": HELLO, "stop_sequences": [1]})
    assert status == 400 and "'stop_sequences'" in out["error"]["message"]  # Anthropic's name, not chat's 'stop'
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=-1, messages=HELLO)
    assert "required" not in e.value.message and "-1" in e.value.message
    for raw in (b'{"max_tokens": 4, "messages": [{"role": "user", "content": "\\ud83d"}]}',  # not Unicode text
                b'{"max_tokens": 4, "metadata": ' + b"[" * 100 + b"]" * 100 + b"}"):  # nested past the bound
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            status, out, _ = http(api, "POST", path, raw=raw)
            assert status == 400 and out["type"] == "error" and out["error"]["type"] == "invalid_request_error"
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "x"}]}
    status, out, _ = http(api, "POST", "/v1/messages", {"max_tokens": 4, "tools": tools, "system": "Be brief.",
                                                        "messages": [*HELLO, call, result]})
    assert status == 400 and out["error"]["message"].startswith("messages[2].content[0]"), out  # its own index
    assert "'t2'" in out["error"]["message"] and "role 'tool'" not in out["error"]["message"]
    note = {"role": "system", "content": "Be brief."}  # a mid-conversation system message, led into the result's turn
    status, out, _ = http(api, "POST", "/v1/messages", {"max_tokens": 4, "tools": tools,
                                                        "messages": [*HELLO, call, note, result]})
    assert status == 400 and out["error"]["message"].startswith("messages[3].content[0]"), out
    status, out, _ = http(api, "POST", "/v1/messages", {"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert status == 400 and "image" in out["error"]["message"]
    status, out, _ = http(api, "POST", "/v1/messages", {"model": MODEL, "messages": HELLO})  # max_tokens is required
    assert status == 400 and out["error"]["type"] == "invalid_request_error" and "max_tokens" in out["error"]["message"]
    assert claude.messages.create(model=MODEL, max_tokens=2, messages=HELLO).usage.output_tokens >= 1


# ---- llama.cpp's /completion ------------------------------------------------------------------------------------

def _stream_lines(api, path, body):
    """The `data:` lines of a streamed reply, parsed."""
    req = urllib.request.Request(api.url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    return [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: ")]


def test_llama_cpp_code_completion_limits_n_indent_and_t_max_predict_ms(api):
    """llama.cpp's limits for editors' completions (llama.vim, llama.vscode send them): `n_indent` ends the reply at
    the first line after a new line indented by fewer blanks (cut before its first other character, as llama.cpp
    cuts it), `t_max_predict_ms` at a new line once that long has passed since the first token; both end as
    "limit"."""
    body = {"prompt": "def fibonacci(n):\n", "n_predict": 48, "temperature": 0}
    status, free, _ = http(api, "POST", "/completion", body)
    text = free["content"]
    lines = text.split("\n")
    assert status == 200 and len(lines) > 2, text  # the greedy reply runs over lines (the test's premise)
    first = len(lines[1]) - len(lines[1].lstrip(" \t"))  # the indent of the line after the first new line
    status, cut, _ = http(api, "POST", "/completion", {**body, "n_indent": first + 1})
    assert status == 200 and cut["content"] == lines[0] + "\n" + lines[1][:first] and cut["stop_type"] == "limit"
    status, kept, _ = http(api, "POST", "/completion", {**body, "n_indent": first})
    assert kept["content"].startswith(lines[0] + "\n" + lines[1]) and len(kept["content"]) > len(cut["content"])
    status, timed, _ = http(api, "POST", "/completion", {**body, "t_max_predict_ms": 1})
    assert status == 200 and timed["stop_type"] == "limit" and "\n" in timed["content"]
    assert text.startswith(timed["content"]) and len(timed["content"]) < len(text)
    status, out, _ = http(api, "POST", "/v1/completions", {**body, "max_tokens": 48, "n_indent": first + 1})
    assert out["choices"][0]["text"] == cut["content"] and out["choices"][0]["finish_reason"] == "length"
    for wrong in ({"n_indent": -1}, {"t_max_predict_ms": -2}, {"n_indent": "2"}):
        status, out, _ = http(api, "POST", "/completion", {**body, **wrong})
        assert status == 400 and out["error"]["param"] == next(iter(wrong))


def test_llama_cpp_completion_whole_and_streamed(api, client):
    """llama.cpp's `/completion` over a socket: the greedy reply is the completions API's for the same settings, in
    llama.cpp's shape (content, tokens, stop_type, counts, timings, settings, completion_probabilities); the stream's
    data lines carry each piece's text and tokens and end with the whole reply's figures; prompts as text, token ids
    or both; logit_bias pairs; stop strings past the OpenAI API's four; `post_sampling_probs` (the probabilities of
    llama.cpp's candidates after its chain: top_k's, at the temperature; a greedy choice's 1); `/props`; bad fields
    are 400s."""
    tok = api.model.tokenizer
    text = "The capital of France is"
    ref = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0,
                                    extra_body={"return_token_ids": True})
    want, want_ids = ref.choices[0].text, ref.choices[0].model_extra["token_ids"]
    body = {"prompt": text, "n_predict": 8, "temperature": 0, "return_tokens": True, "n_probs": 2,
            "cache_prompt": True, "samplers": ["top_k", "temperature"], "seed": -1}
    status, r, _ = http(api, "POST", "/completion", body)
    assert status == 200 and r["content"] == want and r["tokens"] == want_ids, r
    assert r["stop"] is True and r["stop_type"] == "limit" and r["stopping_word"] == "" and r["model"] == MODEL
    assert r["tokens_predicted"] == 8 and r["tokens_evaluated"] == ref.usage.prompt_tokens and r["prompt"] == text
    assert r["timings"]["predicted_n"] == 8 and r["timings"]["predicted_ms"] > 0 and r["generation_settings"][
        "n_predict"] == 8 and r["generation_settings"]["temperature"] == 0
    probs = r["completion_probabilities"]
    assert [p["id"] for p in probs] == want_ids and all(len(p["top_logprobs"]) == 2 for p in probs)
    assert all(p["top_logprobs"][0]["logprob"] >= p["logprob"] - 1e-4 for p in probs)
    assert bytes(probs[0]["bytes"]).decode() == probs[0]["token"] == tok.decode(want_ids[:1])
    ids = ref.model_extra["prompt_token_ids"]
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[i:]) == text[len(tok.decode(ids[:i])):])
    for prompt in (ids, [text], ids[:cut] + [tok.decode(ids[cut:])]):  # ids, a list of one, ids and text mixed
        status, r2, _ = http(api, "POST", "/completion", {**body, "prompt": prompt})
        assert status == 200 and r2["content"] == want, prompt
    status, several, _ = http(api, "POST", "/completion", {**body, "prompt": [text, ids, "Hello"]})
    assert status == 200 and [r3["index"] for r3 in several] == [0, 1, 2]
    assert [r3["content"] for r3 in several[:2]] == [want, want] and several[2]["prompt"] == "Hello"
    status, out, _ = http(api, "POST", "/completion", {**body, "prompt": [text, "Hello"], "stream": True})
    assert status == 400 and out["error"]["param"] == "prompt"
    chunks = _stream_lines(api, "/completion", {**body, "stream": True})
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [[p["id"] for p in c["completion_probabilities"]] for c in chunks[:-1]] == [c["tokens"] for c in chunks[:-1]]
    assert sum((c["completion_probabilities"] for c in chunks[:-1]), []) == probs
    assert "".join(c["content"] for c in chunks) == want and sum((c["tokens"] for c in chunks), []) == want_ids
    assert [c["tokens_predicted"] for c in chunks[:-1]] == list(np.cumsum([len(c["tokens"]) for c in chunks[:-1]]))
    assert chunks[-1]["tokens_predicted"] == 8
    templated = tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    status, r, _ = http(api, "POST", "/completion", {"prompt": templated, "n_predict": 64, "temperature": 0})
    assert r["stop_type"] == "eos" and "Paris" in r["content"]
    stops = ["zz", "yy", "xx", "ww", "vv", "."]  # six: llama.cpp takes more than OpenAI's four
    status, r, _ = http(api, "POST", "/completion", {"prompt": templated, "n_predict": 64, "temperature": 0,
                                                     "stop": stops})
    assert r["stop_type"] == "word" and r["stopping_word"] == "." and "." not in r["content"]
    for bias in ([[want_ids[0], False]], {str(want_ids[0]): False}, [[tok.decode(want_ids[:1]), -100]]):
        status, r, _ = http(api, "POST", "/completion", {**body, "logit_bias": bias})
        assert r["tokens"][0] != want_ids[0], bias
    sillytavern = {**body, "grammar": "", "json_schema": None, "stop": None, "mirostat": None, "top_k": -1,
                   "repeat_penalty": 1.5, "repeat_last_n": 0}  # its defaults: none of these asks for anything
    status, r, _ = http(api, "POST", "/completion", {**body, "temperature": 4.0, "min_p": 0.1})
    assert status == 200 and r["generation_settings"]["temperature"] == 4.0  # llama.cpp's: no upper bound
    status, r, _ = http(api, "POST", "/completion", sillytavern)
    assert status == 200 and r["content"] == want and r["generation_settings"]["repeat_penalty"] == 1.0
    warm = {**body, "temperature": 0.5, "seed": 5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "n_predict": 12}
    http(api, "POST", "/completion", warm)  # the prompt's page cached first: both below read it alike
    status, r, _ = http(api, "POST", "/completion", {**warm, "dynatemp_range": 0.5, "dynatemp_exponent": 0})
    assert status == 200 and r["generation_settings"]["dynatemp_range"] == 0.5
    assert r["content"] == http(api, "POST", "/completion", {**warm, "temperature": 1.0})[1]["content"]
    seeded = {**warm, "temperature": 0.7, "top_k": 3, "n_probs": 5, "repeat_penalty": 1.0, "typical_p": 1.0}
    raw = http(api, "POST", "/completion", seeded)[1]
    status, post, _ = http(api, "POST", "/completion", {**seeded, "post_sampling_probs": True})
    assert status == 200 and post["tokens"] == raw["tokens"] and post["generation_settings"]["post_sampling_probs"]
    for before, after in zip(raw["completion_probabilities"], post["completion_probabilities"]):
        top = before["top_logprobs"][:3]  # llama.cpp's chain here: top_k 3, then the temperature over those
        z = np.array([t["logprob"] for t in top]) / 0.7
        want = dict(zip([t["id"] for t in top], np.exp(z - z.max()) / np.exp(z - z.max()).sum()))
        assert [t["id"] for t in after["top_probs"]] == list(want) and "top_logprobs" not in after
        np.testing.assert_allclose([t["prob"] for t in after["top_probs"]], list(want.values()), atol=1e-4)
        assert after["prob"] == pytest.approx(want[after["id"]], abs=1e-4) and "logprob" not in after
    greedy = http(api, "POST", "/completion", {**body, "post_sampling_probs": True})[1]["completion_probabilities"]
    assert [(p["prob"], [(t["id"], t["prob"]) for t in p["top_probs"]]) for p in greedy] == [
        (1.0, [(i, 1.0)]) for i in want_ids]  # a greedy draw's one candidate
    status, props, _ = http(api, "GET", "/props")
    status, r, _ = http(api, "POST", "/completion", {"prompt": text, "n_predict": 1})
    in_force = props["default_generation_settings"]["params"]  # the model's defaults where a request sets nothing
    assert in_force["n_predict"] == in_force["max_tokens"] and in_force["repeat_penalty"] == in_force[
        "repetition_penalty"]  # llama.cpp's names beside OpenAI's
    assert [r["generation_settings"][k] for k in ("temperature", "top_k", "top_p")] == [
        in_force[k] for k in ("temperature", "top_k", "top_p")] and r["generation_settings"]["temperature"] is not None
    assert status == 200 and props["total_slots"] == 32 and props["default_generation_settings"]["n_ctx"] == \
        api.engine.max_len and props["eos_token"] == "<|im_end|>" and "im_start" in props["chat_template"]
    for bad, param in (({"prompt": 5}, "prompt"), ({"prompt": [["a", 1.5]]}, "prompt"),
                       ({"n_predict": "x"}, "n_predict"), ({"mirostat": 1}, "mirostat"), ({"n_probs": 30}, "n_probs"),
                       ({"stop": "."}, "stop"), ({"post_sampling_probs": "yes"}, "post_sampling_probs"),
                       ({"logit_bias": [[1]]}, "logit_bias"), ({"temperature": -1}, "temperature"),
                       ({"repeat_penalty": 3}, "repeat_penalty"),
                       ({"mirostat": 2, "mirostat_tau": -1}, "mirostat_tau")):
        status, out, _ = http(api, "POST", "/completion", {"prompt": text, "n_predict": 2, **bad})
        assert status == 400 and out["error"]["param"] == param, (bad, out)


def test_llama_cpp_slots_show_what_each_slot_runs(api, client):
    """`/slots`: every slot, idle or holding a request (its id, settings and tokens so far, as llama.cpp's monitoring
    route shows them); with `?fail_on_no_slot=1` a 503 while every slot is busy, and 200 once they are free again;
    saving a slot's cache is a 501."""
    status, before, _ = http(api, "GET", "/slots")
    assert status == 200 and [s["id"] for s in before] == list(range(api.engine.runner.slots))
    assert all(s["n_ctx"] == api.engine.max_len for s in before)
    streams = [client.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=900, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True}) for i in range(32)]
    try:
        for s in streams:
            next(iter(s))
        status, busy, _ = http(api, "GET", "/slots")
        assert status == 200 and all(s["is_processing"] for s in busy)
        assert len({s["request_id"] for s in busy}) == len({s["id_task"] for s in busy}) == 32
        assert all(s["params"]["n_predict"] == 900 and s["params"]["temperature"] == 0 for s in busy)
        assert all(s["n_prompt_tokens"] == s["n_prompt_tokens_processed"] + s["n_prompt_tokens_cache"] > 0
                   for s in busy)
        ahead = [s["next_token"][0] for s in busy]  # (a list of one, as llama.cpp's)
        assert all(t["n_decoded"] >= 1 and t["has_next_token"] and t["n_remain"] == 900 - t["n_decoded"]
                   for t in ahead)
        status, out, _ = http(api, "GET", "/slots?fail_on_no_slot=1")
        assert status == 503 and out["error"]["message"] == "no slot available"
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 60
    while any(s["is_processing"] for s in http(api, "GET", "/slots")[1]):  # the aborts land at the next step
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, after, _ = http(api, "GET", "/slots?fail_on_no_slot=1")
    assert status == 200 and all(set(s) == {"id", "n_ctx", "speculative", "is_processing"} for s in after)
    status, out, _ = http(api, "POST", "/slots/0?action=save", {"filename": "a.bin"})
    assert status == 501 and out["error"]["type"] == "not_supported_error"


def test_sagemaker_invocations_answer_as_the_route_the_body_names(api, client):
    """SageMaker's `/invocations` (as vLLM serves it): a chat body answers as `/v1/chat/completions` (streamed too),
    a completions body as `/v1/completions`, `input` as `/v1/embeddings`, `query` and `documents` as `/v1/rerank`,
    `text_1` and `text_2` as `/v1/score`; a body naming none is a 400; `/ping` is `/health`'s answer."""
    chat = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0}
    status, r, _ = http(api, "POST", "/invocations", chat)
    want = client.chat.completions.create(**chat)
    assert status == 200 and r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["content"] == want.choices[0].message.content
    req = urllib.request.Request(api.url + "/invocations", data=json.dumps({**chat, "stream": True}).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        lines = [x[6:] for x in resp.read().decode().split("\n\n") if x.startswith("data: ")]
    assert lines[-1] == "[DONE]" and "".join(
        c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, lines[:-1]) if c["choices"]) == \
        want.choices[0].message.content
    done = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    status, r, _ = http(api, "POST", "/invocations", done)
    assert status == 200 and r["choices"][0]["text"] == client.completions.create(**done).choices[0].text
    status, r, _ = http(api, "POST", "/invocations", {"model": MODEL, "input": ["hi", "there"],
                                                      "encoding_format": "float"})
    vectors = client.embeddings.create(model=MODEL, input=["hi", "there"], encoding_format="float").data
    assert status == 200 and [d["embedding"] for d in r["data"]] == [d.embedding for d in vectors]
    docs = ["Paris is in France.", "Bananas are yellow."]
    status, r, _ = http(api, "POST", "/invocations", {"model": MODEL, "query": "Where is Paris?", "documents": docs})
    assert status == 200 and r == {**http(api, "POST", "/v1/rerank", {"model": MODEL, "query": "Where is Paris?",
                                                                      "documents": docs})[1], "id": r["id"]}
    for one, two in (("text_1", "text_2"), ("queries", "documents")):
        status, r, _ = http(api, "POST", "/invocations", {"model": MODEL, one: "a", two: ["a", "b"]})
        assert status == 200 and [d["index"] for d in r["data"]] == [0, 1] and r["data"][0]["score"] > 0.99
    for body in ({"model": MODEL}, {"query": "a"}, [1]):
        status, r, _ = http(api, "POST", "/invocations", body)
        assert status == 400 and r["error"]["type"] == "invalid_request_error", body
    assert "'messages' (chat)" in http(api, "POST", "/invocations", {})[1]["error"]["message"]
    for method in ("GET", "POST"):
        status, r, _ = http(api, method, "/ping")
        assert status == 200 and r["status"] == "ok" and r["slots"] == api.engine.runner.slots


def test_llama_cpp_apply_template_renders_without_generating(api):
    """`/apply-template`: the chat template's text for a chat body (with the generation prompt, template arguments
    and tools as chat renders them), and a 400 for a body chat would refuse."""
    tok = api.model.tokenizer
    status, r, _ = http(api, "POST", "/apply-template", {"messages": HELLO})
    assert status == 200 and r["prompt"] == tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    before = api.engine.stats()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    status, r, _ = http(api, "POST", "/apply-template", {"messages": HELLO, "tools": tools})
    assert status == 200 and "get_weather" in r["prompt"] and r["prompt"].endswith("assistant\n")
    assert api.engine.stats()["finished"] == before["finished"]  # nothing was generated
    status, r, _ = http(api, "POST", "/apply-template", {"messages": "hi"})
    assert status == 400 and r["error"]["param"] == "messages"


def _sse(api, path, body):
    """A stream's `data:` payloads in order: parsed JSON, or the text (`[DONE]`)."""
    req = urllib.request.Request(api.url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    out = [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]
    return [x if x == "[DONE]" else json.loads(x) for x in out]


def test_sglang_generate_whole_batched_and_streamed(api, client):
    """SGLang's `/generate` over a socket: the greedy reply is the completions API's, in SGLang's shape (text,
    output_ids, meta_info with its finish_reason objects, counts and `[logprob, id, text]` logprobs; the prompt's from
    `logprob_start_len` equal vLLM's prompt_logprobs); `input_ids`; a batch with `n` and ids from `rid`, prompt by
    prompt; EOS, stop strings and stop tokens (trimmed unless `no_stop_trim`), a regex and a JSON schema; a stream of
    the text so far ending in `[DONE]`, and one of a batch's samples under their indices; `/model_info`,
    `/server_info`, `/get_load`, `/flush_cache` (the next identical prompt finds nothing cached); bad fields are 400s
    naming SGLang's."""
    tok = api.model.tokenizer
    text = "The capital of France is"
    ref = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0, logprobs=2,
                                    extra_body={"return_token_ids": True, "prompt_logprobs": 1})
    want, want_ids = ref.choices[0].text, ref.choices[0].model_extra["token_ids"]
    prompt_ids = ref.model_extra["prompt_token_ids"]
    body = {"text": text, "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "return_logprob": True,
            "top_logprobs_num": 2, "return_text_in_logprobs": True}
    status, r, _ = http(api, "POST", "/generate", body)
    assert status == 200 and r["text"] == want and r["output_ids"] == want_ids, r
    meta = r["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8} and meta["completion_tokens"] == 8
    assert meta["prompt_tokens"] == len(prompt_ids) and meta["e2e_latency"] > 0 and meta["input_token_logprobs"] == []
    assert [t[1] for t in meta["output_token_logprobs"]] == want_ids
    np.testing.assert_allclose([t[0] for t in meta["output_token_logprobs"]], ref.choices[0].logprobs.token_logprobs,
                               atol=2e-3)  # the prompt's page cached by the first call: its last bits may differ
    assert [t[2] for t in meta["output_token_logprobs"]] == ref.choices[0].logprobs.tokens
    assert all(len(top) == 2 and top[0][0] >= t[0] - 1e-4 for top, t in zip(meta["output_top_logprobs"],
                                                                            meta["output_token_logprobs"]))
    status, r2, _ = http(api, "POST", "/generate", {**body, "text": None, "input_ids": prompt_ids})
    assert status == 200 and r2["output_ids"] == want_ids
    # the prompt's logprobs from position 2 on: the first null (as SGLang's), the others the model's (vLLM's values)
    status, r3, _ = http(api, "POST", "/generate", {**body, "logprob_start_len": 2, "top_logprobs_num": 1})
    given = r3["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in given] == prompt_ids[2:] and given[0][0] is None and len(r3["meta_info"][
        "input_top_logprobs"]) == len(given)
    vllm = ref.choices[0].model_extra["prompt_logprobs"]
    for j, t in enumerate(given[1:], start=3):
        assert t[0] == pytest.approx(vllm[j][str(prompt_ids[j])]["logprob"], abs=2e-3), j
    status, r4, _ = http(api, "POST", "/generate", {**body, "logprob_start_len": 0})
    assert [t[1] for t in r4["meta_info"]["input_token_logprobs"]] == prompt_ids
    streamed = _sse(api, "/generate", {**body, "logprob_start_len": 0, "stream": True})[:-1]
    for c in (streamed[0], streamed[-1]):  # a stream's first and last chunks (a long prompt's are large)
        assert c["meta_info"]["input_token_logprobs"] == r4["meta_info"]["input_token_logprobs"]
    assert all("input_token_logprobs" not in c["meta_info"] for c in streamed[1:-1])
    assert streamed[-1]["meta_info"]["output_token_logprobs"] == r4["meta_info"]["output_token_logprobs"]
    at_end = http(api, "POST", "/generate", {**body, "logprob_start_len": len(prompt_ids)})[1]
    assert at_end["meta_info"]["input_token_logprobs"] == []
    status, out, _ = http(api, "POST", "/generate", {**body, "logprob_start_len": len(prompt_ids) + 1})
    assert status == 400 and out["error"]["param"] == "logprob_start_len"
    # per-prompt logprob settings, a list rid, and fields a client sends unset
    status, two, _ = http(api, "POST", "/generate", {
        "text": [text, "Hello"], "rid": ["a", "b"], "return_logprob": [True, False], "top_logprobs_num": [1, 0],
        "logprob_start_len": [1, -1], "return_hidden_states": False, "image_data": None,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert status == 200 and [t["meta_info"]["id"] for t in two] == ["a", "b"], two
    assert len(two[0]["meta_info"]["output_top_logprobs"][0]) == 1 and len(two[0]["meta_info"][
        "input_token_logprobs"]) == len(prompt_ids) - 1 and "output_token_logprobs" not in two[1]["meta_info"]
    status, out, _ = http(api, "POST", "/generate", {"text": [text, "Hi"], "return_logprob": [True]})
    assert status == 400 and out["error"]["param"] == "return_logprob"
    # a batch of two prompts, two samples each, prompt by prompt, their ids from `rid`
    status, batch, _ = http(api, "POST", "/generate", {"text": [text, "Hello"], "rid": "job", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0.8, "n": 2, "sampling_seed": 3}})
    assert status == 200 and [b["meta_info"]["id"] for b in batch] == ["job_0_0", "job_0_1", "job_1_0", "job_1_1"]
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [len(prompt_ids)] * 2 + [len(tok.encode("Hello"))] * 2
    assert all(len(b["output_ids"]) == 4 for b in batch)
    hot = {"text": text, "sampling_params": {"max_new_tokens": 2, "temperature": 3.0}}
    assert http(api, "POST", "/generate", hot)[0] == 200  # SGLang's temperature has no upper bound; OpenAI's is 2
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=3.0)
    status, one, _ = http(api, "POST", "/generate", {"text": [text], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and isinstance(one, list) and len(one) == 1  # a list of one is a batch, as SGLang's
    templated = tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    chat = {"text": templated, "sampling_params": {"max_new_tokens": 64, "temperature": 0}}
    status, r, _ = http(api, "POST", "/generate", {**chat, "sampling_params": {"max_new_tokens": None,
                                                                                 "temperature": 0}})
    eos = r["meta_info"]["finish_reason"]  # null max_new_tokens: up to the context (the reply ends before)
    assert eos["type"] == "stop" and eos["matched"] == r["output_ids"][-1] and eos["matched"] in api.model.eos_ids
    assert "Paris" in r["text"] and "<|im_end|>" not in r["text"]
    stop = {**chat, "sampling_params": {**chat["sampling_params"], "stop": "."}}
    status, r, _ = http(api, "POST", "/generate", stop)
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": "."} and "." not in r["text"]
    stop["sampling_params"]["no_stop_trim"] = True
    assert http(api, "POST", "/generate", stop)[1]["text"].endswith(".")
    # a stop token's text is trimmed as SGLang does (vLLM's completions keep it), streamed too
    period = tok.encode(".", add_special_tokens=False)[-1]
    by_token = {**chat, "sampling_params": {**chat["sampling_params"], "stop_token_ids": [period]}}
    status, r, _ = http(api, "POST", "/generate", by_token)
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": period} and r["output_ids"][-1] == period
    assert "Paris" in r["text"] and not r["text"].endswith(".")
    assert _sse(api, "/generate", {**by_token, "stream": True})[-2]["text"] == r["text"]
    by_token["sampling_params"]["no_stop_trim"] = True
    assert http(api, "POST", "/generate", by_token)[1]["text"] == r["text"] + "."
    status, r, _ = http(api, "POST", "/generate", {"text": templated, "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "regex": "(Paris|London)"}})
    assert r["text"] in ("Paris", "London") and r["meta_info"]["finish_reason"] == {
        "type": "stop", "matched": api.model.eos_ids[0]}  # a grammar's end: its end of sequence, as SGLang's
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    status, r, _ = http(api, "POST", "/generate", {"text": templated, "sampling_params": {
        "max_new_tokens": 48, "temperature": 0, "json_schema": json.dumps(schema)}})
    jsonschema.validate(json.loads(r["text"]), schema)
    events = _sse(api, "/generate", {**body, "stream": True, "return_logprob": False})
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = events[:-1]
    assert all(a["text"] == b["text"][:len(a["text"])] and a["output_ids"] == b["output_ids"][:len(a["output_ids"])]
               for a, b in zip(chunks, chunks[1:]))  # each the whole reply so far
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["text"] == want and chunks[-1]["output_ids"] == want_ids
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert http(api, "GET", "/health_generate")[0] == 200
    # a batch with n streams each sample's chunks under its index (prompt by prompt), each ending as when whole
    several = {"text": [text, "Hello"], "sampling_params": {"max_new_tokens": 4, "temperature": 0, "n": 2}}
    whole = http(api, "POST", "/generate", several)[1]
    events = _sse(api, "/generate", {**several, "stream": True})
    assert events[-1] == "[DONE]" and {c["index"] for c in events[:-1]} == {0, 1, 2, 3}
    for pos, w in enumerate(whole):
        mine = [c for c in events[:-1] if c["index"] == pos]
        assert [c["meta_info"]["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [{"type": "length",
                                                                                               "length": 4}]
        assert mine[-1]["text"] == w["text"] and mine[-1]["output_ids"] == w["output_ids"], pos
    status, info, _ = http(api, "GET", "/model_info")
    assert status == 200 and info["is_generation"] is True and info == http(api, "GET", "/get_model_info")[1]
    status, info, _ = http(api, "GET", "/server_info")
    assert info["internal_states"][0]["avg_spec_accept_length"] is None
    assert info["context_length"] == api.engine.max_len and info["max_running_requests"] == api.engine.runner.slots
    status, (load,), _ = http(api, "GET", "/get_load")  # idle: nothing seated or waiting (Scheduler.loads)
    assert status == 200 and load.pop("ts_tic") > 0 and load == {
        "dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0, "num_pending_tokens": 0}
    long = {"text": "Lorem ipsum dolor sit amet, " * 8, "sampling_params": {"max_new_tokens": 1}}
    http(api, "POST", "/generate", long)
    assert http(api, "POST", "/generate", long)[1]["meta_info"]["cached_tokens"] >= 16
    status, said, _ = http(api, "POST", "/flush_cache")
    assert status == 200 and said.startswith("Cache flushed") and api.engine.stats()["kv_pages_cached"] == 0
    assert http(api, "POST", "/generate", long)[1]["meta_info"]["cached_tokens"] == 0
    assert http(api, "POST", "/reset_prefix_cache")[:2] == (200, "")  # vLLM's name for it (and its empty 200)
    stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # a request running: nothing is flushed, and vLLM's route says so in JSON
    status, out, _ = http(api, "POST", "/reset_prefix_cache")
    assert status == 400 and "running" in out["error"]["message"], out
    stream.close()
    assert http(api, "POST", "/generate", long)[1]["meta_info"]["cached_tokens"] == 0
    for bad, param in (({"text": text, "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
                       ({"text": text, "sampling_params": {"best": 1}}, "sampling_params.best"),
                       ({"sampling_params": {}}, "text"), ({"text": text, "input_ids": [1]}, "text"),
                       ({"input_ids": []}, "input_ids"), ({"input_ids": [10 ** 6]}, "input_ids"), ({"text": 5}, "text"),
                       ({"text": [text, "Hi"], "sampling_params": [{"n": 1}, {"n": 2}]}, "sampling_params"),
                       ({"text": [text, "Hi"], "rid": ["a"]}, "rid"),
                       ({"text": text, "top_logprobs_num": 50}, "top_logprobs_num"),
                       ({"text": text, "image_data": "x.png"}, "image_data"),
                       ({"text": text, "sampling_params": {"stop": [""]}}, "sampling_params.stop")):
        status, out, _ = http(api, "POST", "/generate", bad)
        assert status == 400 and out["error"]["param"] == param, (bad, out)


def test_sglang_abort_request_ends_a_generation_with_what_it_has(api):
    """SGLang's `/abort_request` over a socket: a long `/generate` aborted by its `rid` returns 200 with the tokens
    drawn so far and an abort as its finish reason, and so does a streamed one under `abort_all` (its last chunk with
    all of its text, the part held back for a stop string too); an unknown rid
    aborts nothing; the server serves the next request."""
    import threading
    import time

    def generate(body, out):
        out.append(http(api, "POST", "/generate", body) if not body.get("stream") else _sse(api, "/generate", body))

    def started(engine_running):
        """Wait until that many requests run and have drawn a few tokens each."""
        deadline, before = time.monotonic() + 60, api.engine.stats()["generated_tokens"]
        while time.monotonic() < deadline and (api.engine.stats()["running"] < engine_running or
                                               api.engine.stats()["generated_tokens"] < before + 4 * engine_running):
            time.sleep(0.02)

    long = {"text": "Count to a thousand:", "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}
    out: list = []
    t = threading.Thread(target=generate, args=({**long, "rid": "long-one"}, out))
    t.start()
    started(1)
    assert http(api, "POST", "/abort_request", {"rid": "no-such-request"})[0] == 200
    status, _, _ = http(api, "POST", "/abort_request", {"rid": "long-one"})
    t.join(60)
    assert status == 200 and not t.is_alive()
    status, r, _ = out[0]
    assert status == 200 and r["meta_info"]["finish_reason"] == {"type": "abort", "message": "Aborted",
                                                                  "status_code": None, "err_type": None}
    assert r["meta_info"]["id"] == "long-one"
    assert 0 < r["meta_info"]["completion_tokens"] == len(r["output_ids"]) < 900
    out = []
    held = {**long, "stream": True, "sampling_params": {**long["sampling_params"], "stop": ["#" * 12]}}
    threads = [threading.Thread(target=generate, args=(body, out)) for body in (long, held)]
    for t in threads:
        t.start()
    started(2)
    assert http(api, "POST", "/abort_request", {"abort_all": True})[0] == 200
    for t in threads:
        t.join(60)
    assert len(out) == 2
    for got in out:
        last = got[-2] if isinstance(got, list) else got[1]  # a stream's last chunk before [DONE]
        assert last["meta_info"]["finish_reason"]["type"] == "abort" and len(last["output_ids"]) < 900
        # all of its text, that held back while it might still become the stop string too
        assert last["text"] == api.model.tokenizer.decode(last["output_ids"])
    status, r, _ = http(api, "POST", "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 3}})
    assert status == 200 and r["meta_info"]["completion_tokens"] == 3


def test_an_engine_call_whose_caller_left_is_skipped(api):
    """`AsyncEngine.call` (how `/flush_cache` reaches the engine thread): a call whose caller was cancelled before
    the thread reached it is skipped (it once killed the thread: a client that left `/flush_cache`), the others run
    in order, one that raises hands its caller the error (even one that is not an `Exception`), and the engine
    serves on."""
    import asyncio
    import threading

    aengine = api.server.aengine
    gate, ran = threading.Event(), []

    async def calls():
        hold = asyncio.ensure_future(aengine.call(lambda e: gate.wait(10)))  # the engine thread waits in this one
        await asyncio.sleep(0.1)
        gone = asyncio.ensure_future(aengine.call(lambda e: ran.append("gone")))
        await asyncio.sleep(0.05)
        gone.cancel()
        after = asyncio.ensure_future(aengine.call(lambda e: ran.append("after") or e.has_work()))
        await asyncio.sleep(0.05)  # the cancellation reaches the call's future before the thread does
        gate.set()
        assert await asyncio.wait_for(hold, 10) is True and await asyncio.wait_for(after, 10) is False
        with pytest.raises(asyncio.CancelledError):
            await gone

    class Stop(BaseException):
        """Not an `Exception`: what once ended the engine thread from inside a call."""

    async def failing():
        with pytest.raises(Stop):  # its caller gets it; the thread serves on
            await asyncio.wait_for(aengine.call(lambda e: (_ for _ in ()).throw(Stop())), 10)

    asyncio.run(calls())
    asyncio.run(failing())
    assert ran == ["after"] and aengine.alive
    status, r, _ = http(api, "POST", "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and r["meta_info"]["completion_tokens"] == 2 and http(api, "GET", "/health")[0] == 200


def test_sglang_priority_is_turned_to_vllms_order():
    """SGLang's `priority` puts higher values first (its default order), ours lower first: /generate negates it."""
    from server.protocol import ApiError
    from server.sglang import generate_body

    assert generate_body({"text": "x", "priority": 5})[0]["priority"] == -5
    assert "priority" not in generate_body({"text": "x"})[0]
    assert generate_body({"text": "x", "priority": -(2**31)})[0]["priority"] == 2**31 - 1  # SGLang's lowest
    for wrong in ("high", 2**31):
        with pytest.raises(ApiError, match="priority"):
            generate_body({"text": "x", "priority": wrong})
