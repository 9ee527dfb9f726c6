"""`python -m server`: load a model, compile the common shapes, and serve the OpenAI/Fireworks API over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import jax
from aiohttp import web

from engine.engine import Engine
from engine.llm import AsyncEngine
from engine.runner import RunnerConfig
from models import load_model
from models.weights import cache_root
from server.app import Server

log = logging.getLogger("sparkler.server")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    ap = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalog name, HF folder or GGUF file")
    ap.add_argument("--served-name", default=None, help="the model id clients send (default: --model)")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together (batch rows)")
    ap.add_argument("--max-model-len", type=int, default=0,
                    help="context cap per sequence (0: the model's limit, or what the KV pool holds if less)")
    ap.add_argument("--kv-cache-gb", type=float, default=4.0, help="size of the KV page pool")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--decode-steps", type=int, default=4, help="decode steps per dispatch")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    ap.add_argument("--api-key", default=os.environ.get("SPARKLER_API_KEY"), help="require 'Authorization: Bearer KEY'")
    ap.add_argument("--max-body-mb", type=float, default=8.0)
    ap.add_argument("--warmup", choices=("basic", "full", "none"), default="basic",
                    help="compile at start: the common shapes (basic), every decode and prefill shape (full: minutes "
                         "the first time, seconds once the compilation cache holds them), or nothing")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    """Load, warm up, serve until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("sparkler").setLevel(logging.INFO)
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root(), "xla"))
    model = load_model(args.model, dtype=args.dtype, tp=args.tp)
    if args.served_name:
        model.name = args.served_name
    engine = Engine(model, RunnerConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                        kv_cache_gb=args.kv_cache_gb, page_size=args.page_size,
                                        decode_steps=args.decode_steps))
    if args.warmup != "none":
        engine.warmup(full=args.warmup == "full")
    server = Server(model, AsyncEngine(engine), api_key=args.api_key, max_body_mb=args.max_body_mb)
    try:
        asyncio.run(serve(server.app(), args.host, args.port, f"{engine.runner.slots} slots, context {engine.max_len}, "
                                                                   f"{engine.pool.capacity} KV pages of {engine.page_size}"))
    except KeyboardInterrupt:
        pass


async def serve(app: web.Application, host: str, port: int, what: str = "") -> None:
    """Listen on host:port (0 picks a free port) and log one ready line with the bound address."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0]
    log.info("sparkler: ready on http://%s:%d (%s)", bound[0], bound[1], what)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
