"""Weight sources (HF folder with safetensors, or GGUF), the explicit name table, and the orbax conversion cache."""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import re
import threading
from typing import Any, Callable, Iterator

import numpy as np

from models.config import ModelConfig
from models.loading import packed

log = logging.getLogger("sparkler.models")

# Counts of how parameters were obtained in this process (tests read these).
STATS = {"converted": 0, "cached": 0, "direct": 0}
CONVERTER_VERSION = "2"  # 2: int4 keeps the grid a block of 4-bit values lies on (quant._steps)
with open(__file__, "rb") as _f:  # what `remembered` computes comes from this file: a change here recomputes it
    _SOURCE = hashlib.sha256(_f.read()).hexdigest()[:16]


@dataclasses.dataclass
class Source:
    """A checkpoint on disk: its config dict, tensor names, and a reader that returns float32/bf16 numpy arrays."""

    kind: str  # "hf" or "gguf"
    path: str
    files: tuple[str, ...]
    config: dict[str, Any]
    generation_config: dict[str, Any]
    names: tuple[str, ...]
    read: Callable[[str], np.ndarray]
    metadata: Callable[[], dict[str, Any]] = dict  # GGUF metadata, read when first needed
    quantized: bool = False  # holds quantized tensors, dequantized as they are read (GGUF, MXFP4, FP8, packed)
    stored: str | None = None  # the width `--quantization auto` keeps a packed checkpoint in (`packed.width`)

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        """GGUF metadata (empty for an HF folder)."""
        return self.metadata()

    def content_hash(self) -> str:
        """sha256 over the source files' bytes (the cache key), remembered by their paths, sizes and times."""

        def digest() -> str:
            h = hashlib.sha256(CONVERTER_VERSION.encode())
            for f in self.files:
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
            return h.hexdigest()[:32]

        return remembered("content", self.files, digest)


def remembered(kind: str, files: tuple[str, ...], compute: Callable[[], Any]) -> Any:
    """`compute()`, kept in `$SPARKLER_CACHE/remembered/` under the files' paths, sizes and modification times, so
    a warm start neither hashes nor parses a weights file again (a file that changes gets a new entry)."""
    stat = [(os.path.abspath(f), st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)]]
    key = hashlib.sha256(repr((kind, CONVERTER_VERSION, _SOURCE, stat)).encode()).hexdigest()[:32]
    return json_file(os.path.join(cache_root(), "remembered", f"{kind}-{key}.json"), compute)[0]


def json_file(path: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """The JSON value at `path`, else `compute()`'s, written there (whole or not at all); and whether it was read.
    A cache that cannot be written (read-only, full) only logs: the value is computed again next time."""
    try:
        with open(path) as f:
            return json.load(f), True
    except (OSError, ValueError):
        pass
    value = compute()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("sparkler: cannot keep %s (%s)", path, e)
    return value, False


def open_source(path: str) -> Source:
    """Open an HF folder or a `.gguf` file (any part of a split one)."""
    if os.path.isdir(path):
        return _open_hf(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return _open_gguf(path)
    raise FileNotFoundError(f"{path!r} is neither an HF model folder nor a .gguf file")


# safetensors' dtype names, as numpy (or ml_dtypes) dtypes.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
                      "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                      "F8_E8M0": "float8_e8m0fnu"}


SCALED_DTYPES = ("F8_E4M3", "F8_E5M2", "I8")  # weights stored so beside their scales (`scaled_dequantize`)


def safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Each tensor of a safetensors file: `(safetensors dtype, shape, first byte, end byte)` in the file, from its
    header (a little-endian u64 length, then that many bytes of JSON; offsets count from the header's end)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items()}


def _np(name: str) -> np.dtype:
    """A safetensors dtype name as numpy's (ml_dtypes' for bfloat16 and the float8 kinds)."""
    if name not in SAFETENSORS_DTYPES:
        raise ValueError(f"safetensors dtype {name!r} is not supported")
    name = SAFETENSORS_DTYPES[name]
    return np.dtype(name) if hasattr(np, name) else _np_dtype(name)


def _open_hf(folder: str) -> Source:
    """An HF folder. Its tensors are read from memory maps of the files (the safetensors format is a JSON header and
    raw little-endian bytes): no copy until conversion, and nothing on a device. The safetensors library's numpy
    loader has no bfloat16, and its flax loader puts each tensor on the default device (a GPU's, on a GPU host)."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    gen_path = os.path.join(folder, "generation_config.json")
    gen = json.load(open(gen_path)) if os.path.exists(gen_path) else {}
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted({os.path.join(folder, f) for f in json.load(open(index))["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no safetensors in {folder}")
    where: dict[str, tuple[str, tuple[str, tuple[int, ...], int, int]]] = {}
    for f in files:
        for k, entry in safetensors_header(f).items():
            where[k] = (f, entry)
    maps: dict[str, np.memmap] = {}

    def tensor(name: str) -> np.ndarray:
        f, (dtype, shape, start, end) = where[name]
        if start == end:  # np.memmap cannot map nothing
            return np.zeros(shape, _np(dtype))
        if f not in maps:
            maps[f] = np.memmap(f, np.uint8, mode="r")
        return maps[f][start:end].view(_np(dtype)).reshape(shape)

    # MXFP4 tensors (gpt-oss's experts) are stored as `X_blocks` and `X_scales`; they read as `X`, dequantized.
    mxfp4 = {k[:-len("_blocks")] for k in where if k.endswith("_blocks") and k[:-len("_blocks")] + "_scales" in where}
    # FP8 (or int8) weights with their scales: `X.weight` and `X.weight_scale_inv` (DeepSeek's and Qwen's `-FP8`
    # checkpoints) or `X.weight_scale` (compressed-tensors'); they read as `X.weight`, dequantized, and the scales of
    # the activations (`X.input_scale`, for FP8 products) go unused.
    scaled = {k.removesuffix("_inv").removesuffix("_scale"): k for k in where
              if k.endswith((".weight_scale_inv", ".weight_scale"))
              and where.get(k.removesuffix("_inv").removesuffix("_scale"), ("", ("",)))[1][0] in SCALED_DTYPES}
    quantization = _quantization(folder, config, any(k.endswith(packed.MARKED) for k in where))
    block = fp8_block(quantization)
    # weights packed into words or bytes (GPTQ, AWQ, compressed-tensors' packed ints and FP4, ModelOpt's NVFP4,
    # bitsandbytes): each reads as `X.weight`, dequantized from its parts (`models.loading.packed`)
    pack = packed.packing(quantization)
    ints = packed.packed_weights(pack, set(where)) if pack else {}
    parts = {full for p in ints.values() for full in p.values()}
    _check_quantized(folder, quantization, {k: v[1][0] for k, v in where.items() if k not in parts}, set(scaled))

    def read(name: str) -> np.ndarray:
        if name in mxfp4:
            return mxfp4_dequantize(tensor(f"{name}_blocks"), tensor(f"{name}_scales"))
        if name in scaled:
            return scaled_dequantize(tensor(name), tensor(scaled[name]), block)
        if name in ints:
            return packed.dequantize(pack, name, ints[name], tensor)
        return tensor(name)

    # the activations' scales, and those of a KV cache in FP8 (this server keeps its own `--kv-cache-dtype`)
    unused = set(scaled.values()) | {k for k in where if k.endswith(ACTIVATION_SCALES)} | parts
    names = tuple(k for k in where if (not k.endswith(("_blocks", "_scales")) or k.rsplit("_", 1)[0] not in mxfp4)
                  and k not in unused)
    config, names, read = _as_causal_lm(*_as_multimodal(config, names, read))
    files_all = tuple(files) + (os.path.join(folder, "config.json"),)
    return Source("hf", folder, files_all, config, gen, names + tuple(sorted({*mxfp4, *ints})), read,
                  quantized=bool(mxfp4 or scaled or ints), stored=packed.width(pack) if ints else None)


# Quantizers that keep their settings beside config.json rather than in it: AutoGPTQ, AutoAWQ, NVIDIA ModelOpt.
SIDE_CONFIGS = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"), ("hf_quant_config.json", "modelopt"))


def _quantization(folder: str, config: dict, packed_parts: bool) -> dict:
    """A checkpoint's `quantization_config`: config.json's, else, where its tensors hold packed weights
    (`packed_parts`), the file its quantizer wrote beside it (`SIDE_CONFIGS`; ModelOpt's under `quantization`), its
    `quant_method` named where the file leaves it out. A side file that is no JSON object is passed over."""
    if config.get("quantization_config") or not packed_parts:
        return config.get("quantization_config") or {}
    for file, method in SIDE_CONFIGS:
        try:
            with open(os.path.join(folder, file)) as f:
                side = json.load(f)
        except (OSError, ValueError):
            continue
        side = side.get("quantization", side) if method == "modelopt" and isinstance(side, dict) else side
        if isinstance(side, dict):
            return {"quant_method": method, **side}
    return {}


# The models that read pictures: their language models' `text_config.model_type` -> the causal LM's architecture.
MULTIMODAL_TEXT = {
    "LlavaForConditionalGeneration": {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                      "qwen2": "Qwen2ForCausalLM"},
    "Gemma3ForConditionalGeneration": {"gemma3_text": "Gemma3ForCausalLM"},
}


# A multimodal checkpoint's language-model tensors (transformers 4's names, then 5's) -> the causal LM's names.
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def text_name(name: str) -> str | None:
    """The causal LM's name of a multimodal checkpoint's language-model tensor `name` (`TEXT_PREFIXES`), else None
    (a tower's or projector's tensor)."""
    for old, new in TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def _as_multimodal(config: dict, names: tuple[str, ...], read: Callable) -> tuple[dict, tuple[str, ...], Callable]:
    """A LLaVA or Gemma 3 folder (`...ForConditionalGeneration`) read as its language model's, the whole config under
    `multimodal` and the other tensors' names (the vision tower's and projector's: `models.vision`) under
    `multimodal_tensors`, read by those names. Its language model's tensors are `language_model.model.*` and
    `language_model.lm_head.*` (transformers 4) or `model.language_model.*` and `lm_head.*` (5); they read as the
    causal LM's `model.*` and `lm_head.*`."""
    arch = (config.get("architectures") or [""])[0]
    if arch not in MULTIMODAL_TEXT:
        return config, names, read
    text = dict(config.get("text_config") or {})
    kind = text.get("model_type", "llama")
    if kind not in MULTIMODAL_TEXT[arch]:
        raise NotImplementedError(f"a {arch} language model of type {kind!r} is not supported; known: "
                                  f"{sorted(MULTIMODAL_TEXT[arch])}")
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    ours, tower = {}, []
    for n in names:
        if (lm := text_name(n)) is not None:
            ours[lm] = n
        else:
            tower.append(n)
    text.update(architectures=[MULTIMODAL_TEXT[arch][kind]], multimodal=config, multimodal_tensors=tower)
    return text, tuple(ours), lambda name: read(ours.get(name, name))


def _as_causal_lm(config: dict, names: tuple[str, ...], read: Callable) -> tuple[dict, tuple[str, ...], Callable]:
    """A bare decoder's folder (how sentence-transformers saves an embedding model, as e5-mistral's `MistralModel` or
    Qwen3-Embedding's tensors without the `model.` prefix) read as its causal LM's: the architecture's `...Model` as
    `...ForCausalLM`, the tensors under the causal LM's names, and with no LM head the embedding tied in its place, so
    the same family serves its embeddings (`models.pooling`). A cross-encoder's (`...ForSequenceClassification`: a
    reranker) is read so too, its classification head (`score.weight`) left to `models.pooling.classifier`."""
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith(("Model", "ForSequenceClassification")):
        base = arch.removesuffix("Model").removesuffix("ForSequenceClassification")
        config = {**config, "architectures": [base + "ForCausalLM"]}
        names = tuple(n for n in names if n not in ("score.weight", "score.bias"))
    if "embed_tokens.weight" in names and "model.embed_tokens.weight" not in names:
        names, bare = tuple(f"model.{n}" for n in names), read
        read = lambda name: bare(name.removeprefix("model."))  # noqa: E731
    if "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
        config = {**config, "tie_word_embeddings": True}
    return config, names, read


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An MXFP4 tensor as float32, in the layout of the same checkpoint unquantized: `blocks [E, out, G, 16]` bytes
    of two FP4 codes each (low nibble first) and `scales [E, out, G]`, a power-of-two exponent biased by 127 per
    block of 32 -> `[E, G * 32, out]` (the OCP MX format; gpt-oss stores its experts so, output rows first)."""
    w = np.ldexp(packed.fp4(blocks), (scales.astype(np.int32) - 127)[..., None])
    return np.ascontiguousarray(w.reshape(*w.shape[:-2], -1).swapaxes(-1, -2))


ACTIVATION_SCALES = (".input_scale", ".output_scale", ".k_scale", ".v_scale", ".kv_scale", ".input_global_scale")
# The quantized checkpoints read here (dequantized): MXFP4 experts, FP8 (or int8) weights beside their scales
# (DeepSeek's and Qwen's `fp8`, compressed-tensors', Meta's `fbgemm_fp8`, NVIDIA ModelOpt's FP8), and the packed
# layouts of `models.loading.packed`; None: any format.
READ_QUANTIZED = {"mxfp4": None, "fp8": None, "fbgemm_fp8": None, "modelopt": None, "gptq": None, "awq": None,
                  "bitsandbytes": None,
                  "compressed-tensors": ("float-quantized", "naive-quantized", "int-quantized", "pack-quantized",
                                         "nvfp4-pack-quantized", "mxfp4-pack-quantized")}


def _check_quantized(folder: str, quantization: dict, dtypes: dict[str, str], scaled: set[str]) -> None:
    """Refuse, before any tensor is read, a checkpoint quantized in a way this reader does not dequantize
    (HQQ, packed parts outside the layouts of `models.loading.packed`) and a float8 or int8 weight
    with no scale beside it, naming what it is and what to serve instead."""
    method, form = quantization.get("quant_method"), quantization.get("format")
    known = method is None or method in READ_QUANTIZED and (READ_QUANTIZED[method] is None or form is None
                                                             or form in READ_QUANTIZED[method])
    bare = sorted(k for k, dtype in dtypes.items() if dtype in SCALED_DTYPES and k not in scaled)
    parts = sorted(k for k in dtypes if k.endswith(("_zero_point", "_packed", "_g_idx", "_scale_2", ".qweight",
                                                    ".absmax", ".SCB")))
    if not known or bare or parts:
        what = (f"quantized by {method}" + (f" ({form})" if form else "") if not known else
                f"quantized with tensors such as {parts[0]}" if parts else
                f"stored as {dtypes[bare[0]]} with no scale beside them (e.g. {bare[0]})")
        raise NotImplementedError(f"{folder}: its weights are {what}, which this server does not read; serve the "
                                  "unquantized checkpoint, an FP8, NVFP4, GPTQ, AWQ, compressed-tensors or "
                                  "bitsandbytes one, or a GGUF file (--quantization int8, int4 or fp8 then "
                                  "quantizes here)")


def fp8_block(quantization: dict) -> tuple[int, int] | None:
    """The block of a weight that one scale covers, from a checkpoint's `quantization_config`: `weight_block_size`
    (DeepSeek's and Qwen's FP8, 128 x 128) or a compressed-tensors group's `block_structure`; None where it names
    none (a scale per tensor or per output row, told apart by the scales' shape)."""
    size = quantization.get("weight_block_size")
    for group in (quantization.get("config_groups") or {}).values():
        size = size or ((group or {}).get("weights") or {}).get("block_structure")
    return tuple(size) if size else None


def scaled_dequantize(w: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None = None) -> np.ndarray:
    """A weight `w [..., out, in]` stored as FP8 (or int8) with its scales, as float32 `w * scale`: one scale for all
    (`[]` or `[1]`), one per output row (`[..., out, 1]`), or one per `block` of rows and columns (`[..., ceil(out /
    rows), ceil(in / cols)]`, the last block of each axis possibly cut short: DeepSeek-V3's `kv_a_proj_with_mqa` has
    576 rows in blocks of 128). Without a `block`, a grid's block is the smallest power of two that gives it."""
    w32, s = np.asarray(w, np.float32), np.asarray(scale, np.float32)
    if s.size == 1:
        return w32 * s.reshape(())
    if s.shape in (w.shape[:-1] + (1,), w.shape[:-1]):
        return w32 * s.reshape(*w.shape[:-1], 1)
    grid = s.shape[-2:]
    sizes = block or tuple(next((1 << b for b in range(31) if -(-n // (1 << b)) == g), 0)
                           for n, g in zip(w.shape[-2:], grid))
    if s.ndim != w.ndim or any(not b or -(-n // b) != g for n, g, b in zip(w.shape[-2:], grid, sizes)):
        raise ValueError(f"scales of shape {s.shape} do not cover a weight of shape {w.shape} "
                         f"in blocks of {block or 'any size'}")
    s = np.repeat(np.repeat(s, sizes[0], axis=-2), sizes[1], axis=-1)
    return w32 * s[..., :w.shape[-2], :w.shape[-1]]


def gguf_metadata(reader) -> dict[str, Any]:
    """Every GGUF key/value field as plain Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


_GGUF_LOCK = threading.Lock()  # conversion reads on a thread pool: a file is parsed once


_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")  # llama.cpp's `gguf-split` parts


def gguf_parts(path: str) -> tuple[str, ...]:
    """The files of the GGUF at `path`: itself, or every part of the `gguf-split` set it names
    (`NAME-00001-of-00003.gguf`, ...; any part may be named), in order; a missing part is a `FileNotFoundError`."""
    m = _SPLIT_NAME.match(path)
    if not m or int(m.group(3)) < 2:
        return (path,)
    n = int(m.group(3))
    if not 1 <= int(m.group(2)) <= n:
        raise ValueError(f"{path}: part {int(m.group(2))} of {n} is no part of a split GGUF")
    parts = tuple(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1))
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{path} is one of {n} parts; missing: {', '.join(missing[:3])}")
    return parts


@functools.lru_cache(maxsize=64)  # every part of a split file, kept
def _gguf_reader(path: str, stamp: tuple[int, int]):
    """A GGUF file parsed, kept for the process's next load of it (a load of each precision converts it again);
    `stamp` (its size and modification time) parses a changed file anew."""
    import gguf

    return gguf.GGUFReader(path)


def _open_gguf(path: str) -> Source:
    """A GGUF file, or the parts of a split one (`gguf_parts`: llama.cpp's first part holds the metadata, each part
    some of the tensors; the big mixtures of experts are published so). Parsing its metadata takes seconds (the
    vocabulary is ~100k small fields), so the config, generation config and tensor names are remembered and the
    files are read again only to convert them or to build the tokenizer, once a process (`_gguf_reader`)."""
    import gguf

    parts = gguf_parts(path)

    def reader(part: str = parts[0]):
        st = os.stat(part)
        with _GGUF_LOCK:
            return _gguf_reader(part, (st.st_size, st.st_mtime_ns))

    def metadata() -> dict[str, Any]:
        meta = gguf_metadata(reader())
        if meta.get("split.count", 1) != len(parts):
            raise ValueError(f"{parts[0]} says it is one of {meta.get('split.count', 1)} parts, not {len(parts)}")
        return meta

    def summary() -> dict[str, Any]:
        meta = metadata()
        gen = {"eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
               "bos_token_id": meta.get("tokenizer.ggml.bos_token_id")}
        return {"config": gguf_config(meta, tensors()), "gen": gen, "names": list(tensors())}

    @functools.cache
    def tensors() -> dict[str, Any]:
        return {t.name: t for part in parts for t in reader(part).tensors}

    def read(name: str) -> np.ndarray:
        t = tensors()[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    known = remembered("gguf", parts, summary)
    return Source("gguf", parts[0], parts, known["config"], known["gen"], tuple(known["names"]), read, metadata,
                  quantized=True)


_GGUF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
              "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "glm4": "Glm4ForCausalLM",
              "glm4moe": "Glm4MoeForCausalLM", "starcoder2": "Starcoder2ForCausalLM", "command-r": "CohereForCausalLM",
              "cohere2": "Cohere2ForCausalLM", "phi2": "PhiForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
              "qwen3moe": "Qwen3MoeForCausalLM", "deepseek2": "DeepseekV2ForCausalLM", "gpt-oss": "GptOssForCausalLM",
              "arcee": "ArceeForCausalLM", "seed_oss": "SeedOssForCausalLM", "ernie4_5": "Ernie4_5ForCausalLM",
              "exaone4": "Exaone4ForCausalLM", "olmoe": "OlmoeForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
              "ernie4_5-moe": "Ernie4_5_MoeForCausalLM", "dots1": "Dots1ForCausalLM",
              "minimax-m2": "MiniMaxM2ForCausalLM"}
# llama.cpp's Gemma 2 and 3 scale queries by 1/sqrt(hidden / heads) at 27B (46 and 62 layers), else by the head's
# width (`llama-model.cpp`); their files keep no `query_pre_attn_scalar`.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gguf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """An HF-style `config.json` dict from GGUF metadata."""
    arch = meta["general.architecture"]
    if arch not in _GGUF_ARCH:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported")

    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = g("attention.head_count")
    hidden = g("embedding_length")
    head_dim = g("attention.key_length") or hidden // heads
    vocab = g("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    d = {
        "architectures": [_GGUF_ARCH[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "max_position_embeddings": g("context_length"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "layer_norm_eps": g("attention.layer_norm_epsilon"),  # LayerNorm families' (StarCoder2, Cohere, Phi-2)
        "rope_theta": g("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rot = g("rope.dimension_count")
    if rot and rot < head_dim and arch != "deepseek2":  # a partial rotary factor (MLA's RoPE width is its own)
        d["partial_rotary_factor"] = rot / head_dim
    window, pattern = g("attention.sliding_window"), g("attention.sliding_window_pattern")
    if window:  # the families whose configs read it (`ModelConfig.from_hf`) slide by it
        d["sliding_window"] = window
    if isinstance(pattern, list):  # which layers slide
        d["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    elif pattern:  # a period (`from_hf`'s defaults where there is none)
        d["sliding_window_pattern"] = pattern
    if g("pooling_type") is not None:  # how an embedding model's vectors are pooled (`models.pooling`)
        d["pooling_type"] = int(g("pooling_type"))
    scaling = g("rope.scaling.type")
    if scaling == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    elif scaling == "yarn":
        d["rope_scaling"] = {"rope_type": "yarn", "factor": g("rope.scaling.factor"),
                             "original_max_position_embeddings": g("rope.scaling.original_context_length"),
                             "beta_fast": g("rope.scaling.yarn_beta_fast", 32.0),
                             "beta_slow": g("rope.scaling.yarn_beta_slow", 1.0)}
    elif scaling not in (None, "none"):
        raise NotImplementedError(f"GGUF RoPE scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in tensors:  # each frequency's divisor: how llama.cpp's converter writes Llama 3's scaling
        if "rope_scaling" in d:
            raise NotImplementedError(f"GGUF RoPE scaling {scaling!r} beside frequency factors is not supported")
        factors = np.asarray(tensors["rope_freqs.weight"].data, np.float32).reshape(-1)
        d["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
    if arch.startswith("gemma"):
        d["hidden_activation"] = "gelu_pytorch_tanh"
    if arch in ("gemma2", "gemma3"):  # sliding layers: every other, first (2); five of six, then a full one (3)
        scalar = hidden // heads if d["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch] else head_dim
        d.update(query_pre_attn_scalar=scalar, sliding_window=window or 4096,
                 final_logit_softcapping=g("final_logit_softcapping"),
                 attn_logit_softcapping=g("attn_logit_softcapping"))
    if arch == "phi3" and "rope_factors_long.weight" in tensors:  # LongRoPE: its factor lists are tensors of the file
        lists = {f"{k}_factor": np.asarray(tensors[f"rope_factors_{k}.weight"].data, np.float32).tolist()
                 for k in ("long", "short")}
        d["rope_scaling"] = {"rope_type": "longrope", "attention_factor": g("rope.scaling.attn_factor"),
                             "original_max_position_embeddings": g("rope.scaling.original_context_length"), **lists}
    if arch in ("granite", "granitemoe"):  # the multipliers as the checkpoint's config names them (the logits are
        # divided)
        d.update(embedding_multiplier=g("embedding_scale", 1.0), residual_multiplier=g("residual_scale", 1.0),
                 attention_multiplier=g("attention.scale", 0.0), logits_scaling=g("logit_scale", 1.0))
    if arch == "olmo2" and window:  # OLMo 3: a window on the layers its pattern marks
        d["architectures"] = ["Olmo3ForCausalLM"]
    if arch in ("glm4", "glm4moe"):
        if g("rope.dimension_sections"):  # GLM-4V's multimodal RoPE
            raise NotImplementedError(f"GGUF {arch!r} with multimodal RoPE sections (GLM-4V) is not supported")
        d.update(attention_bias="blk.0.attn_q.bias" in tensors, use_qk_norm="blk.0.attn_q_norm.weight" in tensors)
    if arch in ("glm4moe", "dots1"):  # DeepSeek-V3's routing; `block_count` counts GLM's prediction layers too
        d.update(num_hidden_layers=d["num_hidden_layers"] - g("nextn_predict_layers", 0),
                 n_routed_experts=g("expert_count"), n_shared_experts=g("expert_shared_count", 0),
                 first_k_dense_replace=g("leading_dense_block_count", 0),
                 routed_scaling_factor=g("expert_weights_scale", 1.0), norm_topk_prob=g("expert_weights_norm", False),
                 n_group=g("expert_group_count") or 1, topk_group=g("expert_group_used_count") or 1)
    if arch in ("starcoder2", "phi2"):  # GELU's tanh form, which llama.cpp's graph for them hardcodes
        d["hidden_act"] = "gelu_pytorch_tanh"
    if arch == "arcee":  # ReLU squared, which llama.cpp's graph for it hardcodes
        d["hidden_act"] = "relu2"
    if arch == "seed_oss":  # biased q/k/v; the output's bias apart
        d.update(attention_bias="blk.0.attn_q.bias" in tensors,
                 attention_out_bias="blk.0.attn_output.bias" in tensors)
    if arch == "ernie4_5-moe":  # MoE layers from the leading dense ones, every `step`; its shared experts as one
        d.update(moe_layer_start_index=g("leading_dense_block_count", 0),
                 moe_layer_interval=g("interleave_moe_layer_step", 1))
    if arch == "ernie4_5":  # biases on every projection, or none
        d["use_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "starcoder2":  # biases where the file has them; llama.cpp's files keep no window (nor does it use one)
        d["use_bias"] = "blk.0.attn_q.bias" in tensors
    if arch in ("command-r", "cohere2"):  # the logits' multiplier as it is (q/k norms: refused by `from_hf`)
        d.update(logit_scale=g("logit_scale", 1.0), use_qk_norm="blk.0.attn_q_norm.weight" in tensors)
    if g("expert_count"):  # llama.cpp's MoE metadata; Mixtral is a `llama` GGUF with experts
        if arch == "llama":
            d["architectures"] = ["MixtralForCausalLM"]
        d.update(num_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"),
                 moe_intermediate_size=g("expert_feed_forward_length") or d["intermediate_size"],
                 shared_expert_intermediate_size=g("expert_shared_feed_forward_length") or 0,
                 norm_topk_prob=g("expert_weights_norm", arch == "qwen3moe"))
        d["intermediate_size"] = d["intermediate_size"] or d["moe_intermediate_size"]
        if arch == "granitemoe" and d["shared_expert_intermediate_size"]:  # Granite 4.0's shared expert
            d.update(architectures=["GraniteMoeSharedForCausalLM"],
                     shared_intermediate_size=d.pop("shared_expert_intermediate_size"))
    if arch == "deepseek2":
        d.update(_deepseek2_config(g, d))
    if arch == "minimax-m2" and g("expert_gating_func") == 1:  # the converter's softmax: no release, nor transformers
        raise NotImplementedError("GGUF 'minimax-m2' routed by softmax is not supported (MiniMax-M2 routes by sigmoid)")
    if arch == "gpt-oss":  # biased attention, sliding layers first; its checkpoints' YaRN does not truncate
        d.update(attention_bias=True, intermediate_size=d["moe_intermediate_size"])
        if "rope_scaling" in d:
            d["rope_scaling"]["truncate"] = False
    return d


def _deepseek2_config(g: Callable[..., Any], d: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2/V3's fields from llama.cpp's `deepseek2` metadata: latent attention (its file says one KV head
    and a 576-wide key; the per-head widths are the `_mla` lengths), interleaved RoPE pairs (GGML's "normal" RoPE on
    the weights as they are), and routing by sigmoid (V3) or softmax (V2), grouped when there are groups. YaRN's
    `mscale_all_dim` is kept as `yarn_log_multiplier / 0.1` (rounded to 6 places: the file holds float32);
    llama.cpp has no separate `mscale`, which DeepSeek's checkpoints set equal to it."""
    rope = g("rope.dimension_count")
    sigmoid = g("expert_gating_func") == 2
    groups = g("expert_group_count") or 1
    out = dict(architectures=["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
               num_key_value_heads=d["num_attention_heads"], kv_lora_rank=g("attention.kv_lora_rank"),
               q_lora_rank=g("attention.q_lora_rank"), qk_rope_head_dim=rope,
               qk_nope_head_dim=(g("attention.key_length_mla") or g("attention.key_length")) - rope,
               v_head_dim=g("attention.value_length_mla") or g("attention.value_length"), rope_interleave=True,
               first_k_dense_replace=g("leading_dense_block_count", 0), n_routed_experts=g("expert_count"),
               n_shared_experts=g("expert_shared_count", 0), routed_scaling_factor=g("expert_weights_scale", 1.0),
               n_group=groups, topk_group=g("expert_group_used_count") or 1,
               topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if groups > 1 else "greedy")
    out["head_dim"] = out["qk_nope_head_dim"] + rope
    if "rope_scaling" in d and g("rope.scaling.yarn_log_multiplier"):
        mscale = round(g("rope.scaling.yarn_log_multiplier") / 0.1, 6)
        out["rope_scaling"] = {**d["rope_scaling"], "mscale": mscale, "mscale_all_dim": mscale}
    return out


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its path in our tree, its HF name and its GGUF name. Experts' weights are stacked in our tree
    and in GGUF; an HF checkpoint stores one tensor per expert, so `hf` is then their names in expert order."""

    path: tuple[str, ...]
    hf: str | tuple[str, ...]
    gguf: str
    take: Callable[[ModelConfig, np.ndarray], np.ndarray] | None = None  # our part of a fused HF tensor
    gguf_take: Callable[[ModelConfig, np.ndarray], np.ndarray] | None = None  # our part of a fused GGUF tensor


_FINAL = {"norm": ("model.norm", "output_norm"), "lm_head": ("lm_head", "output")}  # HF's and GGUF's names


def weight_table(cfg: ModelConfig, layer_gguf: dict[str, str], paths: list[tuple[str, ...]],
                 hf_name: Callable[[str], str] = str, hf_fused: dict[str, tuple[str, Callable]] | None = None,
                 gguf_fused: dict[str, Callable] | None = None) -> list[Entry]:
    """The explicit map for every parameter path of our model (paths come from the model's own init); HF names
    follow our paths, and `hf_name` renames them where a family's checkpoints differ (Mixtral's); `hf_fused` maps a
    layer's `module/leaf` to the checkpoint's tensor that holds it fused with others and the function `(cfg, w)`
    that takes our part (gpt-oss's experts, Phi-3's q/k/v); `gguf_fused` maps it to that function where the GGUF
    tensor `layer_gguf` names is fused too (Phi-3's `attn_qkv`)."""
    out = []
    for path in paths:
        if path == ("embed",):
            out.append(Entry(path, hf_name("model.embed_tokens.weight"), "token_embd.weight"))
        elif path[0] in _FINAL and len(path) == 2:  # the final norm's and the LM head's weight and bias
            hf, gguf = _FINAL[path[0]]
            out.append(Entry(path, hf_name(f"{hf}.{path[1]}"), f"{gguf}.{path[1]}"))
        elif path[0].startswith("layers_"):
            i = int(path[0].split("_")[1])
            module, leaf = "/".join(path[1:-1]), path[-1]
            if module not in layer_gguf and f"{module}/{leaf}" not in layer_gguf:
                raise KeyError(f"no GGUF name for {module}")
            hf: str | tuple[str, ...] = hf_name(f"model.layers.{i}.{module.replace('/', '.')}.{leaf}")
            if "/experts/" in f"/{module}/":
                hf = tuple(hf.replace(".experts.", f".experts.{e}.") for e in range(cfg.num_experts))
            gguf = layer_gguf.get(f"{module}/{leaf}") or f"{layer_gguf[module]}.{leaf}"  # a leaf named on its own
            fused = (hf_fused or {}).get(f"{module}/{leaf}")
            if fused:
                hf = f"model.layers.{i}.{fused[0]}"
            out.append(Entry(path, hf, f"blk.{i}.{gguf}", fused and fused[1],
                             (gguf_fused or {}).get(f"{module}/{leaf}")))
        else:
            raise KeyError(f"parameter {'/'.join(path)} has no entry in the weight table")
    return out


# Source tensors that carry no parameters and may be skipped.
_IGNORABLE = ("rotary_emb.inv_freq", "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def convert(source: Source, cfg: ModelConfig, table: list[Entry], shapes: dict[tuple, tuple],
            gguf_fix: Callable[[ModelConfig, str, np.ndarray], np.ndarray] | None = None,
            gguf_splits: dict | None = None) -> dict:
    """Map every source tensor through `table` into a nested numpy tree; asserts shapes, and no tensor left over.
    `gguf_splits`: GGUF tensors a file may hold in parts instead, `{name: ((part names), join(cfg, *parts))}`
    (llama.cpp's DeepSeek files split `attn_kv_b` into `attn_k_b` and `attn_v_b`). Tensors convert on a thread
    pool (numpy's copies, casts and GGUF's dequantization run outside the GIL). A leaf may be a view of the source's
    memory-mapped file (an HF tensor already in the dtype): `models.own` copies those left after stacking."""
    import concurrent.futures

    from tqdm import tqdm

    dtype = np.dtype("float32") if cfg.dtype == "float32" else _np_dtype(cfg.dtype)
    names = set(source.names)
    plan = []
    for e in table:
        parts = (e.gguf,) if source.kind == "gguf" else (e.hf,) if isinstance(e.hf, str) else e.hf
        join = None
        if source.kind == "gguf" and e.gguf not in names:
            kind = e.gguf.split(".")[2]  # blk.{i}.{kind}.weight
            if kind in (gguf_splits or {}):
                pieces, join = gguf_splits[kind]
                parts = tuple(e.gguf.replace(f".{kind}.", f".{p}.") for p in pieces)
        for name in parts:
            if name not in names:
                raise KeyError(f"{source.path}: tensor {name!r} (for {'/'.join(e.path)}) is missing")
        plan.append((e, parts, join))
    # Entries that take parts of one tensor (gpt-oss's fused experts, Phi-3's q/k/v) are one job: it is read
    # (dequantized) once, and let go when the job ends.
    jobs: dict[tuple[str, ...], list] = {}
    for item in plan:
        jobs.setdefault(item[1], []).append(item)

    def job(items: list) -> list[np.ndarray]:
        held: dict[str, np.ndarray] = {}
        read = lambda n: held[n] if n in held else held.setdefault(n, source.read(n))  # noqa: E731
        return [one(read, *item) for item in items]

    def one(read, e: Entry, parts: tuple[str, ...], join) -> np.ndarray:
        if join is not None:
            w = join(cfg, *(read(n) for n in parts))
        else:
            w = read(parts[0]) if len(parts) == 1 else np.stack([read(n) for n in parts])
        name = e.gguf if join is not None else parts[0]
        if source.kind == "gguf":
            w = gguf_fix(cfg, name, w) if gguf_fix else w
        take = e.gguf_take if source.kind == "gguf" else e.take
        if take is not None:
            w = take(cfg, w)
        if w.shape != shapes[e.path]:
            raise ValueError(f"{name}: shape {w.shape} != expected {shapes[e.path]} for {'/'.join(e.path)}")
        return np.asarray(w, dtype)  # a memory map's view when it is already the dtype: stacking copies it once

    tree: dict = {}
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        futures = [(items, pool.submit(job, items)) for items in jobs.values()]
        desc = f"converting {os.path.basename(source.path)}"
        with tqdm(total=len(plan), unit="tensor", leave=False, desc=desc) as bar:
            for items, future in futures:
                for (e, _, _), w in zip(items, future.result()):
                    node = tree
                    for p in e.path[:-1]:
                        node = node.setdefault(p, {})
                    node[e.path[-1]] = w
                    bar.update()
    used = {n for _, parts, _ in plan for n in parts}
    left = sorted(n for n in names - used if not n.endswith(_IGNORABLE) and not _prediction_layer(cfg, n))
    if cfg.tie_embeddings and "lm_head.weight" in left:  # some tied checkpoints store the copy
        if np.array_equal(source.read("lm_head.weight"), source.read("model.embed_tokens.weight")):
            left.remove("lm_head.weight")
    if left:
        raise ValueError(f"{source.path}: {len(left)} tensors not used by the model, e.g. {left[:5]}")
    return tree


def _prediction_layer(cfg: ModelConfig, name: str) -> bool:
    """A tensor of a model's multi-token-prediction layers (not used to decode): DeepSeek's, GLM-4.5's, dots.llm1's
    and MiniMax-M2's stored after the decoder's layers, ERNIE 4.5 MoE's as `model.mtp_*`."""
    if cfg.arch == "Ernie4_5_MoeForCausalLM" and name.startswith("model.mtp_"):
        return True
    parts = name.split(".")
    at = parts[2] if name.startswith("model.layers.") else parts[1] if name.startswith("blk.") else ""
    return cfg.arch in _PREDICTING and at.isdigit() and int(at) >= cfg.num_layers


_PREDICTING = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Dots1ForCausalLM",
               "MiniMaxM2ForCausalLM")


def _np_dtype(name: str):
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


def cache_root() -> str:
    """Where converted parameters are kept (`SPARKLER_CACHE`, default `~/.cache/sparkler`)."""
    return os.environ.get("SPARKLER_CACHE", os.path.expanduser("~/.cache/sparkler"))


def iter_paths(tree: dict, prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs of a nested dict."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from iter_paths(v, prefix + (k,))
        else:
            yield prefix + (k,), v
