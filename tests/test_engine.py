"""The engine on the packaged SmolLM2: batch invariance, seeds, compilations, stopping, n, logprobs, mirostat."""

import math

import numpy as np
import pytest

from engine import SamplingParams
from engine.llm import encode_chat
from helpers import host_decided, recording

CHAT = [{"role": "user", "content": "Name three colours."}]
OTHERS = [
    ([{"role": "user", "content": "Count to ten."}], SamplingParams(temperature=0.9, top_p=0.8, max_tokens=20, seed=3)),
    ([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=1.2, top_k=5, max_tokens=12, seed=4)),
    ([{"role": "user", "content": "What is 2+2?"}], SamplingParams(temperature=0.7, min_p=0.1,
                                                                   repetition_penalty=1.3, max_tokens=16, seed=5)),
    ([{"role": "user", "content": "Tell a joke."}], SamplingParams(temperature=1.0, typical_p=0.8,
                                                                  frequency_penalty=1.0, max_tokens=16, seed=6)),
    ([{"role": "user", "content": "Hi"}], SamplingParams(temperature=1.0, mirostat_target=4.0, max_tokens=16, seed=7)),
    ([{"role": "user", "content": "Bye"}], SamplingParams(temperature=0.8, presence_penalty=1.5,
                                                         logit_bias={"11": 5.0}, max_tokens=16, seed=8)),
]


def test_greedy_is_the_same_alone_and_in_a_mixed_batch(llm):
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.chat(CHAT, greedy)[0].outputs[0].token_ids
    outs = llm.chat([CHAT] + [m for m, _ in OTHERS], [greedy] + [p for _, p in OTHERS])
    assert outs[0].outputs[0].token_ids == alone


def test_seeded_sampling_is_the_same_across_batch_compositions(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234)
    alone = llm.chat(CHAT, p)[0].outputs[0].token_ids
    outs = llm.chat([m for m, _ in OTHERS[:3]] + [CHAT], [q for _, q in OTHERS[:3]] + [p])
    assert outs[-1].outputs[0].token_ids == alone
    other_seed = llm.chat(CHAT, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=99))
    assert other_seed[0].outputs[0].token_ids != alone


def test_a_request_joining_running_ones_draws_its_first_token_on_its_row_alone(llm):
    """A request seated in slot 8 while 8 others decode samples its first token in a one-row call (the sampler runs
    on the rows that draw, not on every slot up to the highest; counted by the call's rows), and its seeded tokens
    are the ones it gets alone."""
    p = SamplingParams(temperature=1.0, top_k=50, max_tokens=12, seed=77, logit_bias={"11": 3.0})
    alone = llm.chat(CHAT, p)[0].outputs[0].token_ids
    eng, runner = llm.engine, llm.engine.runner
    busy = [eng.make_request(list(range(5, 12 + i)), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
            for i in range(8)]
    for r in busy:
        eng.add(r)
    while len(eng.sched.running) < 8:
        eng.step()
    first, rows = runner._first, []

    class Counted:  # the first-draw program, its calls' rows recorded
        def __call__(self, *args, **statics):
            rows.append(len(args[3]))
            return first(*args, **statics)

    late = eng.make_request(encode_chat(llm.model, CHAT), p)
    runner._first, slots = Counted(), set()
    try:
        eng.add(late)
        while not late.finished:
            eng.step()
            slots.add(late.choices[0].slot)
    finally:
        runner._first = first
    for r in busy:
        eng.abort(r.id)
    while eng.has_work():
        eng.step()
    seated = max(slots)  # the slot it held (-1 once it ended)
    assert runner.rows_for([seated]) >= 8 and rows == [1]
    assert late.choices[0].token_ids == alone


def test_settings_do_not_recompile(llm):
    """20 requests with different settings and prompt lengths (one bucket), after a warm-up round with the same
    schedule (ignore_eos fixes every length; the prefix cache off, else the second round would go on from the
    first's pages: other shapes) but other settings: no new compilation; their 30 choices' sampler rows go to the
    devices in one call."""
    rng = np.random.default_rng(0)
    prompts = [[{"role": "user", "content": "word " * int(rng.integers(1, 8))}] for _ in range(20)]
    ns = [1 + i % 2 for i in range(20)]
    llm.chat(prompts, [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=n) for n in ns],
             prompt_cache_max_len=0)
    before = llm.engine.runner.compiles
    params = [SamplingParams(temperature=float(rng.uniform(0, 1.5)), top_k=int(rng.integers(0, 100)),
                             top_p=float(rng.uniform(0.5, 1)), min_p=float(rng.uniform(0, 0.2)),
                             typical_p=float(rng.uniform(0.5, 1)), repetition_penalty=float(rng.uniform(0.8, 1.5)),
                             frequency_penalty=float(rng.uniform(-1, 1)), presence_penalty=float(rng.uniform(-1, 1)),
                             mirostat_target=3.0 if i % 5 == 0 else None, logit_bias={str(i): 2.0},
                             max_tokens=8, seed=i, ignore_eos=True, n=n) for i, n in enumerate(ns)]
    installs = llm.engine.runner._set_rows.calls
    outs = llm.chat(prompts, params, prompt_cache_max_len=0)
    assert all(len(c.token_ids) == 8 for o in outs for c in o.outputs)
    assert llm.engine.runner.compiles == before
    assert llm.engine.runner._set_rows.calls == installs + 1


def test_stop_strings_max_tokens_and_n(llm):
    out = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert len(out.text) > 10
    stop = out.text[5:9]
    cut = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=64, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == out.text[:out.text.index(stop)]
    short = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    many = llm.chat(CHAT, SamplingParams(temperature=1.0, max_tokens=16, n=3, seed=5))[0].outputs
    assert [c.index for c in many] == [0, 1, 2] and len({tuple(c.token_ids) for c in many}) > 1


def test_ignore_eos_runs_to_max_tokens(llm):
    out = llm.chat([{"role": "user", "content": "Say OK."}],
                   SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 40
    assert not set(out.token_ids) & set(llm.model.eos_ids)


def test_logprobs_and_echo(llm):
    res = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=5, logprobs=True, top_logprobs=3, echo=True))[0]
    lps = res.outputs[0].logprobs
    assert len(lps) == 5
    for tok, lp, tops in lps:
        assert len(tops) == 3 and tops[0][0] == tok and math.isclose(tops[0][1], lp, abs_tol=1e-5)
    chosen, top_ids, top_lps, rank = res.prompt_logprobs
    assert len(chosen) == len(res.prompt_token_ids)
    assert np.all(chosen[:-1] <= top_lps[:-1, 0] + 1e-5)
    for j in range(len(chosen) - 1):  # the rank of a token among the top 20 is its place there
        ids = top_ids[j].tolist()
        if res.prompt_token_ids[j + 1] in ids:
            assert rank[j] == ids.index(res.prompt_token_ids[j + 1]) + 1
        else:
            assert rank[j] > len(ids)


@pytest.mark.parametrize("tau", [2.0, 3.0])  # within reach: its own mean surprise here is ~4 bits
def test_mirostat_holds_mean_surprise_near_target(llm, tau):
    p = SamplingParams(temperature=1.0, mirostat_target=tau, mirostat_lr=0.1, max_tokens=256, ignore_eos=True,
                       logprobs=True, seed=11)
    out = llm.chat([{"role": "user", "content": "Write a long story about a dragon."}], p)[0].outputs[0]
    surprise = [-lp / math.log(2) for _, lp, _ in out.logprobs]
    assert len(surprise) == 256
    assert abs(np.mean(surprise) - tau) < 1.0, np.mean(surprise)


def table_rows(eng, prompts):
    """Fresh pages for each prompt, as page-table rows (the caller releases `pages`)."""
    rows, pages = [], []
    for p in prompts:
        got = eng.sched.pools[0].allocate(-(-len(p) // eng.page_size))
        row = np.zeros(eng.runner.max_pages, np.int32)
        row[:len(got)] = got
        rows.append(row)
        pages += got
    return rows, pages


def test_batched_prefill_equals_one_prompt_at_a_time(llm):
    eng = llm.engine  # idle between tests: every page but the cached ones is free
    prompts = [list(range(100, 100 + n)) for n in (5, 20, 31, 90, 200)]  # two length buckets, one chunked-size
    rows, pages = table_rows(eng, prompts)
    alone = []
    for row, p in zip(rows, prompts):
        eng.runner.prefill(0, row, p)
        alone.append(np.asarray(eng.runner.last_logits[0]))
    rows2, pages2 = table_rows(eng, prompts)
    eng.runner.prefill_many([(slot, row, p, 0) for slot, (row, p) in enumerate(zip(rows2, prompts))])
    together = [np.asarray(eng.runner.last_logits[slot]) for slot in range(len(prompts))]
    eng.sched.pools[0].release(pages + pages2)
    for a, t in zip(alone, together):
        np.testing.assert_allclose(t, a, atol=1e-4 * np.abs(a).max())
        assert int(np.argmax(t)) == int(np.argmax(a))


def test_decodes_dispatched_ahead_of_the_read_back_change_no_token(llm):
    """The engine dispatches each step's work (prefills, first draws, the decode) before reading back the step before
    it (the decode's input tokens still on the device). Counted; and the tokens are those of an engine that reads
    every draw back first: greedy and seeded, n > 1, a stop string, EOS, max_tokens not a multiple of the steps.
    Every page and slot comes back."""
    eng = llm.engine
    base = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    stop = base.text[20:26]
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
              SamplingParams(temperature=0.9, top_p=0.9, max_tokens=17, seed=2, n=2, ignore_eos=True)]
    params += [p for _, p in OTHERS[1:4]]
    chats = [CHAT, CHAT] + [m for m, _ in OTHERS[1:4]]
    eng.overlap = False
    try:
        before = eng.ahead
        want = llm.chat(chats, params)
        assert eng.ahead == before
    finally:
        eng.overlap = True
    got = llm.chat(chats, params)
    assert eng.ahead > before + 2
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].text == base.text[:base.text.index(stop)]
    assert {c.finish_reason for o in got for c in o.outputs} == {"stop", "length"}
    assert len(got[1].outputs[1].token_ids) == 17
    assert not eng.pending and len(eng.sched.free) == eng.runner.slots
    assert all(r == 0 for r in eng.sched.pools[0].refs)


def test_programs_the_gpu_need_not_wait_on_change_no_token(llm):
    """On a GPU (`RunnerConfig.sampler_branches`) a batch whose rows are all `sampler.is_plain` decodes and draws
    its first tokens with programs holding nothing XLA's GPU runtime decides on the host (a conditional makes it wait
    for the device, so the launch would wait for the work queued before it and the engine could not work ahead);
    a batch with one row that wants more runs the programs with the sampler's conditionals, or with `select` ones
    that compute every transform instead (`lean` ones where every row is `sampler.is_lean`, `dry` ones where a row
    uses DRY, whose passes `select` leaves out). Counted by call, checked
    in the programs' text, and the tokens and logprobs are those of the engine with the conditionals alone."""
    runner = llm.engine.runner
    plain = [SamplingParams(temperature=0, max_tokens=12, logprobs=True),
             SamplingParams(temperature=0.8, presence_penalty=0.5, max_tokens=11, seed=3),
             SamplingParams(temperature=0, top_p=0.5, max_tokens=9)]  # greedy: its truncation changes nothing
    lean = plain + [SamplingParams(temperature=0.9, top_p=0.8, max_tokens=13, seed=4)]
    more = lean + [SamplingParams(temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)]
    dry = lean + [SamplingParams(temperature=0, max_tokens=10, dry_multiplier=0.8, dry_allowed_length=1)]
    chats = [CHAT] + [m for m, _ in OTHERS[:4]]

    def run(n, params):  # no prefix cache: a cached prefix attends in another order, its logits' last bits may differ
        return llm.chat(chats[:n], params, prompt_cache_max_len=0)

    want = run(3, plain), run(4, lean), run(5, more), run(5, dry)
    calls, decode, first, mode = [], runner._decode, runner._first, runner.branches

    def recorded(fn):
        def call(*args, **statics):
            calls.append((fn.name, statics["branches"]))
            return fn(*args, **statics)
        return call

    for branches in ("plain", "select"):
        runner.branches, runner._decode, runner._first = branches, recorded(decode), recorded(first)
        calls.clear()
        try:
            got = [run(3, plain)]
            assert set(calls) == {("decode", "plain"), ("first", "plain")}
            for n, params, other in ((4, lean, "cond" if branches == "plain" else "lean"),
                                     (5, more, "cond" if branches == "plain" else "select"),
                                     (5, dry, "cond" if branches == "plain" else "dry")):
                calls.clear()
                got.append(run(n, params))
                # rows that finish early may leave the rest to a lesser program
                lesser = {"dry": {"select", "lean", "plain"}, "select": {"lean", "plain"}, "lean": {"plain"},
                          "cond": {"plain"}}[other]
                assert {("decode", other), ("first", other)} <= set(calls) <= {
                    ("decode", other), ("first", other), *(("decode", v) for v in lesser)}, calls
            runner._decode, runner._first = decode, first
            variants = [st["branches"] for fn, _, st in runner.warm_jobs() if fn in (decode, first)]
            names = runner.variants
            assert [variants.count(v) for v in names] == [len(variants) // len(names)] * len(names) > [0]
            assert set(variants) == set(names) == ({"plain", "cond"} if branches == "plain" else {
                "plain", "lean", "select", "dry"})  # the warm-up compiles every variant of every shape
        finally:
            runner.branches, runner._decode, runner._first = mode, decode, first
        for w, g in zip(want, got):
            assert [o.outputs[0].token_ids for o in g] == [o.outputs[0].token_ids for o in w]
            for o, p in zip(w, g):
                np.testing.assert_allclose([lp for _, lp, _ in p.outputs[0].logprobs or []],
                                           [lp for _, lp, _ in o.outputs[0].logprobs or []], rtol=1e-5)
    nb = runner.batch_buckets[0]
    for branches in ("plain", "select", "lean", "dry", "cond"):
        for fn, args, statics in (runner._decode_job(nb, runner.attend[0], 4, branches),
                                  runner._first_job(nb, branches)):
            found = host_decided(fn.fn.lower(*args, **statics).as_text())
            assert bool(found) == (branches == "cond"), (fn.name, branches, found)


def test_a_step_that_seats_a_request_queues_its_decode_before_reading_anything_back(llm):
    """One step ahead with admissions: the step that seats a request dispatches its prefill, first draw and decode
    and reads nothing back (the decode's input token is the first draw's, on the device); the next step seats another
    and dispatches the decode of both before reading the first one's tokens back. The tokens equal those of an engine
    that reads every draw back first."""
    eng, steps = llm.engine, llm.engine.runner.rc.decode_steps
    prompts = [list(range(5, 40)), list(range(50, 70))]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=4, max_tokens=9, ignore_eos=True)]
    got = {}
    for overlap in (True, False):
        eng.overlap = overlap
        assert eng.flush_cache()  # each run prefills alike (a cached prefix's logits may differ in the last bits)
        try:
            a, b = (eng.make_request(p, sp) for p, sp in zip(prompts, params))
            eng.add(a)
            eng.step()
            if overlap:
                assert not a.choices[0].token_ids and a.choices[0].lag == 1 + steps
                assert [inf.key is None for inf in eng.pending] == [True, False]  # a first draw, then a decode
            eng.add(b)
            ahead = eng.ahead
            eng.step()
            if overlap:
                assert len(a.choices[0].token_ids) == 1 + steps and not b.choices[0].token_ids
                assert eng.ahead == ahead + 1 and b.choices[0].lag == 1 + steps
            while eng.has_work():
                eng.step()
            got[overlap] = [a.choices[0].token_ids, b.choices[0].token_ids]
        finally:
            eng.overlap = True
    assert got[True] == got[False] and [len(t) for t in got[True]] == [12, 9]
    assert not eng.pending and len(eng.sched.free) == eng.runner.slots


def test_a_thinking_budget_far_from_its_end_leaves_the_engine_ahead_and_unmasked(llm):
    """A thinking budget needs the host only at the first token and near its end (`Gate.active`, counting the
    tokens still in flight): in between the engine dispatches ahead of the read-back and decodes with no mask, and
    the block still closes after exactly `budget` tokens, as when every draw is read back first."""
    from engine.thinking import Budget

    eng, steps = llm.engine, llm.engine.runner.rc.decode_steps
    budget, close = 3 * steps + 2, 40000
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=budget + 6, ignore_eos=True)
    got = {}
    with recording(eng.runner, ("decode", "decode_logits", "draw")) as calls:
        try:
            for overlap in (True, False):
                eng.overlap, ahead = overlap, eng.ahead
                calls.clear()
                req = eng.make_request(list(range(60, 90)), params, thinking=Budget(budget, 39999, close, opened=True))
                eng.add(req)
                while eng.has_work():
                    eng.step()
                # each call: a decode's steps, whether a draw is masked, a forward pass of one step
                seen = [(name, args[4] if name == "decode" else args[1] is not None if name == "draw" else 1)
                        for name, args in calls]
                got[overlap] = req.choices[0].token_ids, eng.ahead - ahead, seen
        finally:
            eng.overlap = True
    tokens, ahead, calls = got[True]
    assert tokens == got[False][0] and tokens[budget] == close and close not in tokens[:budget]
    assert ahead >= 2 and got[False][1] == 0  # decodes dispatched before the tokens before them were read back
    # full decodes while the end is far, one-step forward passes near it (a draw each), and one mask: the close tag's
    at = calls.index(("draw", True))
    assert ("decode", steps) in calls and calls.count(("draw", True)) == 1 and calls[at - 1] == ("decode_logits", 1)
    assert 1 <= calls.count(("decode_logits", 1)) <= steps, calls


def test_a_long_prompt_prefills_a_chunk_per_step_while_others_decode(llm, smollm):
    from engine.llm import encode_chat

    eng = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want_short = llm.chat(CHAT, greedy)[0].outputs[0].token_ids
    long_prompt = list(range(200, 200 + 900))  # two chunks of at most 512
    want_long = llm.generate([long_prompt], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    short = eng.make_request(encode_chat(smollm, CHAT), greedy)
    eng.add(short)
    eng.step()
    long = eng.make_request(long_prompt, SamplingParams(temperature=0, max_tokens=8), prompt_cache_max_len=0)
    eng.add(long)
    seen = []
    while not long.choices[0].token_ids:
        eng.step()
        seen.append(len(short.choices[0].token_ids))
    # a chunk a step, the short stream advancing during both; the long prompt's first token is read back by the step
    # after its last chunk (the engine reads a step's draws back once the next step's work is dispatched)
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2]
    while eng.has_work():
        eng.step()
    assert short.choices[0].token_ids == want_short and long.choices[0].token_ids == want_long


def test_the_load_report_counts_requests_not_queued_yet_as_their_choices_and_prompt_tokens(llm):
    """`Engine.loads` (SGLang's `/get_load`): a request added but not yet taken into the queue counts its n choices
    as waiting sequences and its prompt's tokens once, as a queued one does."""
    eng = llm.engine
    ids = list(range(1000, 1037))
    eng.add(eng.make_request(ids, SamplingParams(n=3, max_tokens=1, temperature=0.8, seed=1)))
    try:
        loads = eng.loads()
        assert sum(x["num_waiting_reqs"] for x in loads) == 3 and sum(x["num_pending_tokens"] for x in loads) == 37
    finally:
        while eng.has_work():
            eng.step()
    assert sum(x["num_waiting_reqs"] for x in eng.loads()) == 0
