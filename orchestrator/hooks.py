"""Hook definitions and the hook runner (argv commands, never a shell).

The types first (`Trigger`, `OnFailure`, `PLACEHOLDERS`, `Hook`) are the contract shared with `policy`.
The runner below starts each hook at once (drain hooks are started from the event thread the moment
a prepare event arrives), lets a waiter thread per hook enforce its deadline and collect its output, and
reports a `HookResult` for every run, including runs that could not start.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import logging
import os
import selectors
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from orchestrator import procfs
from orchestrator.procfs import Proc, set_child_subreaper


class Trigger(StrEnum):
    """When a hook runs."""

    BEFORE = "before"  # on the source host, before anything starts; failure aborts cleanly
    DRAIN = "drain"  # per device, on pre-copy-p2p-prepare (or the earliest P2P state on old QEMU)
    UNDRAIN = "undrain"  # per device, once the device runs again (destination or source)
    AFTER_SUCCESS = "after-success"
    AFTER_FAILURE = "after-failure"


class OnFailure(StrEnum):
    """What a failing hook does to the migration."""

    ABORT = "abort"
    CONTINUE = "continue"


# Placeholders a hook's argv may use; each is also exported as ORCH_<NAME> in the hook's environment.
PLACEHOLDERS: tuple[str, ...] = (
    "domain",
    "device_id",
    "qom_path",
    "state",
    "migration_id",
    "source",
    "destination",
)


@dataclass(frozen=True)
class Hook:
    """One command to run on a trigger."""

    trigger: Trigger
    argv: tuple[str, ...]
    timeout_ms: int = 5000
    on_failure: OnFailure = OnFailure.ABORT
    retries: int = 0  # extra attempts; only for before/after-* hooks
    backoff_ms: int = 200  # first retry delay, doubled each time
    name: str = ""  # for reports; defaults to the program's base name
    armed: bool = False  # started with the migration, woken via stdin at the event; drain/undrain only

    @property
    def label(self) -> str:
        """A short name for tables and the journal."""
        return self.name or self.argv[0].rsplit("/", 1)[-1]


_log = logging.getLogger(__name__)

# Retries and backoff apply only to these; drain/undrain hooks run once, right now, under their deadline.
RETRIED_TRIGGERS: frozenset[Trigger] = frozenset(
    {Trigger.BEFORE, Trigger.AFTER_SUCCESS, Trigger.AFTER_FAILURE}
)

OUTPUT_TAIL_BYTES = 2048  # output kept per run: enough for an error message, bounded for chatty hooks
KILL_GRACE_S = 0.2  # between SIGTERM and SIGKILL of a timed-out hook's process group
_IDLE_POLL_S = 0.05  # how often a quiet hook is checked for exit (its pipe may be held by a grandchild)
_READ_CHUNK = 65536
_FINAL_READS = 16  # chunks read after the hook ended
ARM_TIMEOUT_S = 10.0  # an armed hook must print `ready` within this long of its start
_KNOWN = frozenset(PLACEHOLDERS)
_FORMATTER = string.Formatter()


def _fields(arg: str) -> Iterable[tuple[str, str | None]]:
    """Split one argument into (literal text, placeholder name or None) pairs.

    `str.format`'s parser handles `{{`/`}}` and reports unmatched braces (ValueError); a format spec or
    conversion is folded into the name, so `{domain:>9}` or `{domain!r}` is an unknown placeholder.
    """
    for literal, field, spec, conversion in _FORMATTER.parse(arg):
        if field is None:
            yield literal, None
            continue
        name = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        yield literal, name


def check_placeholders(argv: Sequence[str]) -> list[str]:
    """Return the unknown placeholder names in `argv`, each once, in order of appearance.

    Raises ValueError for an argument with an unmatched brace.
    """
    unknown: list[str] = []
    for arg in argv:
        try:
            names = [name for _, name in _fields(arg) if name is not None]
        except ValueError as exc:
            raise ValueError(f"argument {arg!r}: {exc} (write {{{{ or }}}} for a literal brace)") from None
        unknown += [name for name in names if name not in _KNOWN and name not in unknown]
    return unknown


def fill_argv(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Replace `{name}` placeholders in each argument with `values[name]`, as plain text.

    Only names in PLACEHOLDERS are allowed; `{{` and `}}` are literal braces. Values are inserted
    verbatim: never formatted, never expanded again, never seen by a shell. Raises ValueError naming
    an unknown placeholder, a placeholder without a value, or an unmatched brace.
    """
    filled: list[str] = []
    for arg in argv:
        if "{" not in arg and "}" not in arg:
            filled.append(arg)  # the common case: no parsing
            continue
        parts: list[str] = []
        try:
            for literal, name in _fields(arg):
                parts.append(literal)
                if name is None:
                    continue
                if name not in _KNOWN:
                    raise ValueError(f"unknown placeholder {{{name}}}; known: {', '.join(PLACEHOLDERS)}")
                if name not in values:
                    raise ValueError(f"no value for placeholder {{{name}}} here")
                parts.append(values[name])
        except ValueError as exc:
            raise ValueError(f"argument {arg!r}: {exc}") from None
        filled.append("".join(parts))
    return filled


def hook_path() -> str:
    """PATH for hooks: ours, then the directory of the orchestrator's own programs (so the shipped
    `orchestrator-rdma-hook` is found when the orchestrator runs from a virtualenv not on PATH)."""
    own = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", os.defpath)
    return path if own in path.split(os.pathsep) else f"{path}{os.pathsep}{own}"


def hook_env(values: Mapping[str, str]) -> dict[str, str]:
    """The hook's environment: ours (PATH as `hook_path`), plus ORCH_<NAME> for every placeholder value.

    Keys of `values` that are not placeholders are not exported.
    """
    env = dict(os.environ)
    env["PATH"] = hook_path()
    for name, value in values.items():
        if name in _KNOWN:
            env[f"ORCH_{name.upper()}"] = value
    return env


@dataclass
class HookResult:
    """What one run of one hook did: the record the journal keeps and reports show."""

    label: str
    trigger: Trigger
    device_id: str | None
    argv: list[str]
    attempt: int  # 1 for the first run; retries count up
    started: float  # epoch seconds, taken immediately before the spawn
    start_monotonic: float  # the same instant on the monotonic clock, to order against other events
    pid: int | None  # None if the program could not be started
    ended: float = 0.0
    duration_ms: float = 0.0
    exit_code: int | None = None  # None if it never started or was killed by a signal
    timed_out: bool = False
    error: str | None = None  # None when the hook exited with status 0 in time
    output_tail: str = ""  # the last OUTPUT_TAIL_BYTES of stdout and stderr together

    @property
    def ok(self) -> bool:
        """True if the hook ran, exited with status 0, and did so before its deadline."""
        return self.error is None and self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict[str, object]:
        """The result as one JSON object."""
        record = asdict(self)
        record["trigger"] = self.trigger.value
        record["ok"] = self.ok
        return record


class RunningHook:
    """A hook that has been started; its waiter thread enforces the deadline and collects output."""

    def __init__(
        self,
        hook: Hook,
        result: HookResult,
        process: subprocess.Popen[bytes] | None,
        on_done: Callable[[HookResult], None] | None,
    ) -> None:
        self.hook = hook
        self.done = threading.Event()  # set once the result is final and on_done has returned
        self._result = result
        self._process = process
        self._on_done = on_done
        self._deadline = result.start_monotonic + hook.timeout_ms / 1000
        # Not threading.Thread: its start() blocks until the new thread runs, which took ~0.7 ms here
        # while the child execs; a low-level thread (daemon-like, dies with the process) costs ~10 us.
        _thread.start_new_thread(self._follow, ())

    @property
    def pid(self) -> int | None:
        """The hook's process id (also its process group id), None if it could not start."""
        return self._result.pid

    @property
    def result(self) -> HookResult | None:
        """The final result, None while the hook runs."""
        return self._result if self.done.is_set() else None

    def wait(self) -> HookResult:
        """Block until the hook has ended (at the latest its deadline plus the kill grace)."""
        self.done.wait()
        return self._result

    def _follow(self) -> None:
        try:
            if self._process is not None:
                self._collect(self._process)
        except Exception as exc:  # a bug here must still end the run, or drains would wait forever
            _log.exception("following hook %s failed", self._result.label)
            self._result.error = self._result.error or f"internal error following the hook: {exc}"
            if self._process is not None and self._process.poll() is None:
                _kill_group(self._process)
        finally:
            if self._process is not None:
                # Before the result: a next hook may stop what this one left running at once.
                _forget(self._process.pid)
            self._finish()

    def _collect(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None  # spawned with stdout=PIPE
        fd = process.stdout.fileno()
        tail = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            pipe_open = True
            while pipe_open and (remaining := self._deadline - time.monotonic()) > 0:
                # The hook's own exit ends the run, even if a background grandchild holds the pipe.
                if process.poll() is not None:
                    break
                if selector.select(min(remaining, _IDLE_POLL_S)):
                    pipe_open = _read_into(tail, fd)
            try:
                process.wait(max(0.0, self._deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._result.timed_out = True
                _kill_group(process)
            # What is left in the pipe (written just before exit or the kill), without blocking, and
            # bounded: a grandchild may keep writing forever.
            for _ in range(_FINAL_READS):
                if not (pipe_open and selector.select(0)):
                    break
                pipe_open = _read_into(tail, fd)
        process.stdout.close()
        result = self._result
        result.output_tail = tail.decode(errors="replace")
        code = process.returncode
        if result.timed_out:
            result.error = f"timed out after {self.hook.timeout_ms} ms"
        elif code < 0:
            result.error = f"killed by signal {-code}"
        elif code > 0:
            result.error = f"exited with status {code}"
        result.exit_code = code if code >= 0 else None

    def _finish(self) -> None:
        result = self._result
        result.ended = time.time()
        result.duration_ms = (time.monotonic() - result.start_monotonic) * 1000
        try:
            if self._on_done is not None:
                self._on_done(result)
        except Exception:  # the caller's bug must not leave `done` unset
            _log.exception("on_done callback for hook %s failed", result.label)
        finally:
            self.done.set()


def _read_into(tail: bytearray, fd: int) -> bool:
    """Read one chunk of output into the bounded tail; False at end of file."""
    chunk = os.read(fd, _READ_CHUNK)
    tail += chunk
    del tail[:-OUTPUT_TAIL_BYTES]
    return bool(chunk)


# --- a hook's whole process tree ---------------------------------------------------------------
#
# A hook runs in a session and process group of its own, but what it starts can leave both (`setsid`,
# a daemon's double fork) and outlive it. The rules:
#
# - A hook that ends by itself, whatever its status, keeps what it left running in the background: a
#   hook may legitimately daemonise something (an agent, a tunnel, a watcher). Nothing of its tree is
#   signalled. What of it is alive when the hook has ended (looked for before its result is final)
#   is reaped by a reaper thread when it exits, if it is our child by then (see below): a later hook
#   that stops such a daemon and waits for its PID to vanish (`kill -0`, start-stop-daemon) must not
#   wait on a zombie of ours. (One that became our child and died while the hook still ran stays a
#   zombie until we exit: by then nothing tells it from a child of ours its own code will wait for.)
# - A hook that is killed (past its deadline; an armed hook that is late, does not arm, or does not
#   exit once its stdin is closed) has its WHOLE tree killed, `setsid` grandchildren and double-forked
#   daemons included, and every process of it that becomes our child is reaped: nothing it started
#   keeps running, holds its output pipe, or stays a zombie of ours.
#
# How the tree is found, at the kill, by walking /proc (no cgroup needed, nothing on the hot path but a
# `prctl` once and one environment variable per hook):
#
# - the orchestrator is a child subreaper (Linux; set once, when the first hook runner is made or the
#   first hook starts): the orphans of a hook's tree are re-parented to us instead of to init, so they
#   stay reachable by parent links and we reap them. Not in a process that starts a lab
#   (`forgo_subreaper`): the orphans of ITS descendants would come to us too, and libvirtd waits
#   for the QEMU it stops to vanish, which a zombie of ours never does;
# - each hook gets `ORCH_HOOK_RUN=<our pid>.<n>` in its environment: its descendants inherit it, so
#   one that left the tree (re-parented to us or to init) is still known as this hook's, and never
#   confused with another hook's leftovers;
# - the tree is: the hook, its process group, every live process started since the hook that carries
#   its ORCH_HOOK_RUN, every process seen in the tree at an earlier look (same PID and start time),
#   and every descendant of those by parent links. Never us, init, or another running hook.
#   A descendant that both left the tree and cleared its environment (`env -i` after a double fork)
#   cannot be told from a stranger and is left alone.
#
# The kill: SIGTERM to the tree, the KILL_GRACE_S grace for the hook itself, then SIGKILL to the tree,
# looked at again until nothing of it is alive (a process forking as it dies is caught on the next
# look), at most _KILL_WAIT_S; then the zombies that are our children are reaped, the hook last.
# Without the subreaper (not Linux, a lab process) the same tree is found and killed; init reaps it.

HOOK_RUN_ENV = "ORCH_HOOK_RUN"
_KILL_WAIT_S = 2.0  # after the grace: how long SIGKILLed processes of a tree get to vanish
_KILL_POLL_S = 0.005
_REAP_POLL_S = 0.1  # how often the reaper looks at a leftover when it cannot get a pidfd for it
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_run_numbers = itertools.count(1)
_running: dict[int, tuple[bytes, int]] = {}  # hook pid -> (its ORCH_HOOK_RUN entry, boot tick of its spawn)
_running_lock = threading.Lock()
_subreaper: dict[str, bool] = {}  # "on": whether we are one, once tried
_subreaper_lock = threading.RLock()


def _prctl_subreaper(on: bool) -> bool:
    failure = set_child_subreaper(on)
    if failure is not None:
        _log.debug("prctl(PR_SET_CHILD_SUBREAPER, %d) failed: %s", on, failure)
    return failure is None


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux), once; True if it is.

    For the CLI, whose only descendants are hooks, what they start, and libvirt's ssh: what of a hook
    outlives it is reaped when it exits (see "a hook's whole process tree")."""
    if "on" not in _subreaper:
        with _subreaper_lock:
            if "on" not in _subreaper:
                _subreaper["on"] = _prctl_subreaper(True)
    return _subreaper["on"]


def forgo_subreaper() -> None:
    """Never be (or stay) a subreaper in this process: call it before starting daemons that fork and
    then wait for their own orphans to vanish (libvirtd and its QEMU, in the lab). The kernel hands a
    subreaper the orphans of ALL its descendants, and propagates the flag to existing ones.

    Hooks are still killed with their whole tree (found by their ORCH_HOOK_RUN); init reaps it."""
    with _subreaper_lock:
        if _subreaper.get("on", True):
            _prctl_subreaper(False)
        _subreaper["on"] = False


class _Reaper:
    """Waits for the processes finished hooks left running that are our children (we are their
    subreaper), and reaps each as it exits: nobody else will. One thread, started at the first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: list[int] = []
        self._wakeup_w = -1

    def add(self, pid: int) -> None:
        with self._lock:
            self._new.append(pid)
            if self._wakeup_w < 0:
                wakeup_r, self._wakeup_w = os.pipe()
                threading.Thread(target=self._run, args=(wakeup_r,), name="hook-reaper", daemon=True).start()
        os.write(self._wakeup_w, b"x")

    def _run(self, wakeup_r: int) -> None:
        # Exited, but not our child when it did (its parent, also a leftover, may die and hand it to
        # us): looked at every _REAP_POLL_S until reaped, by us or its parent.
        lingering: set[int] = set()  # pidfds
        polled: set[int] = set()  # PIDs, without pidfds (Linux < 5.3)
        with selectors.DefaultSelector() as selector:
            selector.register(wakeup_r, selectors.EVENT_READ, None)
            while True:
                for key, _ in selector.select(_REAP_POLL_S if lingering or polled else None):
                    if key.data is None:
                        os.read(wakeup_r, 4096)
                    else:  # it exited
                        selector.unregister(key.fd)
                        lingering.add(key.fd)
                with self._lock:
                    new, self._new = self._new, []
                for pid in new:
                    try:
                        selector.register(os.pidfd_open(pid), selectors.EVENT_READ, pid)
                    except ProcessLookupError:  # already reaped
                        pass
                    except (OSError, AttributeError):
                        polled.add(pid)
                lingering = {fd for fd in lingering if not _reap_pidfd(fd)}
                polled = {pid for pid in polled if not _reap_child(pid)}


def _reap_pidfd(fd: int) -> bool:
    """Reap the exited process of `fd` (exactly it, never a later one with its PID) if it is our
    child; True, and `fd` closed, once it is reaped (by us or its parent)."""
    try:
        os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:  # not our child: its parent's, or ours later
        try:
            signal.pidfd_send_signal(fd, 0)
        except ProcessLookupError:  # reaped by its parent
            pass
        else:
            return False
    os.close(fd)
    return True


def _reap_child(pid: int) -> bool:
    """Reap `pid` if it is our exited child; True once there is nothing more to wait for."""
    proc = procfs.proc(pid)
    if proc is None:
        return True
    if proc.ppid != os.getpid() or not proc.dead:  # alive, or not ours (yet): look again later
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


_reaper = _Reaper()


def _boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat gives start times in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS)


def _processes() -> dict[int, Proc]:
    found = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and (proc := procfs.proc(int(entry.name))) is not None:
                found[int(entry.name)] = proc
    return found


@dataclass(frozen=True)
class ProcessToken:
    """One hook process, as a journal records it: its PID and start time (PIDs are reused; the pair is
    not). Written `PID@START`, START in clock ticks after boot, `?` if it had already exited."""

    pid: int
    start: int | None

    def __str__(self) -> str:
        return f"{self.pid}@{'?' if self.start is None else self.start}"

    @classmethod
    def of(cls, pid: int) -> ProcessToken:
        """The token of the live process `pid` (start None if it is already gone, or a zombie)."""
        proc = procfs.proc(pid)
        return cls(pid, None if proc is None or proc.dead else proc.start)

    @classmethod
    def parse_all(cls, text: str | None) -> list[ProcessToken]:
        """Every `PID@START` in `text` (a device action's detail)."""
        found = []
        for word in (text or "").split():
            pid, at, start = word.partition("@")
            if at and pid.isdigit() and (start.isdigit() or start == "?"):
                found.append(cls(int(pid), int(start) if start.isdigit() else None))
        return found

    def alive(self) -> bool:
        """True while this very process runs (not a zombie, not a later process with its PID)."""
        if self.start is None:
            return False
        proc = procfs.proc(self.pid)
        return proc is not None and not proc.dead and proc.start == self.start


def wait_gone(tokens: Iterable[ProcessToken], timeout_s: float) -> list[ProcessToken]:
    """Wait until none of these processes runs, at most `timeout_s`; those still running then. They need
    not be our children (a dead orchestrator's hooks): each is followed through a pidfd."""
    deadline = time.monotonic() + timeout_s
    fds: dict[int, ProcessToken] = {}
    try:
        for token in tokens:
            try:
                fd = os.pidfd_open(token.pid)
            except OSError:  # gone
                continue
            if token.alive():  # checked after opening: the pidfd is this process's, not a successor's
                fds[fd] = token
            else:
                os.close(fd)
        with selectors.DefaultSelector() as selector:
            for fd in fds:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for key, _mask in selector.select(left):  # readable: the process has exited
                    selector.unregister(key.fd)
            return [fds[key.fd] for key in selector.get_map().values()]
    finally:
        for fd in fds:
            os.close(fd)


def kill_tokens(tokens: Iterable[ProcessToken]) -> None:
    """SIGKILL the process group of each process that still runs (a hook leads its own group)."""
    for token in tokens:
        if token.alive():
            _signal_group(token.pid, signal.SIGKILL)


def _carries(pid: int, entry: bytes, *, patient: bool = False) -> bool:
    """True if the process was started with `entry` (NAME=VALUE) in its environment. `patient`: an
    empty one is read again a few times (in the middle of an exec, it reads empty for a moment)."""
    for attempt in range(4 if patient else 1):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, a zombie, or not ours to read
            return False
        if environ:
            return entry in environ.split(b"\0")
        if attempt < 3 and patient:
            time.sleep(0.001)
    return False


class _Tree:
    """The processes of one hook, followed across its death and their re-parenting (see above)."""

    def __init__(self, leader: int) -> None:
        self.leader = leader
        with _running_lock:
            self.entry, since = _running.get(leader, (b"", 0))
        leader_proc = procfs.proc(leader)
        # Every descendant started after the hook; a tick of slack for the rounding of both clocks.
        self.since = leader_proc.start if leader_proc is not None else max(0, since - 1)
        self.seen: dict[int, int] = {} if leader_proc is None else {leader: leader_proc.start}

    def look(self) -> dict[int, Proc]:
        """Every process of the tree now, zombies included."""
        procs = _processes()
        me = os.getpid()
        with _running_lock:
            others = set(_running) - {self.leader}

        def eligible(pid: int) -> bool:
            return pid not in (me, 1) and pid not in others and procs[pid].start >= self.since

        roots = {pid for pid, start in self.seen.items() if pid in procs and procs[pid].start == start}
        for pid, proc in procs.items():
            if (
                pid not in roots
                and eligible(pid)
                and (
                    proc.pgid == self.leader
                    or (self.entry and not proc.dead and _carries(pid, self.entry, patient=proc.ppid == me))
                )
            ):
                roots.add(pid)
        children: dict[int, list[int]] = {}
        for pid, proc in procs.items():
            children.setdefault(proc.ppid, []).append(pid)
        tree: dict[int, Proc] = {}
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid not in tree and eligible(pid):
                tree[pid] = procs[pid]
                stack += children.get(pid, [])
        self.seen.update((pid, proc.start) for pid, proc in tree.items())
        return tree

    def signal(self, signum: signal.Signals) -> bool:
        """Send `signum` to every live process of the tree and its group; True if any was alive."""
        tree = self.look()
        alive = [pid for pid, proc in tree.items() if not proc.dead]
        if any(proc.pgid == self.leader for proc in tree.values()):  # the group exists: its id is ours
            _signal_group(self.leader, signum)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        return bool(alive)

    def reap(self) -> list[int]:
        """Reap the tree's zombies that are our children (not the hook: its Popen does); the PIDs of
        the tree's processes still alive."""
        me = os.getpid()
        alive = []
        for pid, proc in self.look().items():
            if not proc.dead:
                alive.append(pid)
            elif proc.ppid == me and pid != self.leader:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        return alive


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the hook's whole tree (its process group and every descendant, `setsid` ones included),
    SIGKILL what is left after the grace, reap what became our child, the hook last (see above)."""
    tree = _Tree(process.pid)
    tree.signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE_S)
    # Even if the hook obeyed, what outlived it is killed: a killed hook leaves nothing.
    deadline = time.monotonic() + _KILL_WAIT_S
    while tree.signal(signal.SIGKILL) and time.monotonic() < deadline:
        tree.reap()
        time.sleep(_KILL_POLL_S)  # SIGKILLed processes take a moment to exit; there is no event for it
    process.wait()
    left = tree.reap()
    if left:
        _log.warning("hook %d: processes of its tree did not die of SIGKILL: %s", process.pid, left)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already empty
        os.killpg(pgid, signum)


def _forget(pid: int) -> None:
    """The hook has been reaped: it is no longer a running hook of ours. What of its tree is still
    alive is left running; the reaper reaps each such process when it exits, if it is our child by
    then (see above). One look at /proc (about 2 ms for 100 processes), before the hook's result."""
    try:
        with _running_lock:
            known = pid in _running
        if known and _subreaper.get("on"):
            for member, proc in _Tree(pid).look().items():
                if member != pid and not proc.dead:
                    _reaper.add(member)
    except Exception:  # never at the expense of the hook's result
        _log.exception("looking for what hook %d left running failed", pid)
    finally:
        with _running_lock:
            _running.pop(pid, None)


def _spawn(
    argv: list[str], env: dict[str, str], *, stdin: int = subprocess.DEVNULL
) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """Start the program; return the process, or None and why it could not start."""
    if not argv:
        return None, "empty argv"
    become_subreaper()  # once: its orphans come to us (see "a hook's whole process tree")
    run = f"{os.getpid()}.{next(_run_numbers)}"
    since = _boot_ticks()
    try:
        process = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**env, HOOK_RUN_ENV: run},
            close_fds=True,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
    except FileNotFoundError:
        return None, f"program not found: {argv[0]}"
    except PermissionError:
        return None, f"program not executable: {argv[0]}"
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in an argument
        return None, f"cannot start {argv[0]}: {exc}"
    with _running_lock:
        _running[process.pid] = (f"{HOOK_RUN_ENV}={run}".encode(), since)
    return process, None


class ArmedHook:
    """A drain or undrain hook started when the migration starts, woken through its stdin at the event.

    The protocol (the README's "Armed hooks"; policies/default.toml points there):

    - it is started once per migration, with its argv and environment (no per-device placeholders:
      one process serves every device of the VM), and prints `ready` on a line of its own once armed;
    - at each event the orchestrator writes one line to its stdin, `ACTION DEVICE STATE QEMU_TIME`
      (`drain` or `undrain`, the device id, the device state, QEMU's timestamp in epoch seconds or `-`
      when the orchestrator decided alone), and the hook acts at once;
    - it answers `ok DEVICE`, or `fail DEVICE REASON`, on a line of its own, within its timeout_ms;
    - when the migration ends its stdin is closed: it exits, status 0, without acting.

    Any other output is kept as output (its tail is reported). A hook that dies, or does not answer in
    time (it is then killed, with its process group), fails the action, and every later one at once.
    The hot path is `fire`: one write to a pipe, no process started.
    """

    def __init__(self, hook: Hook, values: Mapping[str, str]) -> None:
        self.hook = hook
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._pending: dict[str, tuple[HookResult, Callable[[HookResult], None] | None, float]] = {}
        self._tail = bytearray()
        self._dead: str | None = None  # why it can no longer act
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._wakeup_r = self._wakeup_w = -1  # a pipe that tells the reader a new deadline exists
        self._stdin_fd = -1
        self._action = "drain" if hook.trigger is Trigger.DRAIN else "undrain"
        self.arming = self._result(None, started=time.time(), start_monotonic=time.monotonic())
        try:
            argv = fill_argv(hook.argv, values)
        except ValueError as exc:
            self._dead = f"bad argv: {exc}"
            return
        self._process, error = _spawn(argv, hook_env(values), stdin=subprocess.PIPE)
        if self._process is None:
            self._dead = error
            return
        self.arming.pid = self._process.pid
        assert self._process.stdin is not None
        self._stdin_fd = self._process.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)  # a hook that stops reading never blocks us
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        _thread.start_new_thread(self._read, ())

    @property
    def pid(self) -> int | None:
        """The armed process's id (and process group id), None if it could not start."""
        return self._process.pid if self._process is not None else None

    def wait_ready(self, timeout_s: float = ARM_TIMEOUT_S) -> HookResult:
        """Wait until the hook says `ready` (or dies, or `timeout_s` passes); the arming's result."""
        result = self.arming
        if self._dead is None and not self._ready.wait(timeout_s) and self._dead is None:
            self._kill(f"not ready within {timeout_s:g} s")
        with self._lock:
            result.ended = time.time()
            result.duration_ms = (time.monotonic() - result.start_monotonic) * 1000
            if self._ready.is_set():
                result.exit_code = 0
            else:
                result.error = f"armed hook did not arm: {self._dead}"
                result.output_tail = self._tail.decode(errors="replace")
        return result

    def fire(
        self,
        device_id: str,
        state: str,
        qemu_time: float | None,
        on_done: Callable[[HookResult], None] | None = None,
    ) -> HookResult:
        """Tell the hook to act for `device_id` now; `on_done` gets the result (its answer, or why not)."""
        started, start_monotonic = time.time(), time.monotonic()
        when = "-" if qemu_time is None else f"{qemu_time:.6f}"
        line = f"{self._action} {device_id} {state} {when}\n".encode()
        failure = None
        with self._lock:  # the line first, the bookkeeping after: the hook acts while we write it down
            if self._dead is not None:
                failure = f"the armed hook cannot act: {self._dead}"
            elif device_id in self._pending:
                failure = f"the armed hook is still acting for {device_id}"
            else:
                try:
                    written = os.write(self._stdin_fd, line)
                except OSError as exc:  # BrokenPipe: it died; EAGAIN: it stopped reading
                    failure = f"the armed hook cannot be told: {exc.strerror or exc}"
                else:
                    if written != len(line):
                        failure = "the armed hook stopped reading its stdin"
                    else:
                        result = self._result(device_id, started=started, start_monotonic=start_monotonic)
                        deadline = start_monotonic + self.hook.timeout_ms / 1000
                        self._pending[device_id] = (result, on_done, deadline)
                        with contextlib.suppress(OSError):  # full: the reader has a wakeup to read
                            os.write(self._wakeup_w, b"x")  # the reader now has a deadline to watch
        if failure is None:
            return result
        result = self._result(device_id, started=started, start_monotonic=start_monotonic)
        self._finish(result, on_done, error=failure)
        return result

    def close(self) -> HookResult | None:
        """The migration is over: close its stdin, let it exit (kill it after the grace); a result only
        when it did not exit cleanly."""
        process = self._process
        if process is None:
            return None
        with self._lock:  # no line (nor wakeup) after this: a closed descriptor's number may be reused
            self._stdin_fd = -1
            if self._dead is None:
                self._dead = "its migration has ended"
            wakeup, self._wakeup_w = self._wakeup_w, -1
        if wakeup < 0:
            return None  # closed already
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()
        try:
            code = process.wait(max(KILL_GRACE_S * 5, 1.0))
        except subprocess.TimeoutExpired:
            _kill_group(process)
            code = process.returncode
        _forget(process.pid)
        os.close(wakeup)
        if code == 0:
            return None
        result = self._result(None, started=time.time(), start_monotonic=time.monotonic())
        result.exit_code = code if code >= 0 else None
        result.error = (
            f"armed hook exited with status {code}" if code > 0 else f"armed hook killed by signal {-code}"
        )
        result.output_tail = self._tail.decode(errors="replace")
        return result

    # --- internals ------------------------------------------------------------------------------
    def _result(self, device_id: str | None, *, started: float, start_monotonic: float) -> HookResult:
        return HookResult(
            self.hook.label,
            self.hook.trigger,
            device_id,
            list(self.hook.argv),
            1,
            started,
            start_monotonic,
            self.pid if self._process is not None else None,
        )

    def _read(self) -> None:
        """The reader thread: answers, output, the hook's end, and the deadlines of pending actions."""
        process = self._process
        assert process is not None and process.stdout is not None
        fd = process.stdout.fileno()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(fd, selectors.EVENT_READ, "out")
                selector.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")
                while True:
                    for key, _ in selector.select(self._next_deadline()):
                        if key.data == "wakeup":
                            if not os.read(self._wakeup_r, 4096):  # close(): no more deadlines
                                selector.unregister(self._wakeup_r)
                        elif not self._take(os.read(fd, _READ_CHUNK)):
                            process.wait()
                            _forget(process.pid)
                            self._kill(f"exited with status {process.returncode} before the migration ended")
                            return
                    self._expire()
        except Exception as exc:  # a bug here must still fail the pending actions, never hang them
            _log.exception("following armed hook %s failed", self.hook.label)
            self._kill(f"internal error following the armed hook: {exc}")
        finally:
            process.stdout.close()
            os.close(self._wakeup_r)

    def _take(self, chunk: bytes) -> bool:
        """Parse the hook's output; False at its end."""
        if not chunk:
            return False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            words = raw.decode(errors="replace").strip().split(" ", 2)
            if words == ["ready"]:
                self._ready.set()
            elif len(words) >= 2 and words[0] in ("ok", "fail"):
                self._answer(
                    words[1], None if words[0] == "ok" else (words[2] if len(words) > 2 else "failed")
                )
            else:
                with self._lock:
                    self._tail += raw + b"\n"
                    del self._tail[:-OUTPUT_TAIL_BYTES]
        return True

    def _answer(self, device_id: str, failure: str | None) -> None:
        with self._lock:
            pending = self._pending.pop(device_id, None)
        if pending is not None:
            result, on_done, _deadline = pending
            self._finish(result, on_done, error=None if failure is None else f"answered fail: {failure}")

    def _next_deadline(self) -> float | None:
        with self._lock:
            deadlines = [deadline for _r, _d, deadline in self._pending.values()]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [device for device, (_r, _d, deadline) in self._pending.items() if deadline <= now]
        if late:
            self._kill(f"timed out after {self.hook.timeout_ms} ms", timed_out=True)

    def _kill(self, why: str, *, timed_out: bool = False) -> None:
        """It can no longer act: fail what is pending, end its process group."""
        with self._lock:
            if self._dead is None:
                self._dead = why
            pending, self._pending = self._pending, {}
            tail = self._tail.decode(errors="replace")
        for result, on_done, _deadline in pending.values():
            result.output_tail = tail
            self._finish(result, on_done, error=why, timed_out=timed_out)
        process = self._process
        if process is not None and process.poll() is None:
            _kill_group(process)

    def _finish(
        self,
        result: HookResult,
        on_done: Callable[[HookResult], None] | None,
        *,
        error: str | None,
        timed_out: bool = False,
    ) -> None:
        result.ended = time.time()
        result.duration_ms = (time.monotonic() - result.start_monotonic) * 1000
        result.error, result.timed_out = error, timed_out
        result.exit_code = 0 if error is None else None
        if on_done is not None:
            try:
                on_done(result)
            except Exception:
                _log.exception("on_done callback for armed hook %s failed", result.label)


class HookRunner:
    """Starts hooks as argv commands (never through a shell) and reports how each run went."""

    def __init__(self, *, eager: bool = True) -> None:
        # Now rather than at the first hook: that may be a drain hook, racing the device. (Not eager:
        # a policy without hooks; the first start, if any, does it.)
        if eager:
            become_subreaper()

    def arm(self, hook: Hook, values: Mapping[str, str]) -> ArmedHook:
        """Start an armed hook (it then waits for its events); see `ArmedHook`."""
        return ArmedHook(hook, values)

    def start(
        self,
        hook: Hook,
        values: Mapping[str, str],
        device_id: str | None = None,
        on_done: Callable[[HookResult], None] | None = None,
        *,
        attempt: int = 1,
    ) -> RunningHook:
        """Spawn the hook now and return without waiting for it; never raises for the hook's sake.

        Cheap enough for the event thread: the process is spawned first, then a daemon waiter thread
        takes over the deadline (`hook.timeout_ms` from now) and the output. A hook that cannot start
        (missing program, bad placeholder) gets a failed result at once. `on_done` is called once, from
        the waiter thread, with the final result.
        """
        env: dict[str, str] | None = None
        error: str | None = None
        try:
            argv = fill_argv(hook.argv, values)
        except ValueError as exc:
            argv, error = list(hook.argv), f"bad argv: {exc}"
        else:
            env = hook_env(values)
        started, start_monotonic = time.time(), time.monotonic()
        process = None
        if env is not None:
            process, error = _spawn(argv, env)
        result = HookResult(
            hook.label if hook.argv else hook.name or "(empty argv)",
            hook.trigger,
            device_id,
            argv,
            attempt,
            started,
            start_monotonic,
            None if process is None else process.pid,
            error=error,
        )
        return RunningHook(hook, result, process, on_done)

    def run(self, hook: Hook, values: Mapping[str, str], device_id: str | None = None) -> HookResult:
        """Run the hook to its end and return the last result.

        Before/after-* hooks are retried `hook.retries` times while they fail, waiting `hook.backoff_ms`
        before the first retry and twice as long before each next one; drain/undrain hooks run once.
        """
        import tenacity  # here: ~5 ms of every start otherwise, and only these hooks retry

        retries = hook.retries if hook.trigger in RETRIED_TRIGGERS else 0
        attempts = itertools.count(1)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(1 + retries),
            wait=tenacity.wait_exponential(multiplier=hook.backoff_ms / 1000, min=0, max=float("inf")),
            retry=tenacity.retry_if_result(lambda result: not result.ok),
            # Out of attempts: hand back the last failed result instead of raising RetryError.
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        result: HookResult = retrying(
            lambda: self.start(hook, values, device_id, attempt=next(attempts)).wait()
        )
        return result

    def run_parallel(
        self, hooks_with_values: Sequence[tuple[Hook, Mapping[str, str], str | None]]
    ) -> list[HookResult]:
        """Start every hook, then wait for all; results in the order given. No retries."""
        running = [self.start(hook, values, device_id) for hook, values, device_id in hooks_with_values]
        return [hook.wait() for hook in running]


def preflight(hooks: Iterable[Hook]) -> list[str]:
    """Problems that would stop these hooks from running, one line each; empty if none.

    Checks: an empty argv; a program that is not an executable file (a path with a slash) or not
    found on PATH (a bare name); unknown placeholders or unmatched braces.
    """
    problems: list[str] = []
    for hook in hooks:
        if not hook.argv:
            problems.append(f"{hook.trigger} hook {hook.name or '(unnamed)'}: empty argv")
            continue
        where = f"{hook.trigger} hook {hook.label}"
        program = hook.argv[0]
        if "/" in program:
            if not (Path(program).is_file() and os.access(program, os.X_OK)):
                missing = not Path(program).exists()
                problems.append(f"{where}: program {'not found' if missing else 'not executable'}: {program}")
        elif shutil.which(program, path=hook_path()) is None:
            problems.append(f"{where}: program not found on PATH: {program}")
        try:
            unknown = check_placeholders(hook.argv)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        problems += [f"{where}: unknown placeholder {{{name}}}" for name in unknown]
    return problems
