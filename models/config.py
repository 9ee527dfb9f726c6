"""Model configuration: one frozen dataclass, built from a Hugging Face `config.json` dict."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer; hashable so it can be a jit static argument."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    attention_bias: bool = False  # q/k/v projections have biases
    o_bias: bool = False  # so does o_proj (HF's `attention_bias` but for Qwen2's and GLM's; Seed-OSS says apart)
    attn_sinks: bool = False  # gpt-oss: a learned logit per head joins each softmax (its weight is dropped)
    layer_norm: bool = False  # LayerNorm (mean-centered: Cohere, StarCoder2, Phi) rather than RMSNorm; eps `rms_eps`
    norm_bias: bool = False  # the LayerNorms have biases (StarCoder2, Phi)
    mlp_gated: bool = True  # the MLP is `down(act(gate) * up)`; else `down(act(up))` (StarCoder2's, Phi's)
    mlp_bias: bool = False  # the MLP's projections have biases
    lm_head_bias: bool = False  # Phi
    qk_norm: bool = False
    qk_norm_whole: bool = False  # OLMo 2: the q/k norms span all heads' values together (else each head's)
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w - 1: scale is (offset + w)
    sandwich_norms: bool = False  # Gemma: post-attention and post-MLP norms
    embed_scale: float = 1.0  # the embeddings are scaled by it (Gemma's sqrt(hidden), Granite's multiplier)
    residual_scale: float = 1.0  # Granite: each block's output is scaled by it before the residual sum
    logits_scaling: float = 1.0  # the logits are divided by it (Granite's; Cohere's `logit_scale` multiplier as 1 / it)
    activation: str = "silu"  # or "gelu" (exact), "gelu_tanh", "relu2" (ReLU squared), or gpt-oss's experts'
    # "clamped_swiglu" (`layers.mlp.activation`, `layers.mlp.glu`)
    swiglu_alpha: float = 1.702  # clamped_swiglu: `(clip(up) + 1) * g * sigmoid(alpha * g)`, g = min(gate, limit)
    swiglu_limit: float = 7.0
    query_scale: float = 0.0  # softmax scale; 0 means head_dim ** -0.5
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    sliding_window: int = 0
    layer_sliding: tuple[bool, ...] = ()  # per layer: attends over a sliding window
    rope_global: tuple[float, ...] = ()  # inverse frequencies of full-attention layers
    rope_local: tuple[float, ...] = ()  # inverse frequencies of sliding layers
    rope_scale: float = 1.0  # YaRN's or LongRoPE's attention factor: cos and sin are scaled by it
    rope_local_scale: float = 1.0  # the sliding layers' (OLMo 3 scales its full layers' RoPE only)
    layer_rope: tuple[bool, ...] = ()  # per layer: turns queries and keys by position (SmolLM3 skips every 4th); ()
    # all do. A partial rotary factor shows as `rope_global` shorter than half the head (`layers.attention.rope`).
    num_experts: int = 0  # mixture of experts: routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k routing weights
    scoring: str = "softmax"  # router scores: softmax, or sigmoid (DeepSeek-V3)
    selection_bias: bool = False  # the choice ranks the scores plus a learned bias (DeepSeek-V3's, ERNIE 4.5's)
    expert_groups: int = 1  # DeepSeek: experts in groups; tokens pick `top_groups` groups first, ranked by
    top_groups: int = 1
    group_score: str = "top2"  # the sum of their two best scores (V3) or their best (V2's group_limited_greedy)
    routed_scale: float = 1.0  # DeepSeek's routed_scaling_factor
    shared_expert_size: int = 0  # a shared expert this wide (Qwen2-MoE's, DeepSeek's n_shared_experts together)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert is scaled by sigmoid(gate(x))
    router_bias: bool = False  # gpt-oss: the router and the experts' projections have biases
    expert_bias: bool = False
    moe_layers: tuple[bool, ...] = ()  # per layer: an MoE block (else the dense MLP)
    expert_mesh: tuple[int, ...] = ()  # expert parallelism: the (data, tp) sizes of the mesh whose tp axis splits
    # the experts (`--enable-expert-parallel`, `layers.moe.Experts`); () keeps every expert on every tp shard
    kv_lora_rank: int = 0  # multi-head latent attention (DeepSeek; 0: grouped-query attention)
    q_lora_rank: int = 0  # MLA queries through a low-rank projection (0: one q_proj)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # the rotary dims come in interleaved pairs (MLA's, GLM-4's: `attention.rope`)
    dtype: str = "float32"
    quantization: str = "none"  # "int8": int8 weights, a scale per 32 inputs; "int4": Q4_1; "fp8" (models.quant)
    matmul: str = "xla"  # quantized products: "xla" widens the weights, "cpu" the C++ kernel (backends.cpu_matmul)
    kv_dtype: str = ""  # the KV pool's ("": `dtype`); float8_e4m3fn or float8_e5m2: a byte a value (--kv-cache-dtype)
    lora_slots: int = 0  # LoRA adapters held at once (`models.lora`; 0: none): each dense layer's projections carry
    lora_rank: int = 0  # `lora_a [slots, rank, in]` and `lora_b [slots, out, rank]` in the "lora" collection
    image_block: int = 0  # Gemma 3's pictures: the positions of one, which attend to each other both ways (0: none)

    @property
    def scale(self) -> float:
        """Softmax scale of the attention scores."""
        return self.query_scale or self.head_dim**-0.5

    @property
    def cache_dtype(self) -> str:
        """The dtype keys and values are kept in: `kv_dtype`, else the model's."""
        return self.kv_dtype or self.dtype

    @property
    def plain_attention(self) -> bool:
        """No soft-capping, window or sinks: what the `cpu`, `pallas-gpu` and `pallas-tpu` kernels compute (others
        attend through `paged.reference`)."""
        return not (self.attn_softcap or self.sliding_window or self.attn_sinks or self.image_block)

    @property
    def cache_heads(self) -> int:
        """Heads of the KV pool: the KV heads, or MLA's one latent vector per token."""
        return 1 if self.kv_lora_rank else self.num_kv_heads

    @property
    def cache_widths(self) -> tuple[int, int]:
        """Widths of a key and of a value in the pool; MLA keeps `kv_lora_rank + qk_rope_head_dim` per token as the
        key and no value (its values are the latent part of the same vector)."""
        if self.kv_lora_rank:
            return self.kv_lora_rank + self.qk_rope_head_dim, 0
        return self.head_dim, self.head_dim

    def with_dtype(self, dtype: str) -> "ModelConfig":
        """The same config computing in another dtype."""
        return dataclasses.replace(self, dtype=dtype)

    @staticmethod
    def from_hf(d: dict[str, Any], dtype: str = "float32", context: int = 0) -> "ModelConfig":
        """Build from a `config.json` dict (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3 text, Phi-3, Granite, SmolLM3,
        OLMo 2/3, EXAONE 4, GLM-4, Cohere 1/2, StarCoder2, Phi-2, Arcee, Seed-OSS, ERNIE 4.5, Mixtral, Qwen2/3-MoE,
        OLMoE, Granite MoE, ERNIE 4.5 MoE, MiniMax-M2, DeepSeek-V2/V3, GLM-4.5, dots.llm1, gpt-oss).
        `context` is the served context per sequence (0: the model's whole), which picks LongRoPE's factors
        (`_inv_freq`)."""
        arch = (d.get("architectures") or [""])[0]  # (a multimodal folder's text model: `source._as_multimodal`)
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        mla = bool(d.get("kv_lora_rank"))
        if mla:  # MLA: queries and keys are nope + rope wide; RoPE turns the rope part only
            head_dim = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
        layers = d["num_hidden_layers"]
        gemma = arch.startswith("Gemma3")
        gemmas = arch.startswith("Gemma")  # 1, 2 and 3: `1 + w` norms, scaled embeddings
        sandwich = gemma or arch.startswith("Gemma2")  # 2 and 3: sandwich norms, a query scale, sliding layers
        window = d.get("sliding_window") or 0
        if window and arch in _SLIDING_PERIODS:  # sliding and full layers in a pattern
            types = d.get("layer_types") or _pattern(d.get("sliding_window_pattern") or _SLIDING_PERIODS[arch], layers)
        elif d.get("use_sliding_window") or (arch in ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM",
                                                      "Starcoder2ForCausalLM") and window):
            types = d.get("layer_types") or ["sliding_attention"] * layers
        elif arch == "Dots1ForCausalLM" and window:  # sliding from `max_window_layers` on (none in the release)
            types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", layers)
                                             else "full_attention" for i in range(layers)]
        else:
            types = ["full_attention"] * layers
        sliding = tuple(t == "sliding_attention" for t in types)
        if not any(sliding):
            window = 0
        full, local = _rope_params(d, arch)
        partial = (full.get("partial_rotary_factor") or d.get("partial_rotary_factor")
                   or (d["rotary_dim"] / head_dim if d.get("rotary_dim") else 1.0))  # (MiniMax-M2's `rotary_dim`)
        rotary = d["qk_rope_head_dim"] if mla else int(head_dim * partial)
        rope_global, rope_local = (_inv_freq(p, rotary, d, context) for p in (full, local))
        act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        gpt_oss = arch == "GptOssForCausalLM"
        if gpt_oss:
            act = "clamped_swiglu"
        act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}.get(act, act)
        if arch == "GemmaForCausalLM" and act == "gelu":  # Gemma's older configs: transformers reads the tanh form
            act = "gelu_tanh"
        if act not in ("silu", "gelu", "gelu_tanh", "relu2", "clamped_swiglu"):
            raise NotImplementedError(f"activation {act!r} is not supported")
        qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        # q/k norms over all heads' values together
        whole_qk = arch in ("Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM", "MiniMaxM2ForCausalLM")
        if d.get("clip_qkv") is not None:
            raise NotImplementedError(f"{arch} with clip_qkv is not supported yet")
        glm = arch in ("Glm4ForCausalLM", "Glm4MoeForCausalLM")
        cohere = arch in ("CohereForCausalLM", "Cohere2ForCausalLM")
        starcoder, phi = arch == "Starcoder2ForCausalLM", arch == "PhiForCausalLM"
        if (cohere and d.get("use_qk_norm")) or (phi and d.get("qk_layernorm")):
            raise NotImplementedError(f"{arch} with q/k LayerNorms is not supported yet")
        # `use_bias`: StarCoder2's (default on) and ERNIE 4.5's (default off) biases on every projection
        ernie = arch in ("Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM")
        use_bias = bool(d.get("use_bias", starcoder)) and (starcoder or ernie)
        if arch == "Ernie4_5_MoeForCausalLM" and use_bias:
            raise NotImplementedError(f"{arch} with use_bias is not supported yet (its LM head is biased too)")
        bias = (bool(d.get("qkv_bias", True)) if qwen2 else phi or use_bias or bool(d.get("attention_bias", False)))
        # the output projection's: Seed-OSS says apart; HF's `attention_bias` covers it but for Qwen2's and GLM's
        o_bias = d["attention_out_bias"] if "attention_out_bias" in d else bias and not (qwen2 or glm)
        hybrid = arch in ("Cohere2ForCausalLM", "Exaone4ForCausalLM") and any(sliding)  # full layers: no RoPE
        return ModelConfig(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads if mla else d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position=d.get("max_position_embeddings", 2048),
            rms_eps=d.get("rms_norm_eps") or d.get("layer_norm_eps") or d.get("norm_epsilon") or 1e-6,
            layer_norm=cohere or starcoder or phi,
            norm_bias=starcoder or phi,
            mlp_gated=not (starcoder or phi or act == "relu2"),
            mlp_bias=phi or use_bias or bool(d.get("mlp_bias")),
            lm_head_bias=phi,
            tie_embeddings=d.get("tie_word_embeddings", gemmas or cohere or starcoder or arch == "SmolLM3ForCausalLM"),
            attention_bias=bias,
            o_bias=bool(o_bias),
            attn_sinks=gpt_oss,
            qk_norm=(arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Exaone4ForCausalLM", "Dots1ForCausalLM")
                     or gemma or whole_qk
                     or bool(d.get("use_qk_norm"))),
            qk_norm_whole=whole_qk,
            norm_offset=1.0 if gemmas else 0.0,
            sandwich_norms=sandwich,
            embed_scale=float(np.float32(d["hidden_size"] ** 0.5)) if gemmas else d.get("embedding_multiplier") or 1.0,
            residual_scale=d.get("residual_multiplier") or 1.0,
            logits_scaling=d.get("logits_scaling") or 1 / (d.get("logit_scale") or 1.0),
            activation=act,
            swiglu_alpha=d.get("swiglu_alpha", 1.702),
            swiglu_limit=d.get("swiglu_limit", 7.0),
            query_scale=(d["query_pre_attn_scalar"] ** -0.5 if sandwich else _mla_scale(full, head_dim) if mla
                         else d.get("attention_multiplier") or 0.0),
            # transformers' Gemma 3 stores but never applies attn_logit_softcapping (its checkpoints set it null).
            attn_softcap=0.0 if gemma else (d.get("attn_logit_softcapping") or 0.0),
            final_softcap=d.get("final_logit_softcapping") or 0.0,
            sliding_window=window,
            layer_sliding=sliding,
            rope_global=rope_global,
            rope_local=rope_local,
            # the rotary dims in interleaved pairs: GLM-4's; MLA's by the config (V2 rotates them as complex numbers)
            rope_interleave=(bool(d.get("rope_interleave", True)) or arch == "DeepseekV2ForCausalLM") if mla
            else arch == "Glm4ForCausalLM" or ernie or cohere,
            # SmolLM3's every fourth layer turns nothing, nor do Cohere 2's and EXAONE 4's full-attention layers
            layer_rope=(_no_rope(d, layers) if arch == "SmolLM3ForCausalLM" else sliding if hybrid else ()),
            dtype=dtype,
            rope_scale=_attention_factor(full, d),
            rope_local_scale=_attention_factor(local, d),
            **_moe(d, arch, layers),
            **(dict(kv_lora_rank=d["kv_lora_rank"], q_lora_rank=d.get("q_lora_rank") or 0,
                    qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
                    v_head_dim=d["v_head_dim"]) if mla else {}),
        )


# Architectures whose sliding and full layers come in a pattern: the period (a full layer ends each), where the
# config names neither `layer_types` nor `sliding_window_pattern`.
_SLIDING_PERIODS = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6, "GptOssForCausalLM": 2, "Cohere2ForCausalLM": 4,
                    "Exaone4ForCausalLM": 4, "Olmo3ForCausalLM": 4}


def _pattern(pattern: int | str, layers: int) -> list[str]:
    """Layer types from a pattern: a period whose last layer is full (`sliding_window_pattern` 4: three sliding, one
    full), or EXAONE's letters (`"LLLG"`: L sliding, G global), repeated."""
    if isinstance(pattern, str):
        return ["sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention" for i in range(layers)]
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def _no_rope(d: dict[str, Any], layers: int) -> tuple[bool, ...]:
    """SmolLM3's layers that turn positions: `no_rope_layers` (1: turns), else all but every
    `no_rope_layer_interval`-th (4), as transformers derives them (and llama.cpp, whose GGUFs record neither)."""
    flags = d.get("no_rope_layers") or [int((i + 1) % (d.get("no_rope_layer_interval") or 4) != 0)
                                        for i in range(layers)]
    return tuple(bool(f) for f in flags)


def _attention_factor(p: dict[str, Any], d: dict[str, Any]) -> float:
    """The factor RoPE's cos and sin are scaled by: YaRN's or LongRoPE's, else 1."""
    kind = p.get("rope_type", p.get("type"))
    return _yarn_attention_factor(p, d) if kind == "yarn" else _longrope_attention_factor(p, d) \
        if kind == "longrope" else 1.0


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times the original."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _mla_scale(p: dict[str, Any], head_dim: int) -> float:
    """MLA's softmax scale: `head_dim ** -0.5`, times YaRN's `mscale(factor, mscale_all_dim)` squared."""
    scale = head_dim**-0.5
    if p.get("rope_type", p.get("type", "default")) != "default" and p.get("mscale_all_dim"):
        scale *= _mscale(p["factor"], p["mscale_all_dim"]) ** 2
    return scale


def _yarn_attention_factor(p: dict[str, Any], d: dict[str, Any]) -> float:
    """YaRN's attention factor (cos and sin are scaled by it), as transformers derives it."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor = _yarn_factor(p, d)
    if p.get("mscale") and p.get("mscale_all_dim"):
        return float(_mscale(factor, p["mscale"]) / _mscale(factor, p["mscale_all_dim"]))
    return _mscale(factor)


def _original_context(p: dict[str, Any], d: dict[str, Any]) -> int:
    """The context a scaled RoPE was pretrained at (Phi-3's configs keep it beside the RoPE parameters)."""
    return p.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") or \
        d["max_position_embeddings"]


def _longrope_attention_factor(p: dict[str, Any], d: dict[str, Any]) -> float:
    """LongRoPE's attention factor (cos and sin are scaled by it, whichever factors turn), as transformers derives
    it from the context's growth."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    original = _original_context(p, d)
    factor = p.get("factor") or d["max_position_embeddings"] / original
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def _yarn_factor(p: dict[str, Any], d: dict[str, Any]) -> float:
    """YaRN's context factor (from the max positions when the config leaves it out)."""
    return p.get("factor") or d["max_position_embeddings"] / _original_context(p, d)


def _moe(d: dict[str, Any], arch: str, layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields: Mixtral's `num_local_experts` (every layer routed, top-k renormalized), or
    Qwen-MoE's `num_experts` with `decoder_sparse_step`, `mlp_only_layers`, `norm_topk_prob` and Qwen2-MoE's
    shared expert, or DeepSeek's and GLM-4.5's `n_routed_experts` after `first_k_dense_replace` dense layers, with
    shared experts and their routing (below)."""
    experts = (d.get("num_local_experts") or d.get("num_experts") or d.get("n_routed_experts")
               or d.get("moe_num_experts") or 0)
    if not experts:
        return {}
    if arch == "Ernie4_5_MoeForCausalLM":  # MoE layers every `moe_layer_interval` from its start to its end index
        end = d.get("moe_layer_end_index", -1)
        d = {**d, "first_k_dense_replace": d.get("moe_layer_start_index", 1),
             "decoder_sparse_step": d.get("moe_layer_interval") or 1,
             "num_experts_per_tok": d.get("moe_k") or d.get("num_experts_per_tok"),
             "mlp_only_layers": range((layers - 1 if end == -1 else end) + 1, layers)}
    mixtral = arch in ("MixtralForCausalLM", "GptOssForCausalLM", "GraniteMoeForCausalLM",
                       "GraniteMoeSharedForCausalLM", "MiniMaxM2ForCausalLM")  # every layer routed, renormalized
    step, dense = d.get("decoder_sparse_step") or 1, set(d.get("mlp_only_layers") or ())
    first = d.get("first_k_dense_replace") or 0
    inter = d.get("moe_intermediate_size") or d["intermediate_size"]
    out = dict(num_experts=experts, experts_per_token=d["num_experts_per_tok"], moe_intermediate_size=inter,
               norm_topk_prob=mixtral or bool(d.get("norm_topk_prob", False)),
               shared_expert_size=d.get("shared_expert_intermediate_size") or 0,
               shared_expert_gate=bool(d.get("shared_expert_intermediate_size")),
               moe_layers=tuple(i >= first and i not in dense and (mixtral or (i + 1) % step == 0)
                                for i in range(layers)))
    if arch == "MiniMaxM2ForCausalLM":  # sigmoid scores with a selection bias, no groups
        out.update(scoring="sigmoid", selection_bias=True)
    if arch == "GraniteMoeSharedForCausalLM":  # an ungated shared expert
        out.update(shared_expert_size=d.get("shared_intermediate_size") or 0, shared_expert_gate=False)
    if arch == "GptOssForCausalLM":  # top-k of the logits, softmaxed: Mixtral's weights; biases everywhere
        out.update(router_bias=True, expert_bias=True)
    deepseek_v3 = arch in ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Dots1ForCausalLM")  # (V3's routing)
    if arch.startswith("Deepseek") or deepseek_v3:  # scaled weights, ungated shared experts
        out.update(routed_scale=float(d.get("routed_scaling_factor") or 1.0), shared_expert_gate=False,
                   shared_expert_size=inter * (d.get("n_shared_experts") or 0))
    if deepseek_v3:  # sigmoid scores with a selection bias, groups
        # ranked by their top-2 sum
        out.update(scoring="sigmoid", selection_bias=True, expert_groups=d.get("n_group") or 1,
                   top_groups=d.get("topk_group") or 1)
    if arch == "Ernie4_5_MoeForCausalLM":  # softmax scores with a selection bias, renormalized; ungated shared experts
        out.update(selection_bias=True, norm_topk_prob=True, shared_expert_gate=False,
                   shared_expert_size=inter * (d.get("moe_num_shared_experts") or 0)
                   or d.get("shared_expert_intermediate_size") or 0)  # (a GGUF's: their width together)
    if arch == "DeepseekV2ForCausalLM":  # softmax scores, greedy or by groups ranked by their best, not renormalized
        grouped = d.get("topk_method") == "group_limited_greedy"
        out.update(norm_topk_prob=False, group_score="max", expert_groups=(d.get("n_group") or 1) if grouped else 1,
                   top_groups=(d.get("topk_group") or 1) if grouped else 1)
    return out


def _rope_params(d: dict[str, Any], arch: str) -> tuple[dict, dict]:
    """(full-attention, sliding) RoPE parameter dicts from either config format, or per layer type (Gemma 3's,
    OLMo 3's: an older config's `rope_scaling` scales the full layers only; Gemma 3's sliding layers turn by
    `rope_local_base_freq`, OLMo 3's by `rope_theta`)."""
    params = d.get("rope_parameters")
    gemma = arch == "Gemma3ForCausalLM"
    if gemma or arch == "Olmo3ForCausalLM" or "full_attention" in (params or {}):
        params = dict(params or {})
        full = dict(params.get("full_attention") or {"rope_type": "default"})
        local = dict(params.get("sliding_attention") or {"rope_type": "default"})
        if d.get("rope_scaling"):
            full.update(d["rope_scaling"])
        full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0 if gemma else d.get("rope_theta")))
        return full, local
    if params is None:
        params = dict(d.get("rope_scaling") or {"rope_type": "default"})
        params.setdefault("rope_theta", d.get("rope_theta", 10_000.0))
    elif d.get("rope_scaling"):  # beside rope_parameters (an --hf-overrides of a newer config): it wins, as there
        scaling = d["rope_scaling"]
        kind = scaling.get("rope_type", scaling.get("type", params.get("rope_type")))
        params = {**params, **scaling, "rope_type": kind}
    params = dict(params)
    params.setdefault("rope_theta", d.get("rope_theta", 10_000.0))
    return params, params


def _inv_freq(p: dict[str, Any], head_dim: int, d: dict[str, Any], context: int = 0) -> tuple[float, ...]:
    """Inverse frequencies (float32, as transformers computes them) for one RoPE parameter dict (default, linear,
    llama3, yarn and longrope types, and a GGUF's own frequency factors).

    LongRoPE (Phi-3.5, Phi-4-mini) divides each frequency by a factor from one of two lists: transformers takes the
    long list while a sequence is longer than the pretrained context and the short one otherwise, recomputing every
    position when a sequence crosses it, which a KV cache cannot do. The list is picked once here, as llama.cpp
    picks it by its context: the short one when `context` (`--max-model-len`) is given and fits the pretrained
    one, else the long one: for the default (0, the model's whole context, even where the KV pool then holds less)
    and for any caller that names no context."""
    kind = p.get("rope_type", p.get("type", "default"))
    base = float(p["rope_theta"])
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(base) ** exps)).astype(np.float32)
    if kind == "default":
        pass
    elif kind == "linear":
        inv = (inv / np.float32(p["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p.get("original_max_position_embeddings", d.get("max_position_embeddings"))
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv = _yarn_inv_freq(p, head_dim, d, base)
    elif kind == "longrope":
        fits = 0 < context <= _original_context(p, d)
        factors = np.asarray(p["short_factor" if fits else "long_factor"], np.float32)
        inv = (np.float32(1.0) / (factors * np.float32(base) ** exps)).astype(np.float32)
    elif kind == "freq_factors":  # llama.cpp's per-pair divisors (a GGUF's `rope_freqs` tensor: Llama 3's scaling)
        inv = (np.float32(1.0) / (np.asarray(p["factors"], np.float32) * np.float32(base) ** exps)).astype(np.float32)
    else:
        raise NotImplementedError(f"RoPE type {kind!r} is not supported yet")
    return tuple(float(x) for x in inv)


def _yarn_inv_freq(p: dict[str, Any], dim: int, d: dict[str, Any], base: float) -> np.ndarray:
    """YaRN: interpolated frequencies below the correction range, extrapolated above, a linear ramp between
    (transformers' `_compute_yarn_parameters`)."""
    factor = _yarn_factor(p, d)
    old = p.get("original_max_position_embeddings") or d["max_position_embeddings"]
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction(rotations: float) -> float:
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction(fast), correction(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))
    extra = (1 - ramp).astype(np.float32)
    return ((1.0 / (np.float32(factor) * pos)) * (1 - extra) + (1.0 / pos) * extra).astype(np.float32)
