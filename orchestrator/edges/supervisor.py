"""The hook supervisor: a small process, forked before any thread exists, that runs every hook.

Why a process of its own: it outlives a killed orchestrator. It starts each hook (fork+exec from a
small, single-threaded process: posix_spawn), is the subreaper of every hook's tree, kills a whole
tree on timeout, and writes each hook's start and end into the migration's run log itself
(orchestrator.edges.runlog). So a SIGKILLed orchestrator leaves a complete record of every hook, and
`recover` knows which drains may still run and which undrains ended, instead of guessing.

The orchestrator talks to it over a unix SEQPACKET socket pair (one JSON message per packet, file
descriptors by SCM_RIGHTS):

  -> log    {log}            + the run log's fd: record the runs of `log` there
  -> start  {run, log, argv, env, label, trigger, device_id, hook, attempt, timeout_ms, armed}
                             (+ the armed hook's stdin and stdout ends)
  -> kill   {run}            kill that run's whole tree now (an armed hook that failed to answer)
  -> close  {log}            the migration is over: close its run log
  <- end    {run, pid, started, ended, duration_ms, exit_code, timed_out, error, output_tail}

When the orchestrator goes away (its end of the socket closes: it exited, or was killed), the
supervisor starts nothing more, lets every running hook run to its end or its deadline (an armed hook
sees its stdin close and gets its timeout to exit), writes `supervised` into each run log, and exits.
It ignores the terminal: a session of its own, stdin/stdout/stderr on /dev/null.

Threads: the orchestrator side has one, `hook-supervisor`, which reads the ends and calls each run's
`on_done`; it lives as long as the supervisor does. The supervisor itself has none.

A hook's tree (what it started, `setsid` and double-forked daemons included) is found by walking
/proc: the hook's process group, every process carrying its `ORCH_HOOK_RUN=<supervisor pid>.<run>`
environment entry, and their descendants by parent links (orphans are re-parented to us: we are their
subreaper). A hook that ends by itself keeps what it left running (a hook may start an agent); one
that is killed (its deadline, or `kill`) has its whole tree killed: SIGTERM, KILL_GRACE_S for the
hook itself, then SIGKILL until nothing of it is left (at most KILL_WAIT_S). Every child of ours that
exits is reaped at once, so a later hook that waits for a daemon's PID to vanish does not wait on a
zombie of ours.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from orchestrator.core.errors import EnvironmentProblem
from orchestrator.edges import procfs

HOOK_RUN_ENV: Final = "ORCH_HOOK_RUN"
KILL_GRACE_S: Final = 0.2  # between SIGTERM and SIGKILL of a killed hook's tree
KILL_WAIT_S: Final = 2.0  # after SIGKILL: how long the tree gets to vanish
ORPHAN_GRACE_S: Final = 1.0  # an armed hook whose orchestrator died: its timeout plus this to exit
OUTPUT_TAIL_BYTES: Final = 2048  # output kept per run: enough for an error message
_PACKET: Final = 256 * 1024  # the largest message (a hook's argv and environment)
_READ: Final = 65536
_KILL_POLL_S: Final = 0.005
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
_encode: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str).encode


# --- the supervisor process ---------------------------------------------------------------------


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


class Tree:
    """The processes of one run, followed across its death and their re-parenting."""

    def __init__(self, leader: int, tag: bytes, since: int, others: Callable[[], set[int]]) -> None:
        self.leader = leader
        self.tag = tag  # b"ORCH_HOOK_RUN=<pid>.<run>"
        self.since = max(0, since - 1)  # a tick of slack for the rounding of both clocks
        self.seen: dict[int, int] = {leader: since}
        self._others = others  # the other runs' leaders: never ours to kill

    def look(self) -> dict[int, procfs.Proc]:
        """Every process of the tree now, zombies included."""
        procs = _processes()
        me, others = os.getpid(), self._others() - {self.leader}

        def eligible(pid: int) -> bool:
            return pid not in (me, 1) and pid not in others and procs[pid].start >= self.since

        roots = {pid for pid, start in self.seen.items() if pid in procs and procs[pid].start == start}
        for pid, proc in procs.items():
            if pid not in roots and eligible(pid) and (proc.pgid == self.leader or _carries(pid, self.tag)):
                roots.add(pid)
        children: dict[int, list[int]] = {}
        for pid, proc in procs.items():
            children.setdefault(proc.ppid, []).append(pid)
        tree: dict[int, procfs.Proc] = {}
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid not in tree and eligible(pid):
                tree[pid] = procs[pid]
                stack += children.get(pid, [])
        self.seen.update((pid, proc.start) for pid, proc in tree.items())
        return tree

    def signal_until_gone(self) -> None:
        """Kill the whole tree from outside the supervisor (`recover`, for a run whose supervisor died):
        SIGTERM, KILL_GRACE_S, then SIGKILL until nothing of it is left (at most KILL_WAIT_S)."""
        if not self.signal(signal.SIGTERM):
            return
        time.sleep(KILL_GRACE_S)  # the grace a hook gets to clean up; nothing to wait on for another's child
        deadline = time.monotonic() + KILL_WAIT_S
        while self.signal(signal.SIGKILL) and time.monotonic() < deadline:
            time.sleep(_KILL_POLL_S)

    def signal(self, signum: signal.Signals) -> bool:
        """Send `signum` to every live process of the tree and its group; True if any was alive."""
        tree = self.look()
        alive = [pid for pid, proc in tree.items() if not proc.dead]
        if any(proc.pgid == self.leader for proc in tree.values()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.leader, signum)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        return bool(alive)


def _processes() -> dict[int, procfs.Proc]:
    found = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and (proc := procfs.proc(int(entry.name))) is not None:
                found[int(entry.name)] = proc
    return found


def _carries(pid: int, tag: bytes) -> bool:
    """True if the process was started with `tag` (NAME=VALUE) in its environment."""
    for _attempt in range(3):  # in the middle of an exec it reads empty for a moment
        try:
            environ = procfs.environ(pid)
        except OSError:  # gone, a zombie, or not ours to read
            return False
        if environ:
            return tag in environ.split(b"\0")
    return False


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
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _PACKET, _MAX_FDS, socket.MSG_CMSG_CLOEXEC)
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
                waits.append(_KILL_POLL_S)
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
            return  # SIGKILLed processes take a moment to exit; looked at again in _KILL_POLL_S
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
                self.sock.send(_encode({"op": "end", "run": run.run, "pid": run.pid or None, **end}).encode())

    def _log(self, run: _Run, record: dict[str, Any]) -> None:
        fd = self.logs.get(run.log) if run.log is not None else None
        if fd is not None:
            self._write(fd, record)

    @staticmethod
    def _write(fd: int, record: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a full disk: the margin is the run log's business
            os.write(fd, (_encode(record) + "\n").encode())


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


def _serve_forever(sock: socket.socket, env: Mapping[str, str]) -> None:
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


# --- the orchestrator's side --------------------------------------------------------------------


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
            _serve_forever(child_end, base)
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
        data = _encode(message).encode()
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
                data = self._sock.recv(_PACKET)
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
