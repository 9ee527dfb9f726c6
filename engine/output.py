"""A choice's drawn tokens into its output, on the host after a step's draws are read back (the next step already
on the devices): token ids and logprobs, the detokenized text, why it ends (an end of sequence, a stop string, a
complete grammar, the length limit, llama.cpp's code-completion limits, a grammar that failed), and the deltas
streamed from them. Plain Python over one choice at a time; the engine retires a choice that ends
(`Engine._finish`)."""

from __future__ import annotations

import time

import numpy as np

from engine.params import SamplingParams
from engine.requests import Choice, Delta


def extend(choice: Choice, p: SamplingParams, outs, steps: np.ndarray, slot: int, limit: int,
           eos_ids) -> str | None:
    """Append a choice's tokens of several `steps` of `outs` (`[steps, slots]` arrays), at most `limit` in all:
    together (an end of sequence or the limit cuts them, one detokenization for all), or one by one where a grammar
    (or a thinking budget) or stop strings read each. Returns why the choice ends, or None."""
    if choice.matcher is not None or p.stop or p.n_indent or p.t_max_predict_ms > 0:
        for i in steps.tolist():
            if reason := append(choice, p, outs, (i, slot), limit, eos_ids):
                return reason
        return None
    toks = outs.token[steps, slot].tolist()
    room = limit - len(choice.token_ids)
    end, reason = (room, "length") if len(toks) >= room else (len(toks), None)
    if not p.ignore_eos or p.stop_token_ids:
        ending = next((j for j, t in enumerate(toks[:end]) if _ends(t, p, eos_ids)), None)
        if ending is not None:
            end, reason = ending + 1, "stop"
    toks = toks[:end]
    choice.token_ids += toks
    if p.logprobs or p.top_logprobs:
        k, at = p.top_logprobs, steps[:end]
        choice.logprobs += [(t, lp, list(zip(ids, lps))) for t, lp, ids, lps in zip(
            toks, outs.logprob[at, slot].tolist(), outs.top_ids[at, slot, :k].tolist(),
            outs.top_logprobs[at, slot, :k].tolist())]
    if choice.detok is not None:  # without a tokenizer the engine works in token ids alone
        choice.text += choice.detok.add(toks[:-1] if reason == "stop" and _is_eos(toks[-1], p, eos_ids) else toks)
    return reason


def _ends(tok: int, p: SamplingParams, eos_ids) -> bool:
    """Whether drawing `tok` ends the choice: an end of sequence (unless ignore_eos) or one of its stop_token_ids."""
    return _is_eos(tok, p, eos_ids) or tok in p.stop_token_ids


def _is_eos(tok: int, p: SamplingParams, eos_ids) -> bool:
    """An end of sequence that ends the choice: its text is never the reply's (a stop token id's stays, as vLLM
    keeps it; the detokenizer drops a special token's)."""
    return tok in eos_ids and not p.ignore_eos


def append(choice: Choice, p: SamplingParams, out, at: tuple, limit: int, eos_ids) -> str | None:
    """Append one token, `out`'s at index `at` (a slot, or a step and a slot), checking each way to end with
    `limit` tokens at most. Returns why the choice ends, or None."""
    tok = int(out.token[at])
    choice.token_ids.append(tok)
    choice.started = choice.started or time.monotonic()
    if p.logprobs or p.top_logprobs:
        k = p.top_logprobs
        tops = list(zip(out.top_ids[at][:k].tolist(), out.top_logprobs[at][:k].tolist()))
        choice.logprobs.append((tok, float(out.logprob[at]), tops))
    if choice.matcher is not None:
        choice.matcher.advance(tok)
    if _is_eos(tok, p, eos_ids):
        return "stop"
    before = len(choice.text)
    if choice.detok is not None:
        choice.text += choice.detok.add([tok])
    if tok in p.stop_token_ids:
        return "stop"
    if p.stop and len(choice.token_ids) > p.min_tokens and _stopped(choice, p, before):
        return "stop"
    if choice.matcher is not None and choice.matcher.done:  # the grammar is complete, or it failed
        if why := choice.matcher.error:  # a limit of llguidance's tripped: the text so far does not match it
            choice.error = f"the grammar failed after {len(choice.token_ids)} tokens: {why}"
            return "error"
        return "length" if choice.matcher.closed else "stop"
    if p.n_indent and _outdented(choice, p.n_indent, before):
        return "length"  # llama.cpp's "limit"
    late = p.t_max_predict_ms > 0 and (time.monotonic() - choice.started) * 1000 > p.t_max_predict_ms
    if late and "\n" in choice.text:
        return "length"
    return "length" if len(choice.token_ids) >= limit else None


def _stopped(choice: Choice, p: SamplingParams, before: int) -> bool:
    """Whether the text from `before` on completes a stop string; if so the text ends before the first one (after it
    with include_stop_str_in_output)."""
    start = max(0, before - max(len(s) for s in p.stop) + 1)
    hits = [(i, s) for s in p.stop if (i := choice.text.find(s, start)) >= 0]
    if hits:
        at, choice.stop_hit = min(hits)
        choice.cut = True
        choice.text = choice.text[:at + len(choice.stop_hit) * p.include_stop_str_in_output]
        return True
    return False


def _outdented(choice: Choice, n: int, before: int) -> bool:
    """llama.cpp's `n_indent`: whether a line after a new line, among those the text from `before` on reaches, starts
    (its first character other than a space or tab, a new line included) after fewer than `n` of them; if so the text
    ends before that character, as llama.cpp cuts it."""
    text = choice.text
    i = text.rfind("\n", 0, before)
    i = i if i >= 0 else text.find("\n", before)
    while i >= 0:
        j = i + 1
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and j - i - 1 < n:
            choice.text, choice.cut = text[:j], True
            return True
        i = text.find("\n", i + 1)
    return False


def delta(choice: Choice) -> Delta | None:
    """New text (held back while it may still become a stop string), tokens and logprobs since the last call."""
    hold = max((len(x) for x in choice.stops), default=1) - 1
    limit = len(choice.text) if choice.finish_reason else max(choice._sent_text, len(choice.text) - hold)
    text = choice.text[choice._sent_text:limit]
    toks = choice.token_ids[choice._sent_tokens:]
    lps = choice.logprobs[choice._sent_tokens:]
    final = choice.finish_reason is not None and not choice._final_sent
    if not text and not toks and not final:
        return None
    choice._sent_text, choice._sent_tokens = limit, len(choice.token_ids)
    choice._final_sent = choice._final_sent or final
    return Delta(choice.index, text, toks, lps, choice.finish_reason if final else None)
