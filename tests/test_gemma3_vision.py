"""Gemma 3's pictures against transformers on the same random weights: a tiny `Gemma3ForConditionalGeneration`'s
SigLIP tower and projector (`models.vision`), `Gemma3ImageProcessorPil`'s preprocessing, and the served answers,
whose picture tokens attend to each other both ways (`ModelConfig.image_block`), also where a prefill chunk would
have cut the picture."""

import base64
import dataclasses
import io
import json

import numpy as np
import openai
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from engine.runner import RunnerConfig  # noqa: E402
from helpers import png_url, saved_reference, tiny_tokenizer  # noqa: E402
from models import load_model, vision  # noqa: E402
from server import protocol  # noqa: E402

pytestmark = pytest.mark.quick_compile  # a tiny random Gemma 3: XLA optimizations off (conftest)

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# Gemma 3's chat template in short: turns, and `<start_of_image>` where a message's parts hold a picture
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
            "m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}<start_of_image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
            "{% endif %}")
SIZE, PATCH, TOKENS = 32, 4, 16  # an 8 x 8 patch grid pooled 2 x 2: 16 positions a picture


def _ask(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def gemma(smollm, tmp_path_factory):
    """The tiny Gemma 3 folder: `(folder, transformers model, image processor)`; one sliding layer (a window of 32,
    shorter than the prompts) and one global."""
    folder = str(tmp_path_factory.mktemp("gemma3"))
    tok = tiny_tokenizer(folder, smollm.tokenizer.folder, [BOI, EOI, SOFT], TEMPLATE)
    ids = tok.convert_tokens_to_ids([BOI, EOI, SOFT])
    text = transformers.Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=1024, sliding_window=32,
                                         layer_types=["sliding_attention", "full_attention"])
    tower = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=SIZE, patch_size=PATCH,
                                            vision_use_head=False)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=tower, mm_tokens_per_image=TOKENS,
                                    boi_token_index=ids[0], eoi_token_index=ids[1], image_token_index=ids[2])
    torch.manual_seed(0)
    ref = saved_reference(transformers.Gemma3ForConditionalGeneration(cfg).float().eval(), folder, 0.2)
    processor = transformers.Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(folder)
    return folder, ref, processor


def test_the_tower_projector_and_preprocessing_match_transformers(gemma):
    """`image_features` against `get_image_features` (SigLIP, the 2 x 2 pooling, Gemma's norm and product), and
    `preprocess` against `Gemma3ImageProcessorPil` (a bilinear square resize, mean and std 0.5)."""
    from safetensors.numpy import load_file

    folder, ref, processor = gemma
    cfg = vision.vision_config(json.load(open(f"{folder}/config.json")),
                               json.load(open(f"{folder}/preprocessor_config.json")))
    assert (cfg.tower, cfg.projector, cfg.pool, cfg.tokens_per_image, cfg.resample) == (
        "siglip", "gemma3", 2, TOKENS, "bilinear") and cfg.bidirectional
    tensors = load_file(f"{folder}/model.safetensors")
    params = vision.vision_params({k: v for k, v in tensors.items() if "language_model" not in k}, "float32")
    pixels = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=torch.tensor(pixels))
    want = (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()
    np.testing.assert_allclose(np.asarray(vision.image_features(params, pixels, cfg)), want, atol=1e-4)
    for seed in (1, 2):
        picture = Image.open(io.BytesIO(base64.b64decode(png_url(seed).split(",", 1)[1])))
        np.testing.assert_allclose(vision.preprocess(picture, cfg),
                                   processor(images=[picture], return_tensors="np")["pixel_values"][0], atol=1e-6)


@pytest.fixture(scope="module")
def served(gemma):
    """A live server over the tiny Gemma 3 (prefill chunks of 512 tokens)."""
    from conftest import live_server

    model = dataclasses.replace(load_model(gemma[0]), name="gemma3")
    rc = RunnerConfig(max_num_seqs=4, max_model_len=1024, kv_cache_gb=0.02, decode_batch_sizes=(4,), max_images=2)
    yield from live_server(model, rc)


def _reference(gemma, ids: list[int], url: str, n: int, both_ways: bool = True) -> tuple[list[int], float]:
    """transformers' greedy `n` tokens after `ids` with the picture at `url`, and its first token's logprob; the
    picture's tokens marked (`token_type_ids`) so that they attend to each other both ways, or not."""
    _, ref, processor = gemma
    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    pixels = processor(images=[picture], return_tensors="pt")["pixel_values"]
    tensor = torch.tensor([ids])
    kinds = (tensor == ref.config.image_token_index).long() if both_ways else None
    with torch.no_grad():
        out = ref.generate(input_ids=tensor, pixel_values=pixels, attention_mask=torch.ones(1, len(ids)),
                           token_type_ids=kinds, max_new_tokens=n, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    first = torch.log_softmax(out.scores[0][0].float(), -1)
    return out.sequences[0, len(ids):].tolist(), float(first[out.sequences[0, len(ids)]])


def test_the_model_reads_pictures_as_transformers_does(served, gemma):
    """Chat with a picture through the openai client: the prompt is the processor's (the picture written out in the
    text), and the greedy tokens and first logprob are transformers', whose picture attends both ways (a causal
    picture's logprobs differ: the test would see it). A long text before the picture puts it across the 512-token
    chunk boundary: the chunk ends before it, and the answer is still transformers'."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    model, differs = served.model, 0
    soft, chunk = model.vision.image_token_id, served.engine.runner.chunk

    def asked(url: str, before: str) -> tuple[list[dict], list[int], str, list]:
        messages = [{"role": "user", "content": [{"type": "text", "text": before}] * bool(before) + _ask(url)[0][
            "content"]}]
        return messages, *protocol.chat_ids(model, messages)

    straddling = next(words for words in range(100, 300) if (lambda ids: ids.index(soft) < chunk - TOKENS // 4 <
                                                             chunk < ids.index(soft) + TOKENS)(
        asked(png_url(3), "Read this first. " * words)[1]))
    for seed, before in ((1, ""), (2, ""), (3, "Read this first. " * straddling)):
        url = png_url(seed)
        messages, ids, text, pixels = asked(url, before)
        at = ids.index(soft)
        assert len(pixels) == 1 and ids[at:at + TOKENS] == [soft] * TOKENS and ids.count(soft) == TOKENS
        assert f"\n\n{BOI}{SOFT * TOKENS}{EOI}\n\n" in text
        assert chunk == 512 and (not before or at < chunk < at + TOKENS)  # the last: across the first chunk's end
        want, lp = _reference(gemma, ids, url, 8)
        causal, causal_lp = _reference(gemma, ids, url, 8, both_ways=False)
        differs += want != causal or abs(lp - causal_lp) > 1e-2
        r = client.chat.completions.create(model="gemma3", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, extra_body={"return_token_ids": True, "ignore_eos": True,
                                                                      "prompt_cache_max_len": 0})  # chunks from 0
        assert r.choices[0].model_extra["token_ids"] == want and r.model_extra["prompt_token_ids"] == ids
        assert abs(r.choices[0].logprobs.content[0].logprob - lp) < 1e-3
    assert differs  # attending both ways changes the answer or its logprob: a causal picture would fail above


def test_a_prompt_whose_pictures_do_not_match_its_marks_is_a_400(served):
    """A mark typed in the text counts as a picture's (a 400 that says so); the model's descriptions say it sees."""
    import urllib.request

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    assert client.models.retrieve("gemma3").model_extra["input_modalities"] == ["text", "image"]
    with urllib.request.urlopen(served.url + "/props", timeout=30) as r:  # llama.cpp's
        assert json.load(r)["modalities"]["vision"] is True
    typed = _ask(png_url(4), f"What is {BOI} here?")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma3", messages=typed, max_tokens=2)
    assert e.value.body["param"] == "messages" and "image tokens" in e.value.body["message"]
    assert client.chat.completions.create(model="gemma3", messages=_ask(png_url(4)), max_tokens=2).choices


def test_get_weights_by_name_takes_the_checkpoints_own_names(served, gemma):
    """SGLang's `/get_weights_by_name` on a multimodal checkpoint: its language model's tensors by the names its
    files give them (`model.language_model.*` or `language_model.model.*`), as served, and the causal LM's names too."""
    import urllib.request

    from safetensors.numpy import load_file

    tensors = load_file(f"{gemma[0]}/model.safetensors")
    names = [k for k in tensors if k.endswith(("layers.1.mlp.up_proj.weight", "layers.0.self_attn.q_proj.weight"))
             and "language_model." in k]
    assert len(names) == 2
    for name in names + ["model.layers.1.mlp.up_proj.weight"]:
        req = urllib.request.Request(served.url + "/get_weights_by_name", method="POST",
                                     data=json.dumps({"name": name, "truncate_size": 3}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            got = np.asarray(json.load(r), np.float32)
        want = tensors[name if name in tensors else next(k for k in names if "up_proj" in k)][:3]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
