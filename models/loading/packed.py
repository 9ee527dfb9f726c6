"""Quantized weights packed into words or bytes, read as the float weights they stand for.

The layouts, as the published quantizers write them (and vLLM, SGLang and llama.cpp's converter read them):
- **GPTQ** (`quant_method: gptq`; AutoGPTQ, GPTQModel): `X.qweight [in * bits / 32, out]` packs the inputs of each
  output column, `X.qzeros [groups, out * bits / 32]` the zero points along the outputs, `X.scales [groups, out]`,
  and `X.g_idx [in]` each input's group (`desc_act` checkpoints permute them). AutoGPTQ's format (`checkpoint_format`
  `gptq`, the default) stores each zero point minus one; GPTQModel's `gptq_v2` stores it as it is.
- **AWQ** (`quant_method: awq`, `version: gemm`; AutoAWQ, llm-compressor's AWQ export): `X.qweight [in, out * bits /
  32]` packs the outputs, eight 4-bit columns to a word in AutoAWQ's interleaved order (`AWQ_ORDER`), and so does
  `X.qzeros [in / group, out * bits / 32]`; `X.scales [in / group, out]`.
- **compressed-tensors' `pack-quantized`** (llm-compressor's W4A16 and W8A16): `X.weight_packed [out, in * bits /
  32]` packs the inputs as signed values offset by `2^(bits-1)`, `X.weight_scale [out, groups]` (one column per
  channel), `X.weight_zero_point [out * bits / 32, groups]` for asymmetric schemes, `X.weight_shape` and, with
  activation ordering, `X.weight_g_idx`.
- **FP4** (E2M1 codes, two a byte, the first in the low nibble): NVIDIA ModelOpt's NVFP4 (`quant_algo: NVFP4`:
  `X.weight [out, in / 2]`, float8 `X.weight_scale` per 16 inputs, float32 `X.weight_scale_2` for the tensor) and
  compressed-tensors' `nvfp4-pack-quantized` (`X.weight_packed`, `X.weight_scale` per 16, divided by
  `X.weight_global_scale`) and `mxfp4-pack-quantized` (a power-of-two `X.weight_scale` per 32, biased by 127).
- **bitsandbytes** (`quant_method: bitsandbytes`, as transformers saves `load_in_4bit` and `load_in_8bit` models;
  unsloth's `-bnb-4bit` folders): 4-bit `X.weight` holds two codes a byte (the first in the high nibble) of the
  flattened weight, each an index into `X.weight.quant_map` (NF4's or FP4's 16 values) times its block's
  `X.weight.absmax`, itself 8-bit codes into `X.weight.nested_quant_map` times `X.weight.nested_absmax` plus an
  offset under double quantization; `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) is JSON bytes giving the
  shape, block sizes and offset. LLM.int8()'s `X.weight` is int8 rows beside `X.SCB`, each row's absolute maximum.

GPTQ's, AWQ's and compressed-tensors' integers are packed densely from each word's lowest bit, so one reader
(`unpack`) serves 2, 3, 4 and 8 bits alike. Each weight reads as `X.weight [out, in]` in float32: `(q - zero) *
scale` by the group of its input, or a code's value times its block's scale.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import numpy as np

# The 16 values of an FP4 (E2M1) code: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column (of a word's eight) that each 4-bit field of an AWQ word holds
# each layout's tensors beside a weight, the first naming a packed weight
PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
         "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
         "fp4": ("weight_packed", "weight_scale", "weight_global_scale"),
         "modelopt-nvfp4": ("weight_scale_2", "weight", "weight_scale"),
         "bitsandbytes": ("weight.absmax", "SCB", "weight", "weight.quant_map", "weight.nested_absmax",
                          "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                          "weight.quant_state.bitsandbytes__fp4", "weight_format")}
MARKS = {"bitsandbytes": 2}  # how many of a layout's first parts name a packed weight (else one): 4 and 8 bits
# the names' endings that mark a packed weight, whatever the layout
MARKED = tuple(sorted({"." + part for layout, parts in PARTS.items() for part in parts[:MARKS.get(layout, 1)]}))


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a checkpoint's weights are packed: its `layout` (a `PARTS` key), `bits` a value, `group_size` inputs a
    scale of GPTQ's, AWQ's and compressed-tensors' integers (0: all of a row's; FP4 and bitsandbytes take theirs
    from the scales' shapes and their own state), whether zero points are stored minus one
    (AutoGPTQ's) and whether inputs are grouped out of order (GPTQ's `desc_act`)."""

    layout: str
    bits: int
    group_size: int = 0
    zero_minus_one: bool = False
    reordered: bool = False


def _group(size) -> int:
    """A `group_size` as `Packing` keeps it: 0 for one group a row (-1 or absent)."""
    return max(int(size or 0), 0)


def packing(quantization: dict) -> Packing | None:
    """The packing a checkpoint's `quantization_config` names; None where it names none of these layouts. Raises
    `NotImplementedError` for a variant not read (AWQ's GEMV layout, GPTQ's Marlin format or per-module `dynamic`
    settings, compressed-tensors groups packed in different ways)."""
    method = quantization.get("quant_method")
    if method == "bitsandbytes":
        return Packing("bitsandbytes", 8 if quantization.get("load_in_8bit") else 4)
    if method == "gptq":
        form = quantization.get("checkpoint_format") or quantization.get("format") or "gptq"
        if form not in ("gptq", "gptq_v2") or quantization.get("dynamic"):
            raise NotImplementedError(f"GPTQ's {form!r} checkpoint format" + (" with per-module `dynamic` settings"
                                      if quantization.get("dynamic") else "") + " is not read (read: gptq, gptq_v2)")
        group = _group(quantization.get("group_size", 128))
        return Packing("gptq", int(quantization.get("bits", 4)), group, zero_minus_one=form == "gptq",
                       reordered=bool(quantization.get("desc_act")) and group > 0)
    if method == "awq":
        version = str(quantization.get("version", "gemm")).lower()
        bits = int(quantization.get("bits", quantization.get("w_bit", 4)))
        if version != "gemm" or bits != 4 or quantization.get("zero_point") is False or quantization.get("dynamic"):
            raise NotImplementedError(f"AWQ's {version!r} layout at {bits} bits"
                                      + (" without zero points" if quantization.get("zero_point") is False else "")
                                      + (" with per-module `dynamic` settings" if quantization.get("dynamic") else "")
                                      + " is not read (read: gemm, 4 bits, with zero points)")
        return Packing("awq", 4, _group(quantization.get("group_size", quantization.get("q_group_size", 128))))
    algo = quantization.get("quant_algo") or (quantization.get("quantization") or {}).get("quant_algo")
    if method == "modelopt" and str(algo).upper() == "NVFP4":
        return Packing("modelopt-nvfp4", 4)
    form = quantization.get("format")
    if method == "compressed-tensors" and form in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return Packing("fp4", 4)
    if method != "compressed-tensors" or form != "pack-quantized":
        return None
    # activation order "group" (or "dynamic", or true) saves each input's group in `weight_g_idx`; "weight" and
    # "static" reorder only while quantizing, their groups stay runs of inputs
    schemes = {(w.get("num_bits"), _group(w.get("group_size")), w.get("type", "int"), w.get("strategy", "group"),
                w.get("actorder") is True or str(w.get("actorder")).lower() in ("group", "dynamic"))
               for g in (quantization.get("config_groups") or {}).values() if (w := (g or {}).get("weights"))}
    bits, group, kind, strategy, order = next(iter(schemes)) if len(schemes) == 1 else (0, 0, "", "", False)
    # 3, 5, 6 and 7 bits were packed with padding before compressed-tensors 0.12 and densely since, in one format
    if kind != "int" or bits not in (2, 4, 8) or strategy not in ("tensor", "channel", "group"):
        raise NotImplementedError(f"compressed-tensors' pack-quantized groups of weights {sorted(map(str, schemes))}"
                                  " are not read (read: one integer scheme of 2, 4 or 8 bits per tensor, channel "
                                  "or group for every packed weight)")
    return Packing("compressed-tensors", int(bits), group if strategy == "group" else 0, reordered=order)


def width(p: Packing | None) -> str | None:
    """The width (`int4` or `int8`, as `--quantization` names them) that `--quantization auto` keeps a packed
    checkpoint in where the CPU kernel runs: int4 for integers of up to 4 bits in groups of 32 inputs or a multiple
    (per channel too), which Q4_1 holds as they are (`quant._steps`); int8 for wider ones, and for uneven levels
    (NF4, FP4) or groups that Q4_1's blocks of 32 would cut across, which int4 would round again; None: not packed."""
    if p is None:
        return None
    grid = p.layout in ("gptq", "awq", "compressed-tensors") and not p.reordered and p.group_size % 32 == 0
    return "int4" if p.bits <= 4 and grid else "int8"


def packed_weights(p: Packing, names: set[str]) -> dict[str, dict[str, str]]:
    """Each packed weight's name (`X.weight`) -> its parts' names in the checkpoint, by part (`PARTS`), among
    `names`."""
    out = {}
    for name in names:
        for mark in PARTS[p.layout][:MARKS.get(p.layout, 1)]:
            if name.endswith("." + mark):
                prefix = name[:-len(mark)]
                out[prefix + "weight"] = {part: prefix + part for part in PARTS[p.layout] if prefix + part in names}
    return out


def unpack(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    """The first `n` unsigned `bits`-bit values (up to 8) packed along `axis` of integer `words` (int32, or GPTQModel's
    other `pack_dtype`s), densely from each word's lowest bit (a value may straddle two words), as uint8 with that
    axis last."""
    w = np.ascontiguousarray(np.moveaxis(np.asarray(words), axis, -1))
    w = w.astype(w.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    if w.shape[-1] * 8 < n * bits:
        raise ValueError(f"{w.shape[-1]} bytes do not hold {n} values of {bits} bits")
    if 8 % bits == 0:  # whole fields in each byte: 1, 2, 4 or 8 bits
        if bits == 8:
            return w[..., :n]
        fields = (w[..., None] >> np.arange(0, 8, bits, dtype=np.uint8)) & np.uint8((1 << bits) - 1)
        return fields.reshape(*w.shape[:-1], -1)[..., :n]
    stream = np.unpackbits(w, axis=-1, bitorder="little")[..., :n * bits].reshape(*w.shape[:-1], n, bits)
    return np.packbits(stream, axis=-1, bitorder="little")[..., 0]


def _weights(q: np.ndarray, zero: np.ndarray, scale: np.ndarray, g_idx: np.ndarray | None, group_size: int,
             name: str) -> np.ndarray:
    """`(q - zero) * scale` as float32 `[out, in]`, from the values `q [out, in]` and each output row's zero points
    and scales by group `[out, groups]`, a group being an input's `g_idx`, else a run of `group_size` inputs (the
    last one short where they do not divide the inputs, as AutoGPTQ and compressed-tensors count them)."""
    (n_out, n_in), groups = q.shape, scale.shape[1]
    if groups == 1:
        size = n_in
    elif group_size:  # the config's, the last group maybe short; one that disagrees with the scales is no size
        size = group_size if -(-n_in // group_size) == groups else 0
    else:
        size = n_in // groups if n_in % groups == 0 else 0
    runs = np.arange(n_in) // size if size else None
    g = runs if g_idx is None else np.asarray(g_idx, np.int64)
    if g is None or g.shape != (n_in,) or g.min(initial=0) < 0 or g.max(initial=0) >= groups:
        raise ValueError(f"{name}: {groups} groups of scales do not cover its {n_in} inputs"
                         + (" by its g_idx" if g_idx is not None else f" in groups of {group_size}" if group_size
                            else ""))
    if runs is None or groups * size != n_in or not np.array_equal(g, runs):  # `desc_act`, or a short last group
        w = np.empty((n_out, n_in), np.float32)
        for r in range(0, n_out, 1024):  # each input's zero point and scale gathered for 1,024 rows at a time
            w[r:r + 1024] = (q[r:r + 1024] - zero[r:r + 1024, g]) * scale[r:r + 1024, g]
        return w
    w = q.reshape(n_out, groups, size).astype(np.float32)  # consecutive runs: no gather
    w -= zero[..., None]
    w *= scale[..., None]
    return w.reshape(n_out, n_in)


def dequantize(p: Packing, name: str, parts: dict[str, str], read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The packed weight `name` as float32 `[out, in]`, from its `parts` (`packed_weights`) read by `read`."""
    get = {part: read(full) for part, full in parts.items()}
    if p.layout == "bitsandbytes":
        return _bitsandbytes(get)
    if p.layout == "modelopt-nvfp4":  # float8 scales per 16 inputs, times one float32 scale for the tensor
        scale = np.asarray(get["weight_scale"], np.float32) * np.float32(np.asarray(get["weight_scale_2"]).item())
        return _fp4(get["weight"], scale, name)
    if p.layout == "fp4":  # NVFP4: float8 scales over the tensor's global scale; MXFP4: powers of two (E8M0)
        scale = get["weight_scale"]
        if scale.dtype == np.uint8:
            return _fp4(get["weight_packed"], np.ldexp(np.float32(1), scale.astype(np.int32) - 127), name)
        glob = np.float32(np.asarray(get.get("weight_global_scale", 1.0)).item())
        return _fp4(get["weight_packed"], np.asarray(scale, np.float32) / glob, name)
    if p.layout == "compressed-tensors":  # signed values stored offset by 2^(bits-1), their zero points too
        shape = tuple(int(x) for x in get["weight_shape"])
        if len(shape) != 2:
            raise NotImplementedError(f"{name}: a pack-quantized weight of shape {shape} (read: two axes)")
        scale = np.asarray(get["weight_scale"], np.float32)
        scale = np.full((shape[0], 1), scale.item(), np.float32) if scale.size == 1 else scale.reshape(shape[0], -1)
        q = unpack(get["weight_packed"], p.bits, shape[1], axis=-1)
        zero, points = np.zeros(scale.shape, np.float32), get.get("weight_zero_point")
        if points is not None and points.shape[0] == -(-shape[0] * p.bits // 32) != shape[0]:  # packed by output
            zero = unpack(points, p.bits, shape[0], axis=0).T.astype(np.float32)
        elif points is not None:  # signed, unpacked (older checkpoints; the tensor strategy's still)
            points = np.asarray(points, np.float32)
            zero += points.item() if points.size == 1 else points.reshape(scale.shape)
            zero += 1 << (p.bits - 1)
        else:  # symmetric: zero at 0, offset as the values are
            zero += 1 << (p.bits - 1)
        return _weights(q, zero, scale, get.get("weight_g_idx"), p.group_size, name)
    if "qzeros" not in get:
        raise ValueError(f"{name}: a {p.layout} weight without its qzeros")
    scale = np.asarray(get["scales"], np.float32).T  # [out, groups]
    n_out = scale.shape[0]
    if p.layout == "gptq":  # the inputs packed down each output's column
        words = get["qweight"]
        n_in = len(get["g_idx"]) if "g_idx" in get else words.shape[0] * words.dtype.itemsize * 8 // p.bits
        q = unpack(words, p.bits, n_in, axis=0)  # [out, in]
        zero = unpack(get["qzeros"], p.bits, n_out, axis=1).T  # [out, groups]
        zero = (zero + 1) & ((1 << p.bits) - 1) if p.zero_minus_one else zero
        return _weights(q, zero.astype(np.float32), scale, get.get("g_idx"), p.group_size, name)
    order = (np.arange(n_out).reshape(-1, 8)[:, np.argsort(AWQ_ORDER)]).ravel()  # a word's fields -> columns
    q = np.ascontiguousarray(unpack(get["qweight"], p.bits, n_out, axis=1)[:, order].T)  # [out, in]
    zero = unpack(get["qzeros"], p.bits, n_out, axis=1)[:, order].T.astype(np.float32)
    return _weights(q, zero, scale, None, p.group_size, name)


def fp4(codes: np.ndarray) -> np.ndarray:
    """The float32 values of FP4 (E2M1) codes packed two a byte, the first in the low nibble: `[..., n]` bytes ->
    `[..., 2n]` (OCP's MX formats, NVFP4)."""
    codes = np.asarray(codes).view(np.uint8)
    return FP4_VALUES[np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)]


def _fp4(codes: np.ndarray, scale: np.ndarray, name: str) -> np.ndarray:
    """FP4 codes `[out, in / 2]` (`fp4`) times their group's `scale [out, groups]`, as float32 `[out, in]`."""
    values = fp4(codes)
    if scale.ndim != 2 or values.shape[1] % scale.shape[1]:
        raise ValueError(f"{name}: scales of shape {scale.shape} do not cover FP4 weights of shape {values.shape}")
    w = values.reshape(values.shape[0], scale.shape[1], -1) * scale[..., None]
    return w.reshape(values.shape)


def _bitsandbytes(get: dict[str, np.ndarray]) -> np.ndarray:
    """A bitsandbytes weight as float32, from its parts by name (the module doc)."""
    if "SCB" in get:  # LLM.int8(): int8 rows scaled by each row's absolute maximum over 127
        return np.asarray(get["weight"], np.float32) * (np.asarray(get["SCB"], np.float32)[:, None] / 127)
    state = json.loads(bytes(next(v for k, v in get.items() if k.startswith("weight.quant_state."))))
    shape, block = tuple(state["shape"]), int(state["blocksize"])
    absmax = np.asarray(get["weight.absmax"])
    if "weight.nested_absmax" in get:  # double quantization: the blocks' maxima are themselves 8-bit codes
        nested = np.repeat(np.asarray(get["weight.nested_absmax"], np.float32), int(state["nested_blocksize"]))
        absmax = np.asarray(get["weight.nested_quant_map"], np.float32)[absmax] * nested[:absmax.size]
        absmax += np.float32(state["nested_offset"])
    n = int(np.prod(shape))
    codes = np.ascontiguousarray(get["weight"]).view(np.uint8).reshape(-1)  # any storage dtype: its bytes
    codes = np.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)[:n]
    w = np.asarray(get["weight.quant_map"], np.float32)[codes]
    w *= np.repeat(np.asarray(absmax, np.float32), block)[:n]
    return w.reshape(shape)
