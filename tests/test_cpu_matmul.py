"""The `cpu` matmul backend: the C++ kernel's int8 and int4 products against their XLA references, the packed layouts,
the model through the kernel against the XLA int8 and int4 models on the same weights, and the backend choice."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from helpers import our_logits
from models import KVCache, ModelConfig, build, init_params, quant
from models.backends import cpu_matmul
from models.backends.cpu_matmul import resolve_matmul

pytestmark = pytest.mark.quick_compile  # tiny random models and small products: XLA optimizations off (conftest)

needs_kernel = pytest.mark.skipif(not cpu_matmul.available(), reason=f"needs {cpu_matmul.NEEDS}")


def _weights(rng, n, k):
    return quant.quantize(rng.normal(size=(n, k)).astype(np.float32) * 0.05)


# The kernel and its references run jitted, one program a shape: eagerly, each of their operations compiled on its
# own (the kernel tests: 56 -> 13 s with cold caches).
_matmul = jax.jit(cpu_matmul.matmul)


@jax.jit
def _rounded_dot(x, q, s):
    return quant.dot(quant.activations(x), q, s)


@jax.jit
def _rounded_dot4(x, q, s, m):
    return quant.dot4(quant.activations(x), q, s, m)


def _reference(x, q, s):
    return np.asarray(_rounded_dot(x, q, s))


def _weights4(rng, n, k):
    return quant.quantize4(rng.normal(size=(n, k)).astype(np.float32) * 0.05)


def _kernel4(x, q, s, m):
    w, s, m = quant.pack4(q, s, m)
    return np.asarray(_matmul(jnp.asarray(x), w, s, None, m))


def _reference4(x, q, s, m):
    return np.asarray(_rounded_dot4(x, q, s, m))


@needs_kernel
# the VNNI build's few-row tiles (one and two rows, up to 4 rows a call), under, at and over its 6-row tile and AVX2's
# 4-row one, and past the rows from which AVX2 widens the weights once
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 13, 40, 66])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (80, 64), (192, 576)])  # 16 outputs left over (VNNI), or none
def test_kernel_matches_its_xla_reference(m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    q, s = _weights(rng, n, k)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[0, :32] = 0  # a group of zeros
    got = np.asarray(_matmul(x, *quant.pack(q, s)))
    want = _reference(x, q, s)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)
    full = np.asarray(jax.jit(quant.dot)(x, q, s))  # two levels: near float
    np.testing.assert_allclose(got, full, atol=1e-4 * np.abs(full).max(), rtol=1e-3)


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 4, 7, 66])  # few-row tiles (VNNI: up to 4 rows), over the 4-row tile; widened once
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (192, 576)])
def test_int4_kernel_matches_its_xla_reference(m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    q, s, mn = _weights4(rng, n, k)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[0, :32] = 0
    got, want = _kernel4(x, q, s, mn), _reference4(x, q, s, mn)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)
    full = np.asarray(jax.jit(quant.dot4)(x, q, s, mn))
    np.testing.assert_allclose(got, full, atol=1e-4 * np.abs(full).max(), rtol=1e-3)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.sampled_from([32, 64])),
                    elements=st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, 1e-30, -3e-3])),
       leading=st.sampled_from([(), (2,)]), four=st.booleans())
def test_kernel_on_any_activations(x, leading, four):
    """Any values (zeros, tiny ones, mixed magnitudes in a group) and leading axes, through both products."""
    rng = np.random.default_rng(x.shape[0])
    xs = np.broadcast_to(x, (*leading, *x.shape))
    if four:
        q, s, m = _weights4(rng, 32, x.shape[1])
        w, s4, m4 = quant.pack4(q, s, m)
        got, want = np.asarray(_matmul(xs, w, s4, None, m4)), _reference4(xs, q, s, m)
        dense = np.asarray(jax.jit(quant.dequantize4, static_argnums=3)(q, s, m, jnp.float32))
    else:
        q, s = _weights(rng, 32, x.shape[1])
        got, want = np.asarray(_matmul(xs, *quant.pack(q, s))), _reference(xs, q, s)
        dense = np.asarray(jax.jit(quant.dequantize, static_argnums=2)(q, s, jnp.float32))
    assert got.shape == (*leading, x.shape[0], 32)
    # An activation's second-level code may differ by one where it sits within float rounding of a tie (the kernel
    # computes `(x - first) * 256 / step` in another order: -99.50022 seen rounding both ways): at most one fine step
    # (the group's largest magnitude / (127 * 256)) per activation, times its weight.
    top = np.abs(x.reshape(x.shape[0], -1, quant.GROUP)).max(-1)
    fine = np.repeat(top / (127 * 256), quant.GROUP, axis=-1)
    tie = fine @ np.abs(dense).T
    excess = np.abs(got - want) - (tie + 1e-5 * np.abs(want) + 1e-5 * np.abs(want).max() + 1e-30)
    assert excess.max() <= 0, (excess.max(), np.abs(got - want).max())


@needs_kernel
@pytest.mark.parametrize("four", [False, True])
def test_a_row_gets_the_same_bits_in_a_call_of_any_rows(four):
    """A row's outputs do not depend on the call's other rows, whether the tiles widen the weights for each tile of
    rows (few rows) or once for all (`kWiden` on), or (VNNI) a call of up to 4 rows runs the few-row tile (`Vec`):
    what makes a prompt's logits the same computed alone or batched."""
    rng = np.random.default_rng(7)
    packed = quant.pack4(*_weights4(rng, 48, 96)) if four else quant.pack(*_weights(rng, 48, 96))
    x = rng.normal(size=(70, 96)).astype(np.float32)
    call = jax.jit(lambda x, w, s, *m: cpu_matmul.matmul(x, w, s, None, *m))
    many = np.asarray(call(x, *packed))
    assert np.array_equal(many[:3], np.asarray(call(x[:3], *packed)))
    assert np.array_equal(many, np.concatenate([np.asarray(call(x[i:i + 1], *packed)) for i in range(70)]))


@settings(max_examples=50, deadline=None)
@example(np.full((1, 32), np.finfo(np.float32).tiny, np.float32))
@example(np.array([[65.3834] + [97.67029] * 31], np.float32))  # off by 1.2e-6 of a step: float32's own rounding
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])),
                  elements=st.floats(-100, 100, width=32)))
def test_two_level_rounding_is_within_half_a_fine_step(x):
    """Half a fine step (a 256th of the first level's), or one where the remainder is clipped at 127 fine steps,
    within float32's rounding of the value (two units in its last place: near 100 that is 1.5e-5, 1% of half a fine
    step); a group below quant.TINY is zeros (hypothesis found NaN there: 127 / max overflowed and the step was
    subnormal)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    top = np.abs(blocks).max(-1, keepdims=True)
    step, fine = top / np.float32(127), top / np.float32(127 * 256)
    err = np.abs(np.asarray(jax.jit(quant.activations)(x)).reshape(blocks.shape) - blocks)
    big = top > quant.TINY
    first = np.rint(blocks * np.where(big, np.float32(127) / np.where(big, top, 1), 0)) * step
    clipped = np.abs(blocks - first) > 127 * fine  # the remainder rounds past the second level's range
    assert np.all(err <= np.where(clipped, fine, fine / 2) + 2 * np.spacing(np.abs(blocks)) + 1e-30)


def test_packed_rows_unpack_to_the_rows():
    rng = np.random.default_rng(0)
    q, s = _weights(rng, 64, 96)
    rows = np.array([[0, 15, 16], [63, 17, 1]], np.int32)
    got = quant.unpack_rows(*map(jnp.asarray, quant.pack(q, s)), jnp.asarray(rows), jnp.float32)
    want = quant.dequantize(jnp.asarray(q[rows]), jnp.asarray(s[rows]), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# Qwen2: q/k/v biases, and k/v (8 outputs) and o (16 inputs) too narrow to pack: they stay in XLA among packed ones.
_QWEN2 = dict(_LLAMA, architectures=["Qwen2ForCausalLM"], head_dim=4, tie_word_embeddings=True)
# Gemma 3: GELU, the scaled lookup of a packed tied table, q/k norms, sliding windows, soft-capped logits.
_GEMMA = dict(_LLAMA, architectures=["Gemma3ForCausalLM"], head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0,
              tie_word_embeddings=True)
ROWS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3]]
CONFIGS = {"llama-tied": dict(_LLAMA, tie_word_embeddings=True), "qwen2-narrow": _QWEN2, "gemma3": _GEMMA,
           "llama-untied": dict(_LLAMA, tie_word_embeddings=False)}


# Every config scanned and unscanned, and each kind both ways: int8 on every config, int4 on three (each case
# compiles three programs, ~18 s of the cold suite, so not the full product). Qwen2's int4 runs unscanned: its narrow
# weights stay in XLA as uint8 (two values a byte), which scanned layers slice per layer as they do int8's, and the
# check below looks for uint8 slices (the packed weights').
CASES = [("llama-tied", True, "int8"), ("llama-untied", False, "int8"), ("qwen2-narrow", True, "int8"),
         ("qwen2-narrow", False, "int8"), ("gemma3", False, "int8"),
         ("llama-untied", True, "int4"), ("gemma3", True, "int4"), ("qwen2-narrow", False, "int4")]


@needs_kernel
@pytest.mark.parametrize("name,scan,kind", CASES)
def test_model_through_the_kernel_matches_the_xla_quantized_model(name, scan, kind):
    cfg = dataclasses.replace(ModelConfig.from_hf(CONFIGS[name]), quantization=kind)
    ref, ker = build(cfg, scan=scan), build(cfg, scan=scan, matmul="cpu")
    assert (ref.cfg.matmul, ker.cfg.matmul) == ("xla", "cpu")
    params = init_params(ref, 0)
    packed = {"params": quant.pack_tree(jax.tree.map(np.asarray, params["params"]), cfg.tie_embeddings)}
    assert jax.tree.structure(packed) == jax.tree.structure(jax.eval_shape(lambda: init_params(ker, 0)))
    for a, b in zip(our_logits(ref, params, ROWS), our_logits(ker, packed, ROWS)):
        np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max(), rtol=1e-3)
    toks, cache = jnp.zeros((1, 4), jnp.int32), KVCache.zeros(cfg, 2, 16)
    lowered = jax.jit(lambda p: ker.apply(p, toks, toks, jnp.ones((1, 1), jnp.int32), cache)).lower(packed)
    # One call per packed weight of the traced program (a stack is one layer body), the tied table's as the LM head.
    calls = sum(a.shape != b.shape and b.dtype == np.uint8 for a, b in zip(jax.tree.leaves(params),
                                                                            jax.tree.leaves(packed)))
    text = lowered.as_text()
    assert text.count(f"@{cpu_matmul.TARGET}") + text.count(f"@{cpu_matmul.TARGET4}") == calls > 0
    assert (f"@{cpu_matmul.TARGET4}" in text) == (kind == "int4")
    if scan:  # scanned layers hand the kernel the stack and the layer index: XLA copies no slice of packed weights
        assert not re.search(r"= u8\[[^\n]*dynamic-slice\(", lowered.compile().as_text())


def test_matmul_backend_choice():
    f32 = ModelConfig.from_hf(_LLAMA)
    q8 = dataclasses.replace(f32, quantization="int8")
    assert resolve_matmul("auto", q8, "cpu") == ("cpu" if cpu_matmul.available() else "xla")
    assert resolve_matmul("auto", f32, "cpu") == "xla"  # float weights keep XLA's float product
    assert resolve_matmul("auto", q8, "gpu") == "xla" and resolve_matmul("auto", q8, "cpu", tp=2) == "xla"
    assert resolve_matmul("xla", q8, "cpu") == "xla"
    q4 = dataclasses.replace(f32, quantization="int4")
    assert resolve_matmul("auto", q4, "cpu") == ("cpu" if cpu_matmul.available() else "xla")
    for cfg, kw, why in [(f32, {}, "int8 and int4 weights only"),
                         (q8.with_dtype("bfloat16"), {}, "float32 models only"),
                         (q8, dict(tp=2), "does not split over tp"), (q8, dict(platform="gpu"), "on a CPU only")]:
        with pytest.raises(ValueError, match=why):
            resolve_matmul("cpu", cfg, **{"platform": "cpu", **kw})
    with pytest.raises(ValueError, match="unknown matmul backend"):
        resolve_matmul("amx", q8)
