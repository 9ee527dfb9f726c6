"""Fill-in-the-middle: a code model's prompt for the text between a prefix and a suffix.

Code models trained to infill (Qwen2.5-Coder, StarCoder, DeepSeek-Coder, CodeLlama, Granite and GLM code models)
read the text around a gap between three special tokens and write the gap after the last:
`[FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID]` (prefix-suffix-middle, the order every one of them was trained on).
Their tokens are found in the vocabulary by name (`Tokenizer.fim`, the names llama.cpp looks for), so any model that
has them infills, from an HF folder or a GGUF. Two APIs ask for it:

- OpenAI's completions `suffix`: the prompt is the prefix, the reply the middle.
- llama.cpp's `/infill` (llama.vscode, Continue, Tabby and others' code completion): `input_prefix`,
  `input_suffix`, `prompt` (the text just before the cursor, after the prefix) and `input_extra`, other files of
  the project, put before the prefix in the repository-level form (Qwen2.5-Coder's report, arXiv 2409.12186):
  `[FIM_REP]myproject\\n[FIM_SEP]name\\ntext...[FIM_SEP]filename\\n[FIM_PRE]...` with llama.cpp's placeholders for
  the names it is not given, so a client tuned against llama.cpp sees its layout here; a vocabulary without
  those tokens gets each file after llama.cpp's separator line. Two differences: a tokenizer's BOS starts the
  sequence (llama.cpp puts it after the other files), and the prefix and suffix are cut to the context, not to
  llama.cpp's batch (it keeps at most 3/4 and 1/4 of `--batch-size` tokens of them). What does not fit the context
  less the reply's room (`n_predict`, or a quarter of the context) is cut: first the oldest of the other files,
  then the prefix's start and the suffix's end, the suffix keeping at least a quarter of the room.

Text is tokenized as the other APIs here tokenize it: a special token's text inside it (`<|fim_middle|>` in a
file) is that token, where llama.cpp's `/infill` reads it as plain text.

The model's padding, repository and file-separator tokens end an infill beside its end of sequence (`Fim.ends`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.params import InvalidRequest

NO_FIM = ("its vocabulary has no fill-in-the-middle tokens (a code model's <|fim_prefix|>, <|fim_suffix|> and "
          "<|fim_middle|>, or the like)")  # why a model cannot infill, in both APIs' errors
SNIPPET = "\n\n--- snippet ---\n\n"  # llama.cpp's separator before another file, where the vocabulary has no file one
PROJECT, FILE, OTHER = "myproject", "filename", "tmp"  # llama.cpp's names for the project and the files unnamed


def lead(tok) -> list[int]:
    """The beginning-of-sequence token the tokenizer puts before a text, if it puts one."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and bos in tok.encode("", add_special_tokens=True) else []


def arrange(tok, prefix: Sequence[int], suffix: Sequence[int], prompt: Sequence[int] = (),
            context: Sequence[int] = (), room: int | None = None) -> list[int]:
    """The infill prompt, `[BOS] context [FIM_PRE] prefix prompt [FIM_SUF] suffix [FIM_MID]` (a BOS the prefix's
    ids begin with is not repeated); with `room`, cut to at most that many tokens (the module doc says how), an
    `InvalidRequest` when the fixed parts alone exceed it."""
    fim, start = tok.fim, lead(tok)
    if start and list(prefix[:1]) == start:
        prefix = prefix[1:]
    if room is not None:
        avail = room - len(start) - len(prompt) - 3
        if avail < 0:
            raise InvalidRequest(f"the infill's 'prompt' ({len(prompt)} tokens) leaves no room in the context for "
                                 "the prefix, the suffix and the reply", "prompt")
        keep_suffix = min(len(suffix), max(avail // 4, avail - len(prefix)))
        keep_prefix = min(len(prefix), avail - keep_suffix)
        prefix, suffix = prefix[len(prefix) - keep_prefix:], suffix[:keep_suffix]
    body = [fim.pre, *prefix, *prompt, fim.suf, *suffix, fim.mid]
    if room is not None:
        context = context[max(0, len(context) - (room - len(start) - len(body))):]
    return [*start, *context, *body]


def repository(tok, extra: list[dict]) -> list[int]:
    """The other files before the prefix, as llama.cpp's `/infill` writes them (the module doc)."""
    fim, out = tok.fim, []

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    if fim.rep is not None:
        out += [fim.rep, *encode(PROJECT + "\n")]
    for chunk in extra:
        out += [fim.sep, *encode(chunk["filename"] + "\n")] if fim.sep is not None else encode(SNIPPET)
        out += encode(chunk["text"])
    if fim.sep is not None:
        out += [fim.sep, *encode(FILE + "\n")]
    return out


def text_ids(v: Any, tok, param: str) -> list[int]:
    """A field of text, token ids, or both mixed (llama.cpp's), as token ids; text is tokenized without special
    tokens."""
    if v is None:  # llama.cpp's clients send null for "none"
        return []
    if isinstance(v, str):
        return tok.encode(v, add_special_tokens=False) if v else []
    if isinstance(v, list) and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in v):
        out: list[int] = []
        for x in v:
            out += tok.encode(x, add_special_tokens=False) if isinstance(x, str) else [x]
        return out
    raise InvalidRequest(f"'{param}' must be a string, or a list of strings and token ids", param)


def extra_files(v: Any) -> list[dict]:
    """llama.cpp's `input_extra`: a list of `{"filename": ..., "text": ...}` (a file unnamed is llama.cpp's "tmp")."""
    if v is None:
        return []
    ok = isinstance(v, list) and all(
        isinstance(c, dict) and isinstance(c.get("text", ""), str) and isinstance(c.get("filename", OTHER), str)
        for c in v)
    if not ok:
        raise InvalidRequest("'input_extra' must be a list of objects {\"filename\": string, \"text\": string}",
                             "input_extra")
    return [{"filename": c.get("filename", OTHER), "text": c.get("text", "")} for c in v]


def infill_prompt(body: dict, tok, max_len: int) -> list[int]:
    """The token ids of a llama.cpp `/infill` body, fitted to a context of `max_len` less the reply's room."""
    n = body.get("n_predict")
    reply = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else max_len // 4
    if reply > max_len - len(lead(tok)) - 3:
        raise InvalidRequest(f"'n_predict' ({reply}) leaves no room for the infill's prompt in this model's context of "
                             f"{max_len} tokens", "n_predict")
    parts = {k: text_ids(body.get(k, ""), tok, k) for k in ("input_prefix", "input_suffix", "prompt")}
    return arrange(tok, parts["input_prefix"], parts["input_suffix"], parts["prompt"],
                   repository(tok, extra_files(body.get("input_extra"))), room=max(max_len - reply, 0))
