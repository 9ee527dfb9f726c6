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
