"""Drafts from a smaller model (speculative decoding's draft model: vLLM's `--speculative-config` `model`, llama.cpp's
`--model-draft`): each drafting row's next tokens, drawn greedily by the draft model in one device call.

The draft model keeps a KV pool of its own, paged as the target's: the same page ids, tables and page size in arrays
of its own shape, so every page the scheduler hands a sequence holds its K/V in both pools, and nothing is freed,
shared or copied for the draft (the engine only reserves the drafted positions' pages a step before the verify
that needs them). `length[slot]` counts the positions of the sequence seated in a slot that the draft pool holds. A
call first writes the tokens since then (the one or two tokens a verify added; a decode dispatch's; a new
sequence's prompt, a chunk a step), draws its first token from the last one's logits, and decodes k - 1 more
greedily. A drafted token the verify keeps was written at its position by that decode, so it counts as held.

What the draft pool holds shapes only the drafts: the verify keeps a drafted token only where the target's own
sampler draws it (`engine.speculative`), so a stale page (a sequence preempted and seated again, a page the
prefix cache mapped in) can lower the acceptance, never change a token. A sequence seated anew (another choice in
the slot, or the same one admitted again) or whose table changed is written again from its first differing page.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from engine import sleep as sleeping
from engine.compile import AOT
from engine.runner import PREFILL_ROWS, Runner, bucket
from models import KVCache, Model, backends
from models.sharding import cache_sharding

CATCH_UP = (2, 8, 32)  # tokens a row writes in a drafting call: after a verify, after a decode dispatch
PROMPT_SIZES = (128,)  # ... and a new sequence's prompt (longer ones: in chunks of the runner's, `Runner.chunk`)
DEFAULT_TOKENS = 5  # drafted tokens per row and step without --num-speculative-tokens (vLLM's examples use 5)


def from_config(config: dict) -> tuple[object, dict]:
    """vLLM's `speculative_config` as the draft model to load (a name, folder, file or `Model`; None: none) and the
    `RunnerConfig` fields it sets: `model` (a draft model; `method` "draft_model" or left out), or `method` "ngram",
    and `num_speculative_tokens` (default `DEFAULT_TOKENS`). vLLM's n-gram bounds (`prompt_lookup_max`, `_min`) are
    taken and left to the engine's own (suffixes of 4 tokens down to 2). Raises `ValueError` for what is not served
    (EAGLE, MTP, Medusa; unknown keys)."""
    if not isinstance(config, dict):
        raise ValueError(f"speculative_config: a JSON object, not {type(config).__name__}")
    config = dict(config)
    model, method, k = config.pop("model", None), config.pop("method", None), config.pop("num_speculative_tokens", None)
    config.pop("prompt_lookup_max", None)
    config.pop("prompt_lookup_min", None)
    if config:
        raise ValueError(f"speculative_config: unknown keys {sorted(config)} (served: model, method, "
                         "num_speculative_tokens, prompt_lookup_max, prompt_lookup_min)")
    if method not in (None, "draft_model", "ngram"):
        raise ValueError(f"speculative_config: method {method!r} is not served (served: draft_model, ngram)")
    if model is not None and not (isinstance(model, Model) or isinstance(model, str) and model):
        raise ValueError(f"speculative_config: 'model' names a model (a catalog name, folder or file), not {model!r}")
    if (method == "ngram") == (model is not None) or (model is None and method is None):
        raise ValueError("speculative_config: name a draft 'model', or method 'ngram' without one")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"speculative_config: num_speculative_tokens must be a positive integer, not {k!r}")
    if method == "ngram":
        return None, dict(ngram=True, draft_tokens=k or DEFAULT_TOKENS)
    return model, dict(draft_tokens=k or DEFAULT_TOKENS)


def check_pair(target: Model, draft: Model) -> None:
    """Raise `ValueError` unless `draft` can draft for `target`: the same token ids (the same tokenizer vocabulary
    where both have a tokenizer, else the same vocabulary size; the embedding tables may be padded differently)."""
    a, b = target.tokenizer, draft.tokenizer
    if a is not None and b is not None:
        if a.backend.get_vocab() != b.backend.get_vocab():
            raise ValueError("the draft model's tokenizer maps tokens to other ids than the target's: a draft model "
                             "must share the target's tokenizer")
    elif draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) is not the target's "
                         f"({target.cfg.vocab_size}): a draft model must share the target's tokenizer")


def piece(seq: tuple[list[int], list[int]], a: int, b: int) -> list[int]:
    """Tokens `a:b` of a prompt and output taken as one sequence (without joining them whole)."""
    prompt, output = seq
    if b <= len(prompt):
        return prompt[a:b]
    if a >= len(prompt):
        return output[a - len(prompt):b - len(prompt)]
    return prompt[a:] + output[:b - len(prompt)]


def _parts(items: list, most: int) -> list[list]:
    """`items` in runs of at most `most`."""
    return [items[i:i + most] for i in range(0, len(items), max(most, 1))]


class DraftModel:
    """A draft model's parameters, its KV pool (paged as `runner`'s) and the program that drafts `k` tokens a row."""

    def __init__(self, model: Model, runner: Runner, k: int):
        if runner.dp > 1:
            raise ValueError("a draft model runs on one data shard (-dp 1)")
        if k < 1:
            raise ValueError(f"a draft model drafts at least one token a step, not {k}")
        check_pair(runner.model, model)
        self.model, self.runner, self.k = model, runner, k
        slots, ps = runner.slots, runner.page_size
        pool = cache_sharding(model.cfg.cache_heads, model.mesh)  # as the target's: heads over tp
        zeros = jax.jit(lambda: KVCache.zeros(model.cfg, runner.num_pages, ps), out_shardings=KVCache(pool, pool))
        self.cache, self._zeros = zeros(), zeros
        self.length = np.zeros(slots, np.int64)  # positions the pool holds of each slot's sequence
        self.seated: list[object] = [None] * slots  # whose sequence they are (`propose`'s keys)
        self.tables = np.zeros((slots, runner.max_pages), np.int32)  # the table each slot's positions were written by
        self.drafted: list[list[int]] = [[] for _ in range(slots)]  # the tokens the last call wrote past the length
        # tokens a row writes in a drafting call: a few, a decode dispatch's, a prompt in prefill chunks
        self.sizes = tuple(sorted({*CATCH_UP, *(b for b in PROMPT_SIZES if b < runner.chunk), runner.chunk}))
        self.compiles = 0
        self.calls = 0  # drafting calls (chunks of a long gap included)
        module = model.module
        vocab = min(model.cfg.vocab_size, runner.model.cfg.vocab_size)  # ids both models have (tables may be padded)

        @functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(1,))
        def draft(params, cache, tokens, start, n, table, k):
            # tokens [rows, C]: each row's tokens from `start` on (`n` of them, then padding, written past them and
            # overwritten before they are read); then k greedy draws, the first from the last token's logits
            self.compiles += 1
            positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]
            tokens = jnp.where(tokens < vocab, tokens, 0)  # a picture's rows in a prompt: not the draft's tokens
            logits, cache = module.apply(params, tokens, positions, table, cache, n - 1, False, None)
            first = jnp.argmax(logits[:, :vocab], axis=-1).astype(jnp.int32)

            def one(carry, _):
                cache, token, pos = carry
                logits, cache = module.apply(params, token[:, None], pos[:, None], table, cache, None, False, None)
                nxt = jnp.argmax(logits[:, :vocab], axis=-1).astype(jnp.int32)
                return (cache, nxt, pos + 1), nxt

            (cache, _, _), rest = jax.lax.scan(one, (cache, first, start + n), None, length=k - 1)
            return cache, jnp.concatenate([first[:, None], rest.T], axis=1)

        self._draft = AOT(draft, "draft", repr((model.cfg, module.layer_cls.__qualname__, module.backend,
                                                 module.scan, dict(model.mesh.shape))))

    def release_pool(self) -> int:
        """Delete the draft's KV pool on the devices (`Engine.sleep`); the bytes given back. What it held is
        forgotten: every sequence is written again."""
        self.seated = [None] * len(self.seated)
        return sleeping.offload(self.cache, keep=False).nbytes

    def restore_pool(self) -> None:
        """A zeroed KV pool again, after `release_pool`."""
        self.cache = self._zeros()

    def programs(self) -> int:
        """Programs compiled (or loaded) so far."""
        return len(self._draft.exes)

    def _held(self, slot: int, key, table: np.ndarray, seq: tuple[list[int], list[int]]) -> int:
        """Positions of `seq` (the prompt and output now in `slot`, `key` naming its seating) the pool holds."""
        if self.seated[slot] != key:
            self.seated[slot], self.length[slot], self.drafted[slot] = key, 0, []
        n, drafted, total = int(self.length[slot]), self.drafted[slot], len(seq[0]) + len(seq[1])
        later = piece(seq, n, n + len(drafted))
        n += next((i for i, (a, b) in enumerate(zip(drafted, later)) if a != b), min(len(drafted), len(later)))
        ps = self.runner.page_size
        same = np.flatnonzero(self.tables[slot, :-(-n // ps)] != table[:-(-n // ps)])
        return min(n, int(same[0]) * ps if same.size else n, total - 1)  # the last token is always written

    def propose(self, rows: dict[int, tuple[object, list[int], list[int]]], tables: np.ndarray) -> dict[int, list[int]]:
        """Each row's `k` drafted tokens: `rows` maps a slot to `(key, prompt, output)`, the sequence seated there
        (`key` changes when another sequence is seated, or the same one again), whose pages are in `tables[slot]`.
        Rows go in one call per catch-up size (`sizes`; calls of a prompt's sizes hold up to `PREFILL_ROWS` rows):
        the one or two tokens of most rows are not padded to a new prompt's hundreds. A row further behind than
        the largest size writes one chunk a step and drafts once caught up, so a long prompt does not hold up the
        other streams' steps."""
        seqs = {s: (rows[s][1], rows[s][2]) for s in rows}
        total = {s: len(p) + len(o) for s, (p, o) in seqs.items()}
        have = {s: self._held(s, rows[s][0], tables[s], seqs[s]) for s in sorted(rows)}
        most = self.sizes[-1]
        behind = [s for s in have if total[s] - have[s] > most]
        for part in _parts(behind, PREFILL_ROWS):  # one chunk each
            self._call(part, {s: piece(seqs[s], have[s], have[s] + most) for s in part}, have, tables, 1)
            for s in part:
                self.length[s], self.tables[s], self.drafted[s] = have[s] + most, tables[s], []
        groups: dict[int, list[int]] = {}
        for s in have:
            if total[s] - have[s] <= most:
                groups.setdefault(bucket(total[s] - have[s], self.sizes), []).append(s)
        out = {}
        for size, group in groups.items():
            for part in _parts(group, PREFILL_ROWS if size > CATCH_UP[-1] else len(group)):
                out.update(self._call(part, {s: piece(seqs[s], have[s], total[s]) for s in part}, have, tables,
                                      self.k))
        for s in out:
            self.length[s], self.tables[s] = total[s], tables[s]
            self.drafted[s] = out[s][:-1]  # written at their positions; the last one is not
        return out

    def _call(self, slots: list[int], pieces: dict[int, list[int]], start: dict[int, int], tables: np.ndarray,
              k: int) -> dict[int, list[int]]:
        """One device call: write each slot's `pieces` from `start[slot]` on, then draw `k` tokens after them."""
        runner = self.runner
        nb = bucket(len(slots), runner.batch_buckets)
        size = bucket(max(len(p) for p in pieces.values()), self.sizes)
        tokens, starts, n = np.zeros((nb, size), np.int32), np.zeros(nb, np.int32), np.ones(nb, np.int32)
        rows = np.zeros((nb, tables.shape[1]), np.int32)  # padding rows: every position on the scratch page
        for r, s in enumerate(slots):
            tokens[r, :len(pieces[s])], starts[r], n[r], rows[r] = pieces[s], start[s], len(pieces[s]), tables[s]
        self.cache, drafts = self._draft(self.model.params, self.cache, tokens, starts, n,
                                         runner.table(rows, self.width(nb, int(starts.max()) + 1, size, k)), k=k)
        self.calls += 1
        drafts = np.asarray(drafts)
        return {s: drafts[r].tolist() for r, s in enumerate(slots)}

    def width(self, nb: int, need: int, size: int, k: int) -> int:
        """The table width (positions) of a call of `nb` rows writing `size` tokens a row and drafting `k`, whose
        latest start is `need - 1`: the earlier positions' attended length (the whole context where the draft
        model's attention reads each row's keys by its length), then room for its own."""
        runner, module = self.runner, self.model.module
        if backends.reads_by_length(module.backend, nb, size, self.model.cfg.matmul):
            return size + k + runner.max_len
        return size + k + bucket(min(need, runner.max_len), runner.attend)

    def warm_jobs(self, needs: tuple[int, ...]) -> list:
        """The drafting calls' shapes to compile before serving, at the attended lengths `needs`: each catch-up
        size at every batch bucket (a prompt's sizes up to `PREFILL_ROWS` rows: new prompts come a few at a time)."""
        runner, jobs = self.runner, []
        for b in runner.batch_buckets:
            for size in self.sizes:
                if size > CATCH_UP[-1] and b > PREFILL_ROWS:
                    continue
                for k in ((self.k, 1) if size == self.sizes[-1] else (self.k,)):
                    for w in sorted({self.width(b, a, size, k) for a in needs}):
                        shapes = ((b, size), b, b, (b, -(-w // runner.page_size)))
                        ints = [np.zeros(shape, np.int32) for shape in shapes]
                        jobs.append((self._draft, (self.model.params, self.cache, *ints), dict(k=k)))
        return jobs
