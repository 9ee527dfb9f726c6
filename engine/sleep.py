"""Sleep mode (vLLM's `/sleep` and `/wake_up`, SGLang's `/release_memory_occupation` and `/resume_memory_occupation`):
an idle engine gives its devices' memory back, the weights' and the KV pool's, so another program (an RL trainer
between rollouts, another model) can use it, and takes it again when woken.

`offload` copies a tree's arrays to the host (or discards them) and deletes them on the devices, keeping each
array's sharding; `restore` puts them back where they were. What a tag releases: "weights" (the model's parameters,
its vision tower's, a draft model's) and "kv_cache" (the KV pools; their contents, and so the prefix cache, are
forgotten and the pools come back zeroed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

TAGS = ("weights", "kv_cache")  # what can sleep, in vLLM's and SGLang's names


class Asleep(Exception):
    """A request made of an engine whose weights or KV pool sleep (the server answers 503)."""


@dataclasses.dataclass
class Offloaded:
    """A tree's arrays given back by `offload`: its leaves' host copies (None where discarded), their shardings
    (None: a leaf that was not a device array, kept as it was), the tree's structure and the arrays' bytes."""

    host: list | None
    shardings: list
    treedef: Any
    nbytes: int  # each array once, however many devices held a copy


def _host(x: jax.Array) -> np.ndarray:
    """`x` on the host, in memory of its own (on a CPU, `np.asarray` may be a view of the device buffer)."""
    out = np.asarray(x)
    return out.copy() if next(iter(x.devices())).platform == "cpu" else out


def offload(tree, keep: bool = True) -> Offloaded:
    """`tree`'s arrays copied to the host (`keep`; else discarded) and deleted on their devices, whatever else
    still refers to them; leaves that are not device arrays are kept as they are."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [x for x in leaves if isinstance(x, jax.Array)]
    shardings = [x.sharding if isinstance(x, jax.Array) else None for x in leaves]
    host = [_host(x) if isinstance(x, jax.Array) else x for x in leaves] if keep else None
    for x in arrays:
        x.delete()
    return Offloaded(host, shardings, treedef, sum(x.nbytes for x in arrays))


def restore(off: Offloaded):
    """The tree `offload` gave back, on its devices again with its shardings (it must have been kept)."""
    if off.host is None:
        raise ValueError("these arrays were discarded, not kept")
    return jax.tree.unflatten(off.treedef, [x if s is None else jax.device_put(x, s)
                                            for x, s in zip(off.host, off.shardings)])
