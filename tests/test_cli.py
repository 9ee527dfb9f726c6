"""The `sparkler` command in subprocesses: `serve` (answering before its background compilation is done, counted
from its own log and /health, and compiling nothing more once it is done), `chat` with piped input against it,
`models`, and each command's `--help`."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import unique_prefix

from server.child import ROOT, spawn

SPARKLER = os.path.join(os.path.dirname(sys.executable), "sparkler")
KEY = "cli-key"
pytestmark = pytest.mark.skipif(not os.path.exists(SPARKLER), reason="the sparkler script is not installed "
                                "(pip install -e .)")


def run(*args: str, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SPARKLER, *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.load(r)


SMOL_SYSTEM, OUR_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "Be brief."


@pytest.fixture()
def served(tmp_path_factory, smollm):
    """`sparkler serve` with its default weights, every warm-up shape (`--warmup full`) and an empty program store,
    so its background compilation runs behind the test; the converted weights and tokenizer come from the shared
    cache. A 64-token context (the chat below fits): two prefill chunk sizes, so five first shapes to compile
    before serving and five behind (at this context `full` names the same ten shapes as `basic`). Room in the queue
    for the 14 sequences of nine concurrent calls below."""
    from models.loading.source import cache_root

    cache = tmp_path_factory.mktemp("cache")
    for part in ("params", "tokenizers", "remembered", "native"):
        os.makedirs(os.path.join(cache_root(), part), exist_ok=True)
        os.symlink(os.path.join(cache_root(), part), cache / part)
    template = cache / "chat.jinja"  # the model's own, its default system message a variable (`--chat-template`)
    template.write_text(smollm.tokenizer.chat_template.replace(SMOL_SYSTEM, "' + persona + '"))
    child = spawn("--max-num-seqs", "2", "--max-model-len", "64", "--kv-cache-gb", "0.1", "--decode-batch-sizes", "2",
                  "--warmup", "full", "--api-key", KEY, "--max-queued-requests", "16", "--chat-template", str(template),
                  "--default-chat-template-kwargs", json.dumps({"persona": OUR_SYSTEM}),
                  "--served-model-name", "smollm2-135m-instruct", "smol", "--override-generation-config",
                  '{"max_new_tokens": 5, "temperature": 0}', "--enable-auto-tool-choice", "--tool-call-parser",
                  "hermes", "-ngl", "99", command=[SPARKLER, "serve"],
                  env={"SPARKLER_CACHE": str(cache)}, timeout=600)
    yield child
    child.proc.terminate()
    child.proc.wait(timeout=60)


def test_serve_answers_before_its_background_compilation_is_done_and_chat_streams_from_it(served, smollm):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    first = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert first.choices[0].message.content and first.usage.completion_tokens >= 1
    asked = urllib.request.Request(served.url + "/tokenize", data=json.dumps({"messages": [
        {"role": "user", "content": "Hi"}]}).encode(), headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(asked, timeout=30) as r:
        rendered = smollm.tokenizer.decode(json.load(r)["tokens"], skip_special_tokens=False)
    assert SMOL_SYSTEM in smollm.tokenizer.chat_template and f"system\n{OUR_SYSTEM}<|im_end|>" in rendered
    # the other name, and the defaults of --override-generation-config: 5 tokens, greedy
    short = client.chat.completions.create(model="smol", messages=[{"role": "user",
                                                                    "content": "What is the capital of France?"}])
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    assert first.choices[0].message.content.startswith(short.choices[0].message.content)
    assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct", "smol"]
    during = health(served.url)
    assert during["warmup_shapes_ready"] < during["warmup_shapes_total"]  # answered with shapes still to come
    log = "".join(served.lines)
    started = re.search(r"program store (\d+) loaded, (\d+) saved", log)
    assert started and int(started[2]) >= 5 and int(started[1]) == 0  # the first shapes, compiled before serving
    assert re.search(r"warm-up: (\d+) more shapes compiling behind serving", log)
    assert f"quantization {smollm.cfg.quantization} (auto: " in log  # the default, as the `smollm` fixture loads it
    for flag in ("--enable-auto-tool-choice", "--tool-call-parser", "--n-gpu-layers"):  # taken from other servers
        assert f"{flag} has nothing to change here" in log

    questions = "What is the capital of France?\n/reset\nName a color.\n/exit\nnever sent\n"
    out = run("chat", "--url", served.url, "--api-key", KEY, "--temperature", "0", "--max-tokens", "8",
              stdin=questions)
    assert out.returncode == 0, out.stderr
    said = first.choices[0].message.content + "\n"
    assert out.stdout.startswith(said) and out.stdout[len(said):].strip()  # the same greedy reply, then another
    assert "Chatting with smollm2-135m-instruct" in out.stderr and out.stderr.count("completion tokens") == 2
    assert "(conversation forgotten)" in out.stderr

    wrong = run("chat", "--url", served.url, "--api-key", "nope", stdin="hi\n")
    assert wrong.returncode == 1 and "401" in wrong.stderr  # the API's own message, not a traceback
    gone = run("chat", "--url", "http://127.0.0.1:9", stdin="hi\n")
    assert gone.returncode == 1 and "cannot reach" in gone.stderr

    # Once the warm-up is done, what short requests need is compiled: prompts of any length up to a chunk, cache
    # misses and hits (a prefix in the pages), n > 1, and structured output's one-step decode (n = 1 and 2).
    deadline = time.monotonic() + 600
    while (state := health(served.url))["warmup_shapes_ready"] < state["warmup_shapes_total"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    before = state["compiles"]
    rng = np.random.default_rng(6)
    prompts = [unique_prefix(100 + i, n) for i, n in enumerate(range(3, 56, 6))]  # 9, over both chunk sizes
    temperatures = rng.uniform(0, 1.2, len(prompts))

    def ask(i, **extra):
        return client.completions.create(model="smollm2-135m-instruct", prompt=prompts[i], max_tokens=8, seed=i,
                                         temperature=float(temperatures[i]), n=1 + i % 2,
                                         extra_body={"ignore_eos": True, **extra})

    for extra, hit in (({}, False), ({}, True), ({"prompt_cache_max_len": 0}, False)):  # misses, hits, cache off
        with ThreadPoolExecutor(len(prompts)) as ex:
            outs = list(ex.map(lambda i: ask(i, **extra), range(len(prompts))))
        assert all(o.usage.completion_tokens == 8 * len(o.choices) for o in outs)
        cached = sum(o.usage.prompt_tokens_details.cached_tokens for o in outs)
        assert (cached > 0) == hit, (extra, cached)
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    for n in (1, 2):
        r = client.completions.create(model="smollm2-135m-instruct", prompt="A person as JSON:", max_tokens=20, n=n,
                                      seed=n, extra_body={"response_format": {"type": "json_schema",
                                                                              "json_schema": {"schema": schema}}})
        assert len(r.choices) == n and all(c.text for c in r.choices)
    assert health(served.url)["compiles"] == before


def test_models_lists_the_catalog_and_what_is_installed():
    out = run("models")
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.strip() and not line.startswith("*")}
    assert "yes" in lines["smollm2-135m-instruct"] and ".gguf" in lines["smollm2-135m-instruct"]
    assert set(lines) >= {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"}
    rows = [json.loads(line) for line in run("models", "--json").stdout.splitlines()]
    assert [r["name"] for r in rows if r["default"]] == ["smollm2-135m-instruct"]


def test_run_batch_answers_a_file_of_requests_as_the_server_does(tmp_path, client):
    """`sparkler run-batch` with the suite server's engine settings: each line's body as the live server answers it
    (greedy chat and completion, embeddings), in order, with its custom_id; an API error keeps its status and body;
    lines it cannot send get an `error` and no response."""
    model = "smollm2-135m-instruct"
    chat = {"model": model, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8,
            "temperature": 0}
    completion = {"model": model, "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "n": 2}
    embed = {"model": model, "input": ["hello", "a longer text to embed"]}
    lines = [{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
             {"custom_id": "completion", "url": "/v1/completions", "body": completion},
             {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": embed},
             {"custom_id": "empty", "method": "POST", "url": "/v1/chat/completions", "body": {**chat, "messages": []}},
             {"custom_id": "stream", "url": "/v1/completions", "body": {**completion, "stream": True}},
             {"custom_id": "bytes", "url": "/v1/embeddings", "body": {**embed, "encoding_format": "bytes"}},
             {"custom_id": "models", "method": "GET", "url": "/v1/models", "body": {}}]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = run("run-batch", "-i", str(source), "-o", str(target), "--max-num-seqs", "32", "--max-model-len", "1024",
              "--decode-steps", "4", "--kv-cache-gb", "0.5", "--num-speculative-tokens", "4", "--warmup", "none",
              "--max-concurrency", "3", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(x) for x in target.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [x["custom_id"] for x in lines] + [None]
    assert all(r["id"].startswith("batch_req_") for r in results)
    ok = {r["custom_id"]: r["response"] for r in results[:3]}
    assert all(r["status_code"] == 200 and r["request_id"] for r in ok.values())
    assert ok["chat"]["body"]["choices"][0]["message"]["content"] == \
        client.chat.completions.create(**chat).choices[0].message.content
    assert [c["text"] for c in ok["completion"]["body"]["choices"]] == [
        c.text for c in client.completions.create(**completion).choices]
    want = [e.embedding for e in client.embeddings.create(**embed).data]
    assert np.allclose([e["embedding"] for e in ok["embed"]["body"]["data"]], want, atol=1e-5)
    empty = results[3]
    assert empty["error"] is None and empty["response"]["status_code"] == 400
    assert empty["response"]["body"]["error"]["param"] == "messages"
    for r, why in zip(results[4:], ("cannot stream", "result is JSON", "'method' must be POST", "not JSON")):
        assert r["response"] is None and why in r["error"]["message"]
    assert "8 requests answered" in out.stderr and "5 of them with an error" in out.stderr


def test_every_command_has_help(capsys):
    from server.cli import main

    top = run("--help")
    assert top.returncode == 0 and all(cmd in top.stdout for cmd in ("serve", "run-batch", "chat", "bench", "models"))
    chat = run("chat", "--help")
    assert chat.returncode == 0 and "--url" in chat.stdout and "/reset" in chat.stdout
    assert run("frobnicate").returncode == 2
    # `serve`'s parser in this process (a subprocess would import JAX twice more; `serve answers` runs the script)
    with pytest.raises(SystemExit) as end:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert end.value.code == 0 and "usage: sparkler serve" in out and "--quantization" in out
    with pytest.raises(SystemExit) as end:
        main(["serve", "--decode-batch-sizes", "4,0"])
    assert end.value.code == 2 and "positive integers separated by commas" in capsys.readouterr().err
    with pytest.raises(SystemExit) as end:
        main(["serve", "--gpu-memory-utilization", "1.5"])
    assert end.value.code == 2 and "a share in (0, 1], got '1.5'" in capsys.readouterr().err


def test_the_flags_take_vllms_sglangs_and_llama_cpps_names(tmp_path, capsys):
    import jax

    from engine.runner import platform_defaults
    from server.__main__ import generation_config, ignored, parse_args, runner_config

    for flag in ("--max-prefill-tokens", "--max-num-batched-tokens", "--chunked-prefill-size"):
        assert runner_config(parse_args([flag, "2048"])).max_prefill_tokens == 2048
    tuned = platform_defaults(jax.devices()[0].platform)["max_prefill_tokens"]  # 512 on a CPU
    assert runner_config(parse_args([])).max_prefill_tokens == tuned
    for flag in ("--served-name", "--served-model-name", "--alias"):  # vLLM's and llama.cpp's names for it too
        assert parse_args([flag, "m"]).served_name == ["m"]
    # a launch line as vLLM's recipes write it, and one as llama.cpp's
    vllm = parse_args(["some/folder", "--served-model-name", "a", "b", "--enable-auto-tool-choice",
                       "--tool-call-parser", "hermes", "--trust-remote-code", "--max-model-len", "4096", "-tp", "1"])
    assert (vllm.model, vllm.served_name, vllm.max_model_len) == ("some/folder", ["a", "b"], 4096)
    assert [f for f, _ in ignored(vllm)] == ["--enable-auto-tool-choice", "--tool-call-parser", "--trust-remote-code"]
    llama = parse_args(["-m", "x.gguf", "-c", "2048", "-np", "4", "--jinja", "-ngl", "99", "-fa", "on", "--port", "1"])
    assert (llama.model, llama.max_model_len, llama.max_num_seqs, llama.port) == ("x.gguf", 2048, 4, 1)
    assert [f for f, _ in ignored(llama)] == ["--jinja", "--n-gpu-layers", "--flash-attn"]
    older = parse_args(["-fa", "y.gguf", "--alias", "a", "-c", "512"])  # a bare -fa (older llama.cpp), the model after
    assert (older.model, older.served_name, older.ignored_flash_attn) == ("y.gguf", ["a"], True)
    with pytest.raises(SystemExit):
        parse_args(["-tp2"])  # not -t p2: no -t here (llama.cpp's --threads is taken whole)
    sglang = parse_args(["--model-path", "y", "--context-length", "512", "--max-running-requests", "8",
                         "--mem-fraction-static", "0.8", "--tp-size", "1", "--disable-radix-cache"])
    assert (sglang.model, sglang.max_model_len, sglang.max_num_seqs) == ("y", 512, 8)
    assert sglang.gpu_memory_utilization == 0.8 and [f for f, _ in ignored(sglang)] == ["--no-enable-prefix-caching"]
    assert parse_args(["--quantization", "w8a8_fp8"]).quantization == "fp8"  # SGLang's name for vLLM's fp8
    one = parse_args(["--lora", "/x/my-adapter.gguf"])  # llama.cpp's: named after its file, applied to every request
    assert one.enable_lora and one.lora_modules == [("my-adapter", "/x/my-adapter.gguf")]
    assert one.lora_default == {"my-adapter": 1.0}
    quiet = parse_args(["--lora", "a.gguf", "--lora", "peft/b/", "--lora-init-without-apply"])
    assert quiet.lora_modules == [("a", "a.gguf"), ("b", "peft/b/")] and quiet.lora_default is None
    scaled = parse_args(["--lora-scaled", "/x/c:1.gguf:0.5"])  # the scale after the last colon
    assert scaled.lora_modules == [("c:1", "/x/c:1.gguf")] and scaled.lora_default == {"c:1": 0.5}
    listed = parse_args(["--lora-scaled", "c.gguf:2,d.gguf:-1", "--lora", "a.gguf,b.gguf", "--lora-init-without-apply"])
    assert [n for n, _ in listed.lora_modules] == ["c", "d", "a", "b"] and listed.lora_default is None  # (llama.cpp's
    assert parse_args(["--lora-scaled", "c.gguf:0"]).lora_default is None  # ids: the order given); scale 0: none
    mixed = parse_args(["--lora", "a.gguf", "--lora-modules", "m=/m", "--lora-scaled", "c.gguf:2,d.gguf:0"])
    assert mixed.lora_default == {"a": 1.0, "c": 2.0}  # llama.cpp's default: every one, each at its scale
    for bad in (["--lora-scaled", "c.gguf"], ["--lora-scaled", "c.gguf:half"], ["--lora-scaled", "c.gguf:inf"],
                ["--lora-scaled", "c.gguf:1e9"], ["--lora", "a.gguf,"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert parse_args([]).lora_default is None and not parse_args([]).enable_lora
    assert parse_args([]).model == "smollm2-135m-instruct" and ignored(parse_args([])) == []
    with pytest.raises(SystemExit):
        parse_args(["a", "--model", "b"])  # named twice
    # default sampling settings: the model's, none of them (vllm), a folder's, then the overrides over them
    model = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2]}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 20, "do_sample": True}))
    over = ["--override-generation-config", '{"temperature": 0.3, "max_new_tokens": 64}']
    assert generation_config(parse_args([]), model) == model
    assert generation_config(parse_args(["--generation-config", "vllm"]), model) == {"eos_token_id": [1, 2]}
    assert generation_config(parse_args(["--generation-config", str(tmp_path)]), model) == {"eos_token_id": [1, 2],
                                                                                             "top_k": 20}
    assert generation_config(parse_args(over), model) == {**model, "temperature": 0.3, "max_new_tokens": 64}
    assert generation_config(parse_args(["--override-generation-config", '{"top_k": -1}']), {})["top_k"] == 0
    for wrong in ('{"temprature": 1}', '{"top_k": 1.5}', '{"temperature": "hot"}', "[1]", '{"top_p": 1.5}',
                  '{"top_k": -2}', '{"max_new_tokens": 0}'):
        with pytest.raises(SystemExit):
            parse_args(["--override-generation-config", wrong])
        assert "--override-generation-config" in capsys.readouterr().err
    for wrong in (["--generation-config", str(tmp_path / "none")], ["--default-chat-template-kwargs", "[]"],
                  ["--default-chat-template-kwargs", '{"messages": []}']):
        with pytest.raises(SystemExit):
            parse_args(wrong)
    assert parse_args(["--chat-template-kwargs", '{"enable_thinking": false}']).default_chat_template_kwargs == {
        "enable_thinking": False}
    # TLS: the two files go together, and files that are no certificate and key stop the start with the reason
    from server.__main__ import tls

    with pytest.raises(SystemExit):
        parse_args(["--ssl-certfile", "cert.pem"])
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(SystemExit) as e:
        tls(parse_args(["--ssl-certfile", str(tmp_path / "cert.pem"), "--ssl-key-file", str(tmp_path / "cert.pem")]))
    assert "--ssl-certfile" in str(e.value) and tls(parse_args([])) is None
    rc = runner_config(parse_args([]))  # the pool: sized where it runs (4 GiB on a CPU), 0.9 of an accelerator
    assert rc.kv_cache_gb == 0 and rc.gpu_memory_utilization == 0.9
    assert runner_config(parse_args(["--gpu-memory-utilization", "0.5"])).gpu_memory_utilization == 0.5
    assert rc.scheduling_policy == "fcfs"  # vLLM's flag and default
    assert runner_config(parse_args(["--scheduling-policy", "priority"])).scheduling_policy == "priority"


def http_post(url: str, path: str, body: dict) -> dict:
    """POST a JSON body; the JSON reply."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def test_bench_throughput_and_latency_run_the_engine_alone(smollm, tmp_path, capsys):
    """`sparkler bench throughput` and `bench latency` (vLLM's offline benchmarks) on the default model with serve's
    flags (the suite's engine settings): every request makes exactly its tokens, the figures are consistent (rates
    = counts / elapsed time, the percentiles ordered around the mean's range) and saved as JSON; bad counts stop
    with a message."""
    from server.cli import main

    engine = ["--max-num-seqs", "32", "--max-model-len", "1024", "--kv-cache-gb", "0.5", "--decode-steps", "4",
              "--warmup", "none"]
    saved = tmp_path / "throughput.json"
    assert main(["bench", "throughput", *engine, "--num-prompts", "6", "--n", "2", "--input-len", "20",
                 "--random-prefix-len", "40", "--output-len", "5", "--output-json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Throughput: [\d.]+ requests/s, [\d.]+ total tokens/s, [\d.]+ output tokens/s", out), out
    got = json.loads(saved.read_text())
    assert (got["num_requests"], got["total_input_tokens"], got["total_output_tokens"]) == (6, 360, 60)
    assert got["output_tokens_per_second"] == pytest.approx(60 / got["elapsed_time"])
    assert got["tokens_per_second"] == pytest.approx(420 / got["elapsed_time"])
    saved = tmp_path / "latency.json"
    assert main(["bench", "latency", *engine, "--batch-size", "2", "--input-len", "8", "--output-len", "4",
                 "--num-iters-warmup", "1", "--num-iters", "3", "--output-json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "Avg latency: " in out and "99% percentile latency: " in out
    got = json.loads(saved.read_text())
    assert len(got["latencies"]) == 3 and got["avg_latency"] == pytest.approx(np.mean(got["latencies"]))
    cuts = [got["percentiles"][p] for p in ("10", "25", "50", "75", "90", "99")]
    assert cuts == sorted(cuts) and min(got["latencies"]) <= cuts[0] and cuts[-1] <= max(got["latencies"])
    for bad in (["throughput", "--num-prompts", "0"], ["latency", "--num-iters", "0"]):
        with pytest.raises(SystemExit) as end:
            main(["bench", *bad])
        assert "must be positive" in str(end.value)
    with pytest.raises(SystemExit) as end:  # every token asked for, or a message (not a figure of cut replies)
        main(["bench", "throughput", *engine, "--num-prompts", "2", "--input-len", "1000", "--output-len", "100"])
    assert "past the context (1024 tokens" in str(end.value)


def test_bench_serve_measures_a_load_as_vllms_does(api, tmp_path, capsys):
    """`sparkler bench serve` against the live server: every request of a capped concurrency and of a Poisson rate
    completes with exactly the asked tokens (completions and chat), the figures hang together (TTFT within the
    end-to-end latency, throughput = tokens / duration) and are saved as JSON; a model the server does not serve
    makes every request fail, the error shown and the exit status 1."""
    from server import bench_serve
    from server.cli import main

    saved = tmp_path / "result.json"
    assert main(["bench", "serve", "--url", api.url + "/v1", "--num-prompts", "6", "--max-concurrency", "3",
                 "--input-len", "20", "--output-len", "5", "--save-result", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "| Successful requests | 6 |" in out and "Time to first token, median (ms)" in out
    got = json.loads(saved.read_text())
    assert got["completed"] == 6 and got["failed"] == 0 and got["total_output_tokens"] == 30
    assert got["total_input_tokens"] >= 6 * 20 and got["model"] == api.model.name
    assert 0 < got["median_ttft_ms"] <= got["median_e2el_ms"] and got["max_concurrency"] == 3
    assert abs(got["output_throughput"] - 30 / got["duration_s"]) < 1e-6
    assert main(["bench", "serve", "--url", api.url, "--endpoint", "chat", "--num-prompts", "4", "--request-rate",
                 "50", "--input-len", "8", "--output-len", "3", "--save-result", str(saved)]) == 0
    got = json.loads(saved.read_text())
    assert got["completed"] == 4 and got["total_output_tokens"] == 12 and got["request_rate"] == 50
    written = bench_serve.texts(api.url, bench_serve.prompts(4, 8, 0))  # the prompts' text, as the server templates it
    counts = [http_post(api.url, "/tokenize", {"messages": [{"role": "user", "content": t}]})["count"] for t in written]
    assert got["chat_prompts"] == "detokenized" and got["total_input_tokens"] == sum(counts)
    # vLLM's random-dataset shapes: a shared prefix (the prefix cache serves it), lengths in a range, percentiles
    hits = api.engine.stats()["prefix_cache_hit_tokens"]
    assert main(["bench", "serve", "--url", api.url, "--num-prompts", "6", "--max-concurrency", "2",
                 "--random-prefix-len", "32", "--input-len", "8", "--output-len", "4", "--random-range-ratio", "0.5",
                 "--metric-percentiles", "50,90", "--goodput", "e2el:600000", "--burstiness", "0.5",
                 "--save-result", str(saved)]) == 0
    got = json.loads(saved.read_text())
    sent = bench_serve.prompts(6, 8, 0, 1000, 20000, 32, 0.5)
    assert {tuple(p[:32]) for p in sent} == {tuple(sent[0][:32])} and {len(p) for p in sent} <= set(range(36, 45))
    assert got["total_input_tokens"] == sum(map(len, sent)) and len({len(p) for p in sent}) > 1
    assert got["total_output_tokens"] == sum(bench_serve.lengths(6, 4, 0.5, np.random.default_rng(1)))
    assert got["p50_ttft_ms"] <= got["p90_ttft_ms"] and "p99_ttft_ms" not in got
    assert got["request_goodput"] == pytest.approx(got["request_throughput"])  # every request within the SLO
    assert api.engine.stats()["prefix_cache_hit_tokens"] - hits >= 32
    assert "| Time to first token, p90 (ms) |" in capsys.readouterr().out
    # vLLM's ShareGPT dataset: each conversation's first turn sent as text, its second's length asked for; pairs too
    # short are skipped
    talk = lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}  # noqa: E731
    data = [talk(f"Tell me about the river number {i} and its bridges, please.", "It has three old bridges" +
                 " and a ferry" * i) for i in range(4)] + [talk("Hi", "Hello there, how are you?"),
                                                          talk("What is two and two?", "Four."), {"id": "x"}]
    (tmp_path / "sharegpt.json").write_text(json.dumps(data))
    assert main(["bench", "serve", "--url", api.url, "--dataset-name", "sharegpt", "--dataset-path",
                 str(tmp_path / "sharegpt.json"), "--num-prompts", "4", "--save-result", str(saved)]) == 0
    got = json.loads(saved.read_text())
    count = lambda text: http_post(api.url, "/tokenize", {"prompt": text})["count"]  # noqa: E731
    assert got["completed"] == 4 and got["dataset_name"] == "sharegpt"
    assert got["total_input_tokens"] == sum(count(d["conversations"][0]["value"]) for d in data[:4])
    assert got["total_output_tokens"] == sum(count(d["conversations"][1]["value"]) for d in data[:4])
    assert main(["bench", "serve", "--url", api.url, "--dataset-name", "sharegpt", "--dataset-path",
                 str(tmp_path / "sharegpt.json"), "--num-prompts", "5"]) == 1  # the two short pairs skipped
    assert "4 usable conversations" in capsys.readouterr().err
    assert main(["bench", "serve", "--url", api.url, "--model", "no-such-model", "--num-prompts", "2",
                 "--output-len", "2"]) == 1
    captured = capsys.readouterr()
    assert "| Failed requests | 2 |" in captured.out and "HTTP 404" in captured.err
    for bad in (["profile"], ["serve", "--request-rate", "0"], ["serve", "--token-range", "9", "9"],
                ["serve", "--random-range-ratio", "1"], ["serve", "--goodput", "ttft"],
                ["serve", "--metric-percentiles", "0,50"], ["serve", "--dataset-name", "sharegpt"]):
        with pytest.raises(SystemExit) as end:
            main(["bench", *bad])
        assert end.value.code == 2
    assert main(["bench", "--help"]) == 0
