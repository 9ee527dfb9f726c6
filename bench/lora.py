"""What LoRA slots cost: the engine alone on the default model, greedy decoding at 1, 8 and 32 concurrent, in one run:
the model without slots, with `--max-loras` slots whose requests use none, with every request on one of them
(random PEFT adapters of `--max-lora-rank`, all seven projections, requests spread over them), and with every request
on a mix of two of them (llama.cpp's mixes: each adapter's term added, at scales 1 and 0.5). Prints one markdown
table: output tokens per second (after a warm-up that compiles every shape) and the ratio to the model without
slots. `make bench-lora`. Not a test: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.engine import Engine  # noqa: E402
from engine.params import SamplingParams  # noqa: E402
from engine.runner import RunnerConfig  # noqa: E402
from models import load_model, lora  # noqa: E402


def random_adapter(model, folder: str, rank: int, seed: int) -> str:
    """A PEFT LoRA folder for `model` with random A and B on every projection LoRA takes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (_, a, b) in lora.modules(model).items():
        tensors[f"{lora.PREFIX}{name}.lora_A.weight"] = rng.normal(0, 0.02, (rank, a[1])).astype(np.float32)
        tensors[f"{lora.PREFIX}{name}.lora_B.weight"] = rng.normal(0, 0.02, (b[0], rank)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    targets = sorted({name.rsplit(".", 1)[1] for name in lora.modules(model)})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}, f)
    return folder


def run(eng: Engine, n: int, tokens: int, adapters: list[str | dict | None]) -> float:
    """Output tokens per second of `n` greedy requests at once, each `tokens` long."""
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(n)
    reqs = [eng.make_request([int(t) for t in rng.integers(1000, 20000, 32)], sp, adapter=adapters[i % len(adapters)])
            for i in range(n)]
    t = time.perf_counter()
    for r in reqs:
        eng.add(r)
    while eng.has_work():
        eng.step()
    return sum(len(c.token_ids) for r in reqs for c in r.choices) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--max-lora-rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    base = load_model(args.model, quantization="auto")
    rc = RunnerConfig(max_num_seqs=max(levels), max_model_len=1024, kv_cache_gb=0.5)
    slotted = lora.attach(base, args.max_loras, args.max_lora_rank)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {"no LoRA slots": (Engine(base, rc), [None])}
        eng = Engine(slotted, rc)
        names = [f"a{i}" for i in range(args.max_loras)]
        for i, name in enumerate(names):
            eng.load_adapter(name, lora.read(random_adapter(slotted, os.path.join(tmp, name), args.max_lora_rank, i),
                                             slotted))
        engines[f"{args.max_loras} slots, requests on the base model"] = (eng, [None])
        engines[f"{args.max_loras} slots of rank {args.max_lora_rank}, every request on one"] = (eng, names)
        if len(names) > 1:  # llama.cpp's mixes
            mixes = [{a: 1.0, b: 0.5} for a, b in zip(names, names[1:] + names[:1])]
            engines[f"{args.max_loras} slots of rank {args.max_lora_rank}, every request on a mix of two"] = (eng,
                                                                                                            mixes)
        for label, (e, adapters) in engines.items():
            for n in levels:
                run(e, n, 8, adapters)  # compile this level's shapes
        for label, (e, adapters) in engines.items():  # interleaved repeats: the best of each, on a noisy machine
            rows[label] = {n: 0.0 for n in levels}
        for _ in range(args.repeats):
            for label, (e, adapters) in engines.items():
                for n in levels:
                    rows[label][n] = max(rows[label][n], run(e, n, args.tokens, adapters))
    first = rows["no LoRA slots"]
    print(f"\n{args.model} ({base.cfg.quantization} weights, {base.cfg.matmul} products), engine alone, greedy, "
          f"{args.tokens} new tokens, best of {args.repeats}\n")
    print("| | " + " | ".join(f"{n} concurrent (tok/s)" for n in levels) + " | " +
          " | ".join(f"ratio at {n}" for n in levels) + " |")
    print("| --- |" + " ---: |" * (2 * len(levels)))
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join(f"{r[n]:,.1f}" for n in levels) + " | " +
              " | ".join(f"{r[n] / first[n]:.2f}" for n in levels) + " |")


if __name__ == "__main__":
    main()
