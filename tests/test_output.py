"""`engine.output`: a choice's drawn tokens into token ids, logprobs, text and a finish reason, with the default
model's tokenizer. A dispatch's tokens handed over together must give what handing them one by one gives."""

import numpy as np
import pytest

from engine import output
from engine.detok import Detok
from engine.params import SamplingParams
from engine.requests import Choice
from engine.sampler import SampleOut

TEXT = "Crème brûlée at 9:30 — 日本語 ✓ and a tab\there. Done!"


def _outs(tokens: list[int], slots: int = 3, slot: int = 1, seed: int = 0) -> SampleOut:
    """A read-back dispatch of `len(tokens)` steps over `slots` rows, `tokens` in row `slot`, the others noise."""
    rng = np.random.default_rng(seed)
    steps = len(tokens)
    token = rng.integers(0, 1000, (steps, slots)).astype(np.int32)
    token[:, slot] = tokens
    return SampleOut(token, -rng.random((steps, slots)).astype(np.float32),
                     rng.integers(0, 1000, (steps, slots, 5)).astype(np.int32),
                     -rng.random((steps, slots, 5)).astype(np.float32))


def _choice(tok, stops=()) -> Choice:
    return Choice(0, detok=Detok(tok), stops=list(stops))


@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("eos_kind", ["special", "text"])
def test_a_dispatch_together_as_one_by_one(smollm, ignore_eos, eos_kind):
    """`extend` (tokens together, cut at an end of sequence or the limit, one detokenization) agrees with `append`
    token by token on ids, logprobs, text and the reason, for every cut of a text with multi-byte characters; also
    where the end of sequence is an ordinary token of the text (models with several, such as Llama 3's), whose text
    neither path keeps."""
    tok = smollm.tokenizer
    ids = tok.encode(TEXT)
    eos = smollm.eos_ids if eos_kind == "special" else (ids[4],)
    p = SamplingParams(max_tokens=64, logprobs=True, top_logprobs=3, ignore_eos=ignore_eos)
    rng = np.random.default_rng(1)
    for case in range(40):
        drawn = list(ids[:rng.integers(1, len(ids) + 1)])
        if case % 3 == 0:
            drawn.insert(int(rng.integers(0, len(drawn) + 1)), eos[0])
        before = ids[:int(rng.integers(0, 4))]  # tokens the choice holds already
        limit = len(before) + int(rng.integers(1, len(drawn) + 3))
        outs = _outs(drawn, seed=case)
        together, single = _choice(tok), _choice(tok)
        for c in (together, single):
            c.token_ids = list(before)
            c.text = c.detok.add(list(before))
        reason = output.extend(together, p, outs, np.arange(len(drawn)), 1, limit, eos)
        for i in range(len(drawn)):
            if one := output.append(single, p, outs, (i, 1), limit, eos):
                break
        assert reason == one, (case, drawn, limit)
        assert together.token_ids == single.token_ids and together.text == single.text, (case, drawn, limit)
        assert together.logprobs == single.logprobs
        assert len(together.token_ids) <= limit and (reason == "length") == (len(together.token_ids) == limit
                                                                              and (ignore_eos or eos[0] not in
                                                                                   together.token_ids[len(before):]))
        if reason == "stop":
            assert together.token_ids[-1] == eos[0] and tok.decode(together.token_ids).startswith(together.text)
        assert [lp[0] for lp in together.logprobs] == together.token_ids[len(before):]
        assert all(len(lp[2]) == 3 for lp in together.logprobs)


def test_a_stop_string_ends_the_text_and_is_held_back_while_it_may_come(smollm):
    """With stop strings each token is read (`extend` goes one by one): the text ends before the first stop string
    completed, `stop_hit` names it, and `delta` never streams text that may still turn out to start one."""
    tok = smollm.tokenizer
    ids = tok.encode("The answer is 42. Then more text follows")
    p = SamplingParams(max_tokens=64, stop=["42.", "never"])
    choice = _choice(tok, p.stop)
    outs = _outs(ids)
    streamed, reason = "", None
    for i in range(len(ids)):
        reason = output.extend(choice, p, outs, np.array([i]), 1, 64, smollm.eos_ids)
        if reason:
            choice.finish_reason = reason
        if d := output.delta(choice):
            streamed += d.text  # had "4" or "42" gone out before the stop string completed, it could not be taken back
        if reason:
            break
    assert reason == "stop" and choice.stop_hit == "42." and choice.text == "The answer is "
    assert streamed == "The answer is " and len(choice.token_ids) < len(ids)
    assert output.delta(choice) is None  # the final delta went out once


def test_the_length_limit_and_a_complete_text_without_stops(smollm):
    """No stop strings: `extend` takes the dispatch's tokens up to the limit ("length"), and the deltas stream the
    whole text."""
    tok = smollm.tokenizer
    ids = tok.encode(TEXT)
    p = SamplingParams(max_tokens=len(ids))
    choice = _choice(tok)
    half = len(ids) // 2
    outs = _outs(ids + ids)
    assert output.extend(choice, p, outs, np.arange(half), 1, len(ids), smollm.eos_ids) is None
    first = output.delta(choice)
    assert output.extend(choice, p, outs, np.arange(half, 2 * len(ids)), 1, len(ids), smollm.eos_ids) == "length"
    choice.finish_reason = "length"
    last = output.delta(choice)
    assert choice.token_ids == ids and first.text + last.text == tok.decode(ids) == choice.text
    assert first.finish_reason is None and last.finish_reason == "length" and last.token_ids == ids[half:]
