"""`sparkler bench throughput` and `sparkler bench latency`: the engine alone in this process (no server, no HTTP),
loaded with `serve`'s flags, measured as vLLM's `vllm bench throughput` and `vllm bench latency` measure theirs.

`throughput` runs `--num-prompts` random prompts of `--input-len` token ids (`server.bench_serve.prompts`: valid in
any common vocabulary; after `--random-prefix-len` ids they all share, else none sharing a prefix) to `--output-len`
tokens each (`ignore_eos`, temperature 1 and top-p 1, as vLLM's) in one offline batch (`engine.LLM.generate`: the
scheduler seats as many as fit and admits the rest as others finish), and prints requests, total tokens and output
tokens per second. `latency` times one batch of
`--batch-size` such prompts end to end, `--num-iters` times after `--num-iters-warmup` untimed ones, and prints the
mean and the 10th to 99th percentiles (the same prompts each time: after the first, the prefix cache serves their
full pages, as vLLM's own prefix caching does). The warm-up of `serve` (`--warmup`) compiles the common shapes
first, and `throughput` runs a batch of slots' worth of other prompts of the same length to two tokens each,
untimed (the prompt chunks' shapes the warm-up leaves to first use), so a figure counts running, not compiling
(`latency`: given warm-up iterations); `--output-json` keeps the figures. A prompt and its tokens past the context,
or `--n` past a data shard's slots, stop the run with a message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np

PERCENTILES = (10, 25, 50, 75, 90, 99)  # vLLM's latency report


def _throughput_flags(ap) -> None:
    ap.add_argument("--input-len", "--random-input-len", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--output-len", "--random-output-len", type=int, default=128, help="tokens to generate")
    ap.add_argument("--random-prefix-len", "--prefix-len", type=int, default=0,
                    help="token ids every prompt starts with, before its own --input-len")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default=None, metavar="FILE", help="write the figures as JSON")


def _latency_flags(ap) -> None:
    ap.add_argument("--input-len", type=int, default=32, help="prompt tokens")
    ap.add_argument("--output-len", type=int, default=128, help="tokens to generate")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts in the batch")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--num-iters-warmup", type=int, default=10)
    ap.add_argument("--num-iters", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default=None, metavar="FILE", help="write the figures as JSON")


def _engine(args):
    """`engine.LLM` on the model (and draft model) of `serve`'s flags, warmed up as `serve` warms up (its caches in
    use)."""
    from engine import LLM
    from engine.compile import use_caches
    from models.loading.source import cache_root
    from server.__main__ import load, load_draft, runner_config

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("sparkler").setLevel(logging.INFO)
    if args.num_processes > 1:
        raise SystemExit("sparkler: bench throughput and latency run in one process (--num-processes 1)")
    use_caches(cache_root())
    try:  # a draft model (--speculative-model) drafts as it would in `serve`
        draft = load_draft(args)
        llm = LLM(load(args), speculative_config=None if draft is None else {"model": draft},
                  **dataclasses.asdict(runner_config(args)))
    except ValueError as e:  # a mesh that does not fit, a pool too small, ...
        raise SystemExit(f"sparkler: {e}") from None
    if args.warmup != "none":
        llm.engine.warmup(full=args.warmup == "full")
    return llm


def _params(args):
    """vLLM's benchmark sampling: temperature 1 over the whole vocabulary, every other setting neutral (not the
    model's generation_config defaults), to `--output-len` tokens."""
    from engine import SamplingParams
    from engine.params import OPENAI_DEFAULTS

    return SamplingParams(n=args.n, max_tokens=args.output_len, ignore_eos=True, seed=args.seed, **OPENAI_DEFAULTS)


def _prompts(llm, n: int, length: int, seed: int, prefix: int = 0) -> list[list[int]]:
    """`n` random prompts of `length` ids after `prefix` ids they share (`server.bench_serve.prompts`), in a range the
    model's vocabulary holds."""
    from server.bench_serve import prompts

    vocab = llm.model.cfg.vocab_size
    return prompts(n, length, seed, min(1000, vocab // 4), min(20000, vocab), prefix)


def _fits(llm, args) -> None:
    """Stop with a message where a prompt and its tokens pass the context, or `--n` a data shard's slots."""
    total = args.input_len + args.output_len + getattr(args, "random_prefix_len", 0)
    if total > llm.engine.max_len:
        raise SystemExit(f"sparkler: the prompt and --output-len ({total} tokens) are past the context "
                         f"({llm.engine.max_len} tokens; --max-model-len)")
    if args.n > llm.engine.runner.per_shard:
        raise SystemExit(f"sparkler: --n {args.n} is more than a data shard's {llm.engine.runner.per_shard} slots")


def throughput(argv: list[str]) -> int:
    """`sparkler bench throughput [serve's flags] ...`: one offline batch, timed; prints vLLM's line."""
    from server.__main__ import parse_args

    args = parse_args(argv, "sparkler bench throughput", more=_throughput_flags, description=__doc__)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or args.n < 1 or args.random_prefix_len < 0:
        raise SystemExit("sparkler: --num-prompts, --input-len, --output-len and --n must be positive "
                         "(--random-prefix-len >= 0)")
    llm = _engine(args)
    _fits(llm, args)
    ids = _prompts(llm, args.num_prompts, args.input_len, args.seed, args.random_prefix_len)
    first = _prompts(llm, min(args.num_prompts, llm.engine.runner.slots), args.input_len, args.seed + 1,
                     args.random_prefix_len)  # another prefix: the timed batch's is not cached
    llm.generate(first, dataclasses.replace(_params(args), max_tokens=min(2, args.output_len)))  # the prompts'
    # shapes the warm-up left to first use, untimed
    t = time.perf_counter()
    outs = llm.generate(ids, _params(args))
    wall = time.perf_counter() - t
    given = sum(len(o.prompt_token_ids) for o in outs)
    made = sum(len(c.token_ids) for o in outs for c in o.outputs)
    figures = {"elapsed_time": wall, "num_requests": len(outs), "total_num_tokens": given + made,
               "total_input_tokens": given, "total_output_tokens": made,
               "requests_per_second": len(outs) / wall, "tokens_per_second": (given + made) / wall,
               "output_tokens_per_second": made / wall}
    print(f"Throughput: {figures['requests_per_second']:.2f} requests/s, {figures['tokens_per_second']:.2f} total "
          f"tokens/s, {figures['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {given}")
    print(f"Total num output tokens:  {made}")
    _save(args.output_json, figures)
    return 0


def latency(argv: list[str]) -> int:
    """`sparkler bench latency [serve's flags] ...`: one batch end to end, timed again and again; prints vLLM's
    lines."""
    from server.__main__ import parse_args

    args = parse_args(argv, "sparkler bench latency", more=_latency_flags, description=__doc__)
    if min(args.batch_size, args.input_len, args.output_len, args.n, args.num_iters) < 1 or args.num_iters_warmup < 0:
        raise SystemExit("sparkler: --batch-size, --input-len, --output-len, --n and --num-iters must be positive "
                         "(--num-iters-warmup >= 0)")
    llm = _engine(args)
    _fits(llm, args)
    ids = _prompts(llm, args.batch_size, args.input_len, args.seed)
    params = _params(args)

    def once() -> float:
        t = time.perf_counter()
        outs = llm.generate(ids, params)
        took = time.perf_counter() - t
        made = [len(c.token_ids) for o in outs for c in o.outputs]
        if made != [args.output_len] * (args.batch_size * args.n):  # (`ignore_eos`, and `_fits`: none is cut)
            raise SystemExit(f"sparkler: a batch made {made} tokens, not {args.output_len} each")
        return took

    for _ in range(args.num_iters_warmup):
        once()
    latencies = np.array([once() for _ in range(args.num_iters)])
    print(f"Avg latency: {latencies.mean()} seconds")
    for p, v in zip(PERCENTILES, np.percentile(latencies, PERCENTILES)):
        print(f"{p}% percentile latency: {v} seconds")
    _save(args.output_json, {"avg_latency": float(latencies.mean()), "latencies": latencies.tolist(),
                             "percentiles": {str(p): float(v) for p, v in
                                             zip(PERCENTILES, np.percentile(latencies, PERCENTILES))}})
    return 0


def _save(path: str | None, figures: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)
