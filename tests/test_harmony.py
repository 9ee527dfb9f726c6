"""gpt-oss's harmony output: the reader against replies written out in the published format (whole and in any
pieces), and through the `openai` client on a live server over a tiny random model whose vocabulary has harmony's
special tokens and whose chat template writes harmony, made to answer in harmony by a grammar."""

import dataclasses
import json

import jsonschema
import openai
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.runner import RunnerConfig
from helpers import pieces, prompt_after_call, read_pieces, stream_chat, tiny_llama
from models import load_model
from server import harmony, tool_calls
from server.harmony import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START
from server.tools import Tools

MARKS = [START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL]
WEATHER = {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "required": ["zone"], "additionalProperties": False,
        "properties": {"zone": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

REPLIES = {  # text -> (reasoning, answer)
    f"{CHANNEL}analysis{MESSAGE}The user greets.{END}{START}assistant{CHANNEL}final{MESSAGE}Hello there!{RETURN}":
        ("The user greets.", "Hello there!"),
    f"{CHANNEL}analysis{MESSAGE}Need the weather.{END}{START}assistant{CHANNEL}commentary to=functions.get_weather "
    f'{CONSTRAIN}json{MESSAGE}{{"city": "Paris", "unit": "celsius"}}{CALL}':
        ("Need the weather.", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
                              "</tool_call>"),
    f"{CHANNEL}commentary{MESSAGE}Let me look.{END}{START}assistant to=functions.get_weather{CHANNEL}commentary json"
    f'{MESSAGE}{{"city": "Oslo", "unit": "celsius"}}':  # a preamble; the recipient in the role's header; no <|call|>
        ("", 'Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
             "</tool_call>"),
    f"{CHANNEL}analysis{MESSAGE}Search.{END}{START}assistant{CHANNEL}analysis to=browser.search{MESSAGE}"
    f'{{"query": "x"}}{CALL}': ("Search.{\"query\": \"x\"}", ""),  # a built-in tool's call: reasoning
    f"{CHANNEL}analysis{MESSAGE}Thinking, cut off by max_tok": ("Thinking, cut off by max_tok", ""),
    '[{"name": "get_weather", "arguments": {}}]': ("", '[{"name": "get_weather", "arguments": {}}]'),  # not harmony
    f" to=functions.get_weather{CHANNEL}commentary {CONSTRAIN}json{MESSAGE}{{}}{CALL}":  # the role's header, at once
        ("", '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'),
    f"{CHANNEL}analysis{MESSAGE}Hm.{END}{START}assistant": ("Hm.", ""),  # a header cut off: structure, not text
    f"Hello{MESSAGE}x": ("", f"Hello{MESSAGE}x"),  # no header opens it
    "": ("", ""),
}


def _read(parts):
    return read_pieces(harmony.Reader(), parts)


def test_a_reply_in_harmony_is_read_into_reasoning_answer_and_calls():
    for text, want in REPLIES.items():
        assert _read([text]) == want, text
    spec = Tools([TOOLS[0]["function"]], "auto")
    content, calls = tool_calls.extract(_read([list(REPLIES)[2]])[1], spec)
    assert content == "Let me look." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    called = list(REPLIES)[1]
    assert harmony.Reader(calls=False).feed(called, True) == (
        'Need the weather.{"city": "Paris", "unit": "celsius"}', "")  # no tools offered: no call to read
    assert harmony.route(f"{START}assistant to=python{CHANNEL}analysis code") == ("reasoning", None)
    assert harmony.route(f"{CHANNEL}commentary") == ("answer", None)


@settings(max_examples=80, deadline=None)
@given(text=st.sampled_from(sorted(REPLIES)), cuts=st.lists(st.integers(0, 200), max_size=14))
def test_any_pieces_read_as_the_whole(text, cuts):
    assert _read(pieces(text, cuts)) == REPLIES[text]


# A chat template in harmony's layout (a system message with the reasoning level, the tools as a TypeScript
# namespace, each turn a message; the generation prompt opens the assistant's), written for this test.
TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort or 'medium' }}\n"
    "# Valid channels: analysis, commentary, final.<|end|>"
    "{% if tools %}<|start|>developer<|message|>namespace functions {\n{% for t in tools %}"
    "type {{ t.function.name }} = (_: any) => any;\n{% endfor %}} // namespace functions<|end|>{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>"
    "{% elif m.role == 'assistant' and m.tool_calls %}{% for c in m.tool_calls %}<|start|>assistant<|channel|>"
    "commentary to=functions.{{ c.function.name }} <|constrain|>json<|message|>{{ c.function.arguments | tojson }}"
    "<|call|>{% endfor %}{% elif m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>"
    "{{ m.content }}<|end|>{% elif m.role == 'tool' %}<|start|>functions.get_weather to=assistant<|channel|>"
    "commentary<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
@pytest.fixture(scope="module")
def oss(smollm, tmp_path_factory):
    """A live server over a 2-layer random Llama whose tokenizer is SmolLM2's plus harmony's special tokens, with a
    harmony chat template and `<|return|>` and `<|call|>` among its ends of sequence."""
    from conftest import live_server

    folder = str(tmp_path_factory.mktemp("oss"))
    tok, _ = tiny_llama(folder, smollm.tokenizer.folder, MARKS, TEMPLATE)
    ends = [tok.eos_token_id, *tok.convert_tokens_to_ids([RETURN, CALL])]
    transformers.GenerationConfig(eos_token_id=ends).save_pretrained(folder)
    model = dataclasses.replace(load_model(folder), name="oss")
    rc = RunnerConfig(max_num_seqs=2, max_model_len=256, kv_cache_gb=0.01, decode_batch_sizes=(2,))
    for api in live_server(model, rc):
        yield api


def _end_soon(oss):
    """A logit bias that makes the random model end a message after a few tokens (it would ramble to max_tokens)."""
    return {str(oss.model.tokenizer.convert_tokens_to_ids(END)): 9}


def test_gpt_oss_channels_through_the_openai_client(oss):
    """Under a JSON schema the model may think on the analysis channel, then the schema applies to the final
    message: the analysis comes back as `reasoning_content`, the final message as the content, whole and streamed;
    the raw completion keeps the channels."""
    assert oss.server.thinks == "harmony"
    client = openai.OpenAI(base_url=oss.url + "/v1", api_key="x", max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    body = dict(model="oss", messages=ASK, temperature=1.0, seed=5, max_tokens=80, reasoning_effort="low",
                logit_bias=_end_soon(oss), response_format={"type": "json_schema", "json_schema": {
                    "name": "city", "schema": schema}}, extra_body={"return_token_ids": True})
    r = client.chat.completions.create(**body)
    msg, ids = r.choices[0].message, r.choices[0].model_extra["token_ids"]
    jsonschema.validate(json.loads(msg.content), schema)
    raw = oss.model.tokenizer.decode(ids, skip_special_tokens=False)
    assert msg.model_extra["reasoning_content"] and raw.startswith(f"{CHANNEL}analysis{MESSAGE}")
    assert raw.endswith(f"{START}assistant{CHANNEL}final{MESSAGE}{msg.content}")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens_details.reasoning_tokens == ids.index(oss.model.tokenizer.convert_tokens_to_ids(
        END)) + 1  # up to the analysis message's end
    assert "Reasoning: low" in oss.model.tokenizer.decode(r.model_extra["prompt_token_ids"])
    assert stream_chat(client, **body) == (msg.model_extra["reasoning_content"], msg.content, [], "stop")
    raw = client.completions.create(model="oss", prompt="Hi", max_tokens=9, extra_body={
        "skip_special_tokens": False, "structured_outputs": {"grammar": f'start: {CHANNEL} "analysis" {MESSAGE} "ab"'}})
    assert raw.choices[0].text == f"{CHANNEL}analysis{MESSAGE}ab"  # completions: the grammar as given, no channels read


def test_a_forced_custom_tool_is_a_message_to_it(oss):
    """A named custom tool under `tool_choice`: after the analysis, one commentary message to it, returned as a custom
    tool call with its input."""
    client = openai.OpenAI(base_url=oss.url + "/v1", api_key="x", max_retries=0)
    shell = {"type": "custom", "custom": {"name": "shell"}}
    r = client.chat.completions.create(model="oss", messages=ASK, tools=[shell], tool_choice=shell, temperature=1.0,
                                       seed=6, max_tokens=80, logit_bias=_end_soon(oss))
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.type == "custom" and call.custom.name == "shell"
    assert isinstance(call.custom.input, str)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_call_is_a_message_to_the_function(oss, choice):
    """`tool_choice` `required` or a named function: after the analysis, one commentary message to
    `functions.NAME` whose body its parameters accept, returned as a tool call, whole and streamed."""
    client = openai.OpenAI(base_url=oss.url + "/v1", api_key="x", max_retries=0)
    tools = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
    body = dict(model="oss", messages=ASK, tools=tools, tool_choice=choice, temperature=1.0, seed=6, max_tokens=80,
                logit_bias=_end_soon(oss), extra_body={"return_token_ids": True})
    r = client.chat.completions.create(**body)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.function.name in (("get_time",) if isinstance(choice, dict) else ("get_weather", "get_time"))
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER if call.function.name == "get_weather" else TIME)
    raw = oss.model.tokenizer.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=False)
    assert f"{CHANNEL}commentary to=functions.{call.function.name} {CONSTRAIN}json{MESSAGE}" in raw
    reasoning, content, calls, finish = stream_chat(client, **body)
    assert (reasoning, content, finish) == (msg.model_extra["reasoning_content"] or "", "", "tool_calls")
    assert calls == [{"name": call.function.name, "arguments": call.function.arguments}]

    prompt = prompt_after_call(client, oss.model, ASK, call, TOOLS)
    assert f"to=functions.{call.function.name} {CONSTRAIN}json{MESSAGE}{json.dumps(args)}{CALL}" in prompt
