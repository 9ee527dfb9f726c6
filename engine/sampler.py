"""The functional sampler: one pure function of `(logits, per-slot params, per-slot state)`.

Every request setting is a row of an array, so one compiled program serves any mix of settings. Disabled transforms
are neutral values (top_k = 0 meaning the whole vocabulary, top_p = 1, penalties 1/0, ...), never Python branches.

Order of transforms (docs/ARCHITECTURE.md repeats it):
  0. logprobs for the response: log-softmax of the raw logits (before anything below), chosen token and top 20;
  1. logit_bias (ignore_eos is a -inf bias on the EOS ids);
  2. repetition_penalty over prompt and output tokens (positive logits / r, negative * r);
  3. frequency and presence penalties over output tokens: `z -= f * count + p * (count > 0)`;
  4. temperature 0 -> greedy argmax of the penalised logits; else z / temperature;
  5. truncation, as transformers chains its warpers: top_k, top_p, min_p, typical_p; each sees the distribution
     left by the previous one (or mirostat v2 instead, when a slot enables it);
  6. a draw by Gumbel-max over the survivors with the slot's own key, folded with its step counter.

Truncation never sorts the vocabulary in the common case: thresholds are found among the top `CANDIDATES` logits, and
only when some slot's survivors may reach past them (top_k > CANDIDATES, or a flat distribution under top_p / min_p)
does a `lax.cond` take the exact path that sorts the whole vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

CANDIDATES = 64
TOP_LOGPROBS = 20
NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerParams:
    """Per-slot settings, one row per slot (`[B]`, bias `[B, V]`)."""

    temperature: jax.Array
    top_k: jax.Array  # int32; <= 0 means no limit
    top_p: jax.Array
    min_p: jax.Array
    typical_p: jax.Array
    repetition_penalty: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array
    mirostat_tau: jax.Array
    mirostat_eta: jax.Array
    mirostat: jax.Array  # bool
    bias: jax.Array  # [B, V] additive logit bias (-inf for suppressed EOS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Per-slot state threaded through every step."""

    counts: jax.Array  # [B, V] int32 output-token counts
    prompt_mask: jax.Array  # [B, V] bool: token occurs in the prompt
    mu: jax.Array  # [B] mirostat mu
    key: jax.Array  # [B, 2] uint32 raw PRNG key of the request
    step: jax.Array  # [B] int32 draws made so far (folded into the key)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOut:
    """What one draw returns per slot."""

    token: jax.Array  # [B] int32
    logprob: jax.Array  # [B] raw logprob of the chosen token
    top_ids: jax.Array  # [B, TOP_LOGPROBS]
    top_logprobs: jax.Array  # [B, TOP_LOGPROBS]


def neutral_params(batch: int, vocab: int) -> dict:
    """Host-side (numpy) parameter arrays with every transform disabled."""
    import numpy as np

    return dict(
        temperature=np.ones(batch, np.float32), top_k=np.zeros(batch, np.int32), top_p=np.ones(batch, np.float32),
        min_p=np.zeros(batch, np.float32), typical_p=np.ones(batch, np.float32),
        repetition_penalty=np.ones(batch, np.float32), frequency_penalty=np.zeros(batch, np.float32),
        presence_penalty=np.zeros(batch, np.float32), mirostat_tau=np.full(batch, 5.0, np.float32),
        mirostat_eta=np.full(batch, 0.1, np.float32), mirostat=np.zeros(batch, bool),
        bias=np.zeros((batch, vocab), np.float32))


def init_state(batch: int, vocab: int) -> SamplerState:
    """An all-zero state."""
    return SamplerState(jnp.zeros((batch, vocab), jnp.int32), jnp.zeros((batch, vocab), bool),
                        jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, 2), jnp.uint32),
                        jnp.zeros((batch,), jnp.int32))


def penalize(logits: jax.Array, p: SamplerParams, s: SamplerState) -> jax.Array:
    """Steps 1-3: logit bias, repetition penalty (prompt + output), frequency/presence penalties (output)."""
    z = logits + p.bias
    seen = s.prompt_mask | (s.counts > 0)
    r = p.repetition_penalty[:, None]
    z = jnp.where(seen, jnp.where(z > 0, z / r, z * r), z)
    counts = s.counts.astype(jnp.float32)
    return z - p.frequency_penalty[:, None] * counts - p.presence_penalty[:, None] * (counts > 0)


def _truncate_sorted(sz: jax.Array, lse_all: jax.Array, vocab: int, p: SamplerParams):
    """Top-k, top-p, min-p and typical-p on descending-sorted logits `sz [B, N]`.

    Returns `(z_threshold, lse_kept, entropy, shift_threshold, last_survives)`: a token survives iff
    `z >= z_threshold` and `|-(z - lse_kept) - entropy| <= shift_threshold`.
    """
    n = sz.shape[-1]
    idx = jnp.arange(n)[None, :]
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sz, jnp.clip(k - 1, 0, n - 1)[:, None], axis=1)
    keep = (sz >= kth) | (k[:, None] > n)
    # top_p over the distribution left by top_k; its normaliser is over all tokens when top_k does not cut.
    masked = jnp.where(keep, sz, NEG_INF)
    lse = jnp.where(k >= vocab, lse_all, jax.nn.logsumexp(masked, axis=-1))
    probs = jnp.exp(masked - lse[:, None])
    excl = jnp.cumsum(probs, axis=-1) - probs
    keep &= (excl < p.top_p[:, None]) | (idx == 0) | (p.top_p[:, None] >= 1.0)
    # min_p relative to the most likely token (invariant under renormalisation).
    keep &= sz >= sz[:, :1] + jnp.log(jnp.maximum(p.min_p, 1e-38))[:, None]
    last_survives = keep[:, -1]
    thr = jnp.min(jnp.where(keep, sz, jnp.inf), axis=-1)
    # typical_p over what is left (an exact computation when the survivors lie within `sz`).
    masked = jnp.where(keep, sz, NEG_INF)
    lse_kept = jax.nn.logsumexp(masked, axis=-1)
    logq = masked - lse_kept[:, None]
    q = jnp.exp(logq)
    ent = -jnp.sum(jnp.where(keep, q * logq, 0.0), axis=-1)
    shift = jnp.where(keep, jnp.abs(-logq - ent[:, None]), jnp.inf)
    order = jnp.argsort(shift, axis=-1)
    sshift = jnp.take_along_axis(shift, order, axis=-1)
    cq = jnp.cumsum(jnp.take_along_axis(q, order, axis=-1), axis=-1)
    last = jnp.clip(jnp.sum(cq < p.typical_p[:, None], axis=-1), 0, n - 1)
    shift_thr = jnp.take_along_axis(sshift, last[:, None], axis=1)[:, 0]
    shift_thr = jnp.where(p.typical_p >= 1.0, jnp.inf, shift_thr)
    return thr, lse_kept, ent, shift_thr, last_survives


def truncation_mask(z: jax.Array, p: SamplerParams) -> jax.Array:
    """Which tokens survive top_k/top_p/min_p/typical_p, for temperature-scaled logits `z [B, V]`."""
    b, vocab = z.shape
    lse_all = jax.nn.logsumexp(z, axis=-1)
    # Use the indices: XLA rewrites a values-only top_k into a full sort.
    _, cand_idx = jax.lax.top_k(z, min(CANDIDATES, vocab))
    cand = jnp.take_along_axis(z, cand_idx, axis=1)
    fast = _truncate_sorted(cand, lse_all, vocab, p)
    k = jnp.where(p.top_k > 0, p.top_k, vocab)
    trivial = (k >= vocab) & (p.top_p >= 1.0) & (p.min_p <= 0.0) & (p.typical_p >= 1.0)
    # Rows whose survivors may lie past the candidates need the exact path.
    inexact = ~trivial & (((k > CANDIDATES) & (k < vocab)) | ((k >= vocab) & fast[4]))
    exact = lambda: _truncate_sorted(-jnp.sort(-z, axis=-1), lse_all, vocab, p)  # noqa: E731
    thr, lse_kept, ent, shift_thr, _ = jax.lax.cond(jnp.any(inexact), exact, lambda: fast)
    shift = jnp.abs(-(z - lse_kept[:, None]) - ent[:, None])
    keep = (z >= thr[:, None]) & (shift <= shift_thr[:, None])
    return keep | trivial[:, None]


def mirostat_mask(z: jax.Array, mu: jax.Array) -> jax.Array:
    """Mirostat v2: drop tokens whose surprise -log2 p exceeds mu (the most likely token always stays)."""
    logp = jax.nn.log_softmax(z, axis=-1)
    surprise = -logp / math.log(2.0)
    return (surprise <= mu[:, None]) | (z >= jnp.max(z, axis=-1, keepdims=True))


def gumbel(key_rows: jax.Array, steps: jax.Array, vocab: int) -> jax.Array:
    """Per-slot Gumbel noise `[B, V]` from each slot's key folded with its step counter."""
    def one(k, t):
        key = jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), t)
        return jax.random.gumbel(key, (vocab,), jnp.float32)

    return jax.vmap(one)(key_rows, steps)


def sample(logits: jax.Array, p: SamplerParams, s: SamplerState, active: jax.Array):
    """One draw per slot. Returns `(SampleOut, new_state)`; rows with `active == False` keep their state."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    z = penalize(logits, p, s)
    greedy = jnp.argmax(z, axis=-1)
    z = z / jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]
    keep = truncation_mask(z, p)
    keep = jax.lax.cond(jnp.any(p.mirostat), lambda: jnp.where(p.mirostat[:, None], mirostat_mask(z, s.mu), keep),
                        lambda: keep)
    zk = jnp.where(keep, z, NEG_INF)
    drawn = jnp.argmax(zk + gumbel(s.key, s.step, vocab), axis=-1)
    token = jnp.where(p.temperature > 0, drawn, greedy).astype(jnp.int32)
    # Mirostat: surprise of the choice under the truncated, renormalised distribution.
    chosen = jnp.take_along_axis(zk, token[:, None], axis=1)[:, 0]
    surprise = -(chosen - jax.nn.logsumexp(zk, axis=-1)) / math.log(2.0)
    mu = jnp.where(p.mirostat & active, s.mu - p.mirostat_eta * (surprise - p.mirostat_tau), s.mu)
    rows = jnp.arange(logits.shape[0])
    counts = s.counts.at[rows, token].add(active.astype(jnp.int32))
    new = SamplerState(counts, s.prompt_mask, mu, s.key, s.step + active.astype(jnp.int32))
    out = SampleOut(token, jnp.take_along_axis(logprobs, token[:, None], axis=1)[:, 0], top_ids.astype(jnp.int32),
                    top_lp)
    return out, new
