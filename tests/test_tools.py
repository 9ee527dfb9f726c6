"""Tool calls through the official openai client on a live server (SmolLM2: the system-prompt fallback format)."""

import json

import jsonschema
import openai
import pytest
from helpers import stream_chat
from hypothesis import given, settings
from hypothesis import strategies as st

from server import tool_calls
from server import tools as tool_mod

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["timezone"],
        "properties": {"timezone": {"type": "string", "maxLength": 30}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
                                           "parameters": TIME}}]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(message, names=None):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith(("call_", f"functions.{call.function.name}:"))
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_required_always_calls_with_valid_arguments(client):
    for seed in (0, 1):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, n=2, max_tokens=120)
        for c in r.choices:
            assert c.finish_reason == "tool_calls"
            _check_calls(c.message)


def test_named_function_and_its_legacy_form(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=4,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message, {"get_time"})
    assert len(r.choices[0].message.tool_calls) == 1
    legacy = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, extra_body={
        "functions": [t["function"] for t in TOOLS], "function_call": {"name": "get_weather"}})
    _check_calls(legacy.choices[0].message, {"get_weather"})


def test_a_forced_call_wins_over_response_format(client):
    """instructor's and the Agents SDK's forced tools send a response_format too: the forced turn is a call (it has
    no text to shape), as with OpenAI; vLLM's own grammar fields with a forced call stay a 400."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, response_format=fmt, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message, {"get_time"})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=8,
                                       extra_body={"guided_json": {"type": "object"}})
    assert e.value.body["param"] == "tool_choice"
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                 max_tokens=120, stream=True, temperature=0,  # (sampled, a run of
                                                 parallel_tool_calls=False))  # calls could reach the budget)
    said = [c.choices[0] for c in chunks if c.choices]
    assert said[-1].finish_reason == "tool_calls"  # and no chunk that says nothing (the call's text held back)
    assert all(c.delta.content or c.delta.tool_calls or c.delta.role or c.finish_reason for c in said)


def test_allowed_tools_limit_the_calls_to_a_subset_and_namespaces_serve_theirs(api, client):
    """OpenAI's `allowed_tools` choice, on chat and (flat) on Responses: "required" calls one of the named tools
    only; a null description is no description. A Responses `namespace` tool's functions are served, their calls
    carrying the namespace."""
    only = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}
    tools = [TOOLS[0], {"type": "function", "function": {**TOOLS[1]["function"], "description": None}}]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice=only, temperature=0,
                                       max_tokens=120)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message, {"get_time"})
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    r = client.responses.create(model=MODEL, input=ASK[0]["content"], tools=flat, max_output_tokens=120,
                                temperature=0,  # (a weather question: only the restriction makes it get_time)
                                tool_choice={"type": "allowed_tools", "mode": "required", "tools": [
                                    {"type": "function", "name": "get_time"}, {"type": "web_search"}]})
    assert {o.name for o in r.output if o.type == "function_call"} == {"get_time"}
    # a namespace's functions (Codex's sub-agent tools): served, and their calls name the namespace
    spaced = [{"type": "namespace", "name": "clock", "description": "Time tools.", "tools": [flat[1]]}, flat[0],
              {"type": "web_search"}]
    for stream in (False, True):
        ask = dict(model=MODEL, input=ASK[0]["content"], tools=spaced, max_output_tokens=120, temperature=0,
                   tool_choice={"type": "function", "name": "get_time"})
        if stream:
            with client.responses.stream(**ask) as s:
                added = [e.item for e in s if e.type == "response.output_item.added"]
                r = s.get_final_response()
            assert added[0].namespace == "clock"
        else:
            r = client.responses.create(**ask)
        call = next(o for o in r.output if o.type == "function_call")
        assert (call.name, call.namespace) == ("get_time", "clock")
    auto = dict(only, allowed_tools={**only["allowed_tools"], "mode": "auto"})
    narrowed = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=auto, max_tokens=1)
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=1)
    assert narrowed.usage.prompt_tokens < whole.usage.prompt_tokens  # the others left out of the prompt
    for wrong in ({"type": "allowed_tools", "allowed_tools": {"mode": "any", "tools": []}},
                  {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
                      {"type": "function", "function": {"name": "nope"}}]}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=wrong, max_tokens=4)
        assert e.value.body["param"] == "tool_choice"


def test_none_and_auto_leave_plain_text_alone(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                           tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=24)
        assert not r.choices[0].message.tool_calls and r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length")


def test_parser_reads_tagged_and_json_calls_and_leaves_text():
    spec = tool_mod.Tools([t["function"] for t in TOOLS], "auto")
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    content, calls = tool_calls.extract(text, spec)
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_time"
    assert json.loads(calls[0]["function"]["arguments"]) == {"timezone": "UTC"}
    content, calls = tool_calls.extract('[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]',
                                      spec)
    assert content is None and len(calls) == 1
    assert tool_calls.extract("The answer is 42.", spec) == ("The answer is 42.", [])
    assert tool_calls.extract('{"name": "launch_rockets", "arguments": {}}', spec)[1] == []  # unknown function


DS_CALLS, DS_CALL, DS_SEP, DS_END, DS_DONE = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                              "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")
# Each family's format as its chat template and peers write it: DeepSeek V3.1 (name, then the arguments), DeepSeek V3
# and R1 (`function`, then the name and a ```json fence), Qwen3-Coder's XML, Llama 3.x's `parameters`, GLM's keys and
# values, Phi-4-mini's `functools` array.
DS31 = (f'I will look.{DS_CALLS}{DS_CALL}get_weather{DS_SEP}{{"city": "Oslo", "unit": "celsius"}}{DS_END}'
        f'{DS_CALL}get_time{DS_SEP}{{"timezone": "UTC"}}{DS_END}{DS_DONE}')
DS3 = (f'{DS_CALLS}{DS_CALL}function{DS_SEP}get_time\n```json\n{{"timezone": "CET"}}\n```{DS_END}'
       f'{DS_CALL}function{DS_SEP}get_weather\n```json\n{{"city": "Rome", "unit": "fahrenheit"}}\n```{DS_END}{DS_DONE}')
XML = ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
       "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>")
LLAMA = '{"name": "get_time", "parameters": {"timezone": "UTC"}}'
GLM = ("Looking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>New York</arg_value>\n<arg_key>unit"
       "</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call><tool_call>get_time<arg_key>timezone</arg_key>"
       "<arg_value>UTC</arg_value></tool_call>")  # GLM-4.5's form with newlines, then GLM-4.7's without
PHI = 'functools[{"name": "get_time", "arguments": {"timezone": "UTC"}}]'  # Phi-4-mini's
MINIMAX = ('<think>Need both.</think>\nChecking.\n<minimax:tool_call>\n<invoke name="get_weather">\n'
           '<parameter name="city">New York</parameter>\n<parameter name="unit">celsius</parameter>\n</invoke>\n'
           '<invoke name="get_time">\n<parameter name="timezone">UTC</parameter>\n</invoke>\n</minimax:tool_call>')
PYTHONIC = '[get_weather(city="Oslo", unit="celsius"), get_time(timezone="UTC")]'  # Llama 3.2's and 4's other format
# Mistral's v11 form with its marks kept (Small 3.2, Devstral), v13's call id, [ARGS] skipped (vLLM's Mistral
# tokenizer), and v0.3's array after a kept [TOOL_CALLS]
MISTRAL = ('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "New York", "unit": "celsius"}'
           '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"timezone": "UTC"}[TOOL_CALLS]get_time{"timezone": "CET"}')
SEED = ("Checking.<seed:tool_call>\n<function=get_weather>\n<parameter=city>New York</parameter>\n<parameter=unit>"
        "celsius</parameter>\n</function>\n</seed:tool_call><seed:tool_call>\n<function=get_time>\n<parameter=timezone>"
        "UTC</parameter>\n</function>\n</seed:tool_call>")  # Seed-OSS's
SEED_TWO = ("Checking.<seed:tool_call>\n<function=get_weather>\n<parameter=city>New York</parameter>\n<parameter=unit>"
            "celsius</parameter>\n</function>\n<function=get_time>\n<parameter=timezone>UTC</parameter>\n</function>\n"
            "</seed:tool_call>")  # both in one block
UNCLOSED = '[draft <tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}</tool_call>'
KIMI = ("Let me look.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "New York", "unit": "celsius"}<|tool_call_end|><|tool_call_begin|> functions.get_time:1 '
        '<|tool_call_argument_begin|>{"timezone": "UTC"}<|tool_call_end|><|tool_calls_section_end|>')  # Kimi K2's
OLMO = ('Checking.\n<function_calls>\nget_weather(city="New York", unit="celsius")\nget_time(timezone="UTC")\n'
        "</function_calls>")  # OLMo 3's
GRANITE = ('<tool_call>[{"name": "get_weather", "arguments": {"city": "New York", "unit": "celsius"}}, '
           '{"name": "get_time", "arguments": {"timezone": "UTC"}}]')  # Granite 3.1 on (3.0: <|tool_call|>)
MISTRAL_V3 = '[TOOL_CALLS] [{"name": "get_time", "arguments": {"timezone": "UTC"}}]'


def test_each_familys_call_format_is_read():
    spec = tool_mod.Tools([t["function"] for t in TOOLS] + [{"name": "add", "description": "", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": ["number", "null"]},
                                         "tags": {"type": "array"}, "note": {"type": "string"}}}}], "auto")

    def read(text):
        content, calls = tool_calls.extract(text, spec)
        return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]

    assert read(DS31) == ("I will look.", [("get_weather", {"city": "Oslo", "unit": "celsius"}),
                                           ("get_time", {"timezone": "UTC"})])
    assert read(DS3) == (None, [("get_time", {"timezone": "CET"}),
                                ("get_weather", {"city": "Rome", "unit": "fahrenheit"})])
    assert read(XML) == ("Checking.", [("get_weather", {"city": "New York", "unit": "celsius"})])
    assert read(LLAMA) == (None, [("get_time", {"timezone": "UTC"})])
    assert read(GLM) == ("Looking.", [("get_weather", {"city": "New York", "unit": "celsius"}),
                                      ("get_time", {"timezone": "UTC"})])
    assert read(MINIMAX) == ("<think>Need both.</think>\nChecking.", [  # (the thinking: split out before this)
        ("get_weather", {"city": "New York", "unit": "celsius"}), ("get_time", {"timezone": "UTC"})])
    minimax = ('<minimax:tool_call><invoke name="add"><parameter name="a">2</parameter><parameter name="tags">'
               '["x"]</parameter><parameter name="note">007</parameter></invoke></minimax:tool_call>')
    assert read(minimax)[1] == [("add", {"a": 2, "tags": ["x"], "note": "007"})]  # typed by the schema
    glm = ("<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>2</arg_value>\n<arg_key>tags</arg_key>\n<arg_value>"
           "['x', 'y']</arg_value>\n<arg_key>note</arg_key>\n<arg_value>007</arg_value>\n<arg_key>b</arg_key>\n"
           "<arg_value>None</arg_value>\n</tool_call>")  # typed by the schema; Python literals read too
    assert read(glm)[1] == [("add", {"a": 2, "tags": ["x", "y"], "note": "007", "b": None})]
    assert read("<tool_call>get_time</tool_call>")[1] == [("get_time", {})]
    assert read(PHI) == (None, [("get_time", {"timezone": "UTC"})])
    assert read(MISTRAL) == ("Checking.", [("get_weather", {"city": "New York", "unit": "celsius"}),
                                           ("get_time", {"timezone": "UTC"}), ("get_time", {"timezone": "CET"})])
    assert read(MISTRAL_V3) == (None, [("get_time", {"timezone": "UTC"})])
    again = MISTRAL_V3 + MISTRAL_V3.replace("UTC", "[TOOL_CALLS] CET")  # the mark again, and inside a string
    assert read(again) == (None, [("get_time", {"timezone": "UTC"}), ("get_time", {"timezone": "[TOOL_CALLS] CET"})])
    assert read(MISTRAL_V3 + " [TOOL_CALLS] and more") == read(MISTRAL_V3)  # as text after an array: left out
    spaced = MISTRAL.replace("[ARGS]", " [ARGS] ").replace("[CALL_ID]", " [CALL_ID] ")  # special tokens spaced apart
    assert read(spaced) == read(MISTRAL)
    assert read(MISTRAL_V3 + " Done.") == read(MISTRAL_V3)  # text after the closed array (vLLM's reading too)
    assert read(KIMI) == ("Let me look.", [("get_weather", {"city": "New York", "unit": "celsius"}),
                                           ("get_time", {"timezone": "UTC"})])
    assert [c["id"] for c in tool_calls.extract(KIMI, spec)[1]] == ["functions.get_weather:0", "functions.get_time:1"]
    ids = [c["id"] for c in tool_calls.extract(MISTRAL, spec)[1]]  # v13's [CALL_ID] kept, ours where none is written
    assert ids[1] == "a1B2c3D4e" and ids[0].startswith("call_") and ids[2].startswith("call_")
    twice = MISTRAL.replace("get_time{", "get_time[CALL_ID]a1B2c3D4e[ARGS]{")  # the model wrote an id again: ours
    assert [c["id"] == "a1B2c3D4e" for c in tool_calls.extract(twice, spec)[1]] == [False, True, False]
    assert read(KIMI.replace("tool_calls_section", "tool_call_section"))[1] == read(KIMI)[1]  # the singular marks
    marked = KIMI.replace('"UTC"', '"<|tool_call_begin|>"')  # a mark inside the arguments is theirs
    assert read(marked)[1][1] == ("get_time", {"timezone": "<|tool_call_begin|>"})
    assert read(GRANITE) == (None, [("get_weather", {"city": "New York", "unit": "celsius"}),
                                    ("get_time", {"timezone": "UTC"})])
    assert read("Sure.\n" + GRANITE.replace("<tool_call>", "<|tool_call|>")) == ("Sure.", read(GRANITE)[1])
    marked = '[{"name": "get_time", "arguments": {"timezone": "Write <function_calls>, [TOOL_CALLS], <|tool_call|>"}}]'
    assert read(marked) == (None, [("get_time", {"timezone": "Write <function_calls>, [TOOL_CALLS], <|tool_call|>"})])
    assert read('[get_time(timezone="<|tool_calls_section_begin|>")]')[1] == [  # a forced call's argument holds a mark
        ("get_time", {"timezone": "<|tool_calls_section_begin|>"})]
    assert read('<function_calls>\nadd(note="""two\nlines""",\n    a=1)\n</function_calls>')[1] == [
        ("add", {"note": "two\nlines", "a": 1})]  # a string, and a call, over lines
    assert read(OLMO) == ("Checking.", [("get_weather", {"city": "New York", "unit": "celsius"}),
                                        ("get_time", {"timezone": "UTC"})])
    assert read("<function_calls>add(a=1, b=null, tags=['x', true], note={'k': false})</function_calls>")[1] == [
        ("add", {"a": 1, "b": None, "tags": ["x", True], "note": {"k": False}})]  # JSON's words as OLMo 3 writes
    assert read(SEED) == ("Checking.", [("get_weather", {"city": "New York", "unit": "celsius"}),
                                        ("get_time", {"timezone": "UTC"})])
    assert read(SEED_TWO) == read(SEED)  # two functions in one block (vLLM's seed_oss and qwen3_coder read both)
    assert read(SEED_TWO.replace("seed:tool_call", "tool_call"))[1] == read(SEED)[1]
    assert read(UNCLOSED) == ("[draft", [("get_time", {"timezone": "UTC"})])  # a bracket opened before the mark
    assert read("{ " + MINIMAX[MINIMAX.index("<minimax"):])[1] == read(MINIMAX)[1]
    for quoted in ("[get_time(timezone='a]b <tool_call> c')]", "[get_time(timezone='a}b [TOOL_CALLS] c')]"):
        assert read(quoted) == (None, [("get_time", {"timezone": quoted[20:-3]})])  # a mark in Python's quotes
    deep = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"  # nested past Python's limit: no call, no exception
    for bad in (f"[TOOL_CALLS]get_time[ARGS]{deep}", f'<tool_call>{{"name": "get_time", "arguments": {deep}}}'
                                                     "</tool_call>"):
        assert read(bad) == (bad, [])
    assert read('[TOOL_CALLS]add[ARGS]{"a": 1, "note": "[TOOL_CALLS]x{}"}')[1] == [("add", {"a": 1,
                                                                                         "note": "[TOOL_CALLS]x{}"})]
    assert read(PYTHONIC) == (None, [("get_weather", {"city": "Oslo", "unit": "celsius"}),
                                     ("get_time", {"timezone": "UTC"})])
    assert read("[add(a=2, b=None, tags=['x'], note=\"a'b\")]")[1] == [("add", {"a": 2, "b": None, "tags": ["x"],
                                                                                 "note": "a'b"})]
    typed = ("<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n0.5\n</parameter>\n"
             '<parameter=tags>\n["x", "y"]\n</parameter>\n<parameter=note>\n007\n  two lines\n</parameter>\n'
             "</function>\n</tool_call>")
    assert read(typed)[1] == [("add", {"a": 2, "b": 0.5, "tags": ["x", "y"], "note": "007\n  two lines"})]
    assert read(f"{DS_CALLS}{DS_CALL}add{DS_SEP}{DS_END}{DS_DONE}")[1] == [("add", {})]  # no arguments
    fence = {"note": "```py\nprint(1)\n```", "a": 1}  # a fence, and DeepSeek's end mark, inside strings
    fenced = DS3.replace('{"timezone": "CET"}', json.dumps(fence)).replace("get_time", "add")
    assert read(fenced)[1][0] == ("add", fence)
    assert read(DS31.replace('"UTC"', f'"{DS_END}"'))[1][1] == ("get_time", {"timezone": DS_END})
    assert read(DS31.replace('"UTC"', f'"{DS_CALL}"'))[1][1] == ("get_time", {"timezone": DS_CALL})  # theirs
    untyped = tool_mod.Tools([{"name": "f", "description": "", "parameters": {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "n": {"description": "no type"}}}}], "auto")
    content, calls = tool_calls.extract("<tool_call>\n<function=f>\n<parameter=id>\n123\n</parameter>\n<parameter=n>"
                                        "\ntrue\n</parameter>\n</function>\n</tool_call>", untyped)
    assert json.loads(calls[0]["function"]["arguments"]) == {"id": "123", "n": "true"}  # text unless typed otherwise
    for bad in (DS31.replace('"UTC"}', '"UTC"'),  # arguments that are not JSON
                DS31.replace("get_time", "launch_rockets"),  # an unknown function
                DS31[:-len(DS_END + DS_DONE) - 3],  # cut off inside the last call
                XML.replace("</function>", ""), DS3.replace("```json", "```yaml"),
                GLM.replace("get_time", "launch_rockets"), GLM.replace("</arg_value></tool_call>", "</tool_call>"),
                GLM[:-len("</tool_call>")], "functools is a Python module.", PHI[:-1],
                MINIMAX.replace("</invoke>\n</minimax", "\n</minimax"), MINIMAX.replace("get_time", "launch"),
                "<minimax:tool_call>get_time()</minimax:tool_call>",
                MINIMAX.replace("\n<invoke name=\"get_time", " then \n<invoke name=\"get_time"),  # prose between
                MINIMAX + "<minimax:tool_call>no call</minimax:tool_call>",
                f"[{LLAMA}, 5]", f'[{LLAMA}, "x", {LLAMA}]',  # an array element that is no call
                "[1] A citation.", '[get_time("UTC")]', "[get_time(timezone=now())]", "[get_time(**z)]",
                "[get_time(timezone={1, 2})]", "<function_calls>get_time(timezone=b'x')</function_calls>",
                MISTRAL + " and then some", MISTRAL.replace("get_time", "launch"), "[TOOL_CALLS]get_time[ARGS]",
                '[TOOL_CALLS]get_time[ARGS]"UTC"', MISTRAL[:-1], "[TOOL_CALLS]no call here",
                MISTRAL_V3.replace("}}]", "}}, 7]"), SEED.replace("get_time", "launch"), SEED[:-20],
                SEED.replace("<function=get_time>", '{"name": "get_time"}'), KIMI.replace("get_time", "launch"),
                KIMI.replace("functions.get_time:1", "call_123"), KIMI.replace('"UTC"}', '"UTC"'),
                DS31.replace(f"{DS_END}{DS_CALL}", f"{DS_END} and {DS_CALL}"),  # text between calls
                KIMI[:KIMI.rindex("<|tool_call_end|>")], KIMI.replace("<|tool_call_end|><|tool_call_begin|>",
                                                                     "<|tool_call_end|>and<|tool_call_begin|>"),
                OLMO[:-1], OLMO.replace("get_time", "launch"),
                "<function_calls>get_time(**tz)</function_calls>", "<function_calls>get_time(x=now())</function_calls>",
                OLMO.replace("\nget_time", "\nthen get_time"), "<tool_call>[1, 2]", "<|tool_call|> no calls",
                GRANITE.replace("get_time", "launch"), GRANITE.replace('"UTC"}}]', '"UTC"'),
                MISTRAL_V3[:-1], GRANITE[:-1], "<|tool_call|>" + GRANITE[11:-1],  # arrays cut off by max_tokens
                "[TOOL_CALLS]" + LLAMA + LLAMA, "[TOOL_CALLS]" + LLAMA + " and more",  # more after an object
                MISTRAL_V3 + MISTRAL_V3[:-1]):  # a second array cut off, as one array cut off
        assert read(bad) == (bad, [])


# A template that joins a call's arguments into the prompt as a string, as DeepSeek's do (Qwen's and Llama's write
# objects with `tojson`, which the server hands them).
JOINING = ("{% if tools %}Tools: {% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
           "{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
           "{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content or '' }}{% if m.tool_calls %}" + DS_CALLS +
           "{% for c in m.tool_calls %}{{ '" + DS_CALL + "' + c.function.name + '" + DS_SEP + "' + c.function.arguments"
           " + '" + DS_END + "' }}{% endfor %}" + DS_DONE + "{% endif %}<｜end▁of▁sentence｜>"
           "{% elif m.role == 'tool' %}<｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def test_a_template_that_joins_arguments_as_text_gets_them_as_text(api):
    import copy
    import types

    from server.protocol import chat_text

    tok = copy.copy(api.model.tokenizer)
    tok.chat_template, tok._template = JOINING, None
    spec = tool_mod.Tools([t["function"] for t in TOOLS], "auto")
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    text = chat_text(types.SimpleNamespace(tokenizer=tok, vision=None), history, spec)
    assert text.startswith("Tools: get_weather get_time <｜User｜>What is the weather in Paris?")
    assert f'{DS_CALL}get_weather{DS_SEP}{{"city": "Oslo", "unit": "celsius"}}{DS_END}' in text
    assert text.endswith("<｜tool▁output▁begin｜>18C<｜tool▁output▁end｜><｜Assistant｜>")
    assert tool_calls.extract(text[text.index(DS_CALLS):text.index(DS_DONE) + len(DS_DONE)], spec)[1]


# Mistral's templates take call ids of 9 characters (v0.3's and Small 3.1's refuse others) and write its v11 calls
MISTRAL_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}{% for m in messages %}"
    "{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]{% elif m.role == 'assistant' %}{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}{% if c.id is not defined or c.id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}{% endfor %}</s>"
    "{% elif m.role == 'tool' %}{% if m.tool_call_id | length != 9 %}{{ raise_exception('bad id') }}{% endif %}"
    "[TOOL_RESULTS]{{ m.tool_call_id }}[TOOL_CONTENT]{{ m.content }}[/TOOL_RESULTS]{% endif %}{% endfor %}")


KIMI_TEMPLATE = (
    "{% for m in messages %}<|im_{{ m.role }}|>{{ m.content or '' }}{% if m.tool_calls %}<|tool_calls_section_begin|>"
    "{% for c in m.tool_calls %}<|tool_call_begin|>{{ c.id }}<|tool_call_argument_begin|>{{ c.function.arguments | "
    "tojson }}<|tool_call_end|>{% endfor %}<|tool_calls_section_end|>{% endif %}<|im_end|>{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}")


def test_a_mistral_template_gets_nine_character_call_ids_and_its_marks_kept(api):
    """OpenAI's call ids (ours, `call_` and 24 more; Ollama's shorter ones) reach a Mistral template as 9 letters and
    digits, the same for a call and its result; a request with tools keeps special tokens in the reply, where
    [TOOL_CALLS] and [ARGS] are (and Kimi K2's marks, its template getting the model's own ids whole)."""
    import copy
    import hashlib

    from server.protocol import chat_text, parse

    model = copy.copy(api.model)
    model.tokenizer = copy.copy(api.model.tokenizer)
    model.tokenizer.chat_template, model.tokenizer._template = MISTRAL_TEMPLATE, None
    spec = tool_mod.Tools([t["function"] for t in TOOLS], "auto")
    call = tool_calls.new_call_id()
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call, "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}]},
               {"role": "tool", "tool_call_id": call, "content": "12:00"}]
    text = chat_text(model, history, spec)
    assert '[TOOL_CALLS]get_time[ARGS]{"timezone": "UTC"}</s>' in text
    named = hashlib.sha1(call.encode()).hexdigest()[:9]  # one name for the call and its result
    assert text.endswith(f"[TOOL_RESULTS]{named}[TOOL_CONTENT]12:00[/TOOL_RESULTS]")
    for sent, seen in (("call_1_0", hashlib.sha1(b"call_1_0").hexdigest()[:9]), ("a1B2c3D4e", "a1B2c3D4e")):
        history[1]["tool_calls"][0]["id"] = history[2]["tool_call_id"] = sent  # short (Ollama's), or Mistral's own
        assert chat_text(model, history, spec).endswith(f"[TOOL_RESULTS]{seen}[TOOL_CONTENT]12:00[/TOOL_RESULTS]")
    body = {"model": MODEL, "messages": history, "tools": TOOLS}
    assert parse(body, "chat", model).params.skip_special_tokens is False
    assert parse({**body, "tool_choice": "none"}, "chat", model).params.skip_special_tokens is True
    assert parse(body, "chat", api.model).params.skip_special_tokens is True  # another template: as asked
    model.tokenizer.chat_template, model.tokenizer._template = KIMI_TEMPLATE, None  # Kimi K2's: ids as they are
    history[1]["tool_calls"][0]["id"] = history[2]["tool_call_id"] = "functions.get_time:0"
    assert "<|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>" in chat_text(model, history, spec)
    assert parse(body, "chat", model).params.skip_special_tokens is False


STREAMED = [
    DS31, DS3, XML, LLAMA, PYTHONIC, GLM, PHI, MINIMAX, MISTRAL, MISTRAL_V3, SEED, KIMI, OLMO, GRANITE, SEED_TWO,
    UNCLOSED, "[get_time(timezone='a]b <tool_call> c')]", MISTRAL_V3 + MISTRAL_V3.replace("UTC", "CET"),
    MISTRAL_V3 + " [TOOL_CALLS] and more",
    "See [1] and [TOOL", '[{"name": "get_time", "arguments": {"timezone": "a <function_calls> or [TOOL_CALLS]"}}]',
    KIMI.replace('"UTC"', '"<|tool_call_begin|>"'), DS31.replace('"UTC"', f'"{DS_CALL}"'),
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "O\\"slo}", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>',
    '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}, {"name": "get_time", "arguments": '
    '{"timezone": "UTC+1"}}]',
    '{"name": "get_time", "arguments": {"timezone": "CET"}}',
    '{"arguments": {"timezone": "CET"}, "name": "get_time"}',
    "Plain text that mentions <tool and {braces}.", '{"not": "a call"}', '[1, 2]', "",
]


@settings(max_examples=150, deadline=None)
@given(text=st.sampled_from(STREAMED), cuts=st.lists(st.integers(0, 200), max_size=12),
       choice=st.sampled_from(["auto", "required"]))
def test_streamed_calls_assemble_to_the_parsed_ones_wherever_the_text_is_cut(text, cuts, choice):
    spec = tool_mod.Tools([t["function"] for t in TOOLS], choice)
    stream, content, calls, early = tool_calls.CallStream(spec), "", {}, 0
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [(text[a:b], None) for a, b in zip(bounds, bounds[1:])] + [("", "stop")]
    for piece, finish in pieces:
        c, deltas, _ = stream.feed(piece, finish)
        content += c
        early += len(deltas) if finish is None else 0
        for d in deltas:
            entry = calls.setdefault(d["index"], {"name": "", "arguments": "", "id": ""})
            entry["id"] += d.get("id", "")
            entry["name"] += d["function"].get("name", "")
            entry["arguments"] += d["function"]["arguments"]
    want_content, want = tool_calls.extract(text, spec)
    assert content == (want_content or "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (w["function"]["name"], w["function"]["arguments"]) for w in want]
    for c, w in zip(calls.values(), want):  # ours, or the model's own (Kimi's, Mistral v13's)
        assert c["id"] == w["id"] if not w["id"].startswith("call_") else c["id"].startswith("call_")
    if want and len(pieces) > 3 and not text.startswith(('{"arguments"', "[get_", "functools")):  # read at the end
        assert early > 0  # names and arguments went out before the end


def test_phis_word_is_held_until_it_is_a_call_or_text():
    spec = tool_mod.Tools([t["function"] for t in TOOLS], "auto")
    for text, calls in ((PHI, 1), ("functools is a Python module.", 0)):
        stream, content, deltas = tool_calls.CallStream(spec), "", []
        for k, ch in enumerate(text):
            c, d, _ = stream.feed(ch, "stop" if k == len(text) - 1 else None)
            content, deltas = content + c, deltas + d
        assert content == ("" if calls else text) and len([d for d in deltas if "id" in d]) == calls


def test_a_stream_never_takes_back_a_call_it_sent():
    """Headers went out, then the whole turned out not to parse (an extra brace; a list as a name): the stream ends
    with the calls it sent and does not repeat their text as content; nothing raises."""
    spec = tool_mod.Tools([t["function"] for t in TOOLS], "auto")
    for text in ['Checking. <tool_call>{"name": "get_time", "arguments": {"timezone": "UTC"}}}</tool_call>',
                 '{"name": ["get_time"], "arguments": {}}', "Checking. " + GRANITE[:-1],  # the array never closed
                 "Checking. [TOOL_CALLS]" + LLAMA + LLAMA]:
        stream, content, calls = tool_calls.CallStream(spec), "", []
        for i in range(0, len(text), 5):
            c, deltas, _ = stream.feed(text[i:i + 5], None)
            content, calls = content + c, calls + deltas
        c, deltas, has_calls = stream.feed("", "stop")
        content, calls = content + c, calls + deltas
        assert tool_calls.extract(text, spec)[1] == []
        assert bool(calls) == text.startswith("Checking.")  # the first sent a call's header, the second could not
        assert content == ("Checking." if calls else text)
        assert has_calls == bool(calls)


def test_a_conversation_with_a_tool_result(api, client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=24,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = api.model.tokenizer.decode(r.model_extra["prompt_token_ids"])
    assert "18 degrees and sunny" in prompt and call.function.name in prompt


def test_streamed_tool_call_deltas_assemble(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=1.0, seed=2, max_tokens=120, stream=True)
    calls, finish, chunks = {}, None, 0
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
                chunks += 1
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and calls
    assert chunks > 2 * len(calls)  # the arguments arrived in pieces
    for entry in calls.values():
        jsonschema.validate(json.loads(entry["arguments"]), PARAMS[entry["name"]])


# The model is made to write each family's format by a regex (tool_choice stays `auto`, so nothing but the parser
# turns the text into calls); the text arrives as the server detokenizes it, split wherever its tokens fall.
WRITTEN = {
    "deepseek_v3.1": (f"Let me check\\.{DS_CALLS}{DS_CALL}get_weather{DS_SEP}\\{{\"city\": \"[A-Z][a-z]{{2,8}}\", "
                      f"\"unit\": \"(celsius|fahrenheit)\"\\}}{DS_END}{DS_DONE}"),
    "qwen3_coder": ("<tool_call>\n<function=get_time>\n<parameter=timezone>\n(UTC|CET|[A-Z][a-z]{3,8})\n</parameter>\n"
                    "</function>\n</tool_call>"),
    "mistral": '\\[TOOL_CALLS\\]get_time\\[ARGS\\]\\{"timezone": "(UTC|CET|[A-Z][a-z]{3,8})"\\}',
    "kimi_k2": ("<\\|tool_calls_section_begin\\|><\\|tool_call_begin\\|>functions\\.get_time:0"
                "<\\|tool_call_argument_begin\\|>\\{\"timezone\": \"(UTC|CET|[A-Z][a-z]{3,8})\"\\}<\\|tool_call_end\\|>"
                "<\\|tool_calls_section_end\\|>"),
    "olmo3": '<function_calls>\nget_time\\(timezone="(UTC|CET|[A-Z][a-z]{3,8})"\\)\n</function_calls>',
    "seed_oss": ("<seed:tool_call>\n<function=get_time>\n<parameter=timezone>(UTC|CET|[A-Z][a-z]{3,8})</parameter>\n"
                 "</function>\n</seed:tool_call>"),
    "minimax_m2": ('<minimax:tool_call>\n<invoke name="get_time">\n<parameter name="timezone">(UTC|CET|[A-Z][a-z]{3,8})'
                   "</parameter>\n</invoke>\n</minimax:tool_call>"),
}


@pytest.mark.parametrize("form", sorted(WRITTEN))
def test_a_familys_format_written_by_the_model_comes_back_as_calls(client, form):
    body = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=3, max_tokens=120,
                extra_body={"structured_outputs": {"regex": WRITTEN[form]}})
    r = client.chat.completions.create(**body)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message)
    assert r.choices[0].message.content == ("Let me check." if form.startswith("deepseek") else None)
    _, content, calls, finish = stream_chat(client, **body)
    assert finish == "tool_calls" and content == (r.choices[0].message.content or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls]


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),  # 128 at most
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools"),
    ({"tools": [*TOOLS, {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "("}}}}}], "tool_choice": "required"}, "tools"),
])
def test_bad_tools_are_400_then_service_goes_on(client, body, param):
    """A function whose parameters llguidance cannot use is refused whatever the tool_choice (it named
    `response_format` when forced, and passed under `auto`)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).usage.completion_tokens >= 1


def test_schema_keywords_a_forced_call_cannot_enforce_are_fine_under_auto(client):
    """`uniqueItems` (common in MCP tools) is a valid schema keyword llguidance cannot enforce: under `auto`, or with
    another tool forced, the tool is served; forcing a call to it is a 400 naming the tools."""
    tags = [{"type": "function", "function": {"name": "tag", "parameters": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}}]
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, tools=tags)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, tools=tags, tool_choice="required")
    assert e.value.body["param"] == "tools" and "uniqueItems" in e.value.message
    # another function named: this one's calls are not constrained, so it is lenient there (Claude Code's tool list
    # forced to Bash); a record's `propertyNames: {type: string}` (zod's) says nothing JSON's keys do not
    record = {"type": "object", "properties": {"meta": {"type": "object", "propertyNames": {"type": "string"},
                                                         "additionalProperties": {"type": "integer"}}}}
    both = [*tags, {"type": "function", "function": {"name": "note", "parameters": record}}]
    for name in ("note", "tag"):
        ask = dict(model=MODEL, messages=ASK, max_tokens=60, tools=both, temperature=0,
                   tool_choice={"type": "function", "function": {"name": name}})
        if name == "tag":
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(**ask)
            continue
        call = client.chat.completions.create(**ask).choices[0].message.tool_calls[0]
        assert call.function.name == "note" and isinstance(json.loads(call.function.arguments), dict)


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("history", [
    [{"role": "tool", "tool_call_id": "call_1", "content": "18C"}],  # answers nothing
    [{"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "call_9",
                                                                     "content": "18C"}],  # answers another id
    [{"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": None}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}],
    [{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}],
    [{"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": ["call_1"],
                                                                     "content": "18C"}],  # was a 500
])
def test_a_malformed_tool_history_is_400(client, history):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[*ASK, *history], max_tokens=2, tools=TOOLS)
    assert e.value.body["param"] == "messages" and "tool" in e.value.message
    ok = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
          {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    assert client.chat.completions.create(model=MODEL, messages=ok, tools=TOOLS, max_tokens=2).usage.prompt_tokens


@pytest.mark.optional
def test_qwen_template_tools_auto_call_and_plain_answer():
    """Qwen2.5-Coder's own template: tools go in as `tools=`, `auto` yields `<tool_call>` blocks when it calls."""
    from conftest import live_server
    from engine.runner import RunnerConfig
    from models import load_model

    model = load_model("qwen2.5-coder-0.5b-instruct")
    assert tool_mod.template_knows_tools(model.tokenizer)
    for api in live_server(model, RunnerConfig(max_num_seqs=4, max_model_len=1024, kv_cache_gb=0.5)):
        client = openai.OpenAI(base_url=api.url + "/v1", api_key="none", max_retries=0, timeout=300)
        name = model.name
        r = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80)
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message, {"get_weather"})
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say hello."}],
                                           tools=TOOLS, temperature=0, max_tokens=24)
        assert not r.choices[0].message.tool_calls and r.choices[0].message.content
        r = client.chat.completions.create(model=name, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=1, max_tokens=80)
        _check_calls(r.choices[0].message)


SQL = 'start: "SELECT " COL " FROM " TABLE ";"\nCOL: "name" | "age" | "*"\nTABLE: "users" | "orders"\n'
SQL_TEXT = r"SELECT (name|age|\*) FROM (users|orders);"
APPLY_PATCH = r"""start: begin_patch hunk+ end_patch
begin_patch: "*** Begin Patch" LF
end_patch: "*** End Patch" LF?
hunk: add_hunk | delete_hunk | update_hunk
add_hunk: "*** Add File: " filename LF add_line+
delete_hunk: "*** Delete File: " filename LF
update_hunk: "*** Update File: " filename LF change_move? change?
filename: /(.+)/
add_line: "+" /(.*)/ LF -> line
change_move: "*** Move to: " filename LF
change: (change_context | change_line)+ eof_line?
change_context: ("@@" | "@@ " /(.+)/) LF
change_line: ("+" | "-" | " ") /(.*)/ LF
eof_line: "*** End of File" LF
%import common.LF
"""
LARK = {"type": "grammar", "grammar": {"syntax": "lark", "definition": SQL}}
CUSTOM = [{"type": "custom", "custom": {"name": "sql", "description": "Runs one SQL query.", "format": LARK}},
          {"type": "custom", "custom": {"name": "phone", "format": {"type": "grammar", "grammar": {
              "syntax": "regex", "definition": r"\d{3}-\d{4}"}}}},
          {"type": "custom", "custom": {"name": "note"}}, TOOLS[1]]


def test_custom_tools_take_their_input_in_their_grammar(api, client):
    """OpenAI's custom tools: a named one's whole turn is its input, in its Lark or regex grammar (or free text),
    returned as a `custom` call, whole or streamed, on chat and on Responses (`custom_tool_call` items and their input
    events); under `auto` the model's call to the function the template shows for it comes back as a custom call; a
    call and its result are read back into the prompt; a grammar llguidance refuses is a 400."""
    import re

    for name, pattern in (("sql", SQL_TEXT), ("phone", r"\d{3}-\d{4}"), ("note", r"(?s).+")):
        ask = dict(model=MODEL, messages=[{"role": "user", "content": "Who are our users?"}], tools=CUSTOM,
                   tool_choice={"type": "custom", "custom": {"name": name}}, temperature=1.0, seed=1, max_tokens=24)
        r = client.chat.completions.create(**ask)
        msg = r.choices[0].message
        call = msg.tool_calls[0]
        assert (call.type, call.custom.name, msg.content) == ("custom", name, None) and call.id.startswith("call_")
        assert re.fullmatch(pattern, call.custom.input), call.custom.input
        assert r.choices[0].finish_reason in (("tool_calls",) if name != "note" else ("tool_calls", "length"))
        deltas = [d for chunk in client.chat.completions.create(**ask, stream=True) for c in chunk.choices
                  for d in c.delta.tool_calls or []]
        assert [(d.type, d.model_extra["custom"]) for d in deltas] == [("custom", call.custom.model_dump())]
    # Responses: flat tools, custom_tool_call items and events
    flat = [{"type": "custom", "name": "sql", "description": "Runs one SQL query.",
             "format": {"type": "grammar", "syntax": "lark", "definition": SQL}}, {"type": "function",
                                                                                   **TOOLS[1]["function"]}]
    ask = dict(model=MODEL, input="Who are our users?", tools=flat, tool_choice={"type": "custom", "name": "sql"},
               temperature=0, max_output_tokens=24)
    r = client.responses.create(**ask)
    call = r.output[0]
    assert (call.type, call.name, call.status) == ("custom_tool_call", "sql", "completed")
    assert re.fullmatch(SQL_TEXT, call.input) and call.id.startswith("ctc_") and call.call_id.startswith("call_")
    with client.responses.stream(**ask) as s:
        kinds = [(e.type, getattr(e, "delta", None) or getattr(e, "input", None)) for e in s]
    assert ("response.custom_tool_call_input.delta", call.input) in kinds
    assert ("response.custom_tool_call_input.done", call.input) in kinds
    follow = [{"role": "user", "content": "Who are our users?"}, call.model_dump(exclude_none=True),
              {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Ada, Grace"}]
    r2 = client.responses.create(model=MODEL, input=follow, tools=flat, max_output_tokens=4)
    assert r2.usage.input_tokens > r.usage.input_tokens
    # chat: the call and its result are read back into the prompt
    history = [*ask_messages("Who are our users?"), msg.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "Ada, Grace"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=CUSTOM, max_tokens=2,
                                       extra_body={"return_token_ids": True})
    prompt = api.model.tokenizer.decode(r.model_extra["prompt_token_ids"])
    assert "Ada, Grace" in prompt and msg.tool_calls[0].custom.input in prompt and "lark grammar" in prompt
    # auto: the fallback's JSON call to `sql`, written by the model (a regex makes it), is a custom call
    written = r'\[\{"name": "sql", "arguments": \{"input": "SELECT \* FROM users;"\}\}\]'
    r = client.chat.completions.create(model=MODEL, messages=ask_messages("Users?"), tools=CUSTOM, max_tokens=60,
                                       extra_body={"structured_outputs": {"regex": written}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.type, c.custom.name, c.custom.input) for c in r.choices[0].message.tool_calls] == [
        ("custom", "sql", "SELECT * FROM users;")]
    patch = {"type": "grammar", "grammar": {"syntax": "lark", "definition": APPLY_PATCH}}  # Codex's, with %import
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, tools=[
        {"type": "custom", "custom": {"name": "apply_patch", "format": patch}}], tool_choice={
        "type": "custom", "custom": {"name": "apply_patch"}})
    assert r.choices[0].message.tool_calls[0].custom.input.startswith("*** Begin Patch\n")
    for fmt in ({"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: ("}},
                {"type": "grammar", "grammar": {"syntax": "regex", "definition": "("}},
                {"type": "grammar", "grammar": {"syntax": "ebnf", "definition": "x"}}, {"type": "bogus"}):
        for choice in ("auto", {"type": "custom", "custom": {"name": "bad"}}):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, tool_choice=choice, tools=[
                    {"type": "custom", "custom": {"name": "bad", "format": fmt}}])
            assert e.value.body["param"] in ("tools", "tool_choice"), e.value.body


def ask_messages(text: str) -> list[dict]:
    """One user message."""
    return [{"role": "user", "content": text}]


def test_messages_blocks_keep_the_models_own_call_ids():
    """Anthropic's `tool_use` blocks: our call ids as `toolu_...`, Kimi's own `functions.NAME:IDX` as it is (its
    template writes it back, and the model goes on counting)."""
    from types import SimpleNamespace

    from server.anthropic_messages import Blocks
    from server.turn import Turn

    spec = tool_mod.Tools([t["function"] for t in TOOLS], "auto")
    for text, kimi in ((KIMI, True), (GRANITE, False)):
        turn, blocks = Turn(SimpleNamespace(tools=spec, thinking=None)), Blocks()
        for k in range(0, len(text), 9):
            blocks.add(turn.feed(text[k:k + 9]))
        blocks.add(turn.feed("", "stop"))
        blocks.finish()
        ids = [b["id"] for b in blocks.blocks if b["type"] == "tool_use"]
        assert len(ids) == 2 and all(i.startswith("functions." if kimi else "toolu_") for i in ids)
        if kimi:
            assert ids == ["functions.get_weather:0", "functions.get_time:1"]


def test_custom_and_function_calls_stream_in_order_and_a_tool_called_auto_is_not_a_choice():
    """A reply that calls a custom tool, then a function, sends their deltas in index order (the openai client's
    stream accumulator needs it), the same calls as the whole reply; a custom tool named "auto" or "required" is
    only a tool, and `tool_choice` must name a tool as what it is."""
    from types import SimpleNamespace

    from openai.lib.streaming._deltas import accumulate_delta

    from server.turn import Turn

    def parse(body):
        return tool_mod.parse(body, lambda message, param: ValueError(param))

    spec = parse({"tools": CUSTOM})
    text = ('[{"name": "note", "arguments": {"input": "hi"}}, {"name": "get_time", "arguments": {"timezone": '
            '"UTC"}}]')
    for cuts in ([], list(range(0, len(text), 7))):
        turn, seen, acc = Turn(SimpleNamespace(tools=spec, thinking=None)), [], {}
        bounds = [0, *cuts[1:], len(text)]
        for piece, finish in [(text[a:b], None) for a, b in zip(bounds, bounds[1:])] + [("", "stop")]:
            for d in turn.feed(piece, finish).calls:
                seen.append(d["index"])
                acc = accumulate_delta(acc, {"tool_calls": [d]})
        assert seen == sorted(seen) and turn.finish == "tool_calls"
        calls = acc["tool_calls"]
        assert [(c["type"], c.get("custom"), c.get("function")) for c in calls] == [
            ("custom", {"name": "note", "input": "hi"}, None),
            ("function", None, {"name": "get_time", "arguments": '{"timezone": "UTC"}'})]
        assert turn.openai_calls() == [{k: c[k] for k in ("id", "type", c["type"])} for c in calls]
    named_auto = [{"type": "custom", "custom": {"name": "auto"}}, {"type": "custom", "custom": {"name": "required"}}]
    for choice in ("auto", "required"):
        t = parse({"tools": named_auto, "tool_choice": choice})
        assert t.raw is None and t.forced == (choice == "required") and t.called() == t.functions
    assert parse({"tools": named_auto, "tool_choice": {"type": "custom", "custom": {"name": "auto"}}}).raw["name"] \
        == "auto"
    for choice, param in (({"type": "function", "function": {"name": "note"}}, "tool_choice"),
                          ({"type": "custom", "custom": {"name": "get_time"}}, "tool_choice")):
        with pytest.raises(ValueError, match=param):
            parse({"tools": CUSTOM, "tool_choice": choice})
    with pytest.raises(ValueError, match="tools"):
        parse({"tools": [{"type": "custom", "custom": {"name": "n", "description": 5}}]})
