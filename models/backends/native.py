"""The C++ kernels' build: each source in `models/backends/csrc` is compiled once per machine by the host's C++ compiler
into `$SPARKLER_CACHE/native` and registered with XLA as an FFI target. Where a kernel does not compile (no
compiler, or a CPU without the instructions it needs), `available` is False and its users keep the XLA reference.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess

import jax

from models.loading.source import cache_root

log = logging.getLogger("sparkler.models")

CSRC = os.path.join(os.path.dirname(__file__), "csrc")
# Reassociation lets the compiler vectorise the sums. Not -ffast-math: linked into a shared object it sets the
# process's flush-to-zero mode when loaded, which changes every other float computation in the process.
FLAGS = ("-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-std=c++17",
         "-shared", "-fPIC", "-w")


def cpu_flags() -> str:
    """The host CPU's feature flags (`/proc/cpuinfo`), or its processor name where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def library(name: str) -> str | None:
    """Path of `csrc/<name>.cc` compiled for this source, JAX and CPU (built on first use), or None if it does
    not compile here."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    source = os.path.join(CSRC, f"{name}.cc")
    text = b""  # the source and the headers it may include
    for path in [source, *sorted(glob.glob(os.path.join(CSRC, "*.h")))]:
        with open(path, "rb") as f:
            text += f.read()
    key = hashlib.sha256(text + " ".join([jax.__version__, *FLAGS, cpu_flags()]).encode()).hexdigest()[:16]
    root = os.path.join(cache_root(), "native")
    path = os.path.join(root, f"{name}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", source, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("sparkler: the CPU kernel %s did not compile (%s); using the XLA reference", name,
                        done.stderr.strip()[-500:])
            return None
        os.replace(tmp, path)
    return path


@functools.cache
def available(name: str, symbol: str, target: str) -> bool:
    """Whether kernel `name` is compiled and its handler `symbol` registered with XLA as `target`."""
    path = library(name)
    if path is None:
        return False
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True
