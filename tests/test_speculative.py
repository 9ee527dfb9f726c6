"""Speculative decoding on the packaged SmolLM2: drafts from a prediction or n-grams change the speed, never the
tokens (greedy or seeded sampling, under every sampler setting), and leave pages, prefix hashes, sampler state and the
set of compiled programs as they were."""

import contextlib
import math
import re
import urllib.request

import numpy as np
import pytest

from conftest import ENGINE
from helpers import host_decided
from engine import SamplingParams
from engine.speculative import Drafter, match, worth_verifying

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Write a Python function that adds two numbers, and one that subtracts them."}]
SETTINGS = [
    SamplingParams(temperature=0, max_tokens=40),
    SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5),
    SamplingParams(temperature=0, max_tokens=40, logit_bias={"28": 3.0}, stop=["return"]),
    SamplingParams(temperature=0.9, top_p=0.8, top_k=40, max_tokens=40, seed=11, n=2),
    SamplingParams(temperature=1.0, min_p=0.05, typical_p=0.9, max_tokens=40, seed=12),
    SamplingParams(temperature=1.0, mirostat_target=3.0, max_tokens=40, seed=13),
    SamplingParams(temperature=0, max_tokens=40, logprobs=True, top_logprobs=3),
]


@contextlib.contextmanager
def verifying_always(eng):
    """Within the block the engine verifies every draft, whatever its tokens-per-second choice would say."""
    eng.verify_always = True
    try:
        yield
    finally:
        eng.verify_always = False


def tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def assert_same(spec, plain, params):
    """Greedy requests give the same tokens; seeded sampled ones too, but for rare flips: a verify pass and decode
    steps compute the logits in different orders (last-bit differences, ~1e-5 in a logprob; through the C++ kernel's
    quantized activations a last bit can move a rounding, ~1e-4), and a uniform number that falls that close to a
    boundary between two tokens picks the other one (in the long tail of a temperature-1 draw, where the boundaries
    lie ~1e-6 apart, a ~1e-4 difference moves the draw by tens of tokens: so compare runs on the same prefill path)."""
    flips = total = 0
    for s, p, sp in zip(tokens(spec), tokens(plain), params):
        if sp.temperature == 0:
            assert s == p
        else:
            total += len(s)
            flips += sum(a != b for a, b in zip(s, p))
    assert flips <= max(1, total // 10), (flips, total)


def test_drafts_follow_a_prediction_in_order_and_re_anchor_after_a_mismatch():
    d = Drafter(np.array([5, 6, 7, 8, 5, 6, 9, 10]), 1)
    assert d.propose([1], [], 3) == [5, 6, 7]  # nothing generated yet: the prediction's start
    assert d.propose([1], [5], 2) == [6, 7]  # the reply so far is the prediction's start
    assert d.propose([1], [5, 6], 3) == [7, 8, 5]
    assert d.propose([1], [5, 6, 7, 8, 5, 6], 2) == [9, 10]  # the later occurrence of (5, 6), in step
    assert d.propose([1], [5, 6, 7, 8, 5, 6, 42, 9], 3) == [10]  # re-anchored on (9) after the mismatch
    assert d.propose([1], [3, 4], 2) == []  # past the prediction's end: no draft
    ngram = Drafter(None, 2)
    assert ngram.propose([1, 2, 3, 4, 1, 2], [], 3) == [3, 4, 1]  # the prompt's own earlier (1, 2)
    assert ngram.propose([1, 2, 3], [7], 3) == []  # one token of context does not make a match
    assert match(np.array([1, 2, 1, 2, 1]), np.array([1, 2]), 3) == 4
    assert match(np.array([1, 2]), np.array([2]), 0) is None
    d.expect, d.unverified = 0.0, [7, 8, 9]
    d.shadow([7, 8, 9, 4])  # the decoded tokens bore the whole draft out
    assert d.expect == 1.5 and d.unverified is None
    d.unverified = [7, 8, 9]
    d.shadow([7, 5, 1, 1])  # one token of it
    assert d.expect == 1.25 and d.drafted == 0  # learnt, not counted as verified
    d.unverified = [7, 8, 9, 10, 11, 12]
    d.shadow([7, 8, 9, 10])  # a longer draft borne out through the decoded run: the run and what it has kept
    assert d.expect == 0.5 * 1.25 + 0.5 * (4 + 1.25)
    d.unverified = [7, 8, 9, 10, 11, 12]
    d.shadow([7, 8, 9, 10])  # again: at most the draft's length
    assert d.expect == 0.5 * 3.25 + 0.5 * 6


def test_greedy_and_seeded_outputs_are_the_same_with_a_prediction_right_or_wrong(llm):
    plain = llm.chat([ASK] * len(SETTINGS), SETTINGS)
    right = [o.outputs[0].text for o in plain]
    verifies = llm.engine.verifies
    # Every draft verified: by tokens per second the engine may decode instead (a 5-position verify step of seven
    # rows against a 4-step decode, on a loaded CPU), and this test is about the tokens either way
    with verifying_always(llm.engine):
        spec = llm.chat([ASK] * len(SETTINGS), SETTINGS, predictions=right)
    assert_same(spec, plain, SETTINGS)
    assert llm.engine.verifies > verifies
    # Quantized weights (`auto`) round each product's activations in groups of 32: the ~1e-5 by which a verify pass's
    # attention differs from decode's can move a rounding step, and logprobs then differ by up to a few 1e-3.
    atol = 1e-3 if llm.model.cfg.quantization == "none" else 5e-3
    for a, b in zip(spec[-1].outputs[0].logprobs, plain[-1].outputs[0].logprobs):  # each kept token's, as without
        assert a[0] == b[0] and [t for t, _ in a[2]] == [t for t, _ in b[2]]
        np.testing.assert_allclose([a[1]] + [x for _, x in a[2]], [b[1]] + [x for _, x in b[2]], atol=atol)
    greedy = spec[0]
    assert greedy.drafted > 0 and greedy.accepted >= 0.8 * len(greedy.outputs[0].token_ids) - 10
    with verifying_always(llm.engine):  # drafts that all lose: by tokens per second the engine soon decodes instead
        wrong = llm.chat([ASK] * len(SETTINGS), SETTINGS, predictions=[CODE[::-1]] * len(SETTINGS))
    assert_same(wrong, plain, SETTINGS)
    assert sum(o.drafted - o.accepted for o in wrong) > 0  # it did draft, and lost


def test_constrained_requests_draft_and_keep_their_tokens(llm):
    """Under a JSON schema a draft is cut to what the grammar accepts and verified with a mask for each drafted
    prefix: the tokens are those without drafts (greedy exactly, seeded but for rare flips), the replies valid, and
    a right prediction mostly accepted; a wrong one costs nothing but its drafts."""
    import json

    import jsonschema

    from engine.grammar import grammar_text
    from helpers import run_all

    schema = {"type": "object", "required": ["name", "age", "city"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}}
    grammar = grammar_text({"type": "json_schema", "json_schema": schema})
    eng = llm.engine
    prompt = eng.tok.encode("A person as JSON, with their name, age and city:")
    settings = [SETTINGS[0], SETTINGS[1], SETTINGS[3], SETTINGS[5]]  # greedy, penalties, top-p n = 2, mirostat
    settings = [SamplingParams(**{**p.__dict__, "max_tokens": 60}) for p in settings]

    def run(prediction=None):
        reqs = run_all(eng, [prompt] * len(settings), settings, [prediction] * len(settings), grammar=grammar)
        return [type("Out", (), {"outputs": r.choices, "accepted": r.accepted, "drafted": r.drafted}) for r in reqs]

    plain = run()
    right = plain[0].outputs[0].token_ids
    with verifying_always(eng):
        spec, wrong = run(right), run(eng.tok.encode('{"name": "Zed Zed", "age": 1234567, "city": "x"}'))
    assert_same(spec, plain, settings)
    assert_same(wrong, plain, settings)
    assert spec[0].accepted >= 0.8 * len(right) - 2, (spec[0].accepted, len(right))
    assert sum(o.drafted - o.accepted for o in wrong) > 0
    for out in spec:
        for c in out.outputs:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(eng.tok.decode(c.token_ids, skip_special_tokens=True)), schema)


def test_verify_programs_a_gpu_need_not_wait_on_keep_every_token(llm):
    """On a GPU (`RunnerConfig.sampler_branches`) a verify step of rows that are all `sampler.is_plain` runs the
    plain sampler at every drafted position, rows masked, in a loop of constant count (no conditional, no loop whose
    end XLA's GPU runtime would decide on the host after waiting for the device); with `select` a step of other rows
    computes the transforms they may want (`lean`: top_k and top_p here). Tokens, logprobs and accepted drafts are
    those of the `cond` program, which stops once every draft has failed (drafts right and wrong, greedy and seeded
    rows, counted by call)."""
    runner = llm.engine.runner
    greedy = [SamplingParams(temperature=0, max_tokens=24, logprobs=True),
              SamplingParams(temperature=0.8, presence_penalty=0.5, max_tokens=24, seed=3)]  # both plain
    mixed = greedy + [SamplingParams(temperature=0.9, top_p=0.8, top_k=40, max_tokens=24, seed=11)]
    preds = [CODE, CODE[::-1], CODE]

    def run(params):
        with verifying_always(llm.engine):
            outs = llm.chat([ASK] * len(params), params, predictions=preds[:len(params)], prompt_cache_max_len=0)
        return [(c.token_ids, [lp for _, lp, _ in c.logprobs or []]) for o in outs for c in o.outputs], \
            [(o.drafted, o.accepted) for o in outs]

    want = run(greedy), run(mixed)
    calls, verify, mode = [], runner._verify, runner.branches

    def recorded(*args, **statics):
        calls.append(statics["branches"])
        return verify(*args, **statics)

    runner._verify = recorded
    try:
        runner.branches = "plain"
        got = run(greedy)
        assert set(calls) == {"plain"}, calls
        runner.branches = "select"
        calls.clear()
        got = got, run(mixed)
        assert "lean" in calls and set(calls) <= {"lean", "plain"}, calls
    finally:
        runner._verify, runner.branches = verify, mode
    assert got == want
    assert want[0][1][0][1] > 0 and any(d > a for d, a in want[1][1])  # drafts kept, and drafts lost
    nb = runner.batch_buckets[0]
    for branches in ("plain", "select", "lean", "cond"):
        fn, args, statics = runner._verify_job(nb, runner.attended(nb, 1, runner.rc.draft_tokens + 1), branches)
        found = host_decided(fn.fn.lower(*args, **statics).as_text())
        assert bool(found) == (branches == "cond"), (branches, found)


def test_a_crowd_of_sixteen_mixing_drafts_gives_every_request_its_own_tokens(llm):
    asks = [[{"role": "user", "content": f"List {i + 2} fruits, one per line."}] for i in range(16)]
    params = [SETTINGS[i % len(SETTINGS)] for i in range(16)]
    plain = llm.chat(asks, params)
    preds = [o.outputs[0].text if i % 3 else None for i, o in enumerate(plain)]
    assert_same(llm.chat(asks, params, predictions=preds), plain, params)


def test_sampler_state_after_speculation_is_the_state_without(llm):
    """Mirostat's mu, the penalty counts, the key and the step counter of the request's row after a run with an
    exact prediction equal those after the same run without (the request sits alone in slot 0; counts, key and step
    exactly, mu to float32 rounding)."""
    # 29 tokens: a first one, then 7 decode dispatches of 4 with none drawn past the end; with the exact prediction
    # every draft is kept, and drafts never reach past max_tokens, so neither run draws a token it does not keep.
    p = SamplingParams(temperature=1.0, mirostat_target=3.0, frequency_penalty=0.4, max_tokens=29, seed=5,
                       ignore_eos=True)
    assert llm.engine.runner.rc.decode_steps == 4
    plain = llm.chat(ASK, p)
    before = llm.engine.runner.save_row(0)
    with verifying_always(llm.engine):
        spec = llm.chat(ASK, p, predictions=[plain[0].outputs[0].token_ids])
    after = llm.engine.runner.save_row(0)
    assert spec[0].accepted == spec[0].drafted > 20 and tokens(spec) == tokens(plain)
    assert before.step == 29 and before.counts.sum() == 29
    # mu within rounding: the logits of a verify pass and of decode steps differ in the last bits (float32), or by
    # up to a few 1e-3 with quantized weights (see the logprobs above)
    rtol = 1e-5 if llm.model.cfg.quantization == "none" else 1e-4
    for a, b in zip(before.__dict__.values(), after.__dict__.values()):
        np.testing.assert_allclose(a, b, rtol=rtol)


def test_rejected_drafts_leave_pages_and_the_prefix_cache_right(llm):
    """After wrong drafts every page is free again, the pool's invariants hold, and a next turn served from the
    pages the speculated run registered gives the tokens of one computed from scratch."""
    p = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    # Where a verify costs many decode steps (this CPU's quantized kernels and C++ attention), the engine may rightly
    # decode instead: this test is about the pages of rejected drafts.
    with verifying_always(llm.engine):
        first = llm.chat(ASK, p, predictions=[CODE * 3])[0]
    assert first.drafted > first.accepted
    for pool in llm.engine.sched.pools:
        pool.check()
        assert pool.num_free == pool.capacity
    turn = ASK + [{"role": "assistant", "content": first.outputs[0].text}, {"role": "user", "content": "Shorter."}]
    cached = llm.chat(turn, p)[0]
    fresh = llm.chat(turn, p, prompt_cache_max_len=0)[0]
    assert cached.cached_tokens > 32 and tokens([cached]) == tokens([fresh])


def test_speculation_compiles_nothing_after_its_first_round(llm):
    preds = [CODE] * 4
    llm.chat([ASK] * 4, [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 4, predictions=preds)
    llm.chat(ASK, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), predictions=[CODE])
    before = llm.engine.runner.compiles
    settings = [SamplingParams(temperature=t, top_k=k, max_tokens=24, seed=i, ignore_eos=True)
                for i, (t, k) in enumerate([(0, 0), (0.7, 5), (1.2, 0), (0.5, 50)])]
    llm.chat([ASK] * 4, settings, predictions=preds)
    llm.chat(ASK, settings[1], predictions=[CODE])
    assert llm.engine.runner.compiles == before


@pytest.fixture(scope="module")
def one_draft(smollm):
    """The `llm` fixture's engine verifying drafts of one token (2 positions a row, not 5): its other programs are
    `llm`'s (the program store), and a 32-row verify step costs about a decode step."""
    from engine import LLM

    return LLM(smollm, **{**ENGINE, "draft_tokens": 1})


def test_the_first_speculated_tokens_are_distributed_as_without_drafts(llm, one_draft):
    """Many seeds: the second token, the first one a draft proposes (from the prediction, after the first token), with
    drafts and, from other seeds, without. With drafts a seed reproduces its tokens, which are those without drafts
    (but for rare flips, see `assert_same`); the two independent samples pass a chi-square test of homogeneity at
    the 0.1% level (fails if drafting biased the draw)."""
    prompt = "Once upon a time,"
    pred = " the cat sat on the mat and the dog slept."
    p = lambda seed: SamplingParams(temperature=1.0, max_tokens=3, seed=seed, n=8)  # noqa: E731
    seeds = range(40)
    for engine in (one_draft, llm):  # every run below then prefills only the prompt's last token over cached pages:
        engine.generate([prompt], [SamplingParams(max_tokens=1)])  # a whole prompt's prefill differs past the last bit
    with verifying_always(one_draft.engine):  # one token left to draft: decoding it may cost less than verifying
        spec = one_draft.generate([prompt] * len(seeds), [p(s) for s in seeds], predictions=[pred] * len(seeds))
        again = one_draft.generate([prompt] * 5, [p(s) for s in seeds[:5]], predictions=[pred] * 5)
    assert_same(again, spec[:5], [p(s) for s in seeds[:5]])  # a batch of 5 is computed in another order than 40
    assert_same(spec[:5], llm.generate([prompt] * 5, [p(s) for s in seeds[:5]]), [p(s) for s in seeds[:5]])
    plain = llm.generate([prompt] * len(seeds), [p(1000 + s) for s in seeds])
    assert sum(o.accepted for o in spec) > 5 and sum(o.drafted for o in spec) > 100

    def seconds(outs):
        return [c.token_ids[1] for o in outs for c in o.outputs if len(c.token_ids) >= 2]

    a, b = seconds(spec), seconds(plain)
    kinds = sorted(set(a) | set(b))
    ca, cb = np.array([a.count(k) for k in kinds]), np.array([b.count(k) for k in kinds])
    keep = ca + cb >= 10  # pool the rare tokens so every expected count is large enough
    ca, cb = np.append(ca[keep], ca[~keep].sum()), np.append(cb[keep], cb[~keep].sum())
    table = np.stack([ca, cb])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    ok = expected.min(axis=0) > 0
    chi2 = float(((table[:, ok] - expected[:, ok]) ** 2 / expected[:, ok]).sum())
    dof = int(ok.sum()) - 1
    assert dof >= 2
    from scipy.stats import chi2 as dist

    assert dist.sf(chi2, dof) > 1e-3, (chi2, dof)


@pytest.fixture(scope="module")
def ngram_llm(smollm):
    """The `llm` fixture's engine with n-gram drafting on (its programs come from the program store)."""
    from engine import LLM

    return LLM(smollm, **ENGINE, ngram=True)


def test_ngram_drafts_copy_from_the_prompt_and_keep_the_tokens(llm, ngram_llm):
    lines = "\n".join(f"Shelf {i}: a {'copper' if i % 3 == 0 else 'wooden'} box of {i * 7} nails." for i in range(12))
    ask = [{"role": "user", "content": f"{lines}\n\nQuote every line that mentions copper, exactly as written."}]
    p = [SamplingParams(temperature=0, max_tokens=60), SamplingParams(temperature=0.8, max_tokens=60, seed=3)]
    plain = llm.chat([ask, ask], p)
    spec = ngram_llm.chat([ask, ask], p)  # the engine's own choice between verifying and decoding, by timings
    assert_same(spec, plain, p)
    timing = ngram_llm.engine.timing  # both rows drafted nearly always, yet decoding was measured beside verifying
    assert {nb for kind, nb, *_ in timing if kind == "verify"} <= {nb for kind, nb, *_ in timing if kind == "decode"}
    # What the prompt's lines give as drafts, whatever this host's timings choose (on `auto` a verify pass of two rows
    # costs about as much as the decode steps it may save here, so the choice above can stop verifying early); the
    # prompt computed again, not from the prefix cache, as above.
    with verifying_always(ngram_llm.engine):
        always = ngram_llm.chat([ask, ask], p, prompt_cache_max_len=0)
    assert_same(always, plain, p)
    assert always[0].accepted > 10 and math.isfinite(always[0].accepted / always[0].drafted)


def test_the_verify_or_decode_choice_tries_each_kind_then_goes_by_tokens_per_second():
    rows = [(100, 3.0), (100, 0.0)]  # (tokens left, expected accepted drafts) per running choice
    assert worth_verifying(rows, 4, None, None) and not worth_verifying(rows, 4, 0.1, None)
    assert worth_verifying(rows, 4, 0.1, 0.2)  # 5 tokens in 0.1 s against 8 in 0.2 s
    assert not worth_verifying(rows, 4, 0.2, 0.2)
    assert not worth_verifying([(3, 8.0)], 4, 0.1, 0.1)  # both capped at the 3 tokens left: a tie decodes


def test_prediction_and_speculation_over_http_with_the_official_client(api, client, monkeypatch):
    """OpenAI's `prediction` (chat; streamed too) and Fireworks' `speculation` (completions, text or token ids):
    the same tokens as without, OpenAI's accepted / rejected prediction tokens in usage, Fireworks' speculation
    counts in perf_metrics; malformed fields are 400s that name them."""
    import openai

    monkeypatch.setattr(api.engine, "verify_always", True)  # the counts need verify steps, whatever the timings say
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0)
    text = plain.choices[0].message.content
    spec = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                          prediction={"type": "content", "content": text},
                                          extra_body={"perf_metrics_in_response": True})
    assert spec.choices[0].message.content == text
    details = spec.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 20 and details.rejected_prediction_tokens >= 0
    perf = spec.model_extra["perf_metrics"]
    assert perf["speculation-prompt-tokens"] == len(api.model.tokenizer.encode(text, add_special_tokens=False))
    assert perf["speculation-prompt-matched-tokens"] == details.accepted_prediction_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True},
        prediction={"type": "content", "content": [{"type": "text", "text": text}]}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens > 20
    fmt = {"type": "json_object"}
    framed = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30, temperature=0,
                                            response_format=fmt).choices[0].message.content
    for guess in (framed, '{"add": "a + b"}'):  # constrained requests draft too (what the grammar accepts)
        again = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30, temperature=0,
                                               response_format=fmt, prediction={"type": "content", "content": guess})
        assert again.choices[0].message.content == framed
    assert again.usage.completion_tokens_details.rejected_prediction_tokens > 0
    prompt = "def add(a, b):\n"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0)
    ids = api.model.tokenizer.encode(base.choices[0].text, add_special_tokens=False)
    for guess in (base.choices[0].text, ids, CODE):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                        extra_body={"speculation": guess})
        assert got.choices[0].text == base.choices[0].text
        assert got.usage.completion_tokens_details.accepted_prediction_tokens >= (20 if guess != CODE else 0)
    for bad, param in (({"prediction": {"type": "image", "content": "x"}}, "prediction"),
                       ({"prediction": 3}, "prediction"), ({"speculation": [1, "a"]}, "speculation"),
                       ({"speculation": [10 ** 9]}, "speculation"),
                       ({"speculation": "x", "prediction": "y"}, "speculation")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body=bad)
        assert e.value.body["param"] == param


@pytest.fixture(scope="module")
def self_draft(smollm):
    """The `llm` fixture's engine with the model itself as its draft model (vLLM's `speculative_config`): greedy
    drafts that the greedy requests keep nearly always."""
    from engine import LLM

    return LLM(smollm, **ENGINE, speculative_config={"model": smollm, "num_speculative_tokens": 4})


@pytest.fixture(scope="module")
def random_draft(smollm, tmp_path_factory):
    """A 2-layer random Llama of SmolLM2's tokenizer: a draft model whose drafts nearly always lose."""
    from helpers import tiny_llama
    from models import load_model

    folder = str(tmp_path_factory.mktemp("draft"))
    tiny_llama(folder, smollm.tokenizer.folder, [])
    return load_model(folder)


def test_a_draft_model_drafts_and_the_tokens_are_the_same(llm, self_draft):
    plain = llm.chat([ASK] * len(SETTINGS), SETTINGS)
    eng = self_draft.engine
    with verifying_always(eng):
        spec = self_draft.chat([ASK] * len(SETTINGS), SETTINGS)
    assert_same(spec, plain, SETTINGS)
    greedy = spec[0]
    n = len(greedy.outputs[0].token_ids)
    assert greedy.drafted >= n - 10 and greedy.accepted >= 0.8 * n - 10  # it drafts for itself: nearly all kept
    for a, b in zip(spec[-1].outputs[0].logprobs, plain[-1].outputs[0].logprobs):
        assert a[0] == b[0]
    # a drafting call writes each row's tokens since the last (a prompt in one call, then one or two a verify): the
    # calls are about the verify steps, not the tokens
    assert eng.draft.calls <= 2 * eng.verifies + len(SETTINGS) + 4
    assert eng.runner.rc.extra_kv_bytes > 0  # the draft pool's pages came out of the same budget
    compiles = eng.runner.compiles + eng.draft.compiles
    again = [SamplingParams(temperature=t, max_tokens=24, seed=i) for i, t in enumerate((0, 0.7, 1.0))]
    with verifying_always(eng):
        assert eng.flush_cache()  # each call prefills alike, so it draws, drafts and keeps alike
        self_draft.chat([ASK] * 3, again)
        before = eng.runner.compiles + eng.draft.compiles
        assert eng.flush_cache()
        self_draft.chat([ASK] * 3, again)  # the same steps again: every shape seen, nothing compiles
    assert eng.runner.compiles + eng.draft.compiles == before >= compiles


def test_drafts_that_lose_change_nothing_and_a_vocabulary_must_match(llm, random_draft, smollm, tmp_path):
    from engine import LLM
    from helpers import tiny_llama
    from models import load_model

    drafting = LLM(smollm, **ENGINE, speculative_config={"model": random_draft})
    p = [SamplingParams(temperature=0, max_tokens=30), SamplingParams(temperature=0.8, max_tokens=30, seed=5)]
    plain = llm.chat([ASK, ASK], p)
    with verifying_always(drafting.engine):
        spec = drafting.chat([ASK, ASK], p)
    assert_same(spec, plain, p)
    assert spec[0].drafted > 0 and spec[0].accepted < spec[0].drafted  # it drafted, and lost
    tiny_llama(str(tmp_path), smollm.tokenizer.folder, ["<|extra|>"])  # one token more than SmolLM2's
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(smollm, **ENGINE, speculative_config={"model": load_model(str(tmp_path))})
    for bad in ({"method": "eagle", "model": "x"}, {"model": "x", "k": 3}, {"num_speculative_tokens": 2},
                {"model": "x", "num_speculative_tokens": 0}, {"method": "ngram", "model": "x"}, {"model": 5}):
        with pytest.raises(ValueError, match="speculative_config"):
            LLM(smollm, **ENGINE, speculative_config=bad)


def test_a_draft_model_over_http_with_the_official_client(smollm, self_draft):
    """`--speculative-model` and vLLM's `--speculative-config` parse to the engine's settings; a live server with a
    draft model streams the tokens the engine gives without one, and counts its drafts in usage."""
    import openai

    from conftest import live_server
    from engine.runner import RunnerConfig
    from server.__main__ import parse_args, runner_config

    args = parse_args(["--speculative-config", '{"model": "m", "num_speculative_tokens": 3}'])
    assert args.speculative_model == "m" and runner_config(args).draft_tokens == 3
    assert runner_config(parse_args(["-md", "m"])).draft_tokens == 5 and not runner_config(parse_args([])).ngram
    ngram = runner_config(parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 6, '
                                                              '"prompt_lookup_max": 4}']))
    assert ngram.ngram and ngram.draft_tokens == 6
    for bad in (["--speculative-config", '{"method": "mtp"}'], ["--speculative-config", "{"],
                ["--speculative-config", '{"model": ""}'], ["--speculative-config", "[1]"],
                ["-md", "m", "--speculative-ngram", "3"], ["-md", "m", "-dp", "2"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    with verifying_always(self_draft.engine):
        want = self_draft.generate(["def add(a, b):\n"], SamplingParams(temperature=0, max_tokens=24))[0]
    for api in live_server(smollm, RunnerConfig(**ENGINE), draft=smollm):
        api.engine.verify_always = True
        client = openai.OpenAI(base_url=api.url + "/v1", api_key="x")
        chunks = list(client.completions.create(model=MODEL, prompt="def add(a, b):\n", max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
        details = chunks[-1].usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 10 and api.engine.draft.calls > 0
        metrics = urllib.request.urlopen(api.url + "/metrics").read().decode()
        stats = api.engine.stats()
        assert stats["spec_decode_accepted_tokens"] == details.accepted_prediction_tokens
        for name in ("verifies", "drafts", "draft_tokens", "accepted_tokens", "draft_calls"):
            assert f"sparkler_spec_decode_{name}_total {float(stats['spec_decode_' + name])}" in metrics
        kept, drafts = stats["spec_decode_accepted_tokens"], stats["spec_decode_drafts"]  # vLLM's and SGLang's names
        assert f'vllm:spec_decode_num_drafts_total{{model_name="{MODEL}"}} {float(drafts)}' in metrics
        length = float(re.search(r'sglang:spec_accept_length\{model_name="[^"]*"\} (\S+)', metrics).group(1))
        rate = float(re.search(r'sglang:spec_accept_rate\{model_name="[^"]*"\} (\S+)', metrics).group(1))
        assert length == pytest.approx(1 + kept / drafts) and rate == pytest.approx(
            kept / stats["spec_decode_draft_tokens"]) and 0 < rate <= 1
