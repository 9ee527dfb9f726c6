"""Tokenizers and chat templates, served without importing transformers.

A source's tokenizer is normalized once with transformers (a GGUF's rebuilt from its metadata, an HF folder's read
by `AutoTokenizer`, whatever its format) and saved as a fast-tokenizer folder in the cache. Every start after that
reads the folder with the `tokenizers` library and renders chat templates with jinja2 in the sandbox transformers
gives them (the same filters, globals and block trimming). Importing transformers takes ~3 s on a small CPU and was
the longest step of a warm start; `tokenizers` and jinja2 take ~0.2 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import shutil
import sys
import threading
from typing import Any

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING = ("reasoning_content", "thinking", "reasoning")  # names templates read a message's reasoning under
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Fill-in-the-middle tokens by role, each under the names code models give it (the names llama.cpp's vocabulary
# loader looks for: Qwen2.5-Coder, StarCoder and Granite, DeepSeek-Coder, CodeLlama, GLM-4.5, Falcon-H1 coder).
FIM_NAMES = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
    "eot": ("<EOT>", "\u2581<EOT>"),  # CodeLlama's end of an infill
}
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
         "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclasses.dataclass(frozen=True)
class Fim:
    """A vocabulary's fill-in-the-middle token ids: prefix, suffix and middle (every infilling model has them), and
    where it has them the padding, repository-name, file-separator and end-of-infill tokens (None where not)."""

    pre: int
    suf: int
    mid: int
    pad: int | None = None
    rep: int | None = None
    sep: int | None = None
    eot: int | None = None

    @property
    def ends(self) -> list[int]:
        """Tokens that end an infill beside the end of sequence, as in llama.cpp's end-of-generation set: a model
        that has written the middle goes on to pad, to the next file, or to its end-of-infill token."""
        return [t for t in (self.pad, self.rep, self.sep, self.eot) if t is not None]


class Tokenizer:
    """A fast tokenizer (`tokenizers.Tokenizer`) with its special tokens and chat template, answering the calls the
    engine and server make as transformers' tokenizers do (`encode`, `decode`, `apply_chat_template`, ...)."""

    def __init__(self, folder: str):
        import tokenizers

        self.folder = folder
        self.backend = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        config = _json(os.path.join(folder, "tokenizer_config.json"))
        special = {**_json(os.path.join(folder, "special_tokens_map.json")), **config}
        self.special_tokens_map = {k: _content(special[k]) for k in SPECIAL if special.get(k) is not None}
        extra = special.get("extra_special_tokens") or special.get("additional_special_tokens") or []
        self.extra_special_tokens = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        self.clean_up = bool(config.get("clean_up_tokenization_spaces")) and \
            type(self.backend.model).__name__ != "BPE"  # transformers skips the clean-up for BPE models
        self.chat_template = _chat_template(folder, config)
        self.template_defaults: dict = {}  # variables every render gets unless its kwargs set them (the server's)
        self._template = None

    def use_template(self, template: str) -> None:
        """Render chats with `template` instead of the folder's (`--chat-template`)."""
        self.chat_template, self._template = template, None

    def __getattr__(self, name: str):
        if name in SPECIAL:
            return self.special_tokens_map.get(name)
        if name.endswith("_token_id") and name[:-3] in SPECIAL:
            token = self.special_tokens_map.get(name[:-3])
            return None if token is None else self.backend.token_to_id(token)
        raise AttributeError(name)

    @property
    def content_parts(self) -> bool:
        """Whether the chat template reads a message's content as a list of typed parts, as LLaVA's does (it loops
        over `{"type": "image"}` and `{"type": "text"}` parts, and a string renders nothing there), rather than as a
        string: vLLM's "openai" content format. Found by rendering a string probe once per template."""
        known = self.__dict__.setdefault("_parts", {})
        if self.chat_template not in known:
            probe = "\x01probe"
            try:
                text = self.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                                add_generation_prompt=True)
                known[self.chat_template] = probe not in text
            except Exception:  # a template that wants more than one user turn: it takes strings, as most do
                known[self.chat_template] = False
        return known[self.chat_template]

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters of the vocabulary's longest token string: no token decodes to more, so a text of C characters
        has at least about C / longest_token tokens."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Each token's own text, special tokens' too (a piece of a character decodes to U+FFFD)."""
        return self.backend.decode_batch([[t] for t in range(len(self))], skip_special_tokens=False)

    @functools.cached_property
    def fim(self) -> Fim | None:
        """The vocabulary's fill-in-the-middle tokens, found by name (`FIM_NAMES`); None unless it has a prefix, a
        suffix and a middle token."""
        found = {}
        for role, names in FIM_NAMES.items():
            ids = [i for i in map(self.backend.token_to_id, names) if i is not None]
            found[role] = ids[0] if ids else None
        return Fim(**found) if None not in (found["pre"], found["suf"], found["mid"]) else None

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens (bos, eos, unk, pad, ...) and the extra ones."""
        tokens = dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens])
        return [i for i in (self.backend.token_to_id(t) for t in tokens) if i is not None]

    def encode(self, text: str, add_special_tokens: bool = True, text_pair: str | None = None) -> list[int]:
        """Token ids of `text`, or of `text` and `text_pair` joined as the post-processor joins a pair (a
        cross-encoder's input), with its special tokens (e.g. a BOS) when `add_special_tokens`. Through
        `encode_batch`, which lets go of the GIL while it works (`encode` holds it: 5 s for a 7.5 MB prompt on a
        server thread stalled every stream)."""
        item = text if text_pair is None else (text, text_pair)
        return self.backend.encode_batch([item], add_special_tokens=add_special_tokens)[0].ids

    def prefix(self, text: str, n: int) -> str:
        """The start of `text` that its first `n` tokens cover (all of it when it has no more), cut at a token's
        end in the text, not decoded from ids (a cut inside a character's bytes would decode as U+FFFD)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return text if len(enc.ids) <= n else text[:enc.offsets[n - 1][1]]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of token ids."""
        text = self.backend.decode([ids] if isinstance(ids, int) else list(ids),
                                   skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up else text

    def convert_ids_to_tokens(self, ids):
        """Token strings of ids (one id gives one string)."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        """Ids of token strings (one string gives one id)."""
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True, add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            continue_final_message: bool = False, **kwargs):
        """Render `messages` with the chat template as transformers does (the special tokens and `kwargs` are
        template variables; reasoning under any of its names is seen under all; `continue_final_message` ends the
        text inside the last message); token ids when `tokenize`."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        chat = [_with_reasoning(m) for m in json.loads(json.dumps(messages))]  # plain data, a copy of the caller's
        final = None
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ValueError("continue_final_message needs a last message with text content")
            final = chat[-1]["content"]
            chat[-1]["content"] = final + CONTINUE_TAG
        text = self._template.render(messages=chat, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens_map, **self.template_defaults, **kwargs})
        if final is not None:  # cut after the final message's text, dropping the template's end of turn
            if final.strip() not in text or CONTINUE_TAG.strip() not in text:
                raise ValueError("continue_final_message: the template does not render the final message whole")
            at = text.rindex(CONTINUE_TAG.strip())
            text = text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load(source, folder: str) -> Tokenizer:
    """The tokenizer of a `models.loading.source.Source` (an HF folder, or a GGUF's metadata, read only when building),
    normalized once into the cache `folder`."""
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        tmp = f"{folder}.{os.getpid()}.{threading.get_ident()}.tmp"
        if source.kind == "hf":
            tf = transformers_module()
            with torch_hidden():
                tok = tf.AutoTokenizer.from_pretrained(source.path)
            if not getattr(tok, "is_fast", False):
                raise ValueError(f"{source.path}: only fast tokenizers (tokenizer.json, or one transformers converts) "
                                 "work")
            tok.save_pretrained(tmp)
        else:
            build_gguf_tokenizer(source.meta, tmp)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer(folder)


def files_digest(folder: str) -> str:
    """sha256 over an HF folder's tokenizer files (names and bytes)."""
    h = hashlib.sha256()
    for name in FILES:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            h.update(name.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:32]


def _json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def read_template(value: str) -> str:
    """A chat template given on the command line (vLLM's `--chat-template`): a file (Jinja text, or JSON with a
    `chat_template` field, named templates' `default` included) or the template itself; checked by compiling it.
    ValueError names what is wrong."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
        try:
            saved = json.loads(text)
        except ValueError:
            saved = None
        if isinstance(saved, dict):
            text = _named(saved.get("chat_template"))
            if not isinstance(text, str):
                raise ValueError(f"{value} is JSON without a 'chat_template' string (or a named 'default' one)")
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"no such file, and not a template (no '{{{{' or '{{%'): {value!r}")
    if not text.strip():
        raise ValueError("the chat template is empty")
    try:
        _compile(text)
    except Exception as e:  # jinja2's syntax errors, and what its parser raises besides
        raise ValueError(f"the chat template does not compile: {e}") from None
    return text


def _named(template):
    """A saved `chat_template`: a string, or named templates' `default`."""
    if isinstance(template, list):
        return next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template


def _chat_template(folder: str, config: dict) -> str | None:
    """The folder's default chat template: `chat_template.jinja`, else `chat_template.json`, else the config's."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    template = _json(os.path.join(folder, "chat_template.json")).get("chat_template") or config.get("chat_template")
    return _named(template)


def _with_reasoning(message: dict) -> dict:
    """A message whose reasoning (under any name) is readable as `reasoning_content`, `reasoning` and `thinking`."""
    if not isinstance(message, dict):
        raise TypeError("chat messages must be objects")
    reasoning = next((message[k] for k in REASONING if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, "reasoning": reasoning, **message,
                                              "reasoning_content": reasoning}


def _clean_up(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and contractions (WordPiece-style tokenizers)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _compile(template: str):
    """A chat template compiled in jinja2's immutable sandbox with transformers' settings for templates: blocks
    trimmed, `loopcontrols`, a `{% generation %}` block (rendered as its body), a `tojson` that keeps non-ASCII and
    takes indent/separators/sort_keys, `raise_exception`, `strftime_now`, and `dict` / `namespace` that refuse
    underscore names."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
                       dict=lambda *a, **kw: dict(*a, **kw))
    return env.from_string(template)


# ---- transformers, for the one-time normalization (and the tests' references) -------------------------------------


@contextlib.contextmanager
def torch_hidden():
    """Make `torch` unfindable while transformers decides what is available (it imports torch if it can)."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # find_spec("torch") now answers None
    try:
        yield
    finally:
        if hidden and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


_importing = threading.Lock()


def transformers_module():
    """Import transformers for its tokenizer code only (thread-safe: a second caller waits for the first)."""
    with _importing, torch_hidden():
        import transformers
        from transformers import PreTrainedTokenizerFast  # noqa: F401  (resolve a lazily-imported name)

        return transformers


def build_gguf_tokenizer(meta: dict[str, Any], save_to: str) -> None:
    """Rebuild the tokenizer described by GGUF metadata and save it as a fast-tokenizer folder."""
    tf = transformers_module()
    with torch_hidden():
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

        tok_dict = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                    if f"tokenizer.{key}" in meta}
        backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
        tokens = tok_dict["tokens"]

        def special(key):
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = tok_dict.get("tokenizer_type") == "llama"
        tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
            unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=bool(add_bos), add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )
        tok.save_pretrained(save_to)
