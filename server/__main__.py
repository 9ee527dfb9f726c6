"""`sparkler serve` (or `python -m server`): load a model, compile the common shapes, and serve the OpenAI/Fireworks API
over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import ssl
import time

import jax
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from engine import draft_model, multihost
from engine.compile import PERSISTENT, PROGRAMS, use_caches
from engine.engine import Engine
from engine.llm import AsyncEngine
from engine.params import DEFAULT_MAX_TOKENS, InvalidRequest, SamplingParams
from engine.runner import RunnerConfig, platform_defaults
from engine.sampler import LOGPROBS_MODES
from models import KV_DTYPES, load_model, lora
from models.backends import BACKENDS
from models.backends.cpu_matmul import MATMULS
from models.loading.source import cache_root
from models.loading.tokenizer import read_template
from server import cohere, reasoning
from server.protocol import TEMPLATE_OWN
from server.app import Server
from server.images import Media

log = logging.getLogger("sparkler.server")
DEFAULT_MODEL = "smollm2-135m-instruct"
# what --override-generation-config may set (vLLM's generation-config defaults; max_new_tokens: the default max_tokens)
GENERATION = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "max_new_tokens")
ALWAYS_CACHED = "the prefix cache is always on"
IGNORED = (  # (flag names, values it takes, why it changes nothing here): `_ignored`
    (("--enable-auto-tool-choice",), 0, "tool calls are always read, in the form the chat template writes"),
    (("--tool-call-parser",), 1, "the tool-call form is read from the chat template"),
    (("--trust-remote-code",), 0, "no code from a model folder is run: the model families are built in"),
    (("--enable-prefix-caching",), 0, ALWAYS_CACHED),
    (("--no-enable-prefix-caching", "--disable-radix-cache"), 0, ALWAYS_CACHED),
    (("--enforce-eager",), 0, "every step is a compiled XLA program; there are no CUDA graphs to turn off"),
    (("--disable-log-requests", "--enable-log-requests"), 0, "request bodies are never logged"),
    (("--disable-log-stats",), 0, "the engine's figures are at /metrics, not in the log"),
    (("--enable-metrics", "--metrics"), 0, "/metrics is always served"),
    (("--uvicorn-log-level",), 1, "the server is aiohttp"),
    (("--swap-space",), 1, "a preempted sequence is recomputed from its tokens, not swapped out"),
    (("--jinja",), 0, "chat templates are always rendered with Jinja"),
    (("--n-gpu-layers", "-ngl", "--gpu-layers"), 1, "the whole model goes on the accelerator"),
    (("--flash-attn", "-fa"), "?", "the attention kernel is chosen per platform (--attention-backend)"),
    (("--cont-batching", "-cb"), 0, "continuous batching is always on"),
    (("--threads",), 1, "XLA and the C++ kernels size their threads to the cores"),
)
KEEPALIVE = 75.0  # seconds an idle connection stays open (nginx's keepalive_timeout)
SHUTDOWN_GRACE = 3.0  # seconds a handler still running after the drain gets before it is cancelled
OPEN_FILES = 65536  # the soft limit on open files raised towards this (each connection is one)


def origins(text: str) -> tuple[str, ...]:
    """`--allowed-origins`: a JSON list, or origins separated by commas."""
    items = json.loads(text) if text.lstrip().startswith("[") else text.split(",")
    return tuple(o.strip() for o in items if o.strip())


def parse_args(argv=None, prog: str = "python -m server", more=None, description: str | None = None
               ) -> argparse.Namespace:
    """Command-line flags (`more(ap)` adds a command's own, as `run-batch` does)."""
    ap = argparse.ArgumentParser(prog=prog, description=description or __doc__)
    if more is not None:
        more(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                    help="the model, as `vllm serve MODEL` takes it (the same as --model)")
    ap.add_argument("--model", "-m", "--model-path", default=None,
                    help="catalog name, HF folder or GGUF file (default: smollm2-135m-instruct)")
    ap.add_argument("--served-name", "--served-model-name", nargs="+", default=None, metavar="NAME",
                    help="the model id clients send (default: --model); more names are aliases a request may use "
                         "too (vLLM's flag)")
    ap.add_argument("--alias", default=None, metavar="NAME", help="llama.cpp's name for one served name")
    ap.add_argument("--max-num-seqs", "--parallel", "-np", "--max-running-requests", type=int, default=32,
                    help="sequences decoded together (batch rows)")
    ap.add_argument("--max-model-len", "--ctx-size", "-c", "--context-length", type=int, default=0,
                    help="context cap per sequence (0: the model's limit, or what the KV pool holds if less)")
    ap.add_argument("--hf-overrides", type=_object, default={}, metavar="JSON",
                    help="keys of the model's config.json replaced before it is read (vLLM's flag), as "
                         "'{\"max_position_embeddings\": 32768, \"rope_scaling\": {\"rope_type\": \"yarn\", "
                         "\"factor\": 4.0, \"original_max_position_embeddings\": 8192}}' to serve past the trained "
                         "context")
    ap.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                    help="default sampling settings: the model's generation_config.json (auto), none of them "
                         "(vllm: OpenAI's defaults), or those of FOLDER/generation_config.json (vLLM's flag)")
    ap.add_argument("--override-generation-config", type=_generation, default={}, metavar="JSON",
                    help="default sampling settings over those, for requests that set none: "
                         f"{', '.join(GENERATION)} (vLLM's flag; max_new_tokens is the default max_tokens, "
                         f"{DEFAULT_MAX_TOKENS} otherwise)")
    ap.add_argument("--default-chat-template-kwargs", "--chat-template-kwargs", type=_object, default={},
                    metavar="JSON", help="variables every chat template render gets unless a request's "
                    "chat_template_kwargs set them, as '{\"enable_thinking\": false}' (vLLM's flag; llama.cpp's "
                    "name too)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.0,
                    help="size of the KV page pool, GiB a data shard (0: 4 on a CPU; on a GPU or TPU what the devices "
                         "hold after the weights within --gpu-memory-utilization, less a reserve for the programs' "
                         "working memory)")
    ap.add_argument("--gpu-memory-utilization", "--mem-fraction-static", type=_share, default=0.9,
                    help="the share of each GPU's or TPU's memory to use in all: weights, KV pool and working memory "
                         "(vLLM's flag; sets XLA_PYTHON_CLIENT_MEM_FRACTION unless it is set)")
    ap.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--decode-steps", type=int, default=0,
                    help="decode steps per dispatch (0: 4 on CPU, 16 on GPU/TPU)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="weights, activations and KV cache (unless --kv-cache-dtype; auto: bfloat16 on GPU/TPU, "
                         "float32 on CPU); norms, "
                         "softmax, logits and the sampler stay float32")
    ap.add_argument("--kv-cache-dtype", choices=tuple(KV_DTYPES), default="auto",
                    help="the KV pool's dtype (auto: the model's). fp8 (e4m3, as vLLM's; fp8_e5m2: more range, less "
                         "precision) keeps a byte a value, unscaled: twice a bfloat16 pool's tokens in --kv-cache-gb "
                         "and half the bytes decode attention reads, at some precision (docs/PERFORMANCE.md). The "
                         "CPU's attention kernel and the TPU's read their own dtype only: the XLA reference serves")
    ap.add_argument("--tune-kernels", action=argparse.BooleanOptionalAction, default=None,
                    help="time the GPU attention kernels' settings on the card at the first start and run the "
                         "fastest: decode's per batch size, flat steps' over the largest (kept beside the compiled "
                         "programs; default: on a GPU)")
    ap.add_argument("--quantization", choices=("auto", "none", "int8", "int4", "fp8", "w8a8_fp8"), default="auto",
                    help="int8: int8 weights with a float32 scale per 32 inputs (28%% of float32's bytes); int4: "
                         "4-bit weights with a float16 scale and minimum per 32 inputs (llama.cpp's Q4_1, 16%% of "
                         "float32's bytes; a GGUF's Q4_1 weights keep their own values); fp8: vLLM's on Hopper and "
                         "Ada cards, float8 e4m3 weights with a scale per row, multiplied in float8 with each "
                         "token's activations rounded to float8 (half of bfloat16's bytes, routed experts' too; "
                         "SGLang's w8a8_fp8); the embedding int8; none: "
                         "full precision; auto: what configs/models.toml says passes the model's quality guard "
                         "(int4 for the default model) where the C++ kernel runs (a CPU with AVX2), else none. "
                         "docs/PERFORMANCE.md has what each does to speed. The startup line and /v1/models say what "
                         "was chosen and why")
    ap.add_argument("--attention-backend", choices=("auto", *BACKENDS), default="auto",
                    help="paged decode attention (auto: the Pallas kernel of a GPU or TPU, the C++ kernel on a CPU; "
                         "xla: the plain-XLA reference)")
    ap.add_argument("--matmul-backend", choices=("auto", *MATMULS), default="auto",
                    help="int8 and int4 products (auto: the C++ kernel on a CPU with AVX2, faster with AVX-512 VNNI, "
                         "weights kept in its layout; xla: widen the weights to float in XLA)")
    ap.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                    help="run the layers under lax.scan: one layer is compiled, whatever the depth (one per "
                         "run of dense or MoE layers where a model mixes them)")
    ap.add_argument("--max-prefill-tokens", "--max-num-batched-tokens", "--chunked-prefill-size",
                    dest="max_prefill_tokens", type=int,
                    default=0, help="long-prompt tokens prefilled per engine step, SGLang's --max-prefill-tokens "
                    "(vLLM's name is accepted too; 0: 512 on CPU, 16384 on GPU/TPU)")
    ap.add_argument("--decode-batch-sizes", type=_sizes, default=(), metavar="N,N,...",
                    help="rows per data shard that decode steps are compiled for (each step runs at the smallest that "
                         "holds its rows; --max-num-seqs is always one): fewer sizes compile sooner, and pad more. "
                         "Default: powers of two")
    ap.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                    help="fcfs: requests are seated in arrival order; priority: by each request's 'priority' (lower "
                         "sooner, then arrival), less urgent work preempted for more urgent (vLLM's flag)")
    ap.add_argument("--allowed-media-domains", type=origins, default=(),
                    help="a model that reads images: hosts whose http(s) picture links the server fetches (each "
                         "redirect checked too; '*': any public address), comma-separated or a JSON list (vLLM's "
                         "flag). Default: none, pictures come inline as data: URLs")
    ap.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                    help="a model that reads images: file:// picture links under DIR are read (vLLM's flag)")
    ap.add_argument("--max-images", type=int, default=RunnerConfig.max_images,
                    help="a model that reads images (LLaVA): pictures whose features stay on the devices, each held "
                         "while a request reads it, then reused least recently used first (a request finding every "
                         "one held gets a 429)")
    ap.add_argument("--flat-step", choices=("auto", "on", "off"), default="auto",
                    help="prompts, prompt chunks and the running streams' next tokens in one forward pass over a flat "
                         "batch of tokens (auto: with the pallas-gpu attention kernel; off: separate prefill and "
                         "decode calls, the CPU's faster way)")
    ap.add_argument("--sampler-branches", choices=("auto", "cond", "plain", "select"), default="auto",
                    help="how decode programs skip the sampler transforms no request in the batch wants: cond (a "
                         "conditional each), plain (also programs without them, for batches of greedy or "
                         "temperature-only requests), select (those, and programs computing every transform for the "
                         "rest). A GPU decides a conditional on the host after waiting for the device (auto: plain "
                         "on a GPU, else cond)")
    ap.add_argument("--logprobs-mode", choices=LOGPROBS_MODES, default="raw_logprobs",
                    help="what a drawn token's logprobs report (vLLM's): the model's distribution (raw_logprobs) or "
                         "its logits, or those of the distribution drawn from, after temperature, penalties, "
                         "truncation and the rest (processed_logprobs, processed_logits)")
    ap.add_argument("--speculative-ngram", type=int, default=0, metavar="K",
                    help="speculative decoding without a prediction: draft up to K tokens per step by n-gram lookup "
                         "in each request's prompt and output, and verify them in one pass (the tokens are the "
                         "same; the engine stops drafting when verifying costs more than it saves). 0 (the "
                         "default): off. A request's 'prediction' or 'speculation' drafts regardless")
    ap.add_argument("--num-speculative-tokens", "--draft-max", type=int, default=0, metavar="K",
                    help="the most drafted tokens a verify step scores per sequence (0: --speculative-ngram's K, "
                         "5 with a draft model, else 16)")
    ap.add_argument("--speculative-model", "--model-draft", "-md", default=None, metavar="MODEL",
                    help="speculative decoding with a draft model: a smaller model of the same tokenizer (catalog "
                         "name, HF folder or GGUF file) drafts each sequence's next K tokens greedily, and the model "
                         "verifies them in one pass (the tokens are the same as without it). Loaded as the model is "
                         "(dtype, quantization, attention, mesh); its KV pool is paged as the model's and comes out "
                         "of the same --kv-cache-gb")
    ap.add_argument("--speculative-config", type=json.loads, default=None, metavar="JSON",
                    help="vLLM's form of the above: {\"model\": MODEL, \"num_speculative_tokens\": K}, or "
                         "{\"method\": \"ngram\", \"num_speculative_tokens\": K}")
    ap.add_argument("--tensor-parallel-size", "-tp", "--tp", "--tp-size", dest="tp", type=int, default=1,
                    help="devices each layer is split over: heads, KV heads, MLP width (vLLM's flag)")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="mixtures of experts: split the experts over the tensor-parallel devices, each expert whole "
                         "on one, instead of splitting every expert's width (vLLM's flag)")
    ap.add_argument("--data-parallel-size", "-dp", "--dp-size", dest="dp", type=int, default=1,
                    help="shards the decode batch and the KV pages are split over, each with its own copy of the "
                         "weights (--max-num-seqs in all, --kv-cache-gb each); the mesh is dp x tp devices")
    ap.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="multi-host: process 0's address for jax.distributed (every process passes the same)")
    ap.add_argument("--num-processes", type=int, default=1, help="multi-host: processes in the group")
    ap.add_argument("--process-id", type=int, default=0,
                    help="multi-host: this process (0 serves HTTP and schedules; the others run its steps)")
    ap.add_argument("--heartbeat-timeout", type=int, default=10,
                    help="multi-host: seconds without a heartbeat before jax.distributed declares a process dead")
    ap.add_argument("--api-key", default=os.environ.get("SPARKLER_API_KEY"), metavar="KEY[,KEY...]",
                    help="require 'Authorization: Bearer KEY' (or x-api-key) with one of these keys, comma-separated "
                         "(llama.cpp's form)")
    ap.add_argument("--api-key-file", default=None, metavar="FILE",
                    help="more keys, one a line (llama.cpp's flag)")
    ap.add_argument("--ssl-certfile", "--ssl-cert-file", default=None, metavar="PEM",
                    help="serve HTTPS with this certificate (chain), with --ssl-keyfile (vLLM's and SGLang's flags; "
                         "llama.cpp's names too)")
    ap.add_argument("--ssl-keyfile", "--ssl-key-file", default=None, metavar="PEM", help="the certificate's key")
    ap.add_argument("--max-body-mb", type=float, default=8.0)
    ap.add_argument("--allowed-origins", type=origins, default=("*",),
                    help="origins whose web pages may call the API from a browser (CORS): '*' (the default), a "
                         "comma-separated list or a JSON list (vLLM's form), or '' for none")
    ap.add_argument("--max-queued-requests", type=int, default=None,
                    help="sequences (choices: n x prompts) waiting for a slot before new requests get 429 "
                         "(default: 4 x --max-num-seqs)")
    ap.add_argument("--request-timeout", type=float, default=None,
                    help="seconds from a request's arrival before it is aborted: 504 (408 while its body arrives)")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="on SIGTERM/SIGINT, seconds to let requests in flight finish before aborting them")
    ap.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one object per line")
    ap.add_argument("--chat-template", "--chat-template-file", default=None, metavar="FILE_OR_TEMPLATE",
                    help="render chats with this Jinja template instead of the model's: a file (.jinja, or JSON with "
                         "a chat_template field) or the template itself (vLLM's flag; llama.cpp's name too)")
    ap.add_argument("--reasoning-parser", choices=("auto", "none", *reasoning.PARSERS, reasoning.SEED_PARSER,
                                                   reasoning.MISTRAL_PARSER, reasoning.HARMONY, *cohere.NAMES),
                    default="auto", help="split <think>...</think> (Seed-OSS's <seed:think> blocks: seed_oss; "
                    "Magistral's [THINK] blocks: mistral; "
                    "gpt-oss's analysis channel: openai_gptoss; "
                    "Command R7B's and Command A's blocks: cohere_command3, cohere_command4) into reasoning_content "
                    "(auto: by what the chat template writes)")
    ap.add_argument("--responses-db", default=None, metavar="PATH",
                    help="SQLite file of stored /v1/responses (default: $SPARKLER_CACHE/responses.sqlite)")
    ap.add_argument("--batch-concurrency", type=int, default=0,
                    help="/v1/batches: a batch's requests in flight at once (0: --max-num-seqs)")
    ap.add_argument("--batch-priority", type=int, default=1,
                    help="under --scheduling-policy priority: the priority of a batch's requests that name none (1: "
                         "after other clients' requests at the default 0)")
    ap.add_argument("--max-file-mb", type=float, default=200.0, help="/v1/files: the largest upload")
    ap.add_argument("--files-dir", default=None, metavar="DIR",
                    help="where /v1/files, /v1/batches and /v1/messages/batches keep their files and records, so they "
                         "survive a restart and a batch a shutdown stopped goes on at the next start (default: "
                         "$SPARKLER_CACHE/files; '': a temporary folder, removed at shutdown)")
    ap.add_argument("--profiler-dir", default=None, metavar="DIR",
                    help="where POST /start_profile writes a jax.profiler trace unless its body names an output_dir "
                         "(vLLM's VLLM_TORCH_PROFILER_DIR, SGLang's SGLANG_TORCH_PROFILER_DIR)")
    ap.add_argument("--warmup", choices=("basic", "full", "none"), default="basic",
                    help="compile at start: the common shapes (basic), every decode and prefill shape (full: minutes "
                         "the first time, seconds once the caches hold them), or nothing. The server answers once a "
                         "first request's shapes are ready and compiles the rest behind; a request that needs one "
                         "still compiling waits for it")
    ap.add_argument("--enable-lora", action="store_true",
                    help="hold LoRA adapters beside the model (--lora-modules, and /v1/load_lora_adapter at run time); "
                         "a request names one as its model")
    ap.add_argument("--lora-modules", nargs="+", type=_module, default=[], metavar="NAME=PATH",
                    help="LoRA adapters (PEFT folders, or GGUF adapter files) to serve under those names (implies "
                         "--enable-lora); vLLM's JSON form '{\"name\": ..., \"path\": ...}' too")
    ap.add_argument("--lora", action="append", type=_paths, default=[], metavar="FNAME[,FNAME...]",
                    help="llama.cpp's: LoRA adapters (GGUF adapter files, as convert_lora_to_gguf.py writes, or "
                         "PEFT folders) served under their files' names (implies --enable-lora; may be repeated); "
                         "requests that name no adapter run on every one given at once, unless "
                         "--lora-init-without-apply")
    ap.add_argument("--lora-scaled", dest="lora", action="append", type=_scaled, metavar="FNAME:SCALE[,...]",
                    help="llama.cpp's: as --lora, each adapter at SCALE times the scale it was trained with (for "
                         "requests naming none, until POST /lora-adapters changes it)")
    ap.add_argument("--lora-init-without-apply", action="store_true",
                    help="llama.cpp's: --lora and --lora-scaled adapters are loaded, and requests that name none run "
                         "on the model until POST /lora-adapters picks some")
    ap.add_argument("--max-loras", type=int, default=None,
                    help="with --enable-lora: LoRA adapters held at once, each in one batch with the others "
                         "(default: 4, or as many as --lora-modules, --lora and --lora-scaled name)")
    ap.add_argument("--max-lora-rank", type=int, default=None,
                    help="with --enable-lora: the largest LoRA rank an adapter may have (default 16)")
    ap.add_argument("--pooling", choices=("auto", "last", "mean", "cls"), default="auto",
                    help="how /v1/embeddings pools the final hidden states: as the model folder asks "
                         "(sentence-transformers' modules, a GGUF's pooling type; else last: auto), the last "
                         "token's, their mean or the first's")
    _ignored(ap)
    args = ap.parse_args(argv)
    if args.ignored_flash_attn not in (None, True, "on", "off", "auto"):  # llama.cpp's older bare -fa, then the model
        args.model_tag, args.ignored_flash_attn = args.model_tag or args.ignored_flash_attn, True
    if args.alias is not None:
        args.served_name = [args.alias, *(args.served_name or [])]
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        ap.error(f"the model is named twice: {args.model_tag} and --model {args.model}")
    args.model = args.model_tag or args.model or DEFAULT_MODEL
    args.quantization = "fp8" if args.quantization == "w8a8_fp8" else args.quantization  # SGLang's name for it
    args.api_keys = tuple(k.strip() for k in (args.api_key or "").split(",") if k.strip())
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file) as f:
                args.api_keys += tuple(k.strip() for k in f if k.strip())
        except OSError as e:
            ap.error(f"--api-key-file: {e}")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        ap.error("--ssl-certfile and --ssl-keyfile go together")
    if set(args.default_chat_template_kwargs) & set(TEMPLATE_OWN):
        ap.error(f"--default-chat-template-kwargs must not set {', '.join(TEMPLATE_OWN)}")
    if args.generation_config not in ("auto", "vllm") and not os.path.isfile(
            os.path.join(args.generation_config, "generation_config.json")):
        ap.error(f"--generation-config {args.generation_config}: no generation_config.json there")
    args.lora = [x for xs in args.lora for x in xs]  # (path, scale), in the order given: llama.cpp's ids
    args.lora_modules += [(os.path.basename(path.rstrip("/")).removesuffix(".gguf"), path) for path, _ in args.lora]
    # llama.cpp applies its --lora adapters to every request that names none, each at its scale (0: none)
    named = args.lora_modules[len(args.lora_modules) - len(args.lora):]
    applied = {} if args.lora_init_without_apply else {
        name: scale for (name, _), (_, scale) in zip(named, args.lora) if scale != 0}
    args.lora_default = applied or None
    args.enable_lora |= bool(args.lora_modules)
    if not args.enable_lora and (args.max_loras is not None or args.max_lora_rank is not None):
        ap.error("--max-loras and --max-lora-rank need --enable-lora (or --lora-modules)")
    args.max_loras = max(4, len(args.lora_modules)) if args.max_loras is None else args.max_loras
    args.max_lora_rank = 16 if args.max_lora_rank is None else args.max_lora_rank
    if args.enable_lora and (args.max_loras < 1 or args.max_lora_rank < 1):
        ap.error("--max-loras and --max-lora-rank must be at least 1")
    if args.max_images < 1:
        ap.error("--max-images must be at least 1")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        ap.error(f"--allowed-local-media-path {args.allowed_local_media_path}: no such folder")
    if len(args.lora_modules) > args.max_loras:
        ap.error(f"--lora-modules, --lora and --lora-scaled name {len(args.lora_modules)} adapters; --max-loras is "
                 f"{args.max_loras}")
    if args.speculative_ngram < 0 or args.num_speculative_tokens < 0:
        ap.error("--speculative-ngram and --num-speculative-tokens must be >= 0")
    if args.speculative_config is not None:
        if args.speculative_model or args.speculative_ngram:
            ap.error("--speculative-config or --speculative-model / --speculative-ngram, not both")
        try:
            model, spec = draft_model.from_config(args.speculative_config)
        except (ValueError, TypeError) as e:
            ap.error(str(e))
        args.speculative_model = model
        args.speculative_ngram = 0 if model is not None else spec["draft_tokens"]
        args.num_speculative_tokens = args.num_speculative_tokens or spec["draft_tokens"]
    if args.speculative_model and args.speculative_ngram:
        ap.error("--speculative-model or --speculative-ngram, not both")
    if args.speculative_model and args.num_processes > 1:
        ap.error("a draft model is not served across processes yet")
    if args.speculative_model and args.dp > 1:
        ap.error("a draft model runs on one data shard (-dp 1)")
    return args


def _ignored(ap: argparse.ArgumentParser) -> None:
    """Flags of vLLM, SGLang and llama.cpp's server that launch commands copied from them carry and that change
    nothing here, each with why: accepted and logged, so those commands start."""
    group = ap.add_argument_group("accepted from other servers, with nothing to change here")
    for names, takes, why in IGNORED:
        takes = dict(action="store_const", const=True) if not takes else dict(
            nargs=takes, metavar="X", **({"const": True} if takes == "?" else {}))
        group.add_argument(*names, dest="ignored_" + names[0].lstrip("-").replace("-", "_"), default=None,
                           help=why, **takes)


def ignored(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`(flag, why)` for each accepted flag that does nothing here and was given."""
    return [(names[0], why) for names, _, why in IGNORED
            if getattr(args, "ignored_" + names[0].lstrip("-").replace("-", "_")) is not None]


def _object(text: str) -> dict:
    """A JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _generation(text: str) -> dict:
    """`--override-generation-config`: a JSON object of numbers under `GENERATION`'s names."""
    value = _object(text)
    unknown = sorted(set(value) - set(GENERATION))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown settings {unknown}; these are: {', '.join(GENERATION)}")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (k in ("top_k", "max_new_tokens")
                                                                       and not isinstance(v, int)):
            raise argparse.ArgumentTypeError(f"{k} must be a number (top_k and max_new_tokens integers), got {v!r}")
    if value.get("top_k") == -1:  # vLLM's "no top-k"
        value["top_k"] = 0
    settings = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in value.items()}
    try:  # the ranges a request's own values must keep, so that the defaults never make a request a 400
        SamplingParams(**settings).validate()
        if settings.get("max_tokens") == 0:
            raise InvalidRequest("max_new_tokens must be >= 1", "max_new_tokens")
    except InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def generation_config(args: argparse.Namespace, model_config: dict) -> dict:
    """The default sampling settings the flags ask for over a model's `generation_config` (`--generation-config`,
    then `--override-generation-config`); its other keys (EOS ids) are kept."""
    kept = {k: v for k, v in model_config.items() if k not in GENERATION}
    if args.generation_config == "auto":
        base = model_config
    elif args.generation_config == "vllm":
        base = kept
    else:
        with open(os.path.join(args.generation_config, "generation_config.json")) as f:
            base = {**kept, **{k: v for k, v in json.load(f).items() if k in GENERATION}}
    return {**base, **args.override_generation_config}


def _share(text: str) -> float:
    """A share in (0, 1]."""
    try:
        share = float(text)
    except ValueError:
        share = 0.0
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text!r}")
    return share


def _module(text: str) -> tuple[str, str]:
    """`NAME=PATH`, or vLLM's JSON form `{"name": NAME, "path": PATH, ...}`."""
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError:
            spec = None
        name, path = (spec.get("name"), spec.get("path")) if isinstance(spec, dict) else (None, None)
    else:
        name, _, path = text.partition("=")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH or {{\"name\": ..., \"path\": ...}}, got {text!r}")
    return name, path


def _paths(text: str) -> list[tuple[str, float]]:
    """llama.cpp's `--lora FNAME[,FNAME...]`: each file at scale 1."""
    paths = text.split(",")
    if not all(paths):
        raise argparse.ArgumentTypeError(f"expected FNAME[,FNAME...], got {text!r}")
    return [(path, 1.0) for path in paths]


def _scaled(text: str) -> list[tuple[str, float]]:
    """llama.cpp's `--lora-scaled FNAME:SCALE[,FNAME:SCALE...]` (a number after each file's last colon)."""
    out = []
    for item in text.split(","):
        path, _, scale = item.rpartition(":")
        try:
            if not path or not lora.scale_ok(value := float(scale)):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected FNAME:SCALE[,FNAME:SCALE...] (a scale within "
                                             f"±{lora.MAX_SCALE:g}), got {text!r}") from None
        out.append((path, value))
    return out


def _sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def load(args: argparse.Namespace, path: str | None = None, like=None):
    """The model the flags name, in their dtype, attention backend and layer form; or the one at `path`, loaded as
    `like` was (its dtype and quantization as resolved: new weights to serve)."""
    model = load_model(path or args.model, dtype=like.cfg.dtype if like else args.dtype, tp=args.tp,
                       attention=args.attention_backend, scan=args.scan_layers,
                       quantization=like.cfg.quantization if like else args.quantization, dp=args.dp,
                       matmul=args.matmul_backend, expert_parallel=args.enable_expert_parallel,
                       kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
                       hf_overrides=args.hf_overrides)
    if args.served_name:
        model.name = args.served_name[0]
    model.generation_config = generation_config(args, model.generation_config)
    if args.default_chat_template_kwargs and model.tokenizer is not None:
        model.tokenizer.template_defaults = dict(args.default_chat_template_kwargs)
    if args.enable_lora:
        if args.num_processes > 1:
            raise ValueError("LoRA adapters are not served across processes yet")
        model = lora.attach(model, args.max_loras, args.max_lora_rank)
    return model


def load_draft(args: argparse.Namespace):
    """The draft model `--speculative-model` names (None: none), loaded as the model is."""
    if not args.speculative_model:
        return None
    return load_model(args.speculative_model, dtype=args.dtype, tp=args.tp, attention=args.attention_backend,
                      scan=args.scan_layers, quantization=args.quantization, dp=args.dp, matmul=args.matmul_backend,
                      kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len)


def runner_config(args: argparse.Namespace) -> RunnerConfig:
    """The engine's settings from the flags (0: the platform's default)."""
    tuned = platform_defaults(jax.devices()[0].platform)
    return RunnerConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                        kv_cache_gb=args.kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization,
                        page_size=args.page_size,
                        decode_steps=args.decode_steps or tuned["decode_steps"],
                        max_prefill_tokens=args.max_prefill_tokens or tuned["max_prefill_tokens"],
                        draft_tokens=args.num_speculative_tokens or args.speculative_ngram or (
                            draft_model.DEFAULT_TOKENS if args.speculative_model else RunnerConfig.draft_tokens),
                        ngram=args.speculative_ngram > 0, decode_batch_sizes=args.decode_batch_sizes,
                        flat_step={"auto": None, "on": True, "off": False}[args.flat_step],
                        sampler_branches=None if args.sampler_branches == "auto" else args.sampler_branches,
                        tune_kernels=args.tune_kernels, scheduling_policy=args.scheduling_policy,
                        max_images=args.max_images, logprobs_mode=args.logprobs_mode)


class Throttled(logging.Filter):
    """Lets a log message that starts with `prefix` through once per `every` seconds. Out of file descriptors,
    asyncio logs every failed accept with its traceback: 325 MB in 100 s, with the event loop busy writing it."""

    def __init__(self, prefix: str, every: float = 10.0):
        super().__init__()
        self.prefix, self.every, self.last = prefix, every, -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to log the record."""
        if not str(record.msg).startswith(self.prefix):
            return True
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return True


ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message (selector_events)


class Malformed(logging.Filter):
    """aiohttp answers a request it cannot parse (a bad header, chunk size or method) with its 400 and logs it as an
    ERROR with a traceback: the client's fault, so one WARNING line instead, at most once per `every` seconds."""

    def __init__(self, every: float = 10.0):
        super().__init__()
        self.every, self.last = every, -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to log the record (rewritten where it is a parse error)."""
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, BadHttpMessage):
            return True
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        said = str(error.message).strip().splitlines()
        record.msg, record.args = "%s: a malformed request, answered 400 (%s)", (record.getMessage(), said[0] if said
                                                                                 else error.code)
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.WARNING, "WARNING", None, None
        return True


def raise_open_files() -> None:
    """Raise the soft limit on open files to the hard one (at most `OPEN_FILES`), as vLLM does: a connection is a
    file, and at systemd's default of 1,024 a thousand idle clients would lock everyone else out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv=None, prog: str = "python -m server") -> None:
    """Load, warm up, serve until interrupted."""
    args = parse_args(argv, prog)
    context = tls(args)  # a bad certificate stops the start before the model loads
    built = build(args)
    if built is None:  # a process of a group that follows process 0
        return
    server, what = built
    try:
        asyncio.run(serve(server, args.host, args.port, what, args.drain_timeout, context))
    finally:
        engine = server.aengine.engine
        if engine.background is not None:
            engine.background.cancel()
        if args.num_processes > 1:
            engine.runner.close()
    log.info("sparkler: stopped")


def build(args: argparse.Namespace) -> tuple[Server, str] | None:
    """Set up logging and the caches, load the model, start the engine and warm it up: the `Server` and a line on
    what it runs (None in a process of a group that follows process 0, once process 0 stops)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.log_format == "json":
        logging.getLogger().handlers[0].setFormatter(JsonFormatter())
    logging.getLogger("sparkler").setLevel(logging.INFO)
    raise_open_files()
    logging.getLogger("asyncio").addFilter(Throttled(ACCEPT_FAILED))
    logging.getLogger("aiohttp.server").addFilter(Malformed())
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.gpu_memory_utilization))  # before JAX's GPU
    try:  # before a group forms; the processes that follow process 0 serve no chats
        template = None if args.chat_template is None or args.process_id else read_template(args.chat_template)
    except (OSError, ValueError) as e:  # unreadable, or not a template that compiles
        raise SystemExit(f"sparkler: --chat-template: {e}") from None
    group = args.num_processes > 1  # client starts (at the first device query)
    if group:
        if not args.coordinator or not 0 <= args.process_id < args.num_processes:
            raise SystemExit("sparkler: --num-processes > 1 needs --coordinator HOST:PORT and a --process-id in "
                             f"[0, {args.num_processes})")
        multihost.initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
        if args.dp * args.tp != jax.device_count():  # every process must hold a part of the mesh
            raise SystemExit(f"sparkler: across processes the mesh must cover every device: data-parallel size "
                             f"{args.dp} x tensor-parallel size {args.tp} != the group's {jax.device_count()} devices")
    for flag, why in ignored(args):
        log.info("sparkler: %s has nothing to change here: %s", flag, why)
    use_caches(cache_root())
    t0 = time.monotonic()
    try:
        model, draft = load(args), load_draft(args)
    except ValueError as e:  # a mesh that does not fit, an unknown quantization, ...
        raise SystemExit(f"sparkler: {e}") from None
    if template is not None:
        if model.tokenizer is None:
            raise SystemExit("sparkler: --chat-template needs the model's tokenizer")
        model.tokenizer.use_template(template)
    t1 = time.monotonic()
    try:
        engine = Engine(model, runner_config(args), draft=draft)
    except ValueError as e:  # a pool that does not fit, a context it cannot hold, ...
        raise SystemExit(f"sparkler: {e}") from None
    for name, path in args.lora_modules:
        try:
            if name == model.name:
                raise ValueError("that is the served model's name")
            engine.load_adapter(name, lora.read(path, model))
        except ValueError as e:  # not an adapter of this model, a rank over --max-lora-rank, a name given twice
            flag = "--lora" if path in [p for p, _ in args.lora] else "--lora-modules"
            raise SystemExit(f"sparkler: {flag} {name}: {e}") from None
    t2 = time.monotonic()
    if args.warmup != "none":  # alone, serve once a first request's shapes are ready and compile the rest behind
        engine.warmup(full=args.warmup == "full", background=not group)
    t3 = time.monotonic()
    if (failed := engine.runner.pool_error()) is not None:  # zeroing runs behind the warm-up; report it at start
        raise SystemExit(f"sparkler: the KV pool ({engine.runner.rc.kv_cache_gb:.1f} GiB) could not be allocated: "
                         f"{failed}; lower --kv-cache-gb or --gpu-memory-utilization")
    config = (args.model, args.dtype, model.cfg.quantization, model.cfg.matmul, args.tp, args.dp,
              dataclasses.astuple(engine.runner.rc))
    if group and args.process_id:  # run process 0's steps until it stops
        log.info("sparkler: process %d of %d following process 0 (%d local devices)", args.process_id,
                 args.num_processes, jax.local_device_count())
        multihost.follow(engine.runner, multihost.Channel(), config)
        return None
    if group:
        engine.runner = multihost.Leader(engine.runner, multihost.Channel())
        engine.runner.check(config)
    log.info("sparkler: quantization %s (%s)", model.cfg.quantization, model.quantization_why)
    log.info("sparkler: %s on %s (%s%s, %s attention, %s layers): load %.1f s, KV pool %.1f s, compile %.1f s "
             "(%d shapes traced; program store %d loaded, %d saved; JAX's cache %d hits, %d misses)", model.name,
             jax.devices()[0].platform,
             model.cfg.dtype + (f", KV cache {model.cfg.kv_dtype}" if model.cfg.kv_dtype else ""),
             f", {model.cfg.quantization} weights ({model.cfg.matmul} products)"
             if model.cfg.quantization != "none" else ", full-precision weights",
             model.module.backend, "scanned" if model.module.scan else "unrolled", t1 - t0, t2 - t1,
             t3 - t2, engine.runner.compiles, PROGRAMS["loaded"], PROGRAMS["saved"], PERSISTENT["hits"],
             PERSISTENT["misses"])
    if (fit := engine.runner.fit) is not None:  # the bound kept for working memory, against the programs' own
        log.info("sparkler: KV pool %s; the programs compiled so far need at most %.2f GiB of working memory",
                 fit if not args.kv_cache_gb else f"{args.kv_cache_gb:.1f} GiB as asked (the default here: {fit})",
                 PROGRAMS["working"] / (1 << 30))
        if PROGRAMS["working"] > fit.reserve:
            log.warning("sparkler: a compiled program needs %.1f GiB of working memory, more than the %.1f GiB kept "
                        "for it: lower --gpu-memory-utilization or pass --kv-cache-gb", PROGRAMS["working"] / (1 << 30),
                        fit.reserve / (1 << 30))
    server = Server(model, AsyncEngine(engine), api_key=args.api_keys, max_body_mb=args.max_body_mb,
                    aliases=tuple(args.served_name[1:]) if args.served_name else (),
                    loader=None if group else lambda path: load(args, path, model),  # other hosts keep theirs
                    allowed_origins=args.allowed_origins,
                    max_queued=args.max_queued_requests, request_timeout=args.request_timeout,
                    reasoning_parser=args.reasoning_parser, responses_db=args.responses_db,
                    pooling=None if args.pooling == "auto" else args.pooling,
                    batch_concurrency=args.batch_concurrency, max_file_mb=args.max_file_mb,
                    batch_priority=args.batch_priority,
                    files_dir=os.path.join(cache_root(), "files") if args.files_dir is None else args.files_dir,
                    profiler_dir=args.profiler_dir,
                    media=Media(args.allowed_media_domains, args.allowed_local_media_path,
                                max_images=args.max_images))
    if args.lora_default is not None:
        server.lora_default = {engine.adapters[name].id: scale for name, scale in args.lora_default.items()}
    what = (f"{engine.runner.slots} slots, context {engine.max_len}, {engine.runner.dp} x "
            f"{engine.sched.pools[0].capacity} KV pages of {engine.page_size}, "
            f"mesh data {engine.runner.dp} x tp {args.tp}")
    return server, what


def tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context `--ssl-certfile` and `--ssl-keyfile` ask for (None: plain HTTP); a file that is not a
    certificate and its key stops the start with the reason."""
    if args.ssl_certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    except (OSError, ssl.SSLError) as e:
        raise SystemExit(f"sparkler: --ssl-certfile / --ssl-keyfile: {e}") from None
    return context


async def serve(server: Server, host: str, port: int, what: str = "", drain_timeout: float = 30.0,
                ssl_context: ssl.SSLContext | None = None) -> None:
    """Listen on host:port (0 picks a free port; HTTPS with `ssl_context`), log one ready line with the bound
    address, and serve until SIGTERM or SIGINT; then drain: refuse new requests (503), let those in flight finish for
    up to `drain_timeout` seconds, end the rest with finish_reason "error", and return. A second signal exits at
    once."""
    # Idle connections close after 75 s (nginx's keep-alive), a silent new one too; a handler still running once the
    # drain is over (a body that stopped arriving) is cancelled after SHUTDOWN_GRACE seconds.
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, keepalive_timeout=KEEPALIVE,
                           shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    bound = runner.addresses[0]
    log.info("sparkler: ready on %s://%s:%d (%s)", "https" if ssl_context else "http", bound[0], bound[1], what)
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if server.draining:
            log.warning("sparkler: %s again; exiting now", sig.name)
            os._exit(1)
        log.info("sparkler: %s; draining %d requests (up to %.0f s)", sig.name, server.active, drain_timeout)
        server.draining = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
        await server.batches.stop()  # batches send no more: they go on at the next start (or end cancelled)
        if server.holding is not None or server.engine.held:  # paused: the calls held finish (or fail at the end)
            await server.continue_generation()
        deadline = time.monotonic() + drain_timeout
        ended = False
        while (server.active or server.engine.has_work()) and time.monotonic() < deadline:
            if server.engine.asleep and server.engine.has_work() and not server.updating.locked() and not ended:
                server.aengine.fail_everything()  # queued while asleep: it cannot run until a wake-up now
                ended = True  # (the calls that need no engine go on draining)
            await asyncio.sleep(0.05)
        if server.active or server.engine.has_work():
            log.warning("sparkler: drain timeout; ending %d requests with an error", server.active)
            server.aengine.fail_everything()
            end = time.monotonic() + 10
            while server.active > server.unadmitted and time.monotonic() < end:  # admitted calls' error events
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
        server.close()


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and a request's fields when it has them."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON."""
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


if __name__ == "__main__":
    main()
