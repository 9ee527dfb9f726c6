"""Embeddings against `transformers` on the same weights (the base model's last hidden states, pooled as
sentence-transformers pools them), beside generation in one engine, and `/v1/embeddings` through the official
`openai` client over a real socket."""

import base64
import dataclasses
import functools
import json
import urllib.error
import urllib.request
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engine.params import InvalidRequest, SamplingParams
from engine.runner import RunnerConfig
from models import load_model, pooling
from models.loading.source import gguf_config
from test_models import ROWS, _hf_model

pytestmark = pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)

LONG = [int(t) for t in np.random.default_rng(3).integers(1, 250, 100)]  # past the first length buckets


def _pooled(ref, rows, mode: str) -> np.ndarray:
    """transformers' final hidden states of each row (alone, unpadded), pooled."""
    out = []
    for row in rows:
        with torch.no_grad():
            x = ref.model(torch.tensor([row])).last_hidden_state[0].numpy()
        out.append({"last": x[-1], "mean": x.mean(0), "cls": x[0]}[mode])
    return np.stack(out)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_embeddings_match_transformers(kind, tmp_path, monkeypatch):
    """Every pooling of inputs of several lengths, batched and padded together (and alone), equals transformers'
    hidden states pooled; the same shapes again need no other program."""
    from engine.engine import Engine

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model(kind, str(tmp_path / "hf"))
    model = load_model(str(tmp_path / "hf"), with_tokenizer=False)
    eng = Engine(model, RunnerConfig(max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01))
    rows = ROWS + [LONG, ROWS[0] * 2, LONG[:40]]
    for mode in pooling.POOLINGS:
        want = _pooled(ref, rows, mode)
        got = eng.embed(rows, mode)
        scale = np.abs(want).max()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * scale, (kind, mode)
        programs = len(eng.runner._embed.exes)  # compiled or loaded from the program store
        alone = np.stack([eng.embed([r], mode)[0] for r in rows[:2]])
        assert np.abs(alone - want[:2]).max() <= 1e-4 * scale
        eng.embed(rows, mode)
        assert len(eng.runner._embed.exes) == programs + 1  # `alone`'s one new shape (a row of 16), no other
        pieced = eng.embed(rows, mode, budget=32)  # past 32 tokens, in pieces of 32 that attend to the earlier ones
        assert np.abs(pieced - want).max() <= 1e-4 * scale, (kind, mode)
        done = pooling.POOLINGS.index(mode) + 1  # 4 pieces of LONG (a pool of 128 tokens) and 2 of its first 40
        assert (eng.runner._embed_piece.calls, len(eng.runner._embed_piece.exes)) == (6 * done, 2 * done)  # (64)
    assert eng.stats()["embedded_inputs"] == 3 * (3 * len(rows) + 2)


@pytest.mark.parametrize("kind,tied", [("qwen3", False), ("qwen3", True), ("mistral", False)])
def test_a_bare_decoder_folder_embeds(kind, tied, tmp_path, monkeypatch):
    """A folder of the decoder alone, as sentence-transformers saves an embedding model (`Qwen3Model`,
    `MistralModel`: no LM head, tensors without the `model.` prefix), loads and embeds as transformers' model does;
    so does the offline `LLM.embed`."""
    import transformers

    from engine import LLM
    from test_models import _small

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = _small(kind)
    cfg.tie_word_embeddings = tied
    ref = transformers.AutoModel.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.08)
    ref.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    llm = LLM(load_model(str(tmp_path / "hf"), with_tokenizer=False), max_num_seqs=2, max_model_len=128,
              kv_cache_gb=0.01)
    with torch.no_grad():
        want = np.stack([ref(torch.tensor([r])).last_hidden_state[0, -1].numpy() for r in ROWS])
    assert np.abs(llm.engine.embed(ROWS, "last") - want).max() <= 1e-4 * np.abs(want).max()
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)  # `LLM.embed`: pooled as the folder asks (it does
    assert np.abs(llm.embed(ROWS) - unit).max() < 1e-5  # not: the last token, normalized)
    mean = np.stack([ref(torch.tensor([r])).last_hidden_state[0].mean(0).detach().numpy() for r in ROWS])
    assert np.abs(llm.embed(ROWS, pooling="mean", normalize=False) - mean).max() <= 1e-4 * np.abs(mean).max()
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert np.allclose(llm.score(ROWS[0], ROWS[1:]), [cos(want[0], w) for w in want[1:]], atol=1e-5)  # vLLM's
    pairs = [cos(mean[0], mean[1]), cos(mean[1], mean[2])]  # item by item
    assert np.allclose(llm.score(ROWS[:2], ROWS[1:3], pooling="mean"), pairs, atol=1e-5)
    with pytest.raises(ValueError, match="2 text_1 for 3 text_2"):
        llm.score(ROWS[:2], ROWS[:3])


def test_embedding_beside_generation_leaves_the_pool_alone(tmp_path, monkeypatch):
    """Embedding between the steps of greedy requests changes none of their tokens, and takes and caches no KV page;
    bad inputs raise InvalidRequest."""
    from engine.engine import Engine

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    _hf_model("llama", str(tmp_path / "hf"))
    model = load_model(str(tmp_path / "hf"), with_tokenizer=False)
    rc = RunnerConfig(max_num_seqs=4, max_model_len=128, kv_cache_gb=0.01, decode_steps=2)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(embedding: bool) -> list[list[int]]:
        eng = Engine(model, rc)
        reqs = [eng.make_request(p, sp) for p in ROWS]
        for r in reqs:
            eng.add(r)
        while eng.has_work():
            eng.step()
            if embedding:
                before = eng.stats()
                eng.embed([LONG, ROWS[1]], "mean")
                after = eng.stats()
                assert [after[k] for k in ("kv_pages_free", "kv_pages_cached")] == \
                    [before[k] for k in ("kv_pages_free", "kv_pages_cached")]
        with pytest.raises(InvalidRequest, match="input 1 has no tokens"):
            eng.embed([[1], []], "last")
        with pytest.raises(InvalidRequest, match="at most 128 are embedded"):
            eng.embed([[1] * 129], "last")
        with pytest.raises(InvalidRequest, match="pooling"):
            eng.embed([[1]], "max")
        with pytest.raises(InvalidRequest, match="no LoRA adapter 'x'"):
            eng.embed([[1]], "last", adapter="x")
        return [r.choices[0].token_ids for r in reqs]

    assert run(True) == run(False)


def test_long_inputs_sent_at_once_take_turns_in_pieces(smollm, tmp_path, monkeypatch):
    """Inputs past a call's budget (512 tokens here) run in pieces between other requests' steps, each piece's pool
    holding the input's keys so far; two such calls at once take turns, one input's pieces after the other's, so
    one pool is held at a time; each vector equals the input's sent alone."""
    from conftest import live_server
    from test_lora import tiny_llama

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    tiny_llama(str(tmp_path / "hf"), smollm)
    model = load_model(str(tmp_path / "hf"), hf_overrides={"max_position_embeddings": 1024})
    rc = RunnerConfig(max_num_seqs=2, max_model_len=1024, decode_steps=4, kv_cache_gb=0.05, decode_batch_sizes=(2,))
    rng = np.random.default_rng(5)
    inputs = [rng.integers(1, 1000, n).tolist() for n in (700, 600)]
    for api in live_server(model, rc):
        def embed(ids: list[int]) -> list[float]:
            asked = urllib.request.Request(api.url + "/v1/embeddings", data=json.dumps(
                {"model": model.name, "input": ids, "encoding_format": "float"}).encode())
            with urllib.request.urlopen(asked, timeout=300) as r:
                return json.load(r)["data"][0]["embedding"]

        seen, step = [], api.engine.embed_next
        monkeypatch.setattr(api.engine, "embed_next", lambda pieces, *rest: seen.append(len(pieces.ids)) or step(
            pieces, *rest))
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(embed, inputs))
        assert seen in ([700, 700, 600, 600], [600, 600, 700, 700]), seen  # 2 pieces each, in turn
        assert np.abs(np.asarray(together) - np.asarray([embed(ids) for ids in inputs])).max() < 1e-6


@pytest.fixture(scope="module")
def served(smollm, tmp_path_factory):
    """A live server over a 2-layer random Llama with SmolLM2's tokenizer whose folder asks sentence-transformers'
    mean pooling and normalization, one LoRA slot, a PEFT adapter's folder, and the reference (transformers) models
    with and without it."""
    from conftest import live_server
    from models import lora
    from test_lora import _adapter, tiny_llama

    folder = tmp_path_factory.mktemp("embed")
    base, tok = tiny_llama(str(folder / "hf"), smollm)
    (folder / "hf" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "hf" / "1_Pooling").mkdir()
    (folder / "hf" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_lasttoken": False}))
    tuned = _adapter(base, str(folder / "tuned"), 4, seed=4)
    model = dataclasses.replace(lora.attach(load_model(str(folder / "hf")), 1, 8), name="base")
    rc = RunnerConfig(max_num_seqs=4, max_model_len=512, decode_steps=4, kv_cache_gb=0.05, decode_batch_sizes=(4,))
    for api in live_server(model, rc):
        yield api, folder, tok, tuned


def _reference(model, ids: list[int], dims: int | None = None) -> np.ndarray:
    """sentence-transformers' mean pooling, cut to `dims` and normalized, of `model`'s final hidden states."""
    with torch.no_grad():
        x = model(torch.tensor([ids])).last_hidden_state[0].numpy().mean(0)[:dims]
    return x / np.linalg.norm(x)


def test_embeddings_api_through_the_openai_client(served):
    """`/v1/embeddings` as the `openai` client calls it (base64 by default, floats when asked): strings, token ids
    and batches, pooled as the folder's sentence-transformers modules ask, equal transformers' vectors; `dimensions`
    cuts and normalizes again; a LoRA adapter's name gives PEFT's; bad input gets a 400 and another model a 404."""
    import openai

    api, folder, tok, tuned = served
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x")
    texts = ["The capital of France is", "Embeddings map text to vectors.", "hi"]
    base = tuned.get_base_model().model
    with tuned.disable_adapter():
        want = [_reference(base, tok(t).input_ids) for t in texts]
    r = client.embeddings.create(model="base", input=texts)  # the client asks for base64 and decodes it
    assert r.model == "base" and [d.index for d in r.data] == [0, 1, 2]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok(t).input_ids) for t in texts)
    for d, w in zip(r.data, want):
        assert np.abs(np.asarray(d.embedding) - w).max() < 1e-5
    r = client.embeddings.create(model="base", input=texts[0], encoding_format="float", dimensions=16)
    with tuned.disable_adapter():
        cut = _reference(base, tok(texts[0]).input_ids, 16)
    assert len(r.data) == 1 and np.abs(np.asarray(r.data[0].embedding) - cut).max() < 1e-5
    ids = tok(texts[1]).input_ids
    r = client.embeddings.create(model="base", input=[ids, tok(texts[2]).input_ids], encoding_format="float")
    assert [np.abs(np.asarray(d.embedding) - w).max() < 1e-5 for d, w in zip(r.data, want[1:])] == [True, True]
    assert len(client.embeddings.create(model="base", input=ids).data) == 1  # one list of ids: one input

    req = urllib.request.Request(api.url + "/v1/load_lora_adapter", method="POST", data=json.dumps(
        {"lora_name": "tuned", "lora_path": str(folder / "tuned")}).encode())
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
    r = client.embeddings.create(model="tuned", input=texts[0])
    with torch.no_grad():
        x = tuned.base_model.model.model(torch.tensor([tok(texts[0]).input_ids])).last_hidden_state[0].numpy()
    x = x.mean(0)
    assert r.model == "tuned" and np.abs(np.asarray(r.data[0].embedding) - x / np.linalg.norm(x)).max() < 1e-5
    assert np.abs(x / np.linalg.norm(x) - want[0]).max() > 1e-2  # the adapter changes the vector
    with urllib.request.urlopen(api.url + "/lora-adapters", timeout=120) as resp:  # llama.cpp's pick, at a scale
        ident = json.load(resp)[0]["id"]
    r = client.embeddings.create(model="base", input=texts[0], extra_body={"lora": [{"id": ident, "scale": 0.5}]})
    from test_lora import _set_scale

    _set_scale(tuned, 0.5)
    try:
        with torch.no_grad():
            half = tuned.base_model.model.model(torch.tensor([tok(texts[0]).input_ids])).last_hidden_state[0]
    finally:
        _set_scale(tuned, 1.0)
    half = half.numpy().mean(0)
    assert r.model == "tuned" and np.abs(np.asarray(r.data[0].embedding) - half / np.linalg.norm(half)).max() < 1e-5
    assert np.abs(half / np.linalg.norm(half) - x / np.linalg.norm(x)).max() > 1e-3

    r = client.embeddings.create(model="base", input=[7] * 600, extra_body={"truncate_prompt_tokens": -1,
                                                                             "normalize": False})
    assert r.usage.prompt_tokens == 512 and np.linalg.norm(r.data[0].embedding) != pytest.approx(1.0)
    for kw, param in [(dict(input=[]), "input"), (dict(input=[[1, 2], []]), "input"), (dict(input=""), "input"),
                      (dict(input=[1, 2, len(tok) + 5]), "input"), (dict(input=[7] * 600), "input"),
                      (dict(input=["a", 3]), "input"), (dict(input="a", dimensions=65), "dimensions"),
                      (dict(input="a", encoding_format="int8"), "encoding_format"),
                      (dict(input="a", extra_body={"normalize": "yes"}), "normalize")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="base", **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="a")
    with urllib.request.urlopen(api.url + "/metrics", timeout=60) as resp:
        metrics = resp.read().decode()
    assert "sparkler_embedded_inputs_total 10.0" in metrics

    # Many inputs beside a stream, from two calls at once: embedded a slice (a step's prompt budget, 512 padded
    # tokens) at a time, the slices queued when the engine's turn begins, then a decode step of the stream
    stream = client.completions.create(model="base", prompt="Once upon a time", max_tokens=400, stream=True,
                                       temperature=0.0, extra_body={"ignore_eos": True})
    next(iter(stream))
    aengine, seen, done = api.server.aengine, [], threading.Event()

    def first(engine):  # queues another call while the engine's turn runs the calls: it waits for the next turn
        seen.append(engine.steps_run)
        aengine._calls.put((lambda engine: seen.append(engine.steps_run) or done.set(), Future()))

    aengine._calls.put((first, Future()))
    aengine._wake.set()
    assert done.wait(60) and seen[1] > seen[0]  # a decode step between them
    steps = api.engine.steps_run
    with ThreadPoolExecutor(2) as ex:  # 4 slices of 32 inputs each
        both = list(ex.map(lambda k: client.embeddings.create(
            model="base", input=[[5 + k + i % 50] * 12 for i in range(128)]), range(2)))
    assert [len(r.data) for r in both] == [128, 128] and api.engine.steps_run - steps >= 3
    assert sum(1 for _ in stream) > 0


def test_chat_embeddings_and_vllm_encodings(served):
    """vLLM's chat-form embeddings: `messages` templated as transformers' `apply_chat_template` writes them (no reply
    opened unless `add_generation_prompt`) give transformers' vector of those ids; `embed_dtype` and `endianness`
    shape base64's bytes and the binary bodies (`bytes`: the vectors' bytes with a `metadata` header placing each,
    `bytes_only`: none), each the float vector cast to that dtype; `truncation_side`, `use_activation`; the reply's
    `id` and `created`; bad fields are 400s."""
    import ml_dtypes
    import openai

    api, folder, tok, tuned = served
    base = tuned.get_base_model().model
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is an embedding?"}]
    for opened in (False, True):
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=opened, tokenize=True, return_dict=False))
        with tuned.disable_adapter():
            want = _reference(base, ids)
        extra = {"messages": messages, **({"add_generation_prompt": True} if opened else {})}
        status, out = _post(api.url, "/v1/embeddings", {"model": "base", **extra})
        assert status == 200 and out["usage"]["prompt_tokens"] == len(ids), out
        assert np.abs(np.asarray(out["data"][0]["embedding"]) - want).max() < 1e-5
        assert out["id"].startswith("embd-") and isinstance(out["created"], int)
    floats = np.asarray(out["data"][0]["embedding"], np.float32)

    for dtype, kind in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16), ("fp8_e4m3",
                        ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2), ("float32", np.float32)):
        for order in ("little", "big"):
            status, out = _post(api.url, "/v1/embeddings", {**extra, "encoding_format": "base64",
                                                            "embed_dtype": dtype, "endianness": order})
            raw = np.frombuffer(base64.b64decode(out["data"][0]["embedding"]), np.dtype(kind).newbyteorder(
                "<" if order == "little" else ">") if np.dtype(kind).itemsize > 1 else kind)
            assert status == 200 and raw.tobytes() == floats.astype(kind).astype(raw.dtype).tobytes(), (dtype, order)
    body = {"model": "base", "input": ["hi", "The capital of France is"], "encoding_format": "bytes",
            "embed_dtype": "float16"}
    req = urllib.request.Request(api.url + "/v1/embeddings", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        blob, meta = resp.read(), json.loads(resp.headers["metadata"])
        assert resp.headers["Content-Type"] == "application/octet-stream"
    floats = [np.asarray(d.embedding, np.float32) for d in client.embeddings.create(
        model="base", input=body["input"], encoding_format="float").data]
    assert [(m["index"], m["shape"], m["embed_dtype"]) for m in meta["data"]] == [(0, [64], "float16"),
                                                                                   (1, [64], "float16")]
    for m, f in zip(meta["data"], floats):
        assert np.array_equal(np.frombuffer(blob[m["start"]:m["end"]], np.float16), f.astype(np.float16))
    assert meta["usage"]["prompt_tokens"] == sum(len(tok(t).input_ids) for t in body["input"])
    with urllib.request.urlopen(urllib.request.Request(api.url + "/v1/embeddings", data=json.dumps(
            {**body, "encoding_format": "bytes_only"}).encode(), method="POST"), timeout=120) as resp:
        assert resp.read() == blob and "metadata" not in resp.headers

    long = tok("The capital of France is Paris, and the capital of Spain is Madrid.").input_ids
    for side, kept in (("left", long[-5:]), ("right", long[:5])):
        r = client.embeddings.create(model="base", input=long, encoding_format="float", extra_body={
            "truncate_prompt_tokens": 5, "truncation_side": side})
        with tuned.disable_adapter():
            assert np.abs(np.asarray(r.data[0].embedding) - _reference(base, kept)).max() < 1e-5, side
    r = client.embeddings.create(model="base", input="hi", encoding_format="float",
                                 extra_body={"use_activation": False, "messages": None})  # (null: not given)
    assert np.linalg.norm(r.data[0].embedding) != pytest.approx(1.0)
    for bad, param in (({"input": "a", "messages": messages}, "messages"), ({"messages": "hi"}, "messages"),
                       ({"messages": messages, "add_special_tokens": "no"}, "add_special_tokens"),
                       ({"input": "a", "embed_dtype": "int8"}, "embed_dtype"),
                       ({"input": "a", "embed_dtype": ["float16"]}, "embed_dtype"),
                       ({"input": "a", "encoding_format": 0}, "encoding_format"),
                       ({"input": "a", "endianness": "middle"}, "endianness"),
                       ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
                       ({"input": "a", "truncation_side": "up"}, "truncation_side"),
                       ({"input": "a", "normalize": True, "use_activation": False}, "use_activation"),
                       ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                           "url": "data:image/png;base64,AAAA"}}]}]}, "messages")):
        status, out = _post(api.url, "/v1/embeddings", {"model": "base", **bad})
        assert status == 400 and out["error"]["param"] == param, (bad, out)


def test_vllms_pooling_route(served):
    """vLLM's `/pooling`: each input's pooled vector as `/v1/embeddings` gives it (transformers' mean, normalized;
    `messages` too; base64 of its float32 bytes), as `{"index", "object": "pooling", "data"}`; `classify` on a model
    that is no classifier, per-token tasks and binary encodings are 400s naming the field."""
    api, folder, tok, tuned = served
    base = tuned.get_base_model().model
    texts = ["The capital of France is", "hi"]
    with tuned.disable_adapter():
        want = [_reference(base, tok(t).input_ids) for t in texts]
    status, out = _post(api.url, "/pooling", {"model": "base", "input": texts})
    assert status == 200 and out["id"].startswith("pool-") and out["usage"]["prompt_tokens"] == sum(
        len(tok(t).input_ids) for t in texts)
    assert [(d["index"], d["object"]) for d in out["data"]] == [(0, "pooling"), (1, "pooling")]
    assert all(np.abs(np.asarray(d["data"]) - w).max() < 1e-5 for d, w in zip(out["data"], want))
    status, packed = _post(api.url, "/pooling", {"input": texts[1], "encoding_format": "base64", "task": "embed"})
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["data"]), np.float32)
    assert status == 200 and np.abs(vector - want[1]).max() < 1e-5
    status, chat = _post(api.url, "/pooling", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and len(chat["data"][0]["data"]) == 64
    with urllib.request.urlopen(urllib.request.Request(api.url + "/pooling", data=json.dumps(
            {"input": texts, "encoding_format": "bytes", "embed_dtype": "float16"}).encode()), timeout=120) as resp:
        blob, meta = resp.read(), json.loads(resp.headers["metadata"])  # vLLM's binary body, as for embeddings
    assert meta["id"].startswith("pool-") and meta["usage"] == out["usage"]
    for m, d in zip(meta["data"], out["data"]):
        assert np.array_equal(np.frombuffer(blob[m["start"]:m["end"]], np.float16),
                              np.asarray(d["data"], np.float32).astype(np.float16))
    for body, param in (({"input": "a", "task": "classify"}, "task"), ({"input": "a", "task": "token_embed"}, "task"),
                        ({"input": "a", "encoding_format": "hex"}, "encoding_format"), ({}, "input")):
        status, err = _post(api.url, "/pooling", body)
        assert status == 400 and err["error"]["param"] == param, (body, err)


def test_sglang_encode_route(served):
    """SGLang's `/encode`: `text` or `input_ids`, one or a batch, each `{"embedding", "meta_info"}` of transformers'
    pooled vector (`rid` names them, `dimensions` cuts); bad bodies are 400s naming SGLang's fields, an unknown
    `lora_path` a 404."""
    api, folder, tok, tuned = served
    base = tuned.get_base_model().model
    texts = ["The capital of France is", "hi"]
    ids = [tok(t).input_ids for t in texts]
    with tuned.disable_adapter():
        want = [_reference(base, i) for i in ids]
        cut = _reference(base, ids[1], 16)
    status, out = _post(api.url, "/encode", {"text": texts[0], "rid": "one"})
    assert status == 200 and out["meta_info"]["id"] == "one" and out["meta_info"]["prompt_tokens"] == len(ids[0])
    assert np.abs(np.asarray(out["embedding"]) - want[0]).max() < 1e-5
    status, out = _post(api.url, "/encode", {"input_ids": ids, "rid": ["a", "b"]})
    assert status == 200 and [o["meta_info"]["id"] for o in out] == ["a", "b"]
    assert all(np.abs(np.asarray(o["embedding"]) - w).max() < 1e-5 for o, w in zip(out, want))
    status, out = _post(api.url, "/encode", {"text": [texts[1]], "dimensions": 16})
    assert status == 200 and len(out) == 1 and np.abs(np.asarray(out[0]["embedding"]) - cut).max() < 1e-5
    for body, code, param in (({"text": "a", "input_ids": [1]}, 400, "text"), ({}, 400, "text"),
                              ({"text": []}, 400, "text"), ({"input_ids": [1, len(tok) + 5]}, 400, "input_ids"),
                              ({"text": "a", "image_data": "x.png"}, 400, "image_data"),
                              ({"text": "a", "rid": ["x", "y"]}, 400, "rid"),
                              ({"text": "a", "lora_path": "nowhere"}, 404, "lora_path")):
        status, out = _post(api.url, "/encode", body)
        assert status == code and out["error"]["param"] == param, (body, out)


def test_llama_cpp_embedding_route(served):
    """llama.cpp's own `/embedding` (and `/embeddings`): `content` or `input` as a prompt is given to `/completion`
    (text, ids, both mixed, or several), a list of `{"index", "embedding": [vector]}` of transformers' pooled vector
    normalized by `embd_normalize` (llama.cpp's: none, int16's range, taxicab, Euclidean by default, a p-norm); bad
    bodies are 400s."""
    api, folder, tok, tuned = served
    base = tuned.get_base_model().model
    texts = ["The capital of France is", "hi"]
    ids = [tok(t).input_ids for t in texts]
    with tuned.disable_adapter(), torch.no_grad():
        raw = [base(torch.tensor([i])).last_hidden_state[0].numpy().mean(0).astype(np.float64) for i in ids]
    scaled = {-1: lambda v: v, 0: lambda v: v * 32760.0 / np.abs(v).max(), 1: lambda v: v / np.abs(v).sum(),
              2: lambda v: v / np.sqrt((v * v).sum()), 3: lambda v: v / (np.abs(v) ** 3).sum() ** (1 / 3)}

    def post(path, body):
        req = urllib.request.Request(api.url + path, data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, out = post("/embedding", {"content": texts[0]})
    assert status == 200 and [x["index"] for x in out] == [0] and len(out[0]["embedding"]) == 1
    assert np.abs(np.asarray(out[0]["embedding"][0]) - scaled[2](raw[0])).max() < 1e-5
    for norm, f in scaled.items():
        status, out = post("/embedding", {"content": texts[1], "embd_normalize": norm})
        got, want = np.asarray(out[0]["embedding"][0]), f(raw[1])
        assert status == 200 and np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), norm
    cut = next(i for i in range(1, len(ids[0])) if tok.decode(ids[0][i:]) == texts[0][len(tok.decode(ids[0][:i])):])
    mixed = ids[0][:cut] + [tok.decode(ids[0][cut:])]  # ids, then the rest as text (tokenized without specials)
    assert tok(texts[0]).input_ids == ids[0][:cut] + tok(tok.decode(ids[0][cut:]), add_special_tokens=False).input_ids
    for path, body in (("/embedding", {"content": texts}), ("/embeddings", {"input": [ids[0], texts[1]]}),
                       ("/embedding", {"content": [mixed, ids[1]]})):
        status, out = post(path, body)
        assert status == 200 and [x["index"] for x in out] == [0, 1], body
        for x, r in zip(out, raw):
            assert np.abs(np.asarray(x["embedding"][0]) - scaled[2](r)).max() < 1e-5, body
    for body, param in (({}, "content"), ({"content": None}, "content"), ({"content": []}, "content"),
                        ({"input": 5}, "input"), ({"content": "a", "embd_normalize": -2}, "embd_normalize"),
                        ({"content": "a", "embd_normalize": "2"}, "embd_normalize"),
                        ({"content": [1, len(tok) + 5]}, "content")):
        status, out = post("/embedding", body)
        assert status == 400 and out["error"]["param"] == param, body


def test_score_and_rerank_through_the_cohere_client(served):
    """`/v2/rerank` as the official `cohere` client calls it, `/v1/rerank` and vLLM's `/v1/score`: each pair's score
    is the cosine of transformers' pooled vectors of its two texts, the results ordered and cut to `top_n`; bad
    input gets a 400 in the API's error shape."""
    import cohere

    api, folder, tok, tuned = served
    query, docs = "Where is Paris?", ["Paris is in France.", "Bananas are yellow.", "The capital of France", "hi"]
    with tuned.disable_adapter():
        vec = {t: _reference(tuned.get_base_model().model, tok(t).input_ids) for t in [query] + docs}
    want = [float(vec[query] @ vec[d]) for d in docs]
    order = sorted(range(len(docs)), key=lambda i: -want[i])
    co = cohere.ClientV2(api_key="x", base_url=api.url)
    r = co.rerank(model="base", query=query, documents=docs, top_n=3)
    assert [x.index for x in r.results] == order[:3] and getattr(r.results[0], "document", None) is None
    assert np.allclose([x.relevance_score for x in r.results], [want[i] for i in order[:3]], atol=1e-5)
    r = co.rerank(model="base", query=query, documents=docs, max_tokens_per_doc=2)  # each document's first 2 tokens
    ends = [tok(d, add_special_tokens=False, return_offsets_mapping=True).offset_mapping[:2][-1][1] for d in docs]
    with tuned.disable_adapter():
        cut = {i: _reference(tuned.get_base_model().model, tok(d[:end]).input_ids)
               for i, (d, end) in enumerate(zip(docs, ends))}
    assert np.allclose([x.relevance_score for x in r.results], [vec[query] @ cut[x.index] for x in r.results],
                       atol=1e-5)
    with pytest.raises(cohere.BadRequestError) as e:
        co.rerank(model="base", query=query, documents=[])
    assert e.value.body["error"]["param"] == "documents"

    post = functools.partial(_post, api.url)

    status, r = post("/v1/rerank", {"model": "base", "query": query, "documents": [{"text": d} for d in docs],
                                    "return_documents": False})
    assert status == 200 and [x["index"] for x in r["results"]] == order and "document" not in r["results"][0]
    status, same = post("/reranking", {"model": "base", "query": query, "documents": docs, "top_n": 2})  # llama.cpp's
    assert status == 200 and [x["index"] for x in same["results"]] == order[:2]
    assert r["usage"]["total_tokens"] == sum(len(tok(t).input_ids) for t in [query] + docs)
    status, r = post("/v1/score", {"model": "base", "text_1": query, "text_2": docs})  # one against each
    assert status == 200 and r["object"] == "list" and [d["index"] for d in r["data"]] == [0, 1, 2, 3]
    assert np.allclose([d["score"] for d in r["data"]], want, atol=1e-5)
    assert r["usage"]["prompt_tokens"] == sum(len(tok(t).input_ids) for t in [query] + docs)  # the query once
    status, r = post("/score", {"model": "base", "text_1": docs[:2], "text_2": docs[2:]})  # item by item
    assert status == 200 and np.allclose([d["score"] for d in r["data"]],
                                         [vec[docs[0]] @ vec[docs[2]], vec[docs[1]] @ vec[docs[3]]], atol=1e-5)
    for one, two in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):  # vLLM's newer names
        status, r = post("/v1/score", {"model": "base", one: query, two: docs})
        assert status == 200 and np.allclose([d["score"] for d in r["data"]], want, atol=1e-5), one
    status, r = post("/v1/score", {"queries": docs[:2], "documents": docs[:3]})
    assert status == 400 and r["error"]["param"] == "queries" and "'documents' 3" in r["error"]["message"]
    for path, body, param in [("/v1/score", {"text_1": docs[:2], "text_2": docs[:3]}, "text_1"),
                              ("/v1/score", {"text_1": "a", "text_2": [3]}, "text_2"),
                              ("/v1/score", {"text_1": "a", "text_2": ""}, "text_2"),
                              ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
                              ("/v1/rerank", {"query": "a", "documents": ["a"], "top_n": -1}, "top_n"),
                              ("/v1/rerank", {"query": "a", "documents": ["a", {"text": 3}]}, "documents"),
                              ("/v1/rerank", {"query": "a", "documents": ["a"], "max_tokens_per_doc": 0},
                               "max_tokens_per_doc")]:
        status, r = post(path, {"model": "base", **body})
        assert status == 400 and r["error"]["param"] == param, (body, r)
    assert post("/v1/score", {"model": "other", "text_1": "a", "text_2": "b"})[0] == 404


def test_a_cross_encoder_scores_pairs_as_transformers(smollm, tmp_path, monkeypatch):
    """A reranker saved as `LlamaForSequenceClassification` (one label): `LLM.score`, `/v1/score`, the rerank API
    through the `cohere` client and `/classify` give transformers' sigmoid of its head over each pair as the tokenizer
    joins them; a head of three labels classifies by softmax."""
    import cohere
    import transformers
    from scipy.special import softmax

    from conftest import live_server
    from engine import LLM

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(smollm.tokenizer.folder)
    tok.save_pretrained(folder)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   num_labels=1)
    torch.manual_seed(0)
    ref = transformers.AutoModelForSequenceClassification.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.08)
        ref.score.weight.mul_(20)  # relevances spread over (0, 1)
    ref.save_pretrained(folder, safe_serialization=True)
    query, docs = "Where is Paris?", ["Paris is in France.", "Bananas are yellow.", "The capital of France", "hi"]
    with torch.no_grad():
        want = [float(torch.sigmoid(ref(**tok(query, d, return_tensors="pt")).logits[0, 0])) for d in docs]
    assert max(want) - min(want) > 0.05
    order = sorted(range(len(docs)), key=lambda i: -want[i])
    model = load_model(folder)
    assert pooling.default(folder) == ("last", False)
    llm = LLM(model, max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01)
    assert np.allclose(llm.score(query, docs), want, atol=1e-5)
    del llm

    rc = RunnerConfig(max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01, decode_batch_sizes=(2,))
    for api in live_server(dataclasses.replace(model, name="rr"), rc, pooling="mean"):  # a head reads the last token
        r = cohere.ClientV2(api_key="x", base_url=api.url).rerank(model="rr", query=query, documents=docs, top_n=2)
        assert [x.index for x in r.results] == order[:2]
        assert np.allclose([x.relevance_score for x in r.results], [want[i] for i in order[:2]], atol=1e-5)
        status, r = _post(api.url, "/v1/score", {"model": "rr", "text_1": [query] * 2, "text_2": docs[:2]})
        assert status == 200 and np.allclose([d["score"] for d in r["data"]], want[:2], atol=1e-5)
        status, r = _post(api.url, "/classify", {"model": "rr", "input": ["Paris is in France.", "hi"]})
        with torch.no_grad():
            probs = [float(torch.sigmoid(ref(**tok(t, return_tensors="pt")).logits[0, 0])) for t in (docs[0], "hi")]
        assert status == 200 and [d["num_classes"] for d in r["data"]] == [1, 1]
        assert np.allclose([d["probs"][0] for d in r["data"]], probs, atol=1e-5) and r["data"][0]["label"] == "LABEL_0"
        status, same = _post(api.url, "/invocations", {"model": "rr", "input": ["Paris is in France.", "hi"]})
        assert status == 200 and same["data"] == r["data"]  # SageMaker's route: `input` on a classifier classifies
        status, pooled = _post(api.url, "/pooling", {"model": "rr", "input": ["Paris is in France.", "hi"]})
        assert status == 200 and [d["data"] for d in pooled["data"]] == [d["probs"] for d in r["data"]]  # vLLM's
        with torch.no_grad():
            logits = [float(ref(**tok(t, return_tensors="pt")).logits[0, 0]) for t in (docs[0], "hi")]
        for route, off in (("/classify", {"use_activation": False}), ("/pooling", {"activation": False})):
            status, raw = _post(api.url, route, {"model": "rr", "input": ["Paris is in France.", "hi"], **off})
            got = [(d.get("probs") or d.get("data"))[0] for d in raw["data"]]  # vLLM's: the head's logits
            assert status == 200 and np.allclose(got, logits, atol=1e-4)
        status, err = _post(api.url, "/classify", {"model": "rr", "input": "hi", "use_activation": "no"})
        assert status == 400 and err["error"]["param"] == "use_activation"
        assert _post(api.url, "/classify", {"model": "rr", "input": []})[0] == 400
        status, r = _post(api.url, "/v1/score", {"model": "rr", "text_1": "a", "text_2": "b",
                                                 "truncate_prompt_tokens": 4})
        assert status == 400 and r["error"]["param"] == "truncate_prompt_tokens"  # it would cut the query
    logits = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    assert np.allclose(pooling.probabilities(logits), softmax(logits, -1), atol=1e-6)


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    """POST a JSON body; the status and the JSON reply (an error's too)."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_pooling_follows_what_the_model_asks(smollm_path, tmp_path, caplog):
    """A GGUF without a pooling type, and a folder without sentence-transformers' modules: the last token,
    normalized; a GGUF's type and a folder's modules are followed; what cannot be followed is a warning."""
    assert pooling.default(smollm_path) == ("last", True)
    assert [pooling.from_gguf(t) for t in (0, 1, 2, 3, 4)] == ["last", "mean", "cls", "last", "last"]
    meta = {"general.architecture": "qwen3", "qwen3.pooling_type": 1, "qwen3.attention.head_count": 4,
            "qwen3.embedding_length": 64, "qwen3.vocab_size": 256, "qwen3.block_count": 2}
    assert gguf_config(meta, {})["pooling_type"] == 1  # kept in the remembered config: read without a parse
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    assert pooling.default(str(tmp_path)) == ("last", True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling.default(str(tmp_path)) == ("cls", False) and not caplog.records
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "is_causal": False}))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    modules = json.loads((tmp_path / "modules.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps(modules + [
        {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    assert pooling.default(str(tmp_path)) == ("last", False)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "bidirectional" in said and "pooling_mode_weightedmean_tokens" in said and "models.Dense" in said
