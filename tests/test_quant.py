"""Quantized weights (`--quantization int8`, `int4` and `fp8`): the quality guard against float32 on the same
weights, the rounding bounds, int4's return of a Q4_1 GGUF's own values, and the bytes they take."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import our_logits
from models import load_model, quant, resolve_quantization
from models.backends import cpu_matmul

PROMPTS = ["The history of the Roman Empire spans more than a thousand years, from the founding of the city",
           'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
           "Photosynthesis is the process by which green plants"]


@pytest.fixture(scope="module")
def int8_model():
    return load_model("smollm2-135m-instruct", quantization="int8")


@pytest.fixture(scope="module")
def int4_model():
    return load_model("smollm2-135m-instruct", quantization="int4")


@pytest.fixture(scope="module")
def fp8_model():
    return load_model("smollm2-135m-instruct", quantization="fp8")


@pytest.fixture(scope="module")
def forced(llm, smollm_f32):
    """float32's own greedy continuations of `PROMPTS` (256 tokens each), and float32's logits along them. The
    default model (`llm`, quantized) drafts each continuation and one float32 pass over the rows checks every token
    at once (float32 decodes ~10 tokens/s here): a row's tokens up to its first one that is not float32's argmax
    are float32's, that token is replaced by the argmax, and the rest is drafted and checked again, until no token
    differs."""
    from engine import SamplingParams

    greedy = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)  # noqa: E731
    prompts = [smollm_f32.tokenizer.encode(text) for text in PROMPTS]
    rows = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, llm.generate(prompts, greedy(256)))]
    ref, check = [None] * len(rows), list(range(len(rows)))
    for _ in range(256):
        redo = {}
        for i, logits in zip(check, our_logits(smollm_f32.module, smollm_f32.params, [rows[i] for i in check])):
            ref[i], p = logits, prompts[i]
            want = logits[len(p) - 1:-1].argmax(-1)
            wrong = np.flatnonzero(want != np.asarray(rows[i][len(p):]))
            if wrong.size:
                redo[i] = rows[i][:len(p) + wrong[0]] + [int(want[wrong[0]])]
        if not redo:
            return rows, ref
        check = list(redo)  # the rows redrafted: the others are checked
        left = [len(rows[i]) - len(head) for i, head in redo.items()]
        outs = llm.generate([h for h, n in zip(redo.values(), left) if n], [greedy(n) for n in left if n])
        for i, head in redo.items():
            rows[i] = head + (list(outs.pop(0).outputs[0].token_ids) if len(rows[i]) > len(head) else [])
    raise AssertionError("the drafts did not converge to float32's greedy continuations")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_agrees_with_float32_over_256_teacher_forced_tokens(forced, kind, request):
    """The quality guard (configs/models.toml records which kind `auto` may choose for the model)."""
    model = request.getfixturevalue(f"{kind}_model")
    rows, ref = forced
    got = our_logits(model.module, model.params, rows)
    for a, b, r in zip(ref, got, rows):
        a, b, nxt = a[-257:-1], b[-257:-1], np.asarray(r[-256:])
        agree = (a.argmax(-1) == b.argmax(-1)).mean()
        ll_a = np.asarray(jax.nn.log_softmax(a, -1))[np.arange(256), nxt].mean()
        ll_b = np.asarray(jax.nn.log_softmax(b, -1))[np.arange(256), nxt].mean()
        assert agree >= 0.98, agree
        assert abs(ll_b - ll_a) <= 0.02 * abs(ll_a), (ll_a, ll_b)


def test_a_float8_kv_pool_agrees_with_float32_over_teacher_forced_decode_steps(forced, smollm_f32):
    """`--kv-cache-dtype fp8` (e4m3) on the default model, every step reading its keys and values back from the
    pool as decoding does, against the float32 pool over the same 64 steps (measured over 256: float32's next token
    at 96-98% of them, its likelihood within 2%; e5m2, with a mantissa bit fewer, 90-94% and within 2-9%)."""
    import dataclasses

    from helpers import decoded_logits
    from models import build

    rows = [r[:len(r) - 192] for r in forced[0]]  # each prompt and the first 64 tokens of its continuation
    starts = [len(r) - 64 for r in rows]
    f32 = decoded_logits(smollm_f32.module, smollm_f32.params, rows, starts)
    module = build(dataclasses.replace(smollm_f32.cfg, kv_dtype="float8_e4m3fn"), "xla")
    for a, b, r in zip(f32, decoded_logits(module, smollm_f32.params, rows, starts), rows):
        nxt = np.asarray(r[-64:])
        ll_a, ll_b = (np.asarray(jax.nn.log_softmax(x, -1))[np.arange(64), nxt].mean() for x in (a, b))
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9, (a.argmax(-1) == b.argmax(-1)).mean()
        assert abs(ll_b - ll_a) <= 0.05 * abs(ll_a), (ll_a, ll_b)


def test_fp8_on_the_default_model_loses_what_was_measured_and_takes_a_quarter_of_the_bytes(forced, fp8_model,
                                                                                           smollm_f32):
    """`--quantization fp8` is for cards with FP8 products and models larger than this one: on SmolLM2-135M its
    teacher-forced top-1 agreement with float32 was 0.91-0.97 and its mean log-likelihood 4-10% lower (e4m3 keeps 3
    bits of mantissa; rows of float8 weights alone gave 0.93-0.98), so `auto` never picks it; these bounds hold
    that measurement. The engine's paged steps decode greedily what the model's logits say, and a second load
    reads the cached float8 weights back as they were."""
    from engine import LLM, SamplingParams

    rows, ref = forced
    got = our_logits(fp8_model.module, fp8_model.params, rows)
    for a, b, r in zip(ref, got, rows):
        a, b, nxt = a[-257:-1], b[-257:-1], np.asarray(r[-256:])
        ll_a, ll_b = (np.asarray(jax.nn.log_softmax(x, -1))[np.arange(256), nxt].mean() for x in (a, b))
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.88, (a.argmax(-1) == b.argmax(-1)).mean()
        assert abs(ll_b - ll_a) <= 0.12 * abs(ll_a), (ll_a, ll_b)
    prompt = rows[0][:24]
    out = LLM(fp8_model, max_num_seqs=2, max_model_len=128, kv_cache_gb=0.02).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    logits = our_logits(fp8_model.module, fp8_model.params, [prompt + list(out)])[0]
    assert list(out) == logits[len(prompt) - 1:-1].argmax(-1).tolist()
    again = load_model("smollm2-135m-instruct", quantization="fp8")
    layers = lambda m: jax.tree.leaves(m.params["params"]["layers"])  # noqa: E731
    assert all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
               for a, b in zip(layers(fp8_model), layers(again)))
    size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    ratio = size(fp8_model.params["params"]["layers"]) / size(smollm_f32.params["params"]["layers"])
    assert 0.25 < ratio < 0.26, ratio  # a byte a weight, a float32 scale a row (norms stay float32)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.sampled_from([16, 48]), st.data())
def test_fp8_products_take_float8_operands_and_scale_back(tokens, out, k, data):
    """`quant.dot_fp8` against numpy (ml_dtypes' float8 rounding): each weight row and each token rounded to e4m3
    at its own scale (max / 448), multiplied, and scaled back; the program multiplies float8 operands (what a
    Hopper card's FP8 product takes; this CPU's XLA widens them)."""
    import ml_dtypes

    x = data.draw(hnp.arrays(np.float32, (tokens, k), elements=st.floats(-1e3, 1e3, width=32)))
    w = data.draw(hnp.arrays(np.float32, (out, k), elements=st.floats(-4, 4, width=32)))
    q, s = quant.quantize_fp8(w)
    assert q.dtype == quant.FP8 and s.shape == (w.shape[0], 1)
    back = q.astype(np.float32) * s  # e4m3: half a step is 2^-4 of a normal value, 2^-10 of the scale below 2^-6
    assert np.all(np.abs(back - w) <= np.maximum(np.abs(w) / 16, s / 1024) * (1 + 1e-6) + quant.TINY)
    xs = np.abs(x).max(-1, keepdims=True)
    xs = np.where(xs > quant.TINY, xs / 448, 1)
    xq = (x / xs).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = (xq @ q.astype(np.float32).T) * xs * s[:, 0]
    got = np.asarray(quant.dot_fp8(jax.numpy.asarray(x), q, s, np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    text = jax.jit(quant.dot_fp8).lower(x, q, s).as_text()
    assert text.split("dot_general", 1)[1].split("\n", 1)[0].count("f8E4M3FN") >= 2  # both of the product's operands
    with pytest.raises(ValueError, match="finite"):
        quant.quantize_fp8(np.array([[1.0, np.nan]], np.float32))


def test_int8_weights_take_about_a_quarter_of_the_bytes(smollm_f32, int8_model):
    size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    ratio = size(int8_model.params) / size(smollm_f32.params)
    assert 0.25 < ratio < 0.25 + 1 / 32 + 0.01, ratio  # int8 plus one float32 scale per 32 weights (norms stay f32)
    up = int8_model.params["params"]["layers"]["mlp"]["up_proj"]
    cfg = smollm_f32.cfg
    assert up["weight"].itemsize == 1 and up["weight"].size == cfg.hidden_size * cfg.intermediate_size * cfg.num_layers
    assert up["scale"].size * quant.GROUP == up["weight"].size


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96, 5])),
                  elements=st.floats(-4, 4, width=32)))
def test_rounding_error_is_at_most_half_a_step_per_group(w):
    q, s = quant.quantize(w)
    back = np.asarray(quant.dequantize(q, s, np.float32))
    step = np.repeat(s, w.shape[-1] // s.shape[-1], axis=-1)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6 * np.abs(w) + 1e-12)


def test_int4_weights_take_a_sixth_and_give_back_the_gguf_q4_1_values(smollm_f32, int4_model):
    """The packaged GGUF's layers are Q4_1: quantized again from their float32 values they come back bit for bit."""
    layers = smollm_f32.params["params"]["layers"]
    for module, name in [("mlp", "down_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("self_attn", "q_proj"),
                         ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj")]:
        w = np.asarray(layers[module][name]["weight"])
        back = np.asarray(quant.dequantize4(*quant.quantize4(w), np.float32))
        np.testing.assert_array_equal(back, w, err_msg=name)
    size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    ratio = size(int4_model.params["params"]["layers"]) / size(layers)  # packed for the kernel or not, two a byte
    assert 0.125 < ratio < 0.125 + 1 / 32 + 0.01, ratio  # 4 bits plus a float16 scale and minimum per 32 weights


def test_an_untied_lm_head_is_int8_under_int4_and_float_under_fp8():
    """`quant.HEADS`: int4 keeps an untied LM head in int8 (the logits are what sampling reads), fp8 leaves it float;
    the layers' projections take the kind asked for."""
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    tree = {"lm_head": {"weight": w}, "layers_0": {"mlp": {"up_proj": {"weight": w}}}}
    four, eight = quant.quantize_tree(tree, "int4"), quant.quantize_tree(tree, "fp8")
    assert set(four["lm_head"]) == {"weight", "scale"} and four["lm_head"]["weight"].dtype == np.int8
    assert set(four["layers_0"]["mlp"]["up_proj"]) == {"weight", "scale", "minimum"}
    assert eight["lm_head"]["weight"] is w and eight["layers_0"]["mlp"]["up_proj"]["weight"].dtype == quant.FP8


def test_int4_keeps_the_grid_that_4_bit_values_lie_on():
    """Blocks whose values lie on an even grid of k <= 15 steps (a GPTQ or AWQ checkpoint's groups of 128 seen 32 at a
    time, a Q4_K block) come back as they were, to float16's rounding of the scale and minimum, where re-gridding
    them at 15 steps moved a fifth of them by up to half a step; float weights are quantized as before."""
    rng = np.random.default_rng(0)
    k = rng.integers(1, 16, (64, 4))  # each block's span in steps
    step = rng.uniform(1e-3, 1e-2, (64, 4)).astype(np.float16).astype(np.float32)
    low = rng.integers(-15, 1, (64, 4)) * step
    levels = np.minimum(rng.integers(0, 16, (64, 4, 32)), k[..., None])
    levels[..., 0], levels[..., 1] = 0, k  # each block spans its k steps
    w = (low[..., None] + levels * step[..., None]).astype(np.float32).reshape(64, 128)
    back = np.asarray(quant.dequantize4(*quant.quantize4(w), np.float32)).reshape(64, 4, 32)
    # float16 rounds the scale (2^-11 of it, times up to 15 steps) and the minimum (2^-11 of it)
    slack = 2.0 ** -11 * (15 * step + np.abs(low)) + 1e-7
    assert (np.abs(back - w.reshape(64, 4, 32)) <= slack[..., None]).all()
    floats = rng.normal(size=(64, 128)).astype(np.float32)
    q, scale, minimum = quant.quantize4(floats)
    blocks = floats.reshape(64, 4, 32)
    want = ((blocks.max(-1) - blocks.min(-1).astype(np.float16).astype(np.float32)) / 15).astype(np.float16)
    np.testing.assert_array_equal(scale, want)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
                  elements=st.floats(-4, 4, width=32)))
def test_int4_rounding_error_is_at_most_half_a_step_per_group(w):
    q, s, m = quant.quantize4(w)
    assert q.shape == (*w.shape[:-1], w.shape[-1] // 2) and s.dtype == m.dtype == np.float16  # two values a byte
    back = np.asarray(quant.dequantize4(q, s, m, np.float32))
    step = np.repeat(s.astype(np.float32), 32, axis=-1)
    # float16's scale and minimum are rounded (2^-11 relative): q = 15 may sit that much past the group's top; below
    # float16's range they round to its grid of 2^-24 (hypothesis found a group of 1.3e-12 whose minimum became 0)
    slack = np.repeat(np.abs(w.reshape(*w.shape[:-1], -1, 32)).max(-1), 32, axis=-1) * 2.0 ** -9
    assert np.all(np.abs(back - w) <= step / 2 + slack + 16 * 2.0 ** -25)


def test_auto_quantization_picks_the_guarded_kind_only_where_the_kernel_runs():
    kernel = cpu_matmul.available()
    chosen, why = resolve_quantization("auto", "smollm2-135m-instruct", "float32", platform="cpu")
    assert chosen == ("int4" if kernel else "none") and why.startswith("auto: ")
    assert "AVX2" in why or kernel
    assert resolve_quantization("auto", "smollm2-135m-instruct", "bfloat16", platform="gpu")[0] == "none"
    assert resolve_quantization("auto", "smollm2-135m-instruct", "float32", tp=2, platform="cpu")[0] == "none"
    if kernel:  # a model the quality guard has not checked keeps its weights, and so do XLA's widened products
        chosen, why = resolve_quantization("auto", "/models/other.gguf", "float32", platform="cpu")
        assert chosen == "none" and "quality guard" in why
        chosen, _ = resolve_quantization("auto", "smollm2-135m-instruct", "float32", platform="cpu", matmul="xla")
        assert chosen == "none"
        # a checkpoint stored as integers (GPTQ, AWQ, ...) keeps their width where the kernel runs
        chosen, why = resolve_quantization("auto", "/models/awq", "float32", platform="cpu", stored="int4")
        assert chosen == "int4" and "packed weights in int4" in why
    assert resolve_quantization("auto", "/models/awq", "bfloat16", platform="gpu", stored="int4")[0] == "none"
    assert resolve_quantization("int8", "/models/other.gguf", "float32", platform="gpu") == ("int8", "asked for")
    assert resolve_quantization("int4", "/models/other.gguf", "float32", platform="cpu") == ("int4", "asked for")
    assert resolve_quantization("none", "smollm2-135m-instruct", "float32") == ("none", "asked for")
    with pytest.raises(ValueError, match="unknown quantization"):
        resolve_quantization("int2", "smollm2-135m-instruct", "float32")
