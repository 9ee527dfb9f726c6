"""Command R7B's and Command A's replies: the reader against the published examples (vLLM's `cohere_command3` and
`cohere_command4` parser tests write them out; whole and in any pieces), and through the `openai` client on a live
server over a tiny random model whose vocabulary has Cohere's special tokens and whose chat template writes their
blocks, made to answer in them by the grammars of a forced call and of structured output."""

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
from server import cohere, reasoning, tool_calls
from server.tools import Tools

TURN, END_TURN, USER, BOT, SYSTEM = ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                                     "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>")
(THINK, THOUGHT), (ACT, ACTED), (SAY, SAID) = cohere.THINKING, cohere.ACTION, cohere.RESPONSE
MARKS = [TURN, END_TURN, USER, BOT, SYSTEM, THINK, THOUGHT, ACT, ACTED, SAY, SAID]
WEATHER = {"type": "object", "required": ["city"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 12}}}
TIME = {"type": "object", "required": ["zone"], "additionalProperties": False,
        "properties": {"zone": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

ONE = f"""{THINK} i will call foo with query1{THOUGHT}{ACT}
[
    {{"tool_call_id": "0", "tool_name": "foo", "parameters": {{"query": "query1"}}}}
]
{ACTED}"""
TWO = f"""{THINK}first I think about foo{THOUGHT}{ACT}
[
    {{"tool_call_id": "0", "tool_name": "foo", "parameters": {{"query": "query1"}}}},
    {{"tool_call_id": "1", "tool_name": "bar", "parameters": {{"x": 42}}}}
]
{ACTED}"""
CITED = (f"{THINK}This is a rainbow <co>emoji: 🌈</co: 0:[1]>{THOUGHT}\n"
         "<|START_{tag}|>foo <co>bar</co: 0:[1,2],1:[3,4]><|END_{tag}|>")


def _call(name, args):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


REPLIES = {  # text -> (reasoning, answer): vLLM's expectations for its examples, then the edges
    ONE: ("i will call foo with query1", _call("foo", {"query": "query1"})),
    TWO: ("first I think about foo", _call("foo", {"query": "query1"}) + _call("bar", {"x": 42})),
    CITED.format(tag="RESPONSE"): ("This is a rainbow emoji: 🌈", "foo bar"),
    CITED.format(tag="TEXT"): ("This is a rainbow emoji: 🌈", "foo bar"),
    f"{THINK}just think, no response{THOUGHT}": ("just think, no response", ""),
    "Hello there, <co>plain</co: 0:[2]> text": ("", "Hello there, plain text"),  # no blocks: all answer
    f"{THINK}Cut off by max_tok": ("Cut off by max_tok", ""),
    f"{THINK}a{THOUGHT}{ACT}[{{\"tool_name\": \"foo\", \"param": ("a", '[{"tool_name": "foo", "param'),  # cut off
    f"{SAY}a < b, and </co x{SAID}": ("", "a < b, and </co x"),
    f"{SAY}a </co: <co> b{SAID}": ("", "a </co:  b"),  # a mark holds no `<`: the one left open is text
    "foo</co: 0:[1] and <co>bar</co: 0:[2]>": ("", "foo</co: 0:[1] and bar"),
    "": ("", ""),
}


def _read(parts, calls=True):
    return read_pieces(cohere.Reader(calls), parts)


def test_a_command_reply_is_read_into_reasoning_answer_and_calls():
    for text, want in REPLIES.items():
        assert _read([text]) == want, text
    spec = Tools([{"name": "foo", "parameters": {"type": "object"}}, {"name": "bar", "parameters": {}}], "auto")
    content, calls = tool_calls.extract(_read([TWO])[1], spec)
    assert content is None and [c["function"]["name"] for c in calls] == ["foo", "bar"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"query": "query1"}, {"x": 42}]
    assert _read([ONE], calls=False)[1] == ONE[ONE.index(ACT) + len(ACT):ONE.index(ACTED)].strip()  # no tools
    assert cohere.Reader(opened=True).feed(f"mid-thought{THOUGHT}{SAY}Hi{SAID}", True) == ("mid-thought", "Hi")
    assert cohere.Reader().feed(ACT + "[" * 5000 + ACTED, True) == ("", "[" * 5000)  # too deep for json: text


@settings(max_examples=80, deadline=None)
@given(text=st.sampled_from(sorted(REPLIES)), cuts=st.lists(st.integers(0, 200), max_size=14))
def test_any_pieces_read_as_the_whole(text, cuts):
    assert _read(pieces(text, cuts)) == REPLIES[text]


# A chat template in Command R7B's layout (turns between START_OF_TURN and END_OF_TURN; the assistant's calls in an
# action block, its answers in a response block; the generation prompt opens the thinking block when asked to
# think), written for this test.
TEMPLATE = (
    "{% if tools %}" + TURN + SYSTEM + "Tools: {% for t in tools %}{{ t.function.name }} {% endfor %}" + END_TURN
    + "{% endif %}{% for m in messages %}" + TURN + "{% if m.role == 'user' %}" + USER + "{{ m.content }}"
    "{% elif m.role == 'assistant' and m.tool_calls %}" + BOT + ACT + "[{% for c in m.tool_calls %}"
    '{"tool_call_id": "{{ loop.index0 }}", "tool_name": "{{ c.function.name }}", "parameters": '
    "{{ c.function.arguments }}}{% if not loop.last %}, {% endif %}{% endfor %}]" + ACTED
    + "{% elif m.role == 'assistant' %}" + BOT + SAY + "{{ m.content }}" + SAID
    + "{% else %}" + SYSTEM + "{{ m.content }}{% endif %}" + END_TURN + "{% endfor %}"
    "{% if add_generation_prompt %}" + TURN + BOT + "{% if enable_thinking %}" + THINK + "{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def command(smollm, tmp_path_factory):
    """A live server over a 2-layer random Llama whose tokenizer is SmolLM2's plus Cohere's special tokens, with a
    Command R7B-like chat template and `<|END_OF_TURN_TOKEN|>` as its end of sequence."""
    from conftest import live_server

    folder = str(tmp_path_factory.mktemp("command"))
    tok, _ = tiny_llama(folder, smollm.tokenizer.folder, MARKS, TEMPLATE)
    transformers.GenerationConfig(eos_token_id=tok.convert_tokens_to_ids(END_TURN)).save_pretrained(folder)
    model = dataclasses.replace(load_model(folder), name="command")
    rc = RunnerConfig(max_num_seqs=2, max_model_len=256, kv_cache_gb=0.01, decode_batch_sizes=(2,))
    for api in live_server(model, rc):
        yield api


def test_structured_output_after_a_budgeted_thought_through_the_openai_client(command):
    """Asked to think (the prompt opens the block) with a budget of 4 tokens and a JSON schema: the engine closes
    the thinking block at its budget, the schema applies inside one response block, and the client gets the
    thinking as `reasoning_content` and the JSON as the content, whole and streamed."""
    assert command.server.thinks == "cohere" and command.server.think_ids is not None
    client = openai.OpenAI(base_url=command.url + "/v1", api_key="x", max_retries=0)
    body = dict(model="command", messages=ASK, temperature=1.0, seed=5, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": WEATHER}},
        extra_body={"return_token_ids": True, "reasoning_effort": 4})
    r = client.chat.completions.create(**body)
    msg, ids = r.choices[0].message, r.choices[0].model_extra["token_ids"]
    jsonschema.validate(json.loads(msg.content), WEATHER)
    tok = command.model.tokenizer
    prompt = tok.decode(r.model_extra["prompt_token_ids"], skip_special_tokens=False)
    raw = tok.decode(ids, skip_special_tokens=False)
    assert prompt.endswith(TURN + BOT + THINK) and ids.index(tok.convert_tokens_to_ids(THOUGHT)) == 4
    assert raw.endswith(f"{THOUGHT}{SAY}{msg.content}{SAID}") and r.choices[0].finish_reason == "stop"
    assert msg.model_extra["reasoning_content"] == reasoning.split(raw[:raw.index(THOUGHT)], opened=True)[0]
    assert r.usage.completion_tokens_details.reasoning_tokens == 5  # the block's close included
    assert stream_chat(client, **body) == (msg.model_extra["reasoning_content"], msg.content, [], "stop")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_call_is_an_action_block(command, choice):
    """`tool_choice` `required` (without parallel calls) or a named function (with them: a named function is called
    once): one action block whose call names an offered function (the named one) with arguments its parameters
    accept, returned as a tool call, whole and streamed; the call then goes back into the next prompt as the
    template writes it."""
    client = openai.OpenAI(base_url=command.url + "/v1", api_key="x", max_retries=0)
    body = dict(model="command", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=6,
                max_tokens=80, parallel_tool_calls=isinstance(choice, dict), extra_body={"return_token_ids": True})
    r = client.chat.completions.create(**body)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None, msg
    (call,) = msg.tool_calls
    assert call.function.name in (("get_time",) if isinstance(choice, dict) else ("get_weather", "get_time"))
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER if call.function.name == "get_weather" else TIME)
    raw = command.model.tokenizer.decode(r.choices[0].model_extra["token_ids"], skip_special_tokens=False)
    assert raw.startswith(ACT) and raw.endswith(ACTED)
    (written,) = json.loads(raw[len(ACT):-len(ACTED)])
    assert written["tool_name"] == call.function.name and written["parameters"] == args
    reasoning_text, content, calls, finish = stream_chat(client, **body)
    assert (reasoning_text, content, finish) == ("", "", "tool_calls")
    assert calls == [{"name": call.function.name, "arguments": call.function.arguments}]

    prompt = prompt_after_call(client, command.model, ASK, call, TOOLS)
    assert f'{ACT}[{{"tool_call_id": "0", "tool_name": "{call.function.name}", "parameters": ' in prompt
