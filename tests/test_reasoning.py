"""Reasoning output: the `<think>` splitter on streams cut anywhere (hypothesis), and a small random Qwen3 whose chat
template opens a thinking block, served live: reasoning_content in chat, a reasoning item in Responses, a thinking
block in Messages, the token budget the engine enforces, and earlier thinking sent back to the template."""

import dataclasses

import anthropic
import openai
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from server import reasoning
from server.reasoning import CLOSE, OPEN, Splitter

NAME = "tiny-thinker"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>\n"
            "{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content or '' }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
            "not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")


# ---- the splitter ----------------------------------------------------------------------------------------------

def reference(text: str, opened: bool, tags: tuple[str, str] = (OPEN, CLOSE)) -> tuple[str, str]:
    """The split written out plainly: the block (opened by the prompt, or by the text's first non-blank
    characters) up to its close is the reasoning, the rest the answer; blanks around both are dropped."""
    OPEN, CLOSE = tags  # noqa: N806
    if not opened:
        head = text.lstrip()
        if not head.startswith(OPEN):
            return "", text
        text = head[len(OPEN):]
    if CLOSE not in text:
        return text.strip(), ""
    thought, answer = text.split(CLOSE, 1)
    return thought.strip(), answer.lstrip()


PIECES = st.sampled_from([OPEN, CLOSE, *reasoning.SEED, *reasoning.MISTRAL, "<", "</", "<th", "</thi", "think>",
                          "<seed:", "</seed:t", "[", "[/TH", ">", " ", "\n", "a", "b c", "é", "x\n"])


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(parts=st.lists(PIECES, max_size=14), cuts=st.lists(st.integers(0, 80), max_size=8), opened=st.booleans(),
       form=st.sampled_from(sorted(reasoning.TAGS)))
def test_a_stream_cut_anywhere_splits_like_the_whole_text(parts, cuts, opened, form):
    """`<think>` blocks, and Seed-OSS's `<seed:think>` ones (each form's tags, the other's as text)."""
    text, tags = "".join(parts), reasoning.TAGS[form]
    whole = reasoning.split(text, opened, tags)
    assert whole == reference(text, opened, tags)
    sp, got, last = Splitter(opened, tags), ["", ""], 0
    for cut in sorted({min(c, len(text)) for c in cuts}) + [len(text)]:
        r, a = sp.feed(text[last:cut], final=cut == len(text))
        got[0] += r
        got[1] += a
        last = cut
    assert tuple(got) == whole


def test_seed_oss_is_read_by_its_template_or_name_and_its_turn_splits_thinking_answer_and_calls(smollm):
    """A template that writes `<seed:think>` turns the Seed-OSS reader on (vLLM's `seed_oss` names it), with the tags'
    ids where they are single tokens; a reply's thinking, answer and `<seed:tool_call>` come apart. Magistral's
    `[THINK]` blocks likewise (vLLM's `mistral`), read with special tokens kept."""
    from types import SimpleNamespace

    from server import tool_calls, tools
    from server.turn import Turn

    tok = transformers.AutoTokenizer.from_pretrained(smollm.tokenizer.folder)
    tok.add_tokens(list(reasoning.SEED))
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}<seed:think>...</seed:think>"
    form, ids = reasoning.resolve("auto", tok)
    assert form == "seed" and ids == tuple(tok.convert_tokens_to_ids(list(reasoning.SEED)))
    assert reasoning.resolve("seed_oss", smollm.tokenizer)[0] == "seed"
    assert reasoning.resolve("auto", smollm.tokenizer)[0] is None  # SmolLM2's template writes neither
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}[THINK]...[/THINK]"  # Magistral's
    assert reasoning.resolve("auto", tok)[0] == reasoning.resolve("mistral", smollm.tokenizer)[0] == "mistral"
    from server.protocol import parse
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    assert parse(body, "chat", smollm, "mistral").params.skip_special_tokens is False  # its marks are special
    assert parse(body, "chat", smollm, "seed").params.skip_special_tokens is False  # (its tags may be special)
    assert parse(body, "chat", smollm, "think").params.skip_special_tokens is True
    split = reasoning.split("[THINK]Sum it.[/THINK]42", False, reasoning.MISTRAL)
    assert split == ("Sum it.", "42")
    spec = tools.Tools([{"name": "get_time", "description": "", "parameters": {
        "type": "object", "properties": {"timezone": {"type": "string"}}}}], "auto")
    text = ("<seed:think>The user wants the time.<seed:cot_budget_reflect>8 tokens used</seed:cot_budget_reflect>"
            "</seed:think>Checking.<seed:tool_call>\n<function=get_time>\n<parameter=timezone>UTC</parameter>\n"
            "</function>\n</seed:tool_call>")
    thought = "The user wants the time.<seed:cot_budget_reflect>8 tokens used</seed:cot_budget_reflect>"
    for size in (1, 5, len(text)):
        turn = Turn(SimpleNamespace(tools=spec, thinking=reasoning.Thinking(form="seed")))
        for k in range(0, len(text), size):
            turn.feed(text[k:k + size])
        turn.feed("", "stop")
        assert turn.reasoning == thought
        assert (turn.text, turn.finish) == ("Checking.", "tool_calls")
        assert [(c["name"], c["arguments"]) for c in turn.calls] == [("get_time", '{"timezone": "UTC"}')]
    assert tool_calls.extract("<seed:tool_call>get_time()</seed:tool_call>", spec)[1] == []  # no XML: no call


def test_reasoning_effort_values():
    def bad(message, param):
        return ValueError(message)
    assert reasoning.effort(None, bad) == ({}, None)
    assert reasoning.effort("none", bad)[1] == 0 and reasoning.effort(False, bad)[0]["enable_thinking"] is False
    assert reasoning.effort("high", bad) == ({"enable_thinking": True, "thinking": True, "reasoning_effort": "high"},
                                             None)
    assert reasoning.effort(True, bad)[1] is None and reasoning.effort(64, bad)[1] == 64
    assert reasoning.effort(64, bad)[0]["thinking_budget"] == 64 and reasoning.effort(0, bad)[0]["thinking_budget"] == 0
    for wrong in ("huge", -1, 1.5, [1]):
        with pytest.raises(ValueError):
            reasoning.effort(wrong, bad)


def test_the_gate_counts_thinking_tokens_masks_the_close_and_asks_for_single_steps_only_near_it():
    import numpy as np

    from engine.thinking import Budget, Gate

    def allowed(gate):
        row = np.full(4, -1, np.int32)  # 128 tokens, all allowed
        gate.fill(row)
        return {t for t in range(128) if row[t // 32].view(np.uint32) >> (t % 32) & 1}

    gate = Gate(Budget(5, open_id=100, close_id=101, opened=False))
    assert gate.active(4) and len(allowed(gate)) == 128  # the first token decides whether a block opens
    gate.advance(100)
    assert not gate.active(4) and gate.active(6)  # five tokens to go: a 4-step dispatch cannot reach the budget
    for t in (7, 8, 9, 10, 11):
        gate.advance(t)
    assert gate.count == 5 and allowed(gate) == {101} and not gate.done
    gate.advance(101)
    assert gate.state == "answer" and not gate.active(4) and len(allowed(gate)) == 128
    plain = Gate(Budget(5, 100, 101))
    plain.advance(7)  # no block: an answer from the first token, never masked
    assert plain.state == "answer" and not plain.active(4) and len(allowed(plain)) == 128


# ---- a small thinking model, served ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thinker(smollm, tmp_path_factory):
    """A live server over a 2-layer random Qwen3 with SmolLM2's tokenizer plus `<think>` / `</think>` (one token
    each) and a template that opens the block in the prompt, as DeepSeek-R1's and newer Qwen3 ones do."""
    from conftest import live_server
    from engine.runner import RunnerConfig
    from models import load_model

    folder = tmp_path_factory.mktemp("thinker")
    tok = transformers.AutoTokenizer.from_pretrained(smollm.tokenizer.folder)
    tok.add_tokens([OPEN, CLOSE])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(folder))
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(str(folder), safe_serialization=True)
    model = dataclasses.replace(load_model(str(folder)), name=NAME)
    rc = RunnerConfig(max_num_seqs=4, max_model_len=512, decode_steps=4, kv_cache_gb=0.05, decode_batch_sizes=(4,))
    yield from live_server(model, rc, responses_db=str(folder / "responses.sqlite"))


def _ask(thinker, **kw):
    client = openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    body = {"ignore_eos": True, "return_token_ids": True, **kw.pop("extra", {})}
    return client, client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Think."}],
                                                  seed=3, temperature=1.0, extra_body=body, **kw)


def test_the_parser_is_on_for_a_thinking_template_and_the_tags_are_single_tokens(thinker):
    srv = thinker.server
    assert srv.thinks and srv.think_ids == tuple(thinker.model.tokenizer.convert_tokens_to_ids([OPEN, CLOSE]))


@pytest.mark.parametrize("budget", [0, 1, 6, 9])
def test_the_engine_closes_the_block_at_an_integer_budget(thinker, budget):
    close = thinker.server.think_ids[1]
    # budget 0 turns thinking off in the template; a template that opens the block anyway gets it closed at once
    extra = {"reasoning_effort": budget, "chat_template_kwargs": {"enable_thinking": True}}
    client, r = _ask(thinker, max_tokens=16, extra=extra)
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    assert ids[budget] == close and close not in ids[:budget], ids  # exactly `budget` thinking tokens, then the close
    tok = thinker.model.tokenizer
    assert c.message.reasoning_content == (tok.decode(ids[:budget], skip_special_tokens=True).strip() or None)
    assert c.message.content == tok.decode(ids[budget + 1:], skip_special_tokens=True).lstrip()
    assert r.usage.completion_tokens == 16 and c.finish_reason == "length"
    assert r.usage.completion_tokens_details.reasoning_tokens == budget + 1  # the thinking and the close
    # streamed, the same pieces arrive apart
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Think."}], seed=3, temperature=1.0, max_tokens=16,
        stream=True, extra_body={"ignore_eos": True, **extra}))
    assert "".join(getattr(k.choices[0].delta, "reasoning_content", None) or "" for k in chunks) == (
        c.message.reasoning_content or "")
    assert "".join(k.choices[0].delta.content or "" for k in chunks) == c.message.content
    # vLLM's thinking_token_budget: the same budget, the template left as asked
    _, v = _ask(thinker, max_tokens=16, extra={"thinking_token_budget": budget, "reasoning_effort": "high"})
    got = v.choices[0].model_extra["token_ids"]
    assert got[budget] == close and close not in got[:budget] and (got == ids or budget == 0)  # 0: thinking on here


def test_structured_output_and_forced_tool_calls_apply_to_the_answer_after_the_block(thinker):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    for budget in (0, 7):
        _, r = _ask(thinker, max_tokens=60, response_format=fmt,
                    extra={"reasoning_effort": budget, "chat_template_kwargs": {"enable_thinking": True},
                           "ignore_eos": False})  # the end of the JSON is the end of the reply
        c = r.choices[0]
        ids = c.model_extra["token_ids"]
        assert ids[budget] == thinker.server.think_ids[1] and c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)  # the thinking before it was free
    tools = [{"type": "function", "function": {"name": "pick", "parameters": schema}}]
    _, r = _ask(thinker, max_tokens=60, tools=tools, tool_choice="required",
                extra={"reasoning_effort": 3, "ignore_eos": False})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.reasoning_content
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), schema)


def test_a_reply_cut_while_thinking_says_length_with_the_reasoning_filled(thinker):
    _, r = _ask(thinker, max_tokens=8)
    c = r.choices[0]
    assert thinker.server.think_ids[1] not in c.model_extra["token_ids"]
    assert c.finish_reason == "length" and c.message.reasoning_content and not c.message.content


def test_responses_give_a_reasoning_item_and_messages_a_thinking_block(thinker):
    client = openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.responses.create(model=NAME, input="Think.", max_output_tokens=16, temperature=1.0,
                                extra_body={"seed": 3, "ignore_eos": True, "reasoning_effort": 5})
    kinds = [o.type for o in r.output]
    assert kinds == ["reasoning", "message"] and r.output[0].content[0].text
    assert r.usage.output_tokens_details.reasoning_tokens == 6  # five thinking tokens and the close
    with client.responses.stream(model=NAME, input="Think.", max_output_tokens=16, temperature=1.0,
                                 extra_body={"seed": 3, "ignore_eos": True, "reasoning_effort": 5}) as s:
        events = list(s)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == r.output[0].content[0].text
    # logprobs: the answer's tokens (those after the block's close), the same whole and streamed
    kw = dict(model=NAME, input="Think.", max_output_tokens=16, temperature=1.0, top_logprobs=2,
              include=["message.output_text.logprobs"], extra_body={"seed": 3, "ignore_eos": True,
                                                                     "reasoning_effort": 5})
    whole = client.responses.create(**kw).output[1].content[0].logprobs
    assert len(whole) == 16 - 6 and all(len(t.top_logprobs) == 2 for t in whole)
    last = list(client.responses.create(stream=True, **kw))[-1]  # response.incomplete: max_output_tokens
    streamed = last.response.output[1].content[0].logprobs
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole]
    claude = anthropic.Anthropic(base_url=thinker.url, api_key="unused", max_retries=0, timeout=120)
    m = claude.messages.create(model=NAME, max_tokens=16, messages=[{"role": "user", "content": "Think."}],
                               thinking={"type": "enabled", "budget_tokens": 5},
                               extra_body={"seed": 3, "ignore_eos": True, "temperature": 1.0})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == r.output[0].content[0].text  # same seed, same budget: the same thinking
    with claude.messages.stream(model=NAME, max_tokens=16, messages=[{"role": "user", "content": "Think."}],
                                thinking={"type": "enabled", "budget_tokens": 5},
                                extra_body={"seed": 3, "ignore_eos": True, "temperature": 1.0}) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == m.content[0].thinking


def test_thinking_off_renders_a_closed_block_and_template_kwargs_pass_through(thinker):
    _, off = _ask(thinker, max_tokens=4, extra={"reasoning_effort": "none"})
    _, kw = _ask(thinker, max_tokens=4, extra={"chat_template_kwargs": {"enable_thinking": False}})
    tok = thinker.model.tokenizer
    for r in (off, kw):
        prompt = tok.decode(r.model_extra["prompt_token_ids"])
        assert prompt.endswith("<think>\n\n</think>\n\n") and r.choices[0].message.reasoning_content is None
    client, _ = _ask(thinker, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"reasoning_effort": "extreme"})
    assert e.value.body["param"] == "reasoning_effort"


def test_earlier_thinking_sent_back_reaches_the_template_through_every_api(thinker):
    import json

    client = openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tok = thinker.model.tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    tools = [{"type": "function", "function": {"name": "pick", "description": "Pick.", "parameters": schema}}]
    user = {"role": "user", "content": "Think."}
    _, r = _ask(thinker, max_tokens=40, tools=tools, tool_choice="required",
                extra={"reasoning_effort": 3, "ignore_eos": False})
    msg = r.choices[0].message
    thought, call = msg.reasoning_content, msg.tool_calls[0]
    assert thought and msg.model_extra["reasoning"] == thought  # vLLM's name beside DeepSeek's

    def prompt(assistant: dict) -> list[int]:
        turn = {"role": "assistant", "content": None, "tool_calls": [call.model_dump()], **assistant}
        done = client.chat.completions.create(
            model=NAME, messages=[user, turn, {"role": "tool", "tool_call_id": call.id, "content": "7"}],
            tools=tools, max_tokens=1, extra_body={"return_token_ids": True})
        return done.model_extra["prompt_token_ids"]

    sent = prompt({"reasoning": thought})
    assert f"<think>\n{thought}\n</think>" in tok.decode(sent)
    assert prompt({"reasoning_content": thought}) == sent and prompt({"thinking": thought}) == sent
    assert len(prompt({})) < len(sent) and thought not in tok.decode(prompt({}))
    with pytest.raises(openai.BadRequestError) as e:
        prompt({"reasoning": 5})
    assert e.value.body["param"] == "messages" and "reasoning" in e.value.body["message"]
    # Anthropic's thinking block before the tool_use it led to (arguments as JSON of its input)
    args = json.loads(call.function.arguments)
    call = call.model_copy(update={"function": call.function.model_copy(update={"arguments": json.dumps(args)})})
    claude = anthropic.Anthropic(base_url=thinker.url, api_key="unused", max_retries=0, timeout=120)
    spec = {"name": "pick", "description": "Pick.", "input_schema": schema}
    m = claude.messages.create(model=NAME, max_tokens=1, tools=[spec], messages=[
        user, {"role": "assistant", "content": [{"type": "thinking", "thinking": thought, "signature": ""},
                                                {"type": "tool_use", "id": call.id, "name": "pick", "input": args}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "7"}]}])
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(prompt({"reasoning": thought}))
    # Responses: the stored reasoning item goes back with previous_response_id
    kw = dict(model=NAME, tools=[{"type": "function", "name": "pick", "description": "Pick.", "parameters": schema}])
    first = client.responses.create(input="Think.", tool_choice="required", max_output_tokens=40, temperature=1.0,
                                    extra_body={"seed": 3, "reasoning_effort": 3}, **kw)
    said, fc = first.output[0], first.output[-1]
    assert [o.type for o in first.output] == ["reasoning", "function_call"]
    after = client.responses.create(previous_response_id=first.id, max_output_tokens=1, input=[
        {"type": "function_call_output", "call_id": fc.call_id, "output": "7"}], **kw)
    call = call.model_copy(update={"id": fc.call_id, "function": call.function.model_copy(
        update={"name": fc.name, "arguments": fc.arguments})})
    assert after.usage.input_tokens == len(prompt({"reasoning": said.content[0].text}))


def test_a_template_that_refuses_thinking_beside_content_and_calls_renders_without_that_thinking(smollm):
    """gpt-oss's template raises on an assistant message with content, thinking and tool calls together (what an SDK
    loop sends back by appending the reply): that message's thinking is dropped, not the request; others keep
    theirs."""
    import copy
    import types

    from server import tools as tool_mod
    from server.protocol import chat_text

    tok = copy.copy(smollm.tokenizer)
    tok.chat_template, tok._template = (
        "{% for m in messages %}{% if m.role == 'assistant' and m.content and m.thinking and m.tool_calls %}"
        "{{ raise_exception('Cannot pass both content and thinking in an assistant message with tool calls!') }}"
        "{% endif %}<{{ m.role }}>{% if m.thinking %}[{{ m.thinking }}]{% endif %}{{ m.content }}"
        "{% for c in m.tool_calls or [] %}({{ c.function.name }}){% endfor %}{% endfor %}{% if tools %}T{% endif %}",
        None)
    spec = tool_mod.Tools([{"name": "f", "description": "", "parameters": {"type": "object"}}], "auto")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [{"role": "user", "content": "Go."},
               {"role": "assistant", "content": "", "reasoning": "first", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "ok"},
               {"role": "assistant", "content": "Looking.", "reasoning": "second", "tool_calls": [
                   {**call, "id": "c2"}]}, {"role": "tool", "tool_call_id": "c2", "content": "ok"}]
    text = chat_text(types.SimpleNamespace(tokenizer=tok, vision=None), history, spec)
    assert "<assistant>[first](f)" in text and "<assistant>Looking.(f)" in text and "second" not in text
