"""Tokenizers and chat templates from an HF folder or from GGUF metadata, without importing torch."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any


@contextlib.contextmanager
def torch_hidden():
    """Make `torch` unfindable while transformers decides what is available (it imports torch if it can)."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # find_spec("torch") now answers None
    try:
        yield
    finally:
        if hidden and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


_importing = threading.Lock()


def transformers_module():
    """Import transformers for its tokenizer and chat-template code only (AutoTokenizer, which imports every
    family's tokenizer module, ~1.5 s here, is resolved only for HF folders). Thread-safe: the server imports it on a
    thread beside the parameters' restore, and a second caller waits for the first."""
    with _importing, torch_hidden():
        import transformers
        from transformers import PreTrainedTokenizerFast  # noqa: F401  (resolve a lazily-imported name)

        return transformers


def load_hf_tokenizer(folder: str):
    """The tokenizer (with its chat template) saved in an HF folder."""
    tf = transformers_module()
    with torch_hidden():
        return tf.AutoTokenizer.from_pretrained(folder)


def load_built_tokenizer(folder: str):
    """A tokenizer `build_gguf_tokenizer` saved (a fast tokenizer, so without AutoTokenizer's lookup)."""
    tf = transformers_module()
    with torch_hidden():
        return tf.PreTrainedTokenizerFast.from_pretrained(folder)


def build_gguf_tokenizer(meta: dict[str, Any], save_to: str):
    """Rebuild the tokenizer described by GGUF metadata, save it as an HF folder, and return it."""
    tf = transformers_module()
    with torch_hidden():
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

        tok_dict = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                    if f"tokenizer.{key}" in meta}
        backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
        tokens = tok_dict["tokens"]

        def special(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = tok_dict.get("tokenizer_type") == "llama"
        tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
            unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=bool(add_bos), add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )
        os.makedirs(save_to, exist_ok=True)
        tok.save_pretrained(save_to)
        return tok
