"""Model layer: a registry from HF `architectures` to a family module, and `load_model` for HF folders and GGUF files.

Loading converts the source (explicit name table, asserted shapes) and places the parameters on a mesh. A GGUF file
(dequantized) or quantized weights are converted once and cached with orbax-checkpoint under a key derived from the
source's content hash; an HF folder of float weights has nothing to convert but names, casts and the stacking of
layers, so it is read straight from memory maps of its safetensors onto the devices, with no cache to write or read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from models import hash_prng
from models.backends import resolve_backend
from models.backends.cpu_matmul import resolve_matmul
from models.backends.paged import KVCache
from models.config import ModelConfig
from models.families import (cohere, deepseek, dots1, ernie4_5_moe, gemma, gemma3, glm4, glm4_moe, gpt_oss, granite,
                             granite_moe, llama, minimax_m2, mixtral, olmo2, olmoe, phi, phi3, qwen2, qwen3, qwen_moe,
                             smollm3, starcoder2)
from models.layers.causal_lm import CausalLM, layer_groups
from models.loading.source import STATS, Source, cache_root, convert, iter_paths, open_source, weight_table
from models.quant import PACKED, QUANTIZATIONS, pack_tree, quantize_tree
from models.sharding import make_mesh, param_shardings

log = logging.getLogger("sparkler.models")

# XLA's Triton GEMM emitter reads the decode step's skinny products at ~1.2 TB/s on an H200; cuBLAS reads them at
# ~3.1 TB/s (bench/gpu_probe.py). Set before any backend starts; an explicit setting in XLA_FLAGS wins.
if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()

DTYPES = ("float32", "bfloat16")

FAMILIES: dict[str, ModuleType] = {arch: fam for fam in (llama, qwen2, qwen3, gemma, gemma3, phi3, granite, smollm3,
                                                                      olmo2, glm4, cohere, starcoder2, phi, mixtral,
                                                                      qwen_moe, deepseek, glm4_moe, gpt_oss, olmoe,
                                                                      granite_moe, ernie4_5_moe, minimax_m2, dots1)
                                   for arch in fam.ARCHITECTURES}

__all__ = ["ModelConfig", "KVCache", "KV_DTYPES", "Model", "build", "hf_weight", "load_model", "resolve_dtype",
           "resolve_kv_dtype", "resolve_quantization", "with_expert_parallel", "FAMILIES", "STATS"]


def family(cfg: ModelConfig) -> ModuleType:
    """The family module for a config's architecture."""
    if cfg.arch not in FAMILIES:
        raise NotImplementedError(f"architecture {cfg.arch!r} is not supported; known: {sorted(FAMILIES)}")
    return FAMILIES[cfg.arch]


def resolve_dtype(name: str, platform: str | None = None) -> str:
    """`--dtype`: `auto` is bfloat16 on GPU and TPU, float32 on CPU (where XLA's bfloat16 matmuls are slower)."""
    if name == "auto":
        return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return name


# `--kv-cache-dtype` (vLLM's names): the pool in the model's dtype, or another. fp8 halves a bfloat16 pool's bytes:
# twice the tokens in the same memory, half the bytes a decode step's attention reads (unscaled, saturated:
# `paged.to_pool`). `fp8` is e4m3 (3 mantissa bits, to 448), as vLLM's; e5m2 has 2 bits and reaches 57,344.
KV_DTYPES = {"auto": "", "bfloat16": "bfloat16", "float32": "float32", "fp8": "float8_e4m3fn",
             "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def resolve_kv_dtype(name: str, dtype: str) -> str:
    """`--kv-cache-dtype` as `ModelConfig.kv_dtype`: "" where it is the model's `dtype` (`auto`)."""
    if name not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; choose from {', '.join(KV_DTYPES)}")
    return "" if KV_DTYPES[name] == dtype else KV_DTYPES[name]


def resolve_quantization(name: str, model: str, dtype: str, tp: int = 1, platform: str | None = None,
                         matmul: str = "auto", stored: str | None = None) -> tuple[str, str]:
    """`--quantization` and why: `auto` is the catalog's `quantization` for the model (the one that passes the
    quality guard, `tests/test_quant.py`: int4 for the default model, whose GGUF weights are Q4_1), or for a packed
    checkpoint (GPTQ, AWQ, compressed-tensors, bitsandbytes, FP4) the width that holds it (`stored`: `packed.width`),
    where the C++ kernel runs (a CPU with AVX2, float32, tp = 1, `--matmul-backend` auto or cpu), else the weights at
    full precision; `none`, `int8`, `int4` and `fp8` are taken as asked."""
    from models.backends import cpu_matmul
    from models.loading import packaged

    if name not in ("auto", *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {name!r}; choose from auto, {', '.join(QUANTIZATIONS)}")
    if name != "auto":
        return name, "asked for"
    platform = platform or jax.default_backend()
    guarded = packaged.catalog()["models"].get(model, {}).get("quantization")
    if guarded not in (None, *QUANTIZATIONS):
        raise ValueError(f"configs/models.toml: {model}'s quantization {guarded!r} is not one of {QUANTIZATIONS}")
    why = (f"on {platform} quantized weights are widened in XLA, slower than {dtype}" if platform != "cpu" else
           f"the quantized kernel runs float32 models only, not {dtype}" if dtype != "float32" else
           "the quantized kernel does not split over tp" if tp > 1 else
           f"--matmul-backend xla widens quantized weights in XLA, slower than {dtype}" if matmul == "xla" else
           f"the quantized kernel needs {cpu_matmul.NEEDS}, which this host lacks"
           if not cpu_matmul.available() else
           f"{model} has no quantization that passed the quality guard (configs/models.toml)"
           if not guarded and not stored else "")
    if why:
        return "none", f"auto: {why}"
    if not guarded:
        return stored, ("auto: the quantized kernel runs on this CPU and holds the checkpoint's packed weights in "
                        + stored)
    return guarded, f"auto: the quantized kernel runs on this CPU and the model passes the {guarded} quality guard"


def build(cfg: ModelConfig, attention: str = "xla", scan: bool = True, tp: int = 1,
          matmul: str | None = None) -> CausalLM:
    """The Flax module for a config, with an attention backend (`auto`: by platform), a quantized matmul backend
    (`cpu_matmul.resolve_matmul`; default: the config's) and scanned or unrolled layers. Scanned is the default
    everywhere: on this CPU the default model starts in 15 s warm / 42 s cold scanned, 33 s / 92 s unrolled, while
    unrolled decodes ~13% faster at 32 concurrent (XLA's CPU backend copies each layer's weights out of the stack):
    `--no-scan-layers` (docs/PERFORMANCE.md)."""
    cfg = dataclasses.replace(cfg, matmul=resolve_matmul(matmul or cfg.matmul, cfg, tp=tp))
    return CausalLM(cfg, family(cfg).DecoderLayer, resolve_backend(attention, cfg, tp=tp), scan)


def with_expert_parallel(cfg: ModelConfig, dp: int, tp: int) -> ModelConfig:
    """`cfg` with its experts split over the `tp` axis of a `(dp, tp)` mesh, where that splits them (a mixture, `tp`
    > 1 dividing the experts); else unchanged (`--enable-expert-parallel` on a dense model is a no-op, as in vLLM)."""
    if not cfg.num_experts or tp == 1 or cfg.num_experts % tp:
        return cfg
    return dataclasses.replace(cfg, expert_mesh=(dp, tp))


def stack_layers(tree: dict, cfg: ModelConfig) -> dict:
    """Per-layer parameters (`layers_0` ... `layers_{L-1}`) stacked by scanned group (`layer_groups`: `layers` where
    every layer is alike; leading axis = layer), each leaf on a thread of a pool (numpy copies outside the GIL)."""
    import numpy as np

    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start, stop, name in layer_groups(cfg, scan=True):
            if name == f"layers_{start}" or f"layers_{start}" not in tree:  # a group of one layer stays unrolled;
                continue  # a tree of some layers only (LoRA's, which MLA and mixtures' layers may lack) skips the rest
            layers = [tree.pop(f"layers_{i}") for i in range(start, stop)]
            per_leaf = zip(*(jax.tree.leaves(layer) for layer in layers))
            tree[name] = jax.tree.unflatten(jax.tree.structure(layers[0]), list(pool.map(np.stack, per_leaf)))
    return tree


def own(x):
    """`x`, or a copy of it where it is a view of other memory (a memory-mapped file's)."""
    import numpy as np

    return x if x.flags.owndata else np.array(x)


def abstract_params(module: CausalLM):
    """Boxed abstract parameters (shapes, dtypes and logical axis names), without allocating anything."""
    cfg = module.cfg
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = KVCache.zeros(cfg, 1, 1)
    init = lambda rng: module.init(rng, tokens, tokens, jnp.zeros((1, 1), jnp.int32), cache)  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0))


def init_params(module: CausalLM, seed: int = 0, mesh=None):
    """Random parameters (for tests), placed on `mesh`."""
    mesh = mesh or make_mesh()
    boxed = abstract_params(module)
    shardings = param_shardings(boxed, mesh, bool(module.cfg.expert_mesh))
    cfg = module.cfg

    def init(rng):
        zeros = jnp.zeros((1, 1), jnp.int32)
        p = module.init(rng, zeros, zeros, zeros, KVCache.zeros(cfg, 1, 1))
        return jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, p,
                            is_leaf=lambda x: hasattr(x, "unbox"))

    # A hash for a PRNG: JAX's own generators expand into thousands of operations per parameter (`hash_prng`).
    return jax.jit(init, out_shardings=_unboxed(shardings))(hash_prng.key(seed))


def _unboxed(tree):
    import flax.linen as nn

    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass
class Model:
    """A loaded model: config, Flax module, parameters on a mesh, tokenizer, and generation defaults."""

    name: str
    cfg: ModelConfig
    module: CausalLM
    params: Any
    mesh: Any
    tokenizer: Any
    generation_config: dict
    eos_ids: tuple[int, ...]
    source: str
    quantization_why: str = "asked for"  # how `--quantization` was chosen (`resolve_quantization`)
    vision: Any = None  # a model that reads images (LLaVA, Gemma 3): its `models.vision.VisionConfig`
    vision_params: Any = None  # and its vision tower's and projector's parameters, replicated on the mesh


def _overridden(overrides: dict | None) -> str:
    """What `--hf-overrides` adds to a converted model's cache key (they may change its shapes): "" for none."""
    if not overrides:
        return ""
    return "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]


def load_model(name_or_path: str, dtype: str = "float32", tp: int = 1, install: bool = True,
               with_tokenizer: bool = True, attention: str = "auto", scan: bool = True,
               quantization: str = "none", dp: int = 1, matmul: str = "auto", expert_parallel: bool = False,
               kv_cache_dtype: str = "auto", max_model_len: int = 0, hf_overrides: dict | None = None) -> Model:
    """Load a catalog name, HF folder or GGUF file; the converted parameters are cached (see module doc).
    `dtype` may be `auto` (see `resolve_dtype`); `attention` names the backend (`auto`: by platform);
    `quantization` is `none`, `int8`, `int4`, `fp8` (`models.quant`) or `auto` (`resolve_quantization`), `matmul` how
    quantized products run (`auto`: the C++ kernel on a CPU that has it; its weights are kept packed); the
    parameters go on a `(data=dp, tp=tp)` mesh (replicated over `data`); `expert_parallel` splits a mixture's
    experts over `tp`, each whole on one device (`layers.moe.expert_parallel`), where there is more than one and they
    divide evenly; `kv_cache_dtype` keeps the KV pool in another dtype (`KV_DTYPES`); `max_model_len`, the context to
    be served (0: the model's whole), picks LongRoPE's factors (`config._inv_freq`); `hf_overrides` (vLLM's) replaces
    keys of the model's config before it is read, such as `max_position_embeddings` and `rope_scaling` to serve a
    longer context than the model was trained for."""
    from models.loading import packaged

    dtype = resolve_dtype(dtype)
    path = packaged.resolve(name_or_path, install=install)
    source = open_source(path)
    quantization, why = resolve_quantization(quantization, name_or_path, dtype, tp, matmul=matmul,
                                             stored=source.stored)
    config = {**source.config, **(hf_overrides or {})}
    cfg = dataclasses.replace(ModelConfig.from_hf(config, dtype, max_model_len), quantization=quantization,
                              kv_dtype=resolve_kv_dtype(kv_cache_dtype, dtype))
    cfg = with_expert_parallel(cfg, dp, tp) if expert_parallel else cfg
    seeing = _vision_config(source)
    if seeing is not None and seeing.bidirectional:  # Gemma 3: a picture's positions see each other both ways
        cfg = dataclasses.replace(cfg, image_block=seeing.tokens_per_image)
    fam = family(cfg)
    module = build(cfg, attention, scan, tp, matmul)
    cfg, packed = module.cfg, module.cfg.matmul == "cpu"
    mesh = make_mesh(tp, dp=dp)
    boxed = abstract_params(module)
    shardings = _unboxed(param_shardings(boxed, mesh, bool(cfg.expert_mesh)))
    direct = source.kind == "hf" and not source.quantized and quantization == "none"  # see the module doc
    key = None if direct else source.content_hash() + _overridden(hf_overrides)
    form = ("-scan" if module.scan else "") + ("" if quantization == "none" else f"-{quantization}")
    form += f"-{PACKED}" if packed else ""
    ckpt_dir = os.path.join(cache_root(), "params", f"{key}-{dtype}{form}")
    # The tokenizer loads on a thread beside the restore (which mostly waits on tensorstore's own threads).
    tok = _on_thread(load_tokenizer, source, key) if with_tokenizer else None
    params = None if direct else _restore(ckpt_dir, boxed, shardings)
    if params is None:  # convert by the float, unrolled form's names and shapes; then quantize and stack
        shapes, table = _names(module)
        tree = convert(source, cfg, table, shapes, getattr(fam, "gguf_fix", None), getattr(fam, "GGUF_SPLITS", None))
        if quantization != "none":
            tree = quantize_tree(tree, quantization)
        if packed:
            tree = pack_tree(tree, cfg.tie_embeddings)
        if module.scan:
            tree = stack_layers(tree, cfg)
        tree = jax.tree.map(own, tree)
        params = jax.device_put({"params": tree}, shardings)
        if direct:
            STATS["direct"] += 1
            log.info("sparkler: read %s straight onto the devices", path)
        else:
            _save(ckpt_dir, params)
            STATS["converted"] += 1
            log.warning("sparkler: converted %s and cached it at %s", path, ckpt_dir)
    else:
        STATS["cached"] += 1
        log.warning("sparkler: loaded cached parameters from %s", ckpt_dir)
    tok = tok.result() if tok is not None else None
    gen = dict(source.generation_config)
    eos = gen.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
        eos_ids = eos_ids + (tok.eos_token_id,)
    name = name_or_path if not os.path.exists(name_or_path) else os.path.basename(name_or_path.rstrip("/"))
    seen = None if seeing is None else _vision_params(source, dtype, mesh)
    return Model(name, cfg, module, params, mesh, tok, gen, eos_ids, path, why, seeing, seen)


def _names(module: CausalLM) -> tuple[dict[tuple[str, ...], tuple[int, ...]], list]:
    """The float, unrolled form of `module`'s parameters, by which checkpoints are read: each path's shape, and the
    weight table (`weight_table`) that names them."""
    cfg, fam = module.cfg, family(module.cfg)
    flat = abstract_params(module.clone(scan=False, cfg=dataclasses.replace(cfg, quantization="none", matmul="xla")))
    shapes = {p: tuple(leaf.shape) for p, leaf in iter_paths(_unboxed(flat)["params"])}
    return shapes, weight_table(cfg, fam.LAYER_GGUF, list(shapes), getattr(fam, "hf_name", str),
                                getattr(fam, "HF_FUSED", None), getattr(fam, "GGUF_FUSED", None))


_TABLES: dict[ModelConfig, list] = {}  # `_weight_table`'s, by model config


def _weight_table(model: Model) -> list:
    """The weight table of `model`'s parameters (`_names`: each one's path, HF name and GGUF name), made once per
    config (it traces the model's init abstractly)."""
    if model.cfg not in _TABLES:
        _TABLES[model.cfg] = _names(model.module)[1]
    return _TABLES[model.cfg]


def hf_weight(model: Model, name: str, rows: int | None = None):
    """The parameter that the model's HF checkpoint names `name` (`model.layers.3.self_attn.q_proj.weight`; a tied
    `lm_head.weight` is the embedding; a multimodal checkpoint's language model by its own names too,
    `model.language_model.*` or `language_model.model.*`), as served now, its first `rows` rows (None: all; cut on
    the devices) in float32 on the host: SGLang's `get_weights_by_name`. Raises KeyError for a name the model has no
    parameter of, ValueError for weights held quantized or in another layout (fused with others, or transposed)."""
    import numpy as np

    from models.loading.source import text_name

    cfg = model.cfg
    if model.vision is not None:
        name = text_name(name) or name
    if cfg.quantization != "none":
        raise ValueError(f"the weights are held quantized ({cfg.quantization}), not as the checkpoint has them")
    if name == "lm_head.weight" and cfg.tie_embeddings:
        name = "model.embed_tokens.weight"
    table = _weight_table(model)
    found = [(e, e.hf.index(name) if isinstance(e.hf, tuple) else None) for e in table
             if name == e.hf or isinstance(e.hf, tuple) and name in e.hf]
    if not found:
        raise KeyError(f"{cfg.arch} has no parameter named {name!r} (its checkpoint's names, as "
                       f"{table[min(1, len(table) - 1)].hf!r})")
    entry, expert = found[0]
    if len(found) > 1 or entry.take is not None:
        raise ValueError(f"{name!r} is held in another layout than the checkpoint's (split from a tensor it fuses, "
                         "or transposed)")
    path, index = entry.path, ()
    if path[0].startswith("layers_") and model.module.scan:  # its run of layers is stacked (`stack_layers`)
        i = int(path[0].split("_")[1])
        start, stop, group = next(g for g in layer_groups(cfg, scan=True) if g[0] <= i < g[1])
        path, index = (group,) + path[1:], () if stop - start == 1 else (i - start,)
    leaf = model.params["params"]
    for p in path:
        leaf = leaf[p]
    index += () if expert is None else (expert,)
    leaf = leaf[index] if index else leaf
    return np.asarray(leaf if rows is None else leaf[:rows], np.float32)


def _vision_config(source):
    """A LLaVA or Gemma 3 folder's vision config (with the folder's `preprocessor_config.json`); None for a model
    that reads text only."""
    from models import vision

    if "multimodal" not in source.config:
        return None
    pre = os.path.join(source.path, "preprocessor_config.json")
    processing = None
    if os.path.exists(pre):
        with open(pre) as f:
            processing = json.load(f)
    return vision.vision_config(source.config["multimodal"], processing)


def _vision_params(source, dtype: str, mesh):
    """Its tower's and projector's parameters, read straight from the folder (they are not quantized) and replicated
    on the mesh."""
    from models import vision

    tensors = {n: source.read(n) for n in source.config["multimodal_tensors"]}
    return jax.device_put(vision.vision_params(tensors, dtype), NamedSharding(mesh, P()))


def load_tokenizer(source: Source, key: str):
    """The source's tokenizer, normalized once into `$SPARKLER_CACHE/tokenizers` (see `models.loading.tokenizer`)."""
    from models.loading import tokenizer

    # an HF folder's tokenizer files may change in place: its entry is keyed by their digest
    name = f"hf-{tokenizer.files_digest(source.path)}" if source.kind == "hf" else key
    return tokenizer.load(source, os.path.join(cache_root(), "tokenizers", name))


def _on_thread(fn, *args) -> concurrent.futures.Future:
    """`fn(*args)` running on a thread of its own."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=fn.__name__)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def _restore(ckpt_dir: str, boxed, shardings):
    import orbax.checkpoint as ocp

    if not os.path.exists(os.path.join(ckpt_dir, "done")):
        return None
    target = jax.tree.map(lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
                          _unboxed(boxed), shardings)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(ckpt_dir, "params"), target)


def _save(ckpt_dir: str, params) -> None:
    """Keep converted parameters uncompressed: ~60% more disk than zstd, a third less restore time (0.7 s against
    1.1 s for the default model here)."""
    import orbax.checkpoint as ocp

    os.makedirs(ckpt_dir, exist_ok=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(os.path.join(ckpt_dir, "params"), args=ocp.args.PyTreeSave(params), force=True)
    open(os.path.join(ckpt_dir, "done"), "w").close()
