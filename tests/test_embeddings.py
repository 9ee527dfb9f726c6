"""Embeddings against `transformers` on the same weights (the base model's last hidden states, pooled as
sentence-transformers pools them), beside generation in one engine, and `/v1/embeddings` through the official
`openai` client over a real socket."""

import numpy as np
import pytest
import torch

from engine.params import InvalidRequest, SamplingParams
from engine.runner import RunnerConfig
from models import load_model, pooling
from test_models import ROWS, _hf_model

LONG = [int(t) for t in np.random.default_rng(3).integers(1, 250, 100)]  # past the first length buckets


def _pooled(ref, rows, mode: str) -> np.ndarray:
    """transformers' final hidden states of each row (alone, unpadded), pooled."""
    out = []
    for row in rows:
        with torch.no_grad():
            x = ref.model(torch.tensor([row])).last_hidden_state[0].numpy()
        out.append({"last": x[-1], "mean": x.mean(0), "cls": x[0]}[mode])
    return np.stack(out)


@pytest.mark.quick_compile
@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_embeddings_match_transformers(kind, tmp_path, monkeypatch):
    """Every pooling of inputs of several lengths, batched and padded together (and alone), equals transformers'
    hidden states pooled; the same shapes again need no other program."""
    from engine.engine import Engine

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    ref = _hf_model(kind, str(tmp_path / "hf"))
    model = load_model(str(tmp_path / "hf"), with_tokenizer=False)
    eng = Engine(model, RunnerConfig(max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01))
    rows = ROWS + [LONG, ROWS[0] * 2]
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
    assert eng.stats()["embedded_inputs"] == 3 * (2 * len(rows) + 2)


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
        with pytest.raises(InvalidRequest, match="context holds 128"):
            eng.embed([[1] * 129], "last")
        with pytest.raises(InvalidRequest, match="pooling"):
            eng.embed([[1]], "max")
        with pytest.raises(InvalidRequest, match="no LoRA adapter 'x'"):
            eng.embed([[1]], "last", adapter="x")
        return [r.choices[0].token_ids for r in reqs]

    assert run(True) == run(False)
