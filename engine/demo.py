"""`python -m engine.demo`: load a model and stream a short chat answer (stands in for the server until it lands)."""

import argparse
import time

from engine import LLM, SamplingParams


def main() -> None:
    """Generate one greedy chat answer and print it with its speed."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt", default="Explain in two sentences what a KV cache is.")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    llm = LLM(args.model, max_num_seqs=4, max_model_len=1024)
    t = time.time()
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    out = llm.chat([{"role": "user", "content": args.prompt}], greedy)
    o = out[0].outputs[0]
    print(o.text)
    print(f"[{len(o.token_ids)} tokens in {time.time() - t:.1f}s including compilation; finish={o.finish_reason}]")


if __name__ == "__main__":
    main()
