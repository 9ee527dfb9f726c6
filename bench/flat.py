"""The flat step (`--flat-step`) against separate prefill and decode calls, engine alone, in one run.

Load: `--streams` requests decoding (64-token prompts) when `--prompts` long prompts (`--prompt-len` tokens) arrive,
every request `--tokens` new tokens, greedy. Per mode and round: wall time, the long prompts' time to first token
(p50), the streams' tokens per second while the prompts are prefilled, and the total tokens per second. Rounds
alternate the modes (this machine is noisy: read the ratios). On a CPU the flat step attends through
`paged.flat_reference` (XLA), on a GPU through `pallas_gpu.ragged`.

`python bench/flat.py` (`--smoke` for a quick look).
"""

from __future__ import annotations

import argparse
import statistics
import time


def run(eng, streams: int, prompts: int, prompt_len: int, tokens: int, seed: int) -> dict:
    """One round of the load on `eng`."""
    import numpy as np

    from engine import SamplingParams

    rng = np.random.default_rng(seed)
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    running = [eng.make_request(rng.integers(100, 20000, 64).tolist(), greedy) for _ in range(streams)]
    for r in running:
        eng.add(r)
    while any(not r.choices[0].token_ids for r in running):
        eng.step()
    t0 = time.perf_counter()
    before = sum(len(r.choices[0].token_ids) for r in running)
    longs = [eng.make_request(rng.integers(100, 20000, prompt_len).tolist(), greedy) for _ in range(prompts)]
    for r in longs:
        eng.add(r)
    first: dict[str, float] = {}
    while eng.has_work():
        eng.step()
        for r in longs:
            if r.id not in first and r.choices[0].token_ids:
                first[r.id] = time.perf_counter() - t0
        if len(first) == len(longs) and "prefilled" not in first:
            first["prefilled"] = time.perf_counter() - t0
            during = sum(len(r.choices[0].token_ids) for r in running) - before
    wall = time.perf_counter() - t0
    total = sum(len(r.choices[0].token_ids) for r in running + longs) - before
    return dict(wall=wall, ttft=statistics.median(first[r.id] for r in longs), during=during / first["prefilled"],
                tok_s=total / wall)


def main() -> None:
    """Both modes, alternating rounds; one markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.streams, args.prompts, args.prompt_len, args.tokens, args.rounds = 2, 1, 200, 8, 1
    import jax

    from engine import Engine, RunnerConfig, memory
    from models import load_model

    model = load_model(args.model)
    slots = args.streams + args.prompts
    engines = {flat: Engine(model, RunnerConfig(max_num_seqs=slots, max_model_len=1024, flat_step=flat,
                                                kv_cache_gb=memory.CPU_GB))
               for flat in (False, True)}
    for eng in engines.values():
        eng.warmup()
        run(eng, args.streams, args.prompts, args.prompt_len, args.tokens, seed=99)  # whatever the warm-up missed
    rows = {flat: [] for flat in engines}
    for i in range(args.rounds):
        for flat, eng in engines.items():
            rows[flat].append(run(eng, args.streams, args.prompts, args.prompt_len, args.tokens, seed=i))
            print(f"  flat={flat} round {i}: {rows[flat][-1]}", flush=True)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.model}, {args.streams} streams + "
          f"{args.prompts} x {args.prompt_len}-token prompts, {args.tokens} new tokens each, best of {args.rounds}\n")
    print("| mode | wall (s) | long prompts' first token, p50 (s) | streams' tok/s while prefilling | total tok/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for flat, rs in rows.items():
        best = min(rs, key=lambda r: r["wall"])
        print(f"| {'flat step' if flat else 'separate calls'} | {best['wall']:.2f} | {best['ttft']:.2f} | "
              f"{best['during']:.1f} | {best['tok_s']:.1f} |")


if __name__ == "__main__":
    main()
