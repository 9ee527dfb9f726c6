"""The `cpu` attention backend: decode over the paged KV pool with a small C++ kernel (`models/csrc/
decode_attention.cc`) that XLA calls through its FFI.

XLA's CPU backend runs the reference's decode attention as many tiny batched products over gathered copies of the
pages; at 32-96 rows that took ~30% of a decode step (docs/PERFORMANCE.md). The kernel reads each key and value once,
straight from the pool, and shares its (row, KV head) tasks with XLA's own intra-op threads. It is compiled once per
machine with the host's C++ compiler (`FLAGS`) into `$SPARKLER_CACHE/native`; where there is no compiler, `auto`
keeps the `xla` reference. Float32 pools only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp

from models.weights import cache_root

log = logging.getLogger("sparkler.models")

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "decode_attention.cc")
TARGET = "sparkler_decode_attention"
# Reassociation lets the compiler vectorise the sums. Not -ffast-math: linked into a shared object it sets the
# process's flush-to-zero mode when loaded, which changes every other float computation in the process.
FLAGS = ("-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-std=c++17",
         "-shared", "-fPIC", "-w")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def library() -> str | None:
    """Path of the compiled kernel for this source, JAX and CPU (built on first use), or None without a compiler."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join([jax.__version__, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    root = os.path.join(cache_root(), "native")
    path = os.path.join(root, f"decode_attention-{key}.so")
    if not os.path.exists(path):
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("sparkler: the CPU attention kernel did not compile (%s); using the XLA reference",
                        done.stderr.strip()[-500:])
            return None
        os.replace(tmp, path)
    return path


@functools.cache
def available() -> bool:
    """Whether the kernel is compiled and registered with XLA (compiling it on first call)."""
    path = library()
    if path is None:
        return False
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SparklerDecodeAttention), platform="cpu")
    return True


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
           interpret: bool = False) -> jax.Array:
    """Attention of one pre-scaled query per row `q [B, h, d]` over its first `lengths [B]` keys, in the pool pages
    listed by `table [B, n]` of `k_pages`/`v_pages [kvh, pages, page_size, d]`; returns `[B, h, d]` (the same
    contract as the Pallas kernels; `interpret` is ignored: this kernel runs natively on the CPU)."""
    if not available():
        raise RuntimeError("the cpu attention backend needs a C++ compiler (g++) to build its kernel")
    f32 = jnp.float32
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, f32), vmap_method="sequential")
    return call(q.astype(f32), k_pages.astype(f32), v_pages.astype(f32), table.astype(jnp.int32),
                lengths.astype(jnp.int32)).astype(q.dtype)
