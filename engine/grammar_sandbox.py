"""llguidance's compiler in a child process. Compiling recurses over a grammar's rules in native code, so a deep
enough chain of rules (a thousand `$ref`s through `anyOf`, a few thousand GBNF rules: ~100 KB of request) overflows
the thread's stack and kills the process with no Python exception; and converting GBNF takes time that grows with
the square of a rule chain, holding the GIL. So each new grammar is converted and checked here first: a crash or a
grammar past `TIMEOUT` becomes an error message for a 400, and the serving process compiles only grammars that
passed, on threads whose stacks are at least twice the child's (`SERVING_STACK`).

This file is also the child's program: it imports nothing but the standard library, numpy and llguidance (not the
`engine` package, which would import JAX), and talks JSON lines over stdin/stdout. It runs with `-P` (its folder
not on the path, so `engine/requests.py` and the like shadow nothing) but with `PYTHONPATH`, where a GPU host's
carried wheels put llguidance.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading

CHILD_STACK = 4 << 20  # the child compiles on a thread with this stack
SERVING_STACK = 64 << 20  # what the engine thread, which compiles matchers, gets (the main thread has 8 MiB)
TIMEOUT = 5.0  # seconds a grammar may take to convert and check
WALK = 4  # tokens a check draws along each new grammar (`_walk`)
STARTUP = 60.0  # seconds the child may take to import llguidance and load the tokenizer


class Busy(Exception):
    """No room for a valid call now, and the caller should answer 429: the child was compiling other grammars for
    longer than the timeout, or every image slot is read by running requests (`engine.images`)."""


class Sandbox:
    """One child process that converts GBNF and checks grammars against a tokenizer (None: conversion only);
    started on first use, restarted after a crash or a timeout. Calls are serialized."""

    def __init__(self, tokenizer_json: str | None = None, eos_ids: list[int] | None = None,
                 timeout: float = TIMEOUT):
        self.hello = json.dumps({"tokenizer": tokenizer_json, "eos": eos_ids or []})
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def gbnf(self, text: str) -> tuple[str | None, str | None]:
        """`(llguidance grammar, None)` for GBNF text, or `(None, why not)`."""
        return self._ask({"gbnf": text})

    def check(self, grammar: str) -> str | None:
        """None if `grammar` compiles against the tokenizer and some text matches it, else why not."""
        return self._ask({"grammar": grammar})[1]

    def _ask(self, req: dict) -> tuple[str | None, str | None]:
        if not self.lock.acquire(timeout=self.timeout):  # others' grammars queued ahead: shed load, do not pile up
            raise Busy(f"the grammar compiler has been busy with other requests' grammars for {self.timeout:g} s")
        try:
            return self._ask_locked(req)
        finally:
            self.lock.release()

    def _ask_locked(self, req: dict) -> tuple[str | None, str | None]:
        try:
            if self.proc is None or self.proc.poll() is not None:  # start one; its start-up is not the grammar's
                self.proc = subprocess.Popen([sys.executable, "-P", __file__], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, encoding="utf-8")
                self.proc.stdin.write(self.hello + "\n")
                self.proc.stdin.flush()
                if not select.select([self.proc.stdout], [], [], STARTUP)[0] or not self.proc.stdout.readline():
                    raise OSError("the grammar sandbox did not start")
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            ready = select.select([self.proc.stdout], [], [], self.timeout)[0]
            out = json.loads(self.proc.stdout.readline() or "null") if ready else "timeout"
        except (OSError, ValueError):  # the child died mid-request (a broken pipe), or wrote something else
            out = None
        if isinstance(out, dict) and ("grammar" in out or "error" in out):  # an answer ({} would mean none)
            return out.get("grammar"), out.get("error")
        self._kill()
        if out == "timeout":
            return None, f"it took more than {self.timeout:g} s to compile"
        return None, "compiling it crashed llguidance (most likely its stack: rules nested too deeply)"

    def close(self) -> None:
        """Stop the child once the call in progress, if any, has its answer (a later call starts another)."""
        with self.lock:
            self._kill()

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _serve() -> None:
    """The child: a hello line (tokenizer JSON, eos ids), then one reply line per request line."""
    import llguidance
    import llguidance.numpy
    import numpy as np

    def _walk(grammar: str) -> str | None:
        """An error a matcher meets at its start (a grammar no text matches, `root ::= root`), or along its first
        `WALK` tokens, each the first its mask allows but an end of sequence: llguidance builds its lexer and
        parser rows as tokens come, and some grammars pass validation only to pass its limits there (`a{1000000}`,
        a choice of 5,000)."""
        m = llguidance.LLMatcher(tok, grammar)
        mask = llguidance.numpy.allocate_token_bitmask(1, tok.vocab_size)
        for step in range(WALK + 1):
            llguidance.numpy.fill_next_token_bitmask(m, mask, 0)
            if m.is_error():
                why = m.get_error().splitlines()[0]
                return f"no text matches it ({why})" if step == 0 else f"it fails once text is drawn ({why})"
            allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:tok.vocab_size])
            allowed = allowed[~np.isin(allowed, ends)]  # the walk goes on past the end of sequence
            if step == WALK or not len(allowed) or m.is_stopped():
                return None
            m.consume_token(int(allowed[0]))
            if m.is_error():
                return f"it fails once text is drawn ({m.get_error().splitlines()[0]})"
        return None

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; the child ends with its stdin
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")  # replies only: native code writing to fd 1 goes to stderr
    os.dup2(2, 1)
    hello = json.loads(sys.stdin.readline())
    tok = None if hello["tokenizer"] is None else llguidance.LLTokenizer(hello["tokenizer"],
                                                                           eos_token=hello["eos"] or None)
    ends = np.asarray(hello["eos"] or [], np.int64)
    threading.stack_size(CHILD_STACK)
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        req, out = json.loads(line), {}

        def work():
            try:
                if "gbnf" in req:
                    out["grammar"] = llguidance.grammar_from("gbnf", req["gbnf"])
                else:
                    out["error"] = llguidance.LLMatcher.validate_grammar(req["grammar"], tok) or _walk(req["grammar"])
            except BaseException as e:  # pyo3's PanicException too: an answer, never a silent pass
                out["error"] = str(e) if isinstance(e, ValueError) else f"llguidance failed: {type(e).__name__}: {e}"

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        replies.write(json.dumps(out) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
