"""Beam search on the packaged SmolLM2: the algorithm's steps on made-up log-probabilities, and vLLM's
`use_beam_search` over HTTP with the official client (transformers' own beam search on the same weights is the
reference in tests/test_models.py)."""

import math

import pytest

from engine.beam import BeamSearch

MODEL = "smollm2-135m-instruct"


def test_beams_end_at_eos_or_max_tokens_and_the_best_finished_are_kept():
    s = BeamSearch(2, 3, eos_ids=[9], length_penalty=1.0)
    assert s.keep == 4  # (1 + one EOS id) x the width
    s.advance([[(9, -0.1), (1, -0.5), (2, -0.7), (3, -3.0)]])  # the best candidate ends at once
    assert [b.tokens for b in s.finished] == [[9]] and [b.tokens for b in s.running] == [[1], [2]]
    s.advance([[(4, -0.1), (9, -0.2), (5, -2.0), (6, -2.5)], [(7, -0.1), (8, -0.2), (9, -0.3), (1, -4.0)]])
    # candidates: [1,4] -0.6, [1,9] -0.7, [2,7] -0.8, [2,8] -0.9: [1,9] ends within the top two, scored -0.7 / 2;
    # the best running beam (-0.6 / 2) may still beat it: the search goes on
    assert [b.tokens for b in s.finished] == [[9], [1, 9]]
    assert s.finished[1].score == pytest.approx(-0.35) and not s.done
    assert [b.tokens for b in s.running] == [[1, 4], [2, 7]]
    s.advance([[(1, -1.0), (2, -1.1), (9, -5.0), (3, -6.0)], [(1, -1.0), (2, -1.2), (9, -5.0), (3, -6.0)]])
    assert s.done  # max_tokens: every candidate ends; the finished set is the best two of all
    assert [b.tokens for b in s.finished] == [[9], [1, 9]]


def test_the_early_stop_heuristic_ends_a_search_that_cannot_improve():
    s = BeamSearch(1, 100, eos_ids=[9])
    s.advance([[(9, -0.1), (1, -0.2)]])  # finished at -0.1; the best running beam's -0.2 over length 1 is worse
    assert s.done and [b.tokens for b in s.finished] == [[9]]
    again = BeamSearch(1, 100, eos_ids=[9], length_penalty=2.0)
    again.advance([[(1, -0.2), (9, -0.3)]])  # the EOS candidate is not within the top one: nothing finishes
    assert not again.done and again.finished == [] and math.isclose(again.running[0].logprob, -0.2)


def test_use_beam_search_over_http_with_the_official_client(api, client, llm):
    import openai

    prompt = "The three primary colours are"
    want = llm.beam_search([prompt], beam_width=3, max_tokens=8)[0]
    got = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=8,
                                    extra_body={"use_beam_search": True, "return_token_ids": True})
    assert [c.model_extra["token_ids"] for c in got.choices] == [o.token_ids for o in want.outputs]
    assert [c.text for c in got.choices] == [o.text for o in want.outputs]
    assert [c.finish_reason for c in got.choices] == [o.finish_reason for o in want.outputs]
    assert got.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], n=2,
                                          max_tokens=12, extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    assert chat.choices[0].message.content != chat.choices[1].message.content or \
        chat.choices[0].finish_reason != chat.choices[1].finish_reason
    for extra, param in (({"use_beam_search": True, "stream": True}, "stream"),
                         ({"use_beam_search": True, "logprobs": 2}, "logprobs"),
                         ({"use_beam_search": True, "n": 11}, "n"), ({"length_penalty": 1.0}, "length_penalty"),
                         ({"use_beam_search": True, "length_penalty": 1e30}, "length_penalty"),
                         ({"use_beam_search": True, "max_tokens": 0}, "max_tokens"),
                         ({"use_beam_search": True, "presence_penalty": 0.5}, "presence_penalty"),
                         ({"use_beam_search": True, "logit_bias": {"5": 2}}, "logit_bias"),
                         ({"use_beam_search": True, "suffix": "x"}, "suffix"),
                         ({"use_beam_search": "yes"}, "use_beam_search"),
                         ({"use_beam_search": True, "response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt, extra_body={"max_tokens": 4, **extra})
        assert e.value.body["param"] == param, (extra, e.value.body)
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=4).choices[0].text  # still serving


def test_a_search_cut_short_is_an_error_and_the_engine_serves_on(api, client):
    """SGLang's /abort_request over a running search: its step requests end "abort", and the call is a 503 in the
    API's error shape (not an index error), while the server keeps serving."""
    import threading
    import urllib.request

    import openai

    errors = []

    def search():
        try:
            client.completions.create(model=MODEL, prompt="A long story:", n=4, max_tokens=200,
                                      extra_body={"use_beam_search": True, "ignore_eos": True})
        except openai.APIStatusError as e:
            errors.append(e)

    t = threading.Thread(target=search)
    t.start()
    while t.is_alive() and not any(r.id.startswith("cmpl-") for reqs in api.server.admitted for r in reqs
                                   if "-beam" in r.id):
        t.join(0.05)
    abort = urllib.request.Request(api.url + "/abort_request", data=b'{"abort_all": true}', method="POST",
                                   headers={"Content-Type": "application/json"})
    for _ in range(300):  # again until the call ends: one sent between two of its steps would find nothing to abort
        urllib.request.urlopen(abort).read()
        t.join(0.2)
        if not t.is_alive():
            break
    assert not t.is_alive() and len(errors) == 1 and errors[0].status_code == 503
    assert errors[0].body["code"] == "aborted"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
