"""SmolLM3: the Llama layer, with every fourth layer attending without rotary positions (`no_rope_layers`, read as
`ModelConfig.layer_rope`)."""

from __future__ import annotations

from models.families.llama import LAYER_GGUF, DecoderLayer, gguf_fix  # noqa: F401  (the Llama layer and GGUF)

ARCHITECTURES = ("SmolLM3ForCausalLM",)
GGUF_ARCHS = ("smollm3",)
