"""gpt-oss: the Llama layer with biases on every attention projection, a learned sink logit per head in each
softmax, sliding-window and full layers alternating, and on every layer a mixture of experts whose router and
projections have biases and whose gated unit is a clamped SwiGLU (`layers.mlp.glu`). The checkpoints fuse the experts:
`gate_up_proj [E, hidden, 2 * inter]` (gate and up interleaved, inputs first) and `down_proj [E, inter, hidden]`,
which the weight table splits and transposes into our `[E, out, in]` stacks; MXFP4 experts are dequantized when the
folder is opened (`models.loading.source`). llama.cpp writes it as a `gpt-oss` GGUF with the experts split."""

from __future__ import annotations

import numpy as np

from models.families.llama import LAYER_GGUF as _LLAMA
from models.families.llama import DecoderLayer  # noqa: F401  (the same layer, config-driven)

ARCHITECTURES = ("GptOssForCausalLM",)
GGUF_ARCHS = ("gpt-oss",)

LAYER_GGUF = {
    **_LLAMA,
    "self_attn/sinks": "attn_sinks.weight",
    "post_attention_layernorm": "post_attention_norm",
    "mlp/experts/gate_proj_bias": "ffn_gate_exps.bias",
    "mlp/experts/up_proj_bias": "ffn_up_exps.bias",
    "mlp/experts/down_proj_bias": "ffn_down_exps.bias",
}


def hf_name(name: str) -> str:
    """Our mechanical HF name -> gpt-oss's (the router is `mlp.router`, not `mlp.gate`)."""
    return name.replace(".mlp.gate.", ".mlp.router.")


def _transposed(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.swapaxes(-1, -2))


# Our `module/leaf` -> (the checkpoint's fused tensor under `model.layers.{i}.`, what of it is ours).
HF_FUSED = {
    "mlp/experts/gate_proj/weight": ("mlp.experts.gate_up_proj", lambda cfg, w: _transposed(w[..., ::2])),
    "mlp/experts/up_proj/weight": ("mlp.experts.gate_up_proj", lambda cfg, w: _transposed(w[..., 1::2])),
    "mlp/experts/down_proj/weight": ("mlp.experts.down_proj", lambda cfg, w: _transposed(w)),
    "mlp/experts/gate_proj_bias": ("mlp.experts.gate_up_proj_bias", lambda cfg, b: np.ascontiguousarray(b[:, ::2])),
    "mlp/experts/up_proj_bias": ("mlp.experts.gate_up_proj_bias", lambda cfg, b: np.ascontiguousarray(b[:, 1::2])),
    "mlp/experts/down_proj_bias": ("mlp.experts.down_proj_bias", lambda cfg, b: b),
}
