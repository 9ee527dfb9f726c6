"""Ahead-of-time compilation: jitted step functions whose executables are compiled up front, several at once on a
thread pool (XLA compiles outside the GIL), and counters of JAX's persistent compilation cache."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable

import jax

PERSISTENT = {"hits": 0, "misses": 0}  # persistent-cache lookups since start (counted from JAX's own events)
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_lock = threading.Lock()


def _on_event(event: str, **_) -> None:
    if event in _EVENTS:
        with _lock:
            PERSISTENT[_EVENTS[event]] += 1


jax.monitoring.register_event_listener(_on_event)


def use_persistent_cache(path: str) -> None:
    """Keep every compiled program in `path` (JAX's persistent compilation cache), however quickly it compiled."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _key(args: tuple, statics: dict) -> tuple:
    """The shapes of a call's array arguments (pytrees such as parameters and caches are fixed per runner)."""
    return tuple((a.shape, str(a.dtype), bool(getattr(a, "weak_type", False))) if hasattr(a, "shape") else None
                 for a in args), tuple(sorted(statics.items()))


def _abstract(x):
    if hasattr(x, "shape"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None),
                                    weak_type=bool(getattr(x, "weak_type", False)))
    return x


class AOT:
    """A jitted function plus executables compiled ahead of time for given argument shapes: a call runs the
    executable compiled for its shapes, else the jitted function (which compiles on first use)."""

    def __init__(self, fn: Callable):
        self.fn, self.exes = fn, {}

    def __call__(self, *args, **statics):
        """Run the executable for these shapes (or the jitted function)."""
        exe = self.exes.get(_key(args, statics))
        return exe(*args) if exe is not None else self.fn(*args, **statics)

    def compile(self, *args, **statics) -> None:
        """Compile for the shapes of `args` (arrays, or anything with `shape`/`dtype`) without running."""
        key = _key(args, statics)
        if key not in self.exes:
            self.exes[key] = self.fn.lower(*jax.tree.map(_abstract, args), **statics).compile()


def compile_all(jobs: list[tuple[AOT, tuple, dict]], workers: int | None = None, desc: str = "compiling") -> None:
    """Compile `(function, args, statics)` jobs on a thread pool, with a progress bar."""
    from tqdm import tqdm

    workers = workers or max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, tqdm(total=len(jobs), desc=desc, unit="shape") as bar:
        futures = [pool.submit(fn.compile, *args, **statics) for fn, args, statics in jobs]
        for f in concurrent.futures.as_completed(futures):
            f.result()
            bar.update()


Job = tuple[AOT, tuple, dict[str, Any]]
