"""IBM Granite 3.x mixtures of experts (`GraniteMoeForCausalLM`) and their shared-expert form (Granite 4.0's
`GraniteMoeSharedForCausalLM`): Granite's layer and multipliers (`families.granite`) with Mixtral's routing (the
top-k logits softmaxed) on every layer, and an ungated shared expert beside the routed ones where the config has a
`shared_intermediate_size`. The checkpoints fuse each layer's experts: `block_sparse_moe.input_linear [E, 2 * inter,
hidden]` (gate rows, then up rows) and `output_linear [E, hidden, inter]`, already our `[E, out, in]`; the shared
expert's `shared_mlp.input_linear` and `output_linear` likewise. llama.cpp writes both as a `granitemoe` GGUF (the
shared expert as `*_shexp`) with the experts split and q and k permuted as Llama's."""

from __future__ import annotations

import numpy as np

from models.families.llama import LAYER_GGUF, DecoderLayer, gguf_fix  # noqa: F401  (the Llama layer and GGUF)

ARCHITECTURES = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")
GGUF_ARCHS = ("granitemoe",)


def hf_name(name: str) -> str:
    """Our mechanical HF name -> Granite's (the router is `block_sparse_moe.router.layer`)."""
    return name.replace(".mlp.gate.", ".block_sparse_moe.router.layer.")


def _half(which: int):
    """The gate (0) or up (1) rows of a fused `[..., 2 * inter, hidden]` weight."""
    return lambda cfg, w: np.ascontiguousarray(np.split(w, 2, axis=-2)[which])


# Our `module/leaf` -> (the checkpoint's fused tensor under `model.layers.{i}.`, what of it is ours).
HF_FUSED = {
    "mlp/experts/gate_proj/weight": ("block_sparse_moe.input_linear.weight", _half(0)),
    "mlp/experts/up_proj/weight": ("block_sparse_moe.input_linear.weight", _half(1)),
    "mlp/experts/down_proj/weight": ("block_sparse_moe.output_linear.weight", lambda cfg, w: w),
    "mlp/shared_expert/gate_proj/weight": ("shared_mlp.input_linear.weight", _half(0)),
    "mlp/shared_expert/up_proj/weight": ("shared_mlp.input_linear.weight", _half(1)),
    "mlp/shared_expert/down_proj/weight": ("shared_mlp.output_linear.weight", lambda cfg, w: w),
}
