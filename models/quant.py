"""Weight quantization (`--quantization int8` and `int4`): int8 weights with a float32 scale per group of 32 inputs,
or 4-bit ones with a float16 scale and minimum per group (int4, below).

A weight `w [out, in]` is stored as `round(w / s)` in int8 with `s = max|w[o, g]| / 127` for each output row `o` and
each group `g` of `GROUP` consecutive inputs (llama.cpp's Q8_0 layout): a little over a quarter of float32's bytes,
and the decode step on a CPU reads every weight once per step, so bytes are time. One scale per whole output row
(per-channel) moved the teacher-forced top-1 token on 2-3% of positions and the log-likelihood by up to 2.5%; groups
of 32 keep both within 1.2% (tests/test_quant.py). The product widens the int8 weights and applies the scales inside
the jitted step (`dot`), so memory holds int8 only. The embedding table is quantized the same way, per vocabulary
row and group, which serves both the lookup and a tied LM head.

`int4` is llama.cpp's Q4_1: `w = d q + m` with `q` in 0..15 (two a byte), and `m = min` and `d = (max - m) / 15`
of each group of 32, both float16: 0.625 bytes a weight against int8's 1.125, for the decode step that reads every
weight from memory (the unpacked form too: XLA's products widen it in the step). A group whose values already lie
on an even grid of fewer levels, as a 4-bit checkpoint's do (GPTQ's or AWQ's groups of 128 seen 32 at a time, a
Q4_K block), takes `d = (max - m) / k` for the most `k` < 15 that holds it (`_steps`), so its values come back as
they were. A GGUF whose weights are Q4_1 (the packaged SmolLM2's) comes back to its own values too: each block holds
its minimum and maximum at q = 0 and 15. The embedding table stays int8 (Q8_0 in such files), and so does an untied
LM head (`HEADS`).

`fp8` is vLLM's and SGLang's `--quantization fp8` on Hopper and Ada cards: each weight row in float8 e4m3 with one
float32 scale (`max|w[o]| / 448`), and each token's activations rounded to e4m3 on the way in with a scale of its
own (dynamic, per token), so the product itself takes two float8 operands (`dot_fp8`) and the card's FP8 tensor
cores can run it: half of bfloat16's weight bytes for the decode step, twice its matmul rate for prefill (a mixture's
routed experts too: each expert's rows in float8 with their own scales, multiplied in `layers.moe`). Where no
FP8 unit exists (this CPU) XLA widens both operands, with the same values. It keeps the int8 layout (a scale per
row, one group); the embedding table stays int8, and an untied LM head keeps the model's dtype (vLLM's and SGLang's
fp8 leave it so: the logits are what sampling reads). An FP8 checkpoint served so is read to float32 and rounded again
per row: exact for per-row checkpoints, a second rounding for block-scaled ones (DeepSeek-V3's, Qwen3's -FP8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZATIONS = ("none", "int8", "int4", "fp8")
GROUP = 32  # inputs sharing one scale
LANES = 16  # outputs side by side in the packed layout
PACKED = "packed16x4"  # the packed layout in checkpoint keys: change it with `pack`


def groups(n: int) -> int:
    """Scales per row of `n` inputs (a row shorter than or not divisible by `GROUP` is one group)."""
    return n // GROUP if n % GROUP == 0 else 1


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`w [..., out, in]` as int8 and its float32 scales `[..., out, groups(in)]`."""
    w = np.asarray(w, np.float32)
    g = groups(w.shape[-1])
    blocks = w.reshape(*w.shape[:-1], g, w.shape[-1] // g)
    scale = np.abs(blocks).max(axis=-1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(blocks / scale[..., None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize(w: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """The float weights of int8 `w [..., in]` and its scales `[..., groups]` (inside jit this fuses into the use)."""
    g = scale.shape[-1]
    blocks = w.reshape(*w.shape[:-1], g, w.shape[-1] // g).astype(jnp.float32) * scale[..., None]
    return blocks.reshape(w.shape).astype(dtype)


def dot(x: jax.Array, w: jax.Array, scale: jax.Array, out_dtype=None) -> jax.Array:
    """`x @ dequantize(w, scale).T` for int8 `w [out, in]`; `out_dtype` defaults to x's."""
    y = jnp.dot(x, dequantize(w, scale, x.dtype).T, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`w [..., out, in]` as float8 e4m3 (nearest) and its float32 scales `[..., out, 1]`, one a row."""
    w = np.asarray(w, np.float32)
    if not np.isfinite(w).all():
        raise ValueError("fp8 needs finite weights")
    top = np.abs(w).max(axis=-1, keepdims=True)
    scale = np.where(top > TINY, top / FP8_MAX, 1.0).astype(np.float32)  # a row below TINY: zeros (see `activations`)
    return np.clip(np.where(top > TINY, w, 0) / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def fp8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x [..., in]` rounded to float8 e4m3 at each row's own scale (its `max|x| / 448`): `(float8 x, scales
    [..., 1])`, `x ~ float8 x * scale`."""
    wide = x.astype(jnp.float32)
    top = jnp.abs(wide).max(axis=-1, keepdims=True)
    top = jnp.where(top > TINY, top / FP8_MAX, 1.0)
    return (wide / top).astype(FP8), top


def dot_fp8(x: jax.Array, w: jax.Array, scale: jax.Array, out_dtype=None) -> jax.Array:
    """`x @ (w * scale).T` for float8 `w [out, in]` and its row scales `[out, 1]`, with each token's `x [..., in]`
    rounded to float8 by a scale of its own (its `max|x| / 448`): one product of two float8 operands accumulated in
    float32, then both scales; `out_dtype` defaults to x's. Under tensor parallelism a row-parallel weight's
    tokens are split over their hidden axis, and the token's scale (a max over all of it) costs a small all-reduce
    of one value a token (vLLM scales each rank's shard apart instead)."""
    xq, top = fp8_rows(x)
    y = jax.lax.dot_general(xq, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * top * scale.reshape(w.shape[0])).astype(out_dtype or x.dtype)


def quantize4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`w [..., out, in]` (in divisible by `GROUP`) as 4-bit values `q` in 0..15, two a byte (input 2j in the low
    nibble of byte j, 2j + 1 in its high one: uint8 `[..., out, in / 2]`), and their float16 scales and minima
    `[..., out, in / 32]`: `w ~ q * scale + minimum` (Q4_1)."""
    w = np.asarray(w, np.float32)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all() and np.abs([lo, hi]).max() < 65504):
        raise ValueError("int4 needs finite weights within float16's range")
    minimum = lo.astype(np.float16)
    m = minimum.astype(np.float32)
    scale = ((hi - m) / _steps(blocks, lo, hi)).astype(np.float16)  # from the rounded minimum: the top not clipped
    step = np.where(scale == 0, 1, scale.astype(np.float32))[..., None]
    q = np.clip(np.round((blocks - m[..., None]) / step), 0, 15).astype(np.uint8).reshape(w.shape)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, minimum


def _on_grid(blocks: np.ndarray, lo: np.ndarray, span: np.ndarray, k: int) -> np.ndarray:
    """Whether each block `[n, GROUP]` lies (within 1e-3 of a step) on the grid of `k` even steps from `lo` to
    `lo + span`."""
    t = (blocks - lo[:, None]) * (k / span[:, None])
    return (np.abs(t - np.round(t)) <= 1e-3).all(axis=-1)


def _steps(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Each block's steps from its minimum to its maximum (`blocks [..., GROUP]`): the most, up to 15, that put
    all its values on an evenly spaced grid, where they lie on one of at most 16 levels (a 4-bit checkpoint's own:
    GPTQ's, AWQ's, compressed-tensors', a GGUF's Q4_0, Q4_1 or Q4_K blocks), so that its values come back as they
    were; 15 elsewhere. A tensor is searched whole (in chunks) only where most of a sample of its blocks lies on
    such a grid: float weights' blocks do not, and cost the sample alone."""
    flat, lo1, span = blocks.reshape(-1, GROUP), lo.reshape(-1), (hi - lo).reshape(-1)
    steps = np.full(lo1.shape, 15, np.float32)

    def search(rows: np.ndarray) -> int:
        """Set `steps` for the blocks `rows`; how many lie on a grid."""
        left, found = rows[span[rows] > 0], 0
        for k in range(15, 0, -1):
            hit = _on_grid(flat[left], lo1[left], span[left], k)
            steps[left[hit]], left, found = k, left[~hit], found + int(hit.sum())
        return found

    n = len(flat)
    sample = np.random.default_rng(0).choice(n, min(n, 256), replace=False)
    if search(sample) * 2 > len(sample):
        for start in range(0, n, 1 << 16):
            search(np.arange(start, min(n, start + (1 << 16))))
    return steps.reshape(lo.shape)


def values4(w: jax.Array) -> jax.Array:
    """The 4-bit values `[..., in]` of `w [..., in / 2]` as `quantize4` stores them, two a byte (numpy or jax)."""
    xp = jnp if isinstance(w, jax.Array) else np
    return xp.stack([w & 15, w >> 4], axis=-1).reshape(*w.shape[:-1], 2 * w.shape[-1])


def dequantize4(w: jax.Array, scale: jax.Array, minimum: jax.Array, dtype) -> jax.Array:
    """The float weights `[..., in]` of 4-bit `w [..., in / 2]` (`quantize4`) and its float16 scales and minima
    `[..., in / 32]`."""
    q = values4(w)
    g = scale.shape[-1]
    blocks = q.reshape(*q.shape[:-1], g, q.shape[-1] // g).astype(jnp.float32)
    blocks = blocks * scale.astype(jnp.float32)[..., None] + minimum.astype(jnp.float32)[..., None]
    return blocks.reshape(q.shape).astype(dtype)


def dot4(x: jax.Array, w: jax.Array, scale: jax.Array, minimum: jax.Array, out_dtype=None) -> jax.Array:
    """`x @ dequantize4(w, scale, minimum).T` for 4-bit `w [out, in / 2]`; `out_dtype` defaults to x's."""
    y = jnp.dot(x, dequantize4(w, scale, minimum, x.dtype).T, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


TINY = 1e-30  # activation groups smaller than this round to zero (backends/csrc/int8_matmul.cc has the same bound)


def activations(x: jax.Array) -> jax.Array:
    """`x [..., in]` rounded as the `cpu` kernel rounds its activations (for testing it against XLA): per group of
    32, int8 in steps of `max|x| / 127` (llama.cpp's Q8_0, nearest even), then what that left in int8 steps 256
    times finer, clipped to +-127. A group whose largest magnitude is below `TINY` rounds to zeros (its inverse
    step would overflow, and its step is subnormal)."""
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    top = jnp.abs(blocks).max(axis=-1, keepdims=True)
    inv = jnp.where(top > TINY, jnp.float32(127) / jnp.where(top > TINY, top, 1), 0)
    step = top / jnp.float32(127)
    first = jnp.rint(blocks * inv) * step
    second = jnp.clip(jnp.rint((blocks - first) * (inv * 256)), -127, 127) * (step / 256)
    return (first + second).reshape(x.shape).astype(x.dtype)


def packable(out: int, inputs: int) -> bool:
    """Whether a `[out, in]` weight has the packed layout's shape (outputs by 16, inputs by 32)."""
    return out % LANES == 0 and inputs % GROUP == 0


def _runs(u: np.ndarray) -> np.ndarray:
    """Bytes `u [..., out, in]` in runs of 16 outputs by 4 inputs, output-major: `[..., out/16, in/4, 64]`."""
    *lead, n, k = u.shape
    u = u.reshape(*lead, n // LANES, LANES, k // 4, 4)
    return np.ascontiguousarray(u.swapaxes(-3, -2)).reshape(*lead, n // LANES, k // 4, 4 * LANES)


def _lanes(v: np.ndarray, dtype) -> np.ndarray:
    """Per-group values `v [..., out, in/32]` with 16 outputs side by side: `[..., out/16, in/32, 16]`."""
    *lead, n, g = np.shape(v)
    return np.ascontiguousarray(np.asarray(v, dtype).reshape(*lead, n // LANES, LANES, g).swapaxes(-1, -2))


def pack(w: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 `w [..., out, in]` and its scales `[..., out, in/32]` in the `cpu` kernel's layout: `w + 128` as uint8
    `[..., out/16, in/4, 64]` (16 outputs by 4 inputs per 64 bytes) and scales `[..., out/16, in/32, 16]`."""
    return _runs((np.asarray(w, np.int16) + 128).astype(np.uint8)), _lanes(scale, np.float32)


def pack4(w: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit `w [..., out, in / 2]` (`quantize4`) and its scales and minima `[..., out, in / 32]` in the `cpu`
    kernel's int4 layout: the int8 layout's runs of 64 values as 32 bytes, value b in the low nibble of byte b and
    value b + 32 in its high one, `[..., out/16, in/4, 32]`; scales and minima `[..., out/16, in/32, 16]` float16."""
    u, half = _runs(values4(np.asarray(w, np.uint8))), 2 * LANES
    return u[..., :half] | (u[..., half:] << 4), _lanes(scale, np.float16), _lanes(minimum, np.float16)


def unpack_rows(w: jax.Array, scale: jax.Array, rows: jax.Array, dtype) -> jax.Array:
    """Rows `rows [...]` (output indices) of a weight packed by `pack`, as float `[..., in]` (the embedding
    lookup of a packed table: each row's 16-row block is read and its lane taken)."""
    block, lane = rows // LANES, rows % LANES
    b = w[block]
    b = b.reshape(*b.shape[:-1], LANES, 4)
    q = jnp.take_along_axis(b, lane[..., None, None, None], axis=-2)[..., 0, :]
    s = jnp.take_along_axis(scale[block], lane[..., None, None], axis=-1)[..., 0]
    return dequantize(q.reshape(*rows.shape, -1).astype(jnp.int32) - 128, s, dtype)


def pack_tree(tree: dict, tied: bool) -> dict:
    """A quantized tree (unstacked or stacked) with every packable linear weight in the `cpu` kernel's layout,
    and a tied embedding table too (its lookup reads the packed rows, `unpack_rows`)."""
    out = {k: pack_tree(v, False) if isinstance(v, dict) else v for k, v in tree.items()}
    if "minimum" in tree and packable(np.shape(tree["weight"])[-2], 2 * np.shape(tree["weight"])[-1]):
        out["weight"], out["scale"], out["minimum"] = pack4(tree["weight"], tree["scale"], tree["minimum"])
    elif "scale" in tree and packable(*np.shape(tree["weight"])[-2:]):
        out["weight"], out["scale"] = pack(tree["weight"], tree["scale"])
    if tied and packable(*np.shape(tree["embed"])[-2:]):
        out["embed"], out["embed_rows"] = pack(tree["embed"], tree["embed_rows"])
    return out


# Modules whose weights stay float: MoE routers (small, and routing decides everything) and MLA's `kv_b_proj` (its
# weights are absorbed into the queries and outputs, not applied as a linear layer).
FLOAT_MODULES = ("gate", "kv_b_proj")


# An untied LM head's own kind under `--quantization` (else the same): int4 keeps it in int8, as llama.cpp's Q4_K_M
# keeps its output layer at 6 bits (the logits are what sampling reads), at +0.5 bytes a weight of one matrix.
HEADS = {"fp8": "none", "int4": "int8"}


def quantize_tree(tree: dict, kind: str = "int8", experts: bool = False) -> dict:
    """A converted (unstacked) parameter tree with every linear weight (`weight` of two dimensions, outside
    `FLOAT_MODULES`) and the embedding table quantized: `weight` -> int8 `weight` + `scale` (`kind` int8), 4-bit
    `weight` + `scale` + `minimum` (int4, where its inputs divide into groups) or float8 `weight` + a `scale` a row
    (fp8, which also takes a mixture's expert stacks `[E, out, in]`, inside `experts`, with a scale per expert and
    row), `embed` -> int8 `embed` + `embed_rows`; an untied `lm_head` by `HEADS` (fp8 leaves it float as vLLM does,
    int4 makes it int8)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            inner = HEADS.get(kind, kind) if k == "lm_head" else kind
            out[k] = v if k in FLOAT_MODULES or inner == "none" else quantize_tree(v, inner, experts or k == "experts")
        elif k == "weight" and (np.ndim(v) == 2 or experts and np.ndim(v) == 3) and kind == "fp8":
            out["weight"], out["scale"] = quantize_fp8(v)
        elif k == "weight" and np.ndim(v) == 2 and kind == "int4" and np.shape(v)[1] % GROUP == 0:
            out["weight"], out["scale"], out["minimum"] = quantize4(v)
        elif k == "weight" and np.ndim(v) == 2:
            out["weight"], out["scale"] = quantize(v)
        elif k == "embed":
            out["embed"], out["embed_rows"] = quantize(v)
        else:
            out[k] = v
    return out
