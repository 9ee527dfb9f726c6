"""Benchmark: what JSON-schema constrained requests cost the free ones in the same batch (engine alone, one run).

32 concurrent requests, all free, against 24 free + 8 constrained by a JSON schema: tokens/s of the free requests and
of all; constrained requests make every dispatch one decode step (the host picks each of their masks)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                         "city": {"type": "string", "maxLength": 40}}}


def main() -> None:
    """Run both mixes and print the table."""
    from engine import Engine, RunnerConfig, SamplingParams
    from engine.grammar import grammar_text
    from models import load_model

    model = load_model("smollm2-135m-instruct")
    eng = Engine(model, RunnerConfig(max_num_seqs=32, max_model_len=1024, kv_cache_gb=0.5))
    eng.warmup()
    grammar = grammar_text({"type": "json_schema", "json_schema": SCHEMA})
    prompt = eng.tok.encode("Write a JSON record of a person:")

    def run(constrained: int, seed: int) -> tuple[float, float]:
        free = [eng.make_request(prompt, SamplingParams(temperature=1.0, seed=seed + i, max_tokens=64, ignore_eos=True))
                for i in range(32 - constrained)]
        tied = [eng.make_request(prompt, SamplingParams(temperature=1.0, seed=seed + 100 + i, max_tokens=64),
                                 grammar=grammar) for i in range(constrained)]
        t = time.perf_counter()
        for r in free + tied:
            eng.add(r)
        while eng.has_work():
            eng.step()
        dt = time.perf_counter() - t
        n_free = sum(len(r.choices[0].token_ids) for r in free)
        return n_free / dt, (n_free + sum(len(r.choices[0].token_ids) for r in tied)) / dt

    run(8, 0), run(0, 0)  # compile the one-step decode shapes too
    a_free, a_all = run(0, 1000)
    b_free, b_all = run(8, 1000)
    print("| batch of 32 | free requests (tok/s) | all (tok/s) |\n| --- | --- | --- |")
    print(f"| 32 free | {a_free:.1f} | {a_all:.1f} |")
    print(f"| 24 free + 8 JSON-schema constrained | {b_free:.1f} ({b_free / a_free:.2f}x) | {b_all:.1f} |")


if __name__ == "__main__":
    main()
