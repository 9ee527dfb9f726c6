"""The scheduler alone (plain Python, no model, no device): admission order and prefix hits, the prefill budget, pages
reserved ahead and preemption of the newest work, n > 1 sharing a prompt's pages, aborts. Every page is accounted
for after each scenario (`PagePool.check`). The engine's tests run the same scheduler against the model."""

from types import SimpleNamespace

import pytest

from engine.params import SamplingParams
from engine.requests import Choice, Request
from engine.scheduler import LOOKAHEAD, Scheduler

PAGE = 16


def scheduler(pages: int = 16, slots: int = 4, budget: int = 512, chunk: int = 128, policy: str = "fcfs",
              dp: int = 1) -> Scheduler:
    """A scheduler over `dp` data shards, each with a pool of `pages` pages (page 0, the scratch page, among them) and
    `slots / dp` of the slots; `save_row` records the slots whose sampler row a preemption took."""
    geometry = SimpleNamespace(shard_of=lambda slot: slot // (slots // dp), page_size=PAGE, max_len=512, slots=slots,
                               chunk=chunk, rc=SimpleNamespace(max_prefill_tokens=budget), num_pages=pages, dp=dp,
                               max_pages=512 // PAGE, vocab=1 << 20, image_block=0)
    return Scheduler(geometry, save_row=lambda slot: ("row", slot), policy=policy)


def request(rid: str, prompt: list[int], n: int = 1, echo: bool = False, priority: int = 0) -> Request:
    """A request of `n` choices, 64 tokens at most, and prompt logprobs if `echo`."""
    return Request(rid, prompt, SamplingParams(n=n, echo=echo), 64, [Choice(i) for i in range(n)], priority=priority)


def run(sched: Scheduler, req: Request, generated: list[int]) -> None:
    """What the engine does once a prompt is prefilled and its first tokens drawn: the choices run."""
    for choice in req.choices:
        choice.token_ids = list(generated)
        sched.running[choice.slot] = (req, choice)


def test_requests_are_seated_in_order_and_a_shared_prefix_comes_from_the_cache():
    sched = scheduler()
    prefix = list(range(100, 140))  # 2.5 pages
    a, b = request("a", prefix + [1, 2, 3]), request("b", prefix + [4, 5])
    sched.waiting.extend([a])
    (pf,) = sched.admit()
    assert pf.req is a and pf.start == 0 and a.choices[0].slot == 0 and len(a.choices[0].pages) == 3
    sched.register(a, a.choices[0])  # its prompt's K/V are written: its 2 full pages join the prefix cache
    run(sched, a, [7])
    sched.waiting.append(b)
    (pf,) = sched.admit()
    run(sched, b, [8])
    assert pf.start == 2 * PAGE and b.cached_tokens == 2 * PAGE and b.choices[0].slot == 1
    assert b.choices[0].pages[:2] == a.choices[0].pages[:2] and sched.pools[0].refs[a.choices[0].pages[0]] == 2
    assert list(sched.tables[1, :3]) == b.choices[0].pages
    sched.cancel({"a", "b"})
    assert a.choices[0].finish_reason == "abort" and b.cancelled and not sched.running and sched.free == [0, 1, 2, 3]
    sched.pools[0].check()
    assert sched.pools[0].num_free == sched.pools[0].capacity


def test_long_prompts_take_chunks_under_the_token_budget_and_echo_goes_alone():
    sched = scheduler(pages=64, budget=256)
    long = [request(f"l{i}", list(range(1000 * i, 1000 * i + 300))) for i in range(3)]  # 3 chunks of up to 128
    sched.waiting.extend(long)
    assert [pf.short for pf in sched.admit()] == [False] * 3 and len(sched.prefilling) == 3
    work = sched.chunks()
    assert [(pf.req.id, n) for pf, n in work] == [("l0", 128), ("l1", 128)]  # 256 tokens: the third waits
    assert sched.advance(work) == []
    assert [(pf.req.id, pf.start) for pf, _ in sched.chunks()] == [("l0", 128), ("l1", 128)]  # oldest first
    sched.advance(sched.chunks())
    work = sched.chunks()
    assert [(pf.req.id, pf.start, n) for pf, n in work] == [("l0", 256, 44), ("l1", 256, 44), ("l2", 0, 128)]
    assert [pf.req.id for pf in sched.advance(work)] == ["l0", "l1"] and len(sched.prefilling) == 1
    echo = scheduler(pages=64)
    echo.waiting.extend([request("e", list(range(10, 300)), echo=True), request("x", list(range(10, 300)))])
    echo.admit()
    assert [(pf.req.id, n) for pf, n in echo.chunks()] == [("e", 128)]  # prompt logprobs: one chunk of one prompt
    behind = scheduler(pages=64)
    behind.waiting.extend([request("x", list(range(10, 300))), request("e", list(range(10, 300)), echo=True)])
    behind.admit()
    assert [pf.req.id for pf, _ in behind.chunks()] == ["x"]  # and never shares a step's chunks with others


def test_work_sharing_a_prefix_being_computed_waits_for_its_pages_and_work_behind_goes_first():
    sched = scheduler(pages=64, slots=8, budget=128)
    system = list(range(100, 164))  # 4 pages
    a, b, c = (request(x, system + [i] * 20) for i, x in enumerate("abc"))
    other = request("other", list(range(500, 540)))
    brief = request("brief", system[:16] + [7] * 30)  # one page (16 tokens) shared: not worth a step's wait
    sched.waiting.extend([a, b, c, other, brief])
    assert [pf.req.id for pf in sched.admit()] == ["a", "other", "brief"]  # b and c wait for a's 4 pages
    assert [r.id for r in sched.waiting] == ["b", "c"] and brief.cached_tokens == 0
    sched.register(a, a.choices[0])  # a's prompt is written (the engine registers it as it installs it)
    assert [pf.req.id for pf in sched.admit()] == ["b", "c"] and b.cached_tokens == c.cached_tokens == 64
    assert b.choices[0].pages[:4] == c.choices[0].pages[:4] == a.choices[0].pages[:4]

    chunked = scheduler(pages=64, budget=128)
    doc = list(range(1000, 1300))  # a long prompt: 128-token chunks, one a step
    long, follow = request("long", doc), request("follow", doc[:200] + [1, 2])
    chunked.waiting.extend([long, follow])
    assert [pf.req.id for pf in chunked.admit()] == ["long"]
    chunked.advance(chunked.chunks())  # 128 tokens written: their 8 pages are cached at once
    assert chunked.admit() == [] and chunked.pools[0].num_cached == 8  # follow's pages 8..11 are still coming
    chunked.advance(chunked.chunks())
    (pf,) = chunked.admit()
    # its 12 full shared pages, and the 8 tokens it shares of the next copied (`PagePool.continuation`)
    assert pf.req is follow and follow.cached_tokens == pf.start == 200 and len(chunked.copies) == 1
    chunked.copied()
    assert follow.choices[0].pages[:12] == long.choices[0].pages[:12]
    chunked.cancel({"long"})  # a prompt cut off keeps the pages it wrote in the cache
    assert chunked.pools[0].num_cached == 16
    for s in (sched, chunked):
        s.pools[0].check()

    crowd = scheduler(pages=400, slots=16)
    same = [request(f"s{i}", system + [i]) for i in range(LOOKAHEAD + 2)]
    crowd.waiting.extend([*same, request("other", list(range(500, 540)))])
    assert [pf.req.id for pf in crowd.admit()] == ["s0"]  # so many wait that nothing behind them is looked at


def test_urgent_work_waiting_for_a_prefix_being_computed_preempts_nothing():
    sched = scheduler(pages=40, slots=3, policy="priority")
    low = [request(f"low{i}", list(range(10 * i, 10 * i + 30)), priority=9) for i in range(3)]
    for r in low:
        sched.enqueue(r)
    sched.admit()
    for r in low:
        run(sched, r, [5])
    system = list(range(100, 244))  # 9 pages: prompts past 128 tokens, prefilled a chunk per step
    a, b = request("a", system + [1] * 8, priority=0), request("b", system + [2] * 8, priority=0)
    sched.enqueue(a)
    sched.enqueue(b)
    assert sched.outranked()
    assert [pf.req.id for pf in sched.admit(preempt=True)] == ["a"] and sched.preemptions == 1
    # b waits for a's pages: it is not next in line, so nothing more is preempted for it
    assert not sched.outranked() and sched.admit(preempt=True) == [] and sched.preemptions == 1
    sched.advance(sched.chunks())
    assert sched.advance(sched.chunks())[0].req is a
    run(sched, a, [5])
    assert sched.outranked()  # now it is next in line
    (pf,) = sched.admit(preempt=True)
    assert pf.req is b and b.cached_tokens == 144 and sched.preemptions == 2
    sched.pools[0].check()


def test_a_dry_pool_preempts_the_newest_work_which_comes_back_first():
    sched = scheduler(pages=9, slots=4)  # 8 usable pages
    reqs = [request(f"r{i}", list(range(20 + i, 50 + i))) for i in range(3)]  # 30 tokens: 2 pages each
    sched.waiting.extend(reqs)
    seated = sched.admit()
    assert [pf.req.id for pf in seated] == ["r0", "r1", "r2"]
    for r in reqs:
        run(sched, r, [5])
    assert sched.reserve(20, preempt=False) is False  # 2 more pages each: not without preempting
    assert sched.preemptions == 0
    assert sched.reserve(20)  # now it may: the newest goes, and is queued first
    assert sched.preemptions == 1 and 2 not in sched.running and sched.resumes[0][0] is reqs[2]
    victim = sched.resumes[0][1]
    assert victim.saved == ("row", 2) and victim.slot == -1 and not victim.pages
    assert [len(r.choices[0].pages) for r in reqs[:2]] == [4, 4]
    for r in reqs[:2]:
        sched.retire(r.choices[0])
    (pf,) = sched.admit()
    assert pf.resume and pf.req is reqs[2] and pf.tokens == reqs[2].prompt_ids  # recomputed from its tokens
    sched.pools[0].check()


def test_a_prompt_being_prefilled_is_preempted_before_older_running_work():
    sched = scheduler(pages=14)  # 13 usable pages
    old = request("old", list(range(20, 50)))  # 2 pages, running
    sched.waiting.append(old)
    sched.admit()
    run(sched, old, [5])
    long = request("long", list(range(100, 250)))  # 150 tokens: 10 pages, prefilled a chunk per step
    sched.waiting.append(long)
    sched.admit()
    assert [pf.req.id for pf in sched.prefilling] == ["long"] and sched.pools[0].num_free == 1
    assert sched.reserve(40)  # "old" needs 3 more pages: the prompt being prefilled, admitted after it, goes
    assert sched.preemptions == 1 and not sched.prefilling and sched.waiting[0] is long and long.choices[0].slot == -1
    assert len(old.choices[0].pages) == 5 and 0 in sched.running
    sched.pools[0].check()


def test_a_decode_batch_holds_each_running_choice_at_its_position():
    sched = scheduler()
    a, b = request("a", list(range(10, 30)), n=2), request("b", list(range(40, 45)))
    sched.waiting.extend([a, b])
    sched.admit()
    sched.fork(a)
    run(sched, a, [7, 8, 9])
    run(sched, b, [4])
    batch = sched.batch()
    assert list(batch.active) == [True, True, True, False]
    assert list(batch.tokens[:3]) == [9, 9, 4] and list(batch.positions) == [22, 22, 5, sched.max_len]
    assert not batch.fresh.any()
    for choice in (a.choices[1], b.choices[0]):
        choice.lag = 4  # a decode of 4 steps in flight, read back after the next is dispatched
    ahead = sched.batch([1, 2])
    assert list(ahead.active) == [False, True, True, False] and list(ahead.positions) == [512, 26, 9, 512]
    assert list(ahead.fresh) == [False, True, True, False]  # their last tokens are on the devices


def test_clear_frees_everything_and_returns_every_request_once():
    sched = scheduler(pages=40)
    reqs = [request("run", list(range(10, 40)), n=2), request("long", list(range(10, 300))),
            request("queued", list(range(10, 30)), n=4)]
    sched.waiting.extend(reqs)
    sched.admit()  # "run" and "long" seated, "queued" waits for slots
    run(sched, reqs[0], [1])
    sched.register(reqs[0], reqs[0].choices[0])
    assert sched.pools[0].num_cached == 1
    assert sorted(r.id for r in sched.clear()) == ["long", "queued", "run"]
    assert sched.free == [0, 1, 2, 3] and not sched.tables.any() and not sched.queued()
    assert sched.pools[0].num_cached == 0  # what a failed step wrote is not trusted
    sched.pools[0].check()
    assert sched.pools[0].num_free == sched.pools[0].capacity


def test_n_choices_share_the_prompt_pages_and_copy_the_partial_one():
    sched = scheduler()
    req = request("n", list(range(10, 50)), n=3)  # 40 tokens: 2 full pages and a partial one
    sched.waiting.append(req)
    (pf,) = sched.admit()
    assert pf.choices == req.choices and [c.slot for c in req.choices] == [0, 1, 2]
    copies = sched.fork(req)
    first = req.choices[0].pages
    assert [c.pages[:2] for c in req.choices] == [first[:2]] * 3
    assert [(src, dst) for _, src, dst in copies] == [(first[2], c.pages[2]) for c in req.choices[1:]]
    assert all(sched.pools[0].refs[p] == 3 for p in first[:2])
    run(sched, req, [9])
    for c in req.choices:
        sched.retire(c)
    assert sched.free == [0, 1, 2, 3] and not sched.tables.any()
    sched.pools[0].check()


@pytest.mark.parametrize("where", ["waiting", "prefilling", "running", "resumes"])
def test_an_abort_frees_the_work_wherever_it_is(where):
    sched = scheduler(pages=24)
    req = request("a", list(range(10, 300 if where == "prefilling" else 40)))
    sched.waiting.append(req)
    if where != "waiting":
        sched.admit()
    if where in ("running", "resumes"):
        run(sched, req, [3])
    if where == "resumes":
        sched.reserve(1000)  # more than the pool: it preempts itself
        assert sched.resumes
    assert len(sched.cancel({"a"})) == 1 and sched.cancel({"a"}) == []  # counted once
    assert all(c.finish_reason == "abort" for c in req.choices)
    assert req.cancelled and not (sched.waiting or sched.prefilling or sched.running or sched.resumes)
    assert sched.free == [0, 1, 2, 3]
    sched.pools[0].check()


def test_the_priority_policy_seats_lower_values_first_and_arrival_order_within_one():
    sched, fcfs = scheduler(pages=40, slots=8, policy="priority"), scheduler(pages=40, slots=8)
    for s in (sched, fcfs):
        for rid, p in (("a", 5), ("b", 0), ("c", 5), ("d", -1), ("e", 0)):
            s.enqueue(request(rid, list(range(10, 30)), priority=p))
    assert [r.id for r in sched.waiting] == ["d", "b", "e", "a", "c"]
    assert [pf.req.id for pf in sched.admit()] == ["d", "b", "e", "a", "c"]
    assert [r.id for r in fcfs.waiting] == ["a", "b", "c", "d", "e"]  # fcfs: arrival order whatever the priority


def test_urgent_work_takes_the_seat_of_the_least_urgent_newest_running_work():
    sched = scheduler(pages=40, slots=3, policy="priority")
    low = [request(f"low{i}", list(range(10 + i, 40 + i)), priority=p) for i, p in enumerate((7, 9, 9))]
    for r in low:
        sched.enqueue(r)
    sched.admit()
    for r in low:
        run(sched, r, [5])
    urgent = request("urgent", list(range(60, 80)), priority=0)
    sched.enqueue(urgent)
    assert sched.outranked() and sched.admit() == []  # without `preempt` it waits
    (pf,) = sched.admit(preempt=True)
    assert pf.req is urgent and sched.preemptions == 1
    assert [r.id for r, _ in sched.resumes] == ["low2"]  # priority 9 and admitted last: low2, not low1 or low0
    assert low[2].choices[0].saved == ("row", 2) and urgent.choices[0].slot == 2
    assert not sched.outranked()
    equal = request("equal", list(range(60, 80)), priority=9)  # no more urgent than the least urgent running
    sched.enqueue(equal)
    assert not sched.outranked() and sched.admit(preempt=True) == [] and sched.preemptions == 1
    assert [r.id for r, _ in sched.resumes] == ["low2"] and [r.id for r in sched.waiting] == ["equal"]
    sched.pools[0].check()


def test_a_dry_pool_under_priority_preempts_the_least_urgent_work_even_if_older():
    sched = scheduler(pages=9, slots=4, policy="priority")  # 8 usable pages
    reqs = [request(f"r{i}", list(range(20 + i, 50 + i)), priority=p) for i, p in enumerate((5, 0, 0))]
    for r in reqs:
        sched.enqueue(r)
    sched.admit()
    for r in reqs:
        run(sched, r, [5])
    assert sched.reserve(20)
    assert sched.preemptions == 1 and sched.resumes[0][0] is reqs[0]  # the oldest, but the least urgent
    fresh = request("fresh", list(range(90, 100)), priority=5)
    sched.enqueue(fresh)
    sched.retire(reqs[1].choices[0])
    assert sched.admit()[0].req is reqs[0]  # the preempted choice before a request of its priority


def test_no_work_is_preempted_for_an_urgent_request_that_would_not_fit_anyway():
    sched = scheduler(pages=9, slots=2, policy="priority")  # 8 usable pages
    low = request("low", list(range(10, 40)), priority=3)  # 2 pages
    high = request("high", list(range(10, 40)), priority=0)
    for r in (high, low):
        sched.enqueue(r)
    sched.admit()
    run(sched, high, [1])
    run(sched, low, [1])
    huge = request("huge", list(range(200)), priority=1)  # 13 pages: more than low's 2 and the free 4
    sched.enqueue(huge)
    assert not sched.outranked() and sched.admit(preempt=True) == [] and sched.preemptions == 0  # and no sync
    sched.pools[0].check()


def test_urgent_work_short_of_pages_preempts_less_urgent_work_though_slots_are_free():
    sched = scheduler(pages=9, slots=4, policy="priority")  # 8 usable pages
    low = request("low", list(range(10, 100)), priority=5)  # 6 pages
    sched.enqueue(low)
    sched.admit()
    run(sched, low, [1])
    urgent = request("urgent", list(range(200, 240)), priority=0)  # 3 pages: 2 are free
    sched.enqueue(urgent)
    assert len(sched.free) == 3 and sched.outranked()
    (pf,) = sched.admit(preempt=True)
    assert pf.req is urgent and sched.preemptions == 1 and [r.id for r, _ in sched.resumes] == ["low"]
    sched.pools[0].check()


def test_urgent_work_preempts_only_on_a_shard_where_it_would_then_fit():
    sched = scheduler(pages=9, slots=4, policy="priority", dp=2)  # per shard: 2 slots, 8 usable pages
    work = {rid: request(rid, list(range(k * 100, k * 100 + length)), priority=p)
            for k, (rid, length, p) in enumerate((("h0", 40, 0), ("b", 40, 5), ("a", 20, 9), ("h1", 10, 0)))}
    for r in work.values():  # shard 0: h0 (3 pages) and a (2); shard 1: b (3) and h1 (1)
        sched.enqueue(r)
        sched.admit()
        run(sched, r, [1])
    shard = {rid: sched.shard_of(r.choices[0].slot) for rid, r in work.items()}
    assert shard == {"h0": 0, "a": 0, "b": 1, "h1": 1}
    # 7 pages: 12 would come free in all, but on neither shard 7 and a page of room for the urgent work staying.
    wide = request("wide", list(range(1000, 1100)), priority=0)
    sched.enqueue(wide)
    assert not sched.outranked() and sched.admit(preempt=True) == [] and sched.preemptions == 0
    sched.cancel({"wide"})
    # 5 pages fit once b is gone from shard 1, not once a is gone from shard 0: b goes first, though a is less
    # urgent; then b, more urgent than a, takes a's seat on shard 0.
    tall = request("tall", list(range(2000, 2070)), priority=0)
    sched.enqueue(tall)
    assert sched.outranked()
    assert [(pf.req.id, sched.shard_of(pf.choices[0].slot)) for pf in sched.admit(preempt=True)] == [
        ("tall", 1), ("b", 0)]
    assert sched.preemptions == 2 and [r.id for r, _ in sched.resumes] == ["a"]
    for pool in sched.pools:
        pool.check()


def test_the_load_report_counts_each_shards_seated_work_and_spreads_the_queue_over_them():
    """SGLang's `/get_load` (`Scheduler.loads`): per data shard, the sequences seated on it and the KV tokens their
    pages hold; the queue's sequences (a request of n choices: n) and prompt tokens (a request's once), and those
    arriving, spread over the shards evenly."""
    sched = scheduler(slots=4, dp=2)
    assert sched.loads() == [{"dp_rank": d, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0,
                              "num_pending_tokens": 0} for d in (0, 1)]
    a = request("a", list(range(40)))  # 3 pages
    sched.waiting.append(a)
    sched.admit()
    run(sched, a, [7])
    b, c = request("b", list(range(50, 70)), n=2), request("c", list(range(5)))
    sched.waiting.extend([b, c])
    loads, shard = sched.loads(arriving=(request("d", [1, 2, 3], n=2),)), sched.shard_of(a.choices[0].slot)
    assert [x["num_waiting_reqs"] for x in loads] == [3, 2]  # b's 2, c's 1 and d's 2, arriving
    assert [x["num_pending_tokens"] for x in loads] == [14, 14]  # 20 + 5 + 3 prompt tokens
    assert [x["num_reqs"] for x in loads] == [w + (d == shard) for d, w in zip((0, 1), (3, 2))]
    held = [3 * PAGE * (d == shard) for d in (0, 1)]
    assert len(a.choices[0].pages) == 3 and [x["num_tokens"] for x in loads] == [held[0] + 14, held[1] + 14]
