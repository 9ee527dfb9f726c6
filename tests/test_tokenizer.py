"""The served tokenizer (`tokenizers` + jinja2, no transformers at run time) against transformers' own on the same
folders: ids, text, special tokens, and chat templates with tools, reasoning, the sandbox's helpers and
`continue_final_message`."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tokenizers
import transformers

from models.loading.tokenizer import Tokenizer

# A template that reaches for every helper transformers gives templates.
TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- if tools %}<|im_start|>system
Tools: {{ tools | tojson(indent=2) }} {{ tools[0] | tojson(separators=(',', ':'), sort_keys=true) }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif -%}
{%- if loop.index > 8 %}{% break %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
<|im_start|>{{ m.role }}
{% if m.reasoning_content %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif -%}
{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif -%}
{%- for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>{% endfor %}<|im_end|>
{% endfor -%}
{{- dict(a=1)['a'] }} {{ ns.n }} {{ bos_token }}{{ eos_token }} {{ strftime_now('%Y') | length }} {{ flavour }}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo wörld ✓ 🎉 <|im_end|>   x"}],
    [{"role": "user", "content": "Weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "c1", "function": {
         "name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
     {"role": "tool", "content": "22 °C", "tool_call_id": "c1"}],
    [{"role": "user", "content": "Think."}, {"role": "assistant", "content": "Done", "reasoning": "Hmm <b>"}],
    [{"role": "user", "content": f"turn {i}"} for i in range(12)],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather — now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TEXTS = ["Héllo wörld! 123 — ünïcode, emoji 🎉 and    spaces.", " leading space", "", "a\n\nb\t c",
         "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>x"]


@pytest.fixture(scope="module")
def folders(smollm, tmp_path_factory):
    """The default model's normalized tokenizer, and a copy with TEMPLATE and a post-processor that adds a BOS."""
    plain = smollm.tokenizer.folder
    rich = str(tmp_path_factory.mktemp("rich"))
    backend = tokenizers.Tokenizer.from_file(os.path.join(plain, "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)])
    backend.save(os.path.join(rich, "tokenizer.json"))
    with open(os.path.join(plain, "tokenizer_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(rich, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "chat_template": TEMPLATE, "extra_special_tokens": ["<|endoftext|>"]}, f)
    return plain, rich


@pytest.mark.parametrize("which", [0, 1])
def test_ids_text_and_special_tokens_match_transformers(folders, which):
    ours, ref = Tokenizer(folders[which]), transformers.AutoTokenizer.from_pretrained(folders[which])
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
            assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.all_special_ids == ref.all_special_ids
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token, len(ours)) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token, len(ref))
    assert ours.convert_tokens_to_ids(["<|im_end|>", "hello"]) == ref.convert_tokens_to_ids(["<|im_end|>", "hello"])


@pytest.mark.parametrize("which", [0, 1])
def test_chat_templates_render_as_transformers_renders_them(folders, which):
    ours, ref = Tokenizer(folders[which]), transformers.AutoTokenizer.from_pretrained(folders[which])
    for chat in CHATS:
        for kw in ({"add_generation_prompt": True}, {"add_generation_prompt": False, "tools": TOOLS},
                   {"add_generation_prompt": True, "flavour": "mint"}):
            a = ours.apply_chat_template(chat, tokenize=False, **kw)
            assert a == ref.apply_chat_template(chat, tokenize=False, **kw), (chat, kw)
            ids = ref.apply_chat_template(chat, tokenize=True, **kw)["input_ids"]
            assert ours.apply_chat_template(chat, **kw) == ids
    prefill = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, here "}]
    assert ours.apply_chat_template(prefill, tokenize=False, continue_final_message=True) == \
        ref.apply_chat_template(prefill, tokenize=False, continue_final_message=True)
    if which:
        with pytest.raises(Exception, match="no bad roles"):
            ours.apply_chat_template([{"role": "bad", "content": "x"}], tokenize=False)


def test_a_chat_template_from_the_command_line(folders, tmp_path):
    """`--chat-template`: a .jinja file, JSON with a `chat_template` field, or the template itself, each compiled
    first; a tokenizer then renders with it, as transformers renders that template."""
    from models.loading.tokenizer import read_template

    inline = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}>{% endif %}")
    (tmp_path / "t.jinja").write_text(inline)
    (tmp_path / "t.json").write_text(json.dumps({"chat_template": inline}))
    assert read_template(str(tmp_path / "t.jinja")) == read_template(str(tmp_path / "t.json")) == read_template(inline)
    (tmp_path / "named.txt").write_text(json.dumps({"chat_template": [{"name": "tools", "template": "{{ 1 }}"},
                                                                       {"name": "default", "template": inline}]}))
    assert read_template(str(tmp_path / "named.txt")) == inline  # JSON whatever the name; the default of named ones
    (tmp_path / "t.json").write_text("{}")
    (tmp_path / "empty.jinja").write_text(" \n")
    for bad, why in ((str(tmp_path / "missing.jinja"), "no such file"), ("{% for %}", "does not compile"),
                     (str(tmp_path / "t.json"), "chat_template"), (str(tmp_path / "empty.jinja"), "empty")):
        with pytest.raises(ValueError, match=why):
            read_template(bad)
    tok = Tokenizer(folders[0])
    tok.apply_chat_template(CHATS[0], tokenize=False)  # compiled with the folder's template first
    tok.use_template(inline)
    ref = transformers.AutoTokenizer.from_pretrained(folders[0])
    ref.chat_template = inline
    for prompt in (False, True):
        assert tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=prompt) == \
            ref.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=prompt)
    assert tok.apply_chat_template(CHATS[0], tokenize=False).startswith(f"[{CHATS[0][0]['role']}] ")


def test_the_sandbox_refuses_what_transformers_refuses(folders):
    import jinja2

    ours, ref = Tokenizer(folders[0]), transformers.AutoTokenizer.from_pretrained(folders[0])
    chat = [{"role": "user", "content": "x"}]
    for template in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}", "{{ messages.append(1) }}",
                     "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}"):
        ours.chat_template, ours._template = template, None
        with pytest.raises(jinja2.exceptions.SecurityError):
            ours.apply_chat_template(chat, tokenize=False)
        with pytest.raises(jinja2.exceptions.SecurityError):
            ref.apply_chat_template(chat, tokenize=False, chat_template=template)


def test_an_hf_folder_is_normalized_once_and_a_changed_one_again(folders, tmp_path, monkeypatch):
    from models import load_tokenizer

    monkeypatch.setenv("SPARKLER_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    hf.mkdir()
    transformers.AutoTokenizer.from_pretrained(folders[1]).save_pretrained(str(hf))
    source = SimpleNamespace(kind="hf", path=str(hf))
    first = load_tokenizer(source, "unused")
    assert first.encode("hi")[0] == 1 and first.chat_template == TEMPLATE
    assert load_tokenizer(source, "unused").folder == first.folder
    assert first.folder.startswith(str(tmp_path / "cache"))
    with open(hf / "chat_template.jinja", "w") as f:
        f.write("{{ messages[0].content }}")
    changed = load_tokenizer(source, "unused")
    assert changed.folder != first.folder
    assert changed.apply_chat_template([{"role": "user", "content": "only"}], tokenize=False) == "only"


def test_a_warm_load_does_not_import_transformers(smollm):
    code = ("import sys; from models.loading.tokenizer import Tokenizer; t = Tokenizer(sys.argv[1]); "
            "t.apply_chat_template([{'role': 'user', 'content': 'hi'}]); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, smollm.tokenizer.folder], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def _sentencepiece_style() -> tokenizers.Tokenizer:
    """A small BPE with byte fallback and a Metaspace-like decoder that strips the first space (as Llama 2's,
    Mistral's and Gemma's), trained here on text with multi-byte characters."""
    from tokenizers import decoders, models, normalizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([" ".join(TEXTS) * 20, json.dumps(CHATS, ensure_ascii=False) * 20],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_]))
    spec = json.loads(tok.to_str())  # the byte tokens stay in the vocabulary as ordinary tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in bytes_]
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _one_at_a_time(tok, ids: list[int]) -> str:
    """The reference: the prefix and read offsets of vLLM's and TGI's detokenizers, one token per call."""
    seq, prefix, read, text = [], 0, 0, ""
    for t in ids:
        seq.append(t)
        before = tok.decode(seq[prefix:read], skip_special_tokens=True)
        after = tok.decode(seq[prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            text, prefix, read = text + after[len(before):], read, len(seq)
    return text


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece-style"])
def test_detokenizing_in_batches_gives_the_text_of_one_token_at_a_time(smollm, kind):
    """The engine detokenizes each dispatch's tokens together (`engine.detok.Detok`): random ids (unfinished UTF-8
    characters, special tokens) in random batches give the text of one token at a time, and encoded text its own
    text back."""
    import random

    from engine.detok import Detok

    tok = smollm.tokenizer if kind == "byte-level" else _sentencepiece_style()
    encode = tok.encode if kind == "byte-level" else (lambda text: tok.encode(text).ids)
    vocab, rng = len(tok) if kind == "byte-level" else tok.get_vocab_size(), random.Random(0)
    cases = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 60))] for _ in range(400)]
    cases += [encode(" " + t) for t in TEXTS if t]
    held = 0
    for ids in cases:
        detok, got, k = Detok(tok), "", 0
        while k < len(ids):
            n = rng.randrange(1, 17)
            got, k = got + detok.add(ids[k:k + n]), k + n
        want, stray = _one_at_a_time(tok, ids), "\ufffd" in tok.decode(ids, skip_special_tokens=True)
        if stray and kind != "byte-level":  # byte fallback decodes a stray byte to as many replacement characters
            got, want = got.replace("\ufffd", ""), want.replace("\ufffd", "")  # as the window holds bytes around it
        assert got == want
        held += stray
    assert held > 10  # the random cases reach unfinished characters
    for t in TEXTS[:2]:
        detok, ids = Detok(tok), encode(t)
        assert "".join(detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3)) == tok.decode(ids) == t
