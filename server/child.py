"""`python -m server` as a child process: start it, read its log on a thread, and wait for its ready line (the
tests, the soak script and any supervisor start a server this way)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = "ready on "  # then its base URL, http:// or https://


@dataclasses.dataclass
class Child:
    """A running server: its process, base URL, and every log line so far (still growing)."""

    proc: subprocess.Popen
    url: str
    lines: list[str]


def spawn(*flags: str, timeout: float = 600, command: list[str] | None = None, env: dict | None = None) -> Child:
    """Start `python -m server --port 0 FLAGS...` (or `command` in its place, such as `sparkler serve`) in the
    repository root, with `env` added to the environment, and return once it is ready; raises RuntimeError with its
    log if it exits or is not ready within `timeout` seconds."""
    proc = subprocess.Popen([*(command or [sys.executable, "-m", "server"]), "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    ready = threading.Event()

    def read():  # always drained, so the child never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            if READY in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("the server did not start:\n" + "".join(lines[-50:]))
    line = next(x for x in lines if READY in x)
    return Child(proc, line.split(READY)[1].split()[0].rstrip('",'), lines)
