"""The images a model that reads them (LLaVA, Gemma 3) is given. Each image's features, from the vision tower and
projector (`models.vision`), sit in rows of one table on the devices: the "soft" collection beside the parameters,
which the embedding lookup reads for token ids past the vocabulary (`layers.causal_lm`). A prompt holds an image as
`tokens_per_image` copies of the image token (as transformers' processor writes it); `place` rewrites the k-th
image's copies to the ids `vocab + row` of its rows, so every prefill path (flat, rows, chunks) and the prefix cache
work on token ids as before. The prefix cache keys a picture's positions by its digest instead (`Request.cache_ids`:
ids name rows, which other pictures take later), so text before a picture is shared with every request, and a
picture's pages are found again whatever rows it sits in.

An image keeps its rows, found again by its digest, while a live request uses them, and is replaced, least recently
used first, after. Features are computed on the server's parse threads (`encode`), off the event loop and the engine's
thread; `place`, when the request is made, only writes them in."""

from __future__ import annotations

import collections
import hashlib
import itertools
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from engine import sleep as sleeping
from engine.grammar_sandbox import Busy
from engine.params import InvalidRequest
from models import Model, vision


def digest(pixels: np.ndarray) -> str:
    """The key an image's rows are kept under: sha256 of its preprocessed pixels."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:32]


class ImageRows:
    """The table of image features a model reads, its rows held per image (see the module doc)."""

    def __init__(self, model: Model, capacity: int):
        self.model, self.cfg, self.capacity = model, model.vision, capacity
        self.size = self.cfg.tokens_per_image
        self.held: collections.OrderedDict[str, int] = collections.OrderedDict()  # digest -> slot, oldest use first
        self.users: dict[int, weakref.WeakValueDictionary] = {}  # slot -> the requests reading it, by id
        self.lock = threading.Lock()  # the server's threads place images; the engine's thread installs LoRA slots
        self.encoded, self._encodes = 0, itertools.count(1)  # images run through the vision tower (the metrics')
        dtype = jax.tree.leaves(model.vision_params)[0].dtype
        rows = jnp.zeros((capacity * self.size, model.cfg.hidden_size), dtype)
        model.params = {**model.params, "soft": {"rows": jax.device_put(rows, NamedSharding(model.mesh, P()))}}
        cfg = self.cfg
        self._encode = jax.jit(lambda params, pixels: vision.image_features(params, pixels, cfg)[0])
        self._write = jax.jit(lambda rows, feats, at: jax.lax.dynamic_update_slice(rows, feats.astype(rows.dtype),
                                                                                   (at, 0)))

    def warm(self) -> None:
        """Compile the vision tower and the row write (a blank picture into slot 0, which no image holds yet)."""
        with self.lock:
            if not self.held:
                feats = self._encode(self.model.vision_params, np.zeros((1, 3, self.cfg.crop_size,
                                                                        self.cfg.crop_size), np.float32))
                rows = self._write(self.model.params["soft"]["rows"], feats, np.int32(0))
                self.model.params = {**self.model.params, "soft": {"rows": jax.block_until_ready(rows)}}

    def encode(self, pixels: np.ndarray) -> tuple[str, np.ndarray, jax.Array | None]:
        """`(digest, pixels, features)` of one preprocessed image `[3, S, S]`, as `place` takes it: features None
        where its rows are held already (`place` encodes it again if they are gone by then)."""
        key = digest(pixels)
        return key, pixels, None if key in self.held else self._features(pixels)

    def _features(self, pixels: np.ndarray) -> jax.Array:
        if jax.tree.leaves(self.model.vision_params)[0].is_deleted():  # (`Engine.sleep`)
            raise sleeping.Asleep("the model is asleep: its vision tower's weights are given back")
        self.encoded = next(self._encodes)  # parse threads encode at once: one count each
        return self._encode(self.model.vision_params, np.asarray(pixels, np.float32)[None])

    def place(self, req, images: list[tuple[str, np.ndarray, jax.Array | None]]) -> None:
        """Hold rows for each of `images` (`(digest, pixels, features or None)`, in prompt order) for `req`,
        writing in those not held, and rewrite the image tokens of `req.prompt_ids` to the ids of those rows.
        `Busy` where every row is held by running requests."""
        if len(images) > self.capacity:
            raise InvalidRequest(f"{len(images)} images; this server holds at most {self.capacity} at once "
                                 "(--max-images)", "prompt")
        with self.lock:
            slots = []
            for key, pixels, feats in images:
                slot = self.held.get(key)
                if slot is None:
                    slot = self._free(slots)
                    feats = feats if feats is not None else self._features(pixels)
                    rows = self._write(self.model.params["soft"]["rows"], feats, np.int32(slot * self.size))
                    self.model.params = {**self.model.params, "soft": {"rows": rows}}
                    self.held[key] = slot
                self.held.move_to_end(key)
                self.users.setdefault(slot, weakref.WeakValueDictionary())[id(req)] = req
                slots.append(slot)
        req.pictured_ids, req.cache_ids = list(req.prompt_ids), list(req.prompt_ids)
        at = [i for i, t in enumerate(req.prompt_ids) if t == self.cfg.image_token_id]
        vocab = self.model.cfg.vocab_size
        for k, (slot, (key, _, _)) in enumerate(zip(slots, images)):
            named = _named(key, self.size)
            for j, i in enumerate(at[k * self.size:(k + 1) * self.size]):
                req.prompt_ids[i], req.cache_ids[i] = vocab + slot * self.size + j, named[j]

    def forget(self) -> None:
        """Forget every held picture (new weights: their features are stale), so none is found again by its digest;
        the rows a live request still reads (one queued by a paused engine) are kept until it ends."""
        with self.lock:
            live = {slot: readers for slot, readers in self.users.items()
                    if any(not r.finished for r in list(readers.values()))}
            self.held = collections.OrderedDict((f"stale {slot}", slot) for slot in live)  # no digest matches
            self.users = live

    def _free(self, taken: list[int]) -> int:
        """A slot for one more image: one never used, else the least recently used that no live request reads."""
        used = set(self.held.values())
        for slot in range(self.capacity):
            if slot not in used:
                return slot
        for key, slot in self.held.items():
            readers = self.users.get(slot, {})
            if slot not in taken and all(r.finished for r in list(readers.values())):
                del self.held[key]
                self.users.pop(slot, None)
                return slot
        raise Busy(f"all {self.capacity} image slots are read by running requests (--max-images)")


def _named(key: str, size: int) -> list[int]:
    """A picture's positions as the prefix cache keys them (`Request.cache_ids`): 62-bit numbers drawn from its
    digest, past every token and row id, so two pictures' pages coincide only if all their positions do."""
    return np.random.default_rng(int(key, 16)).integers(1 << 62, (1 << 63) - 1, size, dtype=np.int64).tolist()
