"""Weights and loading: checkpoint sources (HF folders, GGUF files) and the name table that converts them
(`source`), the packaged models and their catalog (`packaged`, `fetch`), and the tokenizer (`tokenizer`)."""
