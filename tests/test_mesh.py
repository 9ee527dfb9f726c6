"""Tensor and data parallelism through the HTTP server on 4 virtual CPU devices: T = 4 and D = 4 give the
single-device tokens (greedy and seeded) for 10 concurrent requests (12 choices, n = 2 among them) on 16 slots, and
its embeddings (`/v1/embeddings`) the single device's vectors; so does the mixed mesh, T = 2 x D = 2, over two
processes of 2 virtual devices each (jax.distributed on loopback, gloo collectives; it has the shardings of one
process with both axes, which is not run again), and killing process 1 makes process 0 exit with a clear line; a mesh
larger than the devices, or not dividing them, is a clear start-up error.

The model is a tiny random Llama folder with the default model's tokenizer (so text round-trips): 4 query heads and 2
KV heads, so T = 4 splits the query heads and keeps the KV heads whole, T = 2 splits both, and the MLP is split by
either. The packaged model's 9 and 3 heads divide neither, and its float32 steps on 4 virtual devices of a 2-core CPU
were ~3 minutes of the cold suite; a mesh's tokens do not depend on the weights' size.

Under tensor parallelism the projections after attention and in the MLP sum partial products across devices (an
all-reduce), so float32 logits differ from one device's in the last bits. A seeded draw whose uniform falls within
that distance of a boundary between two tokens can then pick the neighbour (seen once in a few runs, at the 6th of
12 tokens): seeded outputs must match in all but one of 5 requests, greedy ones in all."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import device_flags

pytestmark = pytest.mark.quick_compile  # a tiny random model, served by processes: XLA optimizations off (conftest)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 slots: every mesh seats the 12 choices at once; one batch size per shard: fewer programs to compile. Every mesh
# runs these flags as `python -m server` reads them (`server.__main__.runner_config`).
ENGINE = ["--max-num-seqs", "16", "--max-model-len", "256", "--kv-cache-gb", "0.1", "--decode-steps", "4",
          "--decode-batch-sizes", "16"]
SERVE = r"""
import json, os, sys
import openai
from conftest import live_server
from engine.compile import use_caches
from models import load_model
from models.loading.source import cache_root
from server.__main__ import parse_args, runner_config
from test_mesh import ENGINE, ask_all, embed_all, weight_layout

use_caches(cache_root())
out = {}
for dp, tp in json.loads(sys.argv[1]):
    model = load_model(sys.argv[2], tp=tp, dp=dp)
    for api in live_server(model, runner_config(parse_args(ENGINE))):
        key = f"{dp}x{tp}"
        out[key] = ask_all(api.url, model.name)
        out[key + "-embed"] = embed_all(api.url, model.name)
        if dp > 1:  # a prompt seen before goes to the shard whose prefix cache holds it, not the emptiest one
            client = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0)
            ask = lambda p, **kw: client.completions.create(model=model.name, prompt=p, temperature=0,
                                                            **{"max_tokens": 2, **kw})
            prompt = "A long shared preamble about the weather in spring, " * 16
            first = ask(prompt + "0")  # every shard is empty: it goes to shard 0
            busy = ask("Something else entirely", max_tokens=120, stream=True, extra_body={"ignore_eos": True})
            next(iter(busy))  # running on shard 0 too (a tie again), so shard 0 now has the fewest free pages
            second = ask(prompt + "1")
            out[key + "-cached"] = [r.usage.prompt_tokens_details.cached_tokens for r in (first, second)]
            busy.close()  # its work is done: closing the stream aborts it
        out[key + "-mesh"] = dict(**weight_layout(model),
                                  pool=str(api.engine.runner.cache.k.sharding.spec),
                                  prompts_per_shard=[pool.queried for pool in api.engine.sched.pools])
print(json.dumps(out))
"""


REQUESTS = 10


def weight_layout(model) -> dict:
    """How an MLP weight lies on the mesh: the devices holding it, and the pieces it is split into."""
    weight = model.params["params"]["layers"]["mlp"]["up_proj"]["weight"]
    piece = int(np.prod(weight.sharding.shard_shape(weight.shape)))
    return dict(weight_devices=len(weight.sharding.device_set), weight_split=weight.size // piece)


def ask_all(url: str, model: str) -> list:
    """10 concurrent completions of 8 tokens (odd ones greedy, even ones seeded at temperature 0.9, every fifth with
    n = 2: 12 choices; two greedy ones under a grammar, so steps draw under masks); each request's choices' token
    ids."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

    def ask(i):
        grammar = {"response_format": {"type": "grammar", "grammar": "root ::= [a-z ]{40,60}"}} if i % 4 == 3 else {}
        r = client.completions.create(model=model, prompt=f"Item {i}: the {'cat dog sun'.split()[i % 3]}" + " and" * i,
                                      max_tokens=8, temperature=0 if i % 2 else 0.9, seed=i, n=1 + (i % 5 == 0),
                                      extra_body={"ignore_eos": True, "return_token_ids": True, **grammar})
        return [c.model_extra["token_ids"] for c in sorted(r.choices, key=lambda c: c.index)]

    with ThreadPoolExecutor(REQUESTS) as ex:
        return list(ex.map(ask, range(REQUESTS)))


def embed_all(url: str, model: str) -> list[list[float]]:
    """`/v1/embeddings` of three texts of different lengths."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    texts = ["The cat sat on the mat.", "Vectors of text", "and so on " * 30]
    return [d.embedding for d in client.embeddings.create(model=model, input=texts, encoding_format="float").data]


def assert_same_vectors(got: list, one: list, what: str) -> None:
    """Embeddings equal to one device's up to the order of the sums."""
    assert np.abs(np.asarray(got) - np.asarray(one)).max() < 1e-4, what


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=device_flags(devices), PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def _run(code: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=_env(4), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm) -> str:
    """A tiny random Llama folder (float32) with the default model's tokenizer: 2 layers of 4 query and 2 KV heads.
    Its weights are large enough that each prompt's tokens differ and follow its context (at 0.08 a layer's output
    was lost beside the embedding: every prompt repeated one token), its logits peaked enough that a seeded draw
    mostly keeps the likeliest tokens."""
    import shutil

    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn_like(p) * (1.0 if "embed" in name else 0.3))
    model.float().save_pretrained(path, safe_serialization=True)
    for name in os.listdir(smollm.tokenizer.folder):
        shutil.copy(os.path.join(smollm.tokenizer.folder, name), path)
    return str(path)


@pytest.fixture(scope="module")
def served(folder) -> dict:
    """Each mesh's tokens (and layout) through the HTTP server, one process with 4 virtual devices; and one device's,
    served from this process on the same settings."""
    from conftest import live_server
    from models import load_model
    from server.__main__ import parse_args, runner_config

    out = _run(SERVE, "[[1, 4], [4, 1]]", folder)  # (data, tp); T = 2 x D = 2 runs over two processes below
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    model = load_model(folder)
    for api in live_server(model, runner_config(parse_args(ENGINE))):
        got["1x1"] = ask_all(api.url, model.name)
        got["1x1-embed"] = embed_all(api.url, model.name)
    got["1x1-mesh"] = weight_layout(model)
    got["name"] = model.name
    return got


def assert_same_tokens(got: list, one: list, what: str) -> None:
    """Greedy requests equal to one device's; seeded ones too, but for at most one (see the module docstring)."""
    greedy = [i for i in range(REQUESTS) if i % 2]
    seeded = [i for i in range(REQUESTS) if not i % 2]
    assert [got[i] for i in greedy] == [one[i] for i in greedy], what
    assert sum(got[i] == one[i] for i in seeded) >= len(seeded) - 1, (what, one, got)


def test_mesh_serving_gives_the_single_device_tokens(served):
    one = served["1x1"]
    for mesh in ("1x4", "4x1"):
        assert_same_tokens(served[mesh], one, mesh)
        assert_same_vectors(served[mesh + "-embed"], served["1x1-embed"], mesh)
    assert all(len(t) == 8 for choices in one for t in choices) and len(one[0]) == 2
    assert len({t for choices in one for c in choices for t in c}) > 40  # tokens that follow each prompt, not one
    layout = {m: (served[m + "-mesh"]["weight_devices"], served[m + "-mesh"]["weight_split"])
              for m in ("1x1", "1x4", "4x1")}
    assert layout == {"1x1": (1, 1), "1x4": (4, 4), "4x1": (4, 1)}  # split over tp, copied over data
    assert served["4x1-mesh"]["pool"] == "P(None, 'data')"
    first, second = served["4x1-cached"]
    assert first == 0 and second >= 128, (first, second)
    per = served["4x1-mesh"]["prompts_per_shard"]  # the scheduler spread the requests over every shard
    assert len(per) == 4 and all(n > 0 for n in per), per


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_serve_the_single_device_tokens_and_a_lost_process_ends_the_group(served, folder, tmp_path):
    coordinator, port = _free_port(), _free_port()
    group = ["--model", folder, "--quantization", "none", "--coordinator", f"127.0.0.1:{coordinator}",
             "--num-processes", "2", "-tp", "2", "-dp", "2",
             "--heartbeat-timeout", "5", "--warmup", "none", *ENGINE]
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "server", *group, "--process-id", str(i), "--port", str(port)],
                              env=_env(2), cwd=ROOT, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + 600
        while True:  # process 0 answers /health once the group is up
            assert procs[0].poll() is None and procs[1].poll() is None, (tmp_path / "p0.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the group never came up"
                time.sleep(1)
        assert_same_tokens(ask_all(f"http://127.0.0.1:{port}", served["name"]), served["1x1"], "2 processes, 2x2")
        assert_same_vectors(embed_all(f"http://127.0.0.1:{port}", served["name"]), served["1x1-embed"], "2 processes")
        procs[1].send_signal(signal.SIGKILL)
        t = time.monotonic()
        rc = procs[0].wait(timeout=60)  # no hang: process 0 notices within seconds (an idle leader pings)
        log = (tmp_path / "p0.log").read_text()
        assert rc != 0 and "the process group must be restarted" in log, log[-3000:]
        assert time.monotonic() - t < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


_LEADER = """
import json, sys
import jax
from engine import multihost
multihost.initialize(sys.argv[1], 2, int(sys.argv[2]))
made = []
out = multihost.from_leader(lambda: made.append(1) or {"16": {"kernel": "rows"}, "by": jax.process_index()})
try:
    multihost.from_leader(lambda: 1 / 0)
    err = None
except RuntimeError as e:
    err = str(e)
from engine import memory
from models import Model, ModelConfig, build, init_params
from models.sharding import make_mesh
cfg = ModelConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
                               intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256))
module = build(cfg, "xla")
model = Model("tiny", cfg, module, init_params(module, 0), make_mesh(dp=2), None, {}, (), "random")
gib = 1 << 30  # 85 GiB left on process 1, 88 on process 0: past an int32's bytes
fit = memory.default_pool(model, 64, 8, None, 1.0, [{"bytes_limit": 90 * gib,
                                                     "bytes_in_use": (2 + 3 * jax.process_index()) * gib}])
print(json.dumps({"out": out, "made": len(made), "err": err, "in_use": fit.in_use / gib}))
"""


def test_one_answer_for_the_group_made_by_process_0():
    """`multihost.from_leader` (how the group shares the decode kernel's plan): process 0 alone makes the value and
    every process gets it; an exception there is raised on both, so no process waits for ever. And
    `memory.default_pool` sizes one pool for the group: every process takes the least left on any (85 GiB here)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(_env(1), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _LEADER, coordinator, str(i)], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [g["out"] for g in got] == [{"16": {"kernel": "rows"}, "by": 0}] * 2
    assert [g["made"] for g in got] == [1, 0]
    assert all("ZeroDivisionError" in g["err"] for g in got)
    assert [g["in_use"] for g in got] == [5.0, 5.0]


@pytest.mark.parametrize("flags,needle", [(["--tensor-parallel-size", "8"], "does not fit the 4 visible"),
                                          (["-tp", "2", "--data-parallel-size", "4"], "= 8 devices does not fit"),
                                          (["--tensor-parallel-size", "3"], "does not divide the 4 visible"),
                                          (["--tensor-parallel-size", "0"], "must be >= 1")])
def test_a_mesh_that_does_not_fit_is_a_start_up_error(flags, needle):
    out = _run("import sys; from server.__main__ import main; main(sys.argv[1:])", *flags, "--port", "0",
               timeout=300)
    assert out.returncode != 0 and needle in out.stderr, out.stderr[-2000:]
