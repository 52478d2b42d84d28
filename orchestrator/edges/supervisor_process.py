"""What runs in the hook supervisor process, after orchestrator.edges.supervisor forks it.

One thread, one selector, every hook's pipe and deadline. It starts each hook (fork+exec from a small,
single-threaded process: posix_spawn), is the subreaper of every hook's tree, kills a whole tree on
timeout (orchestrator.edges.process_tree), and writes each hook's start and end into the migration's
run log itself (orchestrator.edges.runlog). Its messages with the orchestrator are described in
orchestrator.edges.supervisor.

When the orchestrator goes away (its end of the socket closes: it exited, or was killed), the
supervisor starts nothing more, lets every running hook run to its end or its deadline (an armed hook
sees its stdin close and gets its timeout to exit), writes `supervised` into each run log, and exits.
It ignores the terminal: a session of its own, stdin/stdout/stderr on /dev/null.

A hook that ends by itself keeps what it left running (a hook may start an agent); one that is killed
(its deadline, or `kill`) has its whole tree killed. Every child of ours that exits is reaped at once,
so a later hook that waits for a daemon's PID to vanish does not wait on a zombie of ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from orchestrator.edges import procfs
from orchestrator.edges.process_tree import KILL_GRACE_S, KILL_POLL_S, KILL_WAIT_S, Tree

HOOK_RUN_ENV: Final = "ORCH_HOOK_RUN"
ORPHAN_GRACE_S: Final = 1.0  # an armed hook whose orchestrator died: its timeout plus this to exit
OUTPUT_TAIL_BYTES: Final = 2048  # output kept per run: enough for an error message
PACKET_BYTES: Final = 256 * 1024  # the largest message (a hook's argv and environment)
_READ: Final = 65536
_MAX_FDS: Final = 2
# What the supervisor ignores or catches, as a hook must not: an ignored signal is inherited by exec.
_DEFAULT_SIGNALS: Final = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTSTP,
    signal.SIGTERM,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGCHLD,
)
encode: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str).encode


@dataclass
class _Run:
    """One process the supervisor started, from its start to its end record."""

    run: str
    log: str | None
    record: dict[str, Any]  # what the start record says of it
    pid: int = 0
    start_tick: int = 0
    started: float = 0.0
    start_mono: float = 0.0
    stdout: int = -1  # our end of its output pipe (-1: none, or read to its end)
    tail: bytearray = field(default_factory=bytearray)
    deadline: float | None = None  # monotonic; None: an armed hook, no deadline of its own
    status: int | None = None  # its wait status, once reaped
    timed_out: bool = False
    killing: float | None = None  # monotonic time of the SIGTERM to its tree
    killed_at: float | None = None  # ... and of the first SIGKILL
    error: str | None = None
    tree: Tree | None = None


class _Child:
    """The supervisor's loop: one thread, one selector, every hook's pipe and deadline."""

    def __init__(self, sock: socket.socket, env: Mapping[str, str]) -> None:
        self.sock = sock
        self.env = dict(env)
        self.runs: dict[str, _Run] = {}
        self.by_pid: dict[int, _Run] = {}
        self.logs: dict[str, int] = {}
        self.closing: set[str] = set()  # logs the orchestrator closed while runs of them still ran
        self.orphaned = False  # the orchestrator is gone: start nothing more, finish, exit
        self.selector = selectors.DefaultSelector()
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.me = os.getpid()

    def serve(self) -> None:
        wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd says it; we reap below
        self.selector.register(wakeup_r, selectors.EVENT_READ, "sigchld")
        self.selector.register(self.sock, selectors.EVENT_READ, "control")
        while not (self.orphaned and not self.runs):
            for key, _ in self.selector.select(self._timeout()):
                if key.data == "sigchld":
                    with contextlib.suppress(OSError):
                        os.read(wakeup_r, 4096)
                elif key.data == "control":
                    self._control()
                else:
                    self._output(key.data)
            self._reap()
            self._timers()
        for log in list(self.logs):
            self._close_log(log)

    # --- the orchestrator's messages ------------------------------------------------------------
    def _control(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                self.sock, PACKET_BYTES, _MAX_FDS, socket.MSG_CMSG_CLOEXEC
            )
        except OSError:
            data, fds = b"", []
        if not data:  # the orchestrator is gone
            self.selector.unregister(self.sock)
            self._orphan()
            return
        try:
            message = json.loads(data)
            op = message["op"]
            if op == "start":
                self._start(message, fds)
                fds = []
            elif op == "log" and fds:
                self._set_log(str(message["log"]), fds.pop())
            elif op == "kill":
                run = self.runs.get(str(message["run"]))
                if run is not None:
                    self._kill(run)
            elif op == "close":
                self.closing.add(str(message["log"]))
                self._close_idle_logs()
        except (ValueError, KeyError, TypeError):
            pass  # a malformed message (a bug): nothing to act on
        finally:
            for fd in fds:
                os.close(fd)

    def _set_log(self, log: str, fd: int) -> None:
        old = self.logs.pop(log, None)
        if old is not None:
            os.close(old)
        self.logs[log] = fd
        self.closing.discard(log)

    def _orphan(self) -> None:
        self.orphaned = True
        now = time.monotonic()
        for run in self.runs.values():
            if run.deadline is None:  # an armed hook: its stdin has closed, it should exit now
                run.deadline = now + run.record["timeout_ms"] / 1000 + ORPHAN_GRACE_S
        self.closing.update(self.logs)
        self._close_idle_logs()

    def _close_idle_logs(self) -> None:
        busy = {run.log for run in self.runs.values()}
        for log in [log for log in self.closing if log not in busy]:
            self._close_log(log)

    def _close_log(self, log: str) -> None:
        self.closing.discard(log)
        fd = self.logs.pop(log, None)
        if fd is None:
            return
        if self.orphaned:
            self._write(fd, {"k": "supervised", "at": time.time(), "pid": self.me})
        os.close(fd)

    # --- starting ---------------------------------------------------------------------------------
    def _start(self, message: dict[str, Any], fds: list[int]) -> None:
        run = _Run(str(message["run"]), message.get("log"), _start_record(message))
        argv = [str(arg) for arg in message["argv"]]
        tag = f"{HOOK_RUN_ENV}={self.me}.{run.run}"
        env = {**self.env, **{str(k): str(v) for k, v in message.get("env", {}).items()}}
        env[HOOK_RUN_ENV] = tag.split("=", 1)[1]
        owned = list(fds)  # closed once the child has its copies
        if message.get("armed"):
            stdin, out_w = fds
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            stdin, run.stdout = self.devnull, out_r
            owned.append(out_w)
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, out_w, 2),
        ]
        run.started, run.start_mono = time.time(), time.monotonic()
        if self.orphaned:
            run.error = "not started: the orchestrator is gone"
        elif not argv:
            run.error = "empty argv"
        else:
            try:
                run.pid = os.posix_spawnp(
                    argv[0],
                    argv,
                    env,
                    file_actions=actions,
                    setsid=True,
                    setsigdef=_DEFAULT_SIGNALS,
                    setsigmask=(),
                )
            except FileNotFoundError:
                run.error = f"program not found: {argv[0]}"
            except PermissionError:
                run.error = f"program not executable: {argv[0]}"
            except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument
                run.error = f"cannot start {argv[0]}: {exc}"
        for fd in owned:  # the child has them now; ours would keep its pipes open
            os.close(fd)
        if run.pid == 0:  # it could not start: its start is written (no process), then its end
            if run.stdout >= 0:
                os.close(run.stdout)
                run.stdout = -1
            self._log(run, {**run.record, "pid": None, "tag": tag, "started": run.started})
            self._finish(run)
            return
        proc = procfs.proc(run.pid)
        run.start_tick = proc.start if proc is not None else 0
        run.tree = Tree(run.pid, tag.encode(), run.start_tick, lambda: set(self.by_pid))
        timeout = float(message.get("timeout_ms") or 0) / 1000
        run.deadline = None if message.get("armed") else run.start_mono + timeout
        self.runs[run.run] = run
        self.by_pid[run.pid] = run
        if run.stdout >= 0:
            os.set_blocking(run.stdout, False)
            self.selector.register(run.stdout, selectors.EVENT_READ, run)
        self._log(
            run, {**run.record, "pid": run.pid, "start": run.start_tick, "tag": tag, "started": run.started}
        )

    # --- following ----------------------------------------------------------------------------
    def _output(self, run: _Run) -> None:
        try:
            chunk = os.read(run.stdout, _READ)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            run.tail += chunk
            del run.tail[:-OUTPUT_TAIL_BYTES]
            return
        self._drop_output(run)

    def _drop_output(self, run: _Run) -> None:
        if run.stdout >= 0:
            self.selector.unregister(run.stdout)
            os.close(run.stdout)
            run.stdout = -1

    def _reap(self) -> None:
        """Reap every exited child: a hook (its end follows) or what a hook left (nobody else will)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.by_pid.get(pid)
            if run is not None and run.status is None:
                run.status = status
                if run.killing is None:
                    self._ended(run)

    def _timers(self) -> None:
        now = time.monotonic()
        for run in list(self.runs.values()):
            if (
                run.killing is None
                and run.deadline is not None
                and now >= run.deadline
                and run.status is None
            ):
                run.timed_out = True
                self._kill(run)
            elif run.killing is not None:
                self._killing(run, now)

    def _timeout(self) -> float | None:
        waits = []
        for run in self.runs.values():
            if run.killing is not None:
                waits.append(KILL_POLL_S)
            elif run.deadline is not None and run.status is None:
                waits.append(max(0.0, run.deadline - time.monotonic()))
        return min(waits) if waits else None

    def _kill(self, run: _Run) -> None:
        if run.killing is not None or run.tree is None:
            return
        run.killing = time.monotonic()
        run.tree.signal(signal.SIGTERM)

    def _killing(self, run: _Run, now: float) -> None:
        """A killed run: SIGKILL its tree after the grace (sooner if the hook obeyed), until it is gone."""
        assert run.killing is not None and run.tree is not None
        if run.status is None and now < run.killing + KILL_GRACE_S:
            return
        if run.killed_at is None:
            run.killed_at = now
        alive = run.tree.signal(signal.SIGKILL)
        if (alive or run.status is None) and now < run.killed_at + KILL_WAIT_S:
            return  # SIGKILLed processes take a moment to exit; looked at again in KILL_POLL_S
        if run.status is None:  # it did not die of SIGKILL (a stuck process): reported as it is
            run.error = "its process did not die of SIGKILL"
        self._ended(run)

    def _ended(self, run: _Run) -> None:
        # What is left in the pipe (written just before the exit), without blocking and bounded:
        # something it left running may keep writing forever.
        for _ in range(16):
            if run.stdout < 0:
                break
            try:
                chunk = os.read(run.stdout, _READ)
            except OSError:
                break
            if not chunk:
                break
            run.tail += chunk
            del run.tail[:-OUTPUT_TAIL_BYTES]
        self._drop_output(run)
        self.runs.pop(run.run, None)
        self.by_pid.pop(run.pid, None)
        self._finish(run)
        self._close_idle_logs()

    def _finish(self, run: _Run) -> None:
        """The run's end: its record, then the orchestrator is told."""
        end = _end_fields(run)
        self._log(run, {"k": "hook-end", "run": run.run, **end})
        if not self.orphaned:
            with contextlib.suppress(OSError):
                self.sock.send(encode({"op": "end", "run": run.run, "pid": run.pid or None, **end}).encode())

    def _log(self, run: _Run, record: dict[str, Any]) -> None:
        fd = self.logs.get(run.log) if run.log is not None else None
        if fd is not None:
            self._write(fd, record)

    @staticmethod
    def _write(fd: int, record: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a full disk: the margin is the run log's business
            os.write(fd, (encode(record) + "\n").encode())


def _start_record(message: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "k": "hook-start",
        "run": str(message["run"]),
        "hook": message.get("hook"),
        "label": message.get("label"),
        "trigger": message.get("trigger"),
        "device_id": message.get("device_id"),
        "argv": message.get("argv"),
        "attempt": message.get("attempt", 1),
        "timeout_ms": message.get("timeout_ms"),
        "armed": bool(message.get("armed")),
    }


def _end_fields(run: _Run) -> dict[str, Any]:
    ended = time.time()
    status, error = run.status, run.error
    code: int | None = None
    if status is not None:
        code = os.waitstatus_to_exitcode(status)
    if error is None:
        if run.timed_out:
            error = f"timed out after {run.record.get('timeout_ms')} ms"
        elif code is not None and code < 0:
            error = f"killed by signal {-code}"
        elif code is not None and code > 0:
            error = f"exited with status {code}"
        elif run.killing is not None:
            error = "killed"
    return {
        "started": run.started,
        "ended": ended,
        "duration_ms": (time.monotonic() - run.start_mono) * 1000 if run.start_mono else 0.0,
        "exit_code": code if code is not None and code >= 0 else None,
        "timed_out": run.timed_out,
        "error": error,
        "output_tail": run.tail.decode(errors="replace"),
    }


def serve_forever(sock: socket.socket, env: Mapping[str, str]) -> None:
    """The supervisor process's whole life (after the fork)."""
    code = 0
    try:
        os.setsid()  # no terminal: its hang-up, Ctrl-C and job control are not ours
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        # Nothing else of the orchestrator's: a migration lock (flock) or a pipe a caller reads to its
        # end must not outlive the orchestrator in us.
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 20)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # the orchestrator decides; it ends us by going away
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        procfs.set_child_subreaper(True)
        _Child(sock, env).serve()
    except BaseException:
        code = 1
    os._exit(code)
