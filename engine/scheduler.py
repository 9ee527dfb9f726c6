"""Scheduling: which work holds the decode slots and KV pages, step by step. Plain Python: its one device call is
the `save_row` it is given (a preempted choice takes its sampler row along).

The scheduler owns the queues (requests waiting, preempted choices coming back first, prompts being prefilled, the
running choices), the free slots, one page pool per data shard and the page tables. Each engine step asks it to seat
queued work (`admit`: preempted choices first, then requests in arrival order, the prefix cache's pages mapped in),
which prompts' chunks to compute next (`chunks`, then `advance`), and to give every running choice the pages its next
steps need (`reserve`: the most recently admitted work is preempted when the pool is dry); `batch` lays the running
choices out as a decode's rows. Under the `priority` policy (vLLM's `--scheduling-policy priority`) each request's
`priority` orders the queues first (lower values sooner; arrival order within one value), a dry pool preempts the
least urgent work first (the newest of it), and queued work may take the slots and pages of less urgent running work
(`admit(preempt=True)`). The engine (`engine.engine`) runs what it decides on the runner and handles the
tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Any, Callable

import numpy as np

from engine.pages import PagePool, page_hashes, root_hash
from engine.requests import Choice, Prefill, Request, cache_tokens, seq_tokens

BALANCE = 2  # a data shard may run this many more sequences than the least loaded and still win on its prefix cache
# Queued work whose next prompt pages (this many tokens or more) a seated prompt is computing waits for them, and
# work behind it goes first (at most `LOOKAHEAD` such are passed over): SGLang's in-batch prefix caching. A burst
# sharing an uncached system prompt computes it once, the rest a step later from the cache, as prompts' pages are
# offered to it chunk by chunk (`advance`).
SHARE_MIN, LOOKAHEAD = 32, 64
POLICIES = ("fcfs", "priority")  # who is served first: arrival order, or each request's priority then arrival


@dataclasses.dataclass(frozen=True)
class Batch:
    """A decode's rows, indexed by slot: each running choice's last token and its position. Rows without a running
    choice (free, or still prefilling) sit past the end of every table, so the K/V they write go to the scratch page
    and never touch a page in use."""

    tokens: np.ndarray
    positions: np.ndarray
    active: np.ndarray
    fresh: np.ndarray  # rows whose last token is still on the devices (`Choice.lag`): `tokens` holds none for them


class Scheduler:
    """The queues, free slots, page pools and page tables of one engine (`runner` gives their sizes), and the
    decisions over them. `save_row(slot)` takes a preempted choice's sampler row off the devices."""

    def __init__(self, runner, save_row: Callable[[int], Any], policy: str = "fcfs"):
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy: one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self.shard_of, self.save_row = runner.shard_of, save_row
        self.page_size, self.max_len, self.slots = runner.page_size, runner.max_len, runner.slots
        self.chunk, self.max_prefill_tokens = runner.chunk, runner.rc.max_prefill_tokens
        # Gemma 3: a picture's positions attend both ways, so a chunk holds it whole (`_whole`)
        self.vocab, self.image_block = runner.vocab, runner.image_block
        if self.image_block > self.chunk:
            raise ValueError(f"a picture takes {self.image_block} positions, more than a prefill chunk ({self.chunk}) "
                             "at this context: raise --max-model-len")
        # One page pool per data shard (one without data parallelism); a slot's pages come from its shard's pool.
        self.pools = [PagePool(runner.num_pages, self.page_size) for _ in range(runner.dp)]
        self.tables = np.zeros((runner.slots, runner.max_pages), np.int32)  # a row per slot; 0 = scratch
        self.free = list(range(runner.slots))
        self.waiting: collections.deque[Request] = collections.deque()
        self.resumes: collections.deque[tuple[Request, Choice]] = collections.deque()  # preempted, served first
        self.running: dict[int, tuple[Request, Choice]] = {}
        self.admitting: list[Prefill] = []  # given slots and pages this step, not yet running
        self.copies: list[tuple[int, int, int]] = []  # cached pages admission copies into a prompt's (`copied`)
        self.prefilling: collections.deque[Prefill] = collections.deque()
        self._busy: list[set[bytes]] | None = None  # `_computing`, kept while `admit` runs
        self._order = itertools.count(1)
        self.preemptions = 0  # choices preempted so far (a dry pool, or for more urgent work)

    def pages_to_admit(self, length: int, n: int) -> int:
        """Pages a prompt of `length` tokens takes with n choices: its pages, plus a partial last page per extra
        choice."""
        full, part = divmod(length, self.page_size)
        return full + (part > 0) * n

    def loads(self, arriving: tuple[Request, ...] = ()) -> list[dict]:
        """SGLang's load report, one entry a data shard: `num_reqs` the sequences seated on it and those waiting
        (the `arriving` requests', not queued yet, among them: n each, as the queue's), `num_pending_tokens` the
        waiting ones' prompt tokens, `num_tokens` those and the KV tokens its seated sequences' pages hold (not the
        prefix cache's free pages). The queue is the shards' together, so its sequences and tokens are spread over
        them evenly (the first shards take what does not divide). Safe to read from another thread (copies of the
        queues first)."""
        dp = len(self.pools)
        free = [self.shard_of(s) for s in list(self.free)]
        queued = [(len(r.choices), len(r.prompt_ids)) for r in [*self.waiting, *arriving]]
        queued += [(1, len(r.prompt_ids)) for r, _ in list(self.resumes)]
        seqs, tokens = sum(n for n, _ in queued), sum(t for _, t in queued)
        share = lambda n, d: n // dp + (d < n % dp)  # noqa: E731  (shard d's part of n)
        out = []
        for d, pool in enumerate(self.pools):
            waiting, pending = share(seqs, d), share(tokens, d)
            held = (pool.capacity - pool.num_free) * self.page_size
            out.append({"dp_rank": d, "num_reqs": self.slots // dp - free.count(d) + waiting,
                        "num_waiting_reqs": waiting, "num_tokens": held + pending, "num_pending_tokens": pending})
        return out

    def queued(self) -> int:
        """Requests and preempted choices waiting for slots."""
        return len(self.waiting) + len(self.resumes)

    def _urgency(self, req: Request) -> int:
        """A request's place in line before its arrival: its priority under the priority policy, else 0 for all."""
        return req.priority if self.policy == "priority" else 0

    def enqueue(self, req: Request) -> None:
        """Queue a new request: behind every request queued before it that is as urgent or more."""
        i = len(self.waiting)
        while i and self._urgency(self.waiting[i - 1]) > self._urgency(req):
            i -= 1
        self.waiting.insert(i, req)

    def _requeue(self, queue: collections.deque, item, req: Request) -> None:
        """Put preempted work back at the front of its queue (`waiting` or `resumes`), behind more urgent work only."""
        i = 0
        while i < len(queue) and self._urgency(queue[i] if queue is self.waiting else queue[i][0]) < self._urgency(req):
            i += 1
        queue.insert(i, item)

    def _line(self):
        """Queued work in the order it is served, each as `(resume, request, choices, tokens to compute)`: a
        preempted choice goes before a request as urgent."""
        r = w = 0
        while r < len(self.resumes) or w < len(self.waiting):
            if r < len(self.resumes) and (w == len(self.waiting)
                                          or self._urgency(self.resumes[r][0]) <= self._urgency(self.waiting[w])):
                req, choice = self.resumes[r]
                r += 1
                yield True, req, [choice], seq_tokens(req, choice)
            else:
                req = self.waiting[w]
                w += 1
                yield False, req, req.choices, req.prompt_ids

    def _next(self) -> tuple[bool, Request, list[Choice], list[int]] | None:
        """The work next in line: the first of `_line` that does not wait for pages a seated prompt is computing
        (`_waits`; at most `LOOKAHEAD` are passed over); None when there is none."""
        computing, passed = self._computing(), 0
        for item in self._line():
            if not self._waits(item, computing):
                return item
            passed += 1
            if passed == LOOKAHEAD:
                return None
        return None

    def _keys(self, resume: bool, req: Request, tokens: list[int]) -> tuple[list[int], list[bytes], int]:
        """Work's tokens as the prefix cache keys them, the hashes of their full pages (a request's, computed once:
        its prompt does not change while it is queued) and how many of its tokens may come from the cache."""
        keyed = cache_tokens(req, tokens)
        if resume:
            hashes = page_hashes(keyed, self.page_size, req.cache_key)
        else:
            if req.page_keys is None:
                req.page_keys = page_hashes(keyed, self.page_size, req.cache_key)
            hashes = req.page_keys
        reuse = len(tokens) - 1  # the last token is always computed (its logits are needed)
        if req.cache_max_len is not None:
            reuse = min(reuse, req.cache_max_len)
        if req.params.echo and not resume:  # echo needs every logit
            reuse = 0
        return keyed, hashes, reuse

    def _computing(self) -> list[set[bytes]]:
        """Per data shard, the hashes of the full pages that seated prompts have yet to write (`_unwritten`; while
        `admit` runs, as it keeps them: `_busy`)."""
        return self._busy if self._busy is not None else self._unwritten()

    def _unwritten(self) -> list[set[bytes]]:
        """Per data shard, the hashes of the full pages that seated prompts (`prefilling`, and `admitting`) have yet
        to write."""
        out = [set() for _ in self.pools]
        for pf in [*self.prefilling, *self.admitting]:
            out[self.shard_of(pf.choices[0].slot)].update(pf.keys[pf.start // self.page_size:])
        return out

    def _waits(self, item, computing: list[set[bytes]]) -> bool:
        """Whether queued work waits: on some shard, the pages after its cached prefix there, `SHARE_MIN` tokens of
        them or more, are ones a seated prompt is computing (they are then offered to the cache as written)."""
        resume, req, _, tokens = item
        if not any(computing):
            return False
        _, hashes, reuse = self._keys(resume, req, tokens)
        hashes = hashes[:reuse // self.page_size]
        for pool, busy in zip(self.pools, computing):
            hit = len(pool.lookup(hashes)) if busy else len(hashes)
            shared = sum(1 for _ in itertools.takewhile(busy.__contains__, hashes[hit:]))
            if shared * self.page_size >= SHARE_MIN:
                return True
        return False

    def _less_urgent(self) -> Callable[[Request], bool] | None:
        """Under the priority policy, which requests are less urgent than the work next in line (None: no work
        waits, or first come first served)."""
        nxt = self._next() if self.policy == "priority" else None
        return None if nxt is None else lambda r: r.priority > nxt[1].priority

    def outranked(self) -> bool:
        """Whether the work next in line is more urgent than some seated work, finds no shard with its slots and
        pages free now (its cached prefix aside), and would find one once the less urgent work there were preempted
        (`_room_behind`), so `admit(preempt=True)` may preempt (the host must then hold every running choice's
        tokens)."""
        less = self._less_urgent()
        if less is None:
            return False
        seated = [r for r, _ in self.running.values()] + [pf.req for pf in self.prefilling]
        _, _, choices, tokens = self._next()
        return (any(less(r) for r in seated) and self._place(len(tokens), len(choices), []) is None
                and self._room_behind(less) is not None)

    # ---- admission: slots, pages, prefix cache ----------------------------------------------------------------

    def admit(self, preempt: bool = False) -> list[Prefill]:
        """Seat queued work while slots and pages allow (in the policy's order) and return it. Long (or echo)
        prompts among it join `prefilling`, to be computed a chunk per step (`chunks`); the rest are prefilled now.
        `preempt` (the priority policy; the host holds every token): work that does not fit takes the seats of less
        urgent running or prefilling work, the least urgent and newest first."""
        batch = self.admitting = []
        self._busy = self._unwritten()
        while True:
            pf = self._seat_next()
            if pf is None and preempt and (less := self._less_urgent()) is not None:
                shard = self._room_behind(less)
                if shard is not None and (victim := self._victim(less, shard)) is not None:
                    self._preempt(victim)
                    self._busy = self._unwritten()  # a preempted prompt writes no more
                    continue
            if pf is None:
                break
            batch.append(pf)
            self._busy[self.shard_of(pf.choices[0].slot)].update(pf.keys[pf.start // self.page_size:])
        self._busy = None
        self.prefilling.extend(pf for pf in batch if not pf.short)
        return batch

    def chunks(self) -> list[tuple[Prefill, int]]:
        """The next chunk (prompt, tokens) of the prompts being prefilled, oldest first: the first one's alone when
        it wants prompt logprobs, else one of each in line up to `max_prefill_tokens` tokens in all (at least
        one chunk). A chunk ends before a picture it would cut (`_whole`)."""
        budget, work = self.max_prefill_tokens, []
        for pf in self.prefilling:
            if pf.echo and work:
                break
            n = self._whole(pf, min(self.chunk, len(pf.tokens) - pf.start))
            if work and n > budget:
                break
            work.append((pf, n))
            budget -= n
            if pf.echo:
                break
        return work

    def _whole(self, pf: Prefill, n: int) -> int:
        """`n` tokens of `pf` from its start, or fewer so that the chunk ends before a picture it would cut, where a
        picture's positions attend to each other both ways (`image_block`: its rows are `vocab + slot * block + j`,
        in order; one that begins at the chunk's start fits, as a chunk holds a picture)."""
        end = pf.start + n
        if not self.image_block or end >= len(pf.tokens) or pf.tokens[end] < self.vocab:
            return n
        row = (pf.tokens[end] - self.vocab) % self.image_block
        return n - row if n > row else n

    def advance(self, work: list[tuple[Prefill, int]]) -> list[Prefill]:
        """Mark `chunks`' work computed (its full pages join the prefix cache at once: work sharing them need not
        wait for the whole prompt); returns the prompts that are now complete."""
        ready = []
        for pf, n in work:
            pf.start += n
            self._offer(pf.req, pf.choices[0], pf.tokens[:pf.start])
            if pf.start >= len(pf.tokens):
                self.prefilling.remove(pf)
                ready.append(pf)
        return ready

    def _seat_next(self) -> Prefill | None:
        """Give the work next in line (`_next`: work waiting for pages being computed is passed over) its slots and
        pages, with the prefix cache's pages mapped in; None when it does not fit now."""
        nxt = self._next()
        if nxt is None:
            return None
        resume, req, choices, tokens = nxt
        if len(self.free) < len(choices):  # cheap test first: no shard can seat it
            return None
        keyed, hashes, reuse = self._keys(resume, req, tokens)
        placed = self._place(len(tokens), len(choices), hashes[:reuse // self.page_size])
        if placed is None:
            return None
        return self._seat(resume, req, choices, tokens, keyed, hashes, reuse, *placed)

    def _seat(self, resume: bool, req: Request, choices: list[Choice], tokens: list[int], keyed: list[int],
              hashes: list[bytes], reuse: int, shard: int, hit: list[int]) -> Prefill:
        """Seat queued work on `shard` (`_seat_next`'s choice): take it off its queue, share its cached pages
        (`hit`), allocate the rest, copy a cached page it goes on from, and give its choices slots."""
        ps = self.page_size
        if resume:
            del self.resumes[next(i for i, (_, c) in enumerate(self.resumes) if c is choices[0])]
        else:
            del self.waiting[next(i for i, r in enumerate(self.waiting) if r is req)]
        pool = self.pools[shard]
        pool.share(hit)
        extra = len(choices) - 1 if len(tokens) % ps else 0  # partial last pages of the other choices
        fresh = pool.allocate(self.pages_to_admit(len(tokens), len(choices)) - len(hit))
        first = choices[0]
        first.pages, first.hashes = hit + fresh[:len(fresh) - extra], hashes[:len(hit)]
        start = len(hit) * ps
        # The page after the hit: a cached page whose tokens this one's start with (the prompt repeated, or a
        # conversation going on from an answer) is copied, and the rest computed: at least the last token.
        src, reused = pool.continuation(hashes[len(hit) - 1] if hit else root_hash(req.cache_key),
                                        keyed[start:start + ps], reuse - start)
        if reused:
            pool.share([src])  # held until the copy is dispatched (`copied`): no seat after this one evicts it
            self.copies.append((shard, src, first.pages[len(hit)]))
        for choice, page in zip(choices[1:], fresh[len(fresh) - extra:]):
            choice.pages = [page]
        seats = [s for s in self.free if self.shard_of(s) == shard][:len(choices)]
        for choice, slot in zip(choices, seats):
            self.free.remove(slot)
            choice.slot, choice.order = slot, next(self._order)
        self.tables[first.slot, :len(first.pages)] = first.pages
        if not resume:
            req.admitted = req.admitted or time.monotonic()
            req.cached_tokens = start + reused
            pool.queried += len(tokens)
            pool.hit += req.cached_tokens
        return Prefill(req, choices, tokens, start + reused, resume, keys=hashes)

    def copied(self) -> None:
        """The page copies of this admission (`copies`: `(shard, src, dst)`) are dispatched: let go of their sources."""
        for shard, src, _ in self.copies:
            self.pools[shard].release([src])
        self.copies = []

    def _place(self, length: int, n: int, hashes: list[bytes]) -> tuple[int, list[int]] | None:
        """The data shard for work of `length` tokens and `n` choices, with the cached pages of its prefix there.
        Candidates have `n` free slots and the pages it needs (keeping a page of room per sequence running there,
        so admission does not at once force a preemption); of those within `BALANCE` running sequences of the least
        loaded, the one holding the longest cached prefix, then the one with the most free pages (a shared system
        prompt must not pull every request onto one shard). None when no shard has room now."""
        fits = []
        for shard, pool in enumerate(self.pools):
            if sum(self.shard_of(s) == shard for s in self.free) < n:
                continue
            hit = pool.lookup(hashes)
            cached_free = sum(pool.refs[p] == 0 for p in hit)  # free cached pages the hit takes out of the free ones
            running = sum(self.shard_of(s) == shard for s in self.running)
            if pool.num_free - cached_free - (self.pages_to_admit(length, n) - len(hit)) >= running:
                fits.append((running, len(hit), pool.num_free, -shard, hit))
        if not fits:
            return None
        least = min(f[0] for f in fits)
        _, _, _, shard, hit = max((f for f in fits if f[0] <= least + BALANCE), key=lambda f: f[1:4])
        return -shard, hit

    def fork(self, req: Request) -> list[tuple[int, int, int]]:
        """A prefilled request's other choices (n > 1) share its prompt's full pages, each keeping its own partial
        last page; returns the page copies `(shard, src, dst)` that fill those."""
        first, copies = req.choices[0], []
        full, shard = len(req.prompt_ids) // self.page_size, self.shard_of(first.slot)
        for choice in req.choices[1:]:  # every choice sits on the first's shard
            shared = first.pages[:full]
            self.pools[shard].share(shared)
            if choice.pages:  # its own copy of the partial last page
                copies.append((shard, first.pages[full], choice.pages[0]))
            choice.pages, choice.hashes = shared + choice.pages, list(first.hashes)
            self.tables[choice.slot, :len(choice.pages)] = choice.pages
        return copies

    def register(self, req: Request, choice: Choice, leaving: bool = False) -> None:
        """Offer a choice's newly full pages (of `seq_tokens`, whose K/V are written) to the prefix cache; `leaving`
        (it lets go of its pages): its partial last page too."""
        written = len(req.prompt_ids) + max(len(choice.token_ids) - 1, 0)
        tokens = seq_tokens(req, choice)[:written]
        self._offer(req, choice, tokens)
        ps, full = self.page_size, len(choice.hashes)
        if leaving and written % ps and full < len(choice.pages) and full == written // ps:
            self.pools[self.shard_of(choice.slot)].keep(
                choice.pages[full], choice.hashes[-1] if full else root_hash(req.cache_key),
                cache_tokens(req, tokens)[full * ps:])

    def _offer(self, req: Request, choice: Choice, tokens: list[int]) -> None:
        """Offer the full pages of `tokens` (the first of the choice's, K/V written) not offered yet to the prefix
        cache."""
        ps, pool = self.page_size, self.pools[self.shard_of(choice.slot)]
        full, done = min(len(tokens) // ps, len(choice.pages)), len(choice.hashes)
        if full <= done:
            return
        keyed = cache_tokens(req, tokens[:full * ps])
        choice.hashes = page_hashes(keyed, ps, req.cache_key, choice.hashes)
        for i in range(done, full):
            parent = choice.hashes[i - 1] if i else root_hash(req.cache_key)
            pool.register(choice.pages[i], choice.hashes[i], parent, keyed[i * ps:(i + 1) * ps])

    # ---- running: pages ahead, preemption ---------------------------------------------------------------------

    def reserve(self, steps: int, more: dict[int, int] | None = None, preempt: bool = True) -> bool:
        """Give every running choice the pages its next `steps` positions need (plus `more[slot]`), past the tokens
        it has in flight (`Choice.lag`), oldest first; when the pool is dry (cached pages evicted too), preempt the
        most recently admitted work until they fit. `preempt=False`: never (a choice with tokens in flight cannot
        be recomputed from its tokens): False when the pages ran out."""
        for slot in sorted(self.running, key=lambda s: self.running[s][1].order):
            if slot not in self.running:
                continue  # preempted meanwhile
            req, choice = self.running[slot]
            ahead = steps + choice.lag + (more or {}).get(slot, 0)
            last = min(len(req.prompt_ids) + len(choice.token_ids) - 2 + ahead, self.max_len - 1)
            need = last // self.page_size + 1 - len(choice.pages)
            shard = self.shard_of(slot)
            while need > 0:
                pages = self.pools[shard].allocate(need)
                if pages is not None:
                    self.tables[slot, len(choice.pages):len(choice.pages) + need] = pages
                    choice.pages += pages
                    break
                if not preempt:
                    return False
                victim = self._preempt_newest(shard)
                if victim is choice:
                    break
        return True

    def _room_behind(self, which: Callable[[Request], bool]) -> int | None:
        """The data shard where the work next in line would find its slots and pages (as `_place` counts them, its
        cached prefix aside) once the work there whose request `which` accepts were preempted; None when there is
        none, and preempting would be no use."""
        _, _, choices, tokens = self._next()
        need = self.pages_to_admit(len(tokens), len(choices))
        for shard, pool in enumerate(self.pools):
            running = [(r, c) for r, c in self.running.values() if self.shard_of(c.slot) == shard]
            held = [c for r, c in running if which(r)]
            held += [c for pf in self.prefilling if which(pf.req) and self.shard_of(pf.choices[0].slot) == shard
                     for c in pf.choices]
            holders = collections.Counter(p for c in held for p in c.pages)
            freed = sum(pool.refs[p] == k for p, k in holders.items())  # pages no other work shares
            slots = sum(self.shard_of(s) == shard for s in self.free) + len(held)
            left = sum(not which(r) for r, _ in running)  # running there still, each kept a page of room
            if slots >= len(choices) and pool.num_free + freed - need >= left:
                return shard
        return None

    def _victim(self, which: Callable[[Request], bool], shard: int | None = None):
        """The work to preempt first among the running choices and prefilling prompts (of `shard`, if given) whose
        request `which` accepts: the least urgent, and of those the most recently admitted. A running choice as
        `(request, choice)`, a prompt as its `Prefill`; None if there is none."""
        mine = lambda c: shard is None or self.shard_of(c.slot) == shard  # noqa: E731
        work = [((self._urgency(r), c.order), (r, c)) for r, c in self.running.values() if mine(c) and which(r)]
        work += [((self._urgency(pf.req), pf.choices[0].order), pf) for pf in self.prefilling
                 if mine(pf.choices[0]) and which(pf.req)]
        return max(work, key=lambda w: w[0])[1] if work else None

    def _preempt_newest(self, shard: int) -> Choice:
        """Preempt a data shard's work that goes first (`_victim`; with equal urgency, the most recently admitted
        running choice or prefilling request) and return its choice."""
        return self._preempt(self._victim(lambda r: True, shard))

    def retract(self) -> None:
        """Preempt every running choice and prefilling prompt back to the queue (SGLang's retraction, a paused
        engine's `hold`), to be recomputed from its tokens later."""
        while (work := self._victim(lambda r: True)) is not None:
            self._preempt(work)

    def _preempt(self, work) -> Choice:
        """Free a running choice's or a prefilling prompt's slots and pages and queue it first among its urgency, to
        be recomputed from its tokens later (a running choice's sampler row goes with it); returns its (first)
        choice."""
        self.preemptions += 1
        if isinstance(work, Prefill):
            self.prefilling.remove(work)
            for choice in work.choices:
                self.unseat(choice)
            if work.resume:
                self._requeue(self.resumes, (work.req, work.choices[0]), work.req)
            else:
                work.req.prompt_logprobs = None
                self._requeue(self.waiting, work.req, work.req)
            return work.choices[0]
        req, choice = work
        choice.saved = self.save_row(choice.slot)
        self.register(req, choice, leaving=True)
        del self.running[choice.slot]
        self.unseat(choice)
        self._requeue(self.resumes, (req, choice), req)
        return choice

    def batch(self, slots: list[int] | None = None) -> Batch:
        """The running choices (those in `slots`, if given) as a decode's rows: each one's last token and its
        position, past the tokens it has in flight (`Choice.lag`; its last token is then on the devices)."""
        tokens, positions = np.zeros(self.slots, np.int32), np.full(self.slots, self.max_len, np.int32)
        active, fresh = np.zeros(self.slots, bool), np.zeros(self.slots, bool)
        for slot in self.running if slots is None else slots:
            req, choice = self.running[slot]
            tokens[slot] = choice.token_ids[-1] if choice.token_ids else 0
            positions[slot] = len(req.prompt_ids) + len(choice.token_ids) - 1 + choice.lag
            active[slot], fresh[slot] = True, choice.lag > 0
        return Batch(tokens, positions, active, fresh)

    # ---- leaving ----------------------------------------------------------------------------------------------

    def retire(self, choice: Choice) -> None:
        """A running choice ended: offer its pages to the prefix cache, then give back its slot and pages."""
        if choice.slot in self.running and self.running[choice.slot][1] is choice:
            req, _ = self.running.pop(choice.slot)
            self.register(req, choice, leaving=True)
            self.unseat(choice)

    def unseat(self, choice: Choice) -> None:
        """Give back a choice's pages and slot."""
        if choice.pages:
            self.pools[self.shard_of(choice.slot)].release(choice.pages)
        choice.pages, choice.hashes = [], []
        if choice.slot >= 0:
            self.tables[choice.slot] = 0
            # kept sorted: new requests take the lowest, so decode batches stay compact
            self.free = sorted([*self.free, choice.slot])
            choice.slot = -1

    def cancel(self, ids: set[str]) -> list[Request]:
        """End the requests named by `ids` wherever they are (queued, prefilling, preempted, running), each choice
        not ended yet with finish_reason "abort"; returns those not cancelled before."""
        aborted: list[Request] = []

        def mark(req: Request) -> None:
            """Note a request the first time it is cancelled."""
            if not req.cancelled:
                aborted.append(req)
            req.cancelled = True

        for req in [r for r in self.waiting if r.id in ids]:
            self.waiting.remove(req)
            mark(req)
        for pf in [pf for pf in self.prefilling if pf.req.id in ids]:
            self.prefilling.remove(pf)
            for choice in pf.choices:
                self.unseat(choice)
                choice.finish_reason = "abort"
            mark(pf.req)
        for req, choice in [x for x in self.resumes if x[0].id in ids]:
            self.resumes.remove((req, choice))
            choice.finish_reason = "abort"
            mark(req)
        for req, choice in [x for x in self.running.values() if x[0].id in ids]:
            mark(req)
            choice.finish_reason = "abort"
            self.retire(choice)
        for req in aborted:  # a queued request's choices, and those that had ended
            for choice in req.choices:
                choice.finish_reason = choice.finish_reason or "abort"
        return aborted

    def clear(self) -> list[Request]:
        """Drop all work (after a step raised), freeing every slot and page it held, and forget the prefix cache;
        returns its requests."""
        held = [c for pf in [*self.admitting, *self.prefilling] for c in pf.choices]
        held += [c for _, c in self.running.values()]
        reqs = {id(r): r for r in [*self.waiting, *(pf.req for pf in [*self.admitting, *self.prefilling]),
                                    *(r for r, _ in self.resumes), *(r for r, _ in self.running.values())]}
        self.waiting.clear()
        self.prefilling.clear()
        self.resumes.clear()
        self.running.clear()
        self.admitting = []
        self.copied()
        for choice in {id(c): c for c in held}.values():
            self.unseat(choice)
        for pool in self.pools:  # what the failed step was writing may be in cached pages (chunks offered early)
            pool.flush()
        return list(reqs.values())
