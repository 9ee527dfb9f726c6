"""Model families, one module each: its decoder layer built from `models.layers` (a `layers.causal_lm.Block`), its
GGUF tensor names, and the fix-ups its GGUF tensors need (`gguf_fix`; a family without one reads them as they are:
llama.cpp writes them as the checkpoints hold them, and its RoPE for them turns the pairs the checkpoints do).
`models.FAMILIES` maps each HF `architectures` name to its module."""
