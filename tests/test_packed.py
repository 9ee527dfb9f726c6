"""Integer checkpoints packed into int32 words (GPTQ, AWQ, compressed-tensors' `pack-quantized`) load as the float
weights they stand for: the unpacking against compressed-tensors' own packer; GPTQ and AWQ folders written as their
quantizers write them against transformers on the float weights; compressed-tensors' folders, written by the
library, against transformers' own loader, which dequantizes them; and the variants not read refused up front."""

import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from compressed_tensors.compressors import pack_to_int32
from helpers import our_logits

from models import hf_weight, load_model
from models.backends import cpu_matmul
from models.loading import packed
from models.loading.source import open_source

pytestmark = pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)

ROWS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [200, 100, 50, 25, 12, 6, 3]]


def _llama(folder, inter: int = 96) -> transformers.PreTrainedModel:
    """A 2-layer random Llama (inputs of 64 and `inter`: groups of 32 fit) saved in `folder`."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=inter, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    return model


def _pack(values: np.ndarray, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit `values` packed densely along `dim` into int32 words by compressed-tensors' packer (which
    offsets signed values by `2^(bits-1)`: given them so, it packs the unsigned ones)."""
    signed = torch.tensor(values - (1 << (bits - 1)), dtype=torch.int8)
    return pack_to_int32(signed, bits, packed_dim=dim)


def _quantize(w: np.ndarray, bits: int, groups: np.ndarray, n: int, rng) -> tuple[np.ndarray, ...]:
    """`w [out, in]` on an asymmetric grid per output row and group of inputs (`groups[i]` of `n`): the values `q`,
    zero points and float16 scales (`[out, n]`), and the float weights they stand for."""
    top = (1 << bits) - 1
    lo = np.stack([w[:, groups == k].min(1) for k in range(n)], 1)
    hi = np.stack([w[:, groups == k].max(1) for k in range(n)], 1)
    scale = ((hi - lo) / top).astype(np.float16)
    zero = np.clip(np.round(-lo / scale.astype(np.float32)), 1, top).astype(np.int64)  # AutoGPTQ stores zero - 1
    s = scale.astype(np.float32)[:, groups]
    q = np.clip(np.round(w / s) + zero[:, groups], 0, top).astype(np.int64)
    return q, zero, scale, ((q - zero[:, groups]) * s).astype(np.float32)


def test_unpack_reads_what_compressed_tensors_packs():
    """`packed.unpack` gives back values of 2 to 8 bits packed along either axis by compressed-tensors' packer,
    widths that straddle words (3, 5, 6, 7) included."""
    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        v = rng.integers(0, 1 << bits, (64, 40))
        np.testing.assert_array_equal(packed.unpack(_pack(v, bits, 1).numpy(), bits, 40, axis=1), v, err_msg=bits)
        np.testing.assert_array_equal(packed.unpack(_pack(v, bits, 0).numpy(), bits, 64, axis=0), v.T,
                                      err_msg=bits)


# GPTQ as AutoGPTQ writes it (zero points minus one), with `desc_act`'s permuted groups, per channel and at 3 and 8
# bits, in groups of 64 (the MLP's 96 inputs: the last group short); GPTQModel's `gptq_v2` (zero points as they
# are) in int16 words (its `pack_dtype`); AWQ's GEMM layout, its settings in AutoAWQ's own quant_config.json.
LAYOUTS = {"gptq": dict(bits=4, group=32), "gptq-desc-act": dict(bits=4, group=32, desc_act=True),
           "gptq-3bit-channel": dict(bits=3, group=-1), "gptq-short-group": dict(bits=4, group=64),
           "gptq-v2-8bit-int16": dict(bits=8, group=32, v2=True), "awq": dict(bits=4, group=32)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gptq_and_awq_folders_load_as_the_weights_they_stand_for(tmp_path, monkeypatch, layout):
    """A folder whose projections are packed as GPTQ or AWQ writes them (`qweight`, `qzeros`, float16 `scales`,
    GPTQ's `g_idx`) loads to the weights they stand for, and to the logits transformers gives on those weights."""
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    o = LAYOUTS[layout]
    bits, group, awq = o["bits"], o["group"], layout == "awq"
    _llama(tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "q")
    tensors = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    stored, rng = {}, np.random.default_rng(1)
    for name, w in tensors.items():
        if not name.endswith("proj.weight"):
            stored[name] = w
            continue
        n_in = w.shape[1]
        n = -(-n_in // group) if group > 0 else 1
        groups = (rng.permutation(n_in) // group if o.get("desc_act") else
                  np.arange(n_in) // group if group > 0 else np.zeros(n_in, np.int64))
        q, zero, scale, tensors[name] = _quantize(w.numpy(), bits, groups, n, rng)
        tensors[name] = torch.tensor(tensors[name])
        prefix = name.removesuffix("weight")
        if awq:  # the outputs packed eight to a word in AutoAWQ's order; scales and zeros by input rows' groups
            order = np.arange(q.shape[0]).reshape(-1, 8)[:, packed.AWQ_ORDER].ravel()
            stored[prefix + "qweight"] = _pack(q.T[:, order], bits, 1)
            stored[prefix + "qzeros"] = _pack(zero.T[:, order], bits, 1)
        else:  # the inputs packed along each output column; the zero points along the outputs
            stored[prefix + "qweight"] = _pack(q.T, bits, 0)
            if o.get("v2"):  # GPTQModel's `pack_dtype` int16: the same little-endian bytes in words of two
                words = stored[prefix + "qweight"].numpy().T.copy().view(np.int16).T
                stored[prefix + "qweight"] = torch.tensor(np.ascontiguousarray(words))
            stored[prefix + "qzeros"] = _pack(zero.T - (0 if o.get("v2") else 1), bits, 1)
            stored[prefix + "g_idx"] = torch.tensor(groups, dtype=torch.int32)
        stored[prefix + "scales"] = torch.tensor(scale.T.copy())
    safetensors.torch.save_file(stored, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    safetensors.torch.save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    if awq:  # as AutoAWQ writes it, beside config.json
        (tmp_path / "q" / "quant_config.json").write_text(json.dumps(
            {"zero_point": True, "q_group_size": group, "w_bit": 4, "version": "GEMM"}))
    else:
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": bool(o.get("desc_act")),
            "sym": False, "checkpoint_format": "gptq_v2" if o.get("v2") else "gptq"}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = load_model(str(tmp_path / "q"), with_tokenizer=False)
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        np.testing.assert_allclose(hf_weight(ours, name), tensors[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    wants = []
    for row, got in zip(ROWS, our_logits(ours.module, ours.params, ROWS)):
        with torch.no_grad():
            wants.append(ref(torch.tensor([row])).logits[0].numpy())
        assert np.abs(got - wants[-1]).max() <= 1e-4 * np.abs(wants[-1]).max(), np.abs(got - wants[-1]).max()
    if cpu_matmul.available():  # `auto` keeps a checkpoint stored as integers in the kernel's ints that hold it
        kept = load_model(str(tmp_path / "q"), with_tokenizer=False, quantization="auto")
        width = "int4" if bits <= 4 and not o.get("desc_act") else "int8"  # groups that Q4_1's blocks keep
        assert kept.cfg.quantization == width and f"packed weights in {width}" in kept.quantization_why


# compressed-tensors' schemes as llm-compressor names them: W4A16 (symmetric, groups of 32 here, 128 there), its
# asymmetric variant, W8A16 (symmetric, per output channel)
SCHEMES = {"w4a16": ("pack-quantized", dict(num_bits=4, symmetric=True, strategy="group", group_size=32)),
           "w4a16-asym": ("pack-quantized", dict(num_bits=4, symmetric=False, strategy="group", group_size=32)),
           "w8a16": ("pack-quantized", dict(num_bits=8, symmetric=True, strategy="channel")),
           "nvfp4a16": ("nvfp4-pack-quantized", "NVFP4A16"), "nvfp4": ("nvfp4-pack-quantized", "NVFP4"),
           "mxfp4a16": ("mxfp4-pack-quantized", "MXFP4A16")}


def _compressed(folder, scheme: str) -> None:
    """The Llama in `folder / "hf"` quantized and compressed by compressed-tensors in `SCHEMES[scheme]`, each group's
    scale (NVFP4's global scale, a zero point) from its range as a calibration sets them, saved in `folder / "q"`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config, preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    model = _llama(folder / "hf")
    form, args = SCHEMES[scheme]
    quantized = (preset_name_to_scheme(args, ["Linear"]) if isinstance(args, str) else
                 QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(type="int", **args)))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": quantized}, ignore=["lm_head"],
                                                        format=form))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w, weights = module.weight.data, module.quantization_scheme.weights
            glob = None
            if hasattr(module, "weight_global_scale"):
                glob = generate_gparam(w.amin(), w.amax())
                module.weight_global_scale.data.copy_(glob)
            w = w.reshape(w.shape[0], -1, weights.group_size) if weights.group_size else w[:, None, :]
            scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), weights, global_scale=glob)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=form)
    compressor.compress_model(model)
    model.save_pretrained(folder / "q")
    compressor.update_config(str(folder / "q"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_folders_load_as_transformers_dequantizes_them(tmp_path, monkeypatch, scheme):
    """A folder compressed by compressed-tensors (`pack-quantized`, as llm-compressor saves W4A16 and W8A16 models;
    NVFP4 and MXFP4) loads to the logits transformers gives when its loader dequantizes the same folder, which
    rounds FP4 weights to bfloat16 (compressed-tensors unpacks them so): there within that rounding. Zero points
    stored unpacked (int8, as before compressed-tensors packed them) read as the packed ones. An NVFP4 folder
    renamed as NVIDIA ModelOpt's NVFP4 (`weight`, `weight_scale`, `weight_scale_2` = 1 / the global scale) loads to
    the same weights."""
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _compressed(tmp_path, scheme)
    tensors = safetensors.torch.load_file(str(tmp_path / "q" / "model.safetensors"))
    assert any(k.endswith("weight_packed") for k in tensors)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "q"), quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
        dtype=torch.float32).eval()
    ours = load_model(str(tmp_path / "q"), with_tokenizer=False)
    fp4 = "fp4" in scheme
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(hf_weight(ours, name), ref.state_dict()[name].numpy(), rtol=2.0 ** -8 if fp4 else 1e-6,
                               atol=1e-7)
    for row, got in zip(ROWS, our_logits(ours.module, ours.params, ROWS)):
        with torch.no_grad():
            want = ref(torch.tensor([row])).logits[0].numpy()
        assert np.abs(got - want).max() <= (1e-2 if fp4 else 1e-4) * np.abs(want).max(), np.abs(got - want).max()
    if scheme == "w4a16-asym":  # zero points as compressed-tensors stored them before packing them: int8, signed
        from compressed_tensors.compressors import unpack_from_int32

        shutil.copytree(tmp_path / "q", tmp_path / "older")
        older = {k: (unpack_from_int32(v, 4, torch.Size([tensors[k.replace("zero_point", "shape")][0],
                                                          v.shape[1]]), packed_dim=0).to(torch.int8).contiguous()
                     if k.endswith("weight_zero_point") else v) for k, v in tensors.items()}
        safetensors.torch.save_file(older, str(tmp_path / "older" / "model.safetensors"), metadata={"format": "pt"})
        np.testing.assert_array_equal(hf_weight(load_model(str(tmp_path / "older"), with_tokenizer=False), name),
                                      hf_weight(ours, name))
    if scheme == "nvfp4a16":
        shutil.copytree(tmp_path / "q", tmp_path / "modelopt")
        renamed = {}
        for k, v in tensors.items():
            if k.endswith("weight_packed"):
                renamed[k.replace("weight_packed", "weight")] = v
            elif k.endswith("weight_global_scale"):
                renamed[k.replace("weight_global_scale", "weight_scale_2")] = 1 / v
            else:
                renamed[k] = v
        safetensors.torch.save_file(renamed, str(tmp_path / "modelopt" / "model.safetensors"),
                                    metadata={"format": "pt"})
        config = json.loads((tmp_path / "modelopt" / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                         "exclude_modules": ["lm_head"]}
        (tmp_path / "modelopt" / "config.json").write_text(json.dumps(config))
        modelopt = load_model(str(tmp_path / "modelopt"), with_tokenizer=False)
        np.testing.assert_allclose(hf_weight(modelopt, name), hf_weight(ours, name), rtol=1e-6)


# bitsandbytes as transformers saves it: NF4 with double quantization (unsloth's `-bnb-4bit` folders), FP4, LLM.int8()
BNB = {"nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
       "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "int8": dict(load_in_8bit=True)}


@pytest.mark.parametrize("kind", BNB)
def test_bitsandbytes_folders_load_as_transformers_dequantizes_them(tmp_path, monkeypatch, kind):
    """A folder transformers saved from a model it quantized with bitsandbytes loads to the weights and logits of
    transformers' own `dequantize()` of that model."""
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _llama(tmp_path / "hf", inter=128)  # rows of whole blocks of 64: bitsandbytes' CPU kernel indexes blocks by row
    config = transformers.BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **BNB[kind])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), quantization_config=config,
                                                              device_map="cpu", dtype=torch.float32)
    model.save_pretrained(tmp_path / "q")
    ref = model.dequantize(dtype=torch.float32).eval()
    ours = load_model(str(tmp_path / "q"), with_tokenizer=False)
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_allclose(hf_weight(ours, name), ref.state_dict()[name].numpy(), rtol=1e-6, atol=1e-7)
    for row, got in zip(ROWS, our_logits(ours.module, ours.params, ROWS)):
        with torch.no_grad():
            want = ref(torch.tensor([row])).logits[0].numpy()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()


def test_packed_variants_not_read_are_refused_up_front(tmp_path):
    """AWQ's GEMV layout, GPTQ's Marlin format, compressed-tensors' groups of several schemes and HQQ are refused
    before any tensor is read, each naming what it is."""
    _llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "a": {"targets": ["re:.*mlp.*"], "weights": {"num_bits": 4, "type": "int", "group_size": 128}},
        "b": {"targets": ["re:.*attn.*"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}}}
    for quantization, match in [({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ's 'gemv' layout"),
                                ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
                                 "GPTQ's 'marlin' checkpoint format"),
                                (ct, "pack-quantized groups of weights"),
                                ({"quant_method": "hqq", "nbits": 4}, "quantized by hqq")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
        with pytest.raises(NotImplementedError, match=match):
            open_source(str(tmp_path))
