"""Do the engine's program launches wait for the devices? (issue 21, item 2)

Session 22 found on an H200 that a decode dispatched ahead does not return at once: the launch itself waited about as
long as the decode in flight (23 launches took 10.2 s of a 16.5 s round at 256 concurrent), and every eager slice of
a prefill's logits waited ~8 ms. A bare `jax.jit` program with a donated buffer, numpy inputs, `lax.cond` and
`lax.scan` launched in ~1 ms on the same card, so something in the engine's programs makes XLA's GPU runtime wait.

Session 27's run of this probe ruled out the Pallas kernel's custom call (XLA attention waited too), CUDA-graph
updates (so did a run without command buffers), the multi-step scan (one step per dispatch waited) and the flat step.
Read from XLA's source since: its GPU runtime runs a conditional (`ConditionalThunk`) by copying the predicate to the
host and waiting for the stream, and so a loop whose trip count it does not know (`WhileThunk`), so a launch of a
program holding one returns only once the device has run everything queued before that point. The sampler's
`lax.cond`s were in every decode and first-draw program; the bare probe's `lax.cond` was cheap enough for XLA to turn
into a select. The engine now runs programs without them for batches that need none of what they guard
(`RunnerConfig.sampler_branches`, `plain` by default on a GPU), and this probe asks whether that was it.

It runs the engine on a few layers of the Llama-3.1-8B shape (random weights), 256 requests of 512-token prompts and
64 new tokens, and prints per variant: decode launches and their mean seconds, the seconds spent reading back, and
the wall time. Each variant runs in its own process (XLA flags bind at start):
- `default`: the server's settings (`pallas-gpu` attention, the flat step, greedy requests: plain programs);
- `full-sampler`: `--sampler-branches cond`: the programs with the sampler's conditionals, as sessions 22 and 27
  ran;
- `cond-graphs`: those, with XLA's command buffers (CUDA graphs) taking conditionals and loops too
  (`--xla_gpu_enable_command_buffer=...,CONDITIONAL,WHILE`): does a graph's device-side branch do without the host?
- `top-p`: requests at temperature 0.8 and top_p 0.9 (many models' generation_config defaults), whose truncation
  needs the full programs, conditionals executed;
- `top-p-select`: those with `--sampler-branches select`, no conditional: these rows are `sampler.is_lean`, so
  its `lean` programs, the transforms such rows may want computed for every row (does the work cost less than the
  waits?);
- `top-p-cond-graphs`: those with the command buffers of `cond-graphs`;
- `from-store`: `default`'s programs read back from the program store, as a warm server runs them (the others compile
  their own, in fresh caches: is it a deserialized executable?).
A launch mean near the step time means launches wait; ~1 ms means they do not. A second thread that wakes every
millisecond counts its wake-ups meanwhile: well under its idle rate means the waiting launches hold the GIL, which
would starve the server's HTTP thread (64 concurrent over HTTP got half the engine's rate in that session).

Then the decode attention alone (issue 21, item 3), one layer of the 8B shape at 256 rows of 640 keys (bfloat16,
pages of 16): the `pallas-gpu` kernel at several (splits, pages per block) and table widths, at several warps and
pipeline stages for the splits `pallas_gpu.decode` picks, this project's `pallas_gpu.decode_rows` at several blocks
of keys, warps and stages, `pallas_gpu.ragged` reading the rows as sequences of one query, and the XLA reference;
each row gives the K/V bytes read per second, to compare with the card's copy bandwidth. And attention for prefill
chunks (item 1): `pallas_gpu.ragged` against XLA's `paged.prefill` (16 chunks of 512 queries, fresh and after 512
cached tokens), and 256 decode rows with 8 chunks as one flat `ragged` call against the decode kernel beside it.

`python bench/gpu_launch.py` on the GPU host (~3 minutes); `--smoke` on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STORE = "/tmp/gpu_launch_store"  # the default variant compiles into it; `from-store` loads what it kept
GRAPHS = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"}
TOP_P = {"sampling": dict(temperature=0.8, top_p=0.9, seed=0)}
VARIANTS = {"default": ({}, {}), "full-sampler": ({}, {"branches": "cond"}),
            "cond-graphs": (GRAPHS, {"branches": "cond"}), "top-p": ({}, TOP_P),
            "top-p-select": ({}, {**TOP_P, "branches": "select"}), "top-p-cond-graphs": (GRAPHS, TOP_P),
            "from-store": ({}, {})}  # the likeliest answers first


def one(variant: str, smoke: bool) -> dict:
    """Run the engine once under `variant`'s settings in this process; its figures."""
    import numpy as np

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu import SHAPES, SMOKE, engine_round, random_model

    from engine import Engine, RunnerConfig
    from engine.compile import use_caches
    from models.loading.source import cache_root

    use_caches(cache_root())  # the program store and JAX's cache, under this variant's $SPARKLER_CACHE
    settings = VARIANTS[variant][1]
    cfg = dict(SMOKE if smoke else SHAPES["llama-3.1-8b"], num_hidden_layers=2 if smoke else 4)
    n, prompt, new = (8, 64, 16) if smoke else (256, 512, 64)
    model = random_model(cfg, "float32" if smoke else "bfloat16", settings.get("attention", "auto"))
    rc = RunnerConfig(max_num_seqs=n, max_model_len=1024, kv_cache_gb=0.05 if smoke else 4.0,
                      decode_steps=settings.get("decode_steps", 16), max_prefill_tokens=16384,
                      flat_step=settings.get("flat_step"), sampler_branches=settings.get("branches"),
                      tune_kernels=False)  # every variant under one decode kernel (the attention table times them)
    eng = Engine(model, rc)
    rng = np.random.default_rng(0)

    def run() -> float:
        return engine_round(eng, rng, n, prompt, new, settings.get("sampling"))

    run()  # compiles every shape the timed round uses
    r = eng.runner
    calls, launch, read, device, ahead = r._decode.calls, r._decode.seconds, r.read_seconds, r.device_seconds(), \
        eng.ahead
    ticks, stop = [0], threading.Event()

    def tick():  # wakes every millisecond and needs the GIL to count: few ticks mean launches held it
        while not stop.is_set():
            time.sleep(0.001)
            ticks[0] += 1

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    wall = run()
    stop.set()
    ticker.join()
    idle = 0
    t = time.perf_counter()
    while time.perf_counter() - t < 1.0:  # the same loop with nothing else running: its ticks per second
        time.sleep(0.001)
        idle += 1
    return dict(variant=variant, wall=wall, tok_s=n * new / wall, decodes=r._decode.calls - calls,
                gil_ticks_share=ticks[0] / wall / idle,
                decode_launch_s=r._decode.seconds - launch, read_s=r.read_seconds - read,
                other_launch_s=r.device_seconds() - device - (r._decode.seconds - launch) - (r.read_seconds - read),
                ahead=eng.ahead - ahead,
                by_variant=", ".join(f"{v} {sum(dict(key[1])['branches'] == v for key in r._decode.exes)}"
                                     for v in r.variants),
                programs=len(r._decode.exes))


def attention(smoke: bool) -> list[dict]:
    """Time one layer's decode attention: the Pallas GPU kernel's settings and the XLA reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu import timed

    from models.backends import paged, pallas_gpu

    b, h, kvh, d, ps, length = (8, 4, 2, 32, 16, 40) if smoke else (256, 32, 8, 128, 16, 640)
    dt = jnp.float32 if smoke else jnp.bfloat16
    used = length // ps
    pages = b * 64 + 1
    key = jax.random.key(0)
    q = jax.random.normal(key, (b, h, d), dt)
    kc = jax.random.normal(jax.random.fold_in(key, 1), (kvh, pages, ps, d), dt)
    vc = jax.random.normal(jax.random.fold_in(key, 2), (kvh, pages, ps, d), dt)
    perm = np.random.default_rng(0).permutation(np.arange(1, pages))[:b * 64].reshape(b, 64).astype(np.int32)
    lengths = jnp.full((b,), length, jnp.int32)
    nbytes = 2 * b * length * kvh * d * jnp.dtype(dt).itemsize
    interpret = jax.default_backend() != "gpu"
    rows = []
    from jax.experimental.pallas.ops.gpu import paged_attention as kernel

    def time_row(kind: str, f, *args, **row) -> None:
        try:
            sec = timed(f, *args)
        except Exception as e:  # noqa: BLE001  (a setting the kernel refuses: say so, go on)
            print(f"  {kind} {row}: {type(e).__name__}", flush=True)
            return
        rows.append(dict(kind=kind, **row, ms=sec * 1e3, gbs=nbytes / sec / 1e9))
        print(f"  {rows[-1]}", flush=True)

    for width in (used, 64):
        table = jnp.asarray(perm[:, :width])
        for splits, block in ((16, 4), (10, 4), (8, 8), (5, 8), (4, 8), (2, 8), (1, 8), (4, 16), (2, 16)):
            if width % splits or (width // splits) % block:
                continue
            f = jax.jit(lambda q, k, v, t, n, s=splits, bl=block: kernel.paged_attention(
                q, k, v, t, n, k_splits=s, pages_per_compute_block=bl, interpret=interpret))
            time_row("pallas-gpu", f, q, kc, vc, table, lengths, width=width, splits=splits, block=block)
        f = jax.jit(lambda q, k, v, t: paged.reference(q[:, None], k, v, t, jnp.full((b, 1), length - 1), 1.0))
        time_row("xla", f, q, kc, vc, table, width=width, splits=0, block=0)
    # The kernel's warps and pipeline stages (upstream's defaults: 8 and 2) at the splits `pallas_gpu.decode` picks
    # for 256 rows, and `ragged` reading the same rows as sequences of one query (block: pages a step).
    table = jnp.asarray(perm[:, :used])
    _, splits, block = pallas_gpu.decode_plan(b, kvh, used)  # what `decode` runs (`used` needs no padding)
    for warps, stages in ((4, 1), (4, 2), (4, 3), (4, 4), (8, 1), (8, 3), (8, 4), (2, 2)):
        f = jax.jit(lambda q, k, v, t, n, w=warps, st=stages: kernel.paged_attention(
            q, k, v, t, n, k_splits=splits, pages_per_compute_block=block, num_warps=w, num_stages=st,
            interpret=interpret))
        time_row(f"pallas-gpu {warps} warps {stages} stages", f, q, kc, vc, table, lengths, width=used,
                 splits=splits, block=block)
    # Larger pages, the same keys (`--page-size`): each page is one contiguous read of its keys (16 keys of 128
    # bfloat16 values are 4 KiB per KV head), through `pallas_gpu.decode` as the engine would run them.
    for ps2 in (32, 64):
        used2 = -(-length // ps2)
        pages2 = b * used2 + 1
        kc2 = jax.random.normal(jax.random.fold_in(key, 3), (kvh, pages2, ps2, d), dt)
        vc2 = jax.random.normal(jax.random.fold_in(key, 4), (kvh, pages2, ps2, d), dt)
        table2 = jnp.asarray(np.random.default_rng(1).permutation(np.arange(1, pages2)).reshape(b, used2), jnp.int32)
        _, splits, block = pallas_gpu.decode_plan(b, kvh, used2)
        f = jax.jit(lambda q, k, v, t, n: pallas_gpu.decode(q, k, v, t, n, interpret=interpret))
        time_row(f"pallas-gpu decode, pages of {ps2}", f, q, kc2, vc2, table2, lengths, width=used2, splits=splits,
                 block=block)
    # This module's own kernel, `pallas_gpu.decode_rows` (each block of keys one 2-D gather of pool rows, fewer
    # registers a thread than upstream's: docs/PERFORMANCE.md): keys per step, warps, stages, splits (0: its own).
    for keys, warps, stages, splits in ((64, 4, 2, 0), (32, 4, 3, 0), (64, 4, 3, 0), (64, 8, 2, 0), (128, 4, 2, 0),
                                        (128, 8, 2, 0), (64, 4, 2, 2), (64, 4, 2, 4)):
        f = jax.jit(lambda q, k, v, t, n, ke=keys, w=warps, st=stages, sp=splits: pallas_gpu.decode_rows(
            q, k, v, t, n, interpret=interpret, splits=sp or None, keys=ke, warps=w, stages=st))
        time_row(f"decode_rows, {keys} keys a step, {warps} warps {stages} stages", f, q, kc, vc, table, lengths,
                 width=used, splits=splits, block=0)
    # `--kv-cache-dtype fp8`: the same keys as float8 (e4m3) bits, half the bytes, through `decode` (`decode_rows`,
    # as `pallas_gpu.FOREIGN`; its GB/s column counts bfloat16's bytes, so it reads as the speed-up)
    k8, v8 = (paged.to_pool(x, paged.pool_dtype("float8_e4m3fn")) for x in (kc, vc))
    for keys, warps, stages in ((64, 4, 2), (128, 4, 2), (128, 8, 2)):
        f = jax.jit(lambda q, k, v, t, n, c=pallas_gpu.DecodeChoice("rows", keys, warps, stages): pallas_gpu.decode(
            q, k, v, t, n, interpret=interpret, choice=c))
        time_row(f"decode_rows over a float8 pool, {keys} keys a step, {warps} warps {stages} stages", f, q, k8, v8,
                 table, lengths, width=used, splits=0, block=0)
    starts = lengths - 1
    for choice in pallas_gpu.RAGGED_CHOICES:  # what `pallas_gpu.tune_ragged` times (there over a prefill-heavy batch)
        f = jax.jit(lambda q, k, v, t, s, c=choice: pallas_gpu.ragged(
            q, k, v, t, s, jnp.ones_like(s), interpret=interpret, choice=c))
        time_row(str(choice), f, q, kc, vc, table, starts, width=used, splits=1,
                 block=max(1, choice.keys // kc.shape[2]))
    return rows


def chunks(smoke: bool) -> list[dict]:
    """Time one layer's attention for prefill chunks (issue 21, item 1): `pallas_gpu.ragged` against the XLA
    `paged.prefill`, for fresh 512-token chunks and for chunks after 512 cached tokens, and the flat batch of 256
    decode rows with 8 such chunks in one `ragged` call against the decode kernel plus `ragged` over the chunks."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu import timed

    from models.backends import paged, pallas_gpu

    b, h, kvh, d, ps, s, dec = (2, 4, 2, 32, 16, 32, 4) if smoke else (16, 32, 8, 128, 16, 512, 256)
    dt = jnp.float32 if smoke else jnp.bfloat16
    n = 2 * s // ps  # a table of the chunk and as many tokens before it
    pages = (b + dec) * n + 1
    key = jax.random.key(0)
    kc = jax.random.normal(jax.random.fold_in(key, 1), (kvh, pages, ps, d), dt)
    vc = jax.random.normal(jax.random.fold_in(key, 2), (kvh, pages, ps, d), dt)
    perm = np.random.default_rng(0).permutation(np.arange(1, pages)).reshape(b + dec, n).astype(np.int32)
    interpret = jax.default_backend() != "gpu"
    rows = []
    for start in (0, s):
        q = jax.random.normal(key, (b, s, h, d), dt)
        k = v = jax.random.normal(jax.random.fold_in(key, 3), (b, s, kvh, d), dt)
        table = jnp.asarray(perm[:b, :(start + s) // ps])
        pos = jnp.broadcast_to(jnp.arange(start, start + s, dtype=jnp.int32), (b, s))
        flops = 4 * b * h * d * (s * start + s * (s + 1) / 2)  # causal: scores and values
        ref = jax.jit(lambda q, k, v, kc, vc, t, p: paged.prefill(q, k, v, kc, vc, t, p, 1.0))
        ker = jax.jit(lambda q, kc, vc, t, p: pallas_gpu.ragged(q.reshape(-1, h, d), kc, vc, t, p[:, 0],
                                                                jnp.full((b,), s, jnp.int32), interpret=interpret))
        for kind, sec in (("xla paged.prefill", timed(ref, q, k, v, kc, vc, table, pos)),
                          ("pallas-gpu ragged", timed(ker, q, kc, vc, table, pos))):
            rows.append(dict(kind=kind, batch=f"{b} x {s} queries after {start}", ms=sec * 1e3,
                             tflops=flops / sec / 1e12))
            print(f"  {rows[-1]}", flush=True)
    # 256 decode rows (one query at position 2s - 1) and b chunks (fresh) in one flat batch, or in two calls.
    tables = jnp.asarray(np.concatenate([perm[b:], perm[:b]]))
    lengths = jnp.asarray([1] * dec + [s] * b, jnp.int32)
    starts = jnp.asarray([2 * s - 1] * dec + [0] * b, jnp.int32)
    q = jax.random.normal(key, (dec + b * s, h, d), dt)
    flat = jax.jit(lambda q, kc, vc, t, st, ln: pallas_gpu.ragged(q, kc, vc, t, st, ln, interpret=interpret))
    split = jax.jit(lambda q, kc, vc, t, st, ln: (
        pallas_gpu.decode(q[:dec], kc, vc, t[:dec], st[:dec] + 1, interpret=interpret),
        pallas_gpu.ragged(q[dec:], kc, vc, t[dec:], st[dec:], ln[dec:], interpret=interpret)))
    for kind, f in (("pallas-gpu ragged, one call", flat), ("decode kernel + ragged", split)):
        sec = timed(f, q, kc, vc, tables, starts, lengths)
        rows.append(dict(kind=kind, batch=f"{dec} decode rows + {b} x {s}", ms=sec * 1e3, tflops=0.0))
        print(f"  {rows[-1]}", flush=True)
    return rows


def main() -> None:
    """Each variant in its own process; one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", help="run this variant here (the parent process runs each so)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    if args.only in ("attention", "chunks"):
        print("RESULT " + json.dumps((attention if args.only == "attention" else chunks)(args.smoke)), flush=True)
        return
    if args.only:
        print("RESULT " + json.dumps(one(args.only, args.smoke)), flush=True)
        return
    rows = []
    shutil.rmtree(STORE, ignore_errors=True)
    for variant in args.variants.split(","):
        cache = STORE if variant in ("default", "from-store") else tempfile.mkdtemp(prefix="gpu_launch_")
        got = _child(variant, args.smoke, dict(os.environ, SPARKLER_CACHE=cache, **VARIANTS[variant][0]))
        if got is not None:
            rows.append(got)
            print(f"  {rows[-1]}", flush=True)
    print("| variant | tok/s | wall (s) | decodes (ahead) | decode launches (s, mean ms) | other launches (s) | "
          "read back (s) | another thread's ticks (share of idle rate) | decode programs by variant |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['tok_s']:,.0f} | {r['wall']:.2f} | {r['decodes']} ({r['ahead']}) | "
              f"{r['decode_launch_s']:.2f}, {1e3 * r['decode_launch_s'] / max(r['decodes'], 1):.1f} | "
              f"{r['other_launch_s']:.2f} | {r['read_s']:.2f} | {r['gil_ticks_share']:.0%} | "
              f"{r['by_variant']} of {r['programs']} |")
    if (got := _child("attention", args.smoke)) is not None:
        print("\n| decode attention, one layer | table width (pages) | splits | pages per block | ms | K/V GB/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in got:
            print(f"| {r['kind']} | {r['width']} | {r['splits'] or ''} | {r['block'] or ''} | {r['ms']:.3f} | "
                  f"{r['gbs']:,.0f} |")
    if (got := _child("chunks", args.smoke)) is not None:  # "chunks: failed" tells gpu_session.sh to serve without
        print("\n| chunk attention, one layer | batch | ms | TFLOP/s |")
        print("| --- | --- | ---: | ---: |")
        for r in got:
            tflops = f"{r['tflops']:.1f}" if r["tflops"] else ""
            print(f"| {r['kind']} | {r['batch']} | {r['ms']:.3f} | {tflops} |")


def _child(only: str, smoke: bool, env: dict | None = None):
    """Run one part (`--only`) in its own process; its result, or None after printing why it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", only] + (["--smoke"] if smoke else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    got = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not got:
        print(f"{only}: failed\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(got[0])


if __name__ == "__main__":
    main()
