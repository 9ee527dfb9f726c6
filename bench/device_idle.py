"""How long the devices sat idle during a piece of work, read from a `jax.profiler` trace (issue 21, item 2).

`traced(work, out)` runs `work()` under `jax.profiler.trace` (the Python tracer off: it would slow the host loop it
measures) inside a `TraceAnnotation` that marks the window, then reads the trace back with `jax.profiler.ProfileData`
and returns what the devices did in that window:
- `programs`: the share of the window in which some compiled program ran (the union of the device planes' "XLA
  Modules" events, on a GPU); the rest is the time between programs, where the devices wait for the host;
- `kernels`: the share in which some kernel ran (on a GPU, the union of every stream's kernels and copies; on a CPU,
  which has no device plane, of the work its XLA runtime's threads did);
- `gaps`: the longest stretches with nothing running, each with the event before and after it;
- `top`: the programs and the kernels that took the most device time, with their counts (how a decode step's time
  splits between attention and the matrix products, in the serving run itself).

`python bench/device_idle.py` traces a toy loop that sleeps between launches, as a check of the reading.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import time

WINDOW = "device-idle-window"
HOST_NOISE = ("ThreadpoolListener", "SlinkyThreadPool")  # the CPU runtime's bookkeeping, not work


def _union(spans: list[tuple[int, int, str]], lo: int, hi: int) -> tuple[int, list[tuple[int, str, str]]]:
    """Nanoseconds covered by `spans` (start, end, name) within [lo, hi], and the gaps between them: (length, the
    name before, the name after), longest first."""
    covered, gaps, end, last = 0, [], lo, "(window start)"
    for s, e, name in sorted(spans):
        s, e = max(s, lo), min(e, hi)
        if e <= s:
            continue
        if s > end:
            gaps.append((s - end, last, name))
        if e > end:
            covered += e - max(s, end)
            end, last = e, name
    if hi > end:
        gaps.append((hi - end, last, "(window end)"))
    return covered, sorted(gaps, reverse=True)


def _top(spans: list[tuple[int, int, str]], lo: int, hi: int, n: int = 8) -> list[tuple[str, float, int]]:
    """The `n` names that took the most time within [lo, hi]: (name without its instance suffix, seconds, count)."""
    total: dict[str, list] = {}
    for s, e, name in spans:
        if e > lo and s < hi:
            entry = total.setdefault(re.sub(r"(\(\d+\)|\.\d+)$", "", name), [0, 0])
            entry[0] += min(e, hi) - max(s, lo)
            entry[1] += 1
    return [(k, round(v[0] / 1e9, 4), v[1]) for k, v in sorted(total.items(), key=lambda kv: -kv[1][0])[:n]]


def read(path: str) -> dict:
    """The device figures of the trace file at `path` over its `WINDOW` annotation (see the module docstring)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    window, programs, kernels = None, [], []
    for plane in data.planes:
        device = plane.name.startswith("/device:")
        for line in plane.lines:
            for ev in line.events:
                span = (int(ev.start_ns), int(ev.start_ns + ev.duration_ns), ev.name)
                if ev.name == WINDOW:
                    window = span
                elif device and line.name == "XLA Modules":
                    programs.append(span)
                elif device and line.name.startswith("Stream"):
                    kernels.append(span)
                elif (not device and line.name.startswith("tf_XLA") and ev.duration_ns > 0
                      and not ev.name.startswith(HOST_NOISE)):
                    kernels.append(span)  # a CPU: the XLA runtime's threads run the programs' ops
    if window is None:
        raise ValueError(f"no {WINDOW!r} annotation in {path}")
    lo, hi = window[0], window[1]
    wall = hi - lo
    out = dict(wall_s=wall / 1e9, events=len(programs) + len(kernels))
    for name, spans in (("programs", programs), ("kernels", kernels)):
        covered, gaps = _union(spans, lo, hi)
        out[name] = covered / wall if spans else None
        if spans:
            out[f"{name}_top"] = _top(spans, lo, hi)
            out[f"{name}_gaps_over_1ms"] = sum(1 for g in gaps if g[0] > 1e6)
            out[f"{name}_gap_s"] = (wall - covered) / 1e9
            out[f"{name}_longest_gaps"] = [(round(g / 1e6, 2), a, b) for g, a, b in gaps[:5]]
    return out


def traced(work, out: str) -> tuple[object, dict]:
    """Run `work()` under the profiler (trace files under `out`, emptied first); its result and `read`'s figures."""
    import jax

    shutil.rmtree(out, ignore_errors=True)
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # tracing every Python call would slow the very host loop being measured
    with jax.profiler.trace(out, profiler_options=options):
        with jax.profiler.TraceAnnotation(WINDOW):
            result = work()
    files = sorted(glob.glob(os.path.join(out, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    return result, read(files[-1])


def summary(fig: dict) -> str:
    """One line of `read`'s figures."""
    parts = [f"{fig['wall_s']:.2f} s traced"]
    for name in ("programs", "kernels"):
        if fig.get(name) is not None:
            parts.append(f"{name} busy {fig[name]:.1%} ({fig[f'{name}_gaps_over_1ms']} gaps over 1 ms, "
                         f"longest {fig[f'{name}_longest_gaps'][:3]}; most time {fig[f'{name}_top'][:5]})")
    return "; ".join(parts)


def main() -> None:
    """A toy loop: a program of a few ms, then the host sleeps as long; about half the window should be idle."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
    x = jnp.ones((768, 768))
    f(x).block_until_ready()
    t = time.perf_counter()
    f(x).block_until_ready()
    took = time.perf_counter() - t

    def work():
        for _ in range(10):
            f(x).block_until_ready()
            time.sleep(took)

    _, fig = traced(work, "/tmp/device_idle_check")
    print(summary(fig))


if __name__ == "__main__":
    main()
