"""Shared fixtures. torch is imported first: it is the test-only reference for transformers' models."""

import ctypes
import os

# XLA's CPU backend compiles with its older fusion emitters in ~25% less time (a toy engine's step programs, one
# process: 75 -> 55 s); half of a cold run is compiling (~400 large programs), so the suite, and the servers it starts
# (which inherit this), use them. The server keeps XLA's default, whose code runs faster (the sampler at 32 rows:
# 19 ms against 23). docs/PERFORMANCE.md, "The test suite's time".
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()


def device_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess on `devices` virtual CPU devices, with the suite's own flags."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


import torch  # noqa: F401  (before transformers, so its models are available to the tests)
import pytest
try:  # a worker's crash: its test runs once more, without hanging the run
    from worker_crashes import (pytest_handlecrashitem, pytest_report_teststatus,  # noqa: F401
                                pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary,
                                pytest_xdist_make_scheduler)
except ImportError:  # no pytest-xdist (a GPU host's own packages): one process, nothing to mend
    pass

# One thread: the suite's two workers keep both cores busy, and torch's threads wait for each other by spinning, so
# two of them beside the other worker's work ran transformers' greedy reference 2.6x slower than one (a 135M model, 3
# x 24 tokens: 19.8 s against 7.6 beside a JAX process multiplying matrices; alone, 4.9 against 8.1).
torch.set_num_threads(1)


def pytest_configure(config):
    """Reuse compiled step programs across test runs (the server does the same)."""
    import jax

    from engine.compile import use_caches
    from models.loading.source import cache_root

    use_caches(cache_root())
    # float32 means float32 on a GPU too (XLA would use TF32 there), so reference comparisons hold everywhere.
    jax.config.update("jax_default_matmul_precision", "highest")


# Seconds each file took in a cold run on the 2-core CPU (its tests' times summed from a junit XML; `make test` in a
# fresh clone with an empty cache on the 2-core AVX2 EPYC, the mean of two runs, 2026-12-07, session 79; files under
# 5 s left out). The files run heaviest first, so the two workers (each file stays on one) finish near together; a
# file not listed counts as light. `make test` passes `--no-loadscope-reorder`, else xdist orders the files by their
# count of tests.
FILE_SECONDS = {"test_speculative": 316, "test_moe": 279, "test_accel": 214, "test_paging": 181, "test_models": 176,
                "test_server": 152, "test_quant": 125, "test_structured": 111, "test_engine": 108, "test_mesh": 100,
                "test_operations": 85, "test_cli": 85, "test_multimodal": 78, "test_flat": 77, "test_lora": 72,
                "test_sampler": 62, "test_apis": 51, "test_cpu_matmul": 46, "test_tools": 45, "test_memory": 36,
                "test_embeddings": 35, "test_weights": 33, "test_reasoning": 31, "test_harmony": 19,
                "test_cohere": 19, "test_infill": 17, "test_ollama": 17, "test_worker_crashes": 15,
                "test_gemma3_vision": 15, "test_batches": 13, "test_page": 12, "test_tokenizer": 10,
                "test_vision": 5}


QUICK = "JAX_DISABLE_MOST_OPTIMIZATIONS"
try:
    LIBC = ctypes.CDLL("libc.so.6")  # glibc (Linux), for `malloc_trim`
except OSError:
    LIBC = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test marked `quick_compile` (tiny random models, or kernels and the sampler on small inputs, run a few
    times) compiles with XLA's optimizations mostly off (`jax_disable_most_optimizations`: LLVM at -O0), in this
    process and in the processes it starts: ~half the compile time, and its programs run a few times slower, which
    for these tests costs far less. Programs of the packaged model are compiled as users get them. After a file's
    last test (its fixtures torn down), a full garbage collection: engines sit in reference cycles, and their KV
    pools and programs would otherwise stay in the worker's memory until the collector's rare oldest pass (two
    workers reached 23 of this machine's 24 GiB, and the suite stalled); JAX's own caches emptied first (its jitted
    functions' executables and traces, which hold what the file's tests compiled and closed over: the workers' peak
    9.1 and 9.8 GB fell to 6.3 and 6.8, a warm run 10:06 -> 9:54, ~4% more CPU time re-reading programs from the
    persistent cache); then glibc hands its freed heap back to the system (`malloc_trim`: ~1 GB a heavy file)."""
    import gc

    import jax

    quick = item.get_closest_marker("quick_compile") is not None
    jax.config.update("jax_disable_most_optimizations", quick)
    if quick:
        os.environ[QUICK] = "1"
    try:
        return (yield)
    finally:
        os.environ.pop(QUICK, None)
        jax.config.update("jax_disable_most_optimizations", False)
        if nextitem is None or nextitem.path != item.path:
            jax.clear_caches()
            gc.collect()
            if LIBC is not None:
                LIBC.malloc_trim(0)


def pytest_collection_modifyitems(items):
    """Heaviest files first (a stable sort: each file's tests keep their order)."""
    weight = lambda item: FILE_SECONDS.get(item.path.stem, 0)  # noqa: E731
    items.sort(key=lambda item: -weight(item))


# The engine settings of the `llm` fixture and the `api` server: tests that need no others use these, so each program
# is compiled once per suite (the program store on disk serves every worker and later process). Drafts of at most 4
# tokens: a verify step scores 5 positions a row, not the default 17 (on this CPU a 16-row verify's forward pass is
# compute-bound, ~0.6 s at 17 against ~0.2 at 5, and the tests force verify steps whose drafts mostly lose); the
# default width is verified on the MoE families (test_moe).
ENGINE = dict(max_num_seqs=32, max_model_len=1024, decode_steps=4, kv_cache_gb=0.5, draft_tokens=4)


@pytest.fixture(scope="session")
def smollm():
    """The packaged default model as `sparkler serve` loads it (`--quantization auto`: int4 or int8 weights through
    the C++ kernel where it runs, else float32), loaded once per test session."""
    from models import load_model

    return load_model("smollm2-135m-instruct", quantization="auto")


@pytest.fixture(scope="session")
def smollm_f32():
    """The packaged default model in float32 (`--quantization none`), for the tests that compare with float32:
    transformers' reference, the quantization guard, tensor-parallel meshes."""
    from models import load_model

    return load_model("smollm2-135m-instruct", quantization="none")


@pytest.fixture(scope="session")
def smollm_path():
    """Path of the default model's GGUF file."""
    from models.loading.packaged import resolve

    return resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llm(smollm):
    """An offline engine over the default model with the `api` server's settings (`ENGINE`: 32 slots, 1024 tokens),
    so the two share compiled programs through the program store."""
    from engine import LLM

    return LLM(smollm, **ENGINE)


@pytest.fixture(scope="session")
def llm_f32(smollm_f32):
    """`llm` over the float32 model."""
    from engine import LLM

    return LLM(smollm_f32, **ENGINE)


# Defaults the served model advertises in the tests (as a generation_config.json would): requests that leave these
# out must get them, and the `fireworks-sampling-options` header must report them.
SERVED_DEFAULTS = {"temperature": 0.7, "top_k": 40, "top_p": 0.95}


def live_server(model, rc, **server_kw):
    """Serve `model` on a free loopback port from a thread; yields a namespace (url, server, engine, model).
    `draft`: a draft model for the engine."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from aiohttp import web

    from engine.engine import Engine
    from engine.llm import AsyncEngine
    from server.app import Server

    engine = Engine(model, rc, draft=server_kw.pop("draft", None))
    aengine = AsyncEngine(engine, **({"max_buffer": server_kw.pop("max_buffer")} if "max_buffer" in server_kw else {}))
    srv = Server(model, aengine, **server_kw)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner = web.AppRunner(srv.app(), handler_cancellation=True)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", server=srv, engine=engine, model=model)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    srv.close()


@pytest.fixture(scope="session")
def api(smollm):
    """A live server on loopback over the default model (32 slots, 1024 tokens, 1 MiB bodies), in a thread."""
    import dataclasses

    from engine.runner import RunnerConfig

    model = dataclasses.replace(smollm, generation_config={**smollm.generation_config, **SERVED_DEFAULTS})
    rc = RunnerConfig(**ENGINE)
    yield from live_server(model, rc, max_body_mb=1.0)


@pytest.fixture()
def client(api):
    """The official openai client pointed at the live server."""
    import openai

    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)
