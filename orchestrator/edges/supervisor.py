"""The hook supervisor: a small process, forked before any thread exists, that runs every hook. This
module is the orchestrator's side: it forks the process (`Supervisor.start`, `shared`) and talks to it.

Why a process of its own: it outlives a killed orchestrator. It starts each hook, is the subreaper of
every hook's tree, kills a whole tree on timeout, and writes each hook's start and end into the
migration's run log itself (orchestrator.edges.runlog). So a SIGKILLed orchestrator leaves a complete
record of every hook, and `recover` knows which drains may still run and which undrains ended, instead
of guessing. What runs in the forked process is orchestrator.edges.supervisor_process; how a hook's
tree is found and killed, orchestrator.edges.process_tree.

The orchestrator talks to it over a unix SEQPACKET socket pair (one JSON message per packet, file
descriptors by SCM_RIGHTS):

  -> log    {log}            + the run log's fd: record the runs of `log` there
  -> start  {run, log, argv, env, label, trigger, device_id, hook, attempt, timeout_ms, armed}
                             (+ the armed hook's stdin and stdout ends)
  -> kill   {run}            kill that run's whole tree now (an armed hook that failed to answer)
  -> close  {log}            the migration is over: close its run log
  <- end    {run, pid, started, ended, duration_ms, exit_code, timed_out, error, output_tail}

When the orchestrator goes away (its end of the socket closes), the supervisor lets every running hook
run to its end or its deadline, then exits.

Threads: the orchestrator side has one, `hook-supervisor`, which reads the ends and calls each run's
`on_done`; it lives as long as the supervisor does. The supervisor itself has none.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.errors import EnvironmentProblem
from orchestrator.edges.supervisor_process import PACKET_BYTES, encode, serve_forever


def hook_path() -> str:
    """PATH for hooks: ours, then the directory of the orchestrator's own programs (so the shipped
    `orchestrator-rdma-hook` is found when the orchestrator runs from a virtualenv not on PATH)."""
    own = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", os.defpath)
    return path if own in path.split(os.pathsep) else f"{path}{os.pathsep}{own}"


@dataclass(frozen=True)
class Ended:
    """A run's end, as the supervisor reports it."""

    run: str
    pid: int | None
    started: float
    ended: float
    duration_ms: float
    exit_code: int | None
    timed_out: bool
    error: str | None
    output_tail: str


class Supervisor:
    """The orchestrator's handle on its hook supervisor process. Thread-safe."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()
        self._waiting: dict[str, Callable[[Ended], None]] = {}
        self._runs = itertools.count(1)
        self._gone: str | None = None  # why it can start nothing (it died)
        self._reader = threading.Thread(target=self._read, name="hook-supervisor", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, env: Mapping[str, str] | None = None) -> Supervisor:
        """Fork the supervisor now: call it before any thread exists where that matters (the CLI
        does, first thing). `env` is the base environment of every hook (default: ours)."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        base = dict(os.environ if env is None else env)
        try:
            pid = os.fork()
        except OSError as exc:
            parent_end.close()
            child_end.close()
            raise EnvironmentProblem(
                f"cannot start the hook supervisor: {exc.strerror or exc}",
                "check the machine's process limits",
            ) from None
        if pid == 0:  # pragma: no cover - the child (its behaviour is tested from the parent)
            parent_end.close()
            os.environ["PATH"] = base.get("PATH", os.defpath)  # posix_spawnp searches ours
            serve_forever(child_end, base)
        child_end.close()
        return cls(parent_end, pid)

    def next_run(self) -> str:
        """A new run id (unique within this supervisor)."""
        return str(next(self._runs))

    def tag(self, run: str) -> str:
        """The ORCH_HOOK_RUN value of a run."""
        return f"{self.pid}.{run}"

    def attach(self, log: str, fd: int) -> None:
        """Record the runs of `log` into the run log open as `fd` (the supervisor shares its offset)."""
        self._send({"op": "log", "log": log}, [fd])

    def detach(self, log: str) -> None:
        """The migration `log` is over: the supervisor closes its run log once its runs have ended."""
        self._send({"op": "close", "log": log})

    def start_run(
        self,
        run: str,
        message: Mapping[str, Any],
        on_end: Callable[[Ended], None],
        fds: Sequence[int] = (),
    ) -> None:
        """Ask for `argv` to be started now; `on_end` gets its end (on the reader thread; at once, on
        the calling thread, when the supervisor is gone)."""
        with self._lock:
            gone = self._gone
            if gone is None:
                self._waiting[run] = on_end
        if gone is None:
            sent = self._send({"op": "start", "run": run, **message}, fds)
            if sent is None:
                return
            with self._lock:
                self._waiting.pop(run, None)
            gone = sent
        now = time.time()
        on_end(Ended(run, None, now, now, 0.0, None, False, f"not started: {gone}", ""))

    def kill(self, run: str) -> None:
        """Kill a run's whole tree now."""
        self._send({"op": "kill", "run": run})

    def close(self, timeout: float = 0.0) -> None:
        """Let it go (it finishes what runs, then exits); wait `timeout` for it to exit and reap it."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0] != 0:
                    return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)  # no event for another process's exit short of a pidfd: bounded by timeout

    def _send(self, message: Mapping[str, Any], fds: Sequence[int] = ()) -> str | None:
        """Send one message; None when sent, else why not."""
        data = encode(message).encode()
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.send(data)
        except OSError as exc:
            return f"the hook supervisor is gone ({exc.strerror or exc})"
        return None

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(PACKET_BYTES)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = json.loads(data)
                ended = Ended(**{k: v for k, v in message.items() if k != "op"})
            except (ValueError, TypeError):
                continue
            with self._lock:
                on_end = self._waiting.pop(ended.run, None)
            if on_end is not None:
                on_end(ended)
        # It is gone: every run still waiting ends now, as failed.
        with self._lock:
            self._gone = "the hook supervisor died"
            waiting, self._waiting = self._waiting, {}
        now = time.time()
        for run, on_end in waiting.items():
            on_end(Ended(run, None, now, now, 0.0, None, False, "the hook supervisor died while it ran", ""))


_shared: list[Supervisor] = []
_shared_lock = threading.Lock()


def shared() -> Supervisor:
    """This process's supervisor, started at the first call (the CLI makes that call before any thread
    exists; in a program that calls later, the fork happens with its threads running, which is safe for
    this child: it runs only code imported already, and takes no lock another thread could hold)."""
    with _shared_lock:
        if not _shared:
            _shared.append(Supervisor.start({**os.environ, "PATH": hook_path()}))
        return _shared[0]
