"""The KV page pool (`engine.pages`): a stateful model of how the engine drives it, plus unit tests.

Host-side only and fast: no device, no model. The model tracks, for every page, the tokens (and isolation key) whose
K/V it holds, so the prefix cache is checked for what it returns, not only for its bookkeeping.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.pages import SCRATCH, PagePool, page_hashes, root_hash

KEYS = [None, "a", "b"]
tokens_st = st.lists(st.integers(0, 3), max_size=8)  # a tiny alphabet so that prefixes collide often


@dataclasses.dataclass
class Seq:
    tokens: list[int]
    key: str | None
    pages: list[int]
    order: int  # admission order: preemption takes the most recently admitted


class PoolMachine(RuleBasedStateMachine):
    """Sequences admitted, grown, forked, preempted and finished over one `PagePool`, as the engine does."""

    PAGE_SIZE, NUM_PAGES, MAX_SEQS = 2, 11, 5

    @initialize()
    def setup(self):
        """An empty pool and no sequences."""
        self.ps = self.PAGE_SIZE
        self.pool = PagePool(self.NUM_PAGES, self.ps)
        self.seqs: dict[int, Seq] = {}
        self.next_id = 0
        self.content: dict[int, tuple] = {}  # page -> (key, every token up to the end of what it holds)
        self.named: dict[bytes, tuple] = {}  # hash -> (key, the tokens of every page it covers)
        self.preempted: list[tuple[list[int], str | None, list[int]]] = []  # tokens, key, pages held before
        self.history: list[tuple[list[int], str | None]] = []  # prompts and answers seen, for follow-up turns

    # --- helpers -------------------------------------------------------------------------------------------------

    def _hashes(self, tokens, key):
        hashes = page_hashes(tokens, self.ps, key)
        for i, h in enumerate(hashes):
            name = (key, tuple(tokens[:(i + 1) * self.ps]))
            assert self.named.setdefault(h, name) == name, "two different prefixes hash alike"
        return hashes

    def _fresh(self, pages):
        """Check pages just returned by `allocate`: new, private, never the scratch page."""
        held = {p for s in self.seqs.values() for p in s.pages}
        assert len(set(pages)) == len(pages) and SCRATCH not in pages and not held & set(pages)
        assert all(self.pool.refs[p] == 1 and p not in self.pool.after_of for p in pages)

    def _write(self, seq, page_index):
        """The sequence writes its tokens into its page `page_index` (only ever a private, unhashed page)."""
        page = seq.pages[page_index]
        assert self.pool.refs[page] == 1 and page not in self.pool.after_of, "write into a shared or cached page"
        end = min(len(seq.tokens), (page_index + 1) * self.ps)
        self.content[page] = (seq.key, tuple(seq.tokens[:end]))

    def _add(self, tokens, key, pages):
        self.seqs[self.next_id] = Seq(list(tokens), key, pages, self.next_id)
        self.history = [(list(tokens), key)] + self.history[:7]
        self.next_id += 1

    def _pick(self, i):
        return sorted(self.seqs)[i % len(self.seqs)]

    def _register(self, seq, i, hashes):
        """Offer the sequence's full page `i` to the cache, as the scheduler does."""
        parent = hashes[i - 1] if i else root_hash(seq.key)
        self.pool.register(seq.pages[i], hashes[i], parent, seq.tokens[i * self.ps:(i + 1) * self.ps])

    def _let_go(self, seq):
        """The sequence leaves (finished, aborted or preempted): its partial last page is kept, then all released."""
        full = len(seq.tokens) // self.ps
        if len(seq.tokens) % self.ps:
            parent = self._hashes(seq.tokens, seq.key)[full - 1] if full else root_hash(seq.key)
            self.pool.keep(seq.pages[full], parent, seq.tokens[full * self.ps:])
        self.pool.release(seq.pages)

    def _admit(self, tokens, key, old_pages=None) -> bool:
        ps, pool = self.ps, self.pool
        hashes = self._hashes(tokens, key)
        cap = (len(tokens) - 1) // ps  # the page holding the last token is always computed afresh
        hit = pool.lookup(hashes[:cap])
        assert len(hit) <= cap and len(set(hit)) == len(hit) and SCRATCH not in hit
        for i, page in enumerate(hit):  # the cache returns exactly this prompt's pages, under this key
            assert self.content[page] == (key, tuple(tokens[:(i + 1) * ps])), "lookup returned the wrong K/V"
            assert pool.hash_of[page] == hashes[i]
        if old_pages is not None:  # a preempted sequence finds its own pages again unless they were evicted
            kept = 0
            while kept < min(cap, len(old_pages)) and pool.hash_of.get(old_pages[kept]) == hashes[kept]:
                kept += 1
            assert hit[:kept] == old_pages[:kept]
        pool.share(hit)
        fresh = pool.allocate(-(-len(tokens) // ps) - len(hit))
        if fresh is None:
            pool.release(hit)
            return False
        self._fresh(fresh)
        start = len(hit) * ps  # the next page: a cached page that begins like it is copied, its tokens not computed
        src, n = pool.continuation(hashes[len(hit) - 1] if hit else root_hash(key), tokens[start:start + ps],
                                   len(tokens) - 1 - start)
        assert 0 <= n < len(tokens) - start
        if n:  # it holds this prompt's K/V up to there, under this key
            held_key, held = self.content[src]
            assert held_key == key and held[:start + n] == tuple(tokens[:start + n]), "went on from the wrong K/V"
            pool.share([src])  # held while copied, then let go
            pool.release([src])
        self._add(tokens, key, hit + fresh)
        seq = self.seqs[self.next_id - 1]
        for i in range(len(hit), len(seq.pages)):
            self._write(seq, i)
            if i < len(hashes):
                self._register(seq, i, hashes)
        return True

    # --- rules ---------------------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.seqs) < self.MAX_SEQS)
    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=7), key=st.sampled_from(KEYS))
    def admit(self, tokens, key):
        """A new prompt: reuse its cached prefix, allocate the rest, register its full pages."""
        self._admit(tokens, key)

    @precondition(lambda self: self.history and len(self.seqs) < self.MAX_SEQS)
    @rule(i=st.integers(0, 7), cut=st.integers(0, 8), extra=st.lists(st.integers(0, 3), max_size=4),
          key=st.sampled_from(KEYS + ["same"]))
    def admit_followup(self, i, cut, extra, key):
        """A prompt that starts with an earlier one (a chat's next turn), under its key or another."""
        tokens, old_key = self.history[i % len(self.history)]
        prompt = tokens[:cut] + extra or [0]
        self._admit(prompt, old_key if key == "same" else key)

    @precondition(lambda self: self.preempted and len(self.seqs) < self.MAX_SEQS)
    @rule(i=st.integers(0, 7))
    def readmit(self, i):
        """A preempted sequence comes back with its tokens so far."""
        tokens, key, old = self.preempted[i % len(self.preempted)]
        if self._admit(tokens, key, old):
            self.preempted.remove((tokens, key, old))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 7), new=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def grow(self, i, new):
        """A sequence decodes tokens: a new page at each page boundary, each page registered once full."""
        seq = self.seqs[self._pick(i)]
        for t in new:
            if len(seq.tokens) % self.ps == 0:  # the last page is full: the next token needs a new one
                got = self.pool.allocate(1)
                if got is None:
                    break  # out of pages: the engine would preempt; the sequence keeps what it has
                self._fresh(got)
                seq.pages += got
            seq.tokens.append(t)
            self._write(seq, len(seq.pages) - 1)
            if len(seq.tokens) % self.ps == 0:
                self._register(seq, len(seq.pages) - 1, self._hashes(seq.tokens, seq.key))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 7))
    def finish(self, i):
        """A sequence finishes or is aborted: the same at the pool level."""
        seq = self.seqs.pop(self._pick(i))
        self._let_go(seq)
        self.history = [(seq.tokens, seq.key)] + self.history[:7]

    @precondition(lambda self: self.seqs)
    @rule()
    def preempt(self):
        """The most recently admitted sequence gives its pages back, to be readmitted later."""
        sid = max(self.seqs, key=lambda s: self.seqs[s].order)
        seq = self.seqs.pop(sid)
        self._let_go(seq)
        if len(self.preempted) < 4:
            self.preempted.append((seq.tokens, seq.key, seq.pages))

    @precondition(lambda self: self.seqs and len(self.seqs) < self.MAX_SEQS)
    @rule(i=st.integers(0, 7))
    def fork(self, i):
        """A sample of an n > 1 request: shares the parent's full pages and copies its partial last page."""
        parent = self.seqs[self._pick(i)]
        full = len(parent.tokens) // self.ps
        shared = parent.pages[:full]
        self.pool.share(shared)
        fresh = []
        if len(parent.tokens) % self.ps:
            fresh = self.pool.allocate(1)
            if fresh is None:
                self.pool.release(shared)
                return
            self._fresh(fresh)
        self._add(parent.tokens, parent.key, shared + fresh)
        if fresh:
            self._write(self.seqs[self.next_id - 1], full)

    # --- invariants ----------------------------------------------------------------------------------------------

    @invariant()
    def pool_consistent(self):
        """The pool's own invariants, and its reference counts are exactly the sequences' page lists."""
        pool = self.pool
        pool.check()
        counts = [0] * pool.num_pages
        for seq in self.seqs.values():
            assert len(set(seq.pages)) == len(seq.pages) and SCRATCH not in seq.pages
            assert len(seq.pages) == -(-len(seq.tokens) // self.ps)
            for p in seq.pages:
                counts[p] += 1
        assert pool.refs == counts and sum(pool.refs) == sum(len(s.pages) for s in self.seqs.values())
        assert pool.refs[SCRATCH] == 0
        assert pool.num_free + sum(r > 0 for r in pool.refs) == pool.capacity

    @invariant()
    def contents_correct(self):
        """Every page holds what its holders and its hash say (so isolation keys never mix)."""
        for seq in self.seqs.values():  # every sequence's pages hold exactly its own tokens, under its own key
            for i, p in enumerate(seq.pages):
                assert self.content[p] == (seq.key, tuple(seq.tokens[:min(len(seq.tokens), (i + 1) * self.ps)]))
        for h, p in self.pool.page_of.items():  # a cached page holds the full page of tokens its hash names
            assert self.content[p] == self.named[h]
        roots = {root_hash(k): (k, ()) for k in KEYS}
        for p, parent in self.pool.after_of.items():  # a listed page holds its tokens after its parent's
            key, before = self.named[parent] if parent in self.named else roots[parent]
            assert self.content[p] == (key, before + self.pool.after[parent][p])

    def teardown(self):
        """With every sequence released, nothing is owned and every page is free again."""
        if not hasattr(self, "pool"):
            return
        for sid in list(self.seqs):
            self.pool.release(self.seqs.pop(sid).pages)
        self.pool.check()
        assert all(r == 0 for r in self.pool.refs) and self.pool.num_free == self.pool.capacity, "pages leaked"
        assert len(self.pool.evictable) == len(self.pool.after_of) >= self.pool.num_cached


class TightPoolMachine(PoolMachine):
    """Bigger pages in a smaller pool: allocation fails and cached pages are evicted often."""

    PAGE_SIZE, NUM_PAGES, MAX_SEQS = 3, 6, 5


FAST = settings(max_examples=150, stateful_step_count=40, derandomize=True, deadline=None, database=None)
TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = FAST
TestTightPoolMachine = TightPoolMachine.TestCase
TestTightPoolMachine.settings = FAST


# --- unit tests ------------------------------------------------------------------------------------------------------


def cached(pool, tokens, key=None):
    """Allocate and register pages for `tokens` (whole pages), as a finished prompt would leave them."""
    hashes, ps = page_hashes(tokens, pool.page_size, key), pool.page_size
    pages = pool.allocate(len(hashes))
    for i, (p, h) in enumerate(zip(pages, hashes)):
        pool.register(p, h, hashes[i - 1] if i else root_hash(key), tokens[i * ps:(i + 1) * ps])
    return pages


def test_evicts_least_recently_freed_first():
    """Cached pages freed earlier are evicted before those freed later, and only once no empty page is left."""
    pool = PagePool(6, 2)
    a, b = cached(pool, [1, 1]), cached(pool, [2, 2])
    pool.release(a)
    pool.release(b)
    assert pool.allocate(3) == [3, 4, 5]  # the empty pages go first; the cache is untouched
    assert pool.num_cached == 2
    assert pool.allocate(1) == a and pool.lookup(page_hashes([1, 1], 2)) == []
    assert pool.lookup(page_hashes([2, 2], 2)) == b
    assert pool.allocate(1) == b and pool.num_cached == 0
    pool.check()


def test_sequence_tail_evicted_before_head():
    """Releasing a sequence queues its pages last-first, so its tail is evicted before its head."""
    pool = PagePool(4, 2)
    tokens = [1, 2, 3, 4, 5, 6]
    pages = cached(pool, tokens)
    pool.release(pages)
    assert [pool.allocate(1)[0] for _ in range(3)] == pages[::-1]
    pool.check()


def test_shared_page_leaves_and_rejoins_eviction_order():
    """Sharing a free cached page takes it out of the eviction order; freeing it again makes it the newest."""
    pool = PagePool(3, 2)
    a, b = cached(pool, [1, 1]), cached(pool, [2, 2])
    pool.release(a)
    pool.release(b)
    pool.share(a)
    assert pool.num_free == 1 and pool.refs[a[0]] == 1
    pool.release(a)
    assert pool.allocate(1) == b and pool.allocate(1) == a
    pool.check()


def test_allocate_none_takes_nothing():
    """`allocate` returns None and changes nothing when fewer pages are free than asked for."""
    pool = PagePool(5, 2)
    held = pool.allocate(2)
    free_page = cached(pool, [7, 7])
    pool.release(free_page)  # one empty page and one cached, evictable page
    before = (list(pool.refs), list(pool.empty), list(pool.evictable), dict(pool.page_of))
    assert pool.num_free == 2 and pool.allocate(3) is None
    assert (list(pool.refs), list(pool.empty), list(pool.evictable), dict(pool.page_of)) == before
    assert pool.allocate(0) == [] and len(pool.allocate(2)) == 2 and pool.allocate(1) is None
    pool.release(held)
    pool.check()


def test_scratch_page_never_handed_out():
    """The whole capacity can be allocated without ever handing out page 0; a pool needs two pages."""
    pool = PagePool(5, 4)
    assert pool.capacity == 4 and sorted(pool.allocate(4)) == [1, 2, 3, 4] and pool.num_free == 0
    with pytest.raises(ValueError):
        PagePool(1, 4)


def test_register_keeps_first_page_for_a_prefix():
    """Registering a second page for an already-cached prefix is ignored; the first page stays the cached one."""
    pool = PagePool(4, 2)
    h = page_hashes([3, 3], 2)[0]
    first, second = pool.allocate(2)
    pool.register(first, h, root_hash(), [3, 3])
    pool.register(second, h, root_hash(), [3, 3])
    assert pool.page_of == {h: first} and pool.hash_of == {first: h}
    pool.release([first, second])
    assert list(pool.evictable) == [first] and second in pool.empty
    pool.check()


def test_lookup_stops_at_first_miss():
    """A cached page whose preceding page was evicted is not returned: a hit is always a whole prefix."""
    pool = PagePool(5, 2)
    h = page_hashes([1, 1, 2, 2, 3], 2)
    a = cached(pool, [1, 1])  # a first prompt caches page [1, 1]
    b = pool.allocate(2)  # a second one computed [1, 1] afresh (prompts never reuse their last page) and grew
    pool.register(b[0], h[0], root_hash(), [1, 1])  # ignored: the prefix is cached in `a` already
    pool.register(b[1], h[1], h[0], [2, 2])
    pool.release(a)
    assert pool.allocate(2) == [4, a[0]]  # `a` is evicted while [1, 1, 2, 2] stays cached in b[1]
    assert pool.page_of.get(h[0]) is None and pool.page_of[h[1]] == b[1]
    assert pool.lookup(h) == []
    pool.check()


def test_the_pool_goes_on_from_pages_until_it_evicts_them():
    """`continuation` finds a registered full page or a kept partial one by its parent and the tokens it begins
    with (at most `most`, never across isolation keys), until allocation evicts it; the invariants hold throughout."""
    pool, root = PagePool(4, 4), root_hash()
    a = pool.allocate(2)
    h = page_hashes([1, 2, 3, 4], 4)
    pool.register(a[0], h[0], root, [1, 2, 3, 4])
    pool.keep(a[1], h[0], [5, 6])
    pool.release(a)
    pool.check()
    assert pool.continuation(root, [1, 2, 3, 9], 4) == (a[0], 3)
    assert pool.continuation(root, [1, 2, 3, 4], 2) == (a[0], 2)
    assert pool.continuation(h[0], [5, 6, 7], 4) == (a[1], 2)
    assert pool.continuation(h[0], [7], 4) == (0, 0) and pool.continuation(root_hash("b"), [1, 2], 4) == (0, 0)
    pool.allocate(2)  # the empty page, then the least recently freed: the sequence's tail
    pool.check()
    assert pool.continuation(h[0], [5, 6], 4) == (0, 0) and pool.continuation(root, [1, 2], 4) == (a[0], 2)


def test_release_of_free_page_fails():
    """Releasing a page that no sequence owns is a bug the pool catches."""
    pool = PagePool(3, 2)
    pages = pool.allocate(1)
    pool.release(pages)
    with pytest.raises(AssertionError):
        pool.release(pages)


def test_page_hashes_chain_and_salt():
    """A page's hash depends on every page before it and on the isolation key, and only full pages are hashed."""
    assert len(page_hashes([1, 2, 3], 2)) == 1 and page_hashes([1], 2) == [] and page_hashes([], 2) == []
    a, b = page_hashes([1, 2, 3, 4], 2), page_hashes([5, 6, 3, 4], 2)
    assert a[0] != b[0] and a[1] != b[1]  # the same tokens after different pages hash differently
    c = page_hashes([1, 2, 9, 9], 2)
    assert a[0] == c[0] and a[1] != c[1]
    salted = [page_hashes([1, 2], 2, s)[0] for s in (None, "", "a", "b")]
    assert len(set(salted)) == 4
    assert page_hashes([1, 2], 2, "a") == page_hashes([1, 2], 2, "a")
    tokens = [1, 2, 3, 4, 5, 6, 7]
    assert page_hashes(tokens, 2, "a", page_hashes(tokens[:4], 2, "a")) == page_hashes(tokens, 2, "a")  # extended


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(a=tokens_st, b=tokens_st, sa=st.sampled_from(KEYS), sb=st.sampled_from(KEYS), ps=st.integers(1, 3))
def test_page_hashes_equal_iff_same_prefix(a, b, sa, sb, ps):
    """Two pages' hashes are equal exactly when their whole prefixes and isolation keys are; hashing is by prefix."""
    ha, hb = page_hashes(a, ps, sa), page_hashes(b, ps, sb)
    assert len(ha) == len(a) // ps and ha == page_hashes(a + b, ps, sa)[:len(ha)]
    for i in range(min(len(ha), len(hb))):
        assert (ha[i] == hb[i]) == (sa == sb and a[:(i + 1) * ps] == b[:(i + 1) * ps])
