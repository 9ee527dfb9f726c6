"""New weights while serving (SGLang's `/update_weights_from_disk`, what RL trainers call between rollouts): two tiny
random Qwen3 folders of one shape and a third of another; the server swaps the second in, and answers as
transformers does on it."""

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.runner import RunnerConfig  # noqa: E402
from helpers import saved_reference, tiny_tokenizer  # noqa: E402
from models import load_model  # noqa: E402

pytestmark = pytest.mark.quick_compile  # tiny random Qwen3s: XLA optimizations off (conftest)

NAME = "tiny-qwen3"


def _folder(root, smollm, seed: int, hidden: int = 64) -> tuple[str, object]:
    """A tiny random Qwen3 with SmolLM2's tokenizer; `(folder, transformers model)`."""
    folder = str(root / f"qwen3-{seed}-{hidden}")
    tok = tiny_tokenizer(folder, smollm.tokenizer.folder)
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return folder, saved_reference(transformers.AutoModelForCausalLM.from_config(cfg).float().eval(), folder, 0.1)


@pytest.fixture(scope="module")
def swapped(smollm, tmp_path_factory):
    from conftest import live_server

    root = tmp_path_factory.mktemp("weights")
    first, second, other = _folder(root, smollm, 0), _folder(root, smollm, 1), _folder(root, smollm, 2, hidden=32)
    model = dataclasses.replace(load_model(first[0]), name=NAME)
    rc = RunnerConfig(max_num_seqs=4, max_model_len=256, decode_steps=4, kv_cache_gb=0.01, decode_batch_sizes=(4,))
    for api in live_server(model, rc, loader=load_model):
        api.folders = first, second, other
        yield api


def _post(api, path: str, body: dict) -> tuple[int, dict]:
    asked = urllib.request.Request(api.url + path, data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(asked, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _greedy(ref, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)), max_new_tokens=n,
                           do_sample=False)
    return out[0, len(ids):].tolist()


def test_new_weights_are_served_as_transformers_runs_them(swapped):
    """Greedy replies are the first folder's (transformers'), then, after `/update_weights_from_disk`, the second's;
    the prefix cache does not serve the old weights' pages, nothing new is compiled, a reply in flight finishes
    first, and `weight_version` is reported. Weights of another shape, or no weights, are a 400 and change
    nothing."""
    api, (first, second, other) = swapped, swapped.folders
    client = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0, timeout=300)
    ask = dict(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0,
               extra_body={"return_token_ids": True, "ignore_eos": True})
    before = client.completions.create(**ask)
    ids = before.model_extra["prompt_token_ids"]
    assert before.choices[0].model_extra["token_ids"] == _greedy(first[1], ids, 8)
    for path, param in ((other[0], "model_path"), ("/nonexistent/folder", "model_path"), ("", "model_path")):
        status, out = _post(api, "/update_weights_from_disk", {"model_path": path})
        assert status == 400 and out["success"] is False and out["message"], out
    assert client.completions.create(**ask).choices[0].model_extra["token_ids"] == before.choices[0].model_extra[
        "token_ids"]  # still the first weights
    long, results = {**ask, "max_tokens": 64}, []
    running = threading.Thread(target=lambda: results.append(client.completions.create(**long)))
    running.start()
    while not api.engine.stats()["running"]:  # the long reply is decoding before the update is asked for
        time.sleep(0.005)
    status, out = _post(api, "/update_weights_from_disk", {"model_path": second[0], "weight_version": "step-2"})
    running.join()
    compiles = api.engine.runner.compiles
    assert status == 200 and out == {"success": True, "message": "Succeeded to update model weights.",
                                     "num_paused_requests": 0}
    assert results[0].choices[0].model_extra["token_ids"] == _greedy(first[1], ids, 64)  # finished on the old
    after = client.completions.create(**ask)
    assert after.choices[0].model_extra["token_ids"] == _greedy(second[1], ids, 8)
    assert after.usage.prompt_tokens_details.cached_tokens == 0  # the old weights' pages are not reused
    assert api.engine.runner.compiles == compiles
    with urllib.request.urlopen(api.url + "/model_info", timeout=30) as r:
        assert json.load(r)["weight_version"] == "step-2"


def test_get_weights_by_name_reads_the_served_parameters_by_the_checkpoints_names(swapped):
    """SGLang's `/get_weights_by_name`: each parameter as the served folder's transformers model holds it (a layer
    inside the scanned stack, a norm, the tied head), its first `truncate_size` rows; after
    `/update_weights_from_disk`, the new folder's. A name the model has not, or a bad `truncate_size`, is a 400."""
    import numpy as np

    api, (first, second, _) = swapped, swapped.folders
    names = ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_norm.weight", "model.norm.weight",
             "lm_head.weight")
    for folder, ref in (second, first):
        assert _post(api, "/update_weights_from_disk", {"model_path": folder})[0] == 200
        want = ref.state_dict()
        for name in names:
            status, got = _post(api, "/get_weights_by_name", {"name": name, "truncate_size": 3})
            assert status == 200 and np.array_equal(np.asarray(got, np.float32), want[name][:3].numpy()), name
    status, got = _call(api, "GET", "/get_weights_by_name", {"name": "model.norm.weight"})  # 100 rows by default
    assert status == 200 and np.array_equal(np.asarray(got, np.float32), want["model.norm.weight"].numpy())
    norm = "model.norm.weight"
    for body in ({"name": "model.layers.2.mlp.up_proj.weight"}, {"name": "model.norm"}, {},
                 {"name": norm, "truncate_size": -1}, {"name": norm, "truncate_size": 2.5}):
        status, out = _post(api, "/get_weights_by_name", body)
        assert status == 400 and out["error"]["message"], (body, out)


def _call(api, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    asked = urllib.request.Request(api.url + path, method=method, data=None if body is None else json.dumps(
        body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(asked, timeout=300) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _device_bytes() -> int:
    import jax
    return sum(x.nbytes for x in jax.live_arrays())


def test_sleep_gives_the_devices_memory_back_and_wakes_as_it_was(swapped):
    """vLLM's `/sleep` (levels 1 and 2), `/wake_up` (by tags) and `/is_sleeping`, and SGLang's
    `/release_memory_occupation` and `/resume_memory_occupation`: asleep, the weights' and the KV pool's device
    arrays are gone (counted), every call that runs the model is a 503 while the others answer, a reply running
    when sleep is asked finishes first, and awake the replies are as before with nothing compiled anew; weights
    discarded at level 2 are read again, or replaced by `/update_weights_from_disk`."""
    import jax
    api, (first, _, _) = swapped, swapped.folders
    client = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0, timeout=300)
    ask = dict(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0,
               extra_body={"return_token_ids": True, "ignore_eos": True})
    tokens = lambda reply: reply.choices[0].model_extra["token_ids"]  # noqa: E731
    before = tokens(client.completions.create(**ask))
    held = sum(x.nbytes for x in jax.tree.leaves((api.model.params, api.engine.runner.cache)))
    compiles, used = api.engine.runner.compiles, _device_bytes()
    long, results = {**ask, "max_tokens": 64}, []
    running = threading.Thread(target=lambda: results.append(client.completions.create(**long)))
    running.start()
    while not api.engine.stats()["running"]:
        time.sleep(0.005)
    assert _call(api, "POST", "/sleep?level=1") == (200, None)
    running.join()
    assert len(tokens(results[0])) == 64 and tokens(results[0])[:8] == before  # finished before the sleep
    assert used - _device_bytes() >= held  # the weights and the KV pool: gone from the devices
    assert _call(api, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**ask)
    assert e.value.status_code == 503 and e.value.body["code"] == "sleeping", e.value.body
    assert _call(api, "POST", "/tokenize", {"model": NAME, "prompt": "hello"})[0] == 200  # needs no weights
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(api.url + "/health_generate", timeout=30)
    assert e.value.code == 503
    with urllib.request.urlopen(api.url + "/metrics", timeout=30) as r:
        assert "sparkler_sleep_level 1.0" in r.read().decode()
    for path in ("/sleep?level=3", "/wake_up?tags=everything"):
        status, out = _call(api, "POST", path)
        assert status == 400 and out["error"]["param"] in ("level", "tags"), out
    assert _call(api, "POST", "/wake_up?tags=weights") == (200, None)  # the KV pool still sleeps
    assert _call(api, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert _call(api, "POST", "/wake_up?tags=kv_cache") == (200, None)
    assert _call(api, "GET", "/is_sleeping") == (200, {"is_sleeping": False})
    again = client.completions.create(**ask)
    assert tokens(again) == before and again.usage.prompt_tokens_details.cached_tokens == 0  # the pool forgotten
    assert api.engine.runner.compiles == compiles

    assert _call(api, "POST", "/sleep?level=1") == (200, None)
    assert _call(api, "POST", "/sleep?level=2") == (200, None)  # the weights discarded: read again on waking
    assert api.engine.stats()["sleep_level"] == 2
    assert _call(api, "POST", "/wake_up") == (200, None)
    assert tokens(client.completions.create(**ask)) == before

    assert _call(api, "POST", "/sleep?level=2") == (200, None)  # ... or replaced by new weights
    status, out = _post(api, "/update_weights_from_disk", {"model_path": first[0]})
    assert status == 200 and out["success"], out
    assert _call(api, "GET", "/is_sleeping") == (200, {"is_sleeping": True})  # the KV pool sleeps on
    assert _call(api, "POST", "/wake_up", {}) == (200, None)
    ids = client.completions.create(**ask).model_extra["prompt_token_ids"]
    assert tokens(client.completions.create(**ask)) == _greedy(first[1], ids, 8)

    # Ollama's unload (`ollama stop`: an empty prompt with keep_alive 0) sleeps; its next request loads it again
    import ollama
    olla = ollama.Client(host=api.url)
    assert olla.generate(model=NAME, prompt="", keep_alive=0).done_reason == "unload"
    assert api.engine.asleep and olla.ps().models == []
    reply = olla.generate(model=NAME, prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 8})
    assert not api.engine.asleep and len(olla.ps().models) == 1
    assert reply.response == client.completions.create(**ask).choices[0].text
    assert olla.chat(model=NAME, messages=[], keep_alive=0).done_reason == "unload"
    assert olla.chat(model=NAME, messages=[]).done_reason == "load" and not api.engine.asleep

    # SGLang's names: by tags in the body ("cuda_graph" has nothing to give back)
    assert _call(api, "POST", "/release_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}) == (200, None)
    assert api.engine.stats()["sleep_level"] == 1 and "weights" not in api.engine.asleep
    status, out = _call(api, "POST", "/release_memory_occupation", {"tags": ["gpu"]})
    assert status == 400 and out["error"]["param"] == "tags", out
    status, out = _call(api, "GET", "/release_memory_occupation")  # no body (a crawler's GET): no sleep
    assert status == 400 and out["error"]["param"] == "tags" and "weights" not in api.engine.asleep, out
    assert _call(api, "POST", "/resume_memory_occupation", {"tags": None}) == (200, None)
    assert tokens(client.completions.create(**ask)) == _greedy(first[1], ids, 8)
    assert api.engine.runner.compiles == compiles


def test_offline_llm_sleeps_and_wakes_up(swapped):
    """`LLM.sleep(level)` and `LLM.wake_up(tags)` (vLLM's offline API), with a draft model: generating while
    asleep is an error, and awake (level 1: the host copy; level 2: loaded again) the greedy tokens are
    transformers' and the draft model drafts again."""
    from engine.llm import LLM
    from engine.params import SamplingParams
    from engine.sleep import Asleep

    first, second = swapped.folders[:2]  # the second drafts for the first (its weights and pool sleep too)
    llm = LLM(first[0], max_num_seqs=2, max_model_len=128, kv_cache_gb=0.005, decode_batch_sizes=(2,),
              speculative_config={"model": second[0], "num_speculative_tokens": 2})
    llm.engine.verify_always = True
    ids = llm.model.tokenizer.encode("The capital of France is")
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = _greedy(first[1], ids, 6)
    assert llm.generate([ids], sp)[0].outputs[0].token_ids == want
    for level in (1, 2):
        llm.sleep(level)
        with pytest.raises(Asleep):
            llm.generate([ids], sp)
        llm.wake_up(["kv_cache"])
        with pytest.raises(Asleep):
            llm.generate([ids], sp)
        llm.wake_up()
        out = llm.generate([ids], sp)[0]
        assert out.outputs[0].token_ids == want and out.drafted > 0
    with pytest.raises(ValueError, match="level"):
        llm.sleep(3)


def test_paused_generation_holds_calls_and_goes_on_with_new_weights(swapped):
    """SGLang's `/pause_generation` and `/continue_generation`: "in_place" holds a running reply seated (no token
    drawn meanwhile) and a new call waits, both then finishing as unpaused; "retract" puts the running reply back
    in the queue, new weights are served meanwhile (`/update_weights_from_disk`; the memory may sleep too) and the
    reply goes on with them from where it was (transformers' greedy tokens on each side of the pause); "abort" ends
    it with what it drew. vLLM's `/pause` (its "wait": the running reply finishes whole), `/is_paused`, `/resume`."""
    api, (first, second, _) = swapped, swapped.folders
    client = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0, timeout=300)
    ask = dict(model=NAME, prompt="The capital of France is", max_tokens=160, temperature=0,
               extra_body={"return_token_ids": True, "ignore_eos": True})
    tokens = lambda reply: reply.choices[0].model_extra["token_ids"]  # noqa: E731
    assert _post(api, "/update_weights_from_disk", {"model_path": first[0]})[0] == 200
    ids = client.completions.create(**{**ask, "max_tokens": 1}).model_extra["prompt_token_ids"]
    old = _greedy(first[1], ids, 160)

    def running() -> tuple[threading.Thread, list]:
        results: list = []
        thread = threading.Thread(target=lambda: results.append(client.completions.create(**ask)))
        thread.start()
        while not api.engine.stats()["running"] or not api.server.admitted[-1][0].choices[0].token_ids:
            time.sleep(0.002)
        return thread, results

    thread, results = running()
    slept: list = []  # a sleep asked meanwhile waits for the running reply, until the pause seats it for good
    sleeper = threading.Thread(target=lambda: slept.append(_call(api, "POST", "/release_memory_occupation", {})))
    sleeper.start()
    deadline = time.monotonic() + 60
    while api.server.paused is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert _post(api, "/pause_generation", {"mode": "in_place"}) == (
        200, {"message": "Generation paused successfully.", "status": "ok"})
    sleeper.join(timeout=60)
    assert slept and slept[0][0] == 400 and "paused in place" in json.dumps(slept[0][1]), slept
    choice = api.server.admitted[-1][0].choices[0]
    drawn = len(choice.token_ids)
    later: list = []
    waiting = threading.Thread(target=lambda: later.append(client.completions.create(**{**ask, "max_tokens": 4})))
    waiting.start()
    time.sleep(0.3)
    assert len(choice.token_ids) == drawn < 160 and api.engine.stats()["running"] == 1 and not later
    status, out = _post(api, "/update_weights_from_disk", {"model_path": second[0]})  # seated: its KV is the old's
    assert status == 400 and out["success"] is False and "in place" in out["message"], out
    assert _call(api, "POST", "/release_memory_occupation", {})[0] == 400
    assert _post(api, "/continue_generation", {})[0] == 200
    thread.join(), waiting.join()
    assert tokens(results[0]) == old and tokens(later[0]) == old[:4]

    thread, results = running()
    assert _post(api, "/pause_generation", {"mode": "retract"})[0] == 200
    stats = api.engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 1
    drawn = len(api.server.admitted[-1][0].choices[0].token_ids)
    assert _post(api, "/update_weights_from_disk", {"model_path": second[0]})[0] == 200  # while it is held
    assert _call(api, "POST", "/release_memory_occupation", {}) == (200, None)  # nothing seated: it may sleep
    assert _call(api, "POST", "/resume_memory_occupation", {}) == (200, None)
    assert _post(api, "/continue_generation", {})[0] == 200
    thread.join()
    out = tokens(results[0])
    assert 0 < drawn < 160 and out[:drawn] == old[:drawn]
    assert out[drawn:] == _greedy(second[1], ids + out[:drawn], 160 - drawn)  # recomputed on the new weights

    thread, results = running()
    assert _post(api, "/pause_generation", {})[0] == 200  # abort, the default
    thread.join()
    assert results[0].choices[0].finish_reason == "abort" and 0 < len(tokens(results[0])) < 160
    status, out = _post(api, "/pause_generation", {"mode": "later"})
    assert status == 400 and out["error"]["param"] == "mode", out
    assert _post(api, "/continue_generation", {})[0] == 200
    assert tokens(client.completions.create(**{**ask, "max_tokens": 4})) == _greedy(second[1], ids, 4)

    # vLLM's names: "wait" lets the running reply finish whole; a call sent meanwhile waits for /resume
    thread, results = running()
    assert _call(api, "POST", "/pause?mode=wait") == (200, {"status": "paused"})
    assert not api.engine.has_work()  # it has finished
    thread.join()
    assert results[0].choices[0].finish_reason == "length" and len(tokens(results[0])) == 160
    assert _call(api, "GET", "/is_paused") == (200, {"is_paused": True})
    later.clear()
    waiting = threading.Thread(target=lambda: later.append(client.completions.create(**{**ask, "max_tokens": 4})))
    waiting.start()
    time.sleep(0.3)
    assert not later and _call(api, "POST", "/pause?mode=sometime")[0] == 400
    assert _call(api, "POST", "/resume") == (200, {"status": "resumed"})
    waiting.join()
    assert tokens(later[0]) == _greedy(second[1], ids, 4)
    assert _call(api, "GET", "/is_paused") == (200, {"is_paused": False})
