"""The KV page pool's host side: a page allocator with reference counts and a prefix cache of pages.

Plain Python; the device holds the pages themselves (`models.backends.paged`). Invariants, checked by `check()`:
- page 0 is the scratch page: never handed out (page tables point padding there; what is written to it is never read
  unmasked);
- every other page is in exactly one of two states: owned (`refs[p] > 0`, by that many sequences) or free
  (`refs[p] == 0`, in `empty` when it holds nothing reusable, else in `evictable`, least recently freed first);
- a page with a hash holds the K/V of the full page of tokens that hash names (the hash chains over every page
  before it and the isolation key), and `page_of[hash] == page`; only full pages are ever hashed, and hashed pages
  are never written again (a sequence writes only at positions past its last full, shared page);
- a page in `after_of` holds the K/V of its tokens (`after[parent][page]`) after the pages hashed `parent`: every
  hashed page, and a sequence's partial last page once it let go (`keep`), never written again either. A prompt
  whose next page starts with those tokens copies them (`continuation`) instead of computing them;
- allocation takes `empty` pages first and evicts `evictable` ones (dropping their hash and tokens) least recently
  used first.
"""

from __future__ import annotations

import collections
import hashlib
import itertools

import numpy as np

from models.backends.paged import SCRATCH


SCAN = 64  # a continuation is looked for among the pages last registered after a prefix, newest first


def root_hash(salt: str | tuple | None = None) -> bytes:
    """The hash the chain starts from: the isolation key's, or a LoRA adapter's with it (`(adapter, key)`): no
    prompt's pages are shared across keys or adapters."""
    tag = (b"\x00" if salt is None else b"\x01" + salt.encode() if isinstance(salt, str)
           else b"\x02" + repr(salt).encode())
    return hashlib.sha256(b"sparkler" + tag).digest()


def page_hashes(tokens: list[int], page_size: int, salt: str | tuple | None = None,
                known: list[bytes] = ()) -> list[bytes]:
    """The chained hash of every full page of `tokens`: page i's hash covers pages 0..i and the isolation key.
    `known` holds the hashes of its first pages, already computed: only the pages after them are hashed."""
    h = known[-1] if known else root_hash(salt)
    out = list(known)
    arr = np.asarray(tokens, np.int64)
    for i in range(len(known), len(tokens) // page_size):
        h = hashlib.sha256(h + arr[i * page_size:(i + 1) * page_size].tobytes()).digest()
        out.append(h)
    return out


class PagePool:
    """Reference-counted pages `1..num_pages-1` with a least-recently-used prefix cache of full pages, and of
    partial last pages let go."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError("the pool needs at least two pages (page 0 is scratch)")
        self.num_pages, self.page_size = num_pages, page_size
        self.refs = [0] * num_pages
        self.empty: collections.deque[int] = collections.deque(range(1, num_pages))
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.hash_of: dict[int, bytes] = {}
        self.page_of: dict[bytes, int] = {}
        self.after: dict[bytes, dict[int, tuple[int, ...]]] = {}  # parent hash -> {page: its tokens}, oldest first
        self.after_of: dict[int, bytes] = {}  # page -> its parent hash
        self.queried = self.hit = 0  # prompt tokens looked up / found, for the hit rate

    @property
    def capacity(self) -> int:
        """Pages that sequences can hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages an allocation can take now (empty, or cached and evictable)."""
        return len(self.empty) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        """Pages that hold a reusable prefix (owned or not)."""
        return len(self.page_of)

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages owned once each, or None (and nothing taken) if fewer than `n` are free."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self.empty:
                page = self.empty.popleft()
            else:
                page, _ = self.evictable.popitem(last=False)
                self._forget(page)
            self.refs[page] = 1
            out.append(page)
        return out

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `hashes` (not yet shared: pass them to `share`)."""
        out = []
        for h in hashes:
            page = self.page_of.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def share(self, pages: list[int]) -> None:
        """Take one more reference on each page (a free cached page leaves the eviction order)."""
        for page in pages:
            if self.refs[page] == 0:
                self.evictable.pop(page)
            self.refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference on each page. Freed pages are queued last-first, so a sequence's tail is evicted
        before its head (which more prompts share)."""
        for page in reversed(pages):
            assert self.refs[page] > 0, f"page {page} released while free"
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.after_of:
                    self.evictable[page] = None
                else:
                    self.empty.append(page)

    def register(self, page: int, h: bytes, parent: bytes, tokens: list[int]) -> None:
        """Record that owned, full `page` holds `tokens`, after the pages hashed `parent`, hashed `h` with them
        (ignored if that prefix is cached already)."""
        assert self.refs[page] > 0
        if h not in self.page_of and page not in self.hash_of and page not in self.after_of:
            self.page_of[h], self.hash_of[page] = page, h
            self._after(page, parent, tokens)

    def keep(self, page: int, parent: bytes, tokens: list[int]) -> None:
        """Record that owned, partial `page` holds `tokens` after the pages hashed `parent`, as its owner lets it go
        (it is never written again): a prompt that goes on from them copies it (`continuation`)."""
        assert self.refs[page] > 0 and 0 < len(tokens) < self.page_size
        if page not in self.after_of:
            self._after(page, parent, tokens)

    def continuation(self, parent: bytes, tokens: list[int], most: int) -> tuple[int, int]:
        """A page among the last `SCAN` recorded after the pages hashed `parent` whose tokens begin the most of
        `tokens` (at most `most`), and how many: `(page, n)`, or `(0, 0)` (not yet shared: pass it to `share`)."""
        best, most = (0, 0), min(most, len(tokens))
        for page, held in itertools.islice(reversed(self.after.get(parent, {}).items()), SCAN):
            n = 0
            while n < min(most, len(held)) and held[n] == tokens[n]:
                n += 1
            if n > best[1]:
                best = page, n
        return best

    def _after(self, page: int, parent: bytes, tokens: list[int]) -> None:
        self.after.setdefault(parent, {})[page] = tuple(tokens)
        self.after_of[page] = parent

    def _forget(self, page: int) -> None:
        """Drop an evicted page's hash and tokens."""
        if page in self.hash_of:
            del self.page_of[self.hash_of.pop(page)]
        parent = self.after_of.pop(page)
        del self.after[parent][page]
        if not self.after[parent]:
            del self.after[parent]

    def flush(self) -> int:
        """Forget every cached prefix of the pages no sequence holds (they become empty); returns how many."""
        n = len(self.evictable)
        for page in self.evictable:
            self._forget(page)
            self.empty.append(page)
        self.evictable.clear()
        return n

    def check(self) -> None:
        """Assert the invariants in the module docstring (tests call this)."""
        free = list(self.empty) + list(self.evictable)
        assert len(free) == len(set(free)) and SCRATCH not in free and self.refs[SCRATCH] == 0
        assert all(self.refs[p] == 0 for p in free)
        assert len(free) + sum(r > 0 for r in self.refs) == self.capacity
        assert all(p in self.after_of for p in self.evictable) and not any(p in self.after_of for p in self.empty)
        assert all(self.hash_of[p] == h for h, p in self.page_of.items()) and len(self.page_of) == len(self.hash_of)
        assert all(p in self.after_of for p in self.hash_of)
        assert {p for pages in self.after.values() for p in pages} == set(self.after_of)
        assert all(p in self.after[h] for p, h in self.after_of.items())
