"""LoRA adapters served beside their base model, many in one batch (S-LoRA's, vLLM's and SGLang's multi-LoRA).

A model with LoRA slots (`attach`) holds, beside each projection of its dense layers' attention and MLP, every slot's
`lora_a [slots, rank, in]` and `lora_b [slots, out, rank]` (the adapter's scale folded into `b`; ranks below the
slots' padded with zeros) in a "lora" collection next to "params". A forward pass takes each token's slots (-1: the
base model) and scales (1: an adapter's own) and adds `scale · b[slot] @ a[slot] @ x` of each to the projection
(`delta`), so one compiled step serves any mix of adapters and scales. Adapters are PEFT folders
(`adapter_config.json` and `adapter_model.safetensors`, what `peft`'s `save_pretrained` writes and what vLLM,
SGLang and Fireworks load) or GGUF adapter files (what llama.cpp's `convert_lora_to_gguf.py` writes and
`llama-server --lora` loads); `read` maps their tensors onto the slots' layout with the model's own weight names
(HF's, or GGUF's through the weight table), and `install` writes one into a slot on the devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

# What a PEFT LoRA config may say and still mean plain `W + scale · B A` on the projections held here.
PLAIN = {"use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
         "target_parameters": None, "alora_invocation_tokens": None, "layer_replication": None,
         "trainable_token_indices": None, "rank_pattern": {}, "alpha_pattern": {}}
PREFIX = "base_model.model."  # PEFT's names: the base model's own, under this
MAX_SCALE = 1000.0  # the largest multiple of its own scale a request may run an adapter at (either sign): far past
# any useful one, and a float32 product of it stays finite


def scale_ok(x: object) -> bool:
    """Whether `x` is a scale a request may run an adapter at: a real number (not a bool) within ±`MAX_SCALE`."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and -MAX_SCALE <= x <= MAX_SCALE


def delta(x: jax.Array, a: jax.Array, b: jax.Array, adapters: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Each token's LoRA term `sum_m scale_m · b[slot_m] @ a[slot_m] @ x`: `x [..., in]`, `a [slots, rank, in]`,
    `b [slots, out, rank]`, `adapters` each token's `(slots [..., M], scales [..., M])` (slot -1: none; a scale
    multiplies the one the adapter was trained with, folded into `b`: llama.cpp's per-request scale; M > 1 where a
    token mixes several adapters, llama.cpp's mixes), both broadcast against `x`'s leading axes plus M. Every
    slot's `a @ x` is computed (slots × rank columns beside the projection's thousands) and each token's own kept at
    their scales: each slot's weights are read once whatever the tokens. A call of fewer (token, adapter) pairs than
    slots gathers each token's own slots instead (fewer bytes). Which form is fixed by the shapes, at trace time."""
    slots, scales = adapters
    lead = (*x.shape[:-1], slots.shape[-1])
    ids, scale = jnp.broadcast_to(slots, lead), jnp.broadcast_to(scales, lead)
    if math.prod(lead) < a.shape[0]:  # fewer pairs than slots (a decode of few rows): each pair's slot's weights,
        # gathered, are fewer bytes to read (the pairs flattened: one batched product each, not a broadcast one)
        ids, scale = ids.reshape(-1), scale.reshape(-1)
        xs = jnp.broadcast_to(x[..., None, :], (*lead, x.shape[-1])).reshape(-1, x.shape[-1])
        h = jnp.einsum("pi,pri->pr", xs, a[jnp.maximum(ids, 0)], preferred_element_type=jnp.float32)
        h = jnp.where((ids >= 0)[:, None], h * scale[:, None], 0.0).astype(b.dtype)  # (selected: another slot's
        out = jnp.einsum("pr,por->po", h, b[jnp.maximum(ids, 0)])  # non-finite values stay out)
        return out.reshape(*lead, -1).sum(-2)
    h = jnp.einsum("...i,nri->...nr", x, a, preferred_element_type=jnp.float32)
    mine = ids[..., None] == jnp.arange(a.shape[0])  # [..., M, slots]
    weight = jnp.where(mine, scale[..., None], 0.0).sum(-2)  # each slot's scale for the token (0: not its own)
    h = jnp.where(mine.any(-2)[..., None], h * weight[..., None], 0.0).astype(b.dtype)
    return jnp.einsum("...nr,nor->...o", h, b)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter (a PEFT folder or a GGUF file) read for one model: its rank and scale, and one slot's arrays
    (`tree`: the "lora" collection's layout without the slot axis); a GGUF file's task name and prompt prefix
    (`adapter.lora.task_name`, `.prompt_prefix`: what llama.cpp's `/lora-adapters` lists for clients to use)."""

    path: str
    rank: int
    scale: float
    tree: dict
    task_name: str = ""
    prompt_prefix: str = ""


def attach(model, slots: int, rank: int):
    """`model` with `slots` LoRA slots of rank `rank` (zeros: every slot is the base model until `install`)."""
    from models import _unboxed, abstract_params  # (models imports the layers, which import this module)
    from models.sharding import param_shardings

    if slots < 1 or rank < 1:
        raise ValueError(f"LoRA needs at least one slot and a rank of at least 1, not {slots} and {rank}")
    cfg = dataclasses.replace(model.module.cfg, lora_slots=slots, lora_rank=rank)
    module = model.module.clone(cfg=cfg)
    boxed = abstract_params(module)
    if "lora" not in boxed:
        raise ValueError(f"{cfg.arch} has no projections LoRA applies to here")
    shardings = _unboxed(param_shardings(boxed, model.mesh, bool(cfg.expert_mesh)))["lora"]
    shapes = _unboxed(boxed)["lora"]
    zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=shardings)()
    return dataclasses.replace(model, cfg=cfg, module=module, params={**model.params, "lora": zeros})


def modules(model) -> dict[str, tuple[tuple[str, ...], tuple, tuple]]:
    """The projections an adapter of `model` may target: PEFT's module name (`model.layers.3.self_attn.q_proj`) ->
    its LoRA path in the unrolled layout and one slot's `a` and `b` shapes."""
    from models import _unboxed, abstract_params, family
    from models.loading.source import iter_paths

    flat = _unboxed(abstract_params(model.module.clone(scan=False)))["lora"]
    shapes: dict = {}
    for path, leaf in iter_paths(flat):
        shapes.setdefault(path[:-1], {})[path[-1]] = tuple(leaf.shape[1:])
    hf_name = getattr(family(model.cfg), "hf_name", str)
    return {hf_name(f"model.layers.{p[0].split('_')[1]}.{'.'.join(p[1:])}.weight").removesuffix(".weight"):
            (p, s["lora_a"], s["lora_b"]) for p, s in shapes.items()}


def read(path: str, model) -> Adapter:
    """The LoRA adapter at `path`, checked against `model` (which has LoRA slots) and laid out for a slot: a PEFT
    folder, or a GGUF adapter file (`_read_gguf`, llama.cpp's). Each tensor's module must be one of the projections
    LoRA applies to, its shapes the module's, its rank at most the slots'. Raises ValueError saying what does not
    fit."""
    known = modules(model)
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ValueError(f"{path} does not read: {e}") from None
        if magic != b"GGUF":
            raise ValueError(f"{path} is neither a PEFT adapter folder nor a GGUF adapter file")
        r, scale, weights, info = _read_gguf(path, model, known)
    else:
        (r, scale, weights), info = _read_peft(path, known), {}
    return dataclasses.replace(_laid_out(path, model, r, scale, weights, known), **info)


def _read_peft(path: str, known: dict) -> tuple[int, float, dict[str, dict[str, tuple[str, np.ndarray]]]]:
    """A PEFT folder's rank, scale and each module's `{"A": (tensor name, [r, in]), "B": (name, [out, r])}` (by
    PEFT's module names; `known`, the model's `modules`, names them in errors)."""
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a PEFT adapter folder (adapter_config.json: {e})") from None
    if not isinstance(conf, dict) or conf.get("peft_type") != "LORA":
        raise ValueError(f"{path}: only LoRA adapters are served (peft_type {conf.get('peft_type')!r})")
    for key, plain in PLAIN.items():
        if conf.get(key, plain) not in (plain, None, {}, [], False):
            raise ValueError(f"{path}: adapter_config.json's {key} = {conf[key]!r} is not served")
    r, alpha = conf.get("r"), conf.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: adapter_config.json needs an integer r >= 1 and a lora_alpha")
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise ValueError(f"{path}: no adapter_model.safetensors (a pickled adapter_model.bin is not read)")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(file)
    except Exception as e:  # noqa: BLE001  (a torn or foreign file)
        raise ValueError(f"{path}: adapter_model.safetensors does not read: {e}") from None
    weights: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, w in tensors.items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or part not in ("A.weight", "B.weight"):
            _unknown(path, known, key)
        weights.setdefault(module, {})[part[0]] = (key, w)
    return r, scale, weights


# What llama.cpp's GGUF adapter may carry that is more than `W + scale · B A` (`convert_lora_to_gguf.py` writes the
# first for aLoRA adapters; mergekit's extracted adapters carry norm weights, which are refused as tensors).
GGUF_REFUSED = ("adapter.alora.invocation_tokens",)


def _read_gguf(path: str, model, known: dict) -> tuple[int, float, dict[str, dict[str, tuple[str, np.ndarray]]], dict]:
    """A GGUF adapter file's rank, scale, each module's `{"A", "B"}` and its `Adapter` strings (task name, prompt
    prefix), as llama.cpp's `convert_lora_to_gguf.py` writes them and `llama-server --lora` reads them: `general.type`
    "adapter", `adapter.type` "lora", `adapter.lora.alpha`, and each projection's `<its GGUF name>.lora_a` `[r, in]`
    and `.lora_b` `[out, r]`. The names are mapped through the model's weight table, and `lora_b` gets the fix-up its
    base tensor gets (Llama files' q/k row permutation); each must be one of `known`'s (the model's `modules`). The
    scale is llama.cpp's: alpha / r, or 1 where alpha is 0 (rsLoRA's is not kept)."""
    import gguf

    from models import FAMILIES, _weight_table, family
    from models.loading.source import _GGUF_ARCH, gguf_metadata

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001  (a torn or foreign file)
        raise ValueError(f"{path}: the GGUF file does not read: {e}") from None
    meta = gguf_metadata(reader)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise ValueError(f"{path}: not a GGUF LoRA adapter (general.type {meta.get('general.type')!r}, "
                         f"adapter.type {meta.get('adapter.type')!r})")
    for key in GGUF_REFUSED:
        if key in meta:
            raise ValueError(f"{path}: {key} is not served (an activated LoRA)")
    arch = meta.get("general.architecture")
    if FAMILIES.get(_GGUF_ARCH.get(arch)) is not family(model.cfg):  # llama.cpp refuses another architecture too
        raise ValueError(f"{path}: an adapter of a {arch} model, not of this {model.cfg.arch}")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: adapter.lora.alpha must be a number")
    cfg = model.cfg
    # (a GGUF tensor that several of our parameters come from, Phi-3's attn_qkv, keeps one entry here: its HF name is
    # the fused tensor's, no module LoRA applies to, so its adapter tensors are refused below)
    table = {e.gguf: e for e in _weight_table(model)}
    fix = getattr(family(cfg), "gguf_fix", None)
    weights: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".lora_")
        e = table.get(base)
        module = e.hf.removesuffix(".weight") if e is not None and isinstance(e.hf, str) else None
        if part not in ("a", "b") or module not in known:
            _unknown(path, known, t.name)
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except (NotImplementedError, ValueError, AssertionError) as err:
            raise ValueError(f"{path}: {t.name} ({t.tensor_type.name}) does not read: {err}") from None
        if part == "b" and fix is not None and w.ndim == 2 and w.shape[0] == known[module][2][0]:
            w = fix(cfg, base, w)  # (another shape is refused with its shape by `_laid_out`)
        weights.setdefault(module, {})[part.upper()] = (t.name, w)
    ranks = {w["B"][1].shape[-1] for w in weights.values() if "B" in w and w["B"][1].ndim == 2}
    if not ranks:
        raise ValueError(f"{path}: the adapter holds no LoRA weights")
    if len(ranks) != 1:
        raise ValueError(f"{path}: the adapter's lora_b tensors must share one rank (found {sorted(ranks)})")
    r = ranks.pop()
    info = {field: value for field in ("task_name", "prompt_prefix")
            if isinstance(value := meta.get(f"adapter.lora.{field}"), str)}
    return r, (alpha / r if alpha else 1.0), weights, info


def _unknown(path: str, known: dict, key: str):
    """Raise: tensor `key` of the adapter at `path` is no LoRA weight of a projection LoRA applies to (`known`: the
    model's `modules`)."""
    kinds = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in known}))
    raise ValueError(f"{path}: tensor {key} is not a LoRA weight of a projection LoRA applies to here "
                     f"(this model's {kinds} of its dense layers and grouped-query attention)")


def _laid_out(path: str, model, r: int, scale: float, weights: dict[str, dict[str, tuple[str, np.ndarray]]],
              known: dict) -> Adapter:
    """The adapter whose modules hold `weights` (`_read_peft`'s form), laid out for a slot of `model` (`known`: its
    `modules`): padded to the slots' rank, `scale` folded into B, zeros for the modules left alone."""
    from models import stack_layers

    cfg = model.cfg
    if r > cfg.lora_rank:
        raise ValueError(f"{path}: rank {r} exceeds --max-lora-rank {cfg.lora_rank}")
    tree: dict = {}
    for module, parts in weights.items():
        if module not in known:
            _unknown(path, known, next(iter(parts.values()))[0])
        where, a_shape, b_shape = known[module]
        for part, (key, w) in parts.items():
            want = (r, a_shape[1]) if part == "A" else (b_shape[0], r)
            if w.shape != want:
                raise ValueError(f"{path}: {key} has shape {list(w.shape)}, not {list(want)}")
            padded = np.zeros(a_shape if part == "A" else b_shape, np.float32)
            if part == "A":
                padded[:r] = w
            else:
                padded[:, :r] = w.astype(np.float32) * scale
            if not np.isfinite(padded).all():  # (a slot's NaN would reach every row of a step with adapters)
                raise ValueError(f"{path}: {key} holds values that are not finite numbers")
            _node(tree, where)["lora_a" if part == "A" else "lora_b"] = padded
    if not tree:
        raise ValueError(f"{path}: the adapter holds no LoRA weights")
    for where, a_shape, b_shape in known.values():  # modules the adapter leaves alone: zeros
        node = _node(tree, where)
        if len(node) == 1:  # a module's A without its B, or B without A: a torn file
            raise ValueError(f"{path}: {'.'.join(where)} has only its {next(iter(node))} (lora_A and lora_B go "
                             "together)")
        node.setdefault("lora_a", np.zeros(a_shape, np.float32))
        node.setdefault("lora_b", np.zeros(b_shape, np.float32))
    dtype = jnp.dtype(cfg.dtype)
    tree = jax.tree.map(lambda x: x.astype(dtype), tree)
    if model.module.scan:
        tree = stack_layers(tree, cfg)
    return Adapter(path, r, scale, tree)


def _node(tree: dict, path: tuple[str, ...]) -> dict:
    """The dict at `path` in `tree`, made where missing."""
    for p in path:
        tree = tree.setdefault(p, {})
    return tree


def install(params: dict, slot: int, adapter: Adapter) -> dict:
    """`params` with `adapter` in LoRA slot `slot`, on the slots' own shardings (new arrays: steps already queued
    read the old ones)."""
    lora = params["lora"]
    if jax.tree.structure(lora) != jax.tree.structure(adapter.tree):
        raise ValueError("the adapter was read for another model")
    put = jax.jit(lambda full, tree, s: jax.tree.map(lambda f, x: f.at[..., s, :, :].set(x), full, tree),
                  out_shardings=jax.tree.map(lambda x: x.sharding, lora))
    return {**params, "lora": put(lora, adapter.tree, jnp.int32(slot))}
