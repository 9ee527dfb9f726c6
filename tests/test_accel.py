"""The accelerator path on CPU: Pallas decode kernels (interpret mode) against the XLA reference, backend choice,
bfloat16 against float32, and scanned layers against unrolled ones."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch  # noqa: F401  (before transformers)

from helpers import our_logits
from conftest import device_flags
from models import ModelConfig, build, init_params, load_model, stack_layers
from models.layers.causal_lm import layer_groups
from models.backends import paged
from models.backends import default_backend, resolve_backend

pytestmark = pytest.mark.quick_compile  # kernels on small inputs, tiny random models: XLA optimizations off (conftest)

# (heads, kv heads, head dim) of each family's GQA, small: Llama-3 8B (32/8), SmolLM2 (9/3), Qwen2.5-0.5B (14/2),
# Gemma 3 270M (4/1), multi-head (4/4).
GQA = [(8, 2, 64), (9, 3, 64), (14, 2, 64), (4, 1, 128), (4, 4, 32)]
KERNELS = ["cpu", "pallas-gpu", "pallas-tpu"]


def _kernel(name):
    from models.backends import cpu_attention, pallas_gpu, pallas_tpu

    return {"cpu": cpu_attention, "pallas-gpu": pallas_gpu, "pallas-tpu": pallas_tpu}[name]


# The kernels and their reference run jitted, one program a shape: eagerly, each of their operations (an interpreted
# kernel's too) compiled on its own, hundreds of small programs a test (these tests: 126 -> 58 s with cold caches).
reference = jax.jit(paged.reference)
write = jax.jit(paged.write)


def jitted(f, *static: str):
    """`f` jitted with the keyword arguments `static` (a kernel's `interpret`, block sizes) taken as constants."""
    return jax.jit(f, static_argnames=static)


def _pool(rng, kvh, d, layers=2, pages=24, ps=16):
    shape = (kvh, layers * pages, ps, d)
    return jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)


def _run_script(code: str, *args: str, devices: int = 0) -> dict:
    """Run `code` in a fresh Python process (its own caches and counters; `devices` virtual CPU devices) and return
    the JSON object its last line prints."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    if devices:
        env["XLA_FLAGS"] = device_flags(devices)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("h,kvh,d", GQA)
def test_decode_kernel_matches_reference(kernel, h, kvh, d):
    rng = np.random.default_rng(h * 100 + kvh)
    ps, pages, layers, n = 16, 24, 2, 8
    k, v = _pool(rng, kvh, d, layers, pages, ps)
    lengths = np.array([1, 15, 16, 17, 33, 128], np.int32)  # one token, both sides of page boundaries, all pages
    b = len(lengths)
    layer = 1  # the second layer's pages: the table carries its offset
    table = np.stack([layer * pages + 1 + rng.permutation(pages - 1)[:n] for _ in range(b)]).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    scale = d ** -0.5
    want = reference(q, k, v, jnp.asarray(table), jnp.asarray(lengths - 1)[:, None], scale)
    got = jitted(_kernel(kernel).decode, "interpret")(q[:, 0] * scale, k, v, jnp.asarray(table), jnp.asarray(lengths),
                                                      interpret=True)
    # The TPU kernel's products run at the MXU's default precision (bfloat16 inputs), in its interpreter too.
    tol = dict(atol=2e-2, rtol=1e-2) if kernel == "pallas-tpu" else dict(atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got).reshape(b, 1, h * d), np.asarray(want), **tol)
    tiny = np.finfo(np.float32).tiny
    assert np.float32(tiny) / np.float32(4) > 0  # loading a kernel left the process's subnormals alone


def test_gpu_kernel_splits_only_few_rows_and_matches_the_reference_unsplit():
    """`pallas-gpu` splits a sequence's pages only while rows x KV heads are few; 33 rows of 8 KV heads take one
    partition (the kernel walks it in blocks) of a 12-page table, padded to 16 (blocks of pages are powers of two
    for Triton), in Pallas' interpreter, against `paged.reference`."""
    from models.backends import pallas_gpu

    assert pallas_gpu.splits_for(1, 8, 64) == 16 and pallas_gpu.splits_for(16, 8, 64) == 2
    assert pallas_gpu.splits_for(256, 8, 64) == pallas_gpu.splits_for(33, 8, 8) == 1
    rng = np.random.default_rng(7)
    h = kvh = 8
    d, ps, pages, n, b = 16, 16, 40, 12, 33
    k, v = _pool(rng, kvh, d, 1, pages, ps)
    lengths = rng.integers(1, n * ps + 1, b).astype(np.int32)
    table = np.stack([1 + rng.permutation(pages - 1)[:n] for _ in range(b)]).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    want = reference(q, k, v, jnp.asarray(table), jnp.asarray(lengths - 1)[:, None], d ** -0.5)
    got = jitted(pallas_gpu.decode, "interpret")(q[:, 0] * d ** -0.5, k, v, jnp.asarray(table), jnp.asarray(lengths),
                                                 interpret=True)
    np.testing.assert_allclose(np.asarray(got).reshape(b, 1, h * d), np.asarray(want), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("h,kvh,d", GQA)
def test_gpu_row_gather_kernel_matches_the_reference(h, kvh, d, monkeypatch):
    """`pallas_gpu.decode_rows` (interpreted) against `paged.reference`: rows of one key, both sides of page
    boundaries and the whole table, over a second layer's pages, with its default splits and with splits, blocks of
    keys smaller than a page and larger, that do not divide the table (a split past a row's length is empty); and
    through `decode` once a plan names it for the batch's size and pool (`pallas_gpu.use`)."""
    from models.backends import pallas_gpu

    rng = np.random.default_rng(h + kvh)
    ps, pages, layers, n = 16, 24, 2, 7
    k, v = _pool(rng, kvh, d, layers, pages, ps)
    lengths = np.array([1, 15, 16, 17, 40, 112], np.int32)
    b = len(lengths)
    table = jnp.asarray(np.stack([pages + 1 + rng.permutation(pages - 1)[:n] for _ in range(b)]), jnp.int32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    want = np.asarray(reference(q, k, v, table, jnp.asarray(lengths - 1)[:, None], d ** -0.5))
    for splits, keys in ((None, pallas_gpu.ROW_KEYS), (3, 8), (2, 32)):
        got = jitted(pallas_gpu.decode_rows, "interpret", "splits", "keys")(
            q[:, 0] * d ** -0.5, k, v, table, jnp.asarray(lengths), interpret=True, splits=splits, keys=keys)
        np.testing.assert_allclose(np.asarray(got).reshape(b, 1, h * d), want, atol=2e-5, rtol=1e-4,
                                   err_msg=f"splits {splits}, keys {keys}")
    monkeypatch.setattr(pallas_gpu, "_tuned", {})
    pallas_gpu.use(k, {b: pallas_gpu.DecodeChoice("rows", 32, 4, 2)})  # `decode` runs it when chosen
    assert pallas_gpu.choice_for(b, k).kernel == "rows"
    assert pallas_gpu.choice_for(b + 1, k) == pallas_gpu.choice_for(b, k.astype(jnp.bfloat16)) == pallas_gpu.DEFAULT
    got = pallas_gpu.decode(q[:, 0] * d ** -0.5, k, v, table, jnp.asarray(lengths), interpret=True)
    np.testing.assert_allclose(np.asarray(got).reshape(b, 1, h * d), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("h,kvh,d", [(8, 2, 64), (9, 3, 64)])
def test_every_decode_choice_the_tuner_may_pick_matches_the_reference(h, kvh, d):
    """Each of `pallas_gpu.CHOICES` (either kernel; blocks, splits, warps and stages) through `decode`, interpreted,
    against `paged.reference`: rows of one key, both sides of page boundaries and the whole table."""
    from models.backends import pallas_gpu

    rng = np.random.default_rng(h * kvh)
    ps, pages, n = 16, 40, 9
    k, v = _pool(rng, kvh, d, 1, pages, ps)
    lengths = np.array([1, 16, 17, 70, 144], np.int32)
    b = len(lengths)
    table = jnp.asarray(np.stack([1 + rng.permutation(pages - 1)[:n] for _ in range(b)]), jnp.int32)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    want = np.asarray(reference(q, k, v, table, jnp.asarray(lengths - 1)[:, None], d ** -0.5))
    assert len(set(pallas_gpu.CHOICES)) == len(pallas_gpu.CHOICES) > 5
    for choice in pallas_gpu.CHOICES:
        got = jitted(pallas_gpu.decode, "interpret", "choice")(q[:, 0] * d ** -0.5, k, v, table, jnp.asarray(lengths),
                                                               interpret=True, choice=choice)
        np.testing.assert_allclose(np.asarray(got).reshape(b, 1, h * d), want, atol=2e-5, rtol=1e-4,
                                   err_msg=str(choice))


def test_the_attention_kernels_are_tuned_once_per_card_and_shape_and_the_programs_run_their_choices(
        tmp_path, monkeypatch, caplog):
    """A runner with `tune_kernels` times every decode choice at each batch size from `TUNE_ROWS` on and every
    `ragged` choice over two flat steps, every slot's next token beside a chunk and beside a prompt budget (here
    interpreted, the times made up: each faster than the one before), keeps the fastest in the program store and
    installs them: `decode` then traces the chosen kernel for that batch size and pool (its Triton call's name,
    lowered for CUDA), upstream's defaults for other sizes, and `ragged` the settings chosen for the fewest tuned
    tokens holding its batch's, the largest's past them (its warps, lowered). A runner without tuning installs the
    defaults for its pool; a second runner of the same shapes takes the kept plan without timing anything."""
    import logging

    from jax import export

    from engine import RunnerConfig
    from engine import compile as aot
    from engine.runner import Runner, TUNE_ROWS
    from models import Model
    from models.backends import pallas_gpu
    from models.sharding import make_mesh

    monkeypatch.setitem(aot._store, "dir", str(tmp_path))
    monkeypatch.setattr(pallas_gpu, "_tuned", {})
    timed = []
    monkeypatch.setattr(pallas_gpu, "_seconds", lambda exe, args: timed.append(exe) or 1 / len(timed))
    cfg = ModelConfig.from_hf(_LLAMA)
    module = build(cfg, "pallas-gpu")
    model = Model("tiny", cfg, module, init_params(module, 0), make_mesh(1), None, {}, (), "random")
    rc = RunnerConfig(max_num_seqs=32, max_model_len=64, kv_cache_gb=0.01, decode_batch_sizes=(8, 16),
                      max_prefill_tokens=128, tune_kernels=True)
    with caplog.at_level(logging.INFO, logger="sparkler.engine"):
        first = Runner(model, rc)
    assert sorted(first.decode_plan) == [16, 32] and TUNE_ROWS == 16  # 8 rows: upstream's defaults
    # every decode choice compiled and timed at both sizes, every ragged choice at both flat steps: 32 rows beside
    # a 64-token chunk (96, in the 128-token bucket) and beside the 128-token budget (160, the largest)
    assert first.flat_buckets == (64, 128, 160) and sorted(first.ragged_plan) == [128, 160]
    timings = 2 * len(pallas_gpu.CHOICES) + 2 * len(pallas_gpu.RAGGED_CHOICES)
    assert len(timed) == timings
    assert all(c == pallas_gpu.CHOICES[-1] != pallas_gpu.DEFAULT for c in first.decode_plan.values())  # timed last
    assert all(c == pallas_gpu.RAGGED_CHOICES[-1] != pallas_gpu.RAGGED_DEFAULT for c in first.ragged_plan.values())
    pool = first.cache.k
    assert pallas_gpu.choice_for(16, pool) == first.decode_plan[16]
    assert pallas_gpu.choice_for(8, pool) == pallas_gpu.DEFAULT
    assert pallas_gpu.ragged_choice_for(pool, 64) == first.ragged_plan[128]
    said = [r.getMessage() for r in caplog.records if "attention plan" in r.getMessage()]
    assert len(said) == 1 and "timed on this card" in said[0]
    for n in (128, 160):
        assert any(f"flat attention over {n} tokens" in r.getMessage() for r in caplog.records)
    untuned = Runner(model, dataclasses.replace(rc, tune_kernels=False))
    assert untuned.decode_plan == {} and pallas_gpu.choice_for(16, pool) == pallas_gpu.DEFAULT
    assert untuned.ragged_plan == {} and pallas_gpu.ragged_choice_for(pool, 64) == pallas_gpu.RAGGED_DEFAULT

    plan = {16: pallas_gpu.DecodeChoice("rows", 32, 4, 3), 32: pallas_gpu.DEFAULT}  # as if the card had said so
    ragged = {128: pallas_gpu.RaggedChoice(rows=16, keys=128, warps=2), 160: pallas_gpu.RaggedChoice(rows=128, warps=8)}
    (path,) = tmp_path.glob("*.json")
    with open(path, "w") as f:
        json.dump({"decode": {str(b): dataclasses.asdict(c) for b, c in plan.items()},
                   "ragged": {str(n): dataclasses.asdict(c) for n, c in ragged.items()}}, f)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparkler.engine"):
        second = Runner(model, rc)
    assert second.decode_plan == plan and second.ragged_plan == ragged
    assert len(timed) == timings  # nothing timed again
    assert any("kept from before" in r.getMessage() for r in caplog.records)
    like = lambda *shape: jax.ShapeDtypeStruct(shape, pool.dtype)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for rows, name in ((16, 'name = "paged_decode_rows"'), (32, 'name = "paged_attention_'),
                       (8, 'name = "paged_attention_')):
        text = export.export(jax.jit(pallas_gpu.decode), platforms=["cuda"], disabled_checks=unchecked)(
            like(rows, cfg.num_heads, cfg.head_dim), like(*pool.shape), like(*pool.shape), i32(rows, 4),
            i32(rows)).mlir_module()
        assert name in text, rows
    def warps(pooled, tokens: int = 64) -> list[str]:  # a program traced anew, as each runner's are, calling `ragged`
        text = export.export(jax.jit(lambda *a: pallas_gpu.ragged(*a)), platforms=["cuda"], disabled_checks=unchecked)(
            like(tokens, cfg.num_heads, cfg.head_dim), like(*pooled.shape), like(*pooled.shape), i32(4, 4), i32(4),
            i32(4)).mlir_module()
        return re.findall(r"num_warps = (\d+)", text)

    other = jax.ShapeDtypeStruct((pool.shape[0], pool.shape[1] + 1, *pool.shape[2:]), pool.dtype)
    assert warps(pool) == ["2"] and warps(other) == ["4"]  # 64 tokens: the 128-token step's, over this pool only
    assert warps(pool, 160) == warps(pool, 256) == ["8"] and warps(other, 160) == ["4"]  # past 128: the largest's
    pallas_gpu.use(pool, plan, {128: pallas_gpu.RaggedChoice(rows=32, warps=1)})  # installed after a trace: traced
    assert warps(pool) == warps(pool, 160) == ["1"]


def test_tuning_times_each_choice_on_the_pool_and_picks_the_fastest():
    """`pallas_gpu.tune` (interpreted here) times every choice it can compile at each batch size and picks the one
    that took least; a choice that cannot be built is left out, and where none can, upstream's defaults run."""
    from models.backends import pallas_gpu

    k, v = _pool(np.random.default_rng(0), 2, 32, 1, 24, 16)
    refused = pallas_gpu.DecodeChoice("rows", 0, 4, 2)  # no keys a step: the kernel cannot be built
    choices = (pallas_gpu.DEFAULT, pallas_gpu.DecodeChoice("rows", 32, 4, 2), refused)
    plan, times, left = pallas_gpu.tune(k, v, 8, (2, 3), 40, k.dtype, choices=choices, interpret=True)
    assert sorted(plan) == [2, 3] and all(set(times[b]) == set(choices[:2]) for b in plan)
    assert all(t > 0 for b in plan for t in times[b].values())
    assert all(plan[b] == min(times[b], key=times[b].get) for b in plan)
    assert left == {refused: "refused by the compiler"}
    plan, times, left = pallas_gpu.tune(k, v, 8, (2,), 40, k.dtype, choices=(refused,), interpret=True)
    assert plan == {2: pallas_gpu.DEFAULT} and times == {2: {}} and set(left) == {refused}  # upstream's defaults


@pytest.mark.parametrize("pool_dtype", ["float32", "float8_e4m3fn"])
def test_tuning_leaves_out_a_choice_that_computes_wrong_on_the_card(monkeypatch, pool_dtype):
    """Before timing, `pallas_gpu.tune` checks each choice's output against `paged.reference` over random keys and
    values (here interpreted; the card's miscompilation stood in for by a `decode_rows` that is off by 5% at one
    block size, or NaN at another): the wrong ones are neither timed nor picked, however fast, and the tuner says
    why. Over a float8 pool too (the check's random keys go in as bits)."""
    from models.backends import pallas_gpu
    from models.backends.paged import pool_dtype as array_dtype, to_pool

    real = pallas_gpu.decode_rows
    off = {16: 1.05, 8: float("nan")}  # keys a block -> what the "card" multiplies the output by

    def card(*args, keys=pallas_gpu.ROW_KEYS, **kw):
        return real(*args, keys=keys, **kw) * off.get(keys, 1.0)

    monkeypatch.setattr(pallas_gpu, "decode_rows", card)
    k, v = (to_pool(x, array_dtype(pool_dtype)) for x in _pool(np.random.default_rng(1), 2, 32, 1, 24, 16))
    good = pallas_gpu.DecodeChoice("rows", 32, 4, 2)
    wrong, nan = pallas_gpu.DecodeChoice("rows", 16, 4, 2), pallas_gpu.DecodeChoice("rows", 8, 4, 2)
    timed = []
    monkeypatch.setattr(pallas_gpu, "_seconds", lambda exe, args: timed.append(exe) or 1 / len(timed))
    plan, times, left = pallas_gpu.tune(k, v, 8, (2, 3), 40, jnp.float32, choices=(good, wrong, nan),
                                        interpret=True)
    assert plan == {2: good, 3: good} and len(timed) == 2 and all(set(t) == {good} for t in times.values())
    assert set(left) == {wrong, nan} and all(why.startswith("wrong on the card") for why in left.values())
    assert "nan" in left[nan]


def test_ragged_tuning_checks_times_and_picks_at_each_flat_step_size():
    """`pallas_gpu.tune_ragged` (interpreted, the times made up: at 64 tokens each slower than the one before, at 96
    each faster) checks every choice on a mixed batch against `paged.reference` first; one whose output is off (a
    stand-in for the card's miscompilation: the kernel at 16 query rows multiplies by 1.05) is neither timed nor
    picked at any size, however fast, and the tuner says why; each size gets its own fastest of the others. Every
    `RAGGED_CHOICES` passes the check."""
    from models.backends import pallas_gpu

    real = pallas_gpu.ragged

    def card(*args, choice=None, **kw):
        return real(*args, choice=choice, **kw) * (1.05 if choice.rows == 16 else 1.0)

    def seconds(exe, args):
        timed.append(args[0].shape[0])
        return timed.count(args[0].shape[0]) ** (1 if args[0].shape[0] == 64 else -1)

    k, v = _pool(np.random.default_rng(2), 2, 32, 1, 24, 16)
    assert len(set(pallas_gpu.RAGGED_CHOICES)) == len(pallas_gpu.RAGGED_CHOICES) > 5
    wrong = pallas_gpu.RaggedChoice(rows=16, keys=32)
    choices = (*pallas_gpu.RAGGED_CHOICES[:-1], wrong, pallas_gpu.RAGGED_CHOICES[-1])
    timed = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pallas_gpu, "ragged", card)
        mp.setattr(pallas_gpu, "_seconds", seconds)
        plan, times, left = pallas_gpu.tune_ragged(k, v, 8, 4, (64, 96), 40, k.dtype, choices=choices,
                                                   interpret=True)
    assert set(left) == {wrong, pallas_gpu.RAGGED_CHOICES[4]}  # both at 16 query rows
    assert all(why.startswith("wrong on the card") for why in left.values())
    assert all(set(times[n]) == set(choices) - set(left) for n in (64, 96)) and len(timed) == 2 * (len(choices) - 2)
    assert plan == {64: pallas_gpu.RAGGED_CHOICES[0], 96: pallas_gpu.RAGGED_CHOICES[-1]}
    right = (wrong, pallas_gpu.RAGGED_CHOICES[4])  # the real kernel at those settings passes
    plan, times, left = pallas_gpu.tune_ragged(k, v, 8, 4, (96,), 40, k.dtype, choices=right, interpret=True)
    assert plan[96] in right and set(times[96]) == set(right) and not left
    plan, times, left = pallas_gpu.tune_ragged(k, v, 8, 0, (80,), 40, k.dtype, choices=right[:1], interpret=True)
    assert plan == {80: wrong} and set(times[80]) == {wrong} and not left  # chunks alone (a prefill call's)


@pytest.mark.parametrize("h,kvh,d", GQA)
def test_ragged_gpu_kernel_matches_the_reference_for_decode_rows_and_chunks_in_one_call(h, kvh, d):
    """`pallas_gpu.ragged` (interpreted) over one flat batch mixing decode rows (one query) and prefill chunks:
    chunks starting at 0, mid-page and on a page boundary, crossing pages, a sequence with no queries, padding rows
    after the last sequence, tables wider than needed, the default blocks or small ones (alternate shapes); each
    sequence against `paged.reference`."""
    from models.backends import pallas_gpu

    rng = np.random.default_rng(h * 10 + kvh)
    ps, pages = 16, 96
    lengths = np.array([1, 20, 0, 1, 37, 16, 3], np.int32)
    starts = np.array([5, 13, 0, 47, 0, 32, 64], np.int32)
    r, n = len(lengths), -(-int((starts + lengths).max()) // ps) + 1
    k_cache, v_cache = _pool(rng, kvh, d, 1, pages, ps)
    tables = jnp.asarray(1 + rng.permutation(pages - 1)[:r * n].reshape(r, n), jnp.int32)
    t = int(lengths.sum()) + 6
    q = jnp.asarray(rng.normal(size=(t, h, d)), jnp.float32)
    offsets = np.cumsum(lengths) - lengths
    want = [reference(q[None, o:o + l], k_cache, v_cache, tables[i:i + 1],
                      jnp.asarray(starts[i] + np.arange(l)[None], jnp.int32), d ** -0.5)[0]
            for i, (o, l) in enumerate(zip(offsets, lengths)) if l]
    choice = pallas_gpu.RAGGED_DEFAULT if GQA.index((h, kvh, d)) % 2 else pallas_gpu.RaggedChoice(16, 32)  # or small
    used = max(1, choice.rows // (1 << (h // kvh - 1).bit_length()))  # queries a block: a power-of-two group each
    meta, _, _, _ = pallas_gpu.blocks(jnp.asarray(starts), jnp.asarray(lengths), t, used)
    first, count, _, _ = np.asarray(meta).T  # the real blocks tile every sequence's rows once; all read in bounds
    assert sorted(r for f, c in zip(first, count) for r in range(f, f + c)) == list(range(int(lengths.sum())))
    assert (first >= 0).all() and (first < t).all()
    got = jitted(pallas_gpu.ragged, "interpret", "choice")(
        q * d ** -0.5, k_cache, v_cache, tables, jnp.asarray(starts), jnp.asarray(lengths), interpret=True,
        choice=None if choice == pallas_gpu.RAGGED_DEFAULT else choice)
    got = np.asarray(got).reshape(t, h * d)
    np.testing.assert_allclose(got[:-6], np.concatenate(want), atol=2e-5, rtol=1e-4)
    assert (got[-6:] == 0).all()


@pytest.mark.parametrize("kv", ["float8_e4m3fn", "float8_e5m2"])
def test_a_float8_pool_keeps_keys_rounded_and_saturated_and_every_path_reads_it_alike(kv):
    """`--kv-cache-dtype fp8`: keys and values written to a float8 pool (its bits in a byte-wide integer array) read
    back as their float8 rounding, large ones saturated at its largest finite value (a plain cast gives e4m3 NaN,
    which has no infinity, and e5m2 infinity); the reference over it equals the reference over a float32 pool
    holding those values, and the `pallas-gpu` kernels (interpreted; `decode` runs `decode_rows` where it would run
    upstream's, whose products take one dtype) equal the reference over the float8 pool: decode rows of one key to
    the whole table, and chunks mid-page. A write converts nothing of the pool (it scatters bits in place)."""
    from models.backends import pallas_gpu

    rng = np.random.default_rng(3)
    h, kvh, d, ps, pages, n = 8, 2, 64, 16, 48, 9
    dt, bits = jnp.dtype(kv), paged.pool_dtype(kv)
    lengths = np.array([1, 16, 17, 70, 144], np.int32)
    b = len(lengths)
    table = jnp.asarray(1 + rng.permutation(pages - 1)[:b * n].reshape(b, n), jnp.int32)  # each row its own pages
    pos = jnp.asarray(np.broadcast_to(np.arange(n * ps), (b, n * ps)), jnp.int32)
    k, v = (jnp.asarray(rng.normal(size=(b, n * ps, kvh, d)) * 3, jnp.float32) for _ in range(2))
    k = k.at[0, 0, 0, :2].set(jnp.array([1e6, -1e6]))  # past either float8 range
    k8, v8 = (write(jnp.zeros((kvh, pages, ps, d), bits), x, pos, table) for x in (k, v))
    hlo = jax.jit(paged.write, donate_argnums=0).lower(k8, k, pos, table).compile().as_text()
    whole = f"[{kvh},{pages},{ps},{d}]"  # a float8 array's scatter is computed in float16 on a CPU, the whole pool
    assert not [line for line in hlo.splitlines() if whole in line and " convert(" in line]  # converted: not bits
    back = np.asarray(paged.floats(k8), np.float32)  # its bits, as the float8 values they are
    assert k8.dtype == bits and bits.itemsize == 1 and np.isfinite(back).all()
    top = float(jnp.finfo(dt).max)
    np.testing.assert_array_equal(back[0, table[0, 0], 0, :2], [top, -top])
    rounded = np.asarray(jnp.clip(k, -top, top).astype(dt), np.float32)
    np.testing.assert_array_equal(back[:, np.asarray(table)].transpose(1, 2, 3, 0, 4).reshape(b, n * ps, kvh, d),
                                  rounded)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
    last = jnp.asarray(lengths - 1)[:, None]
    want = np.asarray(reference(q, k8, v8, table, last, d ** -0.5))
    widened = reference(q, *(paged.floats(x).astype(jnp.float32) for x in (k8, v8)), table, last, d ** -0.5)
    np.testing.assert_array_equal(want, np.asarray(widened))
    got = jitted(pallas_gpu.decode, "interpret")(q[:, 0] * d ** -0.5, k8, v8, table, jnp.asarray(lengths),
                                                 interpret=True)
    np.testing.assert_allclose(np.asarray(got).reshape(b, 1, h * d), want, atol=2e-5, rtol=1e-4)
    starts, counts = np.array([0, 13, 40], np.int32), np.array([12, 20, 1], np.int32)
    qc = jnp.asarray(rng.normal(size=(int(counts.sum()), h, d)), jnp.float32)
    got = np.asarray(jitted(pallas_gpu.ragged, "interpret")(qc * d ** -0.5, k8, v8, table[:3], jnp.asarray(starts),
                                                             jnp.asarray(counts), interpret=True)).reshape(-1, h * d)
    offsets = np.cumsum(counts) - counts
    for i, (o, c) in enumerate(zip(offsets, counts)):
        chunk = reference(qc[None, o:o + c], k8, v8, table[i:i + 1], jnp.asarray(starts[i] + np.arange(c)[None]),
                          d ** -0.5)[0]
        np.testing.assert_allclose(got[o:o + c], np.asarray(chunk), atol=2e-5, rtol=1e-4)


def test_an_engine_over_a_float8_pool_holds_more_tokens_and_serves():
    """`--kv-cache-dtype`: `fp8` names float8_e4m3fn (vLLM's), `auto` or the model's own dtype none; a float8 pool
    holds four times a float32 pool's pages in the same bytes (twice a bfloat16 one's), and an engine over it serves
    greedy requests to the end with the float32 pool's first tokens (a prompt's own keys are the chunk's, not the
    pool's) and finite logprobs."""
    from engine import Engine, RunnerConfig, SamplingParams
    from engine.runner import kv_bytes_per_token, plan_pages
    from models import Model, resolve_kv_dtype
    from models.sharding import make_mesh

    assert resolve_kv_dtype("fp8", "bfloat16") == "float8_e4m3fn" and resolve_kv_dtype("fp8_e5m2", "float32") == \
        "float8_e5m2"
    assert resolve_kv_dtype("auto", "bfloat16") == resolve_kv_dtype("bfloat16", "bfloat16") == ""
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        resolve_kv_dtype("int8", "float32")
    models = {}
    for kv in ("", "bfloat16", "float8_e4m3fn"):
        cfg = dataclasses.replace(ModelConfig.from_hf(_LLAMA), kv_dtype=kv)
        module = build(cfg, "xla")
        models[kv] = Model("tiny", cfg, module, init_params(module, 0), make_mesh(1), None, {}, (), "random")
    gb = 100 * 16 * kv_bytes_per_token(models[""]) / (1 << 30)  # 100 float32 pages
    rc = RunnerConfig(max_num_seqs=4, max_model_len=64, kv_cache_gb=gb, decode_batch_sizes=(4,))
    pages = {kv: plan_pages(m, rc) for kv, m in models.items()}
    assert pages["float8_e4m3fn"] == 2 * pages["bfloat16"] == 4 * pages[""] == 400
    prompts = [ROWS[0], ROWS[1], ROWS[0][:7]]
    outs = {}
    for kv in ("", "float8_e4m3fn"):
        eng = Engine(models[kv], rc)
        assert eng.runner.cache.k.dtype == paged.pool_dtype(kv or "float32")
        reqs = [eng.make_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1))
                for p in prompts]
        for r in reqs:
            eng.add(r)
        while eng.has_work():
            eng.step()
        outs[kv] = [r.choices[0] for r in reqs]
    for a, b in zip(outs[""], outs["float8_e4m3fn"]):
        assert len(b.token_ids) == 8 and b.token_ids[0] == a.token_ids[0] and b.finish_reason == "length"
        assert np.isfinite([lp[1] for lp in b.logprobs]).all()


def test_gpu_kernels_lower_to_triton_for_every_family_shape():
    """The `pallas-gpu` kernels pass Pallas' Triton lowering (block shapes, loads, dots: what the interpreter does
    not check) in bfloat16 for the 8B shape and each family's head groups, and every choice the decode tuner may
    time at the 8B shape's 256 rows, exported for CUDA from this CPU (XLA compiles the Triton IR to PTX only on a
    GPU)."""
    from jax import export

    from models.backends import pallas_gpu

    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    lower = export.export  # the Triton calls carry no compatibility guarantee across versions: not for storing
    unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for h, kvh, d in [(32, 8, 128), *GQA]:
        pool, t, rows, n = bf16(kvh, 1024, 16, d), 512, 16, 24
        ragged = lower(jax.jit(pallas_gpu.ragged), platforms=["cuda"], disabled_checks=unchecked)(
            bf16(t, h, d), pool, pool, i32(rows, n), i32(rows), i32(rows)).mlir_module()
        assert 'name = "ragged_paged_attention"' in ragged, (h, kvh, d)
        decode = lower(jax.jit(pallas_gpu.decode), platforms=["cuda"], disabled_checks=unchecked)(
            bf16(rows, h, d), pool, pool, i32(rows, n), i32(rows)).mlir_module()
        assert "xla.gpu.triton" in decode, (h, kvh, d)
        rows_kernel = lower(pallas_gpu.decode_rows, platforms=["cuda"], disabled_checks=unchecked)(
            bf16(rows, h, d), pool, pool, i32(rows, n), i32(rows)).mlir_module()
        assert 'name = "paged_decode_rows"' in rows_kernel, (h, kvh, d)
    for choice in pallas_gpu.CHOICES:  # each setting the tuner may time, at the 8B shape's 256 rows
        pool = bf16(8, 4096, 16, 128)
        text = lower(jax.jit(functools.partial(pallas_gpu.decode, choice=choice)), platforms=["cuda"],
                     disabled_checks=unchecked)(bf16(256, 32, 128), pool, pool, i32(256, 40), i32(256)).mlir_module()
        assert "xla.gpu.triton" in text, choice
    for choice in pallas_gpu.RAGGED_CHOICES:  # each setting `tune_ragged` may time, at a flat step of the 8B shape
        pool = bf16(8, 4096, 16, 128)
        text = lower(jax.jit(functools.partial(pallas_gpu.ragged, choice=choice)), platforms=["cuda"],
                     disabled_checks=unchecked)(bf16(2048, 32, 128), pool, pool, i32(257, 40), i32(257),
                                                i32(257)).mlir_module()
        assert f"num_warps = {choice.warps} " in text and f"num_stages = {choice.stages} " in text, choice
    for kv in ("float8_e4m3fn", "float8_e5m2"):  # `--kv-cache-dtype fp8`: bfloat16 queries, float8 pools (bits)
        pool = jax.ShapeDtypeStruct((8, 4096, 16, 128), paged.pool_dtype(kv))
        text = lower(jax.jit(pallas_gpu.decode), platforms=["cuda"], disabled_checks=unchecked)(
            bf16(256, 32, 128), pool, pool, i32(256, 40), i32(256)).mlir_module()
        assert 'name = "paged_decode_rows"' in text, kv
        text = lower(jax.jit(pallas_gpu.ragged), platforms=["cuda"], disabled_checks=unchecked)(
            bf16(512, 32, 128), pool, pool, i32(16, 24), i32(16), i32(16)).mlir_module()
        assert 'name = "ragged_paged_attention"' in text, kv


def _chunks(rng, h, kvh, d, starts, s, width, ps=16, pages=64):
    """A chunk of `s` queries per row from each of `starts`, its keys and values written to a one-layer pool of
    random pages, each row's table `width` pages of its own: `(q, k, v, k_cache, v_cache, table, positions)`."""
    b = len(starts)
    table = jnp.asarray(1 + rng.permutation(pages - 1)[:b * width].reshape(b, width), jnp.int32)
    k_cache, v_cache = _pool(rng, kvh, d, 1, pages, ps)
    positions = jnp.asarray(starts[:, None] + np.arange(s)[None], jnp.int32)
    q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kvh, d)), jnp.float32) for _ in range(2))
    k_cache, v_cache = write(k_cache, k, positions, table), write(v_cache, v, positions, table)
    return q, k, v, k_cache, v_cache, table, positions


@pytest.mark.parametrize("h,kvh,d", GQA)
def test_cpu_kernel_splits_few_rows_pages_between_threads_like_the_reference(h, kvh, d):
    """One or two rows of long contexts (fewer (row, KV head) tasks than two a thread, over 1,024 keys) run each
    task's pages in parts on XLA's threads, merged by their maxima: one query a row, and chunks whose queries end in
    the first part, across parts and at the last key, against `paged.reference`; a row with no keys gets zeros and
    the floor for its log-normaliser."""
    from models.backends import cpu_attention

    rng = np.random.default_rng(h * 10 + kvh)
    ps, pages = 16, 80
    k, v = _pool(rng, kvh, d, layers=1, pages=pages, ps=ps)
    chunk = jax.jit(functools.partial(cpu_attention.chunk, lse=True))
    for lengths in ([[1200]], [[700], [1279]], [[5, 600, 1100, 1280]], [[300, 301, 1024, 1100], [0, 0, 0, 0]]):
        lengths = np.asarray(lengths, np.int32)
        b, s = lengths.shape
        table = jnp.asarray(np.stack([rng.permutation(pages) for _ in range(b)]), jnp.int32)
        q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
        out, norm = chunk(q * d ** -0.5, k, v, table, jnp.asarray(lengths))
        live = lengths[:, 0] > 0
        want = reference(q[live], k, v, table[live], jnp.asarray(lengths[live] - 1), d ** -0.5)
        np.testing.assert_allclose(np.asarray(out[live]).reshape(want.shape), np.asarray(want), atol=2e-5,
                                   rtol=1e-4)
        assert (np.asarray(out[~live]) == 0).all() and (np.asarray(norm[~live]) < -1e29).all()


@pytest.mark.parametrize("h,kvh,d", GQA)
@pytest.mark.parametrize("s", [2, 17, 24])
def test_cpu_kernel_scores_a_chunk_like_the_reference(h, kvh, d, s):
    """A verify pass's chunk through the `cpu` kernel (S queries per row, each over its own causal length: chunks
    starting at 0, mid-page and on a page boundary, crossing pages, rows at different lengths) against
    `paged.reference`; a row past its table (a free slot) stays finite."""
    from models import backends

    assert s <= backends.CPU_CHUNK
    rng = np.random.default_rng(h * 100 + s)
    ps, starts = 16, np.array([0, 13, 32, 70])
    n = -(-(int(starts.max()) + s) // ps)
    q, k, v, k_cache, v_cache, table, positions = _chunks(rng, h, kvh, d, starts, s, n)
    want = reference(q, k_cache, v_cache, table, positions, d ** -0.5)
    attend = jax.jit(functools.partial(backends.paged_attention, "cpu"))
    got = attend(q, k, v, k_cache, v_cache, table, positions, d ** -0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    free = positions.at[-1].set(n * ps + jnp.arange(s))  # past the table's end: clamped to its pages
    assert np.isfinite(np.asarray(attend(q, k, v, k_cache, v_cache, table, free, d ** -0.5))).all()


@pytest.mark.parametrize("h,kvh,d", GQA)
@pytest.mark.parametrize("s", [32, 48])
def test_cpu_prefill_reads_the_earlier_positions_by_length_like_the_reference(h, kvh, d, s):
    """A prefill chunk through the `cpu` backend (its own keys in XLA's causal blocks, its earlier positions through
    the kernel, by length, merged by their log-normalisers): chunks starting at 0 (no earlier keys: the kernel's
    part must not count), mid-page and on a page boundary, and a call whose rows all start a prompt (the branch
    without the kernel), over a table as wide as the whole context, against `paged.reference` over the pages the
    chunk needs."""
    from models import backends

    assert s > backends.CPU_CHUNK
    rng = np.random.default_rng(h * 100 + s)
    ps = 16
    attend = jax.jit(functools.partial(backends.paged_attention, "cpu"))
    for starts in (np.array([0, 13, 32, 70]), np.zeros(4, int)):
        n = -(-(int(starts.max()) + s) // ps)
        # every row's table as wide as a 192-token context, the pages past its chunk unwritten
        q, k, v, k_cache, v_cache, table, positions = _chunks(rng, h, kvh, d, starts, s, 12)
        want = reference(q, k_cache, v_cache, table[:, :n], positions, d ** -0.5)
        got = attend(q, k, v, k_cache, v_cache, table, positions, d ** -0.5)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(gqa=st.sampled_from(GQA[:3]), s=st.sampled_from([2, 16, 24, 48]), block=st.sampled_from([8, 16]),
       ps=st.sampled_from([4, 16]), starts=st.lists(st.integers(0, 40), min_size=1, max_size=3),
       extra=st.integers(0, 2), window=st.sampled_from([0, 5]), softcap=st.sampled_from([0.0, 2.0]),
       sinks=st.booleans())
def test_prefill_attention_matches_reference(gqa, s, block, ps, starts, extra, window, softcap, sinks):
    """The chunked prefill (the chunk's own keys in causal blocks, earlier ones from the pages, merged) against the
    single-pass reference: any chunk start per row, tables wider than needed, windows, soft-capping and sinks."""
    h, kvh, d = gqa
    rng = np.random.default_rng(len(starts) * 1000 + s)
    b, pages = len(starts), 128
    k_cache, v_cache = _pool(rng, kvh, d, 1, pages, ps)
    n = -(-(max(starts) + s) // ps) + extra  # the table covers every chunk, and `extra` pages more
    table = jnp.asarray(1 + rng.permutation(pages - 1)[:b * n].reshape(b, n), jnp.int32)  # no page in two rows
    positions = jnp.asarray(np.asarray(starts)[:, None] + np.arange(s)[None], jnp.int32)
    q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kvh, d)), jnp.float32) for _ in range(2))
    k_cache, v_cache = write(k_cache, k, positions, table), write(v_cache, v, positions, table)
    sink = jnp.asarray(rng.normal(size=h) * 2, jnp.float32) if sinks else None
    args = (q, k, v, k_cache, v_cache, table, positions)  # each side one program (eagerly, hundreds of small ones)
    want = jax.jit(lambda q, k, v, kc, vc, t, p: paged.reference(q, kc, vc, t, p, d ** -0.5, softcap, window,
                                                                 sink))(*args)
    got = jax.jit(lambda *a: paged.prefill(*a, d ** -0.5, softcap, window, sink, block=block))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_backend_choice_by_platform_and_flag():
    assert default_backend("cpu") == "cpu"  # the C++ kernel (this machine has g++)
    assert resolve_backend("auto", platform="cpu") == "cpu"
    assert default_backend("gpu") == "pallas-gpu" and default_backend("cuda") == "pallas-gpu"
    assert default_backend("tpu") == "pallas-tpu"
    assert resolve_backend("auto", platform="tpu") == "pallas-tpu"
    assert resolve_backend("pallas-gpu") == "pallas-gpu"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash")
    windowed = ModelConfig.from_hf(dict(_LLAMA, architectures=["MistralForCausalLM"], sliding_window=4))
    capped = ModelConfig.from_hf(dict(_LLAMA, attn_logit_softcapping=50.0))
    assert resolve_backend("pallas-gpu", windowed) == "xla" and resolve_backend("pallas-tpu", capped) == "xla"
    sinks = dataclasses.replace(ModelConfig.from_hf(_LLAMA), attn_sinks=True)  # gpt-oss's
    assert resolve_backend("pallas-gpu", sinks) == "xla"
    d96 = ModelConfig.from_hf(dict(_LLAMA, head_dim=96))  # Triton's arrays are powers of two long
    assert resolve_backend("pallas-gpu", d96) == "xla" and resolve_backend("pallas-tpu", d96) == "pallas-tpu"
    assert build(ModelConfig.from_hf(_LLAMA), "auto").backend == default_backend(jax.default_backend())
    # The CPU kernel serves float32 pools on one tp shard: auto falls back to the reference, an explicit ask fails.
    bf16 = ModelConfig.from_hf(_LLAMA, "bfloat16")
    assert resolve_backend("auto", bf16, "cpu") == "xla" and resolve_backend("auto", None, "cpu", tp=2) == "xla"
    with pytest.raises(ValueError, match="does not split over tp"):
        resolve_backend("cpu", tp=2)
    assert resolve_backend("auto", None, "gpu", tp=2) == "xla" == resolve_backend("auto", None, "tpu", tp=4)
    with pytest.raises(ValueError, match="kernels do not split over tp"):
        resolve_backend("pallas-gpu", tp=2)
    with pytest.raises(ValueError, match="float32 models and pools only"):
        resolve_backend("cpu", bf16)
    fp8 = dataclasses.replace(ModelConfig.from_hf(_LLAMA), kv_dtype="float8_e4m3fn")  # --kv-cache-dtype fp8
    assert resolve_backend("auto", fp8, "cpu") == "xla" and resolve_backend("pallas-tpu", fp8) == "xla"
    assert resolve_backend("pallas-gpu", fp8) == "pallas-gpu"  # its own kernels widen float8 after loading it
    with pytest.raises(ValueError, match="float32 models and pools only"):
        resolve_backend("cpu", fp8)


_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)
_GEMMA = dict(_LLAMA, architectures=["Gemma3ForCausalLM"], head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0)
# A dense first layer, then MoE ones (DeepSeek's stack; test_moe checks its groups' logits against transformers)
_DENSE_THEN_MOE = dict(_LLAMA, architectures=["Qwen2MoeForCausalLM"], num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[0])
ROWS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3]]


@pytest.mark.parametrize("cfg", [_LLAMA, _GEMMA], ids=["llama", "gemma3"])
def test_scanned_layers_match_unrolled(cfg):
    c = ModelConfig.from_hf(cfg)
    unrolled, scanned = build(c, scan=False), build(c, scan=True)
    params = init_params(unrolled, 0)
    stacked = {"params": stack_layers(dict(jax.tree.map(np.asarray, params["params"])), c)}
    for a, b in zip(our_logits(unrolled, params, ROWS), our_logits(scanned, stacked, ROWS)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _equations(jaxpr) -> int:
    """Equations in a jaxpr and every jaxpr nested in it."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _equations(inner)
    return n


@pytest.mark.parametrize("cfg", [_LLAMA, _DENSE_THEN_MOE], ids=["llama", "dense-then-moe"])
def test_scanned_model_traces_one_layer_body(cfg):
    """One body per group of layers of one kind, whatever the depth (a dense layer, then MoE ones: DeepSeek's)."""
    groups = {3: ["layers_0", "layers_1-2"], 7: ["layers_0", "layers_1-6"]}
    sizes = {}
    for scan in (True, False):
        for layers in (3, 7):
            c = ModelConfig.from_hf(dict(cfg, num_hidden_layers=layers))
            if scan and cfg is _DENSE_THEN_MOE:
                assert [name for _, _, name in layer_groups(c, scan)] == groups[layers]
            m = build(c, scan=scan)
            params = jax.eval_shape(lambda: init_params(m, 0))
            cache = paged.KVCache.zeros(c, 4, 16)
            toks = jnp.zeros((1, 4), jnp.int32)
            jaxpr = jax.make_jaxpr(lambda p, ca: m.apply(p, toks, toks, jnp.ones((1, 1), jnp.int32), ca))(params,
                                                                                                           cache)
            sizes[scan, layers] = _equations(jaxpr.jaxpr)
    assert sizes[True, 3] == sizes[True, 7]  # one layer body a group, whatever the depth
    assert sizes[False, 7] > 2 * sizes[False, 3] > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_model_decode_through_a_kernel_matches_xla(kernel):
    if kernel == "pallas-tpu" and jax.default_backend() == "gpu":
        pytest.skip("the TPU kernel's interpreter inside nn.scan fails on a GPU host (flax 0.12.10, jax 0.11.2: "
                    "'broadcasted variable has a data dependency on the scan body'); it runs interpreted on CPU")
    c = ModelConfig.from_hf(_LLAMA)
    ref, ker = build(c, "xla"), build(c, kernel)
    params = init_params(ref, 0)
    ps, b = 16, 2
    table = jnp.asarray(1 + np.arange(b * 2, dtype=np.int32).reshape(b, 2))
    prompt = jnp.asarray(np.array([ROWS[0][:12], ROWS[0][3:15]], np.int32))
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (b, 12))
    cache = paged.KVCache.zeros(c, 1 + b * 2, ps)
    chunk, _ = ker.apply(params, prompt, pos, table, cache)  # a prefill chunk through the kernel's path as well
    want_chunk, cache = ref.apply(params, prompt, pos, table, cache)
    step = (jnp.asarray([[7], [9]], jnp.int32), jnp.asarray([[12], [12]], jnp.int32), table)
    want, _ = ref.apply(params, *step, cache)
    got, _ = ker.apply(params, *step, cache)
    tol = 1e-4 if kernel == "pallas-gpu" else 2e-2  # see test_decode_kernel_matches_reference
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(chunk), np.asarray(want_chunk), atol=1e-4, rtol=1e-4)


def test_a_long_embedding_in_pieces_through_the_gpu_kernel_matches_xla_whole(tmp_path, monkeypatch):
    """An embedding input past the call's budget runs in pieces (`Runner.embed_next`), each attending to the earlier
    pieces' keys in its pool through `pallas_gpu.ragged` (interpreted) on `pallas-gpu`: every pooling equals the
    input embedded whole through `xla`."""
    from engine.engine import Engine
    from engine.runner import RunnerConfig
    from models.backends import pallas_gpu
    from test_embeddings import LONG
    from test_models import _hf_model

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _hf_model("llama", str(tmp_path / "hf"))
    traced, ragged = [], pallas_gpu.ragged
    monkeypatch.setattr(pallas_gpu, "ragged", lambda *a, **k: traced.append(1) or ragged(*a, **k))
    engines = {att: Engine(load_model(str(tmp_path / "hf"), with_tokenizer=False, attention=att),
                           RunnerConfig(max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01))
               for att in ("xla", "pallas-gpu")}
    rows = [LONG, LONG[:40]]
    for mode in ("last", "mean", "cls"):
        want = engines["xla"].embed(rows, mode)
        got = engines["pallas-gpu"].embed(rows, mode, budget=32)  # 4 pieces of LONG and 2 of its first 40
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), err_msg=mode)
    assert engines["pallas-gpu"].runner._embed_piece.calls == 3 * 6 and traced


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_bfloat16_logits_match_float32(kind, tmp_path, monkeypatch):
    from test_models import _hf_model

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _hf_model(kind, str(tmp_path / "hf"))
    f32 = load_model(str(tmp_path / "hf"), dtype="float32", with_tokenizer=False)
    bf16 = load_model(str(tmp_path / "hf"), dtype="bfloat16", with_tokenizer=False)
    assert bf16.params["params"]["embed"].dtype == jnp.bfloat16
    for want, got in zip(our_logits(f32.module, f32.params, ROWS), our_logits(bf16.module, bf16.params, ROWS)):
        assert got.dtype == np.float32  # logits stay float32
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 0.05 * scale, (kind, np.abs(got - want).max(), scale)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


STARTUP = r"""
import json, sys
from engine.compile import PROGRAMS, use_caches
use_caches(sys.argv[1])
import jax
from engine import Engine, RunnerConfig, SamplingParams
from models import Model, ModelConfig, build, init_params
from models.sharding import make_mesh
cfg = ModelConfig.from_hf(json.loads(sys.argv[2]))
module = build(cfg)
model = Model("tiny", cfg, module, init_params(module, 0), make_mesh(1), None, {}, (), "random")
rc = RunnerConfig(max_num_seqs=2, max_model_len=64, kv_cache_gb=0.01, decode_batch_sizes=(2,))  # few shapes: 13
def serve(eng):
    for i in range(6):
        eng.add(eng.make_request(list(range(1, 3 + 7 * i)), SamplingParams(max_tokens=12, temperature=0.8, seed=i)))
    while eng.has_work():
        eng.step()
eng = Engine(model, rc)
eng.warmup()
compiled, loaded, saved = eng.runner.compiles, PROGRAMS["loaded"], PROGRAMS["saved"]
serve(eng)
after, saved_after = eng.runner.compiles, PROGRAMS["saved"]
lazy = Engine(model, rc)  # no warm-up: each program on its first call, from the store
serve(lazy)
print(json.dumps(dict(shapes=len(eng.runner.warm_jobs()), compiled=compiled, after=after, loaded=loaded, saved=saved,
                      saved_after=saved_after, lazy=lazy.runner.compiles, lazy_saved=PROGRAMS["saved"])))
"""


def test_warmup_compiles_each_shape_once_and_a_second_start_loads_them_without_tracing(tmp_path):
    import json

    cold, warm = (_run_script(STARTUP, str(tmp_path / "cache"), json.dumps(_LLAMA)) for _ in range(2))
    assert cold["compiled"] == cold["shapes"] > 10  # each warm-up shape traced and compiled once
    assert cold["after"] == cold["compiled"]  # short requests need nothing more
    assert cold["saved"] == cold["saved_after"] == cold["shapes"] and cold["loaded"] == 0  # each kept once
    assert warm["loaded"] == warm["shapes"] and warm["saved_after"] == 0  # the second start loads every one,
    assert warm["compiled"] == warm["after"] == 0  # and traces none
    # An engine that warms nothing up finds the warm-up's programs on its calls (an array's sharding at a call, such
    # as the sampler rows' after their first update, may be spelt otherwise than at warm-up but lies the same way)
    assert cold["lazy"] == warm["lazy"] == 0 and cold["lazy_saved"] == cold["saved_after"]


TWO_AT_ONCE = r"""
import functools, json, sys, threading
import jax, jax.numpy as jnp
from engine.compile import AOT, PROGRAMS, use_caches
use_caches(sys.argv[1])
slow = jax.jit(lambda a: functools.reduce(lambda x, i: jnp.sin(x @ x) * i, range(1, 200), a))  # ~1 s to compile
x = jnp.ones((8, 8))
gate = threading.Barrier(2)
def start():  # a process of its own would hold the same lock: flock's locks belong to each open() of the file
    gate.wait()
    AOT(slow, "slow", "claim").compile(x)
threads = [threading.Thread(target=start) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(dict(loaded=PROGRAMS["loaded"], saved=PROGRAMS["saved"])))
"""


def test_two_starts_at_once_compile_a_program_once(tmp_path):
    """Two compilations of one program at the same moment (servers or test workers starting together): one compiles
    and stores it, the other waits for it and loads it from the program store."""
    got = _run_script(TWO_AT_ONCE, str(tmp_path))
    assert got["saved"] == 1 and got["loaded"] == 1, got


ONE_OF_FOUR = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from engine.compile import AOT, PROGRAMS, use_caches
use_caches(sys.argv[1])
mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tp"))  # one of the process's four devices
x = jax.device_put(jnp.arange(4.0), NamedSharding(mesh, P()))
out = AOT(jax.jit(lambda a: a * 2), "double", "one-of-four")(x)
print(json.dumps(dict(out=out.tolist(), loaded=PROGRAMS["loaded"], saved=PROGRAMS["saved"])))
"""


def test_a_stored_program_runs_on_the_devices_it_was_compiled_for(tmp_path):
    """A program compiled for one device of four (the 1 x 1 mesh beside larger ones) loads from the program store
    onto that device, not onto all four (which fails at run time: "Expected ... to have 4 shards")."""
    runs = [_run_script(ONE_OF_FOUR, str(tmp_path / "cache"), devices=4) for _ in range(2)]
    assert runs[0] == dict(out=[0.0, 2.0, 4.0, 6.0], loaded=0, saved=1)
    assert runs[1] == dict(out=[0.0, 2.0, 4.0, 6.0], loaded=1, saved=0)


def test_a_compile_mid_serve_says_whether_the_warm_up_had_named_its_shape(caplog):
    """A call whose shape the warm-up behind serving holds but has not started compiles it itself and says so; a
    shape no warm-up named is logged as such (a GPU run reads these lines to tell a shape the warm-up misses from
    one it reached late)."""
    import logging

    from engine.compile import AOT, Background

    fn = AOT(jax.jit(lambda a: a + 1), "inc", "mid-serve-log")
    named, other = jnp.ones((3,)), jnp.ones((5,))
    background = Background([(fn, (named,), {})], yield_to=lambda: True)  # busy serving: the job never starts
    try:
        with caplog.at_level(logging.INFO, logger="sparkler.compile"):
            np.testing.assert_array_equal(fn(named), 2.0)
            np.testing.assert_array_equal(fn(other), 2.0)
    finally:
        background.cancel()
    said = [r.getMessage() for r in caplog.records if "load or compile" in r.getMessage()]
    assert len(said) == 2 and "warm-up behind serving had not reached" in said[0] and "no warm-up named" in said[1]
