"""Ahead-of-time compilation: jitted step functions whose executables are compiled up front, several at once on a
thread pool (XLA compiles outside the GIL), and kept on disk in two caches.

- The program store (`$SPARKLER_CACHE/programs`) keeps each step executable whole
  (`jax.experimental.serialize_executable`) under a key of everything that shapes its trace: the source of `engine/`
  and `models/`, JAX's version, the devices, the XLA flags and a few JAX settings, a namespace (the model and the
  mesh, for the runner's steps) and the call's full abstract signature. A start loads them without tracing (~0.1 s
  each on this CPU). Processes that start together (servers on one host, the test suite's workers) compile each
  program once: whoever compiles it holds a lock file beside its entry (`_claim`), and the others wait for it and
  load what it stored.
- JAX's persistent compilation cache (`$SPARKLER_CACHE/xla`) keeps every other program (and serves a step whose
  store entry is gone). Its lookups are keyed by the lowered program, so each still traces and lowers (~0.5 s a
  step for the default model here: 29 s of what was a 36 s warm start). An executable it reads back cannot be
  serialized again on the CPU (it loads, then fails at run time: "Function add_select_fusion not found"), so a step
  bound for the store is compiled with an inert option naming its store entry (`_fresh`: a key of its own in JAX's
  cache), and one that JAX served anyway (its store file was deleted) is not stored.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import pickle
import threading
import time
from typing import Any, Callable

import jax

log = logging.getLogger("sparkler.compile")
PROGRAMS = {"loaded": 0, "saved": 0, "working": 0}  # program-store reads and writes since start, and the most
# working memory (temporaries, bytes) of a program compiled or loaded (`engine.memory`)
PERSISTENT = {"hits": 0, "misses": 0}  # JAX's persistent-cache lookups since start (from its own events)
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_lock = threading.Lock()
_store: dict[str, str | None] = {"dir": None}
_thread = threading.local()  # this thread's persistent-cache hits (events arrive on the compiling thread)
# Tracing runs one program at a time: Flax's module classes are not safe to trace from several threads at once
# (`nn.scan` makes a subclass of the layer while another thread reads the layer's dataclass fields: "dictionary
# changed size during iteration"), and tracing holds the GIL anyway; XLA's compile, which releases it, overlaps.
_tracing = threading.Lock()


def _on_event(event: str, **_) -> None:
    if event in _EVENTS:
        with _lock:
            PERSISTENT[_EVENTS[event]] += 1
        if event.endswith("cache_hits"):
            _thread.hits = getattr(_thread, "hits", 0) + 1


jax.monitoring.register_event_listener(_on_event)


def use_caches(root: str) -> None:
    """Keep compiled programs under `root`: step executables in `root/programs` (the program store), everything else
    in JAX's persistent compilation cache at `root/xla` (however quickly it compiled)."""
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _store["dir"] = os.path.join(root, "programs")


def _fresh(path: str) -> dict[str, str]:
    """Compiler options that disable an HLO pass no compiler has, named after the store entry: inert, but part of
    JAX's cache key (which ignores the dump options), so a compile bound for the program store is XLA's own here
    (see the module doc)."""
    return {"xla_disable_hlo_passes": "sparkler-program-store-" + os.path.basename(path)}


@functools.cache
def code_version() -> str:
    """A hash of the source every traced program comes from (`engine/`, `models/` and its folders, the C++
    kernels), JAX's, jaxlib's and Flax's versions and the XLA flags: a program-store key changes whenever any of
    them does."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import flax
    import jaxlib

    h = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__} {flax.__version__} "
                       f"{os.environ.get('XLA_FLAGS', '')}".encode())
    for folder in ("engine", "models"):
        for where, _, names in sorted(os.walk(os.path.join(root, folder))):
            for name in sorted(n for n in names if n.endswith((".py", ".cc", ".h"))):
                path = os.path.join(where, name)
                with open(path, "rb") as f:
                    h.update(os.path.relpath(path, root).encode() + f.read())
    return h.hexdigest()


def _layout(x) -> str:
    """Which piece of `x` each device holds. Equivalent shardings give the same layout (`P()` and `P('data')` over a
    mesh axis of size one: an engine's sampler rows are the one at warm-up and the other after their first update),
    and one compiled program serves both: its key must not depend on which of them a call happened to pass."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or not hasattr(x, "shape"):
        return "None"
    pieces = sharding.devices_indices_map(tuple(x.shape))
    return repr(sorted((d.id, tuple((i.start, i.stop, i.step) for i in index)) for d, index in pieces.items()))


def _signature(args: tuple, statics: dict) -> str:
    """Every leaf's shape, dtype and layout on the devices, the pytree structure, and the static arguments."""
    leaves, tree = jax.tree.flatten(args)
    return repr((str(tree), [(getattr(x, "shape", None), str(getattr(x, "dtype", type(x).__name__)),
                              bool(getattr(x, "weak_type", False)), _layout(x)) for x in leaves],
                 sorted(statics.items())))


def _store_path(namespace: str, name: str, args: tuple, statics: dict) -> str | None:
    if _store["dir"] is None or jax.process_count() > 1:  # multi-host programs are compiled by every process
        return None
    devices = [(d.platform, d.device_kind, d.id, d.process_index) for d in jax.devices()]
    flags = [getattr(jax.config, f) for f in ("jax_default_matmul_precision", "jax_enable_x64",
                                              "jax_default_prng_impl")]
    flags.append(jax.config.read("jax_disable_most_optimizations"))  # LLVM at -O0: the same results, slower code
    key = hashlib.sha256(repr((code_version(), devices, flags, namespace, name, _signature(args, statics))).encode())
    return os.path.join(_store["dir"], key.hexdigest()[:40] + ".exe")


def kept(name: str, key: Any, make: Callable[[], Any]) -> tuple[Any, bool]:
    """`make()`'s JSON-able result, kept in the program store under `name` and `key` (with the code version and
    the devices, as the programs are): made once per card, code and `key`. Returns it and whether it was kept from
    before. Without a store (or on several processes) it is made every time."""
    from models.loading.source import json_file

    path = _store_path(name, "kept", (), {"key": repr(key)})
    return json_file(path[:-len(".exe")] + ".json", make) if path is not None else (make(), False)


def _load(path: str | None):
    from jax.experimental import serialize_executable

    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            parts, ids = pickle.load(f)
        by_id = {d.id: d for d in jax.devices()}  # on the devices it was compiled for (else on every device)
        exe = serialize_executable.deserialize_and_load(*parts, execution_devices=[by_id[i] for i in ids])
    except Exception as e:  # noqa: BLE001  (a torn or foreign file: compile instead, and overwrite it)
        log.warning("sparkler: program store: %s unreadable (%s); compiling", path, e)
        return None
    with _lock:
        PROGRAMS["loaded"] += 1
    return exe


def _save(path: str | None, exe) -> None:
    from jax.experimental import serialize_executable

    if path is None:
        return
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        ids = [d.id for d in exe.runtime_executable().local_devices()]
        blob = pickle.dumps((serialize_executable.serialize(exe), ids))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001  (a full disk, or an executable the backend cannot serialize: keep it in
        log.warning("sparkler: program store: cannot keep %s (%s)", path, e)  # memory only)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    with _lock:
        PROGRAMS["saved"] += 1


@contextlib.contextmanager
def _claim(path: str | None, patience: float = 600.0):
    """Hold the lock of the program at `path` while compiling it, so that processes starting together (servers, test
    workers) compile each program once and the others load it from the store. A holder that takes longer than
    `patience` seconds is not waited for: the caller compiles the program itself."""
    if path is None:  # no program store
        yield
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path + ".lock", "a")
    except OSError:  # a store this process cannot write to: compile without waiting for anyone
        yield
        return
    with f:
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("sparkler: program store: %s is locked for over %.0f s; compiling", path, patience)
                    yield
                    return
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shape_key(args: tuple, statics: dict) -> tuple:
    """The shapes of a call's array arguments, inside tuples too (pytrees such as parameters are fixed per runner)."""
    return _shapes(args), tuple(sorted(statics.items()))


def _shapes(a) -> tuple | None:
    if hasattr(a, "shape"):
        return a.shape, str(a.dtype), bool(getattr(a, "weak_type", False))
    return tuple(_shapes(x) for x in a) if isinstance(a, tuple) else None


def _abstract(x):
    if hasattr(x, "shape"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None),
                                    weak_type=bool(getattr(x, "weak_type", False)))
    return x


class Pending:
    """A shape queued on a `Background`: its future, and whether its compilation has started (a call then waits for
    it; before that, the call compiles the shape itself and the queued job finds it done)."""

    def __init__(self):
        self.future: concurrent.futures.Future | None = None
        self.started = threading.Event()


class AOT:
    """A jitted function plus executables compiled ahead of time for given argument shapes: a call runs the
    executable compiled for its shapes, waits for it if a background warm-up is compiling it, else compiles it.
    `namespace` names what the trace depends on beyond the arguments (the model and mesh), for the program store."""

    def __init__(self, fn: Callable, name: str = "", namespace: str = ""):
        self.fn, self.name, self.namespace = fn, name, namespace
        self.exes: dict = {}
        self.pending: dict[tuple, Pending] = {}  # shapes a `Background` will compile
        self.calls, self.seconds = 0, 0.0  # launches of its executables, and the time they took (see
        # `Runner.device_seconds`: on a GPU a launch can wait for the devices)

    def __call__(self, *args, **statics):
        """Run the executable for these shapes (compiled now if no warm-up has it)."""
        key = shape_key(args, statics)
        exe, job = self.exes.get(key), self.pending.get(key)
        if exe is None and job is not None and job.started.is_set():
            concurrent.futures.wait([job.future])  # a request never fails for a shape being compiled: it waits
            exe = self.exes.get(key)
        if exe is None:  # compile it now (and keep it in the store for the next start)
            t = time.perf_counter()
            self.compile(*args, **statics)
            ints = [tuple(x.shape) for x in jax.tree.leaves(args) if str(getattr(x, "dtype", "")) in ("int32", "bool")]
            what = "a shape no warm-up named" if job is None else "a shape the warm-up behind serving had not reached"
            log.info("sparkler: %s: %s (inputs %s, %s) took %.2f s to load or compile", self.name, what, ints,
                     statics, time.perf_counter() - t)
            exe = self.exes[key]
        t = time.perf_counter()
        out = exe(*args)
        self.calls += 1
        self.seconds += time.perf_counter() - t
        return out

    def compile(self, *args, **statics) -> None:
        """Load from the program store, or compile (and store), for the shapes of `args` (arrays, or anything with
        `shape`/`dtype`) without running."""
        key = shape_key(args, statics)
        if key in self.exes:
            return
        abstract = jax.tree.map(_abstract, args)
        path = _store_path(self.namespace, self.name, abstract, statics)
        exe = _load(path)
        if exe is None:
            with _claim(path):
                exe = _load(path)  # compiled by another process while this one waited for it
                if exe is None:
                    hits = getattr(_thread, "hits", 0)
                    with _tracing:
                        lowered = self.fn.lower(*abstract, **statics)
                    exe = lowered.compile(compiler_options=_fresh(path) if path else None)
                    if getattr(_thread, "hits", 0) == hits:  # compiled here, not read back from JAX's cache
                        _save(path, exe)
        working = _working(exe)
        with _lock:
            PROGRAMS["working"] = max(PROGRAMS["working"], working)
        self.exes[key] = exe


def _working(exe) -> int:
    """A compiled program's temporaries in bytes (0 where the backend does not say)."""
    try:
        return int(exe.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (no analysis for this backend or a loaded program)
        return 0


def compile_all(jobs: list[tuple[AOT, tuple, dict]], workers: int | None = None, desc: str = "compiling") -> None:
    """Compile `(function, args, statics)` jobs on a thread pool, with a progress bar."""
    from tqdm import tqdm

    workers = workers or max(2, os.cpu_count() or 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, tqdm(total=len(jobs), desc=desc, unit="shape") as bar:
        futures = [pool.submit(fn.compile, *args, **statics) for fn, args, statics in jobs]
        for f in concurrent.futures.as_completed(futures):
            f.result()
            bar.update()


class Background:
    """Jobs compiling on a thread pool while the server serves. Each job's shape is marked `Pending` first: a call
    that needs it waits for it once its compilation has started, and compiles it itself before that
    (`AOT.__call__`). A job waits while `yield_to()` (the engine is busy), so the requests being served get the CPU.
    `ready`/`total` count them; a job that fails is logged and left to compile on demand."""

    def __init__(self, jobs: list["Job"], workers: int = 1, yield_to: Callable[[], bool] = lambda: False):
        self.total, self.ready, self.failed, self.started = len(jobs), 0, 0, time.monotonic()
        self.yield_to = yield_to  # while it answers true (the engine has work), the next job waits
        self.stopped = False
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="warmup")
        self.futures = []
        for fn, args, statics in jobs:
            key = shape_key(args, statics)
            if key in fn.exes or key in fn.pending:
                self.total -= 1
                continue
            job = Pending()
            job.future = self.pool.submit(self._one, fn, key, job, args, statics)
            fn.pending[key] = job
            self.futures.append(job.future)
        log.info("sparkler: warm-up: %d more shapes compiling behind serving", self.total)
        self.pool.submit(self._finish)
        self.pool.shutdown(wait=False)

    def _one(self, fn: AOT, key: tuple, job: Pending, args: tuple, statics: dict) -> None:
        try:
            while self.yield_to() and key not in fn.exes and not self.stopped:  # serving first; a step that
                time.sleep(0.02)  # needs this shape meanwhile compiles it
            if self.stopped:
                return
            job.started.set()
            fn.compile(*args, **statics)
        except Exception:  # noqa: BLE001  (the shape then compiles when a step needs it)
            log.exception("sparkler: warm-up: a %s shape failed to compile", fn.name)
            with _lock:
                self.failed += 1
        else:
            with _lock:
                self.ready += 1
        finally:
            fn.pending.pop(key, None)

    def _finish(self) -> None:
        concurrent.futures.wait(self.futures)
        log.info("sparkler: warm-up: %d shapes ready behind serving in %.1f s, %d failed (program store: %d loaded, "
                 "%d saved; JAX's cache: %d hits, %d misses)", self.ready, time.monotonic() - self.started,
                 self.failed, PROGRAMS["loaded"], PROGRAMS["saved"], PERSISTENT["hits"], PERSISTENT["misses"])

    def cancel(self) -> None:
        """Drop the jobs not started (at shutdown: the process then waits for one compilation at most)."""
        self.stopped = True
        self.pool.shutdown(wait=False, cancel_futures=True)


Job = tuple[AOT, tuple, dict[str, Any]]
