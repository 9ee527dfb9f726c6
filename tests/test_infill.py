"""Fill in the middle: OpenAI's completions `suffix` through the `openai` client and llama.cpp's `/infill` over a
real socket, on a tiny random code model whose vocabulary has Qwen2.5-Coder's FIM tokens, against transformers'
greedy tokens over the published prompt layout; and the clear errors of a model without those tokens."""

import dataclasses

import openai
import pytest
import torch

from engine.runner import RunnerConfig
from helpers import tiny_llama
from models import load_model
from models.loading.tokenizer import Fim
from server import infill
from test_server import http

FIM = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
       "\u2581<EOT>"]  # Qwen2.5-Coder's, and CodeLlama's end of an infill
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def coder(smollm, tmp_path_factory):
    """A live server over a 2-layer random Llama whose tokenizer is SmolLM2's plus Qwen2.5-Coder's FIM tokens, with
    the transformers model of the same weights (128-token context)."""
    from conftest import live_server

    folder = str(tmp_path_factory.mktemp("coder"))
    _, ref = tiny_llama(folder, smollm.tokenizer.folder, FIM, scale=0.1)
    model = dataclasses.replace(load_model(folder), name="coder")
    rc = RunnerConfig(max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01, decode_batch_sizes=(2,))
    for api in live_server(model, rc):
        api.ref = ref
        yield api


def _greedy(ref, ids: list[int], n: int, ends: set[int]) -> list[int]:
    """transformers' greedy tokens after `ids`: at most `n`, the last an ending token if one came."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(ref(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(t)
            if t in ends:
                break
    return out


def test_the_vocabulary_names_its_fim_tokens(coder, smollm):
    """`Tokenizer.fim` finds each role by name; SmolLM2 has a repository and a file token but no prefix, suffix or
    middle, so it cannot infill."""
    tok = coder.model.tokenizer
    ids = tok.convert_tokens_to_ids(FIM)
    assert tok.fim == Fim(pre=ids[0], mid=ids[1], suf=ids[2], pad=ids[3], rep=ids[4], sep=ids[5], eot=ids[6])
    assert tok.fim.ends == ids[3:]
    assert smollm.tokenizer.fim is None


def test_suffix_fills_the_middle_through_the_openai_client(coder):
    """`suffix`: the prompt `<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>` (no BOS: this tokenizer adds
    none), its greedy middle as transformers', token for token; the FIM padding token ends it as the end of sequence
    does (a plain completion goes on past it); echo with a suffix is a 400."""
    tok, fim = coder.model.tokenizer, coder.model.tokenizer.fim
    client = openai.OpenAI(base_url=coder.url + "/v1", api_key="x")
    ids = [fim.pre, *tok.encode(PREFIX, add_special_tokens=False), fim.suf,
           *tok.encode(SUFFIX, add_special_tokens=False), fim.mid]
    r = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True})
    got = r.choices[0].model_extra["token_ids"]
    assert r.usage.prompt_tokens == len(ids)
    assert got == _greedy(coder.ref, ids, 6, {*coder.model.eos_ids, *fim.ends})
    bias = {str(fim.pad): 100}
    r = client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=6, logit_bias=bias)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == "" and r.usage.completion_tokens == 1
    r = client.completions.create(model="coder", prompt=PREFIX, max_tokens=6, logit_bias=bias)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=2, echo=True)
    assert e.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="coder", prompt=PREFIX, suffix=SUFFIX, max_tokens=2,
                                  extra_body={"truncate_prompt_tokens": 8})
    assert e.value.body["param"] == "truncate_prompt_tokens"


def test_llama_cpp_infill_with_other_files_and_a_cut(coder):
    """`/infill`: the repository-level prompt as llama.cpp builds it, written out here from its layout; the reply in
    `/completion`'s shape with transformers' greedy tokens, whole and streamed; past the context, the oldest files go
    first, then the prefix's start and the suffix's end (the suffix keeping a quarter of the room); bad
    `input_extra` is a 400."""
    tok, fim = coder.model.tokenizer, coder.model.tokenizer.fim
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "return",
            "input_extra": [{"filename": "util.py", "text": "x = 1\n"}], "n_predict": 5, "temperature": 0,
            "return_tokens": True}
    want_text = (f"<|repo_name|>{infill.PROJECT}\n<|file_sep|>util.py\nx = 1\n<|file_sep|>{infill.FILE}\n"
                 f"<|fim_prefix|>{PREFIX}return<|fim_suffix|>{SUFFIX}<|fim_middle|>")
    encode = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    want = [fim.rep, *encode(infill.PROJECT + "\n"), fim.sep, *encode("util.py\n"), *encode("x = 1\n"), fim.sep,
            *encode(infill.FILE + "\n"), fim.pre, *encode(PREFIX), *encode("return"), fim.suf, *encode(SUFFIX),
            fim.mid]
    assert tok.decode(want) == want_text
    status, r, _ = http(coder, "POST", "/infill", body)
    assert status == 200 and r["prompt"] == want_text and r["tokens_evaluated"] == len(want), r
    assert r["tokens"] == _greedy(coder.ref, want, 5, {*coder.model.eos_ids, *fim.ends})
    assert r["content"] == tok.decode(r["tokens"]) and r["stop"] is True

    from test_apis import _stream_lines
    lines = _stream_lines(coder, "/infill", {**body, "stream": True})
    assert sum((c["tokens"] for c in lines[:-1]), []) == r["tokens"] and lines[-1]["tokens_predicted"] == 5

    # 128 positions less 8 for the reply: 120. The other file goes, the prefix keeps its end and the suffix its start
    long_prefix, long_suffix = "a = 1\n" * 60, "b = 2\n" * 60
    cut = {"input_prefix": long_prefix, "input_suffix": long_suffix, "input_extra": [{"text": "c = 3\n" * 10}],
           "n_predict": 8, "temperature": 0, "return_tokens": True}
    status, r, _ = http(coder, "POST", "/infill", cut)
    p, s = encode(long_prefix), encode(long_suffix)
    avail = 120 - 3
    assert len(p) > avail and len(s) > avail
    want = [fim.pre, *p[-(avail - avail // 4):], fim.suf, *s[:avail // 4], fim.mid]
    assert status == 200 and r["tokens_evaluated"] == 120 and r["prompt"] == tok.decode(want), r
    assert infill.arrange(tok, p[:10], s, room=120) == [fim.pre, *p[:10], fim.suf, *s[:107], fim.mid]

    for extra in ([{"text": 3}], {"text": "x"}, ["x"]):
        status, r, _ = http(coder, "POST", "/infill", {**body, "input_extra": extra})
        assert status == 400 and r["error"]["param"] == "input_extra", r
    status, r, _ = http(coder, "POST", "/infill", {**body, "input_prefix": {"a": 1}})
    assert status == 400 and r["error"]["param"] == "input_prefix"
    status, r, _ = http(coder, "POST", "/infill", {**body, "prompt": "x " * 200})
    assert status == 400 and r["error"]["param"] == "prompt"
    status, r, _ = http(coder, "POST", "/infill", {**body, "n_predict": 126})
    assert status == 400 and r["error"]["param"] == "n_predict"
    status, r, _ = http(coder, "POST", "/infill", {**body, "input_suffix": None, "input_extra": None})
    bare = [fim.rep, *encode(infill.PROJECT + "\n"), fim.sep, *encode(infill.FILE + "\n"), fim.pre, *encode(PREFIX),
            *encode("return"), fim.suf, fim.mid]  # null is none; the project's and file's lines come all the same
    assert status == 200 and r["prompt"] == tok.decode(bare) and r["tokens_evaluated"] == len(bare), r


def test_a_model_without_fim_tokens_says_so(api, client):
    """On SmolLM2 (no FIM tokens): `suffix` is a 400 naming it, `/infill` llama.cpp's 501, a chat `suffix` a 400;
    an empty suffix is none (OpenAI's default)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=api.model.name, prompt="def f(", suffix="):", max_tokens=2)
    assert e.value.body["param"] == "suffix" and "fill-in-the-middle tokens" in e.value.body["message"]
    r = client.completions.create(model=api.model.name, prompt="def f(", suffix="", max_tokens=2)
    assert r.usage.completion_tokens == 2
    status, r, _ = http(api, "POST", "/infill", {"input_prefix": "def f(", "input_suffix": "):"})
    assert status == 501 and r["error"]["type"] == "not_supported_error" and "Infill" in r["error"]["message"]
    status, r, _ = http(api, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                            "suffix": "x"})
    assert status == 400 and r["error"]["param"] == "suffix"
