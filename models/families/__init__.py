"""Model families, one module each: its decoder layer built from `models.layers`, its GGUF tensor names, and the
fix-ups its GGUF tensors need. `models.FAMILIES` maps each HF `architectures` name to its module."""
