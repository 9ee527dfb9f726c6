"""What the `pallas-gpu` decode kernels cost an H100 before any GPU runs them (issue 21, item 3): registers a thread,
shared memory a program, and so how many programs share a multiprocessor, from compiling their Triton IR on the CPU.

Pallas lowers each kernel to Triton IR on any host (as `jax.export` for CUDA does); this script catches that IR at
the 8B shape (256 rows, 8 KV heads of 4 query heads, 128 wide, 40 pages of 16 keys, bfloat16, the 28 GiB pool
`bench/gpu_serve.py` serves with) and compiles it with pip's `triton` for `sm_90` (its passes, its bundled `ptxas`;
no GPU is needed). XLA's GPU backend compiles the same IR with the Triton it bundles, so the figures are a close
proxy, not the card's: occupancy is not speed (that is `bench/gpu_launch.py`'s table, on a GPU). It prints one
table: per kernel and setting, registers, shared bytes, programs per multiprocessor (by registers and by shared
memory), and whether the key loads were pipelined (asynchronous copies into shared memory).

Needs `pip install triton` (about 1 GB installed; not a project dependency): `python bench/triton_static.py`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
REGISTERS, SHARED = 65536, 228 * 1024  # an H100 multiprocessor's register file and shared memory (bytes)


def triton_ir(fn, *args) -> list[str]:
    """The Triton IR (text) of every Pallas kernel `jax.jit(fn)` calls on `args`, lowered for CUDA on this host."""
    import jax
    from jax._src.pallas.triton import lowering, pallas_call_registration as registration

    caught, original = [], lowering.lower_jaxpr_to_triton_module

    def catch(*a, **k):
        result = original(*a, **k)
        caught.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = catch  # private: the one place Pallas makes the module
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    return caught


def compiled(ir: str, warps: int, stages: int, work: str) -> dict:
    """Compile Triton IR for sm_90 with pip's triton; registers, shared bytes, asynchronous copies."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(work, f"k{len(os.listdir(work))}.ttir")
    with open(path, "w") as f:
        f.write(ir)
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = path[:-5] + ".ptx"
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out = ""
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version triton writes
        exe = os.path.join(bins, name)
        if os.path.exists(exe):
            run = subprocess.run([exe, "-v", "-arch=sm_90a", ptx, "-o", os.devnull], capture_output=True, text=True)
            out = run.stdout + run.stderr
            if run.returncode == 0:
                break
    regs = re.search(r"Used (\d+) registers", out)
    return dict(registers=int(regs.group(1)) if regs else 0, shared=kernel.metadata.shared,
                async_copies=kernel.asm["ttgir"].count("async_copy_global_to_local"))


def main() -> None:
    """Each kernel and setting: compile, print a table row."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args()
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import paged_attention as upstream

    from models.backends import pallas_gpu

    b, h, kvh, d, ps, n = 256, 32, 8, 128, 16, 40
    pages = (14 << 30) // (kvh * ps * d * 2)  # gpu_serve's pool (28 GiB of K and V): past 2^31 elements, so Pallas
    shape = jax.ShapeDtypeStruct  # addresses it with 64-bit offsets, as it does there
    args = (shape((b, h, d), jnp.bfloat16), *[shape((kvh, pages, ps, d), jnp.bfloat16)] * 2,
            shape((b, n), jnp.int32), shape((b,), jnp.int32))
    cases = [(f"upstream, {block} pages a block", warps, stages, lambda q, k, v, t, l, bl=block, w=warps, s=stages:
              upstream.paged_attention(q, k, v, t, l, k_splits=1, pages_per_compute_block=bl, num_warps=w,
                                       num_stages=s))
             for block, warps, stages in ((8, 8, 2), (4, 8, 2), (4, 4, 2), (8, 4, 2))]
    cases += [(f"decode_rows, {keys} keys a step", warps, stages, lambda q, k, v, t, l, ke=keys, w=warps, s=stages:
               pallas_gpu.decode_rows(q, k, v, t, l, keys=ke, warps=w, stages=s))
              for keys, warps, stages in ((64, 4, 2), (32, 4, 3), (64, 4, 3), (128, 4, 2), (128, 8, 2))]
    print("| kernel (256 rows x 8 KV heads, 640 keys) | warps | stages | registers | shared (KiB) | programs per SM "
          "(registers / shared) | async copies |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as work:
        for name, warps, stages, fn in cases:
            (ir,) = triton_ir(fn, *args)
            got = compiled(ir, warps, stages, work)
            by_regs = REGISTERS // max(1, got["registers"] * 32 * warps)
            by_shared = SHARED // max(1, got["shared"] + 1024)  # each program reserves 1 KiB more
            print(f"| {name} | {warps} | {stages} | {got['registers']} | {got['shared'] / 1024:.1f} | "
                  f"{min(by_regs, by_shared)} ({by_regs} / {by_shared}) | {got['async_copies']} |", flush=True)


if __name__ == "__main__":
    main()
