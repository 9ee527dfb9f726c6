"""The functional sampler: one pure function of `(logits, per-slot params, per-slot state)`.

Every request setting is a row of an array, so one compiled program serves any mix of settings. Disabled transforms
are neutral values (top_k = 0 meaning the whole vocabulary, top_p = 1, penalties 1/0, ...), never Python branches.

Order of transforms (docs/ARCHITECTURE.md repeats it):
  0. logprobs for the response: log-softmax of the raw logits (before anything below), chosen token and, when some
     slot asks for alternatives, the top 20 (or, by `logprobs`, the raw logits, or the processed distribution's
     logprobs or logits, after step 5);
  1. logit_bias (ignore_eos is a -inf bias on the EOS ids), and while a slot has drawn fewer than its min_tokens,
     -inf on its ending tokens (EOS and stop_token_ids); -inf on the last token of a bad word whose other tokens
     end the output;
  2. repetition_penalty over prompt and output tokens (positive logits / r, negative * r);
  3. frequency and presence penalties over output tokens: `z -= f * count + p * (count > 0)`;
     then DRY, llama.cpp's repeated-sequence penalty over the last `DRY_WINDOW` tokens (prompt and output);
  4. temperature 0 -> greedy argmax of the penalised logits; else z / temperature;
  5. truncation: top-nσ (llama.cpp's), then as transformers chains its warpers: top_k, top_p, min_p, typical_p;
     each sees the distribution left by the previous one (or mirostat v2 instead, when a slot enables it); then XTC
     (llama.cpp's "exclude top choices"), with its own coin per draw; then llama.cpp's dynamic temperature, which
     replaces the temperature over the survivors by their entropy;
  6. a draw by inverse CDF over the survivors, in vocabulary order, with one uniform number per slot: Threefry of
     its step counter under the slot's own key (blocked prefix sums, each one product with a triangular matrix: no
     sort, no noise over the vocabulary; Gumbel noise for 32 x 49k logits cost ~20 ms on a 2-core CPU, this draw
     ~1 ms).

Truncation never sorts the vocabulary: thresholds are found among the top `CANDIDATES` logits, and only when some
slot's survivors may reach past them (top_k > CANDIDATES, a flat distribution under top_p / min_p, typical_p alone)
does a `lax.cond` take the exact path, bisections over the logits' float32 bit patterns (`_truncate_exact`). Each
`lax.cond` goes through `branch`; programs for a GPU, whose runtime decides a conditional on the host, leave the
guarded transforms out for batches that need none (`branches="plain"`) or compute both sides (`"select"`, and
`"lean"` for batches that want no alternatives, no mirostat and no exact cut but top_p's: generation defaults).

The sampler is in every decode, verify and first-draw program, and XLA's CPU backend spends ~8-10 ms compiling each
kernel it emits, so it is written for few of them: sums in order are products with triangular matrices (a scan is a
kernel per level), normalisers shift by a maximum already known, like reductions share one (a stacked sum), constants
are numpy arrays (a broadcast is a kernel), and the uniforms take one Threefry call. 145 fusions at 8 rows, from 185.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

CANDIDATES = 64
DRY_WINDOW = 1024  # tokens DRY looks back over (llama.cpp's default, the whole context, is capped at this)
DRY_BLOCK = 32  # positions of a repeat DRY compares per pass
NO_TOKEN = -2  # a history position before the sequence began (to DRY a breaker is -1): neither equals a token
MAX_BAD = 32  # bad words of several tokens a slot may hold (vLLM's `bad_words`; one token's are a -inf bias)
BAD_TOKENS = 8  # the most tokens in one of them
MAX_ENDS = 16  # ending tokens a slot's min_tokens holds back: the model's EOS ids and a request's stop_token_ids
TOP_LOGPROBS = 20
NEG_INF = -jnp.inf
# What the logprobs report (vLLM's --logprobs-mode): the model's distribution or the one drawn from (`processed`:
# after every transform, a token it cannot draw at `LOGPROB_FLOOR`, vLLM's -9999), as logprobs or as logits.
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
LOGPROB_FLOOR = -9999.0


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
    top_logprobs: jax.Array  # int32: alternatives wanted (0: skip the top-20 search when no slot wants them)
    bias: jax.Array  # [B, V] additive logit bias (-inf for suppressed EOS)
    min_tokens: jax.Array  # int32: draws before an ending token may be drawn
    ends: jax.Array  # [B, MAX_ENDS] int32: the slot's ending tokens (EOS, stop_token_ids), padded past the vocabulary
    bad_words: jax.Array  # [B, MAX_BAD, BAD_TOKENS] int32: token sequences never to complete, each ending at the end
    bad_len: jax.Array  # [B, MAX_BAD] int32: their lengths (0: none)
    dry_multiplier: jax.Array  # 0: DRY off
    dry_base: jax.Array
    dry_allowed_length: jax.Array  # int32
    dry_last_n: jax.Array  # int32: tokens DRY looks back over, at most DRY_WINDOW (-1: DRY_WINDOW)
    breakers: jax.Array  # [B, V] bool: DRY's sequence breakers (tokens whose text holds one), which no repeat crosses
    top_n_sigma: jax.Array  # <= 0: off
    xtc_probability: jax.Array  # 0: XTC off
    xtc_threshold: jax.Array
    dynatemp_range: jax.Array  # 0: off; else the temperature moves within this of `temperature` by the entropy
    dynatemp_exponent: jax.Array
    post_sampling: jax.Array  # bool: the logprobs report the distribution drawn from (llama.cpp's
    # `post_sampling_probs`: the candidates left after every transform, at the temperature; a greedy row's choice, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Per-slot state threaded through every step."""

    counts: jax.Array  # [B, V] int32 output-token counts
    prompt_mask: jax.Array  # [B, V] bool: token occurs in the prompt
    mu: jax.Array  # [B] mirostat mu
    key: jax.Array  # [B, 2] uint32 raw PRNG key of the request
    step: jax.Array  # [B] int32 draws made so far (the counter a draw's uniform hashes under the key)
    history: jax.Array  # [B, DRY_WINDOW] int32 the last tokens, prompt's then drawn, oldest first (DRY's, and bad
    #                     words' prefixes); a position before the sequence is NO_TOKEN


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
    return dict(
        temperature=np.ones(batch, np.float32), top_k=np.zeros(batch, np.int32), top_p=np.ones(batch, np.float32),
        min_p=np.zeros(batch, np.float32), typical_p=np.ones(batch, np.float32),
        repetition_penalty=np.ones(batch, np.float32), frequency_penalty=np.zeros(batch, np.float32),
        presence_penalty=np.zeros(batch, np.float32), mirostat_tau=np.full(batch, 5.0, np.float32),
        mirostat_eta=np.full(batch, 0.1, np.float32), mirostat=np.zeros(batch, bool),
        top_logprobs=np.zeros(batch, np.int32), bias=np.zeros((batch, vocab), np.float32),
        min_tokens=np.zeros(batch, np.int32), ends=np.full((batch, MAX_ENDS), vocab, np.int32),
        bad_words=np.zeros((batch, MAX_BAD, BAD_TOKENS), np.int32), bad_len=np.zeros((batch, MAX_BAD), np.int32),
        dry_multiplier=np.zeros(batch, np.float32), dry_base=np.full(batch, 1.75, np.float32),
        dry_allowed_length=np.full(batch, 2, np.int32), dry_last_n=np.full(batch, DRY_WINDOW, np.int32),
        breakers=np.zeros((batch, vocab), bool), top_n_sigma=np.zeros(batch, np.float32),
        xtc_probability=np.zeros(batch, np.float32), xtc_threshold=np.full(batch, 0.1, np.float32),
        dynatemp_range=np.zeros(batch, np.float32), dynatemp_exponent=np.ones(batch, np.float32),
        post_sampling=np.zeros(batch, bool))


def init_state(batch: int, vocab: int) -> SamplerState:
    """An all-zero state."""
    return SamplerState(jnp.zeros((batch, vocab), jnp.int32), jnp.zeros((batch, vocab), bool),
                        jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, 2), jnp.uint32),
                        jnp.zeros((batch,), jnp.int32), jnp.full((batch, DRY_WINDOW), NO_TOKEN, jnp.int32))


def history_row(tokens) -> np.ndarray:
    """A fresh row of `SamplerState.history`, on the host: the last `DRY_WINDOW` of `tokens` (a prompt), the
    positions before them NO_TOKEN."""
    row = np.full(DRY_WINDOW, NO_TOKEN, np.int32)
    last = np.asarray(tokens[-DRY_WINDOW:], np.int32)
    row[DRY_WINDOW - len(last):] = last
    return row


THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32, 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the block
    function under JAX's threefry keys), of the uint32 counter words `x0`, `x1` under `key` `[2]`, in numpy."""
    ks = (key[0], key[1], key[0] ^ key[1] ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def seed_keys(seed: int, n: int) -> list[np.ndarray]:
    """The raw keys of a request's `n` choices: its seed's (`PRNGKey(seed mod 2^32)`, which for threefry2x32, the
    sampler's keys, is `[0, seed mod 2^32]`), then that key folded with each further choice's index (`fold_in(key,
    i)` is the block of counter `(0, i)` under the key), all on the host: JAX's own ops would run on the engine's
    device, and on a CPU host that is this CPU, where they wait behind the step in flight (~70 ms a request)."""
    root = np.asarray([0, seed % (1 << 32)], np.uint32)
    index = np.arange(1, n, dtype=np.uint32)
    y0, y1 = threefry2x32(root, np.zeros_like(index), index)
    return [root] + list(np.stack([y0, y1], axis=1))


def penalize(logits: jax.Array, p: SamplerParams, s: SamplerState) -> jax.Array:
    """Steps 1-3: logit bias (with min_tokens' hold on the ending tokens, and the last token of each bad word whose
    other tokens end the output), repetition penalty (prompt + output), frequency/presence penalties (output)."""
    early = jnp.where(s.step < p.min_tokens, NEG_INF, 0.0)[:, None]  # [B, 1]
    b, vocab = logits.shape
    rows = np.arange(b)[:, None]
    z = (logits + p.bias).at[rows, p.ends].add(jnp.broadcast_to(early, p.ends.shape), mode="drop")  # padding: dropped
    # vLLM's bad words: a word's tokens but its last are the output's last (`history`, since `step` draws ago)
    n = BAD_TOKENS - 1
    before = np.arange(n) >= BAD_TOKENS - p.bad_len[:, :, None]  # [B, MAX_BAD, n]: a position of the word's prefix
    said = jnp.all(~before | (p.bad_words[:, :, :n] == s.history[:, None, -n:]), axis=-1)
    ban = said & (p.bad_len > 0) & (p.bad_len - 1 <= s.step[:, None])
    z = z.at[rows, jnp.where(ban, p.bad_words[:, :, n], vocab)].set(NEG_INF, mode="drop")
    seen = s.prompt_mask | (s.counts > 0)
    r = p.repetition_penalty[:, None]
    z = jnp.where(seen, jnp.where(z > 0, z / r, z * r), z)
    counts = s.counts.astype(jnp.float32)
    return z - p.frequency_penalty[:, None] * counts - p.presence_penalty[:, None] * (counts > 0)


def dry_penalties(p: SamplerParams, s: SamplerState, vocab: int, select: bool = False) -> tuple[jax.Array, jax.Array]:
    """DRY ("don't repeat yourself", llama.cpp's, from koboldcpp) as `(tokens, amounts)`, `[B, DRY_WINDOW - 1]` each:
    the amounts to take off those tokens' logits, each token once (the other entries past the vocabulary). When the
    last n tokens (n >= dry_allowed_length) also occur earlier in the row's window, the token that followed that
    earlier copy loses `dry_multiplier * dry_base ** (n - dry_allowed_length)` (the largest n over its copies; the
    exponent capped where the power would pass float32's range). n counts back from the last token and stops at a
    breaker or the window's start, as llama.cpp's restart sequences cap it; a breaker is never penalised.

    The runs are compared `DRY_BLOCK` positions a pass: for every earlier end k at once, the next block of the last
    tokens against the block before k, while some pair still matches and is shorter than a run whose penalty is
    already the largest (with `select`, every block: a loop of known count, no conditional)."""
    b, w = s.history.shape
    n = jnp.where(p.dry_last_n < 0, w, jnp.minimum(p.dry_last_n, w))  # llama.cpp's -1, the whole context: the window
    back = s.history[:, ::-1]  # [:, t]: the token t back from the last; a breaker -1, outside the window NO_TOKEN
    back = jnp.where(jnp.take_along_axis(p.breakers, jnp.maximum(back, 0), axis=1) & (back >= 0), -1, back)
    back = jnp.where(np.arange(w) < n[:, None], back, NO_TOKEN)
    padded = jnp.concatenate([back, jnp.full((b, w + DRY_BLOCK), NO_TOKEN, jnp.int32)], axis=1)
    k = np.arange(1, w)  # an earlier copy ends k back (column k - 1 below), at a token of the window
    alive = (p.dry_multiplier > 0)[:, None] & (k < n[:, None]) & (back[:, 1:] != NO_TOKEN)
    windows = np.arange(w - 1)[:, None] + np.arange(DRY_BLOCK)[None, :]  # one gather (32 slices: 0.4 s to compile)
    base = p.dry_base[:, None]
    cap = jnp.where(base > 1.000001, jnp.floor(88.7228391 / jnp.log(base)), jnp.inf)  # llama.cpp's: float32's range
    # runs this long all lose the same (the capped power; base 1's constant), so comparing can stop there
    enough = jnp.where(base <= 1.0, 0.0, cap) + p.dry_allowed_length[:, None]

    def block(i, carry):
        alive, length = carry
        last = jax.lax.dynamic_slice_in_dim(padded, i * DRY_BLOCK, DRY_BLOCK, axis=1)  # [B, J]: i*J + jj back
        seg = jax.lax.dynamic_slice_in_dim(padded, i * DRY_BLOCK + 1, w + DRY_BLOCK - 2, axis=1)
        earlier = jnp.take(seg, windows, axis=1)  # [B, k - 1, jj]: the token k + i*J + jj back
        same = ((last >= 0)[:, None, :] & (earlier == last[:, None, :])).astype(jnp.int32)
        whole = jnp.min(same, axis=2) == 1
        run = jnp.where(whole, DRY_BLOCK, jnp.argmin(same, axis=2))  # matches before the first difference
        length = length + jnp.where(alive, run, 0)
        return alive & whole & (length < enough), length

    blocks = w // DRY_BLOCK
    carry = alive, jnp.zeros((b, w - 1), jnp.int32)
    if select:
        _, length = jax.lax.fori_loop(0, blocks, block, carry)
    else:
        _, _, length = jax.lax.while_loop(lambda c: (c[0] < blocks) & jnp.any(c[1]),
                                          lambda c: (c[0] + 1, *block(c[0], c[1:])), (0, *carry))
    follows = back[:, :w - 1]  # the token after the copy ending k back
    hit = alive & (length >= p.dry_allowed_length[:, None]) & (follows >= 0)
    rows, tokens = np.arange(b)[:, None], jnp.where(hit, follows, vocab)
    most = jnp.full((b, vocab), -1, jnp.int32).at[rows, tokens].max(length, mode="drop")
    first = jnp.full((b, vocab), w, jnp.int32).at[rows, tokens].min(jnp.broadcast_to(k, tokens.shape), mode="drop")
    at = jnp.minimum(tokens, vocab - 1)
    once = hit & (jnp.take_along_axis(first, at, axis=1) == k)  # each token at its first column
    power = jnp.minimum((jnp.take_along_axis(most, at, axis=1) - p.dry_allowed_length[:, None]).astype(jnp.float32),
                        cap)
    return jnp.where(once, tokens, vocab), jnp.where(once, p.dry_multiplier[:, None] * base ** power, 0.0)


def sigma_floor(z: jax.Array, p: SamplerParams) -> jax.Array:
    """Top-nσ (Tang et al. 2024, "Top-nσ: not all logits are you need"; llama.cpp's `top_n_sigma`): the logit `[B]`
    below which a row's tokens go, n standard deviations under its largest, the statistics over the tokens not
    already excluded (-inf where n <= 0). Scaling by a temperature scales both sides: the set does not depend on it."""
    live = z > NEG_INF
    count = jnp.maximum(jnp.sum(live, axis=-1), 1)
    mean = jnp.sum(jnp.where(live, z, 0.0), axis=-1) / count
    std = jnp.sqrt(jnp.sum(jnp.where(live, (z - mean[:, None]) ** 2, 0.0), axis=-1) / count)
    return jnp.where(p.top_n_sigma > 0, jnp.max(z, axis=-1) - p.top_n_sigma * std, NEG_INF)


def xtc_ceiling(z: jax.Array, p: SamplerParams, coin: jax.Array) -> jax.Array:
    """XTC, "exclude top choices" (llama.cpp's, from text-generation-webui): the logit `[B]` above which a row's
    tokens go (inf: none). With probability `xtc_probability` (the draw's `coin` below it) a draw drops every token
    whose probability among the survivors `z` (-inf excluded; logits before the temperature, as llama.cpp divides
    by it last) reaches `xtc_threshold` but the least likely of them (all of them where several tie); nothing when
    fewer than two reach it."""
    _, lse = log_normaliser(z)
    above = (z >= (lse + jnp.log(p.xtc_threshold))[:, None]) & (z > NEG_INF)  # a threshold of 0: every survivor
    lowest = jnp.min(jnp.where(above, z, jnp.inf), axis=-1)
    return jnp.where((coin < p.xtc_probability) & (jnp.sum(above, axis=-1) >= 2), lowest, jnp.inf)


def dynamic_temperature(z: jax.Array, scale: jax.Array, p: SamplerParams) -> tuple[jax.Array, jax.Array]:
    """Dynamic temperature (llama.cpp's `dynatemp_range` and `dynatemp_exponent`, from koboldcpp): each row's
    temperature `[B]` for the survivors `z * scale` (the logits before any temperature; -inf excluded), between
    `temperature - range` (at least 0) and `temperature + range` by their entropy's share of its largest value (the
    log of their count) to the exponent; the row's own temperature where the range is 0 or fewer than two tokens
    survive. Also returns the largest of `z`. Two reductions: a maximum, and the count, mass and first moment
    stacked."""
    top = jnp.max(z, axis=-1)
    live = z > NEG_INF
    rel = jnp.where(live, (z - jnp.where(jnp.isfinite(top), top, 0.0)[:, None]) * scale[:, None], 0.0)  # <= 0
    e = jnp.where(live, jnp.exp(rel), 0.0)
    count, mass, moment = jnp.sum(jnp.stack([live.astype(jnp.float32), e, e * rel]), axis=-1)
    entropy = jnp.log(mass) - moment / mass  # of the survivors' probabilities e / mass
    share = jnp.clip(entropy / jnp.log(jnp.maximum(count, 2.0)), 0.0, 1.0)
    low = jnp.maximum(p.temperature - p.dynatemp_range, 0.0)
    high = p.temperature + p.dynatemp_range
    t = low + (high - low) * share ** p.dynatemp_exponent
    return jnp.where((p.dynatemp_range > 0) & (count >= 2), t, p.temperature), top


def _retemper(z: jax.Array, scale: jax.Array, p: SamplerParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What the dynamic temperature does to survivors `z` scaled by `scale` `[B]`: `(shift, ratio, floor)` per row,
    `(z - shift) * ratio` the new logits (the largest 0, so a small temperature cannot overflow them) and those under
    `floor` dropped (a temperature of 0 keeps the largest, as llama.cpp's); rows without it keep `z` bit for bit."""
    t, top = dynamic_temperature(z, scale, p)
    on = p.dynatemp_range > 0
    # bounded: a temperature past float32's range (or a denormal one) must not make 0 * inf of the largest logit
    ratio = jnp.clip(jnp.where(on & (t > 0), scale / jnp.where(t > 0, t, 1.0), 1.0), 1e-30, 1e30)
    return (jnp.where(on & jnp.isfinite(top), top, 0.0), ratio,
            jnp.where(on & (t <= 0) & (p.temperature > 0), top, NEG_INF))


def prefix_sums(x: jax.Array, exclusive: bool = False, total: bool = False) -> jax.Array:
    """Prefix sums along the last axis (and with `total` the whole sum after them) as one product with a triangular
    0/1 matrix, at full float32 precision on every backend. XLA's CPU backend emits a scan (`jnp.cumsum`) as a
    kernel per level: ~3x the compile time. Up to 256 wide the matrix is a constant of the program (no kernels to
    build it); wider, it is built in the program, which keeps executables small."""
    n = x.shape[-1]
    if n <= 256:
        tri = jnp.asarray(np.triu(np.ones((n, n), np.float32), 1 if exclusive else 0))
    else:
        i = jax.lax.iota(jnp.int32, n)
        tri = ((i[:, None] < i[None, :]) if exclusive else (i[:, None] <= i[None, :])).astype(jnp.float32)
    if total:
        tri = jnp.concatenate([tri, jnp.ones((n, 1), jnp.float32)], axis=1)
    return jnp.matmul(x, tri.astype(x.dtype), precision=jax.lax.Precision.HIGHEST)


def _truncate_sorted(sz: jax.Array, lse_all: jax.Array, vocab: int, p: SamplerParams):
    """Top-k, top-p, min-p and typical-p on descending-sorted logits `sz [B, N]` (the N largest of the vocabulary's,
    whose log-normaliser is `lse_all`).

    Returns `(z_threshold, lse_kept, entropy, shift_threshold, last_survives)`: a token survives iff
    `z >= z_threshold` and `|-(z - lse_kept) - entropy| <= shift_threshold`. Written for few XLA kernels (each costs
    ~10 ms of compiling on a CPU): weights are shifted by the first candidate (the largest, always kept), sums in
    order are one product (`prefix_sums`), the kept mass and mean come from one reduction, and typical_p's ascending
    order of shifts is a pairwise comparison, not a sort.
    """
    n = sz.shape[-1]
    idx = jnp.arange(n)
    top = sz[:, :1]
    rel = sz - top  # <= 0
    e = jnp.exp(rel)
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)
    kth = jnp.take_along_axis(sz, jnp.clip(k - 1, 0, n - 1)[:, None], axis=1)
    # excluded tokens (-inf: a grammar's mask, a -inf bias) never survive, though top_k may reach past the rest
    keep = ((sz >= kth) | (k[:, None] > n)) & (sz > NEG_INF)
    # top_p over the distribution left by top_k: each candidate's mass before it, and (the last column) the mass top_k
    # left, whose log is the normaliser unless top_k does not cut (then it is over all tokens).
    sums = prefix_sums(jnp.where(keep, e, 0.0), exclusive=True, total=True)
    lse = jnp.where(k >= vocab, lse_all - top[:, 0], jnp.log(sums[:, n]))
    keep &= (sums[:, :n] * jnp.exp(-lse)[:, None] < p.top_p[:, None]) | (idx == 0) | (p.top_p[:, None] >= 1.0)
    # min_p relative to the most likely token (invariant under renormalisation).
    keep &= rel >= jnp.log(jnp.maximum(p.min_p, 1e-38))[:, None]
    last_survives = keep[:, -1]
    thr = jnp.min(jnp.where(keep, sz, jnp.inf), axis=-1)
    # typical_p over what is left (an exact computation when the survivors lie within `sz`): the entropy is the log of
    # the kept mass less the kept mean of `rel`.
    mass, moment = jnp.sum(jnp.where(keep, jnp.stack([e, e * rel]), 0.0), axis=-1)
    log_mass = jnp.log(mass)
    lse_kept = top[:, 0] + log_mass
    ent = log_mass - moment / mass
    q = jnp.where(keep, e / mass[:, None], 0.0)
    # the shift as the caller computes it over the whole vocabulary, bit for bit (the threshold is one of them)
    shift = jnp.where(keep, jnp.abs(-(sz - lse_kept[:, None]) - ent[:, None]), jnp.inf)
    # The mass of the most typical tokens up to each one (ties in index order, as a stable sort puts them); the
    # threshold is the shift of the first to reach typical_p (none reaching keeps every survivor).
    first = (shift[:, None, :] < shift[:, :, None]) | ((shift[:, None, :] == shift[:, :, None]) & (idx < idx[:, None]))
    upto = jnp.sum(jnp.where(first, q[:, None, :], 0.0), axis=-1) + q
    shift_thr = jnp.min(jnp.where((upto >= p.typical_p[:, None]) & keep, shift, jnp.inf), axis=-1)
    shift_thr = jnp.where(p.typical_p >= 1.0, jnp.inf, shift_thr)
    return thr, lse_kept, ent, shift_thr, last_survives


def typical_threshold(z: jax.Array, lse: jax.Array, mass: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Typical sampling over the whole vocabulary without a sort: `(entropy, shift_threshold)` such that the
    tokens with `|-(z - lse) - entropy| <= shift_threshold` are the most typical ones whose probability reaches
    `mass`, as transformers' `TypicalLogitsWarper` chooses them. The threshold is the smallest float whose kept mass
    reaches `mass`, found by bisection over float32 bit patterns (non-negative floats order as their bits): 31
    passes over the vocabulary. `lse` is the log-normaliser of `z` (-inf entries are excluded tokens)."""
    logp = z - lse[:, None]
    q = jnp.exp(logp)
    ent = -jnp.sum(jnp.where(q > 0, q * logp, 0.0), axis=-1)
    shift = jnp.abs(-logp - ent[:, None])

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        t = jax.lax.bitcast_convert_type(mid, jnp.float32)
        ok = jnp.sum(jnp.where(shift <= t[:, None], q, 0.0), axis=-1) >= mass
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    b = z.shape[0]
    bounds = (np.zeros((b,), np.int32), np.full((b,), 0x7F800000, np.int32))  # constants: no kernels
    _, hi = jax.lax.fori_loop(0, 31, halve, bounds)
    return ent, jax.lax.bitcast_convert_type(hi, jnp.float32)


def ordered_bits(z: jax.Array) -> jax.Array:
    """float32 values as uint32 keys in the same order (-inf lowest)."""
    bits = jax.lax.bitcast_convert_type(z, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def largest_key(keys: jax.Array, weight: jax.Array, need: jax.Array) -> jax.Array:
    """Per row, the largest key `t` with `sum(weight where keys >= t) >= need`: a bisection over the 2^32 keys, one
    masked sum over the vocabulary per halving (32 of them)."""
    def halve(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]
        d = hi - lo
        mid = lo + d // 2 + (d & 1)
        ok = jnp.sum(jnp.where(keys >= mid[:, None], weight, 0.0), axis=-1) >= need
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    b = keys.shape[0]
    lo, _ = jax.lax.fori_loop(0, 32, halve, (np.zeros((b,), np.uint32), np.full((b,), 0xFFFFFFFF, np.uint32)))
    return lo


def branch(pred: jax.Array, then, otherwise, select: bool = False):
    """`lax.cond(pred, then, otherwise)`; with `select` both are computed and `then`'s results taken where `pred`
    holds, and the program has no conditional (XLA's GPU runtime decides one on the host, after waiting for the
    device: docs/ARCHITECTURE.md, "One step ahead")."""
    if not select:
        return jax.lax.cond(pred, then, otherwise)
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), then(), otherwise())


def _truncate_exact(z: jax.Array, top: jax.Array, lse_all: jax.Array, p: SamplerParams, k: jax.Array,
                    rows: jax.Array, select: bool = False, lean: bool = False):
    """`_truncate_sorted`'s four thresholds over the whole vocabulary, without a sort: the k-th largest logit and
    top_p's cut are bisections over the logits' bit patterns (`largest_key`), typical_p's over the shifts
    (`typical_threshold`). Each bisection runs only when one of `rows` (those that need this path) asks for it (with
    `select`, each runs; `lean` leaves out top_k's and typical_p's, which no row of a `lean` call wants). `top` is each
    row's largest logit, which every cut keeps: normalisers shift by it."""
    vocab = z.shape[-1]
    b = z.shape[0]
    keys = ordered_bits(z)
    e = jnp.exp(z - top[:, None])
    lse_of = lambda kept: top + jnp.log(jnp.sum(jnp.where(kept, e, 0.0), axis=-1))  # noqa: E731  (top always kept)
    zero = np.zeros((b,), np.uint32)
    cut_k = rows & (k < vocab)
    kth = zero if lean else branch(jnp.any(cut_k), lambda: largest_key(keys, 1.0, k.astype(jnp.float32)),
                                   lambda: zero, select)
    keep = keys >= jnp.where(cut_k, kth, 0)[:, None]
    lse = jnp.where(k >= vocab, lse_all, lse_of(keep))  # of what top_k left: top_p's distribution
    cut_p = rows & (p.top_p < 1.0)
    pth = branch(jnp.any(cut_p), lambda: largest_key(keys, jnp.where(keep, jnp.exp(z - lse[:, None]), 0.0),
                                                     p.top_p), lambda: zero, select)
    keep &= keys >= jnp.where(cut_p, pth, 0)[:, None]
    keep &= z >= top[:, None] + jnp.log(jnp.maximum(p.min_p, 1e-38))[:, None]
    thr = jnp.min(jnp.where(keep, z, jnp.inf), axis=-1)
    lse_kept = lse_of(keep)
    cut_t = rows & (p.typical_p < 1.0)
    none = (np.zeros((b,), np.float32), np.full((b,), np.inf, np.float32))
    ent, shift_thr = none if lean else branch(
        jnp.any(cut_t), lambda: typical_threshold(jnp.where(keep, z, NEG_INF), lse_kept, p.typical_p),
        lambda: none, select)
    return thr, lse_kept, ent, jnp.where(cut_t, shift_thr, jnp.inf)


def truncation_mask(z: jax.Array, p: SamplerParams, select: bool = False, lean: bool = False) -> jax.Array:
    """Which tokens survive top_k/top_p/min_p/typical_p, for temperature-scaled logits `z [B, V]` (`select`: as
    `branch`'s; `lean`: each row `is_lean`, so the exact path holds top_p's bisection alone)."""
    vocab = z.shape[-1]
    k = jnp.where(p.top_k > 0, p.top_k, vocab)
    trivial = (k >= vocab) & (p.top_p >= 1.0) & (p.min_p <= 0.0) & (p.typical_p >= 1.0)  # rows that keep all
    return branch(jnp.all(trivial), lambda: jnp.ones(z.shape, bool),
                  lambda: _truncation_mask(z, p, k, trivial, select, lean), select)


def _truncation_mask(z: jax.Array, p: SamplerParams, k: jax.Array, trivial: jax.Array, select: bool,
                     lean: bool) -> jax.Array:
    vocab = z.shape[-1]
    n = min(CANDIDATES, vocab)
    # Thresholds among the n largest logits (use the indices: XLA rewrites a values-only top_k into a full sort).
    _, idx = jax.lax.top_k(z, n)
    sz = jnp.take_along_axis(z, idx, axis=1)
    top = jnp.where(jnp.isfinite(sz[:, 0]), sz[:, 0], 0.0)  # the largest logit: the normalisers' shift
    lse_all = top + jnp.log(jnp.sum(jnp.exp(z - top[:, None]), axis=-1))
    *fast, last_survives = _truncate_sorted(sz, lse_all, vocab, p)
    # Rows whose survivors may lie past the candidates (a top_k beyond them, or none and the last candidate still
    # in: a flat distribution, or typical_p alone) take the exact path, without a sort.
    rows = ~trivial & (((k > n) & (k < vocab)) | ((k >= vocab) & last_survives))
    fast = jnp.stack(fast)
    thr, lse_kept, ent, shift_thr = branch(
        jnp.any(rows),
        lambda: jnp.where(rows, jnp.stack(_truncate_exact(z, top, lse_all, p, k, rows, select, lean)), fast),
        lambda: fast, select)
    shift = jnp.abs(-(z - lse_kept[:, None]) - ent[:, None])
    keep = (z >= thr[:, None]) & (shift <= shift_thr[:, None])
    return keep | trivial[:, None]


def log_normaliser(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(max, logsumexp)` of each row, in two reductions (`jax.nn.logsumexp` is four kernels on a CPU)."""
    m = jnp.max(x, axis=-1)
    shift = jnp.where(jnp.isfinite(m), m, 0.0)
    return m, shift + jnp.log(jnp.sum(jnp.exp(x - shift[:, None]), axis=-1))


def mirostat_mask(z: jax.Array, mu: jax.Array) -> jax.Array:
    """Mirostat v2: drop tokens whose surprise -log2 p exceeds mu (the most likely token always stays)."""
    m, lse = log_normaliser(z)
    surprise = -(z - lse[:, None]) / math.log(2.0)
    return (surprise <= mu[:, None]) | (z >= m[:, None])


def uniforms(key_rows: jax.Array, steps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uniform numbers in [0, 1) per slot, the draw's and XTC's coin: Threefry-2x32 under the slot's key of the
    counter `(step, 0)`, each word's top 23 bits the mantissa of a float in [1, 2), less 1 (`jax.random.uniform`'s
    construction). One Threefry call, where `fold_in` and then `uniform` took two (a loop each in XLA)."""
    steps = steps.astype(jnp.uint32)
    words = threefry2x32_p.bind(key_rows[:, 0], key_rows[:, 1], steps, jnp.zeros_like(steps))
    one = jnp.uint32(0x3F800000)
    u, coin = (jax.lax.bitcast_convert_type((bits >> 9) | one, jnp.float32) - 1.0 for bits in words)
    return u, coin


def draw(zk: jax.Array, u: jax.Array, block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Inverse-CDF draw per row from logits `zk [B, V]` (-inf excluded) with uniforms `u [B]`.

    Returns `(token, log-probability of the token under the renormalised distribution)`. The cumulative sum is blocked:
    block masses and their prefix sums, then the prefix sums inside the chosen block. The choice is the first block,
    then token, of nonzero mass whose sum passes the target, so a draw never lands on an excluded token. Blocks are
    the power of two at or past sqrt(V) (at least 128), so both prefix sums stay near linear in V (256 for 49k).
    """
    b, v = zk.shape
    block = block or max(128, 1 << math.ceil(math.log2(math.sqrt(v))))
    pad = -v % block
    z = jnp.pad(zk, ((0, 0), (0, pad)), constant_values=NEG_INF)
    m = jnp.max(z, axis=-1, keepdims=True)
    pr = jnp.exp(z - m).reshape(b, -1, block)
    mass = pr.sum(-1)
    before = prefix_sums(mass, exclusive=True)
    total = before[:, -1] + mass[:, -1]
    target = u * total

    def first(cum, weight):
        """The first index of nonzero weight whose sum passes the target, else the last of nonzero weight: one
        reduction, a max of `2n - i` over the first kind and of `i + 1` over the second."""
        n = weight.shape[-1]
        ids = jnp.arange(n)
        score = jnp.where(weight > 0, jnp.where(cum > target[:, None], 2 * n - ids, ids + 1), 0)
        best = jnp.max(score, axis=-1)
        return jnp.where(best > n, 2 * n - best, jnp.maximum(best - 1, 0))

    bi = first(before + mass, mass)
    inner = jnp.take_along_axis(pr, bi[:, None, None], axis=1)[:, 0]
    start = jnp.take_along_axis(before, bi[:, None], axis=1)
    j = first(start + prefix_sums(inner), inner)
    token = (bi * block + j).astype(jnp.int32)
    chosen = jnp.take_along_axis(z, token[:, None], axis=1)[:, 0]
    return token, chosen - m[:, 0] - jnp.log(total)


def unpack_mask(words: jax.Array, vocab: int) -> jax.Array:
    """Packed allowed-token bitmasks `[B, W]` int32 (bit `t % 32` of word `t // 32`) as `[B, vocab]` bools."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def is_plain(row: dict) -> bool:
    """Whether a slot's settings (`neutral_params`' names, as `SamplingParams.sampler_row` gives them) need none of what
    `sample` guards with a `lax.cond`: alternatives, mirostat, DRY, and truncation (top-nσ, XTC and the dynamic
    temperature too) where the slot draws (a greedy slot's token and logprobs do not depend on it). A grammar mask is
    the call's (`allowed`), not the row's."""
    truncates = row["top_k"] > 0 or row["top_p"] < 1.0 or row["min_p"] > 0.0 or row["typical_p"] < 1.0
    return _served_without(row, truncates)


def is_lean(row: dict) -> bool:
    """Whether `sample`'s `lean` variant serves a slot (as `is_plain`'s `row`): no alternatives, no mirostat, no DRY,
    and where it draws no top-nσ nor XTC, no top_k past the candidates nor typical_p without a top_k within them, the
    cuts only an exact bisection of their own finds. Generation defaults are such rows: top_p (Llama 3.1, DeepSeek-V3),
    top_k <= 64 with top_p (Qwen3, Gemma)."""
    k, within = row["top_k"], 0 < row["top_k"] <= CANDIDATES
    exact = k > CANDIDATES or (row["typical_p"] < 1.0 and not within)
    return _served_without(row, exact)


def _served_without(row: dict, draw_needs: bool) -> bool:
    """Whether a program without alternatives, mirostat, DRY, top-nσ, XTC, the dynamic temperature and a transform
    the slot's draw needs (`draw_needs`) serves the slot: the truncations matter only where it draws (a greedy slot's
    token and logprobs do not depend on them); DRY, a penalty, changes a greedy choice too."""
    draw_needs = draw_needs or row["top_n_sigma"] > 0 or row["xtc_probability"] > 0 or row["dynatemp_range"] > 0
    return (row["top_logprobs"] == 0 and not row["post_sampling"] and not row["mirostat"]
            and row["dry_multiplier"] == 0 and (row["temperature"] <= 0 or not draw_needs))


BRANCHES = ("cond", "plain", "select")  # RunnerConfig.sampler_branches; `lean` and `dry` are select's programs too


def sample(logits: jax.Array, p: SamplerParams, s: SamplerState, active: jax.Array, allowed: jax.Array | None = None,
           branches: str = "cond", logprobs: str = "raw_logprobs"):
    """One draw per slot. Returns `(SampleOut, new_state)`; rows with `active == False` keep their state. `allowed`
    (`[B, W]` packed bitmasks, all ones for an unconstrained row) removes the tokens a row's grammar forbids before any
    other transform; the reported logprobs stay the model's own. `branches` (static) says how the program skips the
    transforms no row wants (alternatives, DRY, the grammar mask, truncation, mirostat, XTC, the dynamic
    temperature): `cond`, a `lax.cond` each; `plain`, every row is `is_plain` and none is constrained, so they are
    left out; `select`, they are computed for every row and taken where wanted, DRY aside; `dry`, as `select` with
    DRY, for calls where some row uses it; `lean`, as `select` for rows that are all `is_lean`, so alternatives,
    mirostat, top-nσ, XTC, the dynamic temperature and the exact path's top_k and typical_p bisections are left out
    too. The last four hold no conditional, which XLA's GPU runtime decides on the host after waiting for the device
    (docs/ARCHITECTURE.md, "One step ahead"). `logprobs` (static, `LOGPROBS_MODES`) says what the reported
    logprobs are, except in rows with `post_sampling` (llama.cpp's per-request choice), whose are always the
    logprobs of the distribution drawn from."""
    plain, lean = branches == "plain", branches == "lean"
    select = branches in ("select", "lean", "dry")
    logits = logits.astype(jnp.float32)
    b = logits.shape[0]
    nothing = (np.zeros((b, TOP_LOGPROBS), np.int32), np.zeros((b, TOP_LOGPROBS), np.float32))  # constants: no kernels

    def reported(src: jax.Array):
        """The log-normaliser of what the logprobs report (`src`: the raw logits or the processed ones; 0 for
        logits, but in `post_sampling` rows) and its top alternatives, where some row wants them."""
        norm = log_normaliser(src)[1]
        if not logprobs.endswith("logprobs"):
            norm = jnp.where(p.post_sampling, norm, 0.0)

        def alternatives():
            top_z, top_ids = jax.lax.top_k(src, TOP_LOGPROBS)
            return top_ids.astype(jnp.int32), jnp.maximum(top_z - norm[:, None], LOGPROB_FLOOR)

        wanted = nothing if plain or lean else branch(jnp.any(p.top_logprobs > 0), alternatives, lambda: nothing,
                                                      select)
        return norm, wanted

    vocab = logits.shape[1]
    z = penalize(logits, p, s)
    if branches in ("cond", "dry"):  # DRY's 32 passes would cost every `select` batch: it has its own program
        w = s.history.shape[1] - 1
        none = (np.full((b, w), vocab, np.int32), np.zeros((b, w), np.float32))  # constants: no kernels
        tokens, amounts = branch(jnp.any(p.dry_multiplier > 0), lambda: dry_penalties(p, s, vocab, select),
                                 lambda: none, select)
        z = z.at[np.arange(b)[:, None], tokens].add(-amounts, mode="drop")
    if allowed is not None and not plain:
        z = branch(jnp.any(allowed != -1), lambda: jnp.where(unpack_mask(allowed, vocab), z, NEG_INF), lambda: z,
                   select)
    greedy, penalized = jnp.argmax(z, axis=-1), z
    scale = jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]
    z = z / scale
    u, coin = uniforms(s.key, s.step)
    if not plain:
        if not lean:
            floor = branch(jnp.any(p.top_n_sigma > 0), lambda: sigma_floor(z, p),
                           lambda: np.full(b, -np.inf, np.float32), select)
            z = jnp.where(z >= floor[:, None], z, NEG_INF)
        keep = truncation_mask(z, p, select, lean)
        if not lean:
            keep = branch(jnp.any(p.mirostat), lambda: jnp.where(p.mirostat[:, None], mirostat_mask(z, s.mu), keep),
                          lambda: keep, select)
        z = jnp.where(keep, z, NEG_INF)
        if not lean:
            before = z * scale  # XTC's probabilities are the logits' before the temperature, as llama.cpp's
            ceiling = branch(jnp.any(p.xtc_probability > 0), lambda: xtc_ceiling(before, p, coin),
                             lambda: np.full(b, np.inf, np.float32), select)
            z = jnp.where(before > ceiling[:, None], NEG_INF, z)
            # dynamic temperature last, over the survivors, as llama.cpp's chain ends with it
            shift, ratio, floor = branch(
                jnp.any(p.dynatemp_range > 0), lambda: _retemper(z, scale[:, 0], p),
                lambda: (np.zeros(b, np.float32), np.ones(b, np.float32), np.full(b, -np.inf, np.float32)), select)
            z = jnp.where((z >= floor[:, None]) & (z > NEG_INF), (z - shift[:, None]) * ratio[:, None], NEG_INF)
    drawn, logq = draw(z, u)
    token = jnp.where(p.temperature > 0, drawn, greedy).astype(jnp.int32)
    # Mirostat: surprise of the choice under the truncated, renormalised distribution.
    surprise = -logq / math.log(2.0)
    mu = jnp.where(p.mirostat & active, s.mu - p.mirostat_eta * (surprise - p.mirostat_tau), s.mu)
    rows = jnp.arange(b)
    counts = s.counts.at[rows, token].add(active.astype(jnp.int32))
    history = jnp.where(active[:, None], jnp.concatenate([s.history[:, 1:], token[:, None]], axis=1), s.history)
    new = SamplerState(counts, s.prompt_mask, mu, s.key, s.step + active.astype(jnp.int32), history)
    source = logits
    if logprobs.startswith("processed"):  # the distribution drawn from; a greedy row's as vLLM's: the penalized
        # logits, at temperature 1 and untruncated (what it has of top_k, top_p, ... does not touch its argmax)
        source = jnp.where(p.temperature[:, None] > 0, z, penalized)
    if not (plain or lean):  # llama.cpp's post-sampling distribution: the candidates drawn from; a greedy row's
        # choice alone (its chain's temperature 0 leaves one candidate); no row of those programs asks for it
        one = jnp.where(jnp.arange(vocab) == token[:, None], 0.0, NEG_INF)
        source = jnp.where(p.post_sampling[:, None], jnp.where(p.temperature[:, None] > 0, z, one), source)
    norm, (top_ids, top_lp) = reported(source)
    chosen_lp = jnp.maximum(jnp.take_along_axis(source, token[:, None], axis=1)[:, 0] - norm, LOGPROB_FLOOR)
    return SampleOut(token, chosen_lp, top_ids, top_lp), new
