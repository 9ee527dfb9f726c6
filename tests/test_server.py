"""The HTTP server through the official `openai` client over a real loopback socket, on the packaged SmolLM2."""

import asyncio
import glob
import gzip
import importlib.metadata
import json
import logging
import os
import socket
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ENGINE, SERVED_DEFAULTS
from engine import SamplingParams
from engine.params import DRY_BREAKERS
from helpers import dry_reference, our_logits
from server.child import spawn

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def http(api, method, path, body=None, headers=None, raw: bytes | None = None):
    """A plain HTTP call: `(status, parsed JSON or text, headers)`."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(api.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text, hdrs = r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        status, text, hdrs = e.code, e.read().decode(), e.headers
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


def test_every_answer_names_its_call_and_load_counts_the_calls(api, client, caplog):
    """`X-Request-Id` on every answer (as OpenAI's API, which the `openai` client reads as `_request_id`, and vLLM's
    `--enable-request-id-headers`): the client's own (also in the call's log line), else the call's id (the body's
    `id`), else a fresh one; streams and errors too. `/load` (vLLM's, for balancers) counts the calls being
    answered."""
    r = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2)
    out = r.parse()
    assert r.headers["x-request-id"] == out.id and out._request_id == out.id and out.id.startswith("chatcmpl-")
    caplog.set_level("INFO", logger="sparkler.server")
    r = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2,
                                                    extra_headers={"X-Request-Id": "trace-7"})
    assert r.headers["x-request-id"] == "trace-7" and r.parse().id != "trace-7"
    deadline = time.monotonic() + 30
    while not [x for x in caplog.records if getattr(x, "fields", {}).get("trace") == "trace-7"]:  # logged after
        assert time.monotonic() < deadline  # the reply went
        time.sleep(0.02)
    line = next(x for x in caplog.records if getattr(x, "fields", {}).get("trace") == "trace-7")
    assert line.fields["id"] == r.parse().id and f"id={r.parse().id} trace=trace-7 " in line.getMessage()
    with client.chat.completions.with_streaming_response.create(model=MODEL, messages=HELLO, max_tokens=2,
                                                                stream=True) as s:
        assert s.headers["x-request-id"].startswith("chatcmpl-") and "[DONE]" in s.read().decode()
    status, _, headers = http(api, "POST", "/v1/chat/completions", {"model": MODEL, "messages": "x"})
    assert status == 400 and len(headers["X-Request-Id"]) == 32
    assert len(http(api, "GET", "/health")[2]["X-Request-Id"]) == 32

    def load() -> int:
        status, out, _ = http(api, "GET", "/load")
        assert status == 200
        return out["server_load"]

    before = load()
    stream = client.completions.create(model=MODEL, prompt="Count:", max_tokens=900, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert load() >= 1
    stream.close()
    deadline = time.monotonic() + 60
    while load() > before or api.engine.stats()["free_slots"] < api.engine.runner.slots:  # the call ends once the
        assert time.monotonic() < deadline  # server sees the client gone, its slot at the next step
        time.sleep(0.05)


def test_models_health_metrics_and_tokenize(api, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    cfg = api.model.cfg  # `--quantization auto` (the fixture's): what it chose, how products run, and why
    assert card.id == MODEL and card.quantization == {"method": cfg.quantization, "products": cfg.matmul,
                                                      "why": api.model.quantization_why}
    assert card.quantization["why"].startswith("auto: ")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, body, _ = http(api, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["slots"] == 32
    assert http(api, "GET", "/version")[1] == {"version": importlib.metadata.version("sparkler")}
    status, text, _ = http(api, "GET", "/metrics")
    assert status == 200 and "sparkler_free_slots 32.0" in text and "sparkler_generated_tokens_total" in text
    for name in ("kv_pages_total", "kv_pages_free", "kv_pages_cached", "prefix_cache_hit_rate", "preemptions"):
        assert name in body and f"sparkler_{name}" in text
    tok = api.model.tokenizer
    status, body, _ = http(api, "POST", "/tokenize", {"prompt": "Hello world"})
    assert body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    status, body, _ = http(api, "POST", "/tokenize", {"messages": HELLO})
    assert body["tokens"] == tok.encode(tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True),
                                        add_special_tokens=False)
    status, back, _ = http(api, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert back["prompt"] == tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    status, err, _ = http(api, "POST", "/detokenize", {"tokens": [-1]})
    assert status == 400 and err["error"]["param"] == "tokens"
    assert http(api, "POST", "/detokenize", {"model": "nope", "tokens": [1]})[0] == 404
    # vLLM's chat form: the tools and template arguments a chat request would render, and each token's text
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, told, _ = http(api, "POST", "/tokenize", {"messages": HELLO, "tools": tools, "return_token_strs": True})
    assert status == 200 and told["count"] > body["count"]  # the tools' system prompt
    assert told["token_strs"] == [tok.decode([t]) for t in told["tokens"]]
    status, bare, _ = http(api, "POST", "/tokenize", {"messages": HELLO, "add_generation_prompt": False})
    assert tok.decode(bare["tokens"]) == tok.apply_chat_template(HELLO, tokenize=False)
    assert http(api, "POST", "/tokenize", {"messages": HELLO, "tools": "x"})[1]["error"]["param"] == "tools"
    ids = tok.encode("Hello world", add_special_tokens=False)  # llama.cpp's shapes: `content`, pieces, no specials
    status, body, _ = http(api, "POST", "/tokenize", {"content": "Hello world", "with_pieces": True})
    assert body["tokens"] == [{"id": t, "piece": tok.decode([t])} for t in ids]
    status, back, _ = http(api, "POST", "/detokenize", {"tokens": ids})
    assert back["content"] == back["prompt"] == "Hello world"
    status, err, _ = http(api, "POST", "/tokenize", {"content": 5})
    assert status == 400 and err["error"]["param"] == "content"


def test_routes_without_v1_as_llama_cpp_serves_them(api, client):
    """A client given the server's URL without /v1 reaches chat, completions and models there (llama.cpp's server
    answers both); the API key guards them as it guards /v1, and every route but the probes' and the page's."""
    bare = openai.OpenAI(base_url=api.url, api_key="x")
    want = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
    got = bare.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert bare.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert [m.id for m in bare.models.list().data] == [m.id for m in client.models.list().data]
    api.server.api_keys = ("k",)
    try:
        assert http(api, "POST", "/chat/completions", {"model": MODEL, "messages": HELLO})[0] == 401
        assert http(api, "GET", "/models")[0] == 401
        for path in ("/update_weights_from_disk", "/generate", "/completion", "/tokenize", "/flush_cache"):
            assert http(api, "POST", path, {})[0] == 401, path  # every other server's route too (SGLang's rule)
        for path in ("/health", "/metrics", "/version", "/"):  # what probes, scrapers and the page read
            assert http(api, "GET", path)[0] == 200, path
    finally:
        api.server.api_keys = ()


def test_greedy_chat_equals_the_engine_and_streaming(api, client, llm):
    want = llm.chat(HELLO, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    got = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=40)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # the same through the accounts/<x>/models/<id> name, streamed
    chunks = list(client.chat.completions.create(model=f"accounts/fireworks/models/{MODEL}", messages=HELLO,
                                                 temperature=0, max_tokens=40, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_defaults_come_from_generation_config_and_the_header(api, client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=4)
    opts = json.loads(raw.headers["fireworks-sampling-options"])
    for k, v in SERVED_DEFAULTS.items():
        assert opts[k] == pytest.approx(v)
    assert opts["max_tokens"] == 2048 and opts["repetition_penalty"] == 1.0
    with client.chat.completions.with_streaming_response.create(model=MODEL, messages=HELLO, max_tokens=2,
                                                                 stream=True) as resp:
        assert json.loads(resp.headers["fireworks-sampling-options"]) == opts
    # Leaving settings out equals sending the advertised defaults (same seed), and differs from OpenAI's defaults.
    texts = [client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=48, seed=11,
                                            extra_body={"ignore_eos": True, **extra}).choices[0].message.content
             for extra in ({}, dict(SERVED_DEFAULTS), {"temperature": 1.0, "top_k": 0, "top_p": 1.0})]
    assert texts[0] == texts[1] != texts[2]


def test_completions_prompt_forms_n_and_usage(api, client):
    tok = api.model.tokenizer
    ids = tok.encode("The sky is")
    r = client.completions.create(model=MODEL, prompt=["The sky is", "Once upon a time"], max_tokens=6,
                                  temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt agree
    assert r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens == len(ids) + len(tok.encode("Once upon a time"))
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text
    nested = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert [c.text for c in nested.choices] == [r.choices[0].text] * 2


def test_completion_echo_logprobs_match_the_model(api, client):
    text = "The quick brown fox jumps over the lazy dog"
    ids = api.model.tokenizer.encode(text)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    assert c.text == text and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert "".join(lp.tokens) == text and lp.token_logprobs[0] is None
    logits = our_logits(api.model.module, api.model.params, [ids])[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want = [ref[j - 1, ids[j]] for j in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=2e-3)
    assert all(len(t) == 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    # echo with generation: prompt entries first, then the completion's, offsets running through both
    g = client.completions.create(model=MODEL, prompt=text, max_tokens=5, echo=True, logprobs=1, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0]
    assert g.text.startswith(text) and len(g.logprobs.tokens) == len(ids) + 5
    assert "".join(g.logprobs.tokens) == g.text
    assert g.logprobs.token_logprobs[len(ids):] == [max(d.values()) for d in g.logprobs.top_logprobs[len(ids):]]


def test_vllms_return_tokens_as_token_ids_and_twenty_alternatives(api, client):
    """vLLM's `return_tokens_as_token_ids` names every logprob token, echoed, generated and alternative, as
    `token_id:N` (chat's `bytes` are that text's), with the same logprobs; completions take up to 20 alternatives
    (vLLM's bound; OpenAI's is 5)."""
    text = "The quick brown fox"
    ids = api.model.tokenizer.encode(text)
    kw = dict(model=MODEL, prompt=text, max_tokens=4, echo=True, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(logprobs=20, **kw).choices[0]
    named = client.completions.create(logprobs=20, **{**kw, "extra_body": {
        "ignore_eos": True, "return_tokens_as_token_ids": True, "return_token_ids": True}}).choices[0]
    assert [int(t.removeprefix("token_id:")) for t in named.logprobs.tokens] == ids + named.model_extra["token_ids"]
    assert plain.logprobs.model_extra["token_ids"] == ids + named.model_extra["token_ids"]  # Fireworks' ids beside
    assert named.logprobs.token_logprobs == plain.logprobs.token_logprobs
    assert all(len(t) == 20 for t in plain.logprobs.top_logprobs[1:])
    for a, b in zip(plain.logprobs.top_logprobs[1:], named.logprobs.top_logprobs[1:]):
        assert sorted(a.values()) == sorted(b.values()) and all(k.startswith("token_id:") for k in b)
    assert named.logprobs.text_offset == list(np.cumsum([0] + [len(t) for t in named.logprobs.tokens[:-1]]))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(logprobs=21, **kw)
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    for item in chat.choices[0].logprobs.content:
        assert item.token == f"token_id:{item.model_extra['token_id']}" and bytes(item.bytes).decode() == item.token
        assert all(t.token.startswith("token_id:") for t in item.top_logprobs)
    ids = [int(i.token.removeprefix("token_id:")) for i in chat.choices[0].logprobs.content]
    assert api.model.tokenizer.decode(ids, skip_special_tokens=True) == chat.choices[0].message.content


def test_vllms_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stream=True, n=2,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    final = chunks[-1].usage
    assert not chunks[-1].choices and final.completion_tokens == 24
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert all(c.usage.prompt_tokens == final.prompt_tokens for c in chunks) and counts == sorted(counts)
    assert counts[0] == 0 and counts[-1] == 24 and all(c.usage.total_tokens == final.prompt_tokens +
                                                       c.usage.completion_tokens for c in chunks)
    plain = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True,
                                                stream_options={"include_usage": True,
                                                                "continuous_usage_stats": False}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens <= 4


def test_n_beyond_the_decode_slots(api, client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=1.0, seed=21,
              extra_body={"ignore_eos": True})
    many = client.completions.create(n=40, **kw)  # 32 slots: split over two engine requests
    assert [c.index for c in many.choices] == list(range(40))
    assert many.usage.completion_tokens == 120
    assert many.usage.prompt_tokens == len(api.model.tokenizer.encode("Once upon a time"))
    few = client.completions.create(n=2, **kw)  # each choice keeps its own seed stream
    assert [c.text for c in few.choices] == [c.text for c in many.choices[:2]]
    assert len({c.text for c in many.choices}) > 10
    chunks = list(client.completions.create(n=40, stream=True, **kw))
    streamed = {}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(40)] == [c.text for c in many.choices]


def test_echo_logprobs_of_a_prompt_longer_than_a_prefill_chunk(api, client):
    ids = [int(t) for t in np.random.default_rng(3).integers(100, 5000, 700)]  # chunks of 512 + 188
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    got = r.choices[0].logprobs.token_logprobs
    logits = our_logits(api.model.module, api.model.params, [ids])[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    assert got[0] is None and len(got) == 700
    np.testing.assert_allclose(got[1:], [ref[j - 1, ids[j]] for j in range(1, 700)], atol=5e-3)


def test_streamed_text_with_stop_strings_equals_the_whole_response(api, client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "List five fruits, one per line."}],
              max_tokens=60, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.chat.completions.create(stop=[stop, "zzzz"], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(stop)]
    chunks = list(client.chat.completions.create(stop=[stop, "zzzz"], stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs_shape(api, client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 5 and item.logprob <= 0
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert bytes(item.bytes).decode(errors="replace") == item.token
        assert api.model.tokenizer.decode([item.model_extra["token_id"]]) == item.token
    text = r.choices[0].message.content
    assert "".join(i.token for i in content).startswith(text)


def test_vllms_template_controls_add_generation_prompt_documents_and_a_requests_own_template(api, client):
    """vLLM's chat fields for the template: `add_generation_prompt` false ends the prompt after the last message (the
    default's ids without the assistant header), `documents` reach the template as transformers passes them, and a
    request's own `chat_template` is refused, not silently ignored."""
    from server.protocol import template_kwargs

    kw = dict(model=MODEL, messages=HELLO, max_tokens=1, temperature=0, extra_body={"return_token_ids": True})
    opened = client.chat.completions.create(**kw).model_extra["prompt_token_ids"]
    closed = client.chat.completions.create(**{**kw, "extra_body": {"return_token_ids": True,
                                                                   "add_generation_prompt": False}})
    header = api.model.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert closed.model_extra["prompt_token_ids"] + header == opened
    docs = [{"title": "Paris", "text": "Paris is the capital of France."}]
    assert template_kwargs({"documents": docs})[0]["documents"] == docs
    for extra, param in (({"chat_template": "{{ messages }}"}, "chat_template"), ({"documents": ["x"]}, "documents"),
                         ({"add_generation_prompt": "no"}, "add_generation_prompt"),
                         ({"continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, extra_body=extra)
        assert e.value.body["param"] == param, extra


def test_echo_raw_output_and_token_ids_in_chat(api, client):
    tok = api.model.tokenizer
    prompt = tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=64, temperature=0, logprobs=True,
                                       top_logprobs=2,
                                       extra_body={"echo": True, "raw_output": True, "return_token_ids": True})
    c = r.choices[0]
    assert c.message.content.startswith(prompt)
    raw = c.model_extra["raw_output"]
    assert raw["prompt_token_ids"] == tok.encode(prompt, add_special_tokens=False) == r.model_extra["prompt_token_ids"]
    assert "prompt_token_ids" not in c.model_extra  # Fireworks puts it at the top level
    frags = raw["prompt_fragments"]
    assert 1 in frags and 2 in frags  # <|im_start|> and <|im_end|> stay ids
    assert "".join(f if isinstance(f, str) else tok.convert_ids_to_tokens(f) for f in frags) == prompt
    assert raw["completion_token_ids"] == c.model_extra["token_ids"]
    assert c.finish_reason == "stop" and raw["completion"].endswith("<|im_end|>")
    assert raw["completion"][:-len("<|im_end|>")] == c.message.content[len(prompt):]
    # Fireworks' NewLogProbs: the chat entries (as its SDK's model reads them), each with its offset in the completion
    content = raw["completion_logprobs"]["content"]
    assert [e["token_id"] for e in content] == raw["completion_token_ids"]
    assert [e["logprob"] for e in content] == [e.logprob for e in c.logprobs.content[-len(content):]]  # (echo: the
    # choice's begin with the prompt's)
    assert [e["text_offset"] for e in content] == [sum(len(e["token"]) for e in content[:i])
                                                   for i in range(len(content))]
    for e in content:
        assert set(e) == {"token", "token_id", "logprob", "bytes", "top_logprobs", "text_offset"}
        assert len(e["top_logprobs"]) == 2 and set(e["top_logprobs"][0]) == {"token", "token_id", "logprob", "bytes"}
    last = client.completions.create(model=MODEL, prompt="one two three four", max_tokens=1, temperature=0,
                                     extra_body={"echo_last": 2})
    assert last.choices[0].text.startswith(" three four")


def test_stop_length_ignore_eos_and_seeds(api, client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text.strip()[2:4] if len(text.strip()) > 4 else text[:2]
    s = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and stop not in s.choices[0].text
    assert text.startswith(s.choices[0].text)
    # more than OpenAI's 4 (vLLM takes any number; lm-eval's code tasks send 8 or more): the earliest match ends it
    many = ["@@", "##", "$$", "%%", "^^", "&&", "**", stop, "~~", "[["]
    m = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=many)
    assert (m.choices[0].text, m.choices[0].finish_reason) == (s.choices[0].text, "stop")
    short = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    long = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=40,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 40 and long.choices[0].finish_reason == "length"
    kw = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=1.0, extra_body={"top_k": 0, "top_p": 1.0})
    a, b = (client.chat.completions.create(seed=5, **kw).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(seed=6, **kw).choices[0].message.content
    assert a == b != c
    for k in (api.model.cfg.vocab_size, 10**12):  # past the vocabulary (and int32): no limit, as top_k 0
        kw["extra_body"]["top_k"] = k
        assert client.chat.completions.create(seed=5, **kw).choices[0].message.content == a, k


def test_vllms_min_tokens_stop_token_ids_and_include_stop_str_in_output(api, client):
    """vLLM's sampling extras through the `openai` client: min_tokens holds the end of sequence back (the greedy reply
    goes on past where it ended, its start unchanged), under streaming and n > 1 too; stop_token_ids end a reply at a
    token, which stays in it as vLLM keeps a non-special one; include_stop_str_in_output keeps the stop string;
    allowed_token_ids are the only tokens drawn; skip_special_tokens false keeps special tokens' text."""
    france = [{"role": "user", "content": "What is the capital of France?"}]
    ask = lambda **extra: client.chat.completions.create(model=MODEL, messages=france, temperature=0, max_tokens=64,
                                                         extra_body={"return_token_ids": True, **extra})
    free = ask()
    text, n = free.choices[0].message.content, free.usage.completion_tokens
    assert free.choices[0].finish_reason == "stop" and n < 40
    assert free.choices[0].model_extra["stop_reason"] is None  # vLLM's: an end of sequence names nothing
    held = ask(min_tokens=n + 8)
    assert held.usage.completion_tokens >= n + 8 and held.choices[0].message.content.startswith(text)
    chunks = list(client.chat.completions.create(model=MODEL, messages=france, temperature=0.7, seed=2, n=2,
                                                 max_tokens=64, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"min_tokens": n + 8}))
    assert chunks[-1].usage.completion_tokens >= 2 * (n + 8)
    ids = held.choices[0].model_extra["token_ids"]
    at = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # a token's first appearance past the third
    assert ask(stop_token_ids=list(range(1000, 1040))).choices[0].finish_reason  # many: fine without min_tokens
    cut = ask(stop_token_ids=[ids[at]])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["token_ids"] == ids[:at + 1]
    assert cut.choices[0].model_extra["stop_reason"] == ids[at]  # the stop token's id
    assert cut.choices[0].message.content == api.model.tokenizer.decode(ids[:at + 1], skip_special_tokens=True)
    word = text.split()[2]
    kept = ask(stop=[word], include_stop_str_in_output=True).choices[0]
    assert kept.finish_reason == "stop" and kept.message.content == text[:text.index(word) + len(word)]
    assert ask(stop=[word]).choices[0].message.content == text[:text.index(word)]
    assert kept.model_extra["stop_reason"] == word  # the stop string, whole and in the stream's last chunk
    last = list(client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, stream=True,
                                          max_tokens=16, stop=[" "]))[-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == " "
    assert ask(max_tokens=2).choices[0].model_extra["stop_reason"] is None  # the length
    allowed = ask(allowed_token_ids=ids[:2], max_tokens=6)  # vLLM's allowed_token_ids: nothing else is drawn
    assert set(allowed.choices[0].model_extra["token_ids"]) <= set(ids[:2])
    assert allowed.usage.completion_tokens == 6  # no end of sequence among them
    start = api.model.tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token, not an end of sequence
    for skip in (True, False):  # skip_special_tokens: whether the reply's text leaves it out
        r = ask(allowed_token_ids=[start], max_tokens=3, skip_special_tokens=skip)
        assert r.choices[0].model_extra["token_ids"] == [start] * 3
        assert r.choices[0].message.content == ("" if skip else "<|im_start|>" * 3)
    for extra, param in (({"min_tokens": 65}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
                         ({"allowed_token_ids": []}, "allowed_token_ids"),
                         ({"stop_token_ids": [api.model.cfg.vocab_size]}, "stop_token_ids"),
                         ({"stop_token_ids": "2"}, "stop_token_ids"), ({"stop_token_ids": list(range(40)),
                                                                       "min_tokens": 2}, "stop_token_ids")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(**extra)
        assert e.value.body["param"] == param, (extra, e.value.body)


def test_llama_cpps_dry_xtc_top_n_sigma_and_dynamic_temperature(api, client):
    """llama.cpp's samplers through the `openai` client. DRY: the greedy reply to a counting loop leaves the loop the
    free reply stays in, each of its tokens the model's best after llama.cpp's penalties written out
    (`helpers.dry_reference`) over the prompt and the reply so far; XTC, always on, never draws a top choice it
    drops (seen in the raw logprobs); top-nσ with a tiny n draws the greedy reply at a high temperature; the dynamic
    temperature at exponent 0 draws what its high end does; bad values are 400s naming the field."""
    tok, vocab = api.model.tokenizer, api.model.cfg.vocab_size
    loop = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,"
    ask = lambda **extra: client.completions.create(model=MODEL, prompt=loop, max_tokens=16, temperature=0,  # noqa: E731
                                                    extra_body={"return_token_ids": True, "ignore_eos": True, **extra})
    free = ask()
    dry = ask(dry_multiplier=2.0, dry_allowed_length=2)
    prompt, out = dry.model_extra["prompt_token_ids"], dry.choices[0].model_extra["token_ids"]
    assert free.choices[0].text.startswith(" 1, 2, 3") and dry.choices[0].text != free.choices[0].text
    breakers = {t for t, text in enumerate(tok.token_texts) if any(b in text for b in DRY_BREAKERS)}
    logits = our_logits(api.model.module, api.model.params, [prompt + out])[0].astype(np.float64)
    for j, t in enumerate(out):
        score = logits[len(prompt) - 1 + j] - dry_reference(prompt + out[:j], 2.0, 1.75, 2, 1024, breakers, vocab)
        assert score[t] >= score.max() - 0.02, (j, tok.decode([t]), tok.decode([int(score.argmax())]))
    france = dict(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.0, top_p=1.0, seed=4, logprobs=True,
                  top_logprobs=20)
    dropped_some = 0
    for seed in (4, 5):
        r = client.chat.completions.create(**{**france, "seed": seed}, extra_body={
            "top_k": 0, "min_p": 0.0, "xtc_probability": 1.0, "xtc_threshold": 0.05})
        for step in r.choices[0].logprobs.content:
            above = sorted((a for a in step.top_logprobs if np.exp(a.logprob) >= 0.05), key=lambda a: -a.logprob)
            if len(above) >= 2:
                dropped_some += 1
                assert step.token not in [a.token for a in above[:-1]], (step.token, above)
    assert dropped_some
    zero = client.completions.create(model=MODEL, prompt=loop, max_tokens=6, temperature=1.0, top_p=1.0, seed=1,
                                     logprobs=5, extra_body={"top_k": 5, "min_p": 0.0, "repetition_penalty": 1.0,
                                                             "xtc_probability": 1.0, "xtc_threshold": 0.0}
                                     ).choices[0].logprobs
    for token, top in zip(zero.tokens, zero.top_logprobs):  # a threshold of 0: the least likely of the top 5 alone
        assert token == min(top, key=top.get), (token, top)
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    sigma = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.5, seed=3,
                                           extra_body={"top_n_sigma": 1e-4})
    assert sigma.choices[0].message.content == greedy.choices[0].message.content
    # the dynamic temperature at exponent 0 is its high end whatever the entropy: a reply at 0.5 + 0.5 is one at 1.0
    story = lambda t, **extra: client.completions.create(  # noqa: E731
        model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=t, top_p=1.0, seed=11,
        extra_body={"top_k": 0, "min_p": 0.0, "ignore_eos": True, **extra}).choices[0].text
    first = story(1.0)  # (the prompt's first run is prefilled whole; later ones from its cached page, which can
    #                   differ in the last bits and so, rarely, in a draw)
    hot = story(0.5, dynatemp_range=0.5, dynatemp_exponent=0.0)
    assert hot == story(1.0) and hot != story(0.5) and first
    for extra, param in (({"dry_multiplier": -1}, "dry_multiplier"), ({"dry_base": 0.5}, "dry_base"),
                         ({"dry_allowed_length": 1.5}, "dry_allowed_length"),
                         ({"dry_penalty_last_n": -2}, "dry_penalty_last_n"),
                         ({"dry_sequence_breakers": []}, "dry_sequence_breakers"),
                         ({"dry_sequence_breakers": "\n"}, "dry_sequence_breakers"),
                         ({"dry_sequence_breakers": [""]}, "dry_sequence_breakers"),
                         ({"xtc_probability": 1.5}, "xtc_probability"), ({"xtc_threshold": -0.1}, "xtc_threshold"),
                         ({"top_n_sigma": "1"}, "top_n_sigma"), ({"dynatemp_range": -0.1}, "dynatemp_range"),
                         ({"dynatemp_exponent": -1}, "dynatemp_exponent")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(**extra)
        assert e.value.body["param"] == param, (extra, e.value.body)


def test_vllms_prompt_logprobs_match_the_model(api, client):
    """vLLM's prompt_logprobs: None for the first prompt token, then each token's logprob under the model (its own
    logits, `helpers.our_logits`), its rank in the vocabulary and its text, with the k most likely alternatives; on
    each completions choice, at the top of a chat response; a stream or k past 20 is a 400."""
    tok = api.model.tokenizer
    text = "The quick brown fox jumps over the lazy dog"
    ids = tok.encode(text)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert r.choices[0].text and plp[0] is None and len(plp) == len(ids)
    logits = our_logits(api.model.module, api.model.params, [ids])[0].astype(np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    for j in range(1, len(ids)):
        entry = plp[j]
        mine = entry[str(ids[j])]
        assert mine["decoded_token"] == tok.decode([ids[j]])
        np.testing.assert_allclose(mine["logprob"], ref[j - 1, ids[j]], atol=2e-3)
        assert abs(mine["rank"] - (1 + (ref[j - 1] > ref[j - 1, ids[j]]).sum())) <= 1  # ties within the tolerance
        alts = {v["rank"]: int(t) for t, v in entry.items() if v["rank"] <= 3}
        assert sorted(alts) == [1, 2, 3] and len(entry) in (3, 4)
        for t in alts.values():
            np.testing.assert_allclose(entry[str(t)]["logprob"], ref[j - 1, t], atol=2e-3)
        assert ref[j - 1, alts[1]] >= ref[j - 1].max() - 2e-3
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                          extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    top = chat.model_extra["prompt_logprobs"]
    assert top[0] is None and len(top) == len(chat.model_extra["prompt_token_ids"])
    assert all(len(e) == 1 for e in top[1:])
    for extra in ({"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=text, max_tokens=2, extra_body=extra)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=text, max_tokens=2, stream=True,
                                  extra_body={"prompt_logprobs": 1})


def test_vllms_truncate_prompt_tokens(api, client):
    """vLLM's truncate_prompt_tokens keeps each prompt's last tokens (echo returns their text); -1 keeps what fits
    the context, where the whole prompt is a 400; 0 and a string are 400s."""
    tok = api.model.tokenizer
    text = "The quick brown fox jumps over the lazy dog and runs far away into the forest"
    ids = tok.encode(text)
    ask = lambda prompt, **extra: client.completions.create(  # noqa: E731
        model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body={"return_token_ids": True, **extra})
    r = ask(text, truncate_prompt_tokens=5)
    assert r.usage.prompt_tokens == 5 and r.model_extra["prompt_token_ids"] == ids[-5:]
    assert r.choices[0].text == ask(ids[-5:]).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=[text, "one two"], max_tokens=0, echo=True,
                                       extra_body={"truncate_prompt_tokens": 4})
    assert [c.text for c in echoed.choices] == [tok.decode(ids[-4:]), "one two"]
    long = list(range(100, 100 + api.engine.max_len + 50))
    with pytest.raises(openai.BadRequestError) as e:
        ask(long)
    assert e.value.body["code"] == "context_length_exceeded"  # OpenAI's code and words, which clients compact on
    assert f"maximum context length is {api.engine.max_len} tokens" in e.value.message
    fit = ask(long, truncate_prompt_tokens=-1)
    assert fit.usage.prompt_tokens == api.engine.max_len - 1 and fit.usage.completion_tokens == 1
    for bad_value in (0, "5", -2):
        with pytest.raises(openai.BadRequestError) as e:
            ask(text, truncate_prompt_tokens=bad_value)
        assert e.value.body["param"] == "truncate_prompt_tokens"


def test_tokens_of_a_character_that_never_finishes_come_out_as_replacement_characters(api, client):
    """Tokens that are lone UTF-8 continuation bytes (forced by a logit bias) are held while a character may still
    finish, and at the end come out as the tokenizer decodes them, U+FFFD each, whole and streamed (they were
    dropped: an empty text beside six tokens)."""
    tok = api.model.tokenizer
    stray = [i for i in range(256, 0, -1) if tok.decode([i]) == "\ufffd"][:2]
    body = dict(model=MODEL, prompt="hi", max_tokens=6, temperature=0, logit_bias={str(i): 100 for i in stray},
                extra_body={"return_token_ids": True})
    r = client.completions.create(**body)
    ids = r.choices[0].model_extra["token_ids"]
    assert set(ids) <= set(stray) and r.choices[0].text == tok.decode(ids) == "\ufffd" * 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    body["extra_body"]["n_indent"] = 2  # llama.cpp's indent limit set, not reached: the length end is as without it
    assert client.completions.create(**body).choices[0].text == "\ufffd" * 6


def test_vllms_top_k_of_minus_one_is_the_whole_vocabulary(client):
    """vLLM's `top_k: -1` (as its clients send for "no top-k") is 0's setting, over the served default's 40, and the
    seeded draws follow it (the prompt is cached before the ones compared: a cached prompt's logits may differ in the
    last bits)."""
    from server.protocol import sampling

    assert sampling({"top_k": -1}).top_k == sampling({"top_k": 0}).top_k == 0
    draw = lambda k: client.completions.create(  # noqa: E731
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=1.0, seed=11,
        extra_body={"top_k": k}).choices[0].text
    draw(0)
    assert draw(-1) == draw(0) != draw(1)


def test_vllms_bad_words(api, client):
    """vLLM's bad_words through the `openai` client: the greedy reply never holds a word's tokens as vLLM tokenizes
    it (the text, and after a space), and leaves where the free reply said them; bad values are 400s."""
    tok = api.model.tokenizer
    ask = lambda **extra: client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=HELLO, temperature=0, max_tokens=24, extra_body={"return_token_ids": True, **extra})
    free = ask()
    assert "capital of France" in free.choices[0].message.content and "Paris" in free.choices[0].message.content
    for words in (["Paris"], ["capital of France"], ["  Paris", "capital of France"]):
        r = ask(bad_words=words)
        ids = r.choices[0].model_extra["token_ids"]
        assert r.choices[0].message.content != free.choices[0].message.content
        for w in words:
            for seq in (tok.encode(w.lstrip(), add_special_tokens=False),
                        tok.encode(" " + w.lstrip(), add_special_tokens=False)):
                assert not any(ids[i:i + len(seq)] == seq for i in range(len(ids))), (w, seq)
    comma = tok.encode(",", add_special_tokens=False)
    with pytest.raises(openai.BadRequestError) as e:  # nothing left to draw
        ask(bad_words=[","], allowed_token_ids=comma)
    assert e.value.body["param"] == "bad_words"
    many = [f"{a} {b}" for a in ("red", "green", "blue", "black", "white", "brown") for b in ("cat", "dog", "fish")]
    for words, param in ((["Paris", ""], "bad_words"), ("Paris", "bad_words"), ([" "], "bad_words"),
                         (many, "bad_words")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(bad_words=words)
        assert e.value.body["param"] == param, (words, e.value.body)


def test_logit_bias_mirostat_and_every_setting_together(api, client):
    tid = api.model.tokenizer.encode(" banana")[0]
    r = client.completions.create(model=MODEL, prompt="I like", max_tokens=4, temperature=0.8, seed=1,
                                  logit_bias={str(tid): 100})
    assert r.choices[0].text == api.model.tokenizer.decode([tid]) * 4
    every = dict(temperature=0.9, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.5, seed=3,
                 extra_body=dict(top_k=30, min_p=0.02, typical_p=0.95, repetition_penalty=1.1))
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, **every)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    m = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.0, seed=2,
                                       extra_body={"mirostat_target": 3.0, "mirostat_lr": 0.2})
    assert m.usage.completion_tokens >= 1


def test_streaming_n_echo_logprobs_and_usage(api, client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, n=3,
                                                 seed=9, stream=True, stream_options={"include_usage": True},
                                                 logprobs=True, top_logprobs=2))
    texts, finish, lps = {}, {}, {}
    for ch in chunks[:-1]:
        assert ch.usage is None
        for c in ch.choices:
            assert c.logprobs is None or len(c.logprobs.content) <= ENGINE["decode_steps"]  # a dispatch's
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            lps[c.index] = lps.get(c.index, 0) + len(c.logprobs.content if c.logprobs else [])
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert sorted(texts) == [0, 1, 2] and all(finish[i] for i in range(3))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(lps.values())
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, n=3, seed=9)
    assert [c.message.content for c in whole.choices] == [texts[i] for i in range(3)]
    stream = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0, echo=True,
                                       logprobs=1, stream=True, extra_body={"ignore_eos": True})
    parts = list(stream)
    text = "".join(p.choices[0].text for p in parts)
    toks = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert text.startswith("Hello there") and "".join(toks) == text
    offsets = [o for p in parts if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
    assert offsets == list(np.cumsum([0] + [len(t) for t in toks[:-1]]))


def test_context_length_behaviour(api, client):
    long = "word " * 990
    n = len(api.model.tokenizer.encode(long))
    r = client.completions.create(model=MODEL, prompt=long, max_tokens=100, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1024 - n
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long, max_tokens=100,
                                  extra_body={"context_length_exceeded_behavior": "error"})
    assert e.value.body["param"] == "max_tokens" and e.value.body["code"] == "context_length_exceeded"


BAD = [  # (path, body (dict) or raw bytes, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "x"}]}, 400, "messages"),  # unhashable
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": HELLO}, 404, "model"),
    ("/v1/chat/completions", {"model": 7, "messages": HELLO}, 400, "model"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": 2.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": HELLO, "top_k": -2}, 400, "top_k"),  # (-1 is vLLM's whole vocabulary)
    ("/v1/chat/completions", {"messages": HELLO, "top_k": 2.5}, 400, "top_k"),
    ("/v1/chat/completions", {"messages": HELLO, "min_p": 1.1}, 400, "min_p"),
    ("/v1/chat/completions", {"messages": HELLO, "typical_p": 0}, 400, "typical_p"),
    ("/v1/chat/completions", {"messages": HELLO, "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": HELLO, "presence_penalty": -2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": HELLO, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": HELLO, "repetition_penalty": 2.5}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 129}, 400, "n"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"5": 150}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": [1, 2]}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {" 5 ": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"5": 1, "05": -1}}, 400, "logit_bias"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "mirostat_target": 1e400}', 400,
     "mirostat_target"),
    ("/v1/completions", {"prompt": "x", "mirostat_lr": 10 ** 400}, 400, "mirostat_lr"),
    ("/v1/completions", {"prompt": "x", "temperature": -10 ** 400}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "logprobs": 3}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": [f"s{i}" for i in range(65)]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a" * 4097]}, 400, "stop"),
    ("/completion", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": HELLO, "mirostat_target": -1}, 400, "mirostat_target"),
    ("/v1/chat/completions", {"messages": HELLO, "mirostat_lr": 0}, 400, "mirostat_lr"),
    ("/v1/chat/completions", {"messages": HELLO, "seed": "x"}, 400, "seed"),
    ("/v1/chat/completions", {"messages": HELLO, "seed": 2**64}, 400, "seed"),  # vLLM's: 64 bits
    ("/v1/chat/completions", {"messages": HELLO, "user": {}}, 400, "user"),
    ("/v1/chat/completions", {"messages": HELLO, "parallel_tool_calls": "x"}, 400, "parallel_tool_calls"),
    ("/v1/chat/completions", {"messages": HELLO, "ignore_eos": 1}, 400, "ignore_eos"),
    ("/v1/chat/completions", {"messages": HELLO, "context_length_exceeded_behavior": "drop"}, 400,
     "context_length_exceeded_behavior"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], "x", 3.5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo_last": -2}, 400, "echo_last"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": "yes"}, 400, "stream_options"),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2000, "context_length_exceeded_behavior": "error"}, 400,
     "max_tokens"),
    ("/v1/completions", {"prompt": "x", "prompt_cache_max_len": -1}, 400, "prompt_cache_max_len"),
    ("/v1/completions", {"prompt": "x", "prompt_cache_max_len": "all"}, 400, "prompt_cache_max_len"),
    ("/v1/chat/completions", {"messages": HELLO, "prompt_cache_isolation_key": 5}, 400, "prompt_cache_isolation_key"),
    ("/v1/chat/completions", {"messages": HELLO, "cache_salt": ""}, 400, "cache_salt"),
    ("/v1/chat/completions", {"messages": HELLO, "cache_salt": "a", "prompt_cache_isolation_key": "b"}, 400,
     "cache_salt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', 400, "messages"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "prediction": {"content": "\\ud800"}}', 400, "prediction"),
    ("/v1/responses", b'{"input": "\\ud83d"}', 400, "input"),
    ("/tokenize", b'{"prompt": "\\ud83d"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, None),
    ("/v1/completions", b'{"prompt": "x", "metadata": ' + b'{"a": ' * 80 + b"1" + b"}" * 81, 400, "metadata"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(api, client, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, err, _ = http(api, "POST", path, None if raw else body, {"Content-Type": "application/json"}, raw=raw)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param
    ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_oversized_body_and_wrong_method(api, caplog):
    status, err, _ = http(api, "POST", "/v1/completions", raw=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert status == 413 and err["error"]["code"] == "request_too_large"
    status, err, _ = http(api, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in err
    status, err, _ = http(api, "GET", "/static/" + "x" * 300)  # a name too long for the file system: not a 500
    assert status == 404 and err["error"]["code"] == "not_found"
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    status, out, _ = http(api, "POST", "/v1/completions", raw=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert status == 200 and out["usage"]["completion_tokens"] == 1  # a compressed body is read
    status, err, _ = http(api, "POST", "/v1/completions", raw=body, headers={"Content-Encoding": "gzip"})
    assert status == 400 and "content-encoding" in err["error"]["message"].lower()  # one that is not: 400, not 500
    time.sleep(0.5)  # aiohttp would read the rest of that body after the reply, raise its error again and log it
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.ERROR]
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # HTTP/1.1: kept alive unless closed
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while chunk := sock.recv(1 << 16):  # until the server closes it: its parser lost its place in that stream
            got += chunk
    assert got.startswith(b"HTTP/1.1 400") and b"could not be read" in got


def test_32_concurrent_mixed_requests(api):
    aclient = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(i):
        max_tokens = 4 + i % 7
        kw = dict(model=MODEL, max_tokens=max_tokens, seed=i, temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
                  extra_body={"ignore_eos": True, "top_k": [0, 5, 40][i % 3], "min_p": 0.05 * (i % 2),
                              "repetition_penalty": 1.0 + 0.1 * (i % 3)})
        n = 2 if i % 5 == 0 else 1
        if i % 2:
            r = await aclient.chat.completions.create(messages=[{"role": "user", "content": f"Count to {i}"}], n=n,
                                                      stream=bool(i % 3), **kw)
        else:
            r = await aclient.completions.create(prompt=f"Item {i}:", n=n, stream=bool(i % 3), **kw)
        if not i % 3:
            return max_tokens, n, [c.finish_reason for c in r.choices], r.usage.completion_tokens
        finish = {}
        async for ch in r:
            for c in ch.choices:
                finish[c.index] = c.finish_reason or finish.get(c.index)
        return max_tokens, n, [finish[k] for k in sorted(finish)], None

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    for max_tokens, n, finish, used in asyncio.run(all_of_them()):
        assert finish == ["length"] * n
        assert used in (None, max_tokens * n)
    assert api.engine.stats()["free_slots"] == 32


def metric(api, name: str, sample: str, **labels) -> float:
    """The sum of a metric's samples named `sample` whose labels include `labels`, parsed from GET /metrics."""
    status, text, _ = http(api, "GET", "/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in fams[name].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_client_that_disconnects_frees_its_slot(api, client):
    before = api.engine.stats()["aborted"]
    route = "/v1/chat/completions"
    count = lambda status: metric(api, "sparkler_requests", "sparkler_requests_total", route=route,  # noqa: E731
                                  status=status)
    gone, failed = count("499"), count("500")
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=900, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.time() + 30
    while time.time() < deadline and not (api.engine.stats()["free_slots"] == 32 and
                                          api.engine.stats()["aborted"] > before and count("499") > gone):
        time.sleep(0.1)
    status, health, _ = http(api, "GET", "/health")
    assert health["free_slots"] == 32 and health["aborted"] == before + 1
    assert (count("499"), count("500")) == (gone + 1, failed)  # nginx's "client closed request", not a server error
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens >= 1


def test_python_m_server_with_an_api_key_and_stored_responses_and_batches_across_a_restart(tmp_path):
    """A server started as `python -m server`: a wrong key is a 401 (both APIs' shapes), each of its keys opens it; a
    stored response, an uploaded file and the batches a shutdown stopped (OpenAI's and Anthropic's, a few requests
    done) are there after a restart over the same `--responses-db` and `--files-dir`, and the batches go on where
    they stopped: every request answered exactly once, as the route answers it."""
    import anthropic

    (tmp_path / "keys").write_text("third\n\n")  # more keys, one a line (llama.cpp's --api-key-file)
    flags = ("--api-key", "sekret,second", "--api-key-file", str(tmp_path / "keys"), "--max-num-seqs", "2",
             "--max-model-len", "512", "--kv-cache-gb", "0.1",
             "--decode-batch-sizes", "2", "--responses-db", str(tmp_path / "responses.sqlite"),
             "--files-dir", str(tmp_path / "files"), "--warmup", "none")
    body = {"model": MODEL, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {**body, "prompt": f"Count {i}:"}}) for i in range(6)]
    asks = [{"custom_id": f"m{i}", "params": {**body, "messages": [{"role": "user", "content": f"Say {i}"}]}}
            for i in range(4)]
    child = spawn(*flags, timeout=240)
    proc, url = child.proc, child.url
    try:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
                model=MODEL, max_tokens=2, messages=HELLO)
        assert e.value.body["error"]["type"] == "authentication_error"
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        r = good.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
        with urllib.request.urlopen(url + "/health", timeout=10) as h:
            assert json.loads(h.read())["slots"] == 2
        with urllib.request.urlopen(url + "/ping", timeout=10) as h:  # SageMaker's health check sends no key
            assert h.status == 200
        assert http(SimpleNamespace(url=url), "POST", "/invocations", {"prompt": "a"})[0] == 401
        claude = anthropic.Anthropic(base_url=url, api_key="sekret", max_retries=0)  # sent as x-api-key
        assert claude.messages.create(model=MODEL, max_tokens=2, messages=HELLO).usage.output_tokens >= 1
        for other in ("second", "third"):  # every key given opens it
            assert openai.OpenAI(base_url=url + "/v1", api_key=other, max_retries=0).models.list().data
        first = good.responses.create(model=MODEL, input=HELLO[0]["content"], max_output_tokens=12, temperature=0)
        source = good.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        batch = good.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h")
        mb = claude.messages.batches.create(requests=asks)
        deadline = time.time() + 120
        while good.batches.retrieve(batch.id).request_counts.completed < 1:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rec = json.loads((tmp_path / "files" / f"{batch.id}.json").read_text())  # stopped partway, and kept so
    kept = (tmp_path / "files" / rec["parts"]["output"]).read_text().splitlines()
    assert rec["status"] == "in_progress" and 1 <= len(kept) < 6
    assert json.loads((tmp_path / "files" / f"{mb.id}.json").read_text())["status"] == "in_progress"
    (tmp_path / "files" / "batch_junk.json").write_text("[1]")  # a record that is not one is skipped
    kept = tmp_path / "files" / f"{source.id}.json"  # one of a later version: fields it does not know left out
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "expires_at": None}))
    child = spawn(*flags, timeout=240)  # a new process over the same files: the conversation and batches go on
    proc, url = child.proc, child.url
    try:
        again = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert again.responses.retrieve(first.id).output_text == first.output_text
        nxt = again.responses.create(model=MODEL, input="And of Germany?", previous_response_id=first.id,
                                     max_output_tokens=12, temperature=0)
        assert nxt.previous_response_id == first.id and nxt.usage.input_tokens > first.usage.total_tokens
        items = again.responses.input_items.list(nxt.id).data
        assert [getattr(i, "role", None) for i in items] == ["user", "assistant", "user"]
        assert again.files.retrieve(source.id).bytes == source.bytes
        deadline = time.time() + 180
        while (done := again.batches.retrieve(batch.id)).status != "completed":
            assert done.status == "in_progress" and time.time() < deadline, done
            time.sleep(0.1)
        assert done.request_counts.completed == 6 and done.error_file_id is None
        out = [json.loads(x) for x in again.files.content(done.output_file_id).text.splitlines()]
        assert sorted(r["custom_id"] for r in out) == [f"r{i}" for i in range(6)]  # each once
        want = again.completions.create(model=MODEL, prompt="Count 5:", max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True}).choices
        assert {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in out}["r5"] == want[0].text
        claude = anthropic.Anthropic(base_url=url, api_key="sekret", max_retries=0)
        while (ended := claude.messages.batches.retrieve(mb.id)).processing_status != "ended":
            assert time.time() < deadline
            time.sleep(0.1)
        assert ended.request_counts.succeeded == 4
        assert sorted(r.custom_id for r in claude.messages.batches.results(mb.id)) == [f"m{i}" for i in range(4)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_bfloat16_server_answers():
    """`--dtype bfloat16` serves the packaged model (XLA attention, full-precision weights): a first token and one
    decode step (XLA's bfloat16 products on this CPU take ~1 s a token, see docs/PERFORMANCE.md)."""
    child = spawn("--dtype", "bfloat16", "--max-num-seqs", "2", "--max-model-len", "256", "--kv-cache-gb", "0.05",
                  "--decode-batch-sizes", "2", "--decode-steps", "1", "--warmup", "none",
                  timeout=600)  # compiles what the request needs
    try:
        assert any("(bfloat16, full-precision weights, xla attention, scanned layers)" in line for line in child.lines)
        client = openai.OpenAI(base_url=child.url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=2, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert r.usage.completion_tokens == 2 and r.choices[0].message.content.strip()
    finally:
        child.proc.terminate()
        child.proc.wait(timeout=60)


def test_an_engine_failure_answers_500_and_the_server_keeps_serving(api, client, monkeypatch):
    runner = api.engine.runner
    real = runner.decode

    def fail_once(*args, **kwargs):  # a fault before the device step: cache and state stay intact
        monkeypatch.setattr(runner, "decode", real)
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(runner, "decode", fail_once)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8)
    assert e.value.body["type"] == "server_error"
    monkeypatch.setattr(runner, "decode", fail_once)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True):
            pass
    assert api.engine.stats()["free_slots"] == 32
    real_prefill = runner.prefill_many

    def fail_prefill_once(*args, **kwargs):  # a fault while the request holds slots but is not running yet
        monkeypatch.setattr(runner, "prefill_many", real_prefill)
        raise RuntimeError("injected prefill failure")

    monkeypatch.setattr(runner, "prefill_many", fail_prefill_once)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=3)
    assert api.engine.stats()["free_slots"] == 32
    ok = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_prompt_cache_through_the_api(api, client):
    system = {"role": "system", "content": "You answer questions about geography, briefly and precisely. " * 8}
    chat = [system, {"role": "user", "content": "What is the capital of Italy?"}]
    kw = dict(model=MODEL, messages=chat, max_tokens=12, temperature=0)
    cold = client.chat.completions.with_raw_response.create(**kw, extra_body={"prompt_cache_isolation_key": "t1"})
    first = cold.parse()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.headers["fireworks-cached-prompt-tokens"] == "0"
    assert cold.headers["fireworks-prompt-tokens"] == str(first.usage.prompt_tokens)
    hot = client.chat.completions.with_raw_response.create(**kw, extra_body={"prompt_cache_isolation_key": "t1"})
    second = hot.parse()
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == second.usage.prompt_tokens - 1  # the same prompt again: all but its last token
    assert hot.headers["fireworks-cached-prompt-tokens"] == str(cached)
    assert second.choices[0].message.content == first.choices[0].message.content
    other = client.chat.completions.create(**kw, extra_body={"prompt_cache_isolation_key": "t2"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    salted = client.chat.completions.create(**kw, extra_body={"cache_salt": "t1"})  # vLLM's name for the same key
    assert salted.usage.prompt_tokens_details.cached_tokens == cached
    headed = client.chat.completions.create(**kw, extra_headers={"x-prompt-cache-isolation-key": "t1"})  # Fireworks'
    assert headed.usage.prompt_tokens_details.cached_tokens == cached
    apart = client.chat.completions.create(**kw, extra_headers={"x-prompt-cache-isolation-key": "t4"})
    assert apart.usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.BadRequestError, match="different keys"):
        client.chat.completions.create(**kw, extra_headers={"x-prompt-cache-isolation-key": "t4"},
                                       extra_body={"prompt_cache_isolation_key": "t1"})
    fresh = client.responses.create(model=MODEL, input=chat, max_output_tokens=2, extra_body={"cache_salt": "t3"})
    assert fresh.usage.input_tokens_details.cached_tokens == 0
    off = client.chat.completions.create(**kw, extra_body={"prompt_cache_isolation_key": "t1",
                                                           "prompt_cache_max_len": 0})
    assert off.usage.prompt_tokens_details.cached_tokens == 0
    assert off.choices[0].message.content == first.choices[0].message.content
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                            extra_body={"prompt_cache_isolation_key": "t1"})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    done = client.completions.create(model=MODEL, prompt=[1, 2, 3] * 20, max_tokens=2)
    again = client.completions.create(model=MODEL, prompt=[1, 2, 3] * 20, max_tokens=2)
    assert done.usage.prompt_tokens_details.cached_tokens < api.engine.page_size  # token 1 starts every chat too
    assert again.usage.prompt_tokens_details.cached_tokens == 59
    status, health, _ = http(api, "GET", "/health")
    assert health["prefix_cache_hit_tokens"] >= cached + 59 and 0 < health["prefix_cache_hit_rate"] < 1


def test_perf_metrics_and_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=8, extra_body={"perf_metrics_in_response": True})
    r = raw.parse()
    perf = r.model_extra["perf_metrics"]
    assert perf["prompt-tokens"] == r.usage.prompt_tokens
    assert perf["cached-prompt-tokens"] == r.usage.prompt_tokens_details.cached_tokens
    assert 0 < perf["server-time-to-first-token"] <= perf["server-processing-time"]
    assert float(raw.headers["fireworks-server-time-to-first-token"]) == perf["server-time-to-first-token"]
    assert float(raw.headers["fireworks-server-processing-time"]) == perf["server-processing-time"]
    assert int(raw.headers["fireworks-prompt-tokens"]) == r.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True,
                                                 extra_body={"perf_metrics_in_response": True,
                                                             "return_token_ids": True}))
    last = chunks[-1].model_extra
    assert last["perf_metrics"]["server-time-to-first-token"] <= last["perf_metrics"]["server-processing-time"]
    assert last["prompt_token_ids"] and last["perf_metrics"]["prompt-tokens"] == len(last["prompt_token_ids"])


def test_prompt_truncate_len_drops_the_oldest_turns_first(api, client):
    system = {"role": "system", "content": "You are terse."}
    # 684 tokens (chunks of 512 and 172) cut to at most 190: chunk sizes other tests prefill too (programs shared)
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i} " + "blah " * 32}
             for i in range(9)]
    full = client.chat.completions.create(model=MODEL, messages=[system, *turns], max_tokens=1)
    cut = client.chat.completions.create(model=MODEL, messages=[system, *turns], max_tokens=1,
                                         extra_body={"prompt_truncate_len": 190, "return_token_ids": True})
    assert full.usage.prompt_tokens > 190 >= cut.usage.prompt_tokens
    text = api.model.tokenizer.decode(cut.model_extra["prompt_token_ids"])
    assert "You are terse." in text and "Message number 8" in text and "Message number 0" not in text


def test_prompt_truncate_len_stops_where_dropping_one_turn_at_a_time_stopped(api, monkeypatch):
    """A template that rejects some shorter histories (Qwen3's raises when no user turn is left): bisection probes
    past the answer must not turn a prompt that fits into a 400, and it finds what the one-at-a-time loop found."""
    from server import protocol

    render = protocol.chat_text

    def strict(model, messages, *a, **k):
        if sum(m["role"] == "user" for m in messages) < 2:
            raise protocol.bad("the chat template rejected these messages: no user query found", "messages")
        return render(model, messages, *a, **k)

    monkeypatch.setattr(protocol, "chat_text", strict)
    def one_at_a_time(turns, limit):  # the reference: drop the oldest turn until it fits (or the template refuses)
        try:
            while len(ids := protocol.chat_ids(api.model, turns)[0]) > limit:
                turns = turns[1:]
            return ids
        except protocol.ApiError:
            return "rejected"

    def bisected(turns, limit):
        try:
            return protocol.chat_ids(api.model, turns, limit)[0]
        except protocol.ApiError:
            return "rejected"

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i} " + "blah " * 30} for i in range(9)]
    outcomes = []
    for limit in (120, 240, 310, 400):  # 233 tokens is the shortest with two user turns
        outcomes.append(one_at_a_time(turns, limit))
        assert bisected(turns, limit) == outcomes[-1], limit
    assert outcomes[0] == "rejected" and all(isinstance(o, list) for o in outcomes[1:])  # both kinds were seen


def test_a_text_that_cannot_fit_the_context_is_refused_before_it_is_tokenized(api, monkeypatch):
    """More characters than 4 x the longest token string x the positions: a 400 without spending ~1 s a MB in the
    tokenizer (counted: no encode call); the bound is loose, so a text just under it is still tokenized."""
    from server import protocol

    model = api.model
    limit = 4 * model.tokenizer.longest_token * model.cfg.max_position
    calls = []
    encode = model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    for call in (lambda t: protocol.completion_prompts(model, ["hi", t]),
                 lambda t: protocol.chat_ids(model, [{"role": "user", "content": t}]),
                 lambda t: protocol.prediction(model, {"prediction": {"type": "content", "content": t}})):
        with pytest.raises(protocol.ApiError) as e:
            call("a" * (limit + 8 * model.tokenizer.longest_token))
        assert e.value.status == 400 and "positions" in e.value.message
    assert len(calls) == 1  # the completion's first prompt, "hi"
    assert len(protocol.completion_prompts(model, "a" * (limit // 2))[0][0]) > 0 and len(calls) == 2


def test_prompt_truncate_len_bisects_to_the_fewest_dropped_turns(api, monkeypatch):
    """600 turns cut to 300 tokens: the longest suffix of turns that fits (one more turn would not), found in a
    logarithmic number of template renders (dropping one turn at a time took ~600 and blocked the server)."""
    from server import protocol

    system = {"role": "system", "content": "You are terse."}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i} " + "blah " * (i % 7 + 3)}
             for i in range(601)]
    renders = []
    render = protocol.chat_text
    monkeypatch.setattr(protocol, "chat_text", lambda *a, **k: renders.append(1) or render(*a, **k))
    ids, text, _ = protocol.chat_ids(api.model, [system, *turns], 300)
    assert len(renders) <= 2 + 10  # the whole, every turn dropped, then a bisection over 600
    first = next(i for i in range(601) if f"Turn {i} " in text)
    assert len(ids) <= 300 and text.startswith(render(api.model, [system])[:20]) and f"Turn {first - 1} " not in text
    assert ids == protocol.chat_ids(api.model, [system, *turns[first:]])[0]
    assert len(protocol.chat_ids(api.model, [system, *turns[first - 1:]])[0]) > 300


def test_a_priority_other_than_0_needs_priority_scheduling(client):
    """vLLM's `priority` field: 0 (the default) is served under first come first served; another value is a 400
    naming the flag, and a value that is not an integer a 400 too."""
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body={"priority": 0})
    assert ok.choices[0].finish_reason == "length"
    for value, why in ((3, "--scheduling-policy priority"), ("high", "must be an integer")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                           extra_body={"priority": value})
        assert e.value.body["param"] == "priority" and why in e.value.body["message"]


def _profiles(folder) -> list[str]:
    """The profiles written under `folder` (`jax.profiler`'s layout), oldest first."""
    return sorted(glob.glob(os.path.join(folder, "plugins", "profile", "*", "*.xplane.pb")), key=os.path.getmtime)


def _profiled(folder) -> list[str]:
    """The names of the trace events in the newest profile under `folder`."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(_profiles(folder)[-1])
    return [e.name for plane in data.planes for line in plane.lines for e in line.events]


def test_a_profile_taken_on_demand_marks_the_engine_steps(api, client, tmp_path):
    """vLLM's and SGLang's `/start_profile` and `/stop_profile` over `jax.profiler`: the trace is written where the
    call says and marks each engine step; SGLang's `num_steps` stops it by itself; a second start, a stop with
    none taken, no folder and a bad step count are 400s."""
    assert http(api, "POST", "/stop_profile")[0] == 400
    status, out, _ = http(api, "POST", "/start_profile")
    assert status == 400 and out["error"]["param"] == "output_dir", out  # no --profiler-dir here
    assert http(api, "POST", "/start_profile", {"output_dir": str(tmp_path), "num_steps": 0})[0] == 400
    status, out, _ = http(api, "POST", "/start_profile", {"output_dir": str(tmp_path / "a\u0000b")})
    assert status == 400 and out["error"]["param"] == "output_dir", out  # a path the OS refuses: not a 500
    assert http(api, "POST", "/start_profile", {"output_dir": str(tmp_path)})[:2] == (200, "Start profiling.\n")
    assert http(api, "POST", "/start_profile", {"output_dir": str(tmp_path)})[0] == 400  # one at a time
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
    assert http(api, "POST", "/stop_profile")[:2] == (200, "Stop profiling. This will take some time.\n")
    assert "engine_step" in _profiled(tmp_path)
    later = tmp_path / "later"
    assert http(api, "POST", "/start_profile", {"output_dir": str(later), "num_steps": 2,
                                                "activities": ["CPU", "GPU"]})[0] == 200
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0)
    deadline = time.monotonic() + 60
    while True:  # it stops by itself: once its file is written whole, it reads back
        try:
            assert "engine_step" in _profiled(later)
            break
        except (IndexError, RuntimeError):  # no file yet, or one still being written
            assert time.monotonic() < deadline, "the profile did not stop by itself"
            time.sleep(0.1)
    assert http(api, "POST", "/stop_profile")[0] == 400
