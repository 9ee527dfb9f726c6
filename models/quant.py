"""Weight quantization (`--quantization int8`): int8 weights with a float32 scale per group of 32 inputs.

A weight `w [out, in]` is stored as `round(w / s)` in int8 with `s = max|w[o, g]| / 127` for each output row `o` and
each group `g` of `GROUP` consecutive inputs (llama.cpp's Q8_0 layout): a little over a quarter of float32's bytes,
and the decode step on a CPU reads every weight once per step, so bytes are time. One scale per whole output row
(per-channel) moved the teacher-forced top-1 token on 2-3% of positions and the log-likelihood by up to 2.5%; groups
of 32 keep both within 1.2% (tests/test_quant.py). The product widens the int8 weights and applies the scales inside
the jitted step (`dot`), so memory holds int8 only. The embedding table is quantized the same way, per vocabulary
row and group, which serves both the lookup and a tied LM head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZATIONS = ("none", "int8")
GROUP = 32  # inputs sharing one scale


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


def quantize_tree(tree: dict) -> dict:
    """A converted (unstacked) parameter tree with every linear weight (`weight` of two dimensions) and the
    embedding table quantized: `weight` -> int8 `weight` + `scale`, `embed` -> int8 `embed` + `embed_rows`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = quantize_tree(v)
        elif k == "weight" and np.ndim(v) == 2:
            out["weight"], out["scale"] = quantize(v)
        elif k == "embed":
            out["embed"], out["embed_rows"] = quantize(v)
        else:
            out[k] = v
    return out
