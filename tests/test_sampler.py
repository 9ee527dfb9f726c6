"""The functional sampler against transformers' logits processors and written-out references."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

from engine import sampler as smp
from helpers import dry_reference

pytestmark = pytest.mark.quick_compile  # small inputs: XLA optimizations off (conftest)

V = 1000


def params(b, **rows):
    """Sampler params for `b` rows, neutral except the given per-row lists."""
    hp = smp.neutral_params(b, V)
    for k, v in rows.items():
        hp[k] = np.asarray(v, hp[k].dtype)
    return smp.SamplerParams(**{k: jnp.asarray(v) for k, v in hp.items()})


def hf_probs(proc, logits):
    out = proc(torch.zeros((1, 1), dtype=torch.long), torch.tensor(logits[None], dtype=torch.float32))[0].numpy()
    keep = np.isfinite(out)
    p = np.where(keep, np.exp(out - out[keep].max()), 0.0)
    return keep, p / p.sum()


def our_probs(z, keep):
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return p / p.sum()


CASES = [
    ("top_k", 5, lambda: TopKLogitsWarper(5)),
    ("top_k", 200, lambda: TopKLogitsWarper(200)),  # beyond the candidate set: exact path
    ("top_p", 0.5, lambda: TopPLogitsWarper(0.5)),
    ("top_p", 0.95, lambda: TopPLogitsWarper(0.95)),  # flat logits: survivors past the candidates
    ("min_p", 0.1, lambda: MinPLogitsWarper(0.1)),
    ("min_p", 0.001, lambda: MinPLogitsWarper(0.001)),
    ("typical_p", 0.7, lambda: TypicalLogitsWarper(0.7)),
    ("typical_p", 0.2, lambda: TypicalLogitsWarper(0.2)),
]


@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_warpers_match_transformers_in_one_mixed_batch(scale):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(CASES), V)) * scale).astype(np.float32)
    rows = {}
    for i, (name, val, _) in enumerate(CASES):
        rows.setdefault(name, list(smp.neutral_params(len(CASES), V)[name]))[i] = val
    keep = np.asarray(smp.truncation_mask(jnp.asarray(logits), params(len(CASES), **rows)))
    for i, (name, val, proc) in enumerate(CASES):
        want_keep, want_p = hf_probs(proc(), logits[i])
        assert np.array_equal(keep[i], want_keep), (name, val, keep[i].sum(), want_keep.sum())
        np.testing.assert_allclose(our_probs(logits[i], keep[i]), want_p, atol=1e-5)


def test_chained_warpers_and_temperature_match_transformers():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, V)) * 2).astype(np.float32)
    settings = [dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, typical_p=1.0),
                dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0, typical_p=0.9),
                dict(temperature=0.5, top_k=100, top_p=1.0, min_p=0.05, typical_p=0.95)]
    p = params(3, **{k: [s[k] for s in settings] for k in settings[0]})
    z = logits / np.asarray([s["temperature"] for s in settings], np.float32)[:, None]
    keep = np.asarray(smp.truncation_mask(jnp.asarray(z), p))
    for i, s in enumerate(settings):
        procs = [TemperatureLogitsWarper(s["temperature"])]
        procs += [TopKLogitsWarper(s["top_k"])] if s["top_k"] else []
        procs += [TopPLogitsWarper(s["top_p"])] if s["top_p"] < 1 else []
        procs += [MinPLogitsWarper(s["min_p"])] if s["min_p"] > 0 else []
        procs += [TypicalLogitsWarper(s["typical_p"])] if s["typical_p"] < 1 else []
        x = torch.tensor(logits[i][None])
        for proc in procs:
            x = proc(torch.zeros((1, 1), dtype=torch.long), x)
        want_keep = np.isfinite(x[0].numpy())
        assert np.array_equal(keep[i], want_keep), i
        np.testing.assert_allclose(our_probs(z[i], keep[i]), our_probs(x[0].numpy(), want_keep), atol=1e-5)


def test_random_chains_in_one_batch_match_transformers_on_both_paths():
    """40 rows of random settings, flat and peaked, in one call: rows whose survivors lie within the 64 candidates and
    rows that take the exact path (top_k past them, flat top_p / min_p, typical_p alone) give transformers' sets."""
    rng = np.random.default_rng(3)
    b = 40
    logits = (rng.standard_normal((b, V)) * rng.choice([0.3, 1.0, 4.0], b)[:, None]).astype(np.float32)
    rows = dict(top_k=rng.choice([0, 0, 5, 64, 65, 300], b), top_p=rng.choice([1.0, 0.5, 0.9, 0.99], b),
                min_p=rng.choice([0.0, 0.0, 0.01, 0.1], b), typical_p=rng.choice([1.0, 1.0, 0.7, 0.95], b))
    keep = np.asarray(smp.truncation_mask(jnp.asarray(logits), params(b, **rows)))
    for i in range(b):
        k, top_p, min_p, typ = (rows[n][i] for n in ("top_k", "top_p", "min_p", "typical_p"))
        procs = [TopKLogitsWarper(int(k))] if k else []
        procs += [TopPLogitsWarper(float(top_p))] if top_p < 1 else []
        procs += [MinPLogitsWarper(float(min_p))] if min_p > 0 else []
        procs += [TypicalLogitsWarper(float(typ))] if typ < 1 else []
        x = torch.tensor(logits[i][None])
        for proc in procs:
            x = proc(torch.zeros((1, 1), dtype=torch.long), x)
        assert np.array_equal(keep[i], np.isfinite(x[0].numpy())), (i, k, top_p, min_p, typ)


def test_a_mask_leaving_fewer_tokens_than_a_cut_keeps_transformers_set_and_draws_an_allowed_token():
    """A grammar's mask may leave fewer tokens than top_k asks for (a JSON object's first token: `{` and a few
    more). Every truncation then keeps transformers' set of the masked logits, and every variant draws an allowed
    token (top_k 10 over 3 allowed tokens drew token 0: the excluded candidates made the statistics NaN)."""
    rng = np.random.default_rng(11)
    settings = [dict(top_k=10), dict(top_k=100), dict(top_p=0.9), dict(typical_p=0.9), dict(min_p=0.05),
                dict(top_k=20, top_p=0.95), dict(top_k=5, typical_p=0.5)]
    rows = [(st, n) for st in settings for n in (1, 3, 9, 40)]
    b = len(rows)
    logits = (rng.standard_normal((b, V)) * 3).astype(np.float32)
    mask = np.zeros((b, V), bool)
    for i, (_, n) in enumerate(rows):
        mask[i, rng.choice(V, n, replace=False)] = True
    z = np.where(mask, logits, -np.inf).astype(np.float32)
    neutral = smp.neutral_params(1, V)
    procs = dict(top_k=TopKLogitsWarper, top_p=TopPLogitsWarper, min_p=MinPLogitsWarper, typical_p=TypicalLogitsWarper)
    p, state = _keyed(b, temperature=[1.0] * b, **{n: [st.get(n, neutral[n][0]) for st, _ in rows] for n in procs})
    keep = np.asarray(smp.truncation_mask(jnp.asarray(z), p))
    for i, (st, n) in enumerate(rows):
        x = torch.tensor(z[i][None])
        for name, value in st.items():
            x = procs[name](value)(torch.zeros((1, 1), dtype=torch.long), x)
        assert np.array_equal(keep[i] & mask[i], np.isfinite(x[0].numpy())), (st, n)
    words = np.pad(np.packbits(mask, axis=1, bitorder="little"), ((0, 0), (0, 3))).view("<i4")  # bit t % 32 of t // 32
    for branches in ("cond", "select"):
        outs, _, _ = _steps(branches, jnp.asarray(np.stack([logits] * 3)), p, state, jnp.asarray(words))
        for out in outs:
            assert mask[np.arange(b), out.token].all(), (branches, [rows[i] for i in np.flatnonzero(
                ~mask[np.arange(b), out.token])])


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((2, V)) * 3).astype(np.float32)
    prompt = [[3, 7, 7, 500, 999], [0, 1, 2]]
    output = [[11, 3], [42]]
    state = smp.init_state(2, V)
    pm = np.zeros((2, V), bool)
    counts = np.zeros((2, V), np.int32)
    for i in range(2):
        pm[i, prompt[i]] = True
        for t in output[i]:
            counts[i, t] += 1
    state = dataclasses.replace(state, counts=jnp.asarray(counts), prompt_mask=jnp.asarray(pm))
    got = np.asarray(smp.penalize(jnp.asarray(logits), params(2, repetition_penalty=[1.3, 0.7]), state))
    for i, r in enumerate([1.3, 0.7]):
        ids = torch.tensor([prompt[i] + output[i]])
        want = RepetitionPenaltyLogitsProcessor(r)(ids, torch.tensor(logits[i][None]))[0].numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-6)


def test_frequency_presence_and_bias_match_formula():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((2, V)) * 3).astype(np.float32)
    counts = rng.integers(0, 3, (2, V)).astype(np.int32) * (rng.random((2, V)) < 0.05)
    bias = np.zeros((2, V), np.float32)
    bias[0, 5], bias[1, 17], bias[1, 18] = 100.0, -100.0, 3.5
    state = smp.init_state(2, V)
    state = dataclasses.replace(state, counts=jnp.asarray(counts))
    p = params(2, frequency_penalty=[0.5, -1.0], presence_penalty=[1.5, 0.25], bias=bias)
    got = np.asarray(smp.penalize(jnp.asarray(logits), p, state))
    f, pr = np.array([0.5, -1.0])[:, None], np.array([1.5, 0.25])[:, None]
    want = logits + bias - f * counts - pr * (counts > 0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_min_tokens_holds_back_a_rows_ending_tokens_until_it_has_drawn_that_many():
    """vLLM's min_tokens, written out: while a row has drawn fewer than its min_tokens, its ending tokens (EOS and
    stop_token_ids) are -inf; from then on, and in rows without it, the logits are untouched. A greedy draw of a
    held row whose best token is an ending one takes the next best, and takes the ending token once released."""
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((3, V)) * 3).astype(np.float32)
    logits[:, 7] = 50.0  # an ending token that would win every draw
    ends = np.full((3, smp.MAX_ENDS), V, np.int32)
    ends[:, :2] = [7, 9]
    steps, mins = np.array([2, 5, 0]), np.array([5, 5, 0])
    state = smp.init_state(3, V)
    state = dataclasses.replace(state, step=jnp.asarray(steps, jnp.int32))
    p = params(3, min_tokens=mins, ends=ends, temperature=[0.0, 0.0, 0.0])
    want = logits.copy()
    for i in range(3):
        if steps[i] < mins[i]:
            want[i, [7, 9]] = -np.inf
    np.testing.assert_array_equal(np.asarray(smp.penalize(jnp.asarray(logits), p, state)), want)
    out, new = smp.sample(jnp.asarray(logits), p, state, jnp.ones(3, bool))
    held_best = int(np.argmax(np.where(np.isin(np.arange(V), [7, 9]), -np.inf, logits[0])))
    assert np.asarray(out.token).tolist() == [held_best, 7, 7]
    assert np.asarray(new.step).tolist() == [3, 6, 1]


def mirostat_reference(logits_seq, uniforms, tau, eta, temperature=1.0):
    """llama.cpp's mirostat v2, written out in numpy; the draw is the inverse CDF (vocabulary order) at the given
    uniform numbers."""
    mu, tokens, mus = 2 * tau, [], []
    for logits, u in zip(logits_seq, uniforms):
        z = logits / temperature
        order = np.argsort(-z, kind="stable")
        p = np.exp(z[order] - z[order].max())
        p /= p.sum()
        surprise = -np.log2(p)
        size = int(np.argmax(surprise > mu)) if (surprise > mu).any() else len(p)
        size = max(size, 1)
        kept = np.sort(order[:size])
        q = np.exp(z[kept].astype(np.float64) - z[kept].max())
        q /= q.sum()
        j = min(int(np.sum(np.cumsum(q) <= u)), size - 1)
        tok = int(kept[j])
        mu = mu - eta * (-np.log2(q[j]) - tau)
        tokens.append(tok)
        mus.append(mu)
    return tokens, mus


def test_mirostat_matches_reference_over_50_steps():
    rng = np.random.default_rng(4)
    tau, eta, steps = 3.0, 0.2, 50
    logits_seq = (rng.standard_normal((steps, V)) * 3).astype(np.float32)
    key = np.asarray(jax.random.key_data(jax.random.PRNGKey(123)))[None]
    u = [float(smp.uniforms(jnp.asarray(key), jnp.asarray([t]))[0][0]) for t in range(steps)]
    want_tokens, want_mus = mirostat_reference(logits_seq, u, tau, eta)
    p = params(1, mirostat=[True], mirostat_tau=[tau], mirostat_eta=[eta])
    s = smp.init_state(1, V)
    s = dataclasses.replace(s, mu=jnp.asarray([2 * tau]), key=jnp.asarray(key))
    f = jax.jit(smp.sample)
    for t in range(steps):
        out, s = f(jnp.asarray(logits_seq[t][None]), p, s, jnp.asarray([True]))
        assert int(out.token[0]) == want_tokens[t], t
        assert abs(float(s.mu[0]) - want_mus[t]) < 1e-4, t


def test_draws_follow_the_processed_distribution():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(V) * 2).astype(np.float32)
    b, rounds = 256, 16
    p = params(b, temperature=[0.8] * b, top_k=[40] * b, top_p=[0.9] * b, min_p=[0.01] * b)
    x = torch.tensor(logits[None])
    for proc in [TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.9), MinPLogitsWarper(0.01)]:
        x = proc(torch.zeros((1, 1), dtype=torch.long), x)
    want = torch.softmax(x[0], -1).numpy()
    s = smp.init_state(b, V)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(i))) for i in range(b)])
    s = dataclasses.replace(s, key=jnp.asarray(keys))
    f = jax.jit(smp.sample)
    draws = []
    for _ in range(rounds):
        out, s = f(jnp.broadcast_to(jnp.asarray(logits), (b, V)), p, s, jnp.ones(b, bool))
        draws.append(np.asarray(out.token))
    freq = np.bincount(np.concatenate(draws), minlength=V) / (b * rounds)
    tv = 0.5 * np.abs(freq - want).sum()
    assert tv < 0.05, tv
    assert freq[want == 0].sum() == 0
    # A sampler that skipped the temperature would be far off on these logits.
    assert 0.5 * np.abs(want - torch.softmax(torch.tensor(logits), -1).numpy()).sum() > 0.1


def test_greedy_and_logprobs_are_raw():
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((2, V)) * 3).astype(np.float32)
    bias = np.zeros((2, V), np.float32)
    bias[1, 7] = 100.0
    out, _ = smp.sample(jnp.asarray(logits), params(2, temperature=[0.0, 0.0], bias=bias, top_logprobs=[20, 20]),
                        smp.init_state(2, V), jnp.ones(2, bool))
    assert int(out.token[0]) == int(np.argmax(logits[0])) and int(out.token[1]) == 7
    raw = logits[1] - np.log(np.exp(logits[1] - logits[1].max()).sum()) - logits[1].max()
    assert math.isclose(float(out.logprob[1]), float(raw[7]), abs_tol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.top_ids[1]), np.argsort(-raw)[:smp.TOP_LOGPROBS])


def _processed(logits, s):
    """transformers' processors for a row's settings (`s`), in the sampler's order: the repetition penalty over the
    row's `seen` tokens, then (sampled rows) temperature, top_k and top_p; the processed logits."""
    x = torch.tensor(logits[None])
    seen = torch.tensor([s.get("seen", [0])])
    procs = [RepetitionPenaltyLogitsProcessor(s["repetition_penalty"])] if s.get("repetition_penalty", 1) != 1 else []
    if s["temperature"] > 0:
        procs += [TemperatureLogitsWarper(s["temperature"])]
        procs += [TopKLogitsWarper(s["top_k"])] if s.get("top_k") else []
        procs += [TopPLogitsWarper(s["top_p"])] if s.get("top_p", 1) < 1 else []
    for proc in procs:
        x = proc(seen, x)
    return x[0].numpy()


@pytest.mark.parametrize("branches", ["cond", "select"])
def test_logprobs_modes_report_the_raw_or_the_processed_distribution(branches):
    """vLLM's logprobs modes: the model's logprobs or logits, or those of the distribution drawn from (transformers'
    processors: a penalty, the temperature, top_k and top_p; a greedy row's penalized logits at temperature 1,
    untruncated), a token outside it at -9999; the draws are the same in every mode. A row with llama.cpp's
    `post_sampling_probs` reports the logprobs of the distribution drawn from in every mode (a greedy row's: its
    choice alone, at 0), beside rows that follow the mode."""
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal((3, V)) * 3).astype(np.float32)
    settings = [dict(temperature=0.7, top_k=12, top_p=0.9),  # a greedy row's top_k changes nothing: untruncated
                dict(temperature=0.0, repetition_penalty=1.5, seen=[3, 9], top_k=5),
                dict(temperature=1.3, top_k=0, top_p=0.5)]
    rows = {k: [st.get(k, d) for st in settings] for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0),
                                                               ("repetition_penalty", 1.0))}
    p = params(3, top_logprobs=[20] * 3, **rows)
    state = smp.init_state(3, V)
    state = dataclasses.replace(state, prompt_mask=state.prompt_mask.at[1, jnp.asarray([3, 9])].set(True),
                                key=jnp.asarray(np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(i)))
                                                          for i in range(3)])))
    tokens = None
    for mode in smp.LOGPROBS_MODES:
        out, _ = jax.jit(smp.sample, static_argnames=("branches", "logprobs"))(
            jnp.asarray(logits), p, state, jnp.ones(3, bool), branches=branches, logprobs=mode)
        tokens = np.asarray(out.token) if tokens is None else tokens
        np.testing.assert_array_equal(np.asarray(out.token), tokens)  # the mode changes what is reported only
        for i, st in enumerate(settings):
            src = logits[i] if mode.startswith("raw") else _processed(logits[i], st)
            if mode.endswith("logprobs"):
                src = src - torch.logsumexp(torch.tensor(src), 0).item()
            want = np.maximum(src, smp.LOGPROB_FLOOR)
            assert math.isclose(float(out.logprob[i]), float(want[tokens[i]]), abs_tol=1e-4), (mode, i)
            np.testing.assert_allclose(np.asarray(out.top_logprobs[i]), np.sort(want)[::-1][:smp.TOP_LOGPROBS],
                                       atol=1e-4)
            finite = want[np.asarray(out.top_ids[i])] > smp.LOGPROB_FLOOR
            np.testing.assert_allclose(want[np.asarray(out.top_ids[i])], np.asarray(out.top_logprobs[i]), atol=1e-4)
            if mode.startswith("processed") and st["temperature"] > 0:
                assert not finite.all()  # the cut leaves fewer than 20: the rest report the floor
    assert tokens[1] == int(np.argmax(_processed(logits[1], settings[1])))
    post = params(3, top_logprobs=[20] * 3, post_sampling=[True, True, False], **rows)
    for mode in smp.LOGPROBS_MODES:
        out, _ = jax.jit(smp.sample, static_argnames=("branches", "logprobs"))(
            jnp.asarray(logits), post, state, jnp.ones(3, bool), branches=branches, logprobs=mode)
        np.testing.assert_array_equal(np.asarray(out.token), tokens)
        drawn = _processed(logits[0], settings[0])
        drawn = np.maximum(drawn - torch.logsumexp(torch.tensor(drawn), 0).item(), smp.LOGPROB_FLOOR)
        chosen = np.full(V, smp.LOGPROB_FLOOR, np.float32)  # the greedy row: its choice, at probability 1
        chosen[tokens[1]] = 0.0
        other = logits[2] if mode.startswith("raw") else _processed(logits[2], settings[2])  # the mode's
        if mode.endswith("logprobs"):
            other = other - torch.logsumexp(torch.tensor(other), 0).item()
        for i, want in enumerate([drawn, chosen, np.maximum(other, smp.LOGPROB_FLOOR)]):
            assert math.isclose(float(out.logprob[i]), float(want[tokens[i]]), abs_tol=1e-4), (mode, i)
            np.testing.assert_allclose(np.asarray(out.top_logprobs[i]), np.sort(want)[::-1][:smp.TOP_LOGPROBS],
                                       atol=1e-4)
        assert int(out.top_ids[1][0]) == tokens[1]
    from engine import beam

    beam.check_width(2, [0], False, "processed_logprobs")  # a greedy row's processed logprobs are its raw ones
    with pytest.raises(ValueError, match="summed log-probabilities"):  # beams are not ranked by summed logits
        beam.check_width(2, [0], False, "raw_logits")


def test_the_engine_reports_processed_logprobs_as_transformers_processes_its_logits(smollm, tmp_path):
    """`logprobs_mode="processed_logprobs"` through the engine on a 2-layer random Llama: each drawn token's logprob
    and its 5 alternatives are those of transformers' processors (temperature and top_k for a seeded row; the
    repetition penalty, at temperature 1, for a greedy one) over transformers' logits of the same tokens; and the same
    through verify steps, each reply its own prediction (speculative decoding)."""
    from engine import LLM, SamplingParams
    from helpers import tiny_llama
    from models import load_model

    _, ref = tiny_llama(str(tmp_path), smollm.tokenizer.folder, [], scale=0.1)
    llm = LLM(load_model(str(tmp_path)), max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01, decode_batch_sizes=(2,),
              logprobs_mode="processed_logprobs")
    prompts = [[5, 17, 42, 99, 3, 250], [200, 100, 50, 25]]
    settings = [dict(temperature=0.7, top_k=8, seed=3), dict(temperature=0.0, repetition_penalty=1.5)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=5, **st) for st in settings]
    outs = llm.generate(prompts, params)
    for prompt, st, out in zip(prompts, settings, outs):
        got = out.outputs[0]
        for j, (token, lp, tops) in enumerate(got.logprobs):
            seq = prompt + got.token_ids[:j]
            with torch.no_grad():
                logits = ref(torch.tensor([seq])).logits[0, -1].numpy()
            want = _processed(logits, {**st, "seen": seq})
            want = np.maximum(want - torch.logsumexp(torch.tensor(want), 0).item(), smp.LOGPROB_FLOOR)
            assert token == got.token_ids[j] and math.isclose(lp, float(want[token]), abs_tol=2e-4), (j, lp)
            np.testing.assert_allclose([v for _, v in tops], np.sort(want)[::-1][:5], atol=2e-4)
            np.testing.assert_allclose([want[i] for i, _ in tops], [v for _, v in tops], atol=2e-4)
    again = llm.generate(prompts, params, predictions=[out.outputs[0].token_ids for out in outs])
    assert sum(out.accepted for out in again) > 0
    for a, b in zip(again, outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        np.testing.assert_allclose([lp for _, lp, _ in a.outputs[0].logprobs],
                                   [lp for _, lp, _ in b.outputs[0].logprobs], atol=2e-4)


def test_inverse_cdf_draw_never_lands_on_an_excluded_token():
    rng = np.random.default_rng(7)
    v = 1000  # not a multiple of the 128-token block: the last block is padded
    cases = [[v - 1], [0], [5, 130, 999], list(range(256, 384)), [127, 128]]
    for kept in cases:
        z = np.full((1, v), -np.inf, np.float32)
        z[0, kept] = rng.standard_normal(len(kept)).astype(np.float32) * 3
        p = np.exp(z[0, kept] - z[0, kept].max())
        p /= p.sum()
        for u in (0.0, 1e-9, 0.5, 1 - 1e-7, float(np.nextafter(np.float32(1), np.float32(0)))):
            tok, logq = smp.draw(jnp.asarray(z), jnp.asarray([u], jnp.float32))
            t = int(tok[0])
            assert t in kept, (kept, u, t)
            want = kept[min(int(np.sum(np.cumsum(p) <= u)), len(kept) - 1)]
            if 1e-6 < u < 1 - 1e-6:
                assert t == want, (kept, u, t, want)
            assert math.isclose(float(logq[0]), math.log(p[kept.index(t)]), abs_tol=1e-4)


@pytest.mark.parametrize("scale", [0.5, 4.0, 8.0])
def test_typical_p_alone_is_exact_without_a_sort_and_matches_transformers(scale):
    """Rows where only typical_p truncates take the bisection over float bit patterns: the same set as transformers,
    flat or peaked, with a suppressed (-inf) token in the row as ignore_eos makes one."""
    rng = np.random.default_rng(2)
    vals = [0.2, 0.5, 0.9, 0.99]
    logits = (rng.standard_normal((len(vals), V)) * scale).astype(np.float32)
    logits[:, 7] = -np.inf
    keep = np.asarray(smp.truncation_mask(jnp.asarray(logits), params(len(vals), typical_p=vals)))
    for i, v in enumerate(vals):
        want_keep, want_p = hf_probs(TypicalLogitsWarper(v), logits[i])
        assert np.array_equal(keep[i], want_keep), (v, keep[i].sum(), want_keep.sum())
        np.testing.assert_allclose(our_probs(logits[i], keep[i]), want_p, atol=1e-5)


def test_seed_keys_are_jax_keys_of_the_seed_and_its_choices():
    """`seed_keys` computes a request's threefry keys on the host (no device op per request): they must be JAX's own,
    for seeds past 2^31 and 2^32 too, and further choices fold their index into the seed's key. Its Threefry-2x32 is
    JAX's on random keys and counters."""
    from jax.extend.random import threefry_2x32

    rng = np.random.default_rng(0)
    key, words = rng.integers(0, 2**32, 2, np.uint32), rng.integers(0, 2**32, (2, 500), np.uint32)
    want = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(words.reshape(-1))))
    np.testing.assert_array_equal(np.concatenate(smp.threefry2x32(key, *words)), want)
    for seed in (0, 7, 2**31 + 3, 2**32 - 1, 2**40 + 9):
        root = jax.random.PRNGKey(seed % 2**32)
        want = [root] + [jax.random.fold_in(root, i) for i in (1, 2)]
        got = smp.seed_keys(seed, 3)
        assert [k.dtype for k in got] == [np.uint32] * 3
        np.testing.assert_array_equal(np.stack(got), np.stack([jax.random.key_data(k) for k in want]))
        np.testing.assert_array_equal(smp.seed_keys(seed, 1)[0], got[0])
        most = smp.seed_keys(seed, 128)  # the most choices a request may have
        assert len(most) == 128 and np.array_equal(most[:3], got)
        np.testing.assert_array_equal(most[127], jax.random.key_data(jax.random.fold_in(root, 127)))


def _steps(branches, logits, p, state, allowed=None):
    """`sample` under `branches` over each step's logits, the state threaded: each step's outputs, the last state,
    and the lowered program's text."""
    f = jax.jit(smp.sample, static_argnames="branches")
    b = logits.shape[1]
    text = f.lower(logits[0], p, state, jnp.ones(b, bool), allowed, branches=branches).as_text()
    outs = []
    for step in logits:
        out, state = f(jnp.asarray(step), p, state, jnp.ones(b, bool), allowed, branches=branches)
        outs.append(jax.tree.map(np.asarray, out))
    return outs, jax.tree.map(np.asarray, state), text


def _keyed(b, **rows):
    """Params with the given rows, and a state whose rows have their own keys and prompt tokens."""
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.PRNGKey(i))) for i in range(b)])
    init = smp.init_state(b, V)
    init = dataclasses.replace(init, prompt_mask=init.prompt_mask.at[:, :50].set(True), mu=init.mu + 8.0,
                               key=jnp.asarray(keys))
    return params(b, **rows), init


def test_plain_rows_draw_the_same_without_the_conditionals():
    """`branches="plain"` (a GPU's program for batches of `is_plain` rows) holds no `lax.cond` and gives every such
    row what the full sampler gives it: seeded draws at a temperature, greedy rows with a truncation they do not
    use, penalties and biases, over 6 steps of threaded state. `is_plain` refuses each setting a conditional guards."""
    rng = np.random.default_rng(8)
    b = 6
    rows = dict(temperature=[0.0, 0.7, 1.3, 0.0, 1.0, 0.9], top_p=[0.5, 1, 1, 1, 1, 1], top_k=[0, 0, 0, 7, 0, 0],
                repetition_penalty=[1, 1.3, 1, 1, 1, 1], frequency_penalty=[0, 0, 0.5, 0, 0, 0],
                presence_penalty=[0, 0, 0, 0, 0.4, 0])
    hp = smp.neutral_params(b, V)
    for k, v in rows.items():
        hp[k] = np.asarray(v, hp[k].dtype)
    assert all(smp.is_plain({k: v[i] for k, v in hp.items()}) for i in range(b))
    for name, value in [("top_p", 0.9), ("top_k", 40), ("min_p", 0.05), ("typical_p", 0.5), ("mirostat", True),
                        ("top_logprobs", 1), ("post_sampling", True)]:
        assert not smp.is_plain({**{k: v[1] for k, v in hp.items()}, name: value}), name
    bias = np.zeros((b, V), np.float32)
    bias[5, 11] = 4.0
    p, init = _keyed(b, **rows, bias=bias)
    logits = (rng.standard_normal((6, b, V)) * 3).astype(np.float32)
    want, want_state, text = _steps("cond", logits, p, init)
    got, got_state, plain_text = _steps("plain", logits, p, init)
    assert "stablehlo.case" in text and "stablehlo.case" not in plain_text
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w.token, g.token)
        np.testing.assert_allclose(w.logprob, g.logprob, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, want_state, got_state)


def test_select_computes_every_transform_and_draws_what_the_conditionals_draw():
    """`branches="select"` (a GPU's program for the other batches) holds no `lax.cond`: every transform runs for every
    row and is taken where wanted. Over 6 steps of rows of every kind (top_k within and past the candidates, top_p on
    flat logits, min_p, typical_p alone, mirostat, alternatives, a grammar mask, a greedy row) it gives what the
    conditionals give, and so does a batch where no row wants any of it (every branch not taken)."""
    rng = np.random.default_rng(9)
    b = 8
    rows = dict(temperature=[1.0, 0.8, 1.0, 0.7, 1.0, 1.0, 0.0, 0.9], top_k=[5, 200, 0, 0, 0, 0, 0, 0],
                top_p=[1, 1, 0.95, 1, 1, 1, 1, 1], min_p=[0, 0, 0, 0.05, 0, 0, 0, 0],
                typical_p=[1, 1, 1, 1, 0.6, 1, 1, 1], mirostat=[False] * 5 + [True, False, False],
                top_logprobs=[0, 0, 0, 0, 0, 0, 3, 0])
    logits = (rng.standard_normal((6, b, V)) * np.array([3, 3, 0.3, 3, 3, 3, 3, 3])[:, None]).astype(np.float32)
    allowed = np.full((b, (V + 31) // 32), -1, np.int32)
    allowed[7, 4:] = 0  # the last row may draw only among the first 128 tokens
    for these in (rows, dict(temperature=rows["temperature"])):
        p, init = _keyed(b, **these)
        want, want_state, _ = _steps("cond", logits, p, init, jnp.asarray(allowed))
        got, got_state, text = _steps("select", logits, p, init, jnp.asarray(allowed))
        assert "stablehlo.case" not in text and "stablehlo.if" not in text
        for w, g in zip(want, got):
            jax.tree.map(np.testing.assert_array_equal, w, g)
        jax.tree.map(np.testing.assert_array_equal, want_state, got_state)
    assert (np.stack([o.token[7] for o in got]) < 128).all()


def test_lean_select_leaves_out_what_no_row_wants_and_draws_what_the_conditionals_draw():
    """`branches="lean"` (a GPU's program for batches of `is_lean` rows, such as generation defaults) holds no
    `lax.cond`, two bisection loops fewer than `select` (top_k's and typical_p's), and no top-k search for
    alternatives; over 6 steps of such rows (top_p on flat logits, top_k within the candidates with top_p and
    typical_p, min_p, a greedy row with a top_k past them, a grammar mask) it gives what the conditionals give.
    `is_lean` refuses each setting it leaves out."""
    rng = np.random.default_rng(10)
    b = 6
    rows = dict(temperature=[0.8, 1.0, 0.7, 0.0, 0.9, 1.0], top_k=[0, 20, 0, 200, 0, 64],
                top_p=[0.9, 0.95, 1, 1, 0.8, 1], min_p=[0, 0, 0.05, 0, 0, 0], typical_p=[1, 0.6, 1, 0.5, 1, 1])
    hp = smp.neutral_params(b, V)
    for k, v in rows.items():
        hp[k] = np.asarray(v, hp[k].dtype)
    assert all(smp.is_lean({k: v[i] for k, v in hp.items()}) for i in range(b))
    for change in (dict(top_k=65), dict(typical_p=0.5), dict(mirostat=True), dict(top_logprobs=1),
                   dict(post_sampling=True)):
        assert not smp.is_lean({**{k: v[0] for k, v in hp.items()}, **change}), change
    logits = (rng.standard_normal((6, b, V)) * np.array([0.3, 3, 0.3, 3, 0.3, 3])[:, None]).astype(np.float32)
    allowed = np.full((b, (V + 31) // 32), -1, np.int32)
    allowed[4, 4:] = 0  # this row may draw only among the first 128 tokens
    p, init = _keyed(b, **rows)
    want, want_state, _ = _steps("cond", logits, p, init, jnp.asarray(allowed))
    got, got_state, text = _steps("lean", logits, p, init, jnp.asarray(allowed))
    _, _, select_text = _steps("select", logits[:1], p, init, jnp.asarray(allowed))
    assert "stablehlo.case" not in text and "stablehlo.if" not in text
    assert text.count("stablehlo.while") == select_text.count("stablehlo.while") - 2
    assert text.count("chlo.top_k") == select_text.count("chlo.top_k") - 1
    for w, g in zip(want, got):
        jax.tree.map(np.testing.assert_array_equal, w, g)
    jax.tree.map(np.testing.assert_array_equal, want_state, got_state)
    assert (np.stack([o.token[4] for o in got]) < 128).all()


def _dry_rows(rng):
    """Histories for DRY, each with its settings `(multiplier, base, allowed_length, last_n)`."""
    loop = list(rng.integers(100, 300, 40))
    long_run = list(rng.integers(100, 900, 150))
    return [
        (list(rng.integers(0, 12, 300)), (0.8, 1.75, 2, -1)),  # a small alphabet: repeats everywhere, breakers too
        (loop + loop[:30], (0.8, 1.75, 2, -1)),  # a 30-token repeat (past one block of positions)
        (list(rng.integers(0, 6, 80)), (0.5, 1.0, 0, 50)),  # base 1 and no allowed length, a window of 50
        (list(rng.integers(0, 6, 80)), (0.5, 1.75, 2, 0)),  # last_n 0: off
        (list(rng.integers(0, 5, 1500)), (1.2, 1.5, 3, -1)),  # longer than the window: -1 is the window
        (long_run + long_run[:120], (0.5, 3.0, 2, -1)),  # 3^118 would pass float32: the exponent is capped at 80
        (list(rng.integers(0, 12, 200)), (0.0, 1.75, 2, -1)),  # multiplier 0: off
        (list(rng.integers(0, 6, 100)) + [7], (0.8, 1.75, 2, -1)),  # a breaker last: no run
        (loop + loop[:20] + [7] + loop[:10], (0.8, 1.75, 2, 500)),  # a breaker stops the run at 10
        (list(rng.integers(0, 6, 6)), (0.5, 1.0, 0, -1)),  # a short history: no copy ends before its first token
        ([3], (0.5, 1.75, 0, -1)),  # one token: nothing
    ]


@pytest.mark.parametrize("select", [False, True])
def test_dry_matches_llama_cpp_written_out(select):
    """DRY over rows of every kind in one call (repeats within and past a block of positions, breakers in and at the
    end of the run, windows, base 1, the exponent's cap, off by multiplier and by window) takes off what llama.cpp's
    algorithm does, with the loop that stops (`select` False) and the one of fixed count."""
    rng = np.random.default_rng(21)
    rows = _dry_rows(rng)
    b = len(rows)
    breakers = np.zeros(V, bool)
    breakers[[7, 8]] = True
    settings = [s for _, s in rows]
    p = params(b, dry_multiplier=[s[0] for s in settings], dry_base=[s[1] for s in settings],
               dry_allowed_length=[s[2] for s in settings], dry_last_n=[s[3] for s in settings],
               breakers=np.tile(breakers, (b, 1)))
    state = dataclasses.replace(smp.init_state(b, V), history=jnp.asarray(
        np.stack([smp.history_row(tokens) for tokens, _ in rows])))
    tokens, amounts = map(np.asarray, jax.jit(smp.dry_penalties, static_argnums=(2, 3))(p, state, V, select))
    assert all(len(set(t[t < V])) == (t < V).sum() for t in tokens)  # each token once
    got = np.zeros((b, V + 1))
    np.add.at(got, (np.arange(b)[:, None], tokens), amounts)
    got = got[:, :V]
    for i, (tokens, (mult, base, allowed, last_n)) in enumerate(rows):
        want = dry_reference(tokens[-smp.DRY_WINDOW:], mult, base, allowed,
                             smp.DRY_WINDOW if last_n < 0 else last_n, {7, 8}, V)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, err_msg=f"row {i}")
    assert got[1].max() > 0 and got[5].max() == pytest.approx(0.5 * 3.0 ** 80, rel=1e-5)
    assert not got[3].any() and not got[6].any() and not got[7].any()


def sigma_reference(z, n):
    """Top-nσ as llama.cpp writes it, over the tokens not excluded: keep what lies within n deviations of the top."""
    live = np.isfinite(z)
    x = z[live].astype(np.float64)
    return live & (z >= x.max() - n * np.sqrt(np.mean((x - x.mean()) ** 2)))


def xtc_reference(z, probability, threshold, coin):
    """XTC as llama.cpp writes it: when the draw's coin falls under the probability, sort the survivors by
    probability and drop those before the last one reaching the threshold."""
    live = np.isfinite(z)
    if coin >= probability:
        return live
    p = np.where(live, np.exp(z - z[live].max()), 0.0)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    above = [t for t in order if live[t] and p[t] >= threshold]
    keep = live.copy()
    if len(above) >= 2:
        keep[above[:-1]] = False
    return keep


def test_top_n_sigma_and_xtc_match_llama_cpp_written_out():
    """Top-nσ keeps llama.cpp's set whatever the temperature (and with tokens already excluded); XTC drops the top
    choices but the least likely of them when its coin says so, and nothing when it does not, when fewer than two
    reach the threshold, or at a probability of 0."""
    rng = np.random.default_rng(22)
    b = 8
    z = (rng.standard_normal((b, V)) * rng.choice([0.5, 2.0, 5.0], b)[:, None]).astype(np.float32)
    z[1, rng.choice(V, 600, replace=False)] = -np.inf
    z[:, :4] += np.float32(9.0)  # four leading tokens near each other: several reach a threshold
    sigma = np.asarray([1.0, 0.5, 2.5, 0.0, -1.0, 1.0, 3.0, 0.1], np.float32)
    for temperature in (1.0, 0.6):
        zt = z / temperature
        keep = zt >= np.asarray(smp.sigma_floor(jnp.asarray(zt), params(b, top_n_sigma=sigma)))[:, None]
        for i in range(b):
            want = sigma_reference(z[i], sigma[i]) if sigma[i] > 0 else np.ones(V, bool)
            assert np.array_equal(keep[i], want), (i, temperature)
    probability = np.asarray([1.0, 1.0, 0.5, 0.5, 0.0, 1.0, 1.0, 0.3], np.float32)
    threshold = np.asarray([0.1, 0.0, 0.1, 0.1, 0.1, 0.6, 0.0, 0.05], np.float32)  # row 1: 0 with tokens excluded
    coin = np.asarray([0.3, 0.9, 0.2, 0.7, 0.0, 0.1, 0.5, 0.29], np.float32)
    keep = z <= np.asarray(smp.xtc_ceiling(jnp.asarray(z), params(b, xtc_probability=probability,
                                                                  xtc_threshold=threshold), jnp.asarray(coin)))[:, None]
    for i in range(b):
        assert np.array_equal(keep[i] & np.isfinite(z[i]), xtc_reference(z[i], probability[i], threshold[i],
                                                                         coin[i])), i
    dropped = (~keep & np.isfinite(z)).sum(axis=1)
    assert (dropped > 0).sum() >= 3 and dropped[3] == dropped[4] == dropped[5] == 0, dropped
    for i in (1, 6):  # a threshold of 0: only the least likely token stays
        assert dropped[i] == np.isfinite(z[i]).sum() - 1 and keep[i][np.isfinite(z[i])].sum() == 1, i


def test_dry_xtc_and_top_n_sigma_through_sample_on_every_variant():
    """Through `sample`, over 6 steps of threaded state: a greedy DRY row draws the argmax of its logits less
    llama.cpp's penalties over its growing history; an XTC row (coin always, at temperature 0.7: its threshold on the
    logits before it) never draws one of the top choices it drops; a top-nσ row draws within its set; `dry` (`select`
    with DRY's passes, a loop of fixed count, which `select` leaves out) draws the same; no variant that leaves these
    out (`is_plain`, `is_lean`) takes such a row."""
    rng = np.random.default_rng(23)
    b, steps = 4, 6
    breakers = np.zeros(V, bool)
    breakers[7] = True
    prompt = [list(rng.integers(0, 9, 60)) for _ in range(b)]
    rows = dict(temperature=[0.0, 0.7, 1.0, 1.0], dry_multiplier=[3.0, 0, 0, 0], dry_allowed_length=[1, 2, 2, 2],
                xtc_probability=[0, 1.0, 0, 0], xtc_threshold=[0.1, 0.05, 0.1, 0.1], top_n_sigma=[0, 0, 1.0, 0],
                breakers=np.tile(breakers, (b, 1)))
    p, init = _keyed(b, **rows)
    init = dataclasses.replace(init, history=jnp.asarray(np.stack([smp.history_row(t) for t in prompt])))
    logits = (rng.standard_normal((steps, b, V)) * 2).astype(np.float32)
    logits[:, :, :9] += np.float32(4.0)  # the history's tokens lead: DRY decides the greedy row
    want, want_state, _ = _steps("cond", logits, p, init)
    got, got_state, text = _steps("dry", logits, p, init)
    for w, g in zip(want, got):
        jax.tree.map(np.testing.assert_array_equal, w, g)
    jax.tree.map(np.testing.assert_array_equal, want_state, got_state)
    _, _, select_text = _steps("select", logits[:1], p, init)  # DRY's passes are `dry`'s alone
    assert "stablehlo.case" not in text and text.count("stablehlo.while") == select_text.count("stablehlo.while") + 1
    seen = [list(t) for t in prompt]
    penalised = 0
    for step, out in enumerate(want):
        z = logits[step, 0].astype(np.float64) - dry_reference(seen[0], 3.0, 1.75, 1, smp.DRY_WINDOW, {7}, V)
        penalised += int(np.argmax(logits[step, 0]) != np.argmax(z))
        assert out.token[0] == np.argmax(z), step
        s = logits[step, 1]
        assert xtc_reference(s, 1.0, 0.05, 0.0)[out.token[1]], step
        assert sigma_reference(logits[step, 2], 1.0)[out.token[2]], step
        for i in range(b):
            seen[i].append(int(out.token[i]))
    assert penalised > 0  # DRY changed the greedy choice at least once
    hist = want_state.history
    for i in range(b):
        tail = np.asarray(seen[i][-smp.DRY_WINDOW:])
        assert np.array_equal(hist[i, -len(tail):], tail), i
    neutral = {k: v[0] for k, v in smp.neutral_params(1, V).items()}
    for change in (dict(dry_multiplier=0.5, temperature=0.0), dict(xtc_probability=0.5), dict(top_n_sigma=1.0)):
        row = {**neutral, **change}
        assert not smp.is_plain(row) and not smp.is_lean(row), change
    assert smp.is_plain({**neutral, "temperature": 0.0, "xtc_probability": 0.5, "top_n_sigma": 1.0})


def dynatemp_reference(x, temperature, delta, exponent):
    """llama.cpp's dynamic temperature (`llama_sampler_temp_ext_apply`) written out: the temperature for the
    survivors' logits `x` (finite ones only, before any temperature)."""
    x = x[np.isfinite(x)].astype(np.float64)
    if delta <= 0 or len(x) <= 1:
        return temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    low, high = max(0.0, temperature - delta), temperature + delta
    return low + (high - low) * (entropy / np.log(len(x))) ** exponent


def test_dynamic_temperature_matches_llama_cpp_written_out():
    """The temperature per row for survivors of several shapes (peaked, flat, some excluded, one left, ties of an
    underflowed tail), ranges (0: the row's own; past the temperature: its low end 0) and exponents (0: the high
    end, 1, 2)."""
    rng = np.random.default_rng(31)
    b = 9
    x = (rng.standard_normal((b, V)) * rng.choice([0.2, 1.0, 4.0], b)[:, None]).astype(np.float32)
    x[2, rng.choice(V, 900, replace=False)] = -np.inf
    x[3, 1:] = -np.inf  # one survivor
    x[4] = 0.0  # flat: the whole entropy
    x[5, 0] = 300.0  # the rest underflow: no entropy
    temperature = np.asarray([0.8, 1.0, 0.7, 1.0, 0.5, 0.5, 1.2, 0.9, 1.0], np.float32)
    delta = np.asarray([0.5, 0.0, 0.3, 0.5, 0.2, 1.0, 2.0, 0.4, 0.25], np.float32)
    exponent = np.asarray([1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.0, 3.0], np.float32)
    p = params(b, temperature=temperature, dynatemp_range=delta, dynatemp_exponent=exponent)
    got, top = map(np.asarray, smp.dynamic_temperature(jnp.asarray(x / 0.5), jnp.full(b, 0.5, np.float32), p))
    assert np.array_equal(top, (x / 0.5).max(axis=1))
    want = [dynatemp_reference(x[i], temperature[i], delta[i], exponent[i]) for i in range(b)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[1] == 1.0 and got[3] == 1.0 and got[4] == pytest.approx(0.7) and got[5] == 0.0
    assert got[7] == pytest.approx(1.3)  # exponent 0: the high end


def test_dynamic_temperature_through_sample_on_every_variant():
    """Through `sample`, over 6 steps: each dynamic-temperature row draws the inverse-CDF token (at its own uniform
    number) of its survivors (top_k's, all, min_p's) rescaled to llama.cpp's temperature (one past float32's range:
    uniform over top_k's, never an excluded token); a row whose temperature falls to 0 draws its largest survivor; a
    greedy row draws the argmax; `select` draws as `cond`, and neither
    `plain` nor `lean` takes such a row."""
    rng = np.random.default_rng(32)
    b, steps = 6, 6
    rows = dict(temperature=[0.8, 1.0, 0.6, 0.5, 0.0, 1.0], top_k=[5, 0, 0, 0, 0, 5],
                min_p=[0.0, 0.0, 0.05, 0.0, 0.0, 0.0], dynatemp_range=[0.5, 0.7, 0.4, 1.0, 0.5, 3e38],
                dynatemp_exponent=[1.0, 2.0, 0.5, 1.0, 1.0, 1.0])  # the last: a temperature past float32's range
    p, init = _keyed(b, **rows)
    logits = (rng.standard_normal((steps, b, V)) * 2).astype(np.float32)
    logits[:, 3, 17] = 400.0  # the others' probabilities underflow: no entropy, temperature 0
    want, _, _ = _steps("cond", logits, p, init)
    got, _, text = _steps("select", logits, p, init)
    for w, g in zip(want, got):
        jax.tree.map(np.testing.assert_array_equal, w, g)
    assert "stablehlo.case" not in text
    state = init
    for step, out in enumerate(want):
        u, _ = smp.uniforms(state.key, state.step)
        state = dataclasses.replace(state, step=state.step + 1)
        for i in (0, 1, 2, 3, 5):
            t0, z = rows["temperature"][i], logits[step, i].astype(np.float64)
            zt = z / t0
            keep = np.ones(V, bool)
            if rows["top_k"][i]:
                keep &= zt >= np.sort(zt)[-rows["top_k"][i]]
            keep &= zt - zt.max() >= np.log(max(rows["min_p"][i], 1e-38))
            t = dynatemp_reference(np.where(keep, z, -np.inf), t0, rows["dynatemp_range"][i],
                                   rows["dynatemp_exponent"][i])
            kept = np.flatnonzero(keep)
            if t <= 0:
                assert out.token[i] == np.argmax(z), (step, i)
                continue
            q = np.exp((z[kept] - z[kept].max()) / t)
            q /= q.sum()
            assert out.token[i] == kept[min(int(np.sum(np.cumsum(q) <= u[i])), len(kept) - 1)], (step, i, t)
        assert out.token[4] == np.argmax(logits[step, 4])
    neutral = {k: v[0] for k, v in smp.neutral_params(1, V).items()}
    row = {**neutral, "dynatemp_range": 0.5}
    assert not smp.is_plain(row) and not smp.is_lean(row)
    assert smp.is_plain({**row, "temperature": 0.0}) and smp.is_lean({**row, "temperature": 0.0})


def bad_words_reference(logits, sequences, output):
    """vLLM's `NoBadWordsLogitsProcessor` written out: a word of one token is never drawn; a longer one's last
    token is not drawn where the output's last tokens are its others."""
    z = logits.copy()
    for seq in sequences:
        if len(seq) == 1 or (len(seq) - 1 <= len(output) and list(output[len(output) - len(seq) + 1:]) == seq[:-1]):
            z[seq[-1]] = -np.inf
    return z


def test_bad_words_of_several_tokens_match_vllm_written_out():
    """Bad words of 2 to `BAD_TOKENS` tokens, right-aligned in a row's `bad_words`: over 8 greedy steps whose logits
    lead toward the words, each row draws vLLM's choice; a word's prefix in the prompt (before `step`) does not
    count, one at the end of the output does."""
    rng = np.random.default_rng(24)
    b, steps = 4, 8
    words = [[[5, 6], [6, 5, 6]], [[9, 9]], [], [list(range(1, 9))]]
    ids = np.zeros((b, smp.MAX_BAD, smp.BAD_TOKENS), np.int32)
    lengths = np.zeros((b, smp.MAX_BAD), np.int32)
    for i, seqs in enumerate(words):
        for j, s in enumerate(seqs):
            ids[i, j, smp.BAD_TOKENS - len(s):], lengths[i, j] = s, len(s)
    prompt = [[5], [9], [5], [7]]  # a word's prefix in the prompt: not the output's
    p = params(b, temperature=[0.0] * b, bad_words=ids, bad_len=lengths)
    state = dataclasses.replace(smp.init_state(b, V), history=jnp.asarray(np.stack([smp.history_row(t)
                                                                                   for t in prompt])))
    logits = (rng.standard_normal((steps, b, V)) * 0.1).astype(np.float32)
    for step in range(steps):  # each row's first and second choices at each step
        for i, (first, second) in enumerate([(5, 6) if step % 2 == 0 else (6, 5), (9, 4), (6, 5), (step + 1, 30)]):
            logits[step, i, first] += 10.0
            logits[step, i, second] += 9.0
    outs, _, _ = _steps("cond", logits, p, state)
    banned = [0] * b
    for i in range(b):
        out = []
        for step in range(steps):
            z = bad_words_reference(logits[step, i], words[i], out)
            banned[i] += int(np.argmax(z) != np.argmax(logits[step, i]))
            assert outs[step].token[i] == np.argmax(z), (i, step, out)
            out.append(int(outs[step].token[i]))
    assert banned[0] >= 3 and banned[1] >= 3 and banned[2] == 0 and banned[3] == 1, banned
