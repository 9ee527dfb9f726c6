"""The flat step (issue 21, item 1): an engine step's prompts, prompt chunks and the running choices' next tokens in
one forward pass over a flat batch of tokens (`paged.Flat`, `Runner.prefill_flat`), against today's separate
prefill and decode calls: the same logits and pool pages for every family's attention (plain, q/k norms, windows
with soft-capping, sinks, latent), through the XLA reference and the `pallas-gpu` kernel (interpreted); and through
the engine, the same tokens for a mix of requests, the running streams getting a token every step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: F401  (before transformers)

from engine import Engine, RunnerConfig, SamplingParams
from engine.runner import kv_bytes_per_token
from models import Model, ModelConfig, build, init_params
from models.backends import paged
from models.sharding import make_mesh
from test_models import _small
from test_moe import _config

pytestmark = pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)

PS = 4  # tokens per page: chunks start mid-page and cross pages
A = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12]  # 12 tokens cached; its next token decodes (a rider)
B = list(range(30, 51))  # 9 tokens cached, then a chunk of 12 from position 9
C = [200, 100, 50, 25, 12, 6, 3]  # a fresh prompt


ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
        "gpt-oss": "GptOssForCausalLM", "deepseek-v3": "DeepseekV3ForCausalLM"}


def _cfg(kind: str, **extra) -> ModelConfig:
    hf = _config(kind) if kind in ("gpt-oss", "deepseek-v3") else _small(kind)
    return ModelConfig.from_hf(hf.to_dict() | {"architectures": [ARCH[kind]], **extra})


@pytest.mark.parametrize("kind,attention", [("llama", "xla"), ("gemma3", "xla"), ("gpt-oss", "xla"),
                                            ("deepseek-v3", "xla"), ("llama", "pallas-gpu"), ("qwen3", "pallas-gpu")])
def test_a_flat_batch_gives_the_logits_and_pages_of_separate_calls(kind, attention):
    """A decode row, a chunk starting mid-page after cached tokens, a fresh prompt and padding in one flat batch:
    each sequence's last logits and every position it wrote equal those of separate calls (a decode, and a prefill
    of the chunk beside the prompt)."""
    cfg = _cfg(kind)
    ref, flat = build(cfg, "xla"), build(cfg, attention)
    params = init_params(ref, 0)
    n = 6  # pages per table: 24 positions
    ta, tb, tc = (jnp.asarray([1 + i * n + np.arange(n)], jnp.int32) for i in range(3))
    call = jax.jit(ref.apply)  # one program per call's shapes (eagerly, thousands of small ones)
    rows = lambda *r: jnp.asarray(np.array(r, np.int32))  # noqa: E731
    # A's 12 tokens cached, and B's first 9 (its 3 more are written again, the same, by its chunk)
    _, cache = call(params, rows(A, B[:12]), rows(range(12), range(12)), jnp.concatenate([ta, tb]),
                    paged.KVCache.zeros(cfg, 1 + 3 * n, PS), rows(11, 11))
    decoded, split = call(params, rows([77]), rows([12]), ta, cache)
    prefilled, split = call(params, rows(B[9:], C + [0] * 5), rows(range(9, 21), range(12)), jnp.concatenate([tb, tc]),
                            split, rows(11, 6))
    lengths = np.array([1, 12, 7, 0], np.int32)
    tokens = np.array([77, *B[9:], *C, 0, 0, 0, 0], np.int32)  # 4 padding tokens: the last sequence's (empty)
    owner = np.repeat(np.arange(4), [1, 12, 7, 4]).astype(np.int32)
    positions = np.concatenate([[12], np.arange(9, 21), np.arange(7), np.zeros(4)]).astype(np.int32)
    tables = jnp.concatenate([ta, tb, tc, jnp.zeros((1, n), jnp.int32)])
    layout = paged.Flat(tables, jnp.asarray(owner), rows(12, 9, 0, 0), jnp.asarray(lengths),
                        tables[owner, positions // PS])
    logits, got = jax.jit(flat.apply)(params, jnp.asarray(tokens)[None], jnp.asarray(positions)[None], layout,
                                      cache, jnp.asarray(np.cumsum(lengths) - 1))
    want = np.concatenate([np.asarray(decoded), np.asarray(prefilled)])
    np.testing.assert_allclose(np.asarray(logits[:3]), want, atol=2e-5, rtol=1e-4)
    per_layer = got.k.shape[1] // cfg.num_layers  # every position written: A's 13, B's 21, C's 7 (not its padding)
    pages, slots = zip(*[(int(t[0, p // PS]), p % PS) for t, m in ((ta, 13), (tb, 21), (tc, 7)) for p in range(m)])
    at = (np.arange(cfg.num_layers)[:, None] * per_layer + np.asarray(pages)[None], np.asarray(slots)[None])
    for x, y in ((got.k, split.k), (got.v, split.v)):
        np.testing.assert_allclose(np.asarray(x[:, at[0], at[1]]), np.asarray(y[:, at[0], at[1]]), atol=1e-5,
                                   rtol=1e-5)


def _tiny(flat: bool, draft: bool = False) -> Engine:
    cfg = _cfg("llama", max_position_embeddings=1024)
    module = build(cfg)
    model = Model("tiny", cfg, module, init_params(module, 0), make_mesh(1), None, {}, (), "random")
    # 5 slots over 896 tokens in pages of 4 (a rider often starts a page): room for a 700-token and a 100-token
    # prompt beside three short streams, not for the streams' growth (preemption); with `draft`, the model drafts for
    # itself (its pool's pages out of the same budget)
    per_token = kv_bytes_per_token(model) * (2 if draft else 1)
    rc = RunnerConfig(max_num_seqs=5, max_model_len=768, kv_cache_gb=896 * per_token / (1 << 30),
                      page_size=PS, decode_steps=4, decode_batch_sizes=(5,), flat_step=flat, draft_tokens=4)
    return Engine(model, rc, draft=model if draft else None)


def test_the_engine_gives_the_same_tokens_with_a_flat_step_and_its_streams_advance_every_step():
    """Three streams decode (greedy, and seeded with n = 2) while a 700-token prompt and a 100-token one arrive.
    With the flat step the chunks and the streams' next tokens are one call per step (no rectangular prefill
    compiled; the first step's tokens exceed the largest bucket: two calls), each stream gets a token at every step
    meanwhile, and the short prompt's second token, drawn as a rider, ends it. Then the streams outgrow the pool:
    the newest is preempted and recomputed through the flat step while the others ride. Every request's tokens
    equal those of separate calls, and the flat programs are one per token bucket, each a warm-up shape."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 256, n).tolist() for n in (20, 9, 700, 100)]
    params = [SamplingParams(temperature=0, max_tokens=400, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=300, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=1, max_tokens=2, ignore_eos=True)]
    outs = {}
    for flat in (False, True):
        eng = _tiny(flat)
        calls = []
        call = eng.runner._flat_call
        eng.runner._flat_call = lambda seqs, n: (calls.append(n), call(seqs, n))[1]
        reqs = [eng.make_request(p, sp) for p, sp in zip(prompts, params)]
        for r in reqs[:2]:
            eng.add(r)
        eng.step()  # the two short prompts prefilled, their first tokens drawn
        eng.step()
        long, short = reqs[2:]
        eng.add(long)
        eng.add(short)
        seen, splits, resumed, short_slot, rode = [], 0, 0, None, []
        while eng.has_work():
            before, waiting, short_slot = len(calls), len(eng.sched.resumes), short.choices[0].slot
            chunking = not long.choices[0].token_ids
            eng.step()
            splits += len(calls) - before > 1
            resumed += len(eng.sched.resumes) < waiting and bool(eng.riders)  # a resume prefilled, others riding
            if chunking:
                seen.append(len(reqs[0].choices[0].token_ids))
            if short.choices[0].finish_reason and short_slot >= 0:  # its last token was drawn riding, read back a
                assert not flat or short_slot in rode + eng.riders  # step later (or in the step, reading back first)
            rode = list(eng.riders)
        outs[flat] = [[c.token_ids for c in r.choices] for r in reqs]
        assert eng.sched.preemptions > 0 and len(short.choices[0].token_ids) == 2
        if flat:
            # a chunk a step, the stream a token each; the long prompt's first token is read back the step after
            assert len(seen) == 3 and seen[2] == seen[1] + 1 == seen[0] + 2
            assert splits and resumed and eng.rode > 0
            assert not eng.runner._prefill.exes  # no rectangular prefill compiled; a flat program per token bucket
            assert {key[0][3][0][0] for key in eng.runner._flat.exes} <= set(eng.runner.flat_buckets)
            assert {job[1][3].shape[0] for job in eng.runner.warm_jobs() if job[0] is eng.runner._flat} == set(
                eng.runner.flat_buckets)  # and the warm-up compiles them all
    assert outs[True] == outs[False]


def test_echo_prefills_take_warm_up_shapes_and_score_a_chunked_prompt():
    """Prompt logprobs (echo) prefill one prompt's chunks a call beside the flat step: every shape they take is one
    the warm-up names (a long prompt's later chunk padded to a whole chunk, where the table's width follows its
    start: one program a width), so a scoring request compiles nothing mid-serve; a chunked prompt's logprobs are the
    full-sequence forward pass's."""
    from engine.compile import shape_key
    from helpers import our_logits

    eng = _tiny(True)
    runner = eng.runner
    prompts = [np.random.default_rng(7).integers(1, 256, n).tolist() for n in (1, 3, 100, 600)]
    reqs = [eng.make_request(p, SamplingParams(max_tokens=0, echo=True, logprobs=True)) for p in prompts]
    for r in reqs:
        eng.add(r)
    while eng.has_work():
        eng.step()
    warm = {shape_key(args, statics) for fn, args, statics in runner.warm_jobs() if fn is runner._prefill}
    used = set(runner._prefill.exes)
    assert len(used) == 5 and used <= warm  # sizes 1, 16, 128 and 512 from 0; the second chunk's 88 as 512 at 512
    assert runner.chunk == 512 and not runner._reads_by_length(runner.chunk)
    ids = prompts[-1]
    logits = our_logits(eng.model.module, eng.model.params, [ids])[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    chosen = reqs[-1].prompt_logprobs[0]
    assert len(chosen) == len(ids)
    np.testing.assert_allclose(chosen[:-1], [ref[j, ids[j + 1]] for j in range(len(ids) - 1)], atol=1e-4)


@pytest.mark.parametrize("full", [False, True])
def test_with_ngram_drafting_the_warm_up_names_verify_at_decode_widths(full):
    """With n-gram drafting the warm-up compiles verify at each batch size for decode's table widths: the shortest,
    or every attended length (`full`, or on an accelerator), so a draft verified at a longer context compiles
    nothing mid-serve."""
    import dataclasses

    from engine.runner import Runner

    tiny = _tiny(True).runner
    runner = Runner(tiny.model, dataclasses.replace(tiny.rc, ngram=True))
    jobs = runner.warm_jobs(full)
    w, ps = runner.rc.draft_tokens + 1, runner.page_size
    decode = {(job[1][4].shape[0], job[1][7].shape[1] * ps) for job in jobs if job[0] is runner._decode}
    verify = {(job[1][4].shape[0], job[1][8].shape[1]) for job in jobs if job[0] is runner._verify}
    assert verify == {(rows, -(-(w + attend) // ps)) for rows, attend in decode}
    assert len({attend for _, attend in decode}) == (len(runner.attend) if full else 1)


def test_a_draft_model_keeps_the_tokens_and_its_streams_ride_the_flat_step_while_decoding_wins():
    """The tiny model drafting for itself, with the flat step, its drafting call timed as costly: the engine verifies
    first (untimed), then decodes and probes now and then, and between probes the streams ride the prompts' flat
    steps as without a draft model. Every request's tokens equal those without it."""
    rng = np.random.default_rng(6)
    prompts = [rng.integers(1, 256, n).tolist() for n in (20, 9, 300)]
    params = [SamplingParams(temperature=0, max_tokens=120, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=4, max_tokens=120, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    outs = {}
    for draft in (False, True):
        eng = _tiny(True, draft)
        if draft:
            eng.timing[("draft", 5)] = 10.0  # seconds: a verify round costs more than it can give
        reqs = [eng.make_request(p, sp) for p, sp in zip(prompts, params)]
        for r in reqs[:2]:
            eng.add(r)
        for _ in range(30):
            eng.step()
        if draft:  # the probes so far are counted below; none while the prompt is prefilled, whose flat steps then
            eng.probe_s = math.inf  # carry the streams (when one is due goes by this host's timings, not counted)
        eng.add(reqs[2])  # a prompt while the streams decode: they ride its flat steps
        while eng.has_work():
            eng.step()
        outs[draft] = [[c.token_ids for c in r.choices] for r in reqs]
        if draft:
            assert eng.verifies >= 1 and eng.draft.calls >= 2 and eng.declined > 0  # verified, then probes
            assert eng.rode > 0 and eng.ahead > 0
    assert outs[True] == outs[False]
