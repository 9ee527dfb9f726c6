"""Every family against transformers on the same random weights; the packaged SmolLM2 token for token."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from conftest import device_flags
from helpers import assert_gguf_loads_as_the_folder, close_gguf, decoded_logits, llama_permute, our_logits
from models import STATS, load_model

ROWS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [200, 100, 50, 25, 12, 6, 3]]


def _small(kind: str):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if kind == "llama3-rope":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16), rope_theta=500000.0)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=4, head_dim=16)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    if kind == "gemma3":
        c = dict(common, num_hidden_layers=3)
        return transformers.Gemma3TextConfig(**c, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                             final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if kind == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16)
    if kind == "gemma2":
        c = dict(common, num_hidden_layers=3)
        return transformers.Gemma2Config(**c, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                         final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if kind == "phi3":  # half the head turns (Phi-4-mini's partial rotary factor is 0.75); a window on every layer
        return transformers.Phi3Config(**common, sliding_window=4, rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5), pad_token_id=0)
    if kind == "phi3-longrope":  # Phi-4-mini's shape: LongRoPE over a partial rotary factor
        return transformers.Phi3Config(**dict(common, max_position_embeddings=64), original_max_position_embeddings=16,
                                       pad_token_id=0, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, short_factor=[1.0, 1.25, 1.5, 2.0],
            long_factor=[1.5, 3.0, 6.0, 12.0], original_max_position_embeddings=16))
    if kind == "granite":
        return transformers.GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.375,
                                          attention_multiplier=0.125, logits_scaling=2.5)  # float32-exact: GGUF
    if kind == "glm4":  # the sandwich layer, q/k/v biases, half the head turning by repeated frequencies
        return transformers.Glm4Config(**common, head_dim=16, attention_bias=True, pad_token_id=0, eos_token_id=1)
    if kind == "cohere":  # LayerNorm, attention and MLP side by side, interleaved rotary pairs, scaled logits
        return transformers.CohereConfig(**common, logit_scale=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "cohere2":  # and windows on three layers of four, whose full layers turn nothing
        return transformers.Cohere2Config(**dict(common, num_hidden_layers=4), head_dim=16, sliding_window=4,
                                          logit_scale=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "starcoder2":  # LayerNorms and projections with biases, a plain GELU MLP, a window
        return transformers.Starcoder2Config(**common, sliding_window=4, bos_token_id=1, eos_token_id=2)
    if kind == "phi":  # the parallel layer with biases everywhere, a plain GELU MLP, 40% of each head turning
        return transformers.PhiConfig(**common, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                     partial_rotary_factor=0.4))
    if kind == "exaone4":  # OLMo's post-norm layer with per-head q/k norms, windows on three layers of four
        return transformers.Exaone4Config(**dict(common, num_hidden_layers=4), sliding_window=4, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2)
    if kind == "arcee":  # a plain ReLU-squared MLP
        return transformers.ArceeConfig(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "seed-oss":  # biased q/k/v, an unbiased output
        return transformers.SeedOssConfig(**common, attention_bias=True, attention_out_bias=False, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2)
    if kind == "ernie4.5":  # biases everywhere, interleaved rotary pairs
        return transformers.Ernie4_5Config(**common, use_bias=True, head_dim=16, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2)
    if kind == "olmo2":
        return transformers.Olmo2Config(**common, pad_token_id=0)
    if kind == "olmo3":  # three sliding layers to each full one
        return transformers.Olmo3Config(**dict(common, num_hidden_layers=4), sliding_window=4, pad_token_id=0)
    if kind == "olmo3-yarn":  # YaRN on the full layers only (its sliding ones turn plainly, unscaled)
        return transformers.Olmo3Config(**dict(common, num_hidden_layers=4), sliding_window=4, pad_token_id=0,
                                        rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                          original_max_position_embeddings=32))
    if kind == "smollm3":  # every fourth layer turns nothing (no_rope_layers [1, 1, 1, 0])
        return transformers.SmolLM3Config(**dict(common, num_hidden_layers=4), pad_token_id=0, tie_word_embeddings=True)
    raise KeyError(kind)


def _hf_model(kind: str, folder: str, **changes):
    cfg = _small(kind)
    for name, value in changes.items():
        setattr(cfg, name, value)
    cfg._attn_implementation = "eager"  # SDPA skips Gemma's attention-logit soft-capping
    cls = transformers.Gemma3ForCausalLM if kind == "gemma3" else transformers.AutoModelForCausalLM
    model = cls(cfg) if kind == "gemma3" else cls.from_config(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # biases and norms random too, so a mapping slip shows
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.08))
    model = model.float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)
@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                                  "phi3", "granite", "smollm3", "olmo2", "olmo3", "glm4", "cohere", "cohere2",
                                  "starcoder2", "phi", "exaone4", "arcee", "seed-oss", "ernie4.5", "olmo3-yarn"])
def test_family_matches_transformers(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model(kind, str(tmp_path / "hf"))
    before = STATS["direct"]
    ours = load_model(str(tmp_path / "hf"), with_tokenizer=False)
    assert STATS["direct"] == before + 1 and not (tmp_path / "cache" / "params").exists()  # no cache written
    got = our_logits(ours.module, ours.params, ROWS)
    starts = [5, 2, 3]  # and decoding, a token a step over the pages, from these positions on
    decoded = decoded_logits(ours.module, ours.params, ROWS, starts)
    for row, g, start, d in zip(ROWS, got, starts, decoded):
        with torch.no_grad():
            want = ref(torch.tensor([row])).logits[0].numpy()
        scale = np.abs(want).max()
        assert np.abs(g - want).max() <= 1e-4 * scale, (kind, np.abs(g - want).max(), scale)
        assert np.abs(d - want[start - 1:-1]).max() <= 1e-4 * scale, (kind, "decoded")


def test_configs_that_leave_things_out_read_as_transformers_fills_them():
    """A config.json without `layer_types` (older Cohere 2, EXAONE 4, OLMo 3, Gemma and gpt-oss files) slides the
    layers transformers' defaults slide; SmolLM3's without `no_rope_layers` skips RoPE where transformers does; an
    OLMo 3 with an older `rope_scaling` scales its full layers only; Gemma's legacy `gelu` is the tanh form."""
    from models import ModelConfig

    for kind in ("cohere2", "exaone4", "olmo3", "gemma2", "gemma3"):
        small = _small(kind)
        d = {k: v for k, v in small.to_dict().items() if k != "layer_types"}
        filled = type(small)(**{**d, "num_hidden_layers": 8})  # transformers' own default pattern
        want = tuple(t == "sliding_attention" for t in filled.layer_types)
        assert len(set(want)) == 2, kind  # both kinds of layer in eight
        ours = ModelConfig.from_hf({**d, "num_hidden_layers": 8, "architectures": [type(
            transformers.AutoModelForCausalLM.from_config(small)).__name__]})
        assert ours.layer_sliding == want, kind
        if kind in ("cohere2", "exaone4"):  # their full layers turn nothing
            assert ours.layer_rope == want, kind
        if kind == "exaone4":  # EXAONE's configs may spell the pattern in letters: L sliding, G global
            spelled = ModelConfig.from_hf({**d, "num_hidden_layers": 8, "sliding_window_pattern": "LLLG",
                                           "architectures": ["Exaone4ForCausalLM"]})
            assert spelled.layer_sliding == want
    smol = {**_small("smollm3").to_dict(), "architectures": ["SmolLM3ForCausalLM"]}
    want = tuple(bool(r) for r in smol.pop("no_rope_layers"))
    assert ModelConfig.from_hf(smol).layer_rope == want == (True, True, True, False)
    yarn = {**_small("olmo3-yarn").to_dict(), "architectures": ["Olmo3ForCausalLM"]}
    older = {**yarn, "rope_parameters": None, "rope_theta": yarn["rope_parameters"]["full_attention"]["rope_theta"],
             "rope_scaling": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)}
    new, old = ModelConfig.from_hf(yarn), ModelConfig.from_hf(older)
    assert new == old and new.rope_local_scale == 1.0 < new.rope_scale and new.rope_local != new.rope_global
    gemma = {**_small("gemma").to_dict(), "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu"}
    assert ModelConfig.from_hf(gemma).activation == "gelu_tanh"


# llama.cpp's names for the layers' tensors (its `tensor_mapping.py`), by transformers' module names.
_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_SANDWICH = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GLM4 = {"post_self_attn_layernorm": "post_attention_norm", "post_attention_layernorm": "ffn_norm",
         "post_mlp_layernorm": "post_ffw_norm"}
_PLAIN_MLP = {"mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
              "self_attn.dense": "attn_output"}  # StarCoder2's and Phi's
_GGUF_ARCH = {"olmo3": "olmo2", "cohere": "command-r", "phi": "phi2", "seed-oss": "seed_oss",
              "ernie4.5": "ernie4_5", "llama3-rope": "llama"}  # llama.cpp's names where they differ


PERMUTED = ("granite", "smollm3", "arcee", "llama3-rope")  # kinds whose q and k llama.cpp permutes (Llama's way)


def _llama3_freq_factors(p: dict, dim: int) -> np.ndarray:
    """Llama 3's RoPE scaling as the divisor of each frequency, written out as llama.cpp's converter computes it."""
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _write_gguf(ref, kind: str, path: str, split: int = 0) -> None:
    """The model as llama.cpp's `convert_hf_to_gguf.py` writes it: Gemma's norms as `1 + w`, q and k permuted for
    Granite, SmolLM3 and Arcee (GGML's normal RoPE), Phi-3's fused tensors as they are, each family's metadata; in
    parts of `split` tensors each where that is set (`gguf-split`'s files)."""
    import gguf

    cfg = ref.config
    w = gguf.GGUFWriter(path, _GGUF_ARCH.get(kind, kind.split("-")[0]), split_max_tensors=split)
    layer_norm = kind in ("starcoder2", "cohere", "cohere2", "phi")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # OLMo 3's are per layer type
    for add, value in ((w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_layer_norm_eps if layer_norm else w.add_layer_norm_rms_eps,
                        cfg.layer_norm_eps if kind in ("cohere", "cohere2", "phi") else
                        cfg.norm_epsilon if kind == "starcoder2" else cfg.rms_norm_eps),
                       (w.add_vocab_size, cfg.vocab_size),
                       (w.add_rope_freq_base, rope["rope_theta"])):
        add(value)
    if kind.startswith("gemma") or getattr(cfg, "head_dim", None):  # llama.cpp's converter writes a config's
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if kind == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    if kind.startswith(("phi3", "glm4", "phi")):
        w.add_rope_dimension_count(int(head_dim * cfg.rope_parameters["partial_rotary_factor"]))
    if kind.startswith("phi3"):
        w.add_sliding_window(cfg.sliding_window or 0)
    if kind == "phi3-longrope":  # the factor lists as tensors, the attention factor as llama.cpp's converter has it
        p = cfg.rope_parameters
        w.add_rope_scaling_orig_ctx_len(p["original_max_position_embeddings"])
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(cfg.max_position_embeddings / 16) / math.log(16)))
        for k in ("long", "short"):
            w.add_tensor(f"rope_factors_{k}.weight", np.asarray(p[f"{k}_factor"], np.float32))
    if kind == "llama3-rope":  # Llama 3's scaling as each frequency's divisor, a tensor (no scaling metadata)
        w.add_tensor("rope_freqs.weight", _llama3_freq_factors(rope, head_dim))
    if kind.startswith("cohere"):  # the logits' multiplier as it is
        w.add_logit_scale(cfg.logit_scale)
    if kind in ("olmo3", "cohere2", "exaone4"):
        w.add_sliding_window(cfg.sliding_window)
    if kind in ("olmo3", "exaone4"):
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    if kind == "granite":
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    names = dict(_GGUF_NAMES, **(_SANDWICH if kind == "gemma2" else {"post_attention_layernorm": "ffn_norm"}))
    if kind.startswith(("olmo", "exaone")):  # norms after the blocks only
        names = dict(_GGUF_NAMES, **_SANDWICH, **_QK_NORMS)
    if kind == "glm4":
        names = dict(_GGUF_NAMES, **_GLM4)
    names.update(_PLAIN_MLP)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    final = "model.final_layernorm" if kind == "phi" else "model.norm"
    w.add_tensor("output_norm.weight", sd[f"{final}.weight"] + (1 if kind.startswith("gemma") else 0))
    for name, hf in (("output_norm.bias", f"{final}.bias"), ("output.weight", "lm_head.weight"),
                     ("output.bias", "lm_head.bias")):
        if hf in sd and not (cfg.tie_word_embeddings and hf.startswith("lm_head")):
            w.add_tensor(name, sd[hf])
    for i in range(cfg.num_hidden_layers):
        for hf, name in names.items():
            t = sd.get(f"model.layers.{i}.{hf}.weight")
            if t is None:
                continue
            if kind.startswith("gemma") and hf.endswith("norm"):
                t = t + 1
            if kind in PERMUTED and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                t = llama_permute(t, cfg.num_attention_heads if "q_" in hf else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t)
            if f"model.layers.{i}.{hf}.bias" in sd:
                w.add_tensor(f"blk.{i}.{name}.bias", sd[f"model.layers.{i}.{hf}.bias"])
    close_gguf(w)


@pytest.mark.quick_compile
@pytest.mark.parametrize("kind", ["gemma", "gemma2", "phi3", "phi3-longrope", "granite", "smollm3", "olmo2", "olmo3",
                                  "glm4", "starcoder2", "cohere", "cohere2", "phi", "arcee", "seed-oss", "ernie4.5",
                                  "llama3-rope", "exaone4"])
def test_gguf_family_equals_the_hf_folder(kind, tmp_path, monkeypatch):
    """Each family written as llama.cpp's GGUF loads to the HF folder's config and logits (its metadata and tensor
    conventions above; Gemma 2's files keep no query scale, which llama.cpp takes from the head's width)."""
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    # Gemma 2's files keep no query scale, StarCoder2's no window (llama.cpp takes the head's width, and no window)
    changes = {"gemma2": {"query_pre_attn_scalar": 16}, "starcoder2": {"sliding_window": None}}.get(kind, {})
    ref = _hf_model(kind, str(tmp_path / "hf"), **changes)
    path = str(tmp_path / f"tiny-{kind}.gguf")
    _write_gguf(ref, kind, path)
    assert_gguf_loads_as_the_folder(str(tmp_path / "hf"), path, ROWS)


@pytest.mark.quick_compile
def test_a_split_gguf_loads_from_any_part_as_the_whole_file(tmp_path, monkeypatch):
    """llama.cpp's `gguf-split` parts (the metadata in the first, the tensors spread over all) load as the one file
    of the same model does, named by any part; a missing part is named in the error."""
    import glob

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model("granite", str(tmp_path / "hf"))
    for folder in ("whole", "split"):
        os.makedirs(tmp_path / folder)
    _write_gguf(ref, "granite", str(tmp_path / "whole" / "tiny.gguf"))
    _write_gguf(ref, "granite", str(tmp_path / "split" / "tiny.gguf"), split=8)
    parts = sorted(glob.glob(str(tmp_path / "split" / "*.gguf")))
    assert len(parts) == 3 and parts[0].endswith("tiny-00001-of-00003.gguf")
    whole = load_model(str(tmp_path / "whole" / "tiny.gguf"), with_tokenizer=False)
    want = our_logits(whole.module, whole.params, ROWS)
    for named in (parts[0], parts[2]):
        ours = load_model(named, with_tokenizer=False)
        assert ours.cfg == whole.cfg
        for a, b in zip(want, our_logits(ours.module, ours.params, ROWS)):
            np.testing.assert_array_equal(a, b)
    os.remove(parts[1])
    with pytest.raises(FileNotFoundError, match="tiny-00002-of-00003.gguf"):
        load_model(parts[0], with_tokenizer=False)


@pytest.mark.quick_compile
def test_longrope_turns_by_the_list_the_served_context_picks(tmp_path, monkeypatch):
    """LongRoPE (Phi-3.5, Phi-4-mini): served within its pretrained context (16 here), the short factors turn, as
    transformers' do for a sequence that fits it; served longer (the default), the long ones, as transformers' do for
    a sequence past it. The two differ, so each check holds only with its own list."""
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model("phi3-longrope", str(tmp_path / "hf"))
    long_row = [(7 * i + 3) % 256 for i in range(40)]
    for context, rows in ((16, ROWS), (0, [long_row]), (32, [long_row[:30]])):
        ours = load_model(str(tmp_path / "hf"), with_tokenizer=False, max_model_len=context)
        for row, got in zip(rows, our_logits(ours.module, ours.params, rows)):
            with torch.no_grad():
                want = ref(torch.tensor([row])).logits[0].numpy()
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (context, len(row))
    short = load_model(str(tmp_path / "hf"), with_tokenizer=False, max_model_len=16)
    a, b = (our_logits(m.module, m.params, [long_row])[0] for m in (short, ours))
    assert np.abs(a - b).max() > 10 * 1e-4 * np.abs(b).max()  # ten times the tolerance the checks above hold


@pytest.mark.quick_compile
def test_hf_overrides_stretch_the_context_as_transformers_reads_that_config(tmp_path, monkeypatch):
    """vLLM's `--hf-overrides`: the config's keys replaced before it is read. A longer context with linear RoPE
    scaling gives transformers' logits for the same weights under the same overridden config.json, and the runner
    then serves past the trained context (which it refuses without them, naming the flag)."""
    import json
    import shutil

    from engine.runner import RunnerConfig, plan_max_len

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _hf_model("llama", str(tmp_path / "hf"))
    overrides = {"max_position_embeddings": 512, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    shutil.copytree(tmp_path / "hf", tmp_path / "stretched")
    with open(tmp_path / "stretched" / "config.json") as f:
        config = json.load(f)
    with open(tmp_path / "stretched" / "config.json", "w") as f:
        json.dump({**config, **overrides}, f)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "stretched")).float().eval()
    plain = load_model(str(tmp_path / "hf"), with_tokenizer=False)
    ours = load_model(str(tmp_path / "hf"), with_tokenizer=False, hf_overrides=overrides)
    assert (plain.cfg.max_position, ours.cfg.max_position) == (128, 512)
    row = [(7 * i + 3) % 256 for i in range(200)]
    got, before = (our_logits(m.module, m.params, [row])[0] for m in (ours, plain))
    with torch.no_grad():
        want = ref(torch.tensor([row])).logits[0].numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale and np.abs(before - want).max() > 10 * 1e-4 * scale
    rc = RunnerConfig(max_model_len=256, page_size=16)
    assert plan_max_len(ours, rc, 64) == 256
    with pytest.raises(ValueError, match="--hf-overrides"):
        plan_max_len(plain, rc, 64)


def test_safetensors_are_read_as_the_library_reads_them(tmp_path):
    """The memory-mapped reader against the tensors the safetensors library wrote: every dtype a checkpoint holds
    (bfloat16 too), a scalar, an empty tensor, and tensors spread over two files of an index."""
    import json

    from safetensors.torch import save_file

    from models.loading.source import open_source

    g = torch.Generator().manual_seed(0)
    parts = [{"a.bf16": torch.randn(3, 5, generator=g).bfloat16(), "a.f16": torch.randn(7, generator=g).half(),
              "a.scalar": torch.tensor(2.5)},
             {"b.f32": torch.randn(2, 3, 4, generator=g), "b.i64": torch.arange(6).reshape(2, 3),
              "b.u8": torch.arange(5, dtype=torch.uint8), "b.empty": torch.zeros(0, 4), "b.bool": torch.rand(4) > 0.5}]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    weight_map = {}
    for i, part in enumerate(parts):
        save_file(part, str(tmp_path / f"model-{i}.safetensors"))
        weight_map.update({k: f"model-{i}.safetensors" for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    src = open_source(str(tmp_path))
    want = {k: v for part in parts for k, v in part.items()}
    assert sorted(src.names) == sorted(want)
    for name, t in want.items():
        got = src.read(name)
        assert got.shape == tuple(t.shape), name
        assert str(got.dtype) == str(t.dtype).removeprefix("torch."), name
        np.testing.assert_array_equal(got.astype(np.float64), t.double().numpy(), err_msg=name)


def test_unused_tensor_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hf"
    _hf_model("llama", str(folder))
    from safetensors.numpy import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not used"):
        load_model(str(folder), with_tokenizer=False)


@pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)
def test_tensor_parallel_matches_single_device():
    code = r"""
import dataclasses, numpy as np, jax
from models import ModelConfig, build, init_params
from models.sharding import make_mesh
from helpers import our_logits
cfg = ModelConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
    max_position_embeddings=64, tie_word_embeddings=False))
for kind in ("none", "fp8"):  # fp8: activations' scales span a split hidden axis (o_proj, down_proj)
    m = build(dataclasses.replace(cfg, quantization=kind))
    one = init_params(m, 0, make_mesh(1, jax.devices()[:1]))
    tp = init_params(m, 0, make_mesh(4))
    assert len(tp["params"]["layers"]["self_attn"]["q_proj"]["weight"].sharding.device_set) == 4
    assert tp["params"]["lm_head"]["weight"].dtype == "float32"  # fp8 too leaves the untied head float
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    a, b = our_logits(m, one, rows), our_logits(m, tp, rows)
    assert min(float(np.abs(x).max()) for x in a) > 1e-3  # logits, not zeros
    print(kind, max(float(np.abs(x - y).max()) for x, y in zip(a, b)))
"""
    env = dict(os.environ, XLA_FLAGS=device_flags(4),
               PYTHONPATH=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    errors = dict(line.split() for line in out.stdout.strip().splitlines()[-2:])
    assert float(errors["none"]) <= 1e-5 and float(errors["fp8"]) <= 1e-5, errors


@pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)
def test_random_weights_hash_draws_uniform_independent_values():
    """`init_params`' PRNG (`models.hash_prng`): uniform draws pass a chi-square test, normal ones have mean 0 and
    deviation 1, neighbours and the streams of split and folded keys are uncorrelated, and a seed gives the same
    values again."""
    import jax
    from scipy import stats

    from models import hash_prng

    key = hash_prng.key(0)
    u = np.asarray(jax.random.uniform(key, (200_000,)))
    assert stats.chisquare(np.bincount((u * 100).astype(int), minlength=100)).pvalue > 1e-3
    x = np.asarray(jax.random.normal(jax.random.fold_in(key, 7), (200_000,)))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    a, b = jax.random.split(key)
    streams = [x[:-1], x[1:], *(np.asarray(jax.random.normal(k, (x.size - 1,))) for k in (a, b, hash_prng.key(1)))]
    corr = np.corrcoef(np.stack(streams))
    assert np.abs(corr - np.eye(len(streams))).max() < 0.01, corr
    np.testing.assert_array_equal(np.asarray(jax.random.normal(hash_prng.key(0), (5,))),
                                  np.asarray(jax.random.normal(key, (5,))))


def test_gguf_tokenizer_matches_transformers(smollm, hf_smollm):
    ref = hf_smollm[0]
    msgs = [{"role": "user", "content": "Héllo wörld! 123 — ünïcode, emoji 🎉 and    spaces."}]
    a = smollm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    b = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert a == b
    assert smollm.tokenizer.encode(a) == ref.encode(b)


def test_runtime_never_imports_torch(smollm_path):
    code = ("import sys; from models import load_model; m = load_model('smollm2-135m-instruct'); "
            "m.tokenizer.encode('hi'); import engine; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_second_load_takes_cached_path(tmp_path, monkeypatch, smollm_path):
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path))
    before = dict(STATS)
    a = load_model(smollm_path, with_tokenizer=False)
    assert STATS["converted"] == before["converted"] + 1
    b = load_model(smollm_path, with_tokenizer=False)
    assert STATS["cached"] == before["cached"] + 1 and STATS["converted"] == before["converted"] + 1
    wa = np.asarray(a.params["params"]["layers"]["mlp"]["up_proj"]["weight"][3])
    wb = np.asarray(b.params["params"]["layers"]["mlp"]["up_proj"]["weight"][3])
    assert np.array_equal(wa, wb)


PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain why the sky is blue in one paragraph."]


def hf_greedy(model, tok, ids: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation of `ids`, with each step's top-two logit gap."""
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    gaps = [float(torch.topk(s[0], 2).values.diff().abs()) for s in g.scores]
    return g.sequences[0, len(ids):].tolist(), gaps


def hf_reference(path: str):
    """transformers' tokenizer and float32 model for a GGUF file. transformers parses the file three times (config,
    tensors, tokenizer) and rebuilds gguf's tensor-name map for every tensor: ~40 s for the default model here. Both
    are pure functions of their arguments, so they are memoized for the load (the same reader, the same map)."""
    import functools
    from unittest import mock

    import gguf

    folder, name = os.path.dirname(path), os.path.basename(path)
    with mock.patch.object(gguf, "GGUFReader", functools.cache(gguf.GGUFReader)), \
            mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)):
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def hf_smollm(smollm_path):
    """transformers' tokenizer and model for the packaged default model, loaded once for this file."""
    return hf_reference(smollm_path)


def greedy_reference(tok, model, prompts, max_new: int):
    """transformers' greedy continuation of chat prompts: (prompt ids, new ids, top-two gaps) each."""
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        out.append((ids, *hf_greedy(model, tok, ids, max_new)))
    return out


def assert_greedy_match(ours: list[int], ref: list[int], gaps: list[float]):
    """Equal token for token, or up to the first near tie (top-two gap < 0.05) of the reference."""
    tie = next((i for i, g in enumerate(gaps) if g < 0.05), len(ref))
    n = min(tie + 1, len(ref))
    assert ours[:n] == ref[:n], (ours, ref, tie)


def test_smollm2_greedy_matches_transformers(llm_f32, hf_smollm):
    from engine import SamplingParams

    # 24 tokens: each prompt's reference ends or meets its first near tie (a top-two gap under 0.05, past which a
    # greedy continuation is not defined by the model) within its first 11, so longer runs compared nothing more
    refs = greedy_reference(*hf_smollm, PROMPTS, 24)
    outs = llm_f32.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=24))
    for (prompt_ids, ref, gaps), out in zip(refs, outs):
        assert out.prompt_token_ids == prompt_ids
        assert_greedy_match(out.outputs[0].token_ids, ref, gaps)


@pytest.mark.optional
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_optional_models_greedy(name):
    from engine import LLM, SamplingParams
    from models.loading.packaged import resolve

    path = resolve(name)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    llm = LLM(load_model(name), max_num_seqs=2, max_model_len=512)
    tok, model = hf_reference(path)
    for p in prompts:
        ids = tok(p).input_ids
        ref, gaps = hf_greedy(model, tok, ids, 32)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32))[0]
        assert_greedy_match(out.outputs[0].token_ids, ref, gaps)


BEAMS = [("The capital of France is", 4, 12, 1.0), ("def fib(n):", 3, 16, 1.0), ("Once upon a time", 5, 10, 0.0),
         ("The best way to learn", 4, 12, 2.0), ("Once upon a time", 10, 12, 1.0)]


def test_beam_search_matches_transformers(llm_f32, hf_smollm):
    """`LLM.beam_search` against transformers' `generate(num_beams=...)` on the same weights: the same hypotheses in
    the same order, and the same scores (summed log-probability over length ** length_penalty), for widths 3-10,
    length penalties 0-2, prompts that run to max_tokens and chat prompts whose beams end at EOS (padded with EOS
    by transformers)."""
    import torch

    tok, ref = hf_smollm
    asks = ("Say hi.", "What is 2 + 2? Answer with the number only.")
    chats = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False).input_ids for q in asks]
    cases = [(tok(p).input_ids, w, n, lp) for p, w, n, lp in BEAMS] + [(ids, 4, 24, 1.0) for ids in chats]
    ended = 0
    for ids, width, n, lp in cases:
        out = llm_f32.beam_search([ids], beam_width=width, max_tokens=n, length_penalty=lp)[0]
        g = ref.generate(torch.tensor([ids]), num_beams=width, num_return_sequences=width, max_new_tokens=n,
                         do_sample=False, length_penalty=lp, early_stopping=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        want = [s[len(ids):].tolist() for s in g.sequences]
        assert len(out.outputs) == width
        for o, w, score in zip(out.outputs, want, g.sequences_scores.tolist()):
            assert o.token_ids == w[:len(o.token_ids)] and set(w[len(o.token_ids):]) <= {tok.eos_token_id}
            assert o.cumulative_logprob / len(o.token_ids) ** lp == pytest.approx(score, abs=2e-4)
            assert o.finish_reason == ("stop" if o.token_ids[-1] == tok.eos_token_id else "length")
            ended += o.finish_reason == "stop"
    assert ended >= 2  # the chat prompts' beams ended at EOS, not only at max_tokens
    with pytest.raises(ValueError, match="beam width"):
        llm_f32.beam_search(["Hi"], beam_width=11)
