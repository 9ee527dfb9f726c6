"""Reasoning output: a model's thinking, written between `<think>` and `</think>` (Qwen3, DeepSeek-R1 and V3.1),
`<seed:think>` and `</seed:think>` (Seed-OSS) or `[THINK]` and `[/THINK]` (Magistral), is split from its answer as
the text streams, and `reasoning_effort` becomes chat-template arguments and a token budget.

`Splitter` works on text pieces as they arrive and never splits a tag across pieces: text that may still become a
tag is held back until the next piece decides it. Feeding a text in any pieces gives the same reasoning and answer as
feeding it whole (a property test checks it). Whitespace around the thinking and before the answer is dropped, as
the peers' parsers do (text without a thinking block is left as it is).
"""

from __future__ import annotations

import dataclasses
from typing import Any

OPEN, CLOSE = "<think>", "</think>"
SEED = ("<seed:think>", "</seed:think>")  # Seed-OSS's (its budget reflections inside are thinking too)
MISTRAL = ("[THINK]", "[/THINK]")  # Magistral's (2509 on; special tokens, so its replies keep them: `protocol`)
TAGS = {"think": (OPEN, CLOSE), "seed": SEED, "mistral": MISTRAL}  # the tags of each form `Splitter` reads
PARSERS = ("deepseek_r1", "qwen3")  # vLLM's names; both write <think>…</think> (R1's template opens it in the prompt)
SEED_PARSER, MISTRAL_PARSER = "seed_oss", "mistral"  # vLLM's names for Seed-OSS's and Magistral's
# The forms whose marks are special tokens (Seed-OSS's may be): their replies are detokenized with special tokens
SPECIAL = ("seed", "mistral", "harmony", "cohere")
HARMONY = "openai_gptoss"  # vLLM's name for gpt-oss's channels (`server.harmony`)
EFFORTS = ("none", "low", "medium", "high")


@dataclasses.dataclass(frozen=True)
class Thinking:
    """What one request asks of a reasoning model: whether its prompt opened a thinking block, and a budget of
    thinking tokens after which the engine closes the block (None: bounded by max_tokens alone); `form`: how the
    reply is read, "think", "seed" or "mistral" (`Splitter` over that form's `TAGS`), "harmony" (gpt-oss's channels,
    `server.harmony`) or "cohere" (Command R7B's and Command A's blocks, `server.cohere`)."""

    opened: bool = False
    budget: int | None = None
    form: str = "think"
    budget_param: str = "reasoning_effort"  # the field that set the budget (vLLM's `thinking_token_budget` too)


def opens(prompt_text: str, tag: str = OPEN) -> bool:
    """Whether a rendered prompt ends by opening a thinking block (the template wrote `tag` for the model)."""
    return prompt_text.rstrip().endswith(tag)


def template_thinks(chat_template: Any, tags: tuple[str, str] = (OPEN, CLOSE)) -> bool:
    """Whether a chat template writes thinking blocks between `tags` (`--reasoning-parser auto` turns the parser
    on for it)."""
    return isinstance(chat_template, str) and tags[0] in chat_template and tags[1] in chat_template


def effort(value: Any, bad) -> tuple[dict, int | None]:
    """`(chat-template arguments, thinking budget)` for Fireworks' `reasoning_effort`: "none" or false turn thinking
    off (a template that opens the block anyway gets it closed at once: budget 0); true, "low", "medium" and "high"
    turn it on (the level goes to templates that take one); an integer is a budget of thinking tokens (which
    Seed-OSS's template takes as `thinking_budget`, to tell the model; 0 there: no thinking)."""
    if value is None:
        return {}, None
    if value is False or value == "none" or value == 0:
        return {"enable_thinking": False, "thinking": False, "thinking_budget": 0}, 0
    if value is True:
        return {"enable_thinking": True, "thinking": True}, None
    if isinstance(value, str) and value in EFFORTS:
        return {"enable_thinking": True, "thinking": True, "reasoning_effort": value}, None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return {"enable_thinking": True, "thinking": True, "thinking_budget": value}, value
    raise bad("'reasoning_effort' must be 'none', 'low', 'medium', 'high', a boolean, or a token budget (an integer "
              f">= 0), got {value!r}", "reasoning_effort")


def held(text: str, *marks: str) -> int:
    """Length of the longest end of `text` that is a proper start of one of `marks` (what may still become it)."""
    return max((n for m in marks for n in range(min(len(m) - 1, len(text)), 0, -1) if m.startswith(text[-n:])),
               default=0)


class Splitter:
    """One choice's generated text, split into `(reasoning, answer)` pieces as it arrives."""

    def __init__(self, opened: bool = False, tags: tuple[str, str] = (OPEN, CLOSE)):
        self.open, self.close = tags
        self.state = "think" if opened else "start"  # start: a block may still open; think; gap: before the answer
        self.buf = ""
        self.lead = True  # no reasoning sent yet (leading whitespace is dropped)

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and the answer text that `piece` completes; `final`: the text ends here (what was held
        back goes out as what it is)."""
        self.buf += piece
        reasoning = answer = ""
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(self.open):
                    self.buf, self.state = head[len(self.open):], "think"
                    continue
                if self.open.startswith(head) and not final:
                    return reasoning, answer  # may still open a block
                self.state = "answer"
                continue
            if self.state == "think":
                if self.lead:
                    self.buf = self.buf.lstrip()
                i = self.buf.find(self.close)
                if i >= 0:
                    reasoning += self.buf[:i].rstrip()
                    self.buf, self.state = self.buf[i + len(self.close):], "gap"
                    continue
                keep = len(self.buf) if final else len(self.buf) - held(self.buf, self.close)
                out = self.buf[:keep] if final else self.buf[:keep].rstrip()
                self.buf = self.buf[len(out):]
                if final:
                    out = out.rstrip()
                reasoning += out
                self.lead = self.lead and not out
                return reasoning, answer
            if self.state == "gap":
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return reasoning, answer
                self.state = "answer"
            answer += self.buf
            self.buf = ""
            return reasoning, answer


def split(text: str, opened: bool = False, tags: tuple[str, str] = (OPEN, CLOSE)) -> tuple[str, str]:
    """`(reasoning, answer)` of a whole text."""
    return Splitter(opened, tags).feed(text, final=True)


def resolve(parser: str, tokenizer) -> tuple[str | None, tuple[int, int] | None]:
    """`(how thinking is split out, (open id, close id))` for `--reasoning-parser`: "think" for `<think>` blocks,
    "seed" for Seed-OSS's `<seed:think>` ones, "mistral" for Magistral's `[THINK]` ones, "harmony" for gpt-oss's
    channels, "cohere" for Command R7B's and
    Command A's blocks, None for not at all (auto: by what the chat template writes); the ids (of the tags that open
    and close the thinking) are None where a tag is not one token of the vocabulary (no budget then), and for
    harmony."""
    from server import cohere, harmony  # they read text with `held`

    if parser not in ("auto", "none", HARMONY, SEED_PARSER, MISTRAL_PARSER, *PARSERS, *cohere.NAMES):
        raise ValueError(f"unknown reasoning parser {parser!r}; use auto, none, {', '.join(PARSERS)}, {SEED_PARSER}, "
                         f"{MISTRAL_PARSER}, {HARMONY}, {', '.join(cohere.NAMES)}")
    template = getattr(tokenizer, "chat_template", None)
    if parser == HARMONY or (parser == "auto" and harmony.template_is_harmony(template)):
        return "harmony", None
    if parser in cohere.NAMES or (parser == "auto" and cohere.template_is_cohere(template)):
        form, tags = "cohere", cohere.THINKING
    elif parser == SEED_PARSER or (parser == "auto" and template_thinks(template, SEED)):
        form, tags = "seed", SEED
    elif parser == MISTRAL_PARSER or (parser == "auto" and template_thinks(template, MISTRAL)):
        form, tags = "mistral", MISTRAL
    elif parser in PARSERS or (parser == "auto" and template_thinks(template)):
        form, tags = "think", (OPEN, CLOSE)
    else:
        return None, None
    ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in tags]
    return form, (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None
