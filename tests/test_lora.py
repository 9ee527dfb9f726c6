"""LoRA adapters against `peft` on the same weights: the model's logits, the engine's tokens with adapters and the
base model mixed in one batch, the adapters' lifecycle, and the server's routes over the official client."""

import dataclasses
import json
import os

import urllib.error
import urllib.request

import anthropic
import jax
import numpy as np
import openai
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from engine.params import InvalidRequest, SamplingParams
from engine.runner import RunnerConfig
from helpers import gguf_adapter, run_all
from models import load_model, lora
from models.backends.paged import KVCache
from test_models import ROWS, _hf_model
from test_page import CHROMIUM, DRIVER, ask, browser, set_field, until  # noqa: F401  (browser: the page's fixture)

pytestmark = pytest.mark.quick_compile  # tiny random models: XLA optimizations off (conftest)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(base, folder, r: int, targets=ALL, seed: int = 1, **config) -> torch.nn.Module:
    """A PEFT LoRA adapter of `base` with random A and B (B is zeros by default: no effect to test), saved to
    `folder`; returns the PEFT model (base and adapter)."""
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * (0.3 if "lora_B" in name else 0.1))
    pm.save_pretrained(folder)
    return pm.eval()


def _set_scale(pm, scale: float, adapter: str = "default") -> None:
    """Every LoRA layer of PEFT model `pm` at `scale` times `adapter`'s own scale (llama.cpp's scale)."""
    from peft.tuners.lora.layer import LoraLayer

    for m in pm.modules():
        if isinstance(m, LoraLayer):
            m.set_scale(adapter, scale)


def _mixed(base, mix: dict[str, float]) -> torch.nn.Module:
    """PEFT's model of `base` with several adapters active at once (`{folder: scale}`, each scale a multiple of the
    adapter's own, `set_scale`): the reference of llama.cpp's mixes. `unload()` gives `base` back."""
    from peft import PeftModel

    names = [f"m{i}" for i in range(len(mix))]
    pm = None
    for name, folder in zip(names, mix):
        if pm is None:
            pm = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            pm.load_adapter(folder, adapter_name=name)
    pm.base_model.set_adapter(names)
    for name, scale in zip(names, mix.values()):
        _set_scale(pm, scale, name)
    return pm.eval()


def _logits(model, params, rows, adapters, scales):
    """Logits of each row (one right-padded batch, `helpers.our_logits`' layout) with each row's LoRA slots and
    scales (`[rows, M]`)."""
    b, s = len(rows), max(map(len, rows))
    toks = np.zeros((b, s), np.int32)
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    n = -(-s // 16)
    table = 1 + np.arange(b * n, dtype=np.int32).reshape(b, n)
    fn = jax.jit(lambda p, a: model.module.apply(p, toks, pos, table, KVCache.zeros(model.cfg, 1 + b * n, 16), None,
                                                 True, a)[0])
    out = np.asarray(fn(params, (np.asarray(adapters, np.int32)[:, None], np.asarray(scales, np.float32)[:, None])))
    # (each row's `[1, M]`: broadcast over its tokens)
    return [out[i, :len(r)] for i, r in enumerate(rows)]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_adapter_logits_match_peft(kind, tmp_path, monkeypatch):
    """Rows with an adapter match PEFT's model with it, rows without match the base model, in one batch; an adapter
    of lower rank than the slots' (padded) and one over some projections only (rsLoRA's scale) too, a row at
    another scale (llama.cpp's) matches PEFT's model at it (`set_scale`), and a row mixing both adapters (llama.cpp's
    mixes) PEFT's model with both active."""
    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    base = _hf_model(kind, str(tmp_path / "hf"))
    with torch.no_grad():
        plain = [base(torch.tensor([r])).logits[0].numpy() for r in ROWS]
    model = lora.attach(load_model(str(tmp_path / "hf"), with_tokenizer=False), 3, 8)
    params = model.params
    wants = []
    for slot, (r, targets, extra) in enumerate([(4, ALL, {}), (8, ["q_proj", "v_proj"], {"use_rslora": True})]):
        pm = _adapter(base, str(tmp_path / f"a{slot}"), r, targets, seed=slot, **extra)
        with torch.no_grad():
            wants.append([pm(torch.tensor([row])).logits[0].numpy() for row in ROWS])
            if slot == 0:
                _set_scale(pm, -0.5)
                rescaled = pm(torch.tensor([ROWS[0]])).logits[0].numpy()
        base = pm.unload()  # the base model again, for the next adapter
        peft = lora.read(str(tmp_path / f"a{slot}"), model)
        params = lora.install(params, slot, peft)
        # the same adapter as llama.cpp converts it (a GGUF file) reads to the same slot, at llama.cpp's scale
        # (alpha / r: rsLoRA's alpha / sqrt(r) is not kept in the file)
        cfg = base.config
        gguf_adapter(str(tmp_path / f"a{slot}"), str(tmp_path / f"a{slot}.gguf"), kind, cfg.num_hidden_layers,
                     cfg.num_attention_heads, cfg.num_key_value_heads)
        converted = lora.read(str(tmp_path / f"a{slot}.gguf"), model)
        assert converted.rank == peft.rank == r and converted.scale == 2.0  # lora_alpha = 2r
        ratio = converted.scale / peft.scale
        for (where, g), p in zip(jax.tree_util.tree_leaves_with_path(converted.tree), jax.tree.leaves(peft.tree)):
            np.testing.assert_allclose(g, p * (ratio if "lora_b" in str(where) else 1.0), rtol=1e-6, atol=1e-7)
    both = _mixed(base, {str(tmp_path / "a0"): -0.5, str(tmp_path / "a1"): 1.0})
    with torch.no_grad():
        mixed = both(torch.tensor([ROWS[0]])).logits[0].numpy()
    for adapters, scales, wanted in [([[0], [1], [-1]], [[-0.5], [1], [1]], [rescaled, wants[1][1], plain[2]]),
                                     ([[1], [-1], [0]], [[1], [1], [1]], [wants[1][0], plain[1], wants[0][2]]),
                                     ([[0, 1], [-1, -1], [1, -1]], [[-0.5, 1], [1, 1], [1, 1]],
                                      [mixed, plain[1], wants[1][2]])]:
        got = _logits(model, params, ROWS, adapters, scales)
        for i, (g, want) in enumerate(zip(got, wanted)):
            scale = np.abs(want).max()
            assert np.abs(g - want).max() <= 1e-4 * scale, (kind, adapters, i)
            if adapters[i][0] >= 0:  # the adapter changes the logits (a test that would pass without it would
                assert np.abs(want - plain[i]).max() > 1e-2 * scale  # prove nothing)
    assert np.abs(mixed - rescaled).max() > 1e-2 * np.abs(mixed).max()  # (the second adapter matters in the mix)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13] * 3, [1, 2, 3], [200, 100, 50, 25, 12, 6, 3] * 5]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A random Llama folder, two adapters of it and each one's greedy continuations (and the base model's)."""
    folder = tmp_path_factory.mktemp("lora")
    base = _hf_model("llama", str(folder / "hf"))
    want = {None: [_greedy(base, p, 10) for p in PROMPTS]}
    for name, r in (("a", 4), ("b", 8)):
        pm = _adapter(base, str(folder / name), r, seed=r)
        want[name] = [_greedy(pm, p, 10) for p in PROMPTS]
        if name == "a":  # at half its scale (llama.cpp's per-request scale)
            _set_scale(pm, 0.5)
            want["a", 0.5] = [_greedy(pm, p, 10) for p in PROMPTS]
        base = pm.unload()
    both = _mixed(base, {str(folder / "a"): 1.0, str(folder / "b"): -0.5})  # llama.cpp's mixes
    want["mix"] = [_greedy(both, p, 10) for p in PROMPTS]
    both.unload()
    return folder, want


def test_a_long_input_embeds_in_pieces_on_its_one_adapter(adapters, monkeypatch, tmp_path):
    """An input past a call's budget embeds in pieces on its adapter as it does whole, and on a mix of two adapters
    (PEFT's hidden states with both active) too; an adapter loaded anew between two pieces is an InvalidRequest (the
    server's 404), never a vector of both loads' keys."""
    from engine.engine import Engine
    from engine.runner import Pieces

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    folder, _ = adapters
    model = lora.attach(load_model(str(folder / "hf"), with_tokenizer=False), 2, 8)
    eng = Engine(model, RunnerConfig(max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01))
    tuned = lora.read(str(folder / "a"), model)
    eng.load_adapter("a", tuned)
    ids = list(range(5, 105))
    whole = eng.embed([ids], "mean", adapter="a")[0]
    pieces = Pieces(ids, "mean", eng.runner.piece_size(32))
    while not pieces.done:
        eng.embed_next(pieces, "a")
    scale = np.abs(whole).max()
    assert eng.runner._embed_piece.calls == 4 and np.abs(pieces.pooled - whole).max() <= 1e-4 * scale
    assert np.abs(eng.embed([ids], "mean")[0] - whole).max() > 1e-2 * scale  # the adapter matters
    eng.load_adapter("b", lora.read(str(folder / "b"), model))
    mix = {"a": 1.0, "b": -0.5}
    both = _mixed(transformers.AutoModelForCausalLM.from_pretrained(str(folder / "hf")).float().eval(),
                  {str(folder / "a"): 1.0, str(folder / "b"): -0.5})
    with torch.no_grad():
        want = both.base_model.model.model(torch.tensor([ids])).last_hidden_state[0].numpy().mean(0)
    pieces = Pieces(ids, "mean", eng.runner.piece_size(32))
    while not pieces.done:
        eng.embed_next(pieces, mix)
    for got in (eng.embed([ids], "mean", adapter=mix)[0], pieces.pooled):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(want - whole).max() > 1e-2 * scale  # (b's term matters)
    pieces = Pieces(ids, "mean", eng.runner.piece_size(32))
    eng.embed_next(pieces, "a")
    eng.unload_adapter("a")
    eng.load_adapter("a", tuned)
    with pytest.raises(InvalidRequest, match="changed while the input was embedded"):
        eng.embed_next(pieces, "a")


@pytest.mark.parametrize("flat", [False, True])
def test_engine_mixes_adapters_and_base_in_one_batch(adapters, flat, monkeypatch, tmp_path):
    """Greedy tokens equal PEFT's for each adapter (at its own scale and at half of it) and the base model's
    without, all in one batch, and for a mix of both adapters (PEFT's with both active) in a batch beside one and
    none; a prompt cached under one adapter, scale or mix is not reused under another (its K/V differ), and is under
    the same one; loading another adapter compiles nothing; bad scales are InvalidRequests."""
    from engine.engine import Engine

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    folder, want = adapters
    model = lora.attach(load_model(str(folder / "hf"), with_tokenizer=False), 2, 8)
    eng = Engine(model, RunnerConfig(max_num_seqs=8, max_model_len=128, decode_steps=4, kv_cache_gb=0.01,
                                     flat_step=flat))
    eng.load_adapter("a", lora.read(str(folder / "a"), model))
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    names = ["a", None, ("a", 0.5), None, "a", ("a", 0.5)]
    reqs = [eng.make_request(p, sp, adapter={n[0]: n[1]} if isinstance(n, tuple) else n)
            for p, n in zip(PROMPTS * 2, names)]
    for r in reqs:
        eng.add(r)
    while eng.has_work():
        eng.step()
    for r, n, i in zip(reqs, names, [0, 1, 2, 0, 1, 2]):
        assert r.choices[0].token_ids == want[n][i], (n, i)
    assert want["a", 0.5] != want["a"]
    run_all(eng, [list(range(60, 99))], [sp], adapter="a")  # a new prompt alone: its shapes compiled
    compiles = eng.runner.compiles
    eng.load_adapter("b", lora.read(str(folder / "b"), model))
    run_all(eng, [list(range(100, 139))], [sp], adapter="b")  # the same shapes, another adapter: nothing compiled
    assert eng.runner.compiles == compiles
    again = run_all(eng, [PROMPTS[0]], [sp], adapter="b") + run_all(eng, [PROMPTS[0]], [sp], adapter="a")
    assert [r.choices[0].token_ids for r in again] == [want["b"][0], want["a"][0]]
    assert again[0].cached_tokens == 0 and again[1].cached_tokens >= 32  # b's first sight; a's pages again
    halved = [run_all(eng, [PROMPTS[0]], [sp], adapter={"a": 0.5, "b": 0})[0] for _ in range(2)]  # (b at 0: not on)
    assert [r.choices[0].token_ids for r in halved] == [want["a", 0.5][0]] * 2
    assert halved[0].cached_tokens == 0 and halved[1].cached_tokens >= 32  # not a's pages at 1; its own again
    mix = {"b": -0.5, "a": 1.0}  # both adapters on each token of a row, beside a row on one and one on none
    for turn in range(2):
        reqs = [eng.make_request(p, sp, adapter=n) for p, n in zip(PROMPTS, [mix, "b", None])]
        for r in reqs:
            eng.add(r)
        while eng.has_work():
            eng.step()
        assert [r.choices[0].token_ids for r in reqs] == [want["mix"][0], want["b"][1], want[None][2]]
        assert (reqs[0].cached_tokens >= 32) == (turn == 1)  # not a's pages, nor b's; its own the second time
    widths = {key[0][-1][0][0][-1] for key in eng.runner._decode.exes if key[0][-1] is not None}
    assert widths == {1, 2}  # (the adapters' `[slots, M]`: one a row, and every slot where a row mixes)
    warmed = lambda jobs: {args[-1][0].shape[-1] for fn, args, _ in jobs  # noqa: E731
                           if fn is eng.runner._decode and args[-1] is not None}
    assert warmed(eng.runner.first_jobs()) == {1} and warmed(eng.runner.warm_jobs()) == {1, 2}  # (mixes: behind)
    for bad in (float("nan"), 1e300, 10 ** 400, "2"):
        with pytest.raises(InvalidRequest, match="within"):
            eng.make_request(PROMPTS[0], sp, adapter={"a": bad})
    with pytest.raises(InvalidRequest, match="no LoRA adapter 'c'"):
        eng.make_request(PROMPTS[0], sp, adapter={"a": 1.0, "c": 1.0})


def test_adapter_lifecycle_and_errors(adapters, monkeypatch, tmp_path):
    """What an adapter folder or GGUF file may not be, and the slots: a name is loaded once, a full set of slots
    refuses another, an unloaded adapter stays with the requests using it until they end."""
    from engine.engine import Engine

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    folder, want = adapters
    model = lora.attach(load_model(str(folder / "hf"), with_tokenizer=False), 1, 4)
    with pytest.raises(ValueError, match="rank 8 exceeds --max-lora-rank 4"):
        lora.read(str(folder / "b"), model)
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        lora.read(str(tmp_path), model)
    for change, message in [({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "only LoRA"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save")]:
        bent = tmp_path / f"bent{len(message)}"
        bent.mkdir()
        conf = json.loads((folder / "a" / "adapter_config.json").read_text())
        (bent / "adapter_config.json").write_text(json.dumps({**conf, **change}))
        (bent / "adapter_model.safetensors").write_bytes((folder / "a" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            lora.read(str(bent), model)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "a" / "adapter_model.safetensors"))
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "adapter_config.json").write_text((folder / "a" / "adapter_config.json").read_text())
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)},
              str(tmp_path / "head" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.lora_A.weight is not a LoRA weight"):
        lora.read(str(tmp_path / "head"), model)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))  # a NaN would reach every row of a LoRA step
    save_file({**tensors, key: np.full_like(tensors[key], np.nan)},
              str(tmp_path / "head" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not finite"):
        lora.read(str(tmp_path / "head"), model)
    # GGUF files: llama.cpp's checks (the adapter's architecture, its type), and a tensor of no projection here
    import gguf

    from helpers import close_gguf

    (tmp_path / "text.gguf").write_text("not a GGUF file")
    with pytest.raises(ValueError, match="neither a PEFT adapter folder nor a GGUF adapter file"):
        lora.read(str(tmp_path / "text.gguf"), model)
    lora_kv, a = {"adapter.type": "lora"}, np.zeros((4, 64), np.float32)
    for name, arch, kv, tensor, message in [
            ("model", "llama", {}, ("blk.0.attn_q.weight", a), "not a GGUF LoRA adapter"),
            ("other", "qwen3", lora_kv, ("blk.0.attn_q.weight.lora_a", a), "an adapter of a qwen3 model"),
            ("alien", "alien", lora_kv, ("blk.0.attn_q.weight.lora_a", a), "an adapter of a alien model"),
            ("alora", "llama", {**lora_kv, "adapter.alora.invocation_tokens": "1"}, ("blk.0.attn_q.weight.lora_a", a),
             "an activated LoRA"),
            ("head", "llama", lora_kv, ("output.weight.lora_a", a), "output.weight.lora_a is not a LoRA"),
            ("ints", "llama", lora_kv, ("blk.0.attn_q.weight.lora_a", a.astype(np.int32)), "I32.*does not read")]:
        w = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), arch)
        w.add_type(gguf.GGUFType.ADAPTER if kv else gguf.GGUFType.MODEL)
        for k, v in kv.items():
            w.add_string(k, v)
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
        w.add_tensor(*tensor)
        close_gguf(w)
        with pytest.raises(ValueError, match=message):
            lora.read(str(tmp_path / f"{name}.gguf"), model)
    cfg = model.cfg  # an alpha of 0 is llama.cpp's scale 1
    gguf_adapter(str(folder / "a"), str(tmp_path / "a.gguf"), "llama", cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                 alpha=0.0)
    assert lora.read(str(tmp_path / "a.gguf"), model).scale == 1.0

    eng = Engine(model, RunnerConfig(max_num_seqs=4, max_model_len=128, decode_steps=4, kv_cache_gb=0.01))
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert run_all(eng, [PROMPTS[1]], [sp])[0].choices[0].token_ids == want[None][1]
    variants = lambda: {key[0][-1] is None for key in eng.runner._decode.exes}  # noqa: E731  (adapters arg)
    assert variants() == {True}  # rows on the base model alone: the programs without the LoRA terms
    a = lora.read(str(folder / "a"), model)
    eng.load_adapter("a", a)
    with pytest.raises(InvalidRequest, match="already been loaded"):
        eng.load_adapter("a", a)
    with pytest.raises(InvalidRequest, match="each of the 1 LoRA slots"):
        eng.load_adapter("a2", a)
    with pytest.raises(InvalidRequest, match="no LoRA adapter 'zz'"):
        eng.make_request(PROMPTS[1], SamplingParams(max_tokens=4), adapter="zz")
    made = eng.make_request(PROMPTS[1], sp, adapter="a")  # made, not yet handed to the engine
    eng.unload_adapter("a")
    with pytest.raises(InvalidRequest, match="no LoRA adapter 'a'"):
        eng.make_request(PROMPTS[1], sp, adapter="a")
    with pytest.raises(InvalidRequest, match="serves requests"):  # the request made still holds the one slot
        eng.load_adapter("a2", a)
    eng.add(made)
    while eng.has_work():
        eng.step()
    assert made.choices[0].token_ids == want["a"][1]  # with the adapter it was made for
    assert variants() == {True, False}
    eng.load_adapter("a2", a)  # free again
    with pytest.raises(InvalidRequest, match="no LoRA adapter 'x'"):
        eng.unload_adapter("x")


def tiny_llama(folder: str, smollm):
    """A 2-layer random Llama (float32, tied) with SmolLM2's tokenizer, saved in `folder`: its transformers model and
    the tokenizer."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm.tokenizer.folder)
    tok.save_pretrained(folder)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    base.save_pretrained(folder, safe_serialization=True)
    return base, tok


@pytest.fixture(scope="module")
def served(smollm, tmp_path_factory):
    """A live server over a 2-layer random Llama with SmolLM2's tokenizer, LoRA slots for two adapters, and the
    PEFT adapters' folders with their greedy continuations."""
    from conftest import live_server

    folder = tmp_path_factory.mktemp("served")
    base, tok = tiny_llama(str(folder / "hf"), smollm)
    prompt = tok("The capital of France is").input_ids
    want = {None: _greedy(base, prompt, 8)}
    for name, r in (("tuned", 4), ("other", 8)):
        pm = _adapter(base, str(folder / name), r, seed=r)
        want[name] = _greedy(pm, prompt, 8)
        if name == "tuned":  # at other scales (llama.cpp's `lora` field)
            for scale in (0.5, 2.0):
                _set_scale(pm, scale)
                want[name, scale] = _greedy(pm, prompt, 8)
        base = pm.unload()
    both = _mixed(base, {str(folder / "tuned"): 1.0, str(folder / "other"): 0.5})  # llama.cpp's mixes
    want["mix"] = _greedy(both, prompt, 8)
    base = both.unload()
    cfg = base.config  # "other" as llama.cpp's converter writes it too (`test_llama_cpp_lora_...` loads that)
    gguf_adapter(str(folder / "other"), str(folder / "other.gguf"), "llama", cfg.num_hidden_layers,
                 cfg.num_attention_heads, cfg.num_key_value_heads, task_name="other-task", prompt_prefix="Q: ")
    model = dataclasses.replace(lora.attach(load_model(str(folder / "hf")), 2, 8), name="base")
    rc = RunnerConfig(max_num_seqs=4, max_model_len=512, decode_steps=4, kv_cache_gb=0.05, decode_batch_sizes=(4,))
    for api in live_server(model, rc):
        yield api, folder, prompt, want


def test_server_serves_adapters_by_model_name(served):
    """vLLM's routes load and unload adapters; a request's model names one (also as Fireworks'
    `accounts/x/models/<name>`, SGLang's `lora_path` and SageMaker's adapter header); `/v1/models` lists them;
    errors are 400s and 404s."""
    api, folder, prompt, want = served
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x")

    def post(path, body) -> tuple[int, dict | str]:
        req = urllib.request.Request(api.url + path, data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        return status, (json.loads(text) if text.startswith("{") else text)

    def load(name, path):
        return post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    assert load("tuned", folder / "tuned") == (200, "Success: LoRA adapter 'tuned' added successfully.")
    status, r = load("tuned", folder / "tuned")
    assert status == 400 and "already been loaded" in r["error"]["message"]
    status, r = load("broken", folder)
    assert status == 400 and r["error"]["param"] == "lora_path"
    assert load("other", folder / "other")[0] == 200
    assert load("third", folder / "other")[0] == 400  # two slots, both held
    with urllib.request.urlopen(api.url + "/metrics", timeout=60) as r:
        metrics = r.read().decode()
    assert "sparkler_lora_adapters 2.0" in metrics and "sparkler_lora_slots 2.0" in metrics

    def complete(model, **kw):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True}, **kw)
        return out.model, out.choices[0].token_ids

    assert complete("tuned") == ("tuned", want["tuned"])
    assert complete("accounts/me/models/other") == ("other", want["other"])
    assert complete("base") == ("base", want[None])
    stream = client.completions.create(model="tuned", prompt=prompt, max_tokens=8, temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert {c.model for c in chunks} == {"tuned"}
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == api.model.tokenizer.decode(want["tuned"])

    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "tuned", "other"}
    assert cards["tuned"].model_extra["parent"] == "base" and cards["tuned"].model_extra["root"] == str(
        folder / "tuned")
    assert client.models.retrieve("other").id == "other"

    status, gen = post("/generate", {"input_ids": prompt, "lora_path": "other",
                                     "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
    assert status == 200 and gen["output_ids"] == want["other"]
    status, gen = post("/generate", {"input_ids": prompt, "lora_path": "nope"})
    assert status == 404 and gen["error"]["param"] == "lora_path"

    assert post("/v1/unload_lora_adapter", {"lora_name": "other"})[0] == 200
    with pytest.raises(openai.NotFoundError, match="'tuned'"):  # the message names what is served
        complete("other")
    status, r = post("/v1/unload_lora_adapter", {"lora_name": "other"})
    assert status == 400 and "no LoRA adapter" in r["error"]["message"]
    assert post("/v1/unload_lora_adapter", {})[0] == 400
    assert complete("tuned") == ("tuned", want["tuned"])  # the server goes on serving
    req = urllib.request.Request(api.url + "/invocations", method="POST", data=json.dumps(  # SageMaker's header
        {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode(),
        headers={"X-Amzn-SageMaker-Adapter-Identifier": "tuned"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    assert out["model"] == "tuned" and out["choices"][0]["token_ids"] == want["tuned"]
    assert load("accounts/me/models/sql", folder / "other")[0] == 200  # a name like Fireworks' path is its own
    assert complete("accounts/me/models/sql") == ("accounts/me/models/sql", want["other"])
    chat = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "tuned"
    assert client.responses.create(model="tuned", input="Hi", max_output_tokens=4).model == "tuned"
    message = anthropic.Anthropic(base_url=api.url, api_key="x").messages.create(
        model="tuned", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert message.model == "tuned"
    status, r = load("base", folder / "tuned")
    assert status == 400 and "the served model's name" in r["error"]["message"]


def test_llama_cpp_lora_adapters_route_and_field_pick_a_requests_adapter(served):
    """llama.cpp's `/lora-adapters` lists the adapters in load order (ids: load numbers, never reused); `POST` sets
    those requests naming none run on and their scales, and a request's own `lora` list picks its own (PEFT's greedy
    tokens each time, at PEFT's `set_scale` for other scales, with both adapters active for a mix; the second adapter
    read from the GGUF file llama.cpp's converter writes); scales that are not numbers, unknown ids and a `model`
    naming another adapter are 400s."""
    api, folder, prompt, want = served
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x")

    def call(method, path, body=None) -> tuple[int, object]:
        req = urllib.request.Request(api.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def plain(path, body) -> int:
        req = urllib.request.Request(api.url + path, method="POST", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status

    for name in list(api.engine.adapters):  # a known state: "tuned", then "other"
        assert plain("/v1/unload_lora_adapter", {"lora_name": name}) == 200
    for name, path in (("tuned", folder / "tuned"), ("other", folder / "other.gguf")):  # a PEFT folder, a GGUF file
        assert plain("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}) == 200
    status, listed = call("GET", "/lora-adapters")
    t, o = [a["id"] for a in listed]  # load numbers: the later load's is higher
    assert status == 200 and o > t and listed == [  # (a GGUF file's task name and prompt prefix: llama.cpp's fields)
        {"id": t, "path": str(folder / "tuned"), "scale": 0.0, "task_name": "", "prompt_prefix": ""},
        {"id": o, "path": str(folder / "other.gguf"), "scale": 0.0, "task_name": "other-task", "prompt_prefix": "Q: "}]

    def tokens(**extra):
        out = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0.0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
        return out.model, out.choices[0].token_ids

    assert tokens(lora=[{"id": o, "scale": 1.0}, {"id": t, "scale": 0}]) == ("other", want["other"])
    status, done = call("POST", "/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0, "ignore_eos": True,
                                                "return_tokens": True, "lora": [{"id": t, "scale": 1}]})
    assert status == 200 and done["tokens"] == want["tuned"]
    assert call("POST", "/lora-adapters", [{"id": t, "scale": 1.0}]) == (200, {"success": True})
    assert [a["scale"] for a in call("GET", "/lora-adapters")[1]] == [1.0, 0.0]
    assert tokens() == ("tuned", want["tuned"])  # naming none: the default
    assert tokens(lora=[]) == ("base", want[None])  # its own list: none
    assert tokens(lora=[{"id": t, "scale": 0.5}, {"id": o, "scale": 0}]) == ("tuned", want["tuned", 0.5])
    assert want["tuned", 0.5] != want["tuned"] != want["tuned", 2.0]  # (the scales matter)
    mix = [{"id": t, "scale": 1}, {"id": o, "scale": 0.5}]  # llama.cpp's mixes: the reply names the served model
    assert tokens(lora=mix) == ("base", want["mix"]) and want["mix"] not in (want["tuned"], want["other"])
    for mix in ([{"id": o + 1, "scale": 1}], "tuned", [{"scale": 1}],
                [{"id": t, "scale": "0.5"}], [{"id": t, "scale": True}], [{"id": t, "scale": 10 ** 400}],
                [{"id": t, "scale": 1e300}]):
        with pytest.raises(openai.BadRequestError, match="lora"):
            tokens(lora=mix)
    with pytest.raises(openai.BadRequestError, match="give one"):
        client.completions.create(model="other", prompt=prompt, max_tokens=1, extra_body={"lora": [{"id": t,
                                                                                                     "scale": 1}]})
    assert call("POST", "/lora-adapters", [{"id": t, "scale": 2}]) == (200, {"success": True})
    assert [a["scale"] for a in call("GET", "/lora-adapters")[1]] == [2.0, 0.0]
    assert tokens() == ("tuned", want["tuned", 2.0])  # naming none: the default at its scale
    assert call("POST", "/lora-adapters", [{"id": o, "scale": 0.5}, {"id": t, "scale": 1}])[1] == {"success": True}
    assert [a["scale"] for a in call("GET", "/lora-adapters")[1]] == [1.0, 0.5]
    assert tokens() == ("base", want["mix"])  # naming none: the default mix
    assert call("POST", "/lora-adapters", [])[1] == {"success": True}  # back to the served model
    assert tokens() == ("base", want[None])
    # an id is never reused: after an unload and a load, the one a client holds still means its adapter or none, and
    # the default set by id is that load's, not a later one's under the name
    assert call("POST", "/lora-adapters", [{"id": t, "scale": 1}])[1] == {"success": True}
    assert plain("/v1/unload_lora_adapter", {"lora_name": "tuned"}) == 200
    assert plain("/v1/load_lora_adapter", {"lora_name": "tuned", "lora_path": str(folder / "tuned")}) == 200
    assert [(a["id"], a["scale"]) for a in call("GET", "/lora-adapters")[1]] == [(o, 0.0), (o + 1, 0.0)]
    assert tokens() == ("base", want[None])
    assert tokens(lora=[{"id": o, "scale": 1}]) == ("other", want["other"])
    status, r = call("POST", "/completion", {"prompt": prompt, "n_predict": 1, "lora": [{"id": t, "scale": 1}]})
    assert status == 400 and f"no LoRA adapter has the id {t}" in r["error"]["message"]


def test_mixtures_and_latent_attention_take_adapters_where_they_apply(tmp_path, monkeypatch):
    """DeepSeek-V3: latent attention and the experts take no adapter; its dense layers' MLP does (a scanned tree of
    some layers only); an adapter on an expert is refused by name."""
    import sys

    from safetensors.numpy import load_file, save_file
    from test_moe import _hf_model as moe_model

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "bench"))
    from lora import random_adapter  # bench/lora.py

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    moe_model("deepseek-v3", str(tmp_path / "hf"))
    model = lora.attach(load_model(str(tmp_path / "hf"), with_tokenizer=False), 2, 4)
    names = lora.modules(model)
    assert names and all(".mlp." in n and ".experts." not in n and ".shared_expert" not in n for n in names)
    adapter = lora.read(random_adapter(model, str(tmp_path / "a"), 4, 0), model)
    params = lora.install(model.params, 1, adapter)
    assert jax.tree.structure(params["lora"]) == jax.tree.structure(model.params["lora"])
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    expert = "base_model.model.model.layers.1.mlp.experts.0.gate_proj.lora_A.weight"
    save_file({**tensors, expert: np.zeros((4, 64), np.float32)}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="experts.0.gate_proj.lora_A.weight is not a LoRA weight"):
        lora.read(str(tmp_path / "a"), model)


def test_delta_gathers_for_few_tokens_and_masks_for_many():
    """`lora.delta`'s two forms (each token's slots gathered, below the slots' count of (token, adapter) pairs; every
    slot masked, from it) against the sum of `scale · b[s] @ a[s] @ x` over each token's adapters, token by token,
    with tokens on no adapter, at other scales (0, negative) and on mixes of several (M = 2, 3; a slot twice adds
    twice)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3, 8)).astype(np.float32), rng.normal(size=(4, 5, 3)).astype(np.float32)
    for shape, ids, scales in [((1, 1, 8), [[[2]]], [[[0.5]]]),
                               ((3, 1, 8), [[[0]], [[-1]], [[3]]], [[[1]], [[1]], [[-2]]]),
                               ((2, 3, 8), [[[1], [1], [1]], [[-1], [-1], [-1]]], [[[1.5]], [[1]]]),
                               ((1, 6, 8), [[[0], [1], [2], [3], [-1], [0]]], [[[1], [0], [2], [1], [1], [0.25]]]),
                               ((1, 1, 8), [[[1, 3]]], [[[0.5, -2]]]),  # a mix, gathered (2 pairs < 4 slots)
                               ((3, 1, 8), [[[0, 2]], [[-1, -1]], [[3, -1]]], [[[1, 1]], [[1, 1]], [[-1, 0.5]]]),
                               ((1, 2, 8), [[[0, 1, 2], [3, 3, -1]]], [[[1, 0.5, -1], [1, 2, 1]]])]:
        x = rng.normal(size=shape).astype(np.float32)
        ids = np.broadcast_to(np.asarray(ids, np.int32), shape[:-1] + (np.shape(ids)[-1],))
        scales = np.asarray(scales, np.float32)  # (broadcast by `delta` itself)
        every = np.broadcast_to(scales, ids.shape)
        want = np.zeros(shape[:-1] + (5,), np.float32)
        for i in np.ndindex(*shape[:-1]):
            for s, x_s in zip(ids[i], every[i]):
                if s >= 0:
                    want[i] += x_s * (b[s] @ (a[s] @ x[i]))
        got = jax.jit(lora.delta)(x, a, b, (ids, scales))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_chat_page_picks_an_adapter(served, browser):  # noqa: F811  (the imported fixture)
    """With adapters loaded the page offers them beside the model, and a reply from the one picked equals the API's
    greedy reply with that adapter (Debian's chromium, as `test_page`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    api, folder, prompt, want = served
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x")
    if "tuned" not in api.engine.adapters:  # the server test above loads it; alone, this test does
        req = urllib.request.Request(api.url + "/v1/load_lora_adapter", method="POST", data=json.dumps(
            {"lora_name": "tuned", "lora_path": str(folder / "tuned")}).encode())
        urllib.request.urlopen(req, timeout=120).close()
    browser.get(api.url + "/")
    pick = until(lambda: (e := browser.find_element(By.ID, "adapter")).is_displayed() and e)
    Select(pick).select_by_value("tuned")
    set_field(browser, "temperature", "0")
    set_field(browser, "max_tokens", "12")
    text, _ = ask(browser, "Hi")
    same = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                          max_tokens=12)
    base = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                          max_tokens=12)
    assert text.strip() == same.choices[0].message.content.strip() != base.choices[0].message.content.strip()


MESHES = """
import json, sys
from engine.engine import Engine
from engine.params import SamplingParams
from engine.runner import RunnerConfig
from models import load_model, lora
folder, prompts, names = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for dp, tp in [(2, 1), (1, 2)]:
    model = lora.attach(load_model(folder + "/hf", with_tokenizer=False, dp=dp, tp=tp), 2, 8)
    eng = Engine(model, RunnerConfig(max_num_seqs=8, max_model_len=128, kv_cache_gb=0.01, decode_steps=4,
                                     decode_batch_sizes=(4,)))
    for name in ("a", "b"):
        eng.load_adapter(name, lora.read(folder + "/" + name, model))
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    reqs = [eng.make_request(p, sp, adapter=n) for p, n in zip(prompts, names)]
    for r in reqs:
        eng.add(r)
    while eng.has_work():
        eng.step()
    out[f"{dp}x{tp}"] = [r.choices[0].token_ids for r in reqs]
print(json.dumps(out))
"""


def test_adapters_on_data_and_tensor_parallel_meshes(adapters, tmp_path):
    """dp = 2 (each shard's slots their own adapters) and tp = 2 (`lora_a` split like its weight's inputs, `lora_b`
    like its outputs), four virtual devices in a process of their own: PEFT's tokens, adapters and base mixed."""
    import subprocess
    import sys

    from test_mesh import ROOT, _env

    folder, want = adapters
    names = ["a", None, "b", "b", None, "a"]
    out = subprocess.run([sys.executable, "-c", MESHES, str(folder), json.dumps(PROMPTS * 2), json.dumps(names)],
                         env={**_env(4), "SPARKLER_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = [want[n][i % 3] for i, n in enumerate(names)]
    assert got == {"2x1": expected, "1x2": expected}
