"""Response shapes: OpenAI chat and completions objects, their logprobs, Fireworks' raw_output, streaming chunks."""

from __future__ import annotations

import functools
import json
from typing import Any

from engine.requests import Choice, Request
from models import Model


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append((chr(b), b))
        else:
            chars.append((chr(256 + extra), b))
            extra += 1
    return dict(chars)


class Vocab:
    """Per-token text and exact bytes, cached; knows which ids are special (for raw_output fragments)."""

    def __init__(self, model: Model):
        self.tok = model.tokenizer
        self.special = set(self.tok.all_special_ids) | set(model.eos_ids)
        sample = self.tok.encode(" héllo wörld ✓", add_special_tokens=False)
        self.byte_level = self._pieces_bytes(sample) == " héllo wörld ✓".encode()

    def _pieces_bytes(self, ids: list[int]) -> bytes | None:
        dec = _byte_decoder()
        out = bytearray()
        for piece in self.tok.convert_ids_to_tokens(ids):
            if not all(ch in dec for ch in piece):
                return None
            out += bytes(dec[ch] for ch in piece)
        return bytes(out)

    @functools.lru_cache(maxsize=65536)
    def bytes(self, tid: int) -> bytes:
        """The exact bytes a token stands for."""
        if self.byte_level and tid not in self.special:
            b = self._pieces_bytes([tid])
            if b is not None:
                return b
        return self.tok.decode([tid], skip_special_tokens=False).encode()

    def text(self, tid: int) -> str:
        """The token as text (a partial UTF-8 character shows as U+FFFD)."""
        return self.bytes(tid).decode("utf-8", errors="replace")

    def fragments(self, ids: list[int]) -> list[Any]:
        """The prompt as Fireworks' `prompt_fragments`: text runs, with special tokens as their ids."""
        out: list[Any] = []
        run: list[int] = []
        for t in ids:
            if t in self.special:
                if run:
                    out.append(self.tok.decode(run, skip_special_tokens=False))
                    run = []
                out.append(t)
            else:
                run.append(t)
        if run:
            out.append(self.tok.decode(run, skip_special_tokens=False))
        return out


def prompt_entries(req: Request, first: int) -> list[tuple]:
    """`(id, logprob or None, top pairs or None)` for prompt tokens from index `first` (the first has no logprob)."""
    out = []
    lp = req.prompt_logprobs
    for j in range(first, len(req.prompt_ids)):
        if j == 0 or lp is None:
            out.append((req.prompt_ids[j], None, None))
        else:
            top = list(zip(lp[1][j - 1].tolist(), lp[2][j - 1].tolist()))
            out.append((req.prompt_ids[j], float(lp[0][j - 1]), top))
    return out


def vllm_prompt_logprobs(vocab: Vocab, req: Request, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then for each token a dict by token id of its
    logprob, its rank in the vocabulary and its text, and the same of the `k` most likely tokens there."""
    chosen, top_ids, top_lps, rank = req.prompt_logprobs
    out: list[dict | None] = [None]
    for j, tid in enumerate(req.prompt_ids[1:]):
        entry = {str(tid): {"logprob": float(chosen[j]), "rank": int(rank[j]), "decoded_token": vocab.text(tid)}}
        for r, (alt, lp) in enumerate(zip(top_ids[j][:k].tolist(), top_lps[j][:k].tolist())):
            entry.setdefault(str(alt), {"logprob": lp, "rank": r + 1, "decoded_token": vocab.text(alt)})
        out.append(entry)
    return out


def token_text(vocab: Vocab, tid: int, as_ids: bool) -> str:
    """A token as the logprobs objects name it: its text, or vLLM's `token_id:N` (`return_tokens_as_token_ids`:
    exact where a token's text is not, a byte of a character or a special token)."""
    return f"token_id:{tid}" if as_ids else vocab.text(tid)


def completion_logprobs(vocab: Vocab, entries: list[tuple], k: int, offset: int = 0, as_ids: bool = False) -> dict:
    """The completions-API logprobs object (tokens, token_logprobs, top_logprobs, text_offset), and Fireworks'
    `token_ids`."""
    tokens, lps, tops, offsets = [], [], [], []
    for tid, lp, top in entries:
        text = token_text(vocab, tid, as_ids)
        tokens.append(text)
        lps.append(lp)
        tops.append(None if top is None else {token_text(vocab, t, as_ids): v for t, v in top[:k]})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets,
            "token_ids": [tid for tid, _, _ in entries]}


def chat_logprobs(vocab: Vocab, entries: list[tuple], k: int, as_ids: bool = False) -> dict:
    """The chat-API logprobs object: `content[]` with token, token_id, logprob, bytes and top_logprobs."""
    def item(tid, lp):
        text = token_text(vocab, tid, as_ids)  # with `as_ids`, the bytes of what `token` says, as vLLM gives them
        return {"token": text, "token_id": tid, "logprob": lp,
                "bytes": list(text.encode() if as_ids else vocab.bytes(tid))}

    return {"content": [{**item(tid, lp), "top_logprobs": [item(t, v) for t, v in (top or [])[:k]]}
                        for tid, lp, top in entries], "refusal": None}


def raw_output(vocab: Vocab, req: Request, choice: Choice, k: int | None) -> dict:
    """Fireworks' raw_output: the exact prompt ids and fragments, and the raw completion with special tokens."""
    return {
        "prompt_token_ids": list(req.client_ids),
        "prompt_fragments": vocab.fragments(req.client_ids),
        "completion": vocab.tok.decode(choice.token_ids, skip_special_tokens=False),
        "completion_token_ids": list(choice.token_ids),
        "completion_logprobs": None if k is None else new_logprobs(vocab, choice.logprobs, k),
    }


def new_logprobs(vocab: Vocab, entries: list[tuple], k: int) -> dict:
    """Fireworks' NewLogProbs (raw_output's `completion_logprobs`): the chat API's `content` entries (token, token_id,
    logprob, bytes, top_logprobs), each with its `text_offset` in the completion."""
    content, offset = chat_logprobs(vocab, entries, k)["content"], 0
    for entry in content:
        entry["text_offset"] = offset
        offset += len(entry["token"])
    return {"content": content}


def prompt_requests(reqs: list[Request]) -> list[Request]:
    """One request per prompt (a prompt whose n is split over several requests counts once)."""
    return [r for r in reqs if r.choices[0].index == 0]


def prompt_token_ids(reqs: list[Request]) -> list:
    """Fireworks' top-level `prompt_token_ids`: the prompt's ids, or a list of them when there are several."""
    ids = [list(r.client_ids) for r in prompt_requests(reqs)]
    return ids[0] if len(ids) == 1 else ids


def usage(reqs: list[Request]) -> dict:
    """Token counts over every prompt (once, though its n may be split over requests) and every choice, and the
    prompt tokens served from the prefix cache."""
    firsts = prompt_requests(reqs)
    prompt = sum(len(r.prompt_ids) for r in firsts)
    completion = sum(len(c.token_ids) for r in reqs for c in r.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)}}


def sse_event(ev: dict) -> bytes:
    """A typed event framed for Server-Sent Events (`event: <type>`, then its JSON), as Responses and Messages send
    them."""
    return f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()
