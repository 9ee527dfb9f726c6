"""Multi-host serving on JAX's multi-controller runtime: process 0 schedules, every process runs the same steps.

Every process calls `initialize` (`jax.distributed.initialize`; on CPU the collectives go through gloo), loads its
shard of the weights onto the global mesh and builds the same `Runner`. Process 0 alone runs HTTP, tokenization and
the engine's scheduling; its runner is a `Leader`, which sends each device-touching call (the schedule: tokens,
positions, page tables, sampler rows, admissions, as the call's host arguments) to the other processes before
running it, through `Channel`, a broadcast over JAX's own collectives (`multihost_utils.broadcast_one_to_all`). The
others run `follow`: receive a call, make it on their runner, repeat. So every process dispatches the same jitted
programs in the same order, and the programs' collectives line up.

Failure: a collective with a dead peer raises at once (gloo: connection reset), and a waiting leader pings the group
every `PING_S` seconds, so process 0 notices a lost process within seconds, logs one line and exits; a follower
whose leader is gone does the same. The supervisor restarts the group (a group cannot heal: the programs'
collectives need every process).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

log = logging.getLogger("sparkler.multihost")
PING_S = 1.0  # a leader with nothing to do checks the group this often
MIRRORED = ("prefill_many", "prefill_chunk", "prefill", "prefill_flat", "copy_pages", "install_rows",  # Runner calls
            "save_row", "draw", "decode", "decode_logits", "verify", "seat_adapters",  # touching devices or inputs
            "embed")


def initialize(coordinator: str, num_processes: int, process_id: int, heartbeat_s: int = 10) -> None:
    """Join the process group (`jax.distributed.initialize`); before any other JAX call. Cross-process collectives
    of CPU devices go through gloo (GPUs and TPUs have their own)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_s)


class Channel:
    """Process 0's messages to every other process: a pickled object as bytes, broadcast with JAX's collective (a
    length, then the bytes padded to a power of two, so a few shapes are compiled)."""

    def __init__(self):
        self.leader = jax.process_index() == 0

    def _bcast(self, x: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(x, is_source=self.leader))

    def send(self, msg) -> None:
        """Process 0: hand `msg` to the others (None tells them to stop)."""
        data = np.frombuffer(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        size = max(256, 1 << (len(data) - 1).bit_length())
        self._bcast(np.asarray([len(data), size], np.int64))
        self._bcast(np.pad(data, (0, size - len(data))))

    def recv(self):
        """The other processes: the next message from process 0."""
        n, size = self._bcast(np.zeros(2, np.int64))
        return pickle.loads(self._bcast(np.zeros(int(size), np.uint8))[:int(n)].tobytes())


def from_leader(make: Callable[[], Any]) -> Any:
    """`make()`, run by process 0 alone, on every process (the others wait for it): one answer for the group where
    each process's own could differ (the decode kernel's timing). An exception in `make` is raised on every process
    (as a RuntimeError naming it)."""
    channel = Channel()
    if channel.leader:
        try:
            out = (True, make())
        except Exception as e:  # noqa: BLE001  (sent on: the others must not wait forever)
            out = (False, f"{type(e).__name__}: {e}")
        channel.send(out)
    else:
        out = channel.recv()
    if not out[0]:
        raise RuntimeError(out[1])
    return out[1]


def fatal(what: str, e: BaseException) -> None:
    """Log why the group is broken and end this process now (its peers cannot go on without it)."""
    log.critical("sparkler: %s (%s: %s); exiting, the process group must be restarted", what, type(e).__name__,
                 str(e).splitlines()[0] if str(e) else "")
    logging.shutdown()
    os._exit(1)


class Leader:
    """Process 0's runner: each `MIRRORED` call goes to the other processes first, then runs here; everything else
    is the runner's own. A failure of either is fatal for the group (`fatal`)."""

    def __init__(self, runner, channel: Channel):
        self.runner, self.channel = runner, channel
        self.last = time.monotonic()
        self.lock = threading.Lock()  # one message at a time: `close` may come from another thread
        self.closed = False

    def __getattr__(self, name):
        attr = getattr(self.runner, name)
        if name not in MIRRORED:
            return attr

        def call(*args, **kwargs):
            with self.lock:
                if self.closed:
                    raise RuntimeError("the process group has stopped")
                try:
                    self.channel.send((name, args, kwargs))
                    out = attr(*args, **kwargs)
                except Exception as e:  # noqa: BLE001  (a lost process, or a step that failed on this one)
                    fatal(f"a step of the process group failed in {name}", e)
                self.last = time.monotonic()
            return out

        return call

    def idle(self) -> None:
        """Between steps with nothing to do: ping the group every `PING_S` seconds (a lost process shows at once)."""
        if time.monotonic() - self.last < PING_S:
            return
        with self.lock:
            if self.closed:
                return
            try:
                self.channel.send(("ping", (), {}))
            except Exception as e:  # noqa: BLE001
                fatal("a process of the group is gone", e)
            self.last = time.monotonic()

    def check(self, config) -> None:
        """Start-up: send this process's serving settings; a process whose own differ stops the group."""
        with self.lock:
            self.channel.send(("config", (config,), {}))

    def close(self) -> None:
        """Tell the other processes to stop (once; later calls are refused)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.channel.send(None)


def follow(runner, channel: Channel, config) -> None:
    """The loop of every process but 0: make each runner call process 0 sends, until it says stop. `config` (this
    process's serving settings) must equal process 0's, else the programs would differ."""
    calls = 0
    while True:
        try:
            msg = channel.recv()
            if msg is None:
                break
            name, args, kwargs = msg
            if name == "config":
                if args[0] != config:
                    raise ValueError(f"this process's settings {config} differ from process 0's {args[0]}")
            elif name != "ping":
                getattr(runner, name)(*args, **kwargs)
                calls += 1
        except Exception as e:  # noqa: BLE001  (process 0 is gone, or a step failed here)
            fatal("lost process 0 of the group", e)
    log.info("sparkler: process %d stopped after %d steps", jax.process_index(), calls)
