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

import tenacity


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


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the hook's whole process group, SIGKILL what is left after the grace, reap the leader."""
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE_S)
    # Even if the leader obeyed, children that outlived it are killed: a timed-out hook leaves nothing.
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already empty
        os.killpg(pgid, signum)


def _spawn(
    argv: list[str], env: dict[str, str], *, stdin: int = subprocess.DEVNULL
) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """Start the program; return the process, or None and why it could not start."""
    if not argv:
        return None, "empty argv"
    try:
        process = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=True,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
    except FileNotFoundError:
        return None, f"program not found: {argv[0]}"
    except PermissionError:
        return None, f"program not executable: {argv[0]}"
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in an argument
        return None, f"cannot start {argv[0]}: {exc}"
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
        os.set_blocking(self._process.stdin.fileno(), False)  # a hook that stops reading never blocks us
        self._wakeup_r, self._wakeup_w = os.pipe()
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
        result = self._result(device_id, started=started, start_monotonic=start_monotonic)
        action = "drain" if self.hook.trigger is Trigger.DRAIN else "undrain"
        when = "-" if qemu_time is None else f"{qemu_time:.6f}"
        line = f"{action} {device_id} {state} {when}\n".encode()
        failure = None
        with self._lock:
            if self._dead is not None:
                failure = f"the armed hook cannot act: {self._dead}"
            elif device_id in self._pending:
                failure = f"the armed hook is still acting for {device_id}"
            else:
                process = self._process
                assert process is not None and process.stdin is not None
                try:
                    written = os.write(process.stdin.fileno(), line)
                except OSError as exc:  # BrokenPipe: it died; EAGAIN: it stopped reading
                    failure = f"the armed hook cannot be told: {exc.strerror or exc}"
                else:
                    if written != len(line):
                        failure = "the armed hook stopped reading its stdin"
                    else:
                        deadline = start_monotonic + self.hook.timeout_ms / 1000
                        self._pending[device_id] = (result, on_done, deadline)
        if failure is None:
            os.write(self._wakeup_w, b"x")  # the reader now has a deadline to watch
        else:
            self._finish(result, on_done, error=failure)
        return result

    def close(self) -> HookResult | None:
        """The migration is over: close its stdin, let it exit (kill it after the grace); a result only
        when it did not exit cleanly."""
        process = self._process
        if process is None:
            return None
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()
        try:
            code = process.wait(max(KILL_GRACE_S * 5, 1.0))
        except subprocess.TimeoutExpired:
            _kill_group(process)
            code = process.returncode
        with contextlib.suppress(OSError):
            os.close(self._wakeup_w)
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
                            os.read(self._wakeup_r, 4096)
                        elif not self._take(os.read(fd, _READ_CHUNK)):
                            process.wait()
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
