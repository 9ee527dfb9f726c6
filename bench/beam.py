"""Beam search with the default model on this machine, beside transformers' `generate(num_beams=...)` on the same
weights (float32, the packaged GGUF dequantized by transformers), in one run: the same prompts, widths and lengths
(the hypotheses are the same: tests/test_models.py), seconds per search and the ratio. `make bench-beam`. Not a
test: read the ratios."""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time", "The best way to learn a language is"]


def main() -> None:
    """Each (width, tokens) row: every prompt searched by both, the median of `--rounds` per engine."""
    import statistics

    import torch

    from engine import LLM
    from models import load_model
    from models.loading.packaged import resolve
    from test_models import hf_reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2x16,4x32,8x32", help="WIDTHxTOKENS,...")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one row of 2x4, one round")
    args = ap.parse_args()
    rows = [(2, 4)] if args.smoke else [tuple(map(int, r.split("x"))) for r in args.rows.split(",")]
    rounds = 1 if args.smoke else args.rounds
    tok, ref = hf_reference(resolve("smollm2-135m-instruct"))
    torch.set_num_threads(os.cpu_count() or 1)
    llm = LLM(load_model("smollm2-135m-instruct", quantization="none"), max_num_seqs=32, max_model_len=1024,
              kv_cache_gb=0.5)
    table = []
    for width, n in rows:
        ids = [tok(p).input_ids for p in PROMPTS]
        llm.beam_search(ids, beam_width=width, max_tokens=n, ignore_eos=True)  # compile this row's shapes
        ours, theirs = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            llm.beam_search(ids, beam_width=width, max_tokens=n, ignore_eos=True)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            for p in ids:  # transformers searches one prompt at a time (a batch would pad them)
                ref.generate(torch.tensor([p]), num_beams=width, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             early_stopping=False, pad_token_id=tok.eos_token_id)
            theirs.append(time.perf_counter() - t)
        table.append((width, n, statistics.median(ours), statistics.median(theirs)))
        print(table[-1], flush=True)
    print(f"\nBeam search, smollm2-135m-instruct float32, {len(PROMPTS)} prompts per search (all at once here, one "
          f"at a time in transformers), EOS ignored, median of {rounds}\n")
    print("| beams | tokens | Sparkler (s) | transformers (s) | transformers / Sparkler |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for width, n, a, b in table:
        print(f"| {width} | {n} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
