"""Structured output through the official openai client on a live server: every response_format shape, judged by
`jsonschema` (a real validator), GBNF, streams, completions, a mixed batch, and bad formats."""

import json
import re

import jsonschema
import openai
import pytest

from engine import SamplingParams
from engine.grammar import grammar_text, schema_grammar
from helpers import recording

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, an age and a favourite colour."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120},
                         "colour": {"enum": ["red", "green", "blue"]}}}
GBNF = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z]{1,12}'


def _valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},  # OpenAI
    {"type": "json_schema", "json_schema": PERSON},  # Fireworks: the schema itself
    {"type": "json_object", "schema": PERSON},  # Fireworks' json_object with a schema
], ids=["openai", "fireworks-json-schema", "fireworks-json-object"])
def test_json_schema_outputs_always_validate(client, fmt):
    for seed in (0, 1):
        r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed, n=3, max_tokens=80,
                                           response_format=fmt)
        for c in r.choices:
            assert c.finish_reason == "stop", c.message.content
            _valid(c.message.content, PERSON)


def test_a_grammar_holds_under_top_k(client):
    """top_k past what the mask leaves (five tokens begin "yes" or "no"), with no top_p to cut the excluded ones
    first, keeps the allowed tokens alone (it drew token 0, an end of text, for every choice)."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, top_p=1.0, seed=4, n=3,
                                       max_tokens=40, response_format={"type": "grammar", "grammar": GBNF},
                                       extra_body={"top_k": 40})
    for c in r.choices:
        assert re.fullmatch(r"(yes|no) because [a-z]{1,12}", c.message.content), c.message.content
        assert c.finish_reason == "stop"


def test_json_object_parses(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=200,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_object_closes_within_a_tight_budget(client):
    """With the budget nearly spent the mask steers to closing tokens: sampled JSON still parses; "length" says the
    budget ended it."""
    reasons = set()
    for seed in (0, 1, 2):
        r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed, n=3, max_tokens=30,
                                           response_format={"type": "json_object"})
        for c in r.choices:
            assert isinstance(json.loads(c.message.content), dict), c.message.content
            reasons.add(c.finish_reason)
    assert "length" in reasons and reasons <= {"stop", "length"}


def test_closing_leaves_out_whitespace_where_no_closer_is_allowed_yet(llm):
    """Near the budget's end a JSON reply is steered to close; where the grammar allows no closer yet (after a key:
    a colon must come), the mask also leaves out tokens of whitespace alone, which would only spend the budget."""
    import numpy as np

    eng = llm.engine
    m = eng.grammars().matcher(grammar_text({"type": "json_object"}))
    for t in eng.tok.encode('{"key"'):
        m.advance(t)

    def allowed(closing: bool) -> set[int]:
        row = np.full(eng.runner.all_allowed.shape[1], -1, np.int32)
        m.fill(row, closing)
        return set(np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")).tolist())

    free, near_end = allowed(False), allowed(True)
    blank = {t for t in free if not eng.tok.decode([t]).strip()}
    colon = {t for t in free if eng.tok.decode([t]).strip().startswith(":")}
    assert blank and colon and m.closed and near_end == free - blank and colon <= near_end


def test_gbnf_grammar(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=3, n=3, max_tokens=40,
                                       response_format={"type": "grammar", "grammar": GBNF})
    for c in r.choices:
        assert re.fullmatch(r"(yes|no) because [a-z]{1,12}", c.message.content), c.message.content
        assert c.finish_reason == "stop"


def test_completions_and_streams(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.completions.create(model=MODEL, prompt="A person as JSON:", temperature=1.0, seed=5, max_tokens=80,
                                  extra_body={"response_format": fmt})
    _valid(r.choices[0].text, PERSON)
    whole = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=7, max_tokens=80,
                                           response_format=fmt)
    parts = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=7, max_tokens=80,
                                           response_format=fmt, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices)
    assert text == whole.choices[0].message.content
    _valid(text, PERSON)


def test_free_greedy_output_is_unchanged_beside_constrained_ones(llm):
    eng = llm.engine
    prompt = eng.tok.encode("The capital of France is")
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = eng.make_request(prompt, free)
    eng.add(alone)
    while eng.has_work():
        eng.step()
    grammar = grammar_text({"type": "json_schema", "json_schema": PERSON})
    mixed = eng.make_request(prompt, free)
    others = [eng.make_request(eng.tok.encode("A person as JSON:"),
                               SamplingParams(temperature=1.0, seed=i, max_tokens=60), grammar=grammar)
              for i in range(3)]
    for r in [others[0], mixed, *others[1:]]:
        eng.add(r)
    while eng.has_work():
        eng.step()
    assert mixed.choices[0].token_ids == alone.choices[0].token_ids
    for r in others:
        _valid(r.choices[0].text, PERSON)


def test_constrained_steps_fill_masks_while_the_forward_pass_runs(llm):
    """A batch with constrained rows dispatches each step's forward pass before reading the last tokens back, fills
    the masks meanwhile and draws under them; the tokens (sampled, with logprobs) equal those of the engine that
    reads every draw back first, each constrained reply validates, and the free rows run full decodes again once the
    constrained ones end."""
    eng, runner = llm.engine, llm.engine.runner
    grammar = grammar_text({"type": "json_schema", "json_schema": PERSON})
    got, ahead = {}, {}
    with recording(runner, ("decode", "decode_logits", "draw")) as calls:
        try:
            for overlap in (True, False):
                eng.overlap, before = overlap, eng.ahead
                calls.clear()
                reqs = [eng.make_request(eng.tok.encode("A person as JSON:"),
                                         SamplingParams(temperature=1.0, seed=i, max_tokens=60, logprobs=True),
                                         grammar=grammar, prompt_cache_max_len=0) for i in range(3)]
                # no cached prefix in either run: the same logits
                reqs += [eng.make_request(eng.tok.encode("The capital of France is"),
                                          SamplingParams(temperature=0.8, seed=9, max_tokens=70, ignore_eos=True),
                                          prompt_cache_max_len=0)]
                for r in reqs:
                    eng.add(r)
                while eng.has_work():
                    eng.step()
                got[overlap] = [(r.choices[0].token_ids, [lp for _, lp, _ in r.choices[0].logprobs or []])
                                for r in reqs]
                ahead[overlap] = eng.ahead - before
                for r in reqs[:3]:
                    _valid(r.choices[0].text, PERSON)
                if overlap:
                    seen = [name if name != "decode" else (name, args[4]) for name, args in calls]
        finally:
            eng.overlap = True
    assert [t for t, _ in got[True]] == [t for t, _ in got[False]]
    for (_, a), (_, b) in zip(got[True], got[False]):
        assert a == pytest.approx(b, abs=1e-5)
    assert ahead[True] >= 10 and ahead[False] == 0  # forward passes dispatched before the last tokens were read
    longest = max(len(t) for t, _ in got[True][:3])
    assert seen.count("decode_logits") >= longest - 2 and ("decode", runner.rc.decode_steps) in seen, seen


def test_constrained_streams_do_not_ride_the_flat_step_and_keep_their_grammar(smollm_f32):
    """A constrained stream's mask depends on its last token, which a rider's draw would take before it is read
    back: while one runs, the flat step carries the prompt chunks alone and the streams decode in masked steps
    (forward pass, masks, draw). Greedy JSON replies beside a long prompt prefilled in chunks parse and equal those
    of the engine without the flat step (float32: the two prefills' logits agree to ~1e-5)."""
    from engine import Engine, RunnerConfig

    grammar = grammar_text({"type": "json_object"})
    outs = {}
    for flat in (False, True):
        eng = Engine(smollm_f32, RunnerConfig(max_num_seqs=4, max_model_len=1024, kv_cache_gb=0.1,
                                              decode_batch_sizes=(4,), flat_step=flat))
        reqs = [eng.make_request(eng.tok.encode(f"Person {i} as a JSON object:"),
                                 SamplingParams(temperature=0, max_tokens=40), grammar=grammar) for i in range(2)]
        for r in reqs:
            eng.add(r)
        eng.step()
        eng.step()
        eng.add(eng.make_request(list(range(1000, 1700)), SamplingParams(temperature=0, max_tokens=2)))
        rode = 0
        while eng.has_work():
            eng.step()
            rode += len(eng.riders)
        assert rode == 0 and (eng.runner._flat.calls >= 2) == flat
        for r in reqs:
            assert isinstance(json.loads(r.choices[0].text), dict), r.choices[0].text
        outs[flat] = [r.choices[0].token_ids for r in reqs]
    assert outs[True] == outs[False]


@pytest.mark.parametrize("fmt,needle", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}, "type must be a string"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": []}}},
     "properties must be an object"),
    ({"type": "grammar", "grammar": "root ::= ( \"a\""}, "grammar"),
    ({"type": "grammar"}, "grammar"),
    ({"type": "grammar", "grammar": "root ::= a\na ::= a \"x\""}, "no text matches it"),  # no base case
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/a", "$defs": {
        "a": {"$ref": "#/$defs/a"}}}}}, "no text matches it"),
    ({"type": "xml"}, "unknown response_format type"),
    ("json", "response_format"),
    ({"type": "json_schema", "json_schema": {"name": 5, "schema": {}}}, "'name' must be a string"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": 1}}, "'strict' a boolean"),
])
def test_bad_formats_are_400_then_service_goes_on(client, fmt, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, response_format=fmt)
    assert e.value.status_code == 400 and e.value.body["param"] == "response_format"
    assert needle in e.value.body["message"]
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).usage.completion_tokens >= 1


def ref_chain(n: int) -> dict:
    """A schema whose value nests `n` levels through `$ref`s in `anyOf`s: a flat body, a deep grammar."""
    defs = {f"a{i}": {"type": "object", "properties": {"x": {"anyOf": [{"$ref": f"#/$defs/a{i + 1}"},
                                                                        {"type": "null"}]}}} for i in range(n)}
    return {"type": "object", "properties": {"v": {"$ref": "#/$defs/a0"}}, "$defs": {**defs, f"a{n}": {"type": "null"}}}


PHONE = r"[0-9]{3}-[0-9]{4}"
LARK_YES_NO = 'start: ("yes" | "no") " because " /[a-z]{1,12}/'


@pytest.mark.parametrize("extra,judge", [
    ({"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},  # vLLM
     lambda t: t in ("positive", "negative", "neutral")),
    ({"guided_choice": ["Paris", "Lyon", "Zürich"]}, lambda t: t in ("Paris", "Lyon", "Zürich")),  # vLLM, older
    ({"structured_outputs": {"regex": PHONE}}, lambda t: re.fullmatch(PHONE, t)),
    ({"regex": PHONE}, lambda t: re.fullmatch(PHONE, t)),  # SGLang
    ({"structured_outputs": {"json": PERSON}}, lambda t: _valid(t, PERSON) is None),
    ({"guided_json": json.dumps(PERSON)}, lambda t: _valid(t, PERSON) is None),  # vLLM, older: JSON text
    ({"json_schema": json.dumps(PERSON)}, lambda t: _valid(t, PERSON) is None),  # SGLang: JSON text
    ({"json_schema": PERSON}, lambda t: _valid(t, PERSON) is None),  # llama.cpp: an object
    ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict)),
    ({"grammar": GBNF}, lambda t: re.fullmatch(r"(yes|no) because [a-z]{1,12}", t)),  # llama.cpp: GBNF
    ({"ebnf": GBNF}, lambda t: re.fullmatch(r"(yes|no) because [a-z]{1,12}", t)),  # SGLang
    ({"structured_outputs": {"grammar": LARK_YES_NO}}, lambda t: re.fullmatch(r"(yes|no) because [a-z]{1,12}", t)),
], ids=["vllm-choice", "vllm-guided-choice", "vllm-regex", "sglang-regex", "vllm-json", "vllm-guided-json",
        "sglang-json-schema", "llamacpp-json-schema", "vllm-json-object", "llamacpp-grammar", "sglang-ebnf",
        "vllm-lark"])
def test_other_servers_fields_for_structured_output_constrain_the_reply(client, extra, judge):
    """vLLM's `structured_outputs` (and its older `guided_*`), SGLang's `regex` / `json_schema` / `ebnf` and
    llama.cpp's `grammar` / `json_schema` constrain chat and completions as `response_format` does (they used to be
    ignored): every sampled reply passes its judge (`jsonschema` for JSON)."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=5, n=2, max_tokens=80,
                                       extra_body=extra)
    for c in r.choices:
        assert c.finish_reason == "stop" and judge(c.message.content), c.message.content
    r = client.completions.create(model=MODEL, prompt="Answer:", temperature=1.0, seed=6, max_tokens=80,
                                  extra_body=extra)
    assert r.choices[0].finish_reason == "stop" and judge(r.choices[0].text), r.choices[0].text


@pytest.mark.parametrize("extra,param", [
    ({"guided_json": PERSON, "response_format": {"type": "json_object"}}, "guided_json"),
    ({"regex": PHONE, "guided_choice": ["a"]}, "regex"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    ({"guided_regex": "[0-9]+\\"}, "guided_regex"),  # a lone backslash at the end: llguidance would drop it
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"structural_tag": "[" * 100_000}}, "structured_outputs.structural_tag"),  # too deep
    ({"json_schema": '{"a":' * 100_000}, "json_schema"),  # SGLang's JSON text, nested past Python's stack
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"structured_outputs": {"json": PERSON}, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
])
def test_other_servers_fields_for_structured_output_refuse_bad_or_conflicting_input(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body


def test_a_structural_tag_constrains_what_follows_its_trigger(client):
    """xgrammar's structural tag (vLLM's `structured_outputs.structural_tag`, SGLang's `response_format` of type
    `structural_tag`): text is free until a trigger is written; then the structure's begin, JSON its schema accepts
    and its end follow. The greedy answer starts "The capital of France is Paris."; with a tag triggered by "The" it
    is "The answer: " and a JSON object the schema validates instead."""
    import jsonschema

    france = [{"role": "user", "content": "What is the capital of France?"}]
    free = client.chat.completions.create(model=MODEL, messages=france, max_tokens=16, temperature=0)
    assert free.choices[0].message.content.startswith("The capital")  # the premise: the answer starts with the trigger
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
            "additionalProperties": False}
    tag = {"structures": [{"begin": "The answer: ", "schema": city, "end": " Done."}], "triggers": ["The"]}
    for kw in ({"response_format": {"type": "structural_tag", **tag}},
               {"extra_body": {"structured_outputs": {"structural_tag": json.dumps(tag)}}}):
        text = client.chat.completions.create(model=MODEL, messages=france, max_tokens=48, temperature=0,
                                              **kw).choices[0].message.content
        assert text.startswith("The answer: ") and " Done." in text, text
        jsonschema.validate(json.loads(text[len("The answer: "):text.index(" Done.")]), city)
    bad = {"structures": [{"begin": "Answer: ", "schema": city, "end": ""}], "triggers": ["The"]}  # no trigger
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=france, max_tokens=4,
                                       response_format={"type": "structural_tag", **bad})
    assert e.value.body["param"] == "response_format" and "trigger" in e.value.body["message"]


def test_a_grammar_that_fails_while_generating_is_a_400_or_an_error_event_not_a_stop(api, client):
    """A grammar can pass the check and still trip one of llguidance's limits at a token (`"a"{1000000}`: "Too many
    items" once one `a` is drawn). The check draws a few tokens along the grammar, so such a grammar alone is a 400
    before anything runs; one whose first path is fine (`"!"`) fails only when the model takes the other (`a`, made
    likely here by a logit bias). The choice used to end with finish_reason "stop" and text the grammar does not
    match; now the call says how the grammar failed: a 400 whole, an error event streaming (after the text so far). The
    slots come back and the server goes on."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, response_format={
            "type": "grammar", "grammar": 'root ::= "a"{1000000}'})
    assert e.value.body["param"] == "response_format" and "once text is drawn" in e.value.body["message"]
    fmt = {"type": "grammar", "grammar": 'root ::= "!" | "a"{1000000}'}
    bias = {str(t): 100 for t in api.model.tokenizer.convert_tokens_to_ids(["a", "aa", "aaaa"])}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, response_format=fmt, logit_bias=bias)
    assert e.value.body["code"] == "grammar_failed" and "Too many items" in e.value.body["message"]
    assert e.value.body["param"] == "response_format"
    got = []
    with pytest.raises(openai.APIError, match="Too many items"):
        for chunk in client.completions.create(model=MODEL, prompt="a", max_tokens=8, stream=True, logit_bias=bias,
                                               extra_body={"response_format": fmt}):
            got += [c.text for c in chunk.choices]
    assert "".join(got).strip("a") == ""  # the text so far came first
    assert api.engine.stats()["free_slots"] == api.engine.runner.slots
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, response_format={
        "type": "grammar", "grammar": GBNF}, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_grammar_that_crashes_the_compiler_is_a_400_and_the_server_lives(api, client):
    """1,000 levels of `$ref` (~100 KB) overflow llguidance's native stack: it killed the server. The check now runs
    in the sandbox's child: a 400 as a response_format and as a tool, then the server answers, and a chain 50 deep,
    which passes the child's small stack, is served by the engine thread's larger one."""
    for kw in ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ref_chain(1000)}}},
               {"tools": [{"type": "function", "function": {"name": "f", "parameters": ref_chain(1000)}}]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kw)
        assert "stack" in e.value.body["message"] and e.value.body["param"] in ("response_format", "tools")
        assert api.engine.grammars().sandbox.proc is None  # the child died with it
        with pytest.raises(openai.BadRequestError):  # refused again from the cache: no child started to crash
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kw)
        assert api.engine.grammars().sandbox.proc is None
    schema = ref_chain(50)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=300, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"  # the JSON closes within the budget (closing steers it there)
    _valid(r.choices[0].message.content, schema)


def test_the_sandbox_times_out_starts_again_and_sheds_a_queue():
    from engine.grammar_sandbox import Busy, Sandbox

    chain = "root ::= r0\n" + "".join(f'r{i} ::= "k{i}" r{i + 1} | "x"\n' for i in range(3000)) + 'r3000 ::= "e"\n'
    box = Sandbox(timeout=0.2)
    assert box.gbnf(chain) == (None, "it took more than 0.2 s to compile")  # ~4 s: GBNF's conversion is quadratic
    grammar, err = box.gbnf('root ::= "yes" | "no"')
    assert err is None and "yes" in grammar
    assert box.gbnf("root ::= (")[1]
    with box.lock:  # another request's grammar compiling for longer than the timeout: this one is turned away
        with pytest.raises(Busy):
            box.gbnf('root ::= "a"')
    assert box.gbnf('root ::= "a"')[1] is None
    box.close()


def test_closing_the_engine_stops_its_grammar_sandbox_and_a_later_grammar_starts_another(llm):
    """`Engine.close` (the server's shutdown, through `AsyncEngine.close`) ends the sandbox's child process rather
    than leaving it to the end of the process; a grammar checked afterwards starts a new child."""
    grammars = llm.engine.grammars()
    grammars.check(schema_grammar({"type": "object", "properties": {"closing": {"type": "integer"}}}))
    child = grammars.sandbox.proc
    assert child is not None and child.poll() is None
    llm.engine.close()
    assert child.poll() is not None and grammars.sandbox.proc is None
    grammars.check(schema_grammar({"type": "object", "properties": {"reopened": {"type": "boolean"}}}))
    assert grammars.sandbox.proc is not None and grammars.sandbox.proc.poll() is None
