"""OpenAI's Responses and Anthropic's Messages through their official clients over a real loopback socket, on the
packaged SmolLM2 (the same live server as the chat tests)."""

import json
import urllib.request

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
    # streamed, ended by a stop sequence (a Fireworks extra): the official event sequence, and the same text
    stop = {"stop": ["Paris"]}
    cut = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0, extra_body=stop)
    with client.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0,
                                 extra_body=stop) as s:
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
    status, items, _ = http(api, "GET", f"/v1/responses/{nxt.id}/input_items")
    kinds = [it["type"] for it in items["data"]]
    assert status == 200 and kinds == ["message", "function_call", "function_call_output"]
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
    hosted = client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}], max_output_tokens=2)
    assert hosted.output_text  # a hosted tool is the provider's: ignored here, as Codex and the Agents SDK send them
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "function", "parameters": {}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"type": "message", "role": "user", "content": 3}])
    assert e.value.body["param"] == "input"
    for bad in ({"metadata": {"k": 5}}, {"metadata": {f"k{i}": "v" for i in range(17)}}, {"user": 5},
                {"truncation": "bogus"}, {"include": "x"}, {"background": True}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="hi", max_output_tokens=2, **bad)
        assert e.value.body["param"] == next(iter(bad))
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=-1)
    assert e.value.body["param"] == "max_output_tokens" and "'max_output_tokens'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI requires the schema; it used to mean any object
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "json_schema", "name": "x"}})
    assert e.value.body["param"] == "text.format"


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


def test_llama_cpp_completion_whole_and_streamed(api, client):
    """llama.cpp's `/completion` over a socket: the greedy reply is the completions API's for the same settings, in
    llama.cpp's shape (content, tokens, stop_type, counts, timings, settings, completion_probabilities); the stream's
    data lines carry each piece's text and tokens and end with the whole reply's figures; prompts as text, token ids
    or both; logit_bias pairs; stop strings past the OpenAI API's four; `/props`; bad fields are 400s."""
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
    status, r, _ = http(api, "POST", "/completion", sillytavern)
    assert status == 200 and r["content"] == want and r["generation_settings"]["repeat_penalty"] == 1.0
    warm = {**body, "temperature": 0.5, "seed": 5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "n_predict": 12}
    http(api, "POST", "/completion", warm)  # the prompt's page cached first: both below read it alike
    status, r, _ = http(api, "POST", "/completion", {**warm, "dynatemp_range": 0.5, "dynatemp_exponent": 0})
    assert status == 200 and r["generation_settings"]["dynatemp_range"] == 0.5
    assert r["content"] == http(api, "POST", "/completion", {**warm, "temperature": 1.0})[1]["content"]
    status, props, _ = http(api, "GET", "/props")
    status, r, _ = http(api, "POST", "/completion", {"prompt": text, "n_predict": 1})
    in_force = props["default_generation_settings"]["params"]  # the model's defaults where a request sets nothing
    assert [r["generation_settings"][k] for k in ("temperature", "top_k", "top_p")] == [
        in_force[k] for k in ("temperature", "top_k", "top_p")] and r["generation_settings"]["temperature"] is not None
    assert status == 200 and props["total_slots"] == 32 and props["default_generation_settings"]["n_ctx"] == \
        api.engine.max_len and props["eos_token"] == "<|im_end|>" and "im_start" in props["chat_template"]
    for bad, param in (({"prompt": 5}, "prompt"), ({"prompt": [["a", 1.5]]}, "prompt"),
                       ({"n_predict": "x"}, "n_predict"), ({"mirostat": 1}, "mirostat"), ({"n_probs": 30}, "n_probs"),
                       ({"stop": "."}, "stop"),
                       ({"logit_bias": [[1]]}, "logit_bias"), ({"temperature": 5}, "temperature"),
                       ({"repeat_penalty": 3}, "repeat_penalty"),
                       ({"mirostat": 2, "mirostat_tau": -1}, "mirostat_tau")):
        status, out, _ = http(api, "POST", "/completion", {"prompt": text, "n_predict": 2, **bad})
        assert status == 400 and out["error"]["param"] == param, (bad, out)
