"""Mixture-of-experts and latent-attention families (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, gpt-oss) against
transformers on shrunken random configs: the grouped product against the dense reference, the routers, prefill
logits, greedy decoding through the engine with paging, preemption and prefix caching (and the latent cache's size),
the API over HTTP, GGUF equal to the HF folder, MXFP4 experts, tensor parallelism, and the compilations a repeated
load makes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import device_flags
from helpers import assert_gguf_loads_as_the_folder, close_gguf, llama_permute, our_logits, run_all

from engine.engine import Engine
from engine.params import SamplingParams
from engine.runner import RunnerConfig, kv_bytes_per_token
from models import ModelConfig, hf_weight, load_model, quant
from models.layers import mlp, moe
from models.layers.causal_lm import layer_groups

pytestmark = pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)

ROWS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3], [200, 100, 50, 25, 12, 6, 3]]


def _config(kind: str, vocab: int = 256):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    if kind == "mixtral":  # every layer routed, top-2 of 4 renormalized
        return transformers.MixtralConfig(**common, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen2-moe":  # a shared expert, a dense layer between MoE ones (unrolled), weights not renormalized
        return transformers.Qwen2MoeConfig(**common, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                           mlp_only_layers=[1], norm_topk_prob=False)
    if kind == "qwen3-moe":  # q/k norms, top-3 of 8 renormalized, every layer routed (scanned)
        return transformers.Qwen3MoeConfig(**common, num_hidden_layers=2, head_dim=32, num_experts=8,
                                           num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True)
    if kind.startswith("deepseek-v3"):  # MLA with a q LoRA, YaRN with mscale, interleaved RoPE, a dense first
        # layer, sigmoid routing with a bias over 4 groups of 2 (top 2 groups), shared experts, scaled weights
        common.update(num_key_value_heads=4)
        mla = dict(kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                   rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                        mscale=1.0, mscale_all_dim=0.8, rope_theta=10000.0))
        if kind == "deepseek-v3-gguf":  # GGUF keeps one YaRN mscale (DeepSeek's checkpoints have the two equal)
            mla["rope_parameters"]["mscale"] = 0.8
        if kind == "deepseek-v3-plain":  # no q LoRA, default RoPE in halves, no renormalization
            mla.update(q_lora_rank=None, rope_interleave=False, rope_parameters=dict(rope_type="default",
                                                                                    rope_theta=10000.0))
        return transformers.DeepseekV3Config(**common, num_hidden_layers=3, moe_intermediate_size=32,
                                             n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                             n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                             norm_topk_prob=kind != "deepseek-v3-plain", **mla)
    if kind == "glm4-moe":  # GLM-4.5: DeepSeek-V3's routing and shared experts over grouped-query attention with
        # q/k/v biases, q/k norms and half of each head turning
        return transformers.Glm4MoeConfig(**common, num_hidden_layers=3, head_dim=16, moe_intermediate_size=32,
                                          n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                          n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                          norm_topk_prob=True, use_qk_norm=True, attention_bias=True)
    if kind == "deepseek-v2":  # MLA without a q LoRA (V2-Lite's), complex RoPE with YaRN, softmax routing limited
        # to the 2 of 4 groups with the best expert, weights not renormalized but scaled, shared experts
        common.update(num_key_value_heads=4)
        return transformers.DeepseekV2Config(
            **common, num_hidden_layers=3, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
            n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2, first_k_dense_replace=1,
            routed_scaling_factor=1.5, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                                mscale=0.707, mscale_all_dim=0.707, rope_theta=10000.0))
    if kind == "olmoe":  # q/k norms over all heads, top-3 of 8 softmax scores not renormalized
        return transformers.OlmoeConfig(**common, num_hidden_layers=2, num_experts=8, num_experts_per_tok=3,
                                        norm_topk_prob=False)
    if kind == "granite-moe":  # Granite's multipliers, top-2 of 4 logits softmaxed, the experts fused
        return transformers.GraniteMoeConfig(**common, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                             embedding_multiplier=3.0, residual_multiplier=0.5,
                                             attention_multiplier=0.25, logits_scaling=2.5)
    if kind == "granite-moe-shared":  # ... and an ungated shared expert beside them
        return transformers.GraniteMoeSharedConfig(**common, num_hidden_layers=2, num_local_experts=4,
                                                   num_experts_per_tok=2, shared_intermediate_size=48,
                                                   embedding_multiplier=3.0, residual_multiplier=0.5,
                                                   attention_multiplier=0.25, logits_scaling=2.5)
    if kind.startswith("ernie4.5-moe"):  # MoE layers every other from 1 to 3 (layer 5 would be one but for the end
        # index, which a GGUF cannot say): softmax scores, the choice biased, renormalized; shared experts; RoPE in
        # interleaved pairs
        end = dict(num_hidden_layers=4) if kind.endswith("gguf") else dict(num_hidden_layers=6, moe_layer_end_index=3)
        return transformers.Ernie4_5_MoeConfig(**common, **end, moe_intermediate_size=32, moe_num_experts=8, moe_k=3,
                                               moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=2)
    if kind == "minimax-m2":  # q/k norms over all heads, a quarter of each head turning, sigmoid routing with a
        # selection bias, renormalized
        return transformers.MiniMaxM2Config(**common, num_hidden_layers=2, head_dim=32, num_local_experts=8,
                                            num_experts_per_tok=3, rotary_dim=8)
    if kind.startswith("dots1"):  # q/k norms per head, a dense first layer, DeepSeek-V3's routing over 4 groups of 2
        # (top 2 groups; the release's one group as a GGUF, which has none), shared experts, scaled weights
        groups = dict(n_group=1, topk_group=1) if kind.endswith("gguf") else dict(n_group=4, topk_group=2)
        return transformers.Dots1Config(**common, num_hidden_layers=3, head_dim=16, moe_intermediate_size=32,
                                        n_routed_experts=8, num_experts_per_tok=3, **groups,
                                        n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                        norm_topk_prob=True)
    if kind == "gpt-oss":  # sinks, sliding (a window of 4) and full layers, biases everywhere, clamped SwiGLU, YaRN
        # without truncation, top-2 of 4 experts softmaxed
        return transformers.GptOssConfig(**common, num_hidden_layers=2, head_dim=16, num_local_experts=4,
                                         num_experts_per_tok=2, sliding_window=4, rope_parameters=dict(
                                             rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                             beta_fast=32.0, beta_slow=1.0, truncate=False, rope_theta=10000.0))
    raise KeyError(kind)


def _scale(kind: str, name: str) -> float:
    """The spread of a random parameter: routers wide enough that tokens spread over the experts, gpt-oss's experts'
    gate and up wide enough that its SwiGLU clamp (at 7) bites, its sinks as large as the scores."""
    if "norm" in name:
        return 0.3
    if kind == "gpt-oss" and name.endswith("experts.gate_up_proj"):
        return 1.5
    return 0.5 if "gate.weight" in name or "router" in name or "sinks" in name else 0.08


def _hf_model(kind: str, folder: str, vocab: int = 256, tokenizer=None):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, vocab))
    with torch.no_grad():  # everything random, routers large enough that tokens spread over the experts
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * _scale(kind, name))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:  # DeepSeek-V3's selection bias, non-zero
                b.copy_(torch.randn_like(b) * 0.1)
    model = model.float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tile", [0, 1, 4, 64])
def test_grouped_matmul_equals_the_dense_reference_for_any_routing(tile):
    """Every form of the grouped product, with routings that leave experts empty and pile pairs on one; plain SiLU
    experts, and gpt-oss's with biases and the clamped SwiGLU; and fp8's experts (`(weight, scale)` pairs), whose
    every form gives the einsum over the weights they stand for, each pair's row rounded to float8 as theirs is."""
    e, k, h, i = 6, 2, 32, 24
    keys = jax.random.split(jax.random.key(0), 7)
    gate, up = (jax.random.normal(kk, (e, i, h)) * 0.1 for kk in keys[:2])
    down = jax.random.normal(keys[2], (e, h, i)) * 0.1
    biases = tuple(jax.random.normal(kk, shape) for kk, shape in zip(jax.random.split(keys[6], 3),
                                                                     [(e, i), (e, i), (e, h)]))
    silu = mlp.glu(ModelConfig.from_hf(_config("mixtral").to_dict()))
    clamped = mlp.glu(dataclasses.replace(ModelConfig.from_hf(_config("gpt-oss").to_dict()), swiglu_limit=0.5))
    for t, ids in [(1, None), (40, None), (9, np.array([[3, 0]] * 9))]:  # the last: four experts get nothing
        x = jax.random.normal(keys[3], (t, h))
        if ids is None:
            ids = np.array(jax.random.randint(keys[4], (t, k), 0, e))
            ids[:, 1] = (ids[:, 0] + 1 + ids[:, 1] % (e - 1)) % e  # distinct experts per token
        w = jax.nn.softmax(jax.random.normal(keys[5], (t, k)), axis=-1)
        for glu, b in [(silu, ()), (clamped, biases)]:
            want = moe.dense_reference(x, w, jnp.asarray(ids), gate, up, down, glu, b)
            got = jax.jit(moe.experts, static_argnums=(6, 7))(x, w, jnp.asarray(ids), gate, up, down, glu, tile,
                                                              None, b)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
        rounded = lambda v: jnp.multiply(*(a.astype(jnp.float32) for a in quant.fp8_rows(v)))  # noqa: E731
        pairs = [tuple(map(jnp.asarray, quant.quantize_fp8(np.asarray(m)))) for m in (gate, up, down)]
        stand = [q.astype(jnp.float32) * s for q, s in pairs]  # the float weights the pairs stand for
        want = moe.dense_reference(rounded(x), w, jnp.asarray(ids), *stand, lambda a, c: rounded(silu(a, c)))
        got = jax.jit(moe.experts, static_argnums=(6, 7))(x, w, jnp.asarray(ids), *pairs, silu, tile)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_routing_matches_transformers_top_k():
    logits = np.random.default_rng(0).normal(size=(7, 8)).astype(np.float32)
    for normalize in (False, True):
        w, ids = moe.route(jnp.asarray(logits), 3, normalize)
        probs = torch.softmax(torch.tensor(logits), -1)
        tw, tids = torch.topk(probs, 3)
        if normalize:
            tw = tw / tw.sum(-1, keepdim=True)
        np.testing.assert_array_equal(np.asarray(ids), tids.numpy())
        np.testing.assert_allclose(np.asarray(w), tw.numpy(), rtol=1e-6)


@pytest.mark.parametrize("version", ["v2-greedy", "v2-grouped", "v3"])
def test_deepseek_router_matches_transformers(version):
    """V3: sigmoid scores, the bias for selection only, groups by their top-2 sum, renormalized and scaled weights.
    V2: softmax scores, greedy or groups by their best, scaled weights."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    v3 = version == "v3"
    cfg = _config("deepseek-v3" if v3 else "deepseek-v2")
    if version == "v2-greedy":
        cfg.topk_method = "greedy"
    router = (DeepseekV3TopkRouter if v3 else DeepseekV2TopkRouter)(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight))
        if v3:
            router.e_score_correction_bias.copy_(torch.randn_like(router.e_score_correction_bias) * 0.3)
    x = torch.randn(11, 64)
    _, want_w, want_ids = router(x)
    logits = jnp.asarray(x.numpy() @ router.weight.detach().numpy().T)
    if v3:
        bias = jnp.asarray(router.e_score_correction_bias.numpy())
        w, ids = moe.route(logits, 3, True, "sigmoid", bias, 4, 2, 2.5)
    else:
        groups = (1, 1) if version == "v2-greedy" else (4, 2)
        w, ids = moe.route(logits, 3, False, "softmax", None, *groups, 1.5, "max")
    order, want_order = np.argsort(np.asarray(ids), 1), np.argsort(want_ids.numpy(), 1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), order, 1),
                                  np.take_along_axis(want_ids.numpy(), want_order, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                               np.take_along_axis(want_w.detach().numpy(), want_order, 1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3",
                                  "deepseek-v3-plain", "glm4-moe", "gpt-oss", "olmoe", "granite-moe",
                                  "granite-moe-shared", "ernie4.5-moe", "minimax-m2", "dots1"])
def test_moe_family_matches_transformers(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model(kind, str(tmp_path / "hf"))
    ours = load_model(str(tmp_path / "hf"), with_tokenizer=False)
    groups = {"qwen2-moe": ["layers_0", "layers_1", "layers_2"], "deepseek-v2": ["layers_0", "layers_1-2"]}
    groups |= {k: groups["deepseek-v2"] for k in ("deepseek-v3", "deepseek-v3-plain", "glm4-moe", "dots1")}
    groups["ernie4.5-moe"] = ["layers_0", "layers_1", "layers_2", "layers_3", "layers_4-5"]  # MoE at 1 and 3
    assert [g[2] for g in layer_groups(ours.cfg, ours.module.scan)] == groups.get(kind, ["layers"])
    for row, g in zip(ROWS, our_logits(ours.module, ours.params, ROWS)):
        with torch.no_grad():
            want = ref(torch.tensor([row])).logits[0].numpy()
        assert np.abs(g - want).max() <= 1e-4 * np.abs(want).max(), (kind, np.abs(g - want).max())
    # SGLang's /get_weights_by_name reads a parameter back by the checkpoint's name: an expert's inside a scanned
    # stack, the router's, attention's and the head's, as the folder holds them (a tensor it fuses: refused)
    from safetensors.numpy import load_file

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    experts = [n for n in state if ".experts." in n]
    for name in [*experts[:1], *experts[-1:], *[n for n in state if n.endswith("gate.weight")][-1:], *list(state)[:3],
                 "lm_head.weight"]:
        if kind == "gpt-oss" and name in experts or name.endswith("input_linear.weight"):  # gate and up fused
            with pytest.raises(ValueError, match="another layout"):
                hf_weight(ours, name)
        elif name in state or ours.cfg.tie_embeddings:
            want = state.get(name, state["model.embed_tokens.weight"])
            np.testing.assert_array_equal(hf_weight(ours, name), want.astype(np.float32), err_msg=name)


def _fp8_folder(src, dst, form: str, block: tuple[int, int] = (32, 32)) -> None:
    """A copy of the float folder `src` in `dst` whose linear weights (attention's and the MLPs' and experts'
    projections; routers, norms, the embedding and the LM head stay float, as in the published checkpoints) are FP8
    (e4m3) beside their scales: `form` "block" as DeepSeek-V3's and Qwen3's `-FP8` checkpoints store them
    (`weight_scale_inv` per `block`, the last cut short where a weight's rows or columns are no multiple of it) or
    "channel" as compressed-tensors' FP8 does (`weight_scale` per output row, an `input_scale` beside). `src`'s
    weights are replaced by the ones the FP8 weights stand for: the reference folder."""
    import json
    import shutil

    import safetensors.torch

    shutil.copytree(src, dst)
    tensors = safetensors.torch.load_file(str(src / "model.safetensors"))
    stored = {}
    for name, w in tensors.items():
        if not name.endswith("proj.weight"):
            stored[name] = w
            continue
        if form == "block":
            (rows, cols), (n, k) = block, w.shape
            grid = (-(-n // rows), -(-k // cols))
            padded = torch.nn.functional.pad(w.abs(), (0, grid[1] * cols - k, 0, grid[0] * rows - n))
            scale = padded.reshape(grid[0], rows, grid[1], cols).amax(dim=(1, 3)) / 448
            scale = torch.where(scale == 0, 1.0, scale)
            full = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
            stored[f"{name}_scale_inv"] = scale
        else:
            full = scale = torch.where(w.abs().amax(-1, keepdim=True) == 0, 1.0, w.abs().amax(-1, keepdim=True) / 448)
            stored[f"{name}_scale"], stored[name.replace(".weight", ".input_scale")] = scale, torch.ones(1)
        stored[name] = (w / full).to(torch.float8_e4m3fn)
        tensors[name] = stored[name].float() * full
    safetensors.torch.save_file(stored, str(dst / "model.safetensors"), metadata={"format": "pt"})
    safetensors.torch.save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
        if form == "block" else
        {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"], "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}})
    (dst / "config.json").write_text(json.dumps(config))


def test_scaled_weights_dequantize_per_tensor_row_and_block():
    """`scaled_dequantize`: one scale, one per output row (either shape), a grid of blocks (given, or the smallest
    power of two that makes the grid, the last block cut short), int8 too; scales that cover no such grid raise."""
    from models.loading.source import scaled_dequantize

    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 40, 70)).astype(np.float32)  # two experts' weights
    rows = rng.uniform(0.5, 2, (2, 40, 1)).astype(np.float32)
    grid = rng.uniform(0.5, 2, (2, 3, 3)).astype(np.float32)  # blocks of 16 x 32: 40 rows in 3, 70 columns in 3
    full = np.repeat(np.repeat(grid, 16, axis=1), 32, axis=2)[:, :40, :70]
    np.testing.assert_array_equal(scaled_dequantize(w, np.float32([3.0])), w * 3)
    np.testing.assert_array_equal(scaled_dequantize(w, rows), w * rows)
    np.testing.assert_array_equal(scaled_dequantize(w, rows[..., 0]), w * rows)
    np.testing.assert_array_equal(scaled_dequantize(w, grid, (16, 32)), w * full)
    np.testing.assert_array_equal(scaled_dequantize(w, grid), w * full)  # 16 and 32 found from the grid
    q = rng.integers(-127, 128, (40, 70)).astype(np.int8)
    np.testing.assert_array_equal(scaled_dequantize(q, grid[0], (16, 32)), q.astype(np.float32) * full[0])
    with pytest.raises(ValueError, match="do not cover"):
        scaled_dequantize(w, grid, (32, 32))  # 40 rows in blocks of 32 make 2, not 3


@pytest.mark.parametrize("kind, form", [("deepseek-v3", "block"), ("qwen3-moe", "block"), ("qwen3-moe", "channel")])
def test_fp8_checkpoints_load_as_the_weights_they_stand_for(tmp_path, monkeypatch, kind, form):
    """FP8 checkpoints (DeepSeek-V3's own format, 128 x 128 blocks there and 32 x 32 here, its latent attention's
    projections cut short; compressed-tensors' per output row) load to the logits transformers gives on the float
    weights they stand for; Qwen3's block FP8 also to those of transformers' own FP8 loader, which dequantizes it."""
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _hf_model(kind, str(tmp_path / "hf"))
    _fp8_folder(tmp_path / "hf", tmp_path / "fp8", form)
    refs = [transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()]
    if kind == "qwen3-moe" and form == "block":
        refs.append(transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "fp8"), quantization_config=transformers.FineGrainedFP8Config(dequantize=True),
            dtype=torch.float32).eval())
    ours = load_model(str(tmp_path / "fp8"), with_tokenizer=False)
    for row, got in zip(ROWS, our_logits(ours.module, ours.params, ROWS)):
        for ref in refs:
            with torch.no_grad():
                want = ref(torch.tensor([row])).logits[0].numpy()
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()
    if form == "channel":  # served as fp8, a per-row checkpoint keeps its float8 weights, experts' too
        kept = load_model(str(tmp_path / "fp8"), with_tokenizer=False, quantization="fp8")
        layer = kept.params["params"]["layers"]
        for name, (w, scale) in [("experts", (layer["mlp"]["experts"]["up_proj"]["weight"],
                                              layer["mlp"]["experts"]["up_proj"]["scale"])),
                                 ("q_proj", (layer["self_attn"]["q_proj"]["weight"],
                                             layer["self_attn"]["q_proj"]["scale"]))]:
            assert w.dtype == quant.FP8, name
            want = (ours.params["params"]["layers"]["mlp"]["experts"]["up_proj"]["weight"] if name == "experts" else
                    ours.params["params"]["layers"]["self_attn"]["q_proj"]["weight"])
            np.testing.assert_allclose(np.asarray(w.astype(jnp.float32) * scale), np.asarray(want), rtol=1e-6,
                                       err_msg=name)
    if form == "block" and kind == "qwen3-moe":  # what is not read is refused up front, saying what it is
        import json

        import safetensors.torch

        from models.loading.source import open_source

        config = json.loads((tmp_path / "fp8" / "config.json").read_text())
        (tmp_path / "fp8" / "config.json").write_text(json.dumps({**config, "quantization_config": {
            "quant_method": "hqq", "nbits": 4}}))
        with pytest.raises(NotImplementedError, match="quantized by hqq"):
            open_source(str(tmp_path / "fp8"))
        (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
        tensors = safetensors.torch.load_file(str(tmp_path / "fp8" / "model.safetensors"))
        safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.endswith("_scale_inv")},
                                    str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(NotImplementedError, match="F8_E4M3 with no scale"):
            open_source(str(tmp_path / "fp8"))


def test_gpt_oss_mxfp4_folder_and_gguf_load_as_transformers_dequantizes_them(tmp_path, monkeypatch):
    """gpt-oss's checkpoints keep the experts in MXFP4 (`*_blocks`: two FP4 codes a byte, `*_scales`: a power of two
    per 32): random codes and scales load to transformers' own dequantized model's logits. llama.cpp's `gpt-oss`
    GGUF of the same weights (experts split, MXFP4 in GGML's block layout, sinks, biases, sliding window, YaRN)
    loads to the same config and logits."""
    import json
    import shutil

    import gguf
    import safetensors.numpy

    from models.loading.source import mxfp4_dequantize

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _hf_model("gpt-oss", str(tmp_path / "hf"))
    folder = tmp_path / "mxfp4"
    shutil.copytree(tmp_path / "hf", folder)
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, inputs, out = tensors.pop(name).shape
        tensors[f"{name}_blocks"] = rng.integers(0, 256, (e, out, inputs // 32, 16), dtype=np.uint8)
        low = 126 if "gate_up" in name else 120  # gate and up past the clamp, down as small as the rest
        tensors[f"{name}_scales"] = rng.integers(low, low + 3, (e, out, inputs // 32)).astype(np.uint8)
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    ours = load_model(str(folder), with_tokenizer=False)
    theirs = []
    for row, g in zip(ROWS, our_logits(ours.module, ours.params, ROWS)):
        with torch.no_grad():
            theirs.append(ref(torch.tensor([row])).logits[0].numpy())
        assert np.abs(g - theirs[-1]).max() <= 1e-4 * np.abs(theirs[-1]).max(), np.abs(g - theirs[-1]).max()

    cfg, path = ref.config, str(tmp_path / "tiny-gpt-oss.gguf")
    w = gguf.GGUFWriter(path, "gpt-oss")
    for add, value in [(w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, 512),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_rope_freq_base, 10000.0),
                       (w.add_expert_count, 4), (w.add_expert_used_count, 2),
                       (w.add_expert_feed_forward_length, cfg.intermediate_size), (w.add_sliding_window, 4),
                       (w.add_rope_scaling_type, gguf.RopeScalingType.YARN), (w.add_rope_scaling_factor, 4.0),
                       (w.add_rope_scaling_orig_ctx_len, 128), (w.add_vocab_size, cfg.vocab_size)]:
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    sd = {k: v for k, v in tensors.items()}
    for k in [k[:-len("_blocks")] for k in sd if k.endswith("_blocks")]:
        sd[k] = mxfp4_dequantize(sd.pop(f"{k}_blocks"), sd.pop(f"{k}_scales"))
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.router": "ffn_gate_inp"}
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for theirs_name, gg in names.items():
            for leaf in ("weight", "bias"):
                if f"{pre}{theirs_name}.{leaf}" in sd:
                    w.add_tensor(f"blk.{i}.{gg}.{leaf}", sd[f"{pre}{theirs_name}.{leaf}"])
        w.add_tensor(f"blk.{i}.attn_sinks.weight", sd[f"{pre}self_attn.sinks"])
        gate_up, bias = sd[f"{pre}mlp.experts.gate_up_proj"], sd[f"{pre}mlp.experts.gate_up_proj_bias"]
        for part, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
            q = gguf.quants.quantize(np.ascontiguousarray(gate_up[..., rows].swapaxes(-1, -2)), mxfp4)
            w.add_tensor(f"blk.{i}.ffn_{part}_exps.weight", q, raw_dtype=mxfp4)
            w.add_tensor(f"blk.{i}.ffn_{part}_exps.bias", np.ascontiguousarray(bias[:, rows]))
        down = np.ascontiguousarray(sd[f"{pre}mlp.experts.down_proj"].swapaxes(-1, -2))
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", gguf.quants.quantize(down, mxfp4), raw_dtype=mxfp4)
        w.add_tensor(f"blk.{i}.ffn_down_exps.bias", sd[f"{pre}mlp.experts.down_proj_bias"])
    close_gguf(w)
    from_gguf = load_model(path, with_tokenizer=False)
    assert dataclasses.replace(from_gguf.cfg, rms_eps=ours.cfg.rms_eps) == ours.cfg
    for a, b in zip(our_logits(ours.module, ours.params, ROWS), our_logits(from_gguf.module, from_gguf.params, ROWS)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@functools.cache
def _with_tokenizer(kind: str, folder: str, tokenizer_folder: str):
    """A `kind` folder with the default model's tokenizer, loaded, and its reference."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    ref = _hf_model(kind, folder, vocab=len(tok), tokenizer=tok)
    return load_model(folder), ref


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", params=["qwen2-moe", "deepseek-v3"])
def served(request, folders, smollm):
    """A Qwen2-MoE folder (shared expert, mixed layers) and a DeepSeek-V3 one (latent attention and cache), each
    with the default model's tokenizer, and their references."""
    return _with_tokenizer(request.param, str(folders / request.param), smollm.tokenizer.folder)


@pytest.fixture(scope="module", params=["qwen2-moe", "deepseek-v3", "gpt-oss", "qwen3-moe"])
def decoded(request, folders, smollm):
    """A folder of each kind of layer stack and cache decoded through the engine: `served`'s two (a shared expert in
    mixed layers; latent attention and its cache), gpt-oss (sinks, sliding layers) and Qwen3-MoE (scanned layers).
    Mixtral and DeepSeek-V2 differ from these only inside a layer (routing, RoPE, MLA without a q LoRA), which
    `test_moe_family_matches_transformers` checks against transformers over the paged cache; each engine run here
    compiles ~8 programs (~35 s of the cold suite)."""
    return _with_tokenizer(request.param, str(folders / request.param), smollm.tokenizer.folder)


def small_config(model) -> RunnerConfig:
    """4 slots at one batch size (few programs) over 17 pages: too few for 4 of the engine test's sequences at once
    (it preempts), enough for any one of the served test's requests. The two tests share it, so the served folders'
    programs come from the program store."""
    return RunnerConfig(max_num_seqs=4, max_model_len=256, decode_steps=4, decode_batch_sizes=(4,),
                        kv_cache_gb=17 * 16 * kv_bytes_per_token(model) / (1 << 30))


def _greedy_reference(ref, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their log-probabilities."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logps = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
    return tokens, logps


def test_engine_decodes_like_transformers_with_paging_preemption_and_prefix_caching(decoded):
    """32 greedy steps per prompt through a pool too small for all of them at once (preemption), every other prompt
    sharing a prefix (prefix cache hits; those after the first wait for its pages while the others are seated): the
    tokens equal transformers' and so do their log-probabilities; the same load again compiles nothing new; with
    speculative decoding (each reply as its prediction, one token wrong) the tokens are the same."""
    model, ref = decoded
    rng = np.random.default_rng(3)
    shared = rng.integers(10, 49000, 40).tolist()
    heads = [shared if i % 2 == 0 else rng.integers(10, 49000, 40).tolist() for i in range(6)]
    prompts = [head + rng.integers(10, 49000, 5 + 3 * i).tolist() for i, head in enumerate(heads)]
    per_page = 16 * kv_bytes_per_token(model)
    if model.cfg.kv_lora_rank:  # one latent vector per token and layer: kv_lora_rank + qk_rope_head_dim floats
        assert per_page == 16 * model.cfg.num_layers * (32 + 8) * 4
    eng = Engine(model, small_config(model))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=True)

    def run():
        return run_all(eng, prompts, [params] * len(prompts))

    reqs = run()
    assert eng.sched.preemptions > 0
    assert sum(r.cached_tokens for r in reqs) > 0
    for prompt, r in zip(prompts, reqs):
        want, logps = _greedy_reference(ref, prompt, 32)
        assert r.choices[0].token_ids == want
        np.testing.assert_allclose([lp[1] for lp in r.choices[0].logprobs], logps, atol=2e-4)
    again = run()  # the prompts' pages are cached now: other prefill shapes than the first time
    run()  # and what the small pool keeps of them settles (a prompt's own pages evicted in one run, kept the next)
    compiled = eng.runner.compiles
    assert [r.choices[0].token_ids for r in run()] == [r.choices[0].token_ids for r in again]
    assert [r.choices[0].token_ids for r in again] == [r.choices[0].token_ids for r in reqs]
    assert eng.runner.compiles == compiled
    assert {key[0][4][0] for key in eng.runner._decode.exes} == {(4,)}  # every step ran at the one batch size,
    first = [args[3] if fn is eng.runner._first else args[4]  # the call's rows: a first draw's, a decode's tokens
             for fn, args, _ in eng.runner.first_jobs() if fn in (eng.runner._first, eng.runner._decode)]
    assert {rows.shape[0] for rows in first} == {4}  # which a server's first shapes use too
    # Speculative decoding: each reply as its prediction, one token of it wrong, verified in K + 1 positions (the
    # family's chunk attention over the pool: MLA's latent cache, sinks, sliding layers). The tokens stay the same.
    eng.verify_always = True
    preds = [r.choices[0].token_ids[:10] + [7] + r.choices[0].token_ids[11:] for r in reqs]
    spec = run_all(eng, prompts, [params] * len(prompts), preds)
    assert [r.choices[0].token_ids for r in spec] == [r.choices[0].token_ids for r in reqs]
    np.testing.assert_allclose([lp[1] for r in spec for lp in r.choices[0].logprobs],
                               [lp[1] for r in reqs for lp in r.choices[0].logprobs], atol=2e-4)
    assert sum(r.accepted for r in spec) > 6 * 16 and sum(r.drafted - r.accepted for r in spec) > 0


def _write_experts(w, sd: dict, i: int, inter: int) -> None:
    """Layer `i`'s routed experts stacked as llama.cpp writes them, from transformers' fused `gate_up_proj`
    (`[E, 2I, H]` in memory) and `down_proj`."""
    gate_up = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"]
    w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :inter]))
    w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, inter:]))
    w.add_tensor(f"blk.{i}.ffn_down_exps.weight", sd[f"model.layers.{i}.mlp.experts.down_proj"])


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral", "olmoe", "granite-moe", "granite-moe-shared"])
def test_gguf_moe_equals_the_hf_folder(kind, tmp_path, monkeypatch):
    """A Qwen3-MoE (`qwen3moe`), a Mixtral (a `llama` GGUF with experts, q/k rows permuted), an OLMoE (`olmoe`) or
    a Granite MoE with and without a shared expert (`granitemoe`, q/k rows permuted, the multipliers as metadata)
    written as llama.cpp's GGUF (`ffn_*_exps`, `ffn_gate_inp`, `ffn_*_shexp`, expert metadata) gives the HF folder's
    config and logits."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model(kind, str(tmp_path / "hf"))
    cfg = ref.config
    granite = kind.startswith("granite")
    mixtral = kind == "mixtral" or granite  # experts as wide as the dense MLP, q and k permuted
    path = str(tmp_path / f"tiny-{kind}.gguf")
    w = gguf.GGUFWriter(path, {"mixtral": "llama", "qwen3-moe": "qwen3moe", "olmoe": "olmoe"}.get(kind, "granitemoe"))
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_expert_count(cfg.num_local_experts if mixtral else cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    inter = cfg.intermediate_size if mixtral or kind == "olmoe" else cfg.moe_intermediate_size
    if not mixtral:
        w.add_expert_feed_forward_length(inter)
    if granite:
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    if kind == "granite-moe-shared":
        w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate": "ffn_gate_inp"}
    if not mixtral:
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    if granite:  # transformers' own module names (its checkpoints': `block_sparse_moe.router.layer`, ...)
        names["block_sparse_moe.router"] = names.pop("mlp.gate")
        for i in range(cfg.num_hidden_layers):
            for part in ("gate_up_proj", "down_proj"):
                sd[f"model.layers.{i}.mlp.experts.{part}"] = sd[f"model.layers.{i}.block_sparse_moe.experts.{part}"]
    if mixtral:  # llama.cpp permutes a llama GGUF's q and k rows for its RoPE
        for i in range(cfg.num_hidden_layers):
            q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
            sd[q], sd[k] = llama_permute(sd[q], cfg.num_attention_heads), llama_permute(sd[k], cfg.num_key_value_heads)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"{pre}{hf}.weight"])
        _write_experts(w, sd, i, inter)
        if kind == "granite-moe-shared":
            gate, up = np.split(sd[f"{pre}shared_mlp.input_linear.weight"], 2)
            w.add_tensor(f"blk.{i}.ffn_gate_shexp.weight", gate)
            w.add_tensor(f"blk.{i}.ffn_up_shexp.weight", up)
            w.add_tensor(f"blk.{i}.ffn_down_shexp.weight", sd[f"{pre}shared_mlp.output_linear.weight"])
    close_gguf(w)
    assert_gguf_loads_as_the_folder(str(tmp_path / "hf"), path, ROWS)


def _gguf_ends(w, ref) -> dict:
    """Write a GGUF's tokenizer (placeholder tokens), embedding, final norm and LM head from the transformers model
    `ref`; its state dict as numpy."""
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(ref.config.vocab_size)])
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    return sd


def test_gguf_ernie_moe_equals_the_hf_folder(tmp_path, monkeypatch):
    """ERNIE 4.5 MoE as llama.cpp's `ernie4_5-moe` GGUF: MoE layers from `leading_dense_block_count` every
    `interleave_moe_layer_step`, the router's selection bias (`exp_probs_b`, `[1, experts]`), shared experts as one
    `*_shexp` MLP of their width together, q and k as the checkpoint has them, give the HF folder's config and
    logits; the HF folder's multi-token-prediction block (`model.mtp_*`, as the release ships it) is left unread."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model("ernie4.5-moe-gguf", str(tmp_path / "hf"))
    import safetensors.torch

    file = str(tmp_path / "hf" / "model.safetensors")
    tensors = safetensors.torch.load_file(file)
    tensors |= {"model.mtp_emb_norm.0.weight": torch.ones(64),  # the release's prediction block: not read
                "model.mtp_block.0.mlp.up_proj.weight": torch.ones(8, 64)}
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    cfg, path = ref.config, str(tmp_path / "tiny-ernie.gguf")
    w = gguf.GGUFWriter(path, "ernie4_5-moe")
    head = cfg.hidden_size // cfg.num_attention_heads
    inter = cfg.moe_intermediate_size
    for add, value in ((w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_key_length, head), (w.add_value_length, head),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_rope_freq_base, cfg.rope_parameters["rope_theta"]),
                       (w.add_expert_count, cfg.moe_num_experts), (w.add_expert_used_count, cfg.moe_k),
                       (w.add_expert_feed_forward_length, inter),
                       (w.add_expert_shared_feed_forward_length, inter * cfg.moe_num_shared_experts),
                       (w.add_interleave_moe_layer_step, cfg.moe_layer_interval),
                       (w.add_leading_dense_block_count, cfg.moe_layer_start_index),
                       (w.add_vocab_size, cfg.vocab_size)):
        add(value)
    sd = _gguf_ends(w, ref)
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate.weight": "ffn_gate_inp.weight",
             "mlp.gate.moe_statics.e_score_correction_bias": "exp_probs_b.bias"}
    names |= {f"self_attn.{p}_proj.weight": f"attn_{n}.weight" for p, n in (("q", "q"), ("k", "k"), ("v", "v"),
                                                                            ("o", "output"))}
    for p in ("gate", "up", "down"):
        names |= {f"mlp.{p}_proj.weight": f"ffn_{p}.weight",
                  f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, name in names.items():
            if f"model.layers.{i}.{hf}" in sd:  # (the bias `[1, experts]`, as llama.cpp's converter leaves it)
                w.add_tensor(f"blk.{i}.{name}", sd[f"model.layers.{i}.{hf}"])
        if f"model.layers.{i}.mlp.experts.down_proj" in sd:
            _write_experts(w, sd, i, cfg.moe_intermediate_size)
    close_gguf(w)
    assert_gguf_loads_as_the_folder(str(tmp_path / "hf"), path, ROWS)


def test_gguf_glm4_moe_equals_the_hf_folder(tmp_path, monkeypatch):
    """GLM-4.5 as llama.cpp's `glm4moe` GGUF: a dense first layer, stacked experts, shared experts (`*_shexp`), the
    router's selection bias (`exp_probs_b`), q/k/v biases and norms, the norm before the MLP as `post_attention_norm`,
    and a multi-token-prediction block counted in `block_count` (skipped) give the HF folder's config and logits."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model("glm4-moe", str(tmp_path / "hf"))
    cfg, path = ref.config, str(tmp_path / "tiny-glm4moe.gguf")
    layers = cfg.num_hidden_layers
    w = gguf.GGUFWriter(path, "glm4moe")
    for add, value in ((w.add_block_count, layers + 1), (w.add_nextn_predict_layers, 1),
                       (w.add_context_length, cfg.max_position_embeddings), (w.add_embedding_length, cfg.hidden_size),
                       (w.add_feed_forward_length, cfg.intermediate_size), (w.add_head_count, cfg.num_attention_heads),
                       (w.add_head_count_kv, cfg.num_key_value_heads), (w.add_key_length, cfg.head_dim),
                       (w.add_value_length, cfg.head_dim), (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_rope_freq_base, cfg.rope_parameters["rope_theta"]),
                       (w.add_rope_dimension_count, cfg.head_dim // 2), (w.add_expert_count, cfg.n_routed_experts),
                       (w.add_expert_used_count, cfg.num_experts_per_tok),
                       (w.add_expert_shared_count, cfg.n_shared_experts),
                       (w.add_expert_feed_forward_length, cfg.moe_intermediate_size),
                       (w.add_leading_dense_block_count, cfg.first_k_dense_replace),
                       (w.add_expert_weights_scale, cfg.routed_scaling_factor),
                       (w.add_expert_weights_norm, cfg.norm_topk_prob), (w.add_expert_group_count, cfg.n_group),
                       (w.add_expert_group_used_count, cfg.topk_group),
                       (w.add_expert_gating_func, gguf.ExpertGatingFuncType.SIGMOID),
                       (w.add_vocab_size, cfg.vocab_size)):
        add(value)
    sd = _gguf_ends(w, ref)
    names = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "post_attention_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
             "mlp.gate.e_score_correction_bias": "exp_probs_b.bias"}
    for proj, name in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
        names |= {f"self_attn.{proj}_proj.{leaf}": f"attn_{name}.{leaf}" for leaf in ("weight", "bias")}
    names |= {f"self_attn.{n}_norm.weight": f"attn_{n}_norm.weight" for n in ("q", "k")}
    for p in ("gate", "up", "down"):
        names |= {f"mlp.{p}_proj.weight": f"ffn_{p}.weight",
                  f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight"}
    for i in range(layers):
        for hf, name in names.items():
            if f"model.layers.{i}.{hf}" in sd:
                w.add_tensor(f"blk.{i}.{name}", sd[f"model.layers.{i}.{hf}"])
        if i >= cfg.first_k_dense_replace:
            _write_experts(w, sd, i, cfg.moe_intermediate_size)
    for name in ("attn_norm.weight", "nextn.eh_proj.weight"):  # the prediction block: read by nothing
        w.add_tensor(f"blk.{layers}.{name}", np.ones((4, cfg.hidden_size), np.float32))
    close_gguf(w)
    assert_gguf_loads_as_the_folder(str(tmp_path / "hf"), path, ROWS)


@pytest.mark.parametrize("kind", ["dots1-gguf", "minimax-m2"])
def test_gguf_dots1_and_minimax_m2_equal_the_hf_folder(kind, tmp_path, monkeypatch):
    """dots.llm1 (`dots1`: a dense first layer, shared experts, scaled weights, per-head q/k norms) and MiniMax-M2
    (`minimax-m2`: whole q/k norms, a partial RoPE width as `rope.dimension_count`) as llama.cpp's converter writes
    them, q and k unpermuted, the selection bias as `exp_probs_b`, sigmoid gating in the metadata, give the HF
    folder's config and logits."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model(kind, str(tmp_path / "hf"))
    cfg, path = ref.config, str(tmp_path / f"tiny-{kind}.gguf")
    dots = kind.startswith("dots1")
    inter = cfg.moe_intermediate_size if dots else cfg.intermediate_size
    w = gguf.GGUFWriter(path, "dots1" if dots else "minimax-m2")
    meta = [(w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, cfg.max_position_embeddings),
            (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
            (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
            (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
            (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_rope_freq_base, cfg.rope_parameters["rope_theta"]),
            (w.add_expert_count, cfg.n_routed_experts if dots else cfg.num_local_experts),
            (w.add_expert_used_count, cfg.num_experts_per_tok), (w.add_expert_feed_forward_length, inter),
            (w.add_expert_gating_func, gguf.ExpertGatingFuncType.SIGMOID), (w.add_vocab_size, cfg.vocab_size)]
    if dots:
        meta += [(w.add_leading_dense_block_count, cfg.first_k_dense_replace),
                 (w.add_expert_shared_count, cfg.n_shared_experts),
                 (w.add_expert_weights_scale, cfg.routed_scaling_factor),
                 (w.add_expert_weights_norm, cfg.norm_topk_prob)]
    else:
        meta.append((w.add_rope_dimension_count, cfg.rotary_dim))
    for add, value in meta:
        add(value)
    sd = _gguf_ends(w, ref)
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
             "mlp.e_score_correction_bias": "exp_probs_b.bias"}
    names |= {f"self_attn.{p}_proj.weight": f"attn_{n}.weight" for p, n in (("q", "q"), ("k", "k"), ("v", "v"),
                                                                            ("o", "output"))}
    names |= {f"self_attn.{n}_norm.weight": f"attn_{n}_norm.weight" for n in ("q", "k")}
    for p in ("gate", "up", "down"):
        names |= {f"mlp.{p}_proj.weight": f"ffn_{p}.weight",
                  f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, name in names.items():
            if f"model.layers.{i}.{hf}" in sd:
                w.add_tensor(f"blk.{i}.{name}", sd[f"model.layers.{i}.{hf}"])
        if f"model.layers.{i}.mlp.experts.down_proj" in sd:
            _write_experts(w, sd, i, inter)
    close_gguf(w)
    assert_gguf_loads_as_the_folder(str(tmp_path / "hf"), path, ROWS)


def _write_deepseek2_gguf(ref, path: str, split_kv_b: bool) -> None:
    """`ref` written as llama.cpp's converter writes DeepSeek-V2/V3 (`deepseek2`): one KV head and 576-style key
    lengths with the per-head `_mla` ones, the experts stacked, the selection bias as `exp_probs_b.bias`, and
    `kv_b_proj` split into `attn_k_b` (transposed) and `attn_v_b`, or whole (`attn_kv_b`, files before 2025)."""
    import gguf

    cfg = ref.config
    rope = cfg.rope_parameters
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    sigmoid = isinstance(cfg, transformers.DeepseekV3Config)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    r, nope, rd, vd = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    h = cfg.num_attention_heads
    w.add_kv_lora_rank(r)
    w.add_key_length(r + rd)
    w.add_value_length(r)
    w.add_key_length_mla(nope + rd)
    w.add_value_length_mla(vd)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rd)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
             "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
             "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
             "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    inter = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        for hf, gg in names.items():
            if f"{pre}{hf}.weight" in sd:
                w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"{pre}{hf}.weight"])
        kv_b = sd[f"{pre}self_attn.kv_b_proj.weight"]
        if split_kv_b:  # convert_hf_to_gguf.py: view [H, nope + v, r], split, k_b transposed
            k_b, v_b = np.split(kv_b.reshape(h, nope + vd, r), [nope], axis=1)
            w.add_tensor(f"blk.{i}.attn_k_b.weight", np.ascontiguousarray(k_b.transpose(0, 2, 1)))
            w.add_tensor(f"blk.{i}.attn_v_b.weight", np.ascontiguousarray(v_b))
        else:
            w.add_tensor(f"blk.{i}.attn_kv_b.weight", kv_b)
        if f"{pre}mlp.gate.e_score_correction_bias" in sd:
            w.add_tensor(f"blk.{i}.exp_probs_b.bias", sd[f"{pre}mlp.gate.e_score_correction_bias"])
        if f"{pre}mlp.experts.gate_up_proj" in sd:
            _write_experts(w, sd, i, inter)
    close_gguf(w)


@pytest.mark.parametrize("kind,split", [("deepseek-v3-gguf", True), ("deepseek-v2", False)])
def test_gguf_deepseek_equals_the_hf_folder(kind, split, tmp_path, monkeypatch):
    """DeepSeek-V3 (q LoRA, sigmoid routing with its bias, `attn_k_b`/`attn_v_b`) and V2 (one q projection,
    group-limited softmax routing, the older whole `attn_kv_b`) written as llama.cpp's `deepseek2` GGUF give the HF
    folder's config and logits."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model(kind, str(tmp_path / "hf"))
    path = str(tmp_path / f"tiny-{kind}.gguf")
    _write_deepseek2_gguf(ref, path, split)
    assert_gguf_loads_as_the_folder(str(tmp_path / "hf"), path, ROWS)


@pytest.fixture(scope="module")
def moe_server(served):
    """The folder served over HTTP."""
    from conftest import live_server

    model, _ = served
    yield from live_server(model, small_config(model))


def test_moe_model_serves_the_api_through_the_official_client(moe_server, served):
    """Streaming with sampling controls, logprobs, echo, a cached prefix, structured output and a forced tool call."""
    import json

    import jsonschema
    import openai

    _, ref = served
    client = openai.OpenAI(base_url=moe_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    name = moe_server.model.name
    prompt = list(range(100, 150))
    want, _ = _greedy_reference(ref, prompt, 8)
    body = {"ignore_eos": True, "return_token_ids": True}
    for _ in range(2):  # the second time the prompt's pages come from the prefix cache
        done = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, extra_body=body)
        assert done.choices[0].token_ids == want
    assert done.usage.prompt_tokens_details.cached_tokens > 0
    echoed = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, logprobs=2, echo=True,
                                       extra_body=body)
    assert echoed.choices[0].token_ids == want
    assert len(echoed.choices[0].logprobs.tokens) == len(prompt) + 8  # the prompt's tokens and logprobs too
    chunks = list(client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hello"}], stream=True, max_tokens=12, seed=5,
        temperature=0.8, top_p=0.9, frequency_penalty=0.5, extra_body={"top_k": 20, "ignore_eos": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "JSON please"}], max_tokens=64, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
        "additionalProperties": False}}}
    # One call (a random model may otherwise go on to more calls, JSON whitespace between them, past max_tokens)
    call = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Pick"}], max_tokens=128,
                                          tools=[tool], tool_choice="required", parallel_tool_calls=False, seed=2)
    args = json.loads(call.choices[0].message.tool_calls[0].function.arguments)
    assert args["color"] in ("red", "blue")


def test_tensor_and_expert_parallel_moe_and_latent_attention_match_one_device():
    """Experts split by width and MLA's heads split over 4 virtual devices give the one-device logits; so do the
    experts split whole over the 4 (expert parallelism: each device holds 2 of the 8), float or fp8 (relative to the
    logits' largest); and greedy tokens through the engine on a data 2 x tensor 2 mesh with experts split are the
    one-device model's (each the argmax of one device's logits over the prompt and the tokens before it:
    teacher-forced, where a second engine cost ~30 s of compiling)."""
    import json
    import os
    import subprocess
    import sys

    code = r"""
import dataclasses, json
import numpy as np, jax
from engine.compile import use_caches
from engine.engine import Engine
from engine.params import SamplingParams
from engine.runner import RunnerConfig
from models import Model, ModelConfig, build, init_params, with_expert_parallel
from models.loading.source import cache_root
from models.sharding import make_mesh
from helpers import our_logits, run_all
use_caches(cache_root())  # compiled once per machine, as the suite's own process does
common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False, num_experts_per_tok=2,
              moe_intermediate_size=32)
shapes = [dict(common, architectures=["Qwen3MoeForCausalLM"], num_key_value_heads=4, num_experts=8),
          dict(common, architectures=["DeepseekV3ForCausalLM"], n_routed_experts=8, n_group=2, topk_group=1,
               n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=8, v_head_dim=8)]
rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
out = {"tp": 0.0, "ep": 0.0, "fp8": 0.0}
for shape, q in [(s, q) for q in ("none", "fp8") for s in shapes]:  # fp8: experts as float8 pairs
    cfg = dataclasses.replace(ModelConfig.from_hf(shape), quantization=q)
    m, ep = build(cfg), build(with_expert_parallel(cfg, 1, 4))
    one = init_params(m, 0, make_mesh(1, jax.devices()[:1]))
    for kind, module in (("tp", m), ("ep", ep)):
        four = init_params(module, 0, make_mesh(4))
        pairs = zip(our_logits(m, one, rows), our_logits(module, four, rows))
        key = kind if q == "none" else "fp8"
        out[key] = max(out[key], *(float(np.abs(a - b).max() / (np.abs(a).max() if q == "fp8" else 1))
                                   for a, b in pairs))
    layers = four["params"].get("layers") or four["params"]["layers_1"]
    w = layers["mlp"]["experts"]["gate_proj"]["weight"]
    out["experts_per_device"] = w.sharding.shard_shape(w.shape)[-3]


cfg = ModelConfig.from_hf(shapes[0])
ep_cfg = with_expert_parallel(cfg, 2, 2)
mesh = make_mesh(2, jax.devices()[:4], dp=2)
module = build(ep_cfg, tp=2)
model = Model("random", ep_cfg, module, init_params(module, 0, mesh), mesh, None, {}, (), "random")
eng = Engine(model, RunnerConfig(max_num_seqs=4, max_model_len=64, decode_steps=2, kv_cache_gb=0.001,
                                 decode_batch_sizes=(2,)))
prompts = [[5 + i, 17, 42 + i, 99, 3][: 2 + i] for i in range(4)]
reqs = run_all(eng, prompts, [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 4)
out["tokens_ep"] = [r.choices[0].token_ids for r in reqs]
m = build(cfg)
logits = our_logits(m, init_params(m, 0, make_mesh(1, jax.devices()[:1])),
                    [p + t[:-1] for p, t in zip(prompts, out["tokens_ep"])])
out["tokens_one"] = [lg[len(p) - 1:].argmax(-1).tolist() for p, lg in zip(prompts, logits)]
print(json.dumps(out))
"""
    env = dict(os.environ, XLA_FLAGS=device_flags(4),
               PYTHONPATH=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tp"] <= 1e-5 and got["ep"] <= 1e-5 and got["fp8"] <= 1e-5, got
    assert got["experts_per_device"] == 2
    assert got["tokens_ep"] == got["tokens_one"] and all(len(t) == 8 for t in got["tokens_one"])
