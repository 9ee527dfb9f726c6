"""Ollama's API through the official `ollama` client over a real loopback socket, on the packaged SmolLM2 (the same
live server as the chat tests): each reply is the OpenAI API's for the same settings, in Ollama's shapes."""

import json

import jsonschema
import numpy as np
import ollama
import pytest

from test_server import HELLO, MODEL, http
from test_tools import WEATHER

GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture()
def olla(api):
    """The official ollama client pointed at the live server."""
    return ollama.Client(host=api.url)


def test_chat_whole_and_streamed_is_the_openai_chat(client, olla):
    """`/api/chat`: the greedy message is chat completions' for the same settings, whole or streamed as
    newline-delimited JSON; the counts and durations are there; `name:latest` is the served model."""
    ref = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    r = olla.chat(model=MODEL + ":latest", messages=HELLO, options=GREEDY)
    assert r.message.role == "assistant" and r.message.content == ref.choices[0].message.content
    assert r.done and r.done_reason == ref.choices[0].finish_reason and r.eval_count == ref.usage.completion_tokens
    assert r.prompt_eval_count == ref.usage.prompt_tokens and r.total_duration >= r.eval_duration > 0
    parts = list(olla.chat(model=MODEL, messages=HELLO, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].eval_count == r.eval_count
    assert len(parts) > 2


def test_chat_history_format_and_options(client, olla):
    """A history with a tool call (arguments as an object) and its result renders as the OpenAI history does;
    `format` as a schema constrains the answer (judged by jsonschema); `stop` and `seed` options apply."""
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [*HELLO, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "content": "21 degrees", "tool_name": "get_weather"}]
    city = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string", "description": "A city"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": city}}]  # a schema the client's Tool type keeps whole
    openai_history = [*HELLO, {"role": "assistant", "content": "", "tool_calls": [  # its id: message 1's call 0
        {"id": "call_1_0", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": json.dumps(call["function"]["arguments"])}}]},
        {"role": "tool", "tool_call_id": "call_1_0", "content": "21 degrees"}]
    ref = client.chat.completions.create(model=MODEL, messages=openai_history, tools=tools, max_tokens=4,
                                         temperature=0)
    r = olla.chat(model=MODEL, messages=history, tools=tools, options={**GREEDY, "num_predict": 4})
    assert r.prompt_eval_count == ref.usage.prompt_tokens and r.message.content == ref.choices[0].message.content
    r = olla.chat(model=MODEL, messages=HELLO, format=WEATHER, options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(r.message.content), WEATHER)
    r = olla.chat(model=MODEL, messages=HELLO, options={"temperature": 0, "stop": ["capital"], "num_ctx": 4096})
    ref = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, stop=["capital"])
    assert r.message.content == ref.choices[0].message.content and r.done_reason == "stop"
    seeded = [olla.chat(model=MODEL, messages=HELLO, options={"seed": 7, "temperature": 1, "num_predict": 8})
              .message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_logprobs_whole_and_streamed_are_the_openai_ones(client, olla):
    """Ollama's `logprobs` and `top_logprobs` (ollama 0.12.11): each generated token's text, logprob, bytes and
    alternatives, the chat route's entries for the same greedy reply, whole and spread over a stream's objects."""
    ref = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=3).choices[0].logprobs.content
    want = [(e.token, round(e.logprob, 4), [(t.token, round(t.logprob, 4)) for t in e.top_logprobs]) for e in ref]
    got = lambda entries: [(e.token, round(e.logprob, 4), [(t.token, round(t.logprob, 4))  # noqa: E731
                                                           for t in e.top_logprobs]) for e in entries]
    r = olla.chat(model=MODEL, messages=HELLO, options=GREEDY, logprobs=True, top_logprobs=3)
    assert got(r.logprobs) == want
    parts = list(olla.chat(model=MODEL, messages=HELLO, options=GREEDY, logprobs=True, top_logprobs=3, stream=True))
    assert got([e for p in parts for e in p.logprobs or []]) == want
    raw = olla.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY, logprobs=True)
    assert len(raw.logprobs) == raw.eval_count and all(e.top_logprobs == [] for e in raw.logprobs)
    assert olla.chat(model=MODEL, messages=HELLO, options=GREEDY).logprobs is None  # not asked: none
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(model=MODEL, messages=HELLO, options=GREEDY, logprobs=True, top_logprobs=21)
    assert e.value.status_code == 400 and "top_logprobs" in e.value.error


def test_generate_templated_raw_and_with_context(api, client, olla):
    """`/api/generate`: the prompt with `system` goes through the chat template (the chat reply), `raw` is a plain
    completion of the text, and the returned `context` (prompt and reply ids) continues in the next call as token
    ids before the new prompt."""
    tok = api.model.tokenizer
    system = "You are terse."
    ref = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, *HELLO],
                                         max_tokens=8, temperature=0)
    r = olla.generate(model=MODEL, prompt=HELLO[0]["content"], system=system, options=GREEDY)
    assert r.response == ref.choices[0].message.content and r.prompt_eval_count == ref.usage.prompt_tokens
    text = "The capital of France is"
    ref = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0,
                                    extra_body={"return_token_ids": True})
    r = olla.generate(model=MODEL, prompt=text, raw=True, options=GREEDY)
    assert r.response == ref.choices[0].text
    assert r.context == ref.model_extra["prompt_token_ids"] + ref.choices[0].model_extra["token_ids"]
    more = " It is"
    r2 = olla.generate(model=MODEL, prompt=more, raw=True, context=r.context, options=GREEDY)
    ids = r.context + tok.encode(more, add_special_tokens=False)
    ref = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r2.response == ref.choices[0].text and r2.prompt_eval_count == len(ids)
    parts = list(olla.generate(model=MODEL, prompt=text, raw=True, options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == r.response and parts[-1].context == r.context
    assert olla.generate(model=MODEL, prompt="").done_reason == "load"
    assert olla.chat(model=MODEL, messages=[]).done_reason == "load"


def test_embed_and_the_model_routes(api, client, olla):
    """`/api/embed` is `/v1/embeddings` normalized; `/api/embeddings` one vector as the model pools it; tags, show,
    ps and version describe the served model."""
    texts = ["Paris is in France.", "hello"]
    want = np.array([d.embedding for d in client.embeddings.create(model=MODEL, input=texts,
                                                                  encoding_format="float").data])
    r = olla.embed(model=MODEL, input=texts)
    got = np.array(r.embeddings)
    assert np.allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    assert r.prompt_eval_count == sum(len(api.model.tokenizer.encode(t)) for t in texts)
    one = olla.embeddings(model=MODEL, prompt=texts[1]).embedding
    assert np.allclose(one, want[1], atol=1e-5)
    models = olla.list().models
    assert [m.model for m in models] == [MODEL] and models[0].size > 0 and models[0].details.format == "gguf"
    info = olla.show(MODEL)
    assert "completion" in info.capabilities and "insert" not in info.capabilities
    assert info.modelinfo[f"{info.details.family}.context_length"] == api.engine.max_len
    assert [m.model for m in olla.ps().models] == [MODEL]
    status, v, _ = http(api, "GET", "/api/version")
    assert status == 200 and v["version"]
    assert olla.pull(MODEL).status == "success"  # here already: nothing to download
    assert [p.status for p in olla.pull(f"{MODEL}:latest", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as e:
        olla.pull("llama3")
    assert e.value.status_code == 404 and "does not download" in e.value.error


def test_errors_take_ollamas_shape(api, olla):
    """Another model is a 404, bad options, images and a Go template are 400s, each `{"error": message}` naming
    Ollama's field."""
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(model="llama3", messages=HELLO)
    assert e.value.status_code == 404 and "llama3" in e.value.error
    for opts in ({"num_predict": "many"}, {"num_predict": -10**30}, {"top_k": False, "num_predict": 1}):
        with pytest.raises(ollama.ResponseError) as e:
            olla.chat(model=MODEL, messages=HELLO, options=opts)
        assert e.value.status_code == 400 and f"options.{next(iter(opts))}" in e.value.error, e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(model=MODEL, messages=HELLO, options={"temperature": "hot"})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        olla.generate(model=MODEL, prompt="hi", images=["aGVsbG8="])
    assert e.value.status_code == 400 and "images" in e.value.error
    status, r, _ = http(api, "POST", "/api/generate", {"model": MODEL, "prompt": "hi", "template": "{{ .Prompt }}"})
    assert status == 400 and set(r) == {"error"} and "template" in r["error"]
    status, r, _ = http(api, "POST", "/api/chat", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]})
    assert status == 400 and "tool" in r["error"]
    status, r, _ = http(api, "POST", "/api/chat", {"model": MODEL, "messages": HELLO, "format": "xml"})
    assert status == 400 and "format" in r["error"]
    status, r, _ = http(api, "POST", "/api/generate", {"model": MODEL, "prompt": "hi", "raw": True, "system": "x"})
    assert status == 400 and "system" in r["error"]


def test_nulls_defaults_and_long_options(api, client):
    """What apps send: null fields are ones not given, `stream` absent streams, `num_predict` absent or 0 runs to
    the end of sequence, more than 4 stop strings and a temperature past 2 are Ollama's to take, whole floats are
    integers; nothing to embed is an empty list; the API key guards `/api`."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": HELLO[0]["content"], "images": None,
                                          "tool_calls": None}],
            "options": {"temperature": 0, "mirostat": None, "num_predict": 0, "seed": -1, "num_ctx": 4096.0},
            "format": None, "think": None, "keep_alive": None, "tools": None, "stream": False}
    ref = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0)
    status, r, _ = http(api, "POST", "/api/chat", body)
    assert status == 200 and r["message"]["content"] == ref.choices[0].message.content and r["done_reason"] == "stop"
    lines = _ndjson(api, "/api/chat", {**body, "stream": None, "options": {"temperature": 0, "num_predict": 4.0}})
    assert len(lines) >= 2 and lines[-1]["done"] and lines[-1]["eval_count"] == 4
    stops = {"model": MODEL, "messages": HELLO, "stream": False,
             "options": {"temperature": 3, "num_predict": 4, "stop": ["a", "b", "c", "d", "e"]}}
    assert http(api, "POST", "/api/chat", stops)[0] == 200
    stops["options"]["stop"] = ["a" * 4097]  # past a stop string's bound: a 400 under Ollama's name for it
    status, r, _ = http(api, "POST", "/api/chat", stops)
    assert status == 400 and "options.stop" in json.dumps(r)
    status, r, _ = http(api, "POST", "/api/generate", {"model": MODEL, "prompt": None, "keep_alive": -1})
    assert status == 200 and r["done_reason"] == "load"  # (keep_alive 0 unloads: test_weights, on its own model)
    assert http(api, "POST", "/api/embed", {"model": MODEL, "input": []})[1]["embeddings"] == []
    assert http(api, "POST", "/api/embeddings", {"model": MODEL, "prompt": ""})[1]["embedding"] == []
    status, r, _ = http(api, "POST", "/api/embed", {"model": MODEL, "input": "word " * 5000, "truncate": None})
    assert status == 200 and r["prompt_eval_count"] == api.engine.runner.embed_sizes[-1]
    status, r, _ = http(api, "POST", "/api/embed", {"model": MODEL, "input": "word " * 5000, "truncate": False})
    assert status == 400
    api.server.api_keys = ("k",)
    try:
        assert http(api, "GET", "/api/tags")[0] == 401 and http(api, "POST", "/api/chat", body)[0] == 401
        assert http(api, "POST", "/api/chat", body, headers={"Authorization": "Bearer k"})[0] == 200
    finally:
        api.server.api_keys = ()


def _ndjson(api, path, body):
    """The objects of a newline-delimited JSON stream."""
    import urllib.request
    req = urllib.request.Request(api.url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.read().decode().splitlines() if line]
