"""Embeddings: a sequence's final hidden states (after the model's last norm) pooled into one vector, as
sentence-transformers, vLLM's pooling runner and llama.cpp's `--pooling` do for decoder models.

- `last`: the last token's state (Qwen3-Embedding, gte-Qwen2, e5-mistral: a causal model's only state that saw
  every token); `mean`: the average over the tokens; `cls`: the first token's.
- `default(source)` reads how a model folder asks to be pooled: sentence-transformers' `modules.json` and its
  pooling module's `config.json` (`pooling_mode_lasttoken` / `_mean_tokens` / `_cls_token`, normalized where a
  `Normalize` module follows), or a GGUF's `<arch>.pooling_type` (llama.cpp's 1 mean, 2 cls, 3 last); else `last`,
  normalized (vLLM's default for a causal LM served as an embedding model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax.numpy as jnp
import numpy as np

log = logging.getLogger("sparkler.pooling")
POOLINGS = ("last", "mean", "cls")
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_GGUF_MODES = {1: "mean", 2: "cls", 3: "last"}  # llama.cpp's `llama_pooling_type` (0 none, 4 rank: not vectors)


def pool(x: jnp.ndarray, lengths: jnp.ndarray, mode: str) -> jnp.ndarray:
    """Hidden states `x [B, S, H]` of right-padded rows of `lengths [B]` tokens pooled to `[B, H]` float32."""
    x = x.astype(jnp.float32)
    if mode == "last":
        return x[jnp.arange(x.shape[0]), lengths - 1]
    if mode == "cls":
        return x[:, 0]
    if mode == "mean":
        mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
        return jnp.sum(jnp.where(mask[..., None], x, 0.0), axis=1) / lengths[:, None].astype(jnp.float32)
    raise ValueError(f"pooling: one of {POOLINGS}, not {mode!r}")


def finish(vectors: np.ndarray, normalize: bool, dimensions: int | None = None) -> np.ndarray:
    """Pooled `vectors [N, H]` cut to their first `dimensions` (Matryoshka embeddings, OpenAI's `dimensions`), then
    scaled to unit length if `normalize` (as sentence-transformers' `truncate_dim` does, in that order)."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors.astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of `a [N, H]` and `b [N, H]` (0 where a vector is zero): the score of a pair of
    texts by an embedding model (vLLM's score API for a model that is not a cross-encoder)."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.einsum("nh,nh->n", a, b) / np.where(norms > 0, norms, 1)


@dataclasses.dataclass(frozen=True)
class Head:
    """A cross-encoder's classification head: `weight [labels, hidden]` and `bias [labels]`, float32."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        """The head's logits `[N, labels]` of last-token states `vectors [N, hidden]`."""
        return vectors @ self.weight.T + self.bias


def classifier(source: str) -> Head | None:
    """A cross-encoder's classification head (an HF folder of `...ForSequenceClassification`, as decoder rerankers
    are saved: the head reads the last token's final hidden state), or None for any other model."""
    if not os.path.isdir(source) or not _classifies(_json(os.path.join(source, "config.json")) or {}):
        return None
    from models.loading.source import open_source

    read = open_source(source).read
    weight = np.asarray(read("score.weight"), np.float32)
    try:
        bias = np.asarray(read("score.bias"), np.float32)
    except KeyError:  # Llama's, Qwen's and Mistral's heads have none
        bias = np.zeros(len(weight), np.float32)
    return Head(weight, bias)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """A classifier's logits `[N, labels]` as probabilities: a sigmoid for one label, else a softmax (vLLM's)."""
    if logits.shape[-1] == 1:
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def relevance(vectors: np.ndarray, head: Head) -> np.ndarray:
    """A one-label cross-encoder's scores in [0, 1] of its inputs' last-token states `vectors [N, hidden]`."""
    return probabilities(head.logits(vectors))[:, 0]


def labels(source: str, n: int) -> list[str]:
    """The names of a classifier's `n` labels (its config's `id2label`; `LABEL_i` where it has none)."""
    names = (_json(os.path.join(source, "config.json")) or {}).get("id2label") or {}
    return [str(names.get(str(i), f"LABEL_{i}")) for i in range(n)]


def default(source: str) -> tuple[str, bool]:
    """`(pooling, normalize)` as the model at `source` (an HF folder or a GGUF file) asks for them; `("last", True)`
    where it says nothing. What it asks and this module cannot do (a Dense layer after the pooling, weighted-mean or
    max pooling, bidirectional attention) is logged as a warning: its vectors will not be the model's own."""
    if source.endswith(".gguf") and os.path.isfile(source):
        from models.loading.source import open_source

        return from_gguf(open_source(source).config.get("pooling_type", 0)), True  # remembered: no parse
    config = _json(os.path.join(source, "config.json")) or {}
    if _classifies(config):
        return "last", False  # a cross-encoder's head reads the last token's state, as it is
    if config.get("is_causal") is False or config.get("use_bidirectional_attention"):
        log.warning("sparkler: %s asks for bidirectional attention; its layers run causal here, so its embeddings "
                    "will differ from the model's own", source)
    modules = _json(os.path.join(source, "modules.json"))
    if not isinstance(modules, list):
        return "last", True
    mode, normalize = "last", False
    for m in modules:
        kind, path = str(m.get("type", "")), str(m.get("path", ""))
        if kind.endswith("models.Pooling"):
            cfg = _json(os.path.join(source, path, "config.json")) or {}
            mode = next((name for key, name in _ST_MODES.items() if cfg.get(key)), mode)
            unserved = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_MODES]
            if unserved or cfg.get("include_prompt") is False:
                log.warning("sparkler: %s asks for %s; pooled by %s here", source,
                            ", ".join(unserved) or "pooling without its prompt", mode)
        elif kind.endswith("models.Normalize"):
            normalize = True
        elif not kind.endswith("models.Transformer"):
            log.warning("sparkler: %s has a %s module after the model, which is not applied here", source, kind)
    return mode, normalize


def from_gguf(pooling_type: int) -> str:
    """The pooling a GGUF's `<arch>.pooling_type` asks for (llama.cpp's; none or rank: `last`)."""
    return _GGUF_MODES.get(int(pooling_type), "last")


def _classifies(config: dict) -> bool:
    """Whether an HF config is a classifier's (`...ForSequenceClassification`: a cross-encoder)."""
    return str((config.get("architectures") or [""])[0]).endswith("ForSequenceClassification")


def _json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
