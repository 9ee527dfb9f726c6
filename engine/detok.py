"""Incremental detokenization: the text each batch of a choice's new tokens adds, as the batches arrive."""

from __future__ import annotations


class Detok:
    """The text of a stream of token ids, added to a batch at a time (the prefix and read offsets of vLLM's and
    TGI's detokenizers). Each batch is decoded in a window that starts a few tokens back, so the pieces join with the
    spacing of one whole decode, and text that ends in an unfinished UTF-8 character waits for the tokens that
    finish it."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []  # the tokens from the current window's start (the last text's first token) on
        self.read = 0  # where the tokens whose text is not out yet begin, in `ids`

    def add(self, tokens: list[int]) -> str:
        """The text `tokens` add: the batch decoded as one window (two decodes for the batch) when its text is whole
        characters, else token by token, so only an unfinished character's tokens wait."""
        if not tokens:  # an end of sequence alone
            return ""
        if len(tokens) == 1:
            return self._window(tokens, keep=True) or ""
        text = self._window(tokens, whole=True)
        if text is None:
            text = "".join(self._window([t], keep=True) or "" for t in tokens)
        return text

    def flush(self) -> str:
        """The text of the tokens still held at the end of the stream (an unfinished UTF-8 character that now never
        finishes: its replacement characters, as llama.cpp's server sends them); nothing is held after it."""
        if self.read == len(self.ids):
            return ""
        decode = self.tok.decode
        before = decode(self.ids[:self.read], skip_special_tokens=self.skip)
        after = decode(self.ids, skip_special_tokens=self.skip)
        self.ids, self.read = [], 0
        return after[len(before):]

    def _window(self, tokens: list[int], keep: bool = False, whole: bool = False) -> str | None:
        """Take `tokens` and return the text they add, or None while it would end in an unfinished character
        (taking them only when `keep`). `whole`: None also when the window's text holds a replacement character
        anywhere: how many a stray byte decodes to depends on the bytes beside it in the window, so such text goes
        token by token."""
        decode = self.tok.decode
        before = decode(self.ids[:self.read], skip_special_tokens=self.skip)
        after = decode(self.ids + tokens, skip_special_tokens=self.skip)
        if whole and "\ufffd" in after:
            return None
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.ids = self.ids[self.read:] + tokens  # the next window starts at this text's first token
            self.read = len(self.ids)
            return after[len(before):]
        if keep:
            self.ids += tokens
        return None
