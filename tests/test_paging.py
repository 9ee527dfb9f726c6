"""The paged KV cache on the packaged SmolLM2: prefix reuse, isolation, eviction, n > 1 sharing and preemption (that
the warm-up covers short requests' misses and hits is tests/test_cli.py's, on `sparkler serve`).

A prompt read from the prefix cache, or from pages shared by `n` choices, gives the tokens of the same prompt computed
whole: in float32 (`llm_f32`), where the two computations' logits differ by ~1e-5 and a draw does not move. Under the
default `auto` (int4 on this CPU) they differ by ~1e-3: each product rounds its activations in groups of 32, which
amplifies the attention's different summation order, so a seeded draw can move (docs/ARCHITECTURE.md).

Even in float32 a draw moves when its uniform falls within ~1e-5 of a boundary between two tokens. Over a nucleus of
thousands of tail tokens of ~1e-4 each such boundaries are everywhere (a top_p = 0.9 draw moved so on a Xeon with
AVX-512, whose summation order differs), so the seeded requests keep the 10 likeliest tokens, each of a share large
enough that a move is rare."""

import numpy as np
import pytest
from helpers import run_all, unique_prefix

from engine import SamplingParams
from engine.engine import Engine
from engine.llm import encode_chat
from engine.params import InvalidRequest
from engine.runner import RunnerConfig, plan_max_len, plan_pages

GREEDY = SamplingParams(temperature=0, max_tokens=16)
SEEDED = SamplingParams(temperature=1.0, top_k=10, top_p=0.9, max_tokens=16, seed=42)


def ids(out):
    """Token ids of every choice of every output."""
    return [c.token_ids for o in out for c in o.outputs]


class Widths:
    """A prefill program that records each call's tokens per row."""

    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def __call__(self, *args, **statics):
        self.seen.append(args[3].shape[1])
        return self.fn(*args, **statics)

    def __getattr__(self, name):
        return getattr(self.fn, name)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_completions_hit_miss_and_disabled_give_the_same_tokens(llm_f32, params):
    ps = llm_f32.engine.page_size
    base = unique_prefix(1 if params is GREEDY else 2, 6 * ps + 5)
    cold = llm_f32.generate([base], params)
    assert cold[0].cached_tokens == 0
    runner = llm_f32.engine.runner
    runner._prefill = widths = Widths(runner._prefill)
    try:
        hot = llm_f32.generate([base], params)
    finally:
        runner._prefill = widths.fn
    # The prompt repeated: its full pages are mapped, and the first 4 of the 5 tokens after them copied from the page
    # the first run wrote (its prompt's tail and its answer's head); only the last token is computed.
    assert hot[0].cached_tokens == 6 * ps + 4 and ids(hot) == ids(cold)
    assert widths.seen == [1]
    off = llm_f32.generate([base], params, prompt_cache_max_len=0)
    assert off[0].cached_tokens == 0 and ids(off) == ids(cold)
    capped = llm_f32.generate([base], params, prompt_cache_max_len=2 * ps + 3)
    assert capped[0].cached_tokens == 2 * ps + 3 and ids(capped) == ids(cold)
    # All but the last few tokens shared: the shared full pages are reused, and the next page's first 2 tokens.
    near = base[:-3] + [7, 8, 9]
    got = llm_f32.generate([near], params)  # first: its whole computation would leave pages it could go on from
    want = llm_f32.generate([near], params, prompt_cache_max_len=0)
    assert got[0].cached_tokens == 6 * ps + 2 and ids(got) == ids(want)
    # A prompt ending exactly on a page boundary: its last page is copied but for its last token (its logits).
    edge = base[:4 * ps]
    got = llm_f32.generate([edge], params)
    want = llm_f32.generate([edge], params, prompt_cache_max_len=0)
    assert got[0].cached_tokens == 4 * ps - 1 and ids(got) == ids(want)


def test_a_conversation_goes_on_from_the_answer_pages(llm_f32):
    """A second turn reuses the first's prompt and answer up to the answer's last written token (its partial last
    page, kept as the first turn let go), and gives the tokens of the same prompt computed whole."""
    eng = llm_f32.engine
    turn = [{"role": "user", "content": "Count from one to twenty in words, please, with commas."}]
    first = llm_f32.chat(turn, SamplingParams(temperature=0, max_tokens=21, ignore_eos=True))[0]
    written = len(first.prompt_token_ids) + 20  # the last drawn token's K/V is never written
    assert written % eng.page_size  # the answer ends in a partial page (else this test would test full pages only)
    again = turn + [{"role": "assistant", "content": first.outputs[0].text}, {"role": "user", "content": "Again."}]
    prompt = encode_chat(llm_f32.model, again)
    seq = first.prompt_token_ids + first.outputs[0].token_ids
    shared = next((i for i, (a, b) in enumerate(zip(prompt, seq)) if a != b), min(len(prompt), len(seq)))
    got = llm_f32.chat(again, GREEDY)
    want = llm_f32.chat(again, GREEDY, prompt_cache_max_len=0)
    assert got[0].cached_tokens == min(shared, written) > written // eng.page_size * eng.page_size
    assert ids(got) == ids(want)
    for pool in eng.sched.pools:
        pool.check()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_chat_with_a_shared_system_prompt_reuses_it(llm_f32, params):
    ps = llm_f32.engine.page_size
    words = f"You are a terse assistant ({params.temperature}) who answers briefly. "
    system = {"role": "system", "content": words * 6}
    first = llm_f32.chat([system, {"role": "user", "content": "Name a fruit."}], params)
    assert first[0].cached_tokens < ps  # at most the template's head, from the first page of another conversation
    second = [system, {"role": "user", "content": "Name a colour."}]
    got = llm_f32.chat(second, params)
    want = llm_f32.chat(second, params, prompt_cache_max_len=0)
    shared = len(encode_chat(llm_f32.model, [system])) - 1  # the system turn, as the template writes it
    assert want[0].cached_tokens == 0 and got[0].cached_tokens >= (shared // ps - 1) * ps > 0
    assert ids(got) == ids(want)


def test_a_burst_sharing_an_uncached_prefix_computes_it_once(llm_f32):
    """Requests arriving together with the same uncached system prompt: the first computes it, the rest wait for its
    pages and compute only their own tokens, and each gives the tokens of its prompt computed whole (a long prompt's
    chunks, each offered to the cache as it is written: tests/test_scheduler.py)."""
    ps, pools = llm_f32.engine.page_size, llm_f32.engine.sched.pools
    system = unique_prefix(700, 6 * ps)
    prompts = [system + unique_prefix(701 + i, 9) for i in range(4)]
    before = sum(p.queried - p.hit for p in pools)
    got = llm_f32.generate(prompts, GREEDY)
    computed = sum(p.queried - p.hit for p in pools) - before
    assert [o.cached_tokens for o in got] == [0, 6 * ps, 6 * ps, 6 * ps]
    assert computed == len(system) + 4 * 9
    want = llm_f32.generate(prompts, GREEDY, prompt_cache_max_len=0)
    assert ids(got) == ids(want)
    for pool in pools:
        pool.check()


def test_isolation_keys_never_share(llm_f32):
    base = unique_prefix(3, 5 * llm_f32.engine.page_size)
    a = llm_f32.generate([base], GREEDY, prompt_cache_isolation_key="tenant-a")
    b = llm_f32.generate([base], GREEDY, prompt_cache_isolation_key="tenant-b")
    none = llm_f32.generate([base], GREEDY)
    a2 = llm_f32.generate([base], GREEDY, prompt_cache_isolation_key="tenant-a")
    assert [a[0].cached_tokens, b[0].cached_tokens, none[0].cached_tokens] == [0, 0, 0]
    assert a2[0].cached_tokens == 5 * llm_f32.engine.page_size - 1  # all but the last token (its logits)
    assert ids(a) == ids(b) == ids(none) == ids(a2)


def test_n_maps_the_prompt_pages_into_every_choice(llm_f32):
    eng = llm_f32.engine
    prompt = unique_prefix(4, 3 * eng.page_size + 7)  # three full pages and a partial one
    req = eng.make_request(prompt, SamplingParams(temperature=1.0, max_tokens=6, n=6, seed=3, ignore_eos=True))
    eng.add(req)
    eng.step()
    pages = [c.pages for c in req.choices]
    full = pages[0][:3]
    assert all(p[:3] == full for p in pages)  # the full prompt pages are mapped, not copied
    assert all(eng.sched.pools[0].refs[p] == 6 for p in full)
    partial = [p[3] for p in pages]
    assert len(set(partial)) == 6 and all(eng.sched.pools[0].refs[p] == 1 for p in partial)  # each choice its own copy
    while eng.has_work():
        eng.step()
    assert all(eng.sched.pools[0].refs[p] == 0 for p in full + partial)
    assert len({tuple(c.token_ids) for c in req.choices}) > 1
    again = llm_f32.generate([prompt], SamplingParams(temperature=1.0, max_tokens=6, n=6, seed=3, ignore_eos=True))
    assert ids(again) == [c.token_ids for c in req.choices] and again[0].cached_tokens == len(prompt) - 1


def test_nothing_leaks_after_a_mixed_run(llm):
    eng = llm.engine
    base = unique_prefix(5, 40)
    llm.generate([base, base[:20], base + [5, 6]], [GREEDY, SEEDED, SamplingParams(max_tokens=5, n=3, seed=1)])
    eng.sched.pools[0].check()
    assert all(r == 0 for r in eng.sched.pools[0].refs) and eng.sched.pools[0].num_free == eng.sched.pools[0].capacity
    assert not eng.sched.tables.any() and len(eng.sched.free) == eng.runner.slots


def small_engine(smollm, pages: int, policy: str = "fcfs") -> Engine:
    """An engine whose pool holds `pages` pages of 16 tokens (plus the scratch page), decoding at one batch size (a
    program for each size it passed through was ~25 s of the cold suite), seating work by `policy`."""
    per_page = 16 * 2 * smollm.cfg.num_layers * smollm.cfg.num_kv_heads * smollm.cfg.head_dim * 4
    gb = (pages + 1) * per_page / (1 << 30) + 1e-9
    return Engine(smollm, RunnerConfig(max_num_seqs=16, max_model_len=512, kv_cache_gb=gb, decode_steps=4,
                                       decode_batch_sizes=(16,), scheduling_policy=policy))


@pytest.fixture(scope="module")
def tight(smollm):
    """16 sequences over a pool of 48 pages: half of what 24 requests of 64 tokens take, and less than 16 of them
    need at once."""
    return small_engine(smollm, 48)


def test_a_pool_too_small_for_the_load_preempts_and_every_output_is_unchanged(llm, tight):
    rng = np.random.default_rng(7)
    prompts = [unique_prefix(200 + i, 32) for i in range(24)]
    kinds = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
             SamplingParams(temperature=1.0, top_k=40, max_tokens=32, ignore_eos=True, repetition_penalty=1.2),
             SamplingParams(temperature=1.0, mirostat_target=4.0, max_tokens=32, ignore_eos=True,
                            frequency_penalty=0.5)]
    params = [SamplingParams(**{**kinds[i % 3].__dict__, "seed": int(rng.integers(1 << 30))}) for i in range(24)]
    reqs = run_all(tight, prompts, params)
    assert tight.sched.preemptions > 0
    assert all(r.choices[0].finish_reason == "length" and len(r.choices[0].token_ids) == 32 for r in reqs)
    alone = llm.generate(prompts, params, prompt_cache_max_len=0)  # a big pool: nothing preempted
    assert llm.engine.sched.preemptions == 0
    assert [r.choices[0].token_ids for r in reqs] == ids(alone)
    assert all(r == 0 for r in tight.sched.pools[0].refs)


def test_an_urgent_request_takes_a_running_seat_under_priority_and_every_output_is_unchanged(llm, smollm):
    """--scheduling-policy priority: with every slot held by priority-5 requests, a priority-0 one preempts the
    newest of them, is seated at once and ends while they still run; each preempted request is recomputed from its
    tokens and ends with the tokens it has alone (the `llm` engine, first come first served, nothing preempted)."""
    eng = small_engine(smollm, 48, policy="priority")  # `tight`'s shapes: its programs
    rng = np.random.default_rng(11)
    prompts = [unique_prefix(600 + i, 8) for i in range(17)]  # with 16 tokens, 2 pages each: the pool is not dry
    params = [SamplingParams(temperature=1.0, top_k=40, max_tokens=16, ignore_eos=True,
                             seed=int(rng.integers(1 << 30))) for _ in range(17)]
    low = [eng.make_request(p, q, priority=5, prompt_cache_max_len=0) for p, q in zip(prompts[:16], params[:16])]
    for r in low:
        eng.add(r)
    while len(eng.sched.running) < 16:
        eng.step()
    urgent = eng.make_request(prompts[16], params[16], priority=0, prompt_cache_max_len=0)
    eng.add(urgent)
    eng.step()
    assert urgent.admitted is not None and eng.sched.preemptions == 1  # seated in the step it arrived
    while not urgent.finished:
        eng.step()
        eng.sched.pools[0].check()
    assert not all(r.finished for r in low)
    while eng.has_work():
        eng.step()
    alone = llm.generate(prompts, params, prompt_cache_max_len=0)
    assert [r.choices[0].token_ids for r in low + [urgent]] == ids(alone)
    assert all(r == 0 for r in eng.sched.pools[0].refs)
    with pytest.raises(InvalidRequest, match="priority scheduling"):
        llm.engine.make_request(prompts[0], params[0], priority=1)  # fcfs: a priority is an error


def test_constrained_and_free_requests_preempted_keep_their_tokens(llm, tight):
    """Masked steps (forward pass, masks, draw) under preemption: JSON-constrained requests beside free ones in a pool
    too small for them keep the tokens a big pool gives them, every constrained reply parses, and no page leaks."""
    import json

    from engine.grammar import grammar_text

    grammar = grammar_text({"type": "json_object"})
    prompts = [unique_prefix(400 + i, 32) for i in range(20)]
    params = [SamplingParams(temperature=1.0, top_k=10, seed=i, max_tokens=40, ignore_eos=i % 2 == 1)
              for i in range(20)]

    grammars = [grammar if i % 2 == 0 else None for i in range(20)]
    before = tight.sched.preemptions
    got, want = (run_all(eng, prompts, params, grammars=grammars, prompt_cache_max_len=0)
                 for eng in (tight, llm.engine))
    assert tight.sched.preemptions > before and llm.engine.sched.preemptions == 0
    assert [r.choices[0].token_ids for r in got] == [r.choices[0].token_ids for r in want]
    for r in got[::2]:
        assert isinstance(json.loads(r.choices[0].text), dict), r.choices[0].text
    assert all(len(r.choices[0].token_ids) == 40 for r in got[1::2])
    assert all(r == 0 for r in tight.sched.pools[0].refs) and len(tight.sched.free) == tight.runner.slots


def test_eviction_under_a_small_pool_keeps_serving_correctly(llm, tight):
    first = unique_prefix(300, 100)
    want = llm.generate([first], GREEDY, prompt_cache_max_len=0)
    assert [r.choices[0].token_ids for r in run_all(tight, [first], [GREEDY])] == ids(want)
    others = [unique_prefix(301 + i, 100) for i in range(8)]  # 8 x 7 pages: evicts the first prompt's pages
    run_all(tight, others, [GREEDY] * 8)
    again = run_all(tight, [first], [GREEDY])[0]
    assert again.cached_tokens == 0 and again.choices[0].token_ids == ids(want)[0]


def test_a_request_that_can_never_fit_is_refused_at_once(smollm, tight):
    from engine.params import InvalidRequest

    with pytest.raises(InvalidRequest, match="context"):
        tight.make_request(list(range(1000, 1600)), GREEDY)  # longer than the 512-token cap
    tiny = small_engine(smollm, 40)
    with pytest.raises(InvalidRequest, match="pages"):
        tiny.make_request(list(range(1000, 1500)), SamplingParams(n=16, max_tokens=4))  # 31 + 16 pages > 40
    assert tiny.make_request(list(range(1000, 1500)), SamplingParams(n=8, max_tokens=4))


def test_many_short_requests_beside_one_long_prompt(smollm, llm):
    """Slots and context are independent of each other: `--max-num-seqs 32 --kv-cache-gb 0.5 --max-model-len 8192`
    is a valid start (the pool holds ~11k tokens, not 32 x 8192), and on the suite's engine (`ENGINE`: 32 slots of
    1,024 tokens over that pool, whose programs the store holds) 96 short requests queue for the 32 slots beside a
    prompt of nearly a full context."""
    wide = RunnerConfig(max_num_seqs=32, max_model_len=8192, kv_cache_gb=0.5)
    pages = plan_pages(smollm, wide)
    assert plan_max_len(smollm, wide, pages) == 8192 and 32 * 8192 > (pages - 1) * wide.page_size
    eng = llm.engine
    pool = eng.sched.pools[0]
    assert eng.runner.slots * eng.max_len > pool.capacity * eng.page_size  # the pool holds fewer than 32 contexts
    long = eng.make_request(unique_prefix(400, eng.max_len - 24), SamplingParams(temperature=0, max_tokens=4))
    short = [eng.make_request(unique_prefix(500 + i, 12), SamplingParams(temperature=0, max_tokens=4))
             for i in range(96)]
    for r in [long, *short]:
        eng.add(r)
    while eng.has_work():
        eng.step()
    assert all(len(r.choices[0].token_ids) == 4 or r.choices[0].finish_reason == "stop" for r in [long, *short])
    assert pool.num_free == pool.capacity
