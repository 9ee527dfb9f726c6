"""Images in chat (LLaVA): a tiny random LlavaForConditionalGeneration with SmolLM2's tokenizer plus `<image>`, served
and asked through the official `openai` client with inline images; what it answers is transformers' greedy
generation on the same ids and pixels."""

import base64
import dataclasses
import gc
import io
import json
import os
import urllib.request

import openai
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from engine.engine import Engine  # noqa: E402
from engine.grammar_sandbox import Busy  # noqa: E402
from engine.params import InvalidRequest, SamplingParams  # noqa: E402
from engine.runner import RunnerConfig  # noqa: E402
from models import load_model  # noqa: E402
from server import protocol  # noqa: E402
from server import images  # noqa: E402
from server.images import Media  # noqa: E402
from helpers import png_url, saved_reference, tiny_tokenizer  # noqa: E402
from test_page import CHROMIUM, DRIVER, ask, browser, set_field, until  # noqa: E402, F401  (the page's fixture)

pytestmark = pytest.mark.quick_compile  # a tiny random LLaVA: XLA optimizations off (conftest)
IMAGE = "<image>"
# llava-hf/llava-1.5-7b-hf's chat template: it loops over each message's typed parts, pictures first
TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
            "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
            "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}{% for content in message['content']"
            " | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
            "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
            "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
SIZE = 28  # the tower's input: 4 x 4 patches of 7, so 16 image tokens an image


def _ask(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def llava(smollm, tmp_path_factory):
    """The tiny LLaVA folder: `(folder, transformers model, processor's image half)`."""
    folder = str(tmp_path_factory.mktemp("llava"))
    tok = tiny_tokenizer(folder, smollm.tokenizer.folder, [IMAGE], TEMPLATE)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    tie_word_embeddings=False)
    tower = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=SIZE, patch_size=7, projection_dim=32)
    cfg = transformers.LlavaConfig(vision_config=tower, text_config=text,
                                   image_token_id=tok.convert_tokens_to_ids(IMAGE))
    torch.manual_seed(0)
    ref = saved_reference(transformers.LlavaForConditionalGeneration(cfg).float().eval(), folder, 0.2)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE,
                                                                                             "width": SIZE})
    processor.save_pretrained(folder)
    return folder, ref, processor


@pytest.fixture(scope="module")
def served(llava, tmp_path_factory):
    """A live server over the tiny LLaVA (2 image slots) that fetches pictures from 127.0.0.1 and reads them from a
    folder of its own (`api.media`)."""
    from conftest import live_server

    model = dataclasses.replace(load_model(llava[0]), name="llava")
    rc = RunnerConfig(max_num_seqs=4, max_model_len=256, kv_cache_gb=0.01, decode_batch_sizes=(4,), max_images=2)
    media = Media(("127.0.0.1",), str(tmp_path_factory.mktemp("media")))
    for api in live_server(model, rc, media=media):
        api.media = media
        yield api


def _greedy(eng: Engine, seeds, n: int) -> list[list[int]]:
    """Greedy `n` tokens for a question about each seed's picture, all run together in `eng`."""
    reqs = []
    for seed in seeds:
        ids, _, (pixels,) = protocol.chat_ids(eng.model, _ask(png_url(seed)))
        reqs.append(eng.make_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                     images=[eng.images.encode(pixels)]))
        eng.add(reqs[-1])
    while eng.has_work():
        eng.step()
    return [r.choices[0].token_ids for r in reqs]


def _reference(llava, ids: list[int], urls: list[str], n: int) -> tuple[list[int], float]:
    """transformers' greedy `n` tokens after `ids` with the pictures at `urls` (past an end of sequence, as
    `ignore_eos` runs), and its first token's logprob."""
    _, ref, processor = llava
    pictures = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, attention_mask=torch.ones(1, len(ids)),
                           max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True)
    first = torch.log_softmax(out.scores[0][0].float(), -1)
    return out.sequences[0, len(ids):].tolist(), float(first[out.sequences[0, len(ids)]])


def test_the_model_reads_pictures_as_transformers_does(served, llava):
    """Chat with an image through the openai client: the tokens, and the first one's logprob, are transformers'
    greedy ones for the same template and pixels; another picture gives another answer, its own reference's."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    answers = []
    for seed in (1, 2):
        url = png_url(seed)
        ids, _, pixels = protocol.chat_ids(served.model, _ask(url))
        assert len(pixels) == 1 and ids.count(served.model.vision.image_token_id) == 16
        want, lp = _reference(llava, ids, [url], 8)
        r = client.chat.completions.create(model="llava", messages=_ask(url), max_tokens=8, temperature=0,
                                           logprobs=True, extra_body={"return_token_ids": True, "ignore_eos": True})
        got = r.choices[0].model_extra["token_ids"]
        assert got == want and r.model_extra["prompt_token_ids"] == ids  # the image token, not the rows' ids
        assert abs(r.choices[0].logprobs.content[0].logprob - lp) < 1e-3
        assert r.usage.prompt_tokens == len(ids)
        answers.append(got)
    assert answers[0] != answers[1]


def test_a_sleeping_server_refuses_pictures_and_wakes_up_reading_them(served, llava):
    """Sleep mode on a model with a vision tower: asleep, a picture is a 503 (a chat, and a token count, which
    encodes it), never a 500; level 2 needs weights it could load again (a 400 here); awake, a new picture's reply
    is transformers'; after vLLM's `/reset_mm_cache` it is encoded again."""
    from test_server import http

    url = png_url(31)
    count = {"model": "llava", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": url.split(",", 1)[1]}},
        {"type": "text", "text": "What is it?"}]}]}
    assert http(served, "POST", "/v1/messages/count_tokens", count)[0] == 200
    assert http(served, "POST", "/sleep?level=2")[0] == 400  # no loader: the weights could not come back
    assert http(served, "POST", "/sleep?level=1")[0] == 200
    try:
        status, out, _ = http(served, "POST", "/v1/chat/completions", {"model": "llava", "messages": _ask(url)})
        assert status == 503 and out["error"]["code"] == "sleeping", out
        status, out, _ = http(served, "POST", "/v1/messages/count_tokens", count)
        assert status == 503 and "sleeping" in out["error"]["message"], out  # (Anthropic's shape)
    finally:
        assert http(served, "POST", "/wake_up")[0] == 200
    ids = protocol.chat_ids(served.model, _ask(url))[0]
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    ask = dict(model="llava", messages=_ask(url), max_tokens=8, temperature=0,
               extra_body={"return_token_ids": True, "ignore_eos": True})
    r = client.chat.completions.create(**ask)
    assert r.choices[0].model_extra["token_ids"] == _reference(llava, ids, [url], 8)[0]
    # vLLM's /reset_mm_cache: the picture's features are not found again, so it is encoded anew, the same reply
    encoded = served.engine.images.encoded
    assert images_digest(served, url) in served.engine.images.held
    assert http(served, "POST", "/reset_mm_cache")[0] == 200 and not served.engine.images.held
    assert client.chat.completions.create(**ask).choices[0].model_extra["token_ids"] == \
        r.choices[0].model_extra["token_ids"]
    assert served.engine.images.encoded == encoded + 1


def test_a_picture_seen_again_reuses_its_rows_and_its_cached_pages(served, llava):
    """The same picture asked twice is encoded once and its pages come from the prefix cache; two pictures in one
    message answer as transformers does with both."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    url = png_url(7, (50, 17))
    before = served.engine.images.encoded
    ask = dict(model="llava", max_tokens=4, temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    first = client.chat.completions.create(messages=_ask(url, "Describe it at length, please. " * 3), **ask)
    again = client.chat.completions.create(messages=_ask(url, "Describe it at length, please. " * 3), **ask)
    assert served.engine.images.encoded == before + 1
    with urllib.request.urlopen(served.url + "/metrics", timeout=60) as resp:
        metrics = resp.read().decode()
    held = len(served.engine.images.held)
    assert "sparkler_image_slots 2.0" in metrics and f"sparkler_images_held {held}.0" in metrics
    assert f"sparkler_images_encoded_total {before + 1}.0" in metrics
    assert again.usage.prompt_tokens_details.cached_tokens > 16
    assert again.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(3)}},
                                        {"type": "text", "text": "and"},
                                        {"type": "image_url", "image_url": png_url(4)}]}]
    ids, _, _ = protocol.chat_ids(served.model, two)
    want, _ = _reference(llava, ids, [png_url(3), png_url(4)], 4)
    r = client.chat.completions.create(messages=two, **ask)
    assert r.choices[0].model_extra["token_ids"] == want


def test_the_prefix_cache_shares_text_before_a_picture_and_finds_a_picture_in_other_rows(served):
    """A system prompt cached by a text-only request serves a pictured one after it; a picture asked again after
    two others took its rows (2 slots) is encoded again into other rows, and its pages still come from the cache."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    system = {"role": "system", "content": "You describe pictures for people who cannot see them. " * 6}
    ask = dict(model="llava", max_tokens=3, temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    text = client.chat.completions.create(messages=[system, {"role": "user", "content": "hi"}], **ask)
    url = png_url(61)
    first = client.chat.completions.create(messages=[system, *_ask(url)], **ask)
    shared = first.usage.prompt_tokens_details.cached_tokens
    assert shared >= 48 and shared < text.usage.prompt_tokens
    for seed in (62, 63):
        client.chat.completions.create(messages=_ask(png_url(seed)), **ask)
    assert images_digest(served, url) not in served.engine.images.held  # its rows went to the other two
    encoded = served.engine.images.encoded
    again = client.chat.completions.create(messages=[system, *_ask(url)], **ask)
    assert served.engine.images.encoded == encoded + 1
    assert again.usage.prompt_tokens_details.cached_tokens >= shared + 16
    assert again.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]


def images_digest(served, url: str) -> str:
    """The digest a picture's rows are held under."""
    from engine.images import digest

    _, _, (pixels,) = protocol.chat_ids(served.model, _ask(url))
    return digest(pixels)


def test_bad_pictures_are_400s_and_the_server_keeps_serving(served, api):
    """A link to a host not allowed, bad base64, bytes that are no picture, a picture in an assistant turn,
    more pictures than the slots, and a picture for a model that reads text only: each a 400 naming messages; an
    image token in a completion's prompt, with no picture for it, a 400 naming the prompt."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    cases = {"from 127.0.0.1 only": _ask("https://example.com/cat.png"),
             "base64": _ask("data:image/png;base64,@@@"),
             "could not decode": _ask("data:image/png;base64," + base64.b64encode(b"not a picture").decode()),
             "user messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": [{"type": "image_url", "image_url": png_url(1)}]}],
             "at most 2": [{"role": "user", "content": [{"type": "image_url", "image_url": png_url(s)}
                                                        for s in (1, 2, 3)]}]}
    for words, messages in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="llava", messages=messages, max_tokens=2)
        assert words in e.value.message and e.value.body["param"] == "messages", words
    with pytest.raises(openai.BadRequestError) as e:  # a cut into the picture's positions
        client.chat.completions.create(model="llava", messages=_ask(png_url(1)), max_tokens=2,
                                       extra_body={"truncate_prompt_tokens": 10})
    assert "cut into a picture" in e.value.message and e.value.body["param"] == "truncate_prompt_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # image tokens with no picture to fill them
        client.completions.create(model="llava", prompt=[5, served.model.vision.image_token_id, 6], max_tokens=2)
    assert "1 image tokens for 0 images" in e.value.message and e.value.body["param"] == "prompt"
    text_only = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        text_only.chat.completions.create(model=api.model.name, messages=_ask(png_url(1)), max_tokens=2)
    assert "text" in e.value.message
    r = client.chat.completions.create(model="llava", messages=_ask(png_url(1)), max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_image_slots_held_by_live_requests_are_busy_then_reused(served):
    """Every slot read by a request still running: one more picture is `Busy` (the server's 429); once they end,
    the least recently used slot takes it. A prompt whose image tokens do not match its pictures is refused."""
    eng: Engine = served.engine
    vocab, image = served.model.cfg.vocab_size, served.model.vision.image_token_id
    asks = []
    for seed in (11, 12, 13):
        ids, _, (pixels,) = protocol.chat_ids(served.model, _ask(png_url(seed)))
        asks.append((ids, [eng.images.encode(pixels)]))

    def make(k):
        return eng.make_request(asks[k][0], SamplingParams(max_tokens=1), images=asks[k][1])

    held = [make(0), make(1)]
    assert all(sum(t >= vocab for t in r.prompt_ids) == 16 for r in held)
    assert held[0].prompt_ids != held[1].prompt_ids and held[0].cache_ids != held[1].cache_ids
    with pytest.raises(Busy):
        make(2)
    short = list(asks[0][0])
    short.remove(image)
    with pytest.raises(InvalidRequest, match="image tokens"):
        eng.make_request(short, SamplingParams(max_tokens=1), images=asks[0][1])
    del held
    gc.collect()
    third = make(2)
    assert sum(t >= vocab for t in third.prompt_ids) == 16 and len(eng.images.held) == 2


def test_pictures_through_the_anthropic_responses_and_ollama_clients(served):
    """The same picture and question through Anthropic's Messages (a base64 image block), OpenAI's Responses (an
    input_image part) and Ollama's chat and generate (a message's or the prompt's images, put before its text) answer
    what chat completions answers for the same parts in the same order; each reports the model's image support."""
    import anthropic
    import ollama

    url = png_url(21)
    data = url.split(",", 1)[1]
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)

    def chat(parts):
        r = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": parts}],
                                           max_tokens=6, temperature=0)
        return r.choices[0].message.content

    text, image = {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}
    want = chat([text, image])
    msg = anthropic.Anthropic(base_url=served.url, api_key="x", max_retries=0).messages.create(
        model="llava", max_tokens=6, extra_body={"temperature": 0},
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {
            "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}])
    assert msg.content[0].text == want
    r = client.responses.create(model="llava", max_output_tokens=6, temperature=0,
                                input=[{"role": "user", "content": [{"type": "input_text", "text": "What is it?"},
                                                                    {"type": "input_image", "image_url": url}]}])
    assert r.output_text == want
    follow = client.responses.create(model="llava", max_output_tokens=2, previous_response_id=r.id, input="Sure?")
    assert follow.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens  # the picture's turn again
    items = client.responses.input_items.list(follow.id, order="asc").data
    assert items[0].content[1].type == "input_image" and items[0].content[1].image_url == url
    olla = ollama.Client(host=served.url)
    got = olla.chat(model="llava", messages=[{"role": "user", "content": "What is it?", "images": [data]}],
                    options={"temperature": 0, "num_predict": 6})
    assert got.message.content == chat([image, text]) and "vision" in olla.show("llava").capabilities
    made = olla.generate(model="llava", prompt="What is it?", images=[data], options={"temperature": 0,
                                                                                      "num_predict": 6})
    assert made.response == got.message.content


_MESHES = """
import json, sys
sys.path.insert(0, "tests")
from engine.engine import Engine
from engine.runner import RunnerConfig
from models import load_model
from test_multimodal import _greedy
out = []
for dp, tp in ((1, 1), (2, 1), (1, 2)):
    model = load_model(sys.argv[1], dp=dp, tp=tp)
    out.append(_greedy(Engine(model, RunnerConfig(max_num_seqs=4, max_model_len=256, kv_cache_gb=0.01)), (1, 2, 3), 6))
print(json.dumps(out))
"""


def test_pictures_on_data_and_tensor_parallel_meshes(llava):
    """On 2 virtual CPU devices, D = 2 (the rows replicated on both shards) and T = 2 (the lookup beside the split
    embedding) answer three pictured requests with one device's greedy tokens."""
    import os
    import subprocess
    import sys

    from conftest import device_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _MESHES, llava[0]], env=dict(os.environ, XLA_FLAGS=device_flags(2)),
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, data, tensor = json.loads(done.stdout.strip().splitlines()[-1])
    assert one == data == tensor and len({tuple(t) for t in one[:2]}) == 2


def test_templates_that_read_text_get_the_image_token_where_the_picture_was(served):
    """LLaVA's template reads typed parts, so text-only turns go to it as parts too; a template that reads strings
    (ChatML here) gets the image token's text where the picture part was. An image token typed in the text, beside
    the pictures sent, is a 400."""
    model, image = served.model, served.model.vision.image_token_id
    assert model.tokenizer.content_parts
    _, text, _ = protocol.chat_ids(model, [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "hello"}])
    assert text == "Be brief. USER: hello ASSISTANT:"
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    model.tokenizer.use_template(chatml)
    try:
        assert not model.tokenizer.content_parts
        ids, text, pixels = protocol.chat_ids(model, _ask(png_url(1), "Look:"))
        assert text == f"<|im_start|>user\nLook:{IMAGE}<|im_end|>\n" and len(pixels) == 1
        at = ids.index(image)
        assert ids[at:at + 16] == [image] * 16 and image not in ids[at + 16:]
    finally:
        model.tokenizer.use_template(TEMPLATE)
    with pytest.raises(protocol.ApiError) as e:
        protocol.chat_ids(model, _ask(png_url(1), f"What is {IMAGE} here?"))
    assert e.value.status == 400 and "2 image tokens for 1 pictures" in e.value.message


def test_llava_folders_of_either_transformers_read_as_their_language_model():
    """transformers 4's names (`language_model.model.*`, `language_model.lm_head.*`) and 5's in memory
    (`model.language_model.*`, `lm_head.*`) read as the causal LM's; the tower's and projector's stay by name."""
    from models.loading.source import _as_multimodal

    config = {"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "mistral"}}
    for lm, head, tower in (("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model."),
                            ("model.language_model.", "lm_head.", "model.vision_tower.")):
        names = (f"{lm}norm.weight", f"{head}weight", f"{tower}pre_layrnorm.weight", "multi_modal_projector.x")
        text, ours, read = _as_multimodal(config, names, lambda n: n)
        assert ours == ("model.norm.weight", "lm_head.weight") and text["architectures"] == ["MistralForCausalLM"]
        assert text["multimodal_tensors"] == list(names[2:]) and read("lm_head.weight") == f"{head}weight"


def test_a_preempted_pictured_request_resumes_with_its_rows(llava):
    """Four pictured requests in a pool too small for them all: the engine preempts and recomputes some (their
    pictures' rows stay held while they wait), and every answer is the one a roomy pool gives."""
    model = load_model(llava[0])
    page = 16 * 2 * 2 * 2 * 16 * 4  # 16 tokens x 2 layers x 2 KV heads x (K + V) x 16 wide x float32

    def run(pages: int):
        eng = Engine(model, RunnerConfig(max_num_seqs=4, max_model_len=96, kv_cache_gb=pages * page / (1 << 30),
                                         decode_batch_sizes=(4,)))
        return _greedy(eng, (31, 32, 33, 34), 40), eng.sched.preemptions

    roomy, none = run(64)
    tight, some = run(14)
    assert none == 0 and some > 0 and tight == roomy


def test_pictures_by_link_as_the_policy_allows(served):
    """A link to an allowed host (a loopback HTTP server here) and a file:// link under the allowed folder answer as
    the same picture inline does; a redirect to another host, a missing picture and a file outside the folder are
    400s; with no policy (the default) a link is a 400 that names the flag."""
    import http.server
    import threading

    url = png_url(41)
    raw = base64.b64decode(url.split(",", 1)[1])

    fetched = []

    class Pictures(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fetched.append(self.path)
            if self.path == "/garbage":  # no HTTP status line at all
                self.wfile.write(b"garbage\r\n\r\n")
                return
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_port}/cat.png")
                self.end_headers()
                return
            found = self.path == "/cat.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(raw if found else b"")

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{host.server_port}"
    with open(os.path.join(served.media.local, "cat.png"), "wb") as f:
        f.write(raw)
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)

    def answer(link):
        r = client.chat.completions.create(model="llava", messages=_ask(link), max_tokens=4, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
        return r.choices[0].model_extra["token_ids"]

    try:
        want = answer(url)
        assert answer(f"{site}/cat.png") == want
        assert answer(f"file://{served.media.local}/cat.png") == want
        for link, words in ((f"{site}/moved", "redirects"), (f"{site}/missing.png", "could not fetch"),
                            (f"{site}/garbage", "could not fetch"), ("file:///etc/hostname", "must be under"),
                            (f"http://x@127.0.0.1:{host.server_port}/cat.png", "no user name"),
                            (f"file://elsewhere{served.media.local}/cat.png", "no other host")):
            with pytest.raises(openai.BadRequestError) as e:
                answer(link)
            assert words in e.value.message, link
        # prompt_truncate_len renders the conversation several times over: the picture is fetched once
        turns = [*_ask(f"{site}/cat.png", "Look at this."), {"role": "assistant", "content": "A picture. " * 20},
                 {"role": "user", "content": "More? " * 20}, {"role": "assistant", "content": "Yes. " * 20},
                 {"role": "user", "content": "Go on."}]
        fetched.clear()
        ids, _, pixels = protocol.chat_ids(served.model, turns, 60, media=served.media)
        assert fetched == ["/cat.png"] and len(ids) <= 60 and not pixels  # the picture's turn was dropped
    finally:
        host.shutdown()
    with pytest.raises(protocol.ApiError, match="more than 2 pictures"):
        protocol.chat_ids(served.model, [{"role": "user", "content": [
            {"type": "image_url", "image_url": png_url(s)} for s in (1, 2, 3)]}], media=Media(max_images=2))
    with pytest.raises(ValueError, match="--allowed-media-domains"):
        images.pixels(f"{site}/cat.png", served.model.vision)


def test_any_host_means_any_public_address(served):
    """`--allowed-media-domains '*'` reaches no private address: a loopback server named by its address or by a name
    that resolves to it is refused before any request reaches it; named in the flag, it is fetched; a redirect to
    another scheme (ftp, which urllib would follow unchecked) is refused."""
    import http.server
    import threading

    raw = base64.b64decode(png_url(43).split(",", 1)[1])
    fetched = []

    class Pictures(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fetched.append(self.path)
            if self.path == "/ftp":
                self.send_response(302)
                self.send_header("Location", f"ftp://127.0.0.1:{self.server.server_port}/cat.png")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    try:
        for link in (f"http://127.0.0.1:{host.server_port}/cat.png", f"http://localhost:{host.server_port}/cat.png"):
            with pytest.raises(ValueError, match="public addresses only"):
                images.pixels(link, served.model.vision, Media(("*",)))
        assert fetched == []
        named = images.pixels(f"http://127.0.0.1:{host.server_port}/cat.png", served.model.vision,
                              Media(("*", "127.0.0.1")))
        assert fetched == ["/cat.png"] and named.shape == (3, served.model.vision.image_size,
                                                          served.model.vision.image_size)
        with pytest.raises(ValueError, match="other than http"):
            images.pixels(f"http://127.0.0.1:{host.server_port}/ftp", served.model.vision, Media(("*", "127.0.0.1")))
    finally:
        host.shutdown()


def test_the_offline_api_takes_vllms_multi_modal_data(llava):
    """`LLM.generate` with vLLM's prompt dicts (`multi_modal_data: {"image": PIL image}`, one `<image>` in the
    text) answers as transformers does on the same ids and pixels, three pictures on two slots (the third waits for
    one); an image token short is a `ValueError`."""
    from engine import LLM

    llm = LLM(load_model(llava[0]), max_num_seqs=2, max_model_len=128, kv_cache_gb=0.01, max_images=2)
    urls = [png_url(seed) for seed in (51, 52, 53)]
    pictures = [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) for url in urls]
    prompt = f"USER: {IMAGE}\nWhat is this? ASSISTANT:"
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": p}} for p in pictures],
                        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))  # 3 pictures on 2 slots
    ids = outs[0].prompt_token_ids
    assert ids.count(llava[1].config.image_token_id) == 16
    for out, url in zip(outs, urls):
        assert out.outputs[0].token_ids == _reference(llava, ids, [url], 6)[0]
    with pytest.raises(ValueError, match="0 image tokens for 1 pictures"):
        llm.generate({"prompt": "What is this?", "multi_modal_data": {"image": pictures[:1]}})


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_chat_page_attaches_a_picture(served, browser, tmp_path):  # noqa: F811  (the imported fixture)
    """For a model that reads images the page offers a picture input (the model card's `input_modalities`); a greedy
    reply about a picture chosen there equals the API's for the same picture, and the picture shows in the chat."""
    from selenium.webdriver.common.by import By

    url = png_url(71)
    path = tmp_path / "cat.png"
    path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    browser.get(served.url + "/")
    picture = until(lambda: browser.find_element(By.ID, "attach").is_displayed()
                    and browser.find_element(By.ID, "picture"))
    set_field(browser, "temperature", "0")
    set_field(browser, "max_tokens", "8")
    picture.send_keys(str(path))
    text, _ = ask(browser, "What is in this picture?")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    same = client.chat.completions.create(model="llava", messages=_ask(url), temperature=0, max_tokens=8)
    assert text == same.choices[0].message.content.strip()
    shown = browser.find_element(By.CSS_SELECTOR, ".msg.user img.picture").get_attribute("src")
    assert shown == url
