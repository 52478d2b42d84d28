"""Hook definitions and the hook runner (argv commands, never a shell).

The types first (`Trigger`, `OnFailure`, `PLACEHOLDERS`, `Hook`) are the contract shared with `policy`.
The runner below has every hook started by the hook supervisor (orchestrator.edges.supervisor), which
records each one's start and end in the migration's run log, enforces its deadline and kills its
tree: starting a hook is one message on a socket, cheap enough for the event thread the moment a
prepare event arrives. Every run gets a `HookResult`, including runs that could not start.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import selectors
import shutil
import string
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from orchestrator.edges import trust
from orchestrator.edges.supervisor import (
    KILL_GRACE_S,
    KILL_WAIT_S,
    OUTPUT_TAIL_BYTES,
    Ended,
    Supervisor,
    hook_path,
    shared,
)


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

_READ_CHUNK = 65536
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


def hook_values_env(values: Mapping[str, str]) -> dict[str, str]:
    """ORCH_<NAME> for every placeholder value: what a hook gets in its environment besides ours (the
    supervisor's, with PATH as `supervisor.hook_path`). Keys of `values` that are not placeholders are
    not exported."""
    return {f"ORCH_{name.upper()}": value for name, value in values.items() if name in _KNOWN}


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
    # The supervisor's run: its start and end are in the run log already (None: the orchestrator's own
    # result, an armed hook's answer, which the migration records itself).
    run: str | None = None
    arming: bool = False  # an armed hook's own process (its start, or an unclean exit), not an action

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


class SupervisedRun:
    """A hook the supervisor runs: its result once it has ended."""

    def __init__(self, result: HookResult, on_done: Callable[[HookResult], None] | None) -> None:
        self.run = result.run  # the supervisor's run (None: never asked for)
        self.done = threading.Event()  # set once the result is final and on_done has returned
        self._result = result
        self._on_done = on_done

    @property
    def result(self) -> HookResult | None:
        """The final result, None while the hook runs."""
        return self._result if self.done.is_set() else None

    def wait(self) -> HookResult:
        """Block until the hook has ended (at the latest its deadline plus the kill's time)."""
        self.done.wait()
        return self._result

    def ended(self, end: Ended) -> None:
        """The supervisor's report of its end (on its reader thread)."""
        result = self._result
        result.pid, result.started, result.ended = end.pid, end.started, end.ended
        result.duration_ms, result.exit_code, result.timed_out = end.duration_ms, end.exit_code, end.timed_out
        result.error = result.error or end.error
        result.output_tail = end.output_tail
        try:
            if self._on_done is not None:
                self._on_done(result)
        except Exception:  # the caller's bug must not leave `done` unset
            _log.exception("on_done callback for hook %s failed", result.label)
        finally:
            self.done.set()


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
    time (its whole tree is then killed by the supervisor), fails the action, and every later one at
    once. The hot path is `fire`: one write to a pipe, no process started. The process is the
    supervisor's (it records its start and end); its stdin and stdout pipes are ours.
    """

    def __init__(
        self, hook: Hook, values: Mapping[str, str], supervisor: Supervisor, log: str | None
    ) -> None:
        self.hook = hook
        self._supervisor = supervisor
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._settled = threading.Event()  # ready, or dead: what wait_ready waits for
        self._exited = threading.Event()
        self._exit: Ended | None = None
        self._pending: dict[str, tuple[HookResult, Callable[[HookResult], None] | None, float]] = {}
        self._tail = bytearray()
        self._dead: str | None = None  # why it can no longer act
        self._buffer = b""
        self._wakeup_r = self._wakeup_w = -1  # a pipe that tells the reader a new deadline exists
        self._stdin_fd = -1
        self._action = "drain" if hook.trigger is Trigger.DRAIN else "undrain"
        self.run = supervisor.next_run()
        self.arming = self._result(None, started=time.time(), start_monotonic=time.monotonic())
        self.arming.arming = True
        try:
            argv = fill_argv(hook.argv, values)
        except ValueError as exc:
            self._dead = f"bad argv: {exc}"
            self._settled.set()
            self._exited.set()
            return
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        message = _start_message(hook, argv, values, None, log, armed=True)
        supervisor.start_run(self.run, message, self._ended, fds=(stdin_r, out_w))
        os.close(stdin_r)
        os.close(out_w)
        self._stdin_fd = stdin_w
        os.set_blocking(stdin_w, False)  # a hook that stops reading never blocks us
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        threading.Thread(target=self._read, args=(out_r,), name=f"armed-{hook.label}", daemon=True).start()

    def wait_ready(self, timeout_s: float = ARM_TIMEOUT_S) -> HookResult:
        """Wait until the hook says `ready` (or dies, or `timeout_s` passes); the arming's result."""
        result = self.arming
        if not self._settled.wait(timeout_s):
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
        """The migration is over: close its stdin, let it exit (its tree killed after the grace); a
        result only when it did not exit cleanly."""
        with self._lock:  # no line (nor wakeup) after this: a closed descriptor's number may be reused
            stdin, self._stdin_fd = self._stdin_fd, -1
            if self._dead is None:
                self._dead = "its migration has ended"
            wakeup, self._wakeup_w = self._wakeup_w, -1
        if stdin < 0:
            return None  # closed already, or it never started
        os.close(stdin)
        if not self._exited.wait(max(KILL_GRACE_S * 5, 1.0)):
            self._supervisor.kill(self.run)
            self._exited.wait(KILL_GRACE_S + KILL_WAIT_S + 1.0)
        with contextlib.suppress(OSError):
            os.close(wakeup)
        end = self._exit
        if end is None or end.pid is None or (end.error is None and end.exit_code == 0):
            return None  # a clean exit; or it never started (its arming said why)
        result = self._result(None, started=time.time(), start_monotonic=time.monotonic())
        result.arming = True
        result.exit_code = end.exit_code if end is not None else None
        result.error = (
            f"armed hook {end.error}" if end is not None and end.error else "armed hook did not exit"
        )
        result.output_tail = self._tail.decode(errors="replace")
        return result

    # --- internals ------------------------------------------------------------------------------
    def _result(self, device_id: str | None, *, started: float, start_monotonic: float) -> HookResult:
        pid = self._exit.pid if self._exit is not None else None
        return HookResult(
            self.hook.label,
            self.hook.trigger,
            device_id,
            list(self.hook.argv),
            1,
            started,
            start_monotonic,
            pid,
        )

    def _ended(self, end: Ended) -> None:
        """The supervisor says the process ended (or could not start)."""
        self._exit = end
        with self._lock:
            closing = self._dead == "its migration has ended"
        if not closing:
            status = end.error or f"exited with status {end.exit_code}"
            self._kill(f"{status} before the migration ended" if end.pid else status)
        self._exited.set()

    def _read(self, out: int) -> None:
        """The reader thread: answers, output, and the deadlines of pending actions."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(out, selectors.EVENT_READ, "out")
                selector.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")
                while selector.get_map():
                    for key, _ in selector.select(self._next_deadline()):
                        if key.data == "wakeup":
                            if not os.read(self._wakeup_r, 4096):  # close(): no more deadlines
                                selector.unregister(self._wakeup_r)
                        elif not self._take(os.read(out, _READ_CHUNK)):
                            selector.unregister(out)  # its output ended; its exit is the supervisor's to say
                    self._expire()
                    if self._exited.is_set() and not self._pending:
                        break
        except Exception as exc:  # a bug here must still fail the pending actions, never hang them
            _log.exception("following armed hook %s failed", self.hook.label)
            self._kill(f"internal error following the armed hook: {exc}")
        finally:
            os.close(out)
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
                self._settled.set()
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
        if self._exited.is_set():
            return 0.05
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [device for device, (_r, _d, deadline) in self._pending.items() if deadline <= now]
        if late:
            self._kill(f"timed out after {self.hook.timeout_ms} ms", timed_out=True)

    def _kill(self, why: str, *, timed_out: bool = False) -> None:
        """It can no longer act: fail what is pending, have its tree killed."""
        with self._lock:
            first = self._dead is None
            if first:
                self._dead = why
            pending, self._pending = self._pending, {}
            tail = self._tail.decode(errors="replace")
        self._settled.set()
        for result, on_done, _deadline in pending.values():
            result.output_tail = tail
            self._finish(result, on_done, error=why, timed_out=timed_out)
        if first and not self._exited.is_set():
            self._supervisor.kill(self.run)

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


def _start_message(
    hook: Hook,
    argv: Sequence[str],
    values: Mapping[str, str],
    device_id: str | None,
    log: str | None,
    *,
    armed: bool = False,
    attempt: int = 1,
    index: int | None = None,
) -> dict[str, Any]:
    return {
        "log": log,
        "argv": list(argv),
        "env": hook_values_env(values),
        "label": hook.label if hook.argv else hook.name or "(empty argv)",
        "trigger": hook.trigger.value,
        "device_id": device_id,
        "hook": index,
        "attempt": attempt,
        "timeout_ms": hook.timeout_ms,
        "armed": armed,
    }


class HookRunner:
    """Has hooks run as argv commands (never through a shell) by the hook supervisor, and reports how
    each run went. Bound to one run log (`attach`): the supervisor records there every hook it starts."""

    def __init__(self, supervisor: Supervisor | None = None) -> None:
        self._given = supervisor
        self.log: str | None = None

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor that runs the hooks (this process's, unless one was given)."""
        return self._given if self._given is not None else shared()

    @property
    def supervisor_pid(self) -> int:
        """The supervisor's process (written in the run log: `recover` waits for it)."""
        return self.supervisor.pid

    def attach(self, log: str, fd: int) -> None:
        """Record every hook started from now on in the run log `log` (open as `fd`)."""
        self.supervisor.attach(log, fd)
        self.log = log

    def detach(self) -> None:
        """The run is over: the supervisor closes its run log once every hook of it has ended."""
        if self.log is not None:
            self.supervisor.detach(self.log)
            self.log = None

    def arm(self, hook: Hook, values: Mapping[str, str]) -> ArmedHook:
        """Start an armed hook (it then waits for its events); see `ArmedHook`."""
        return ArmedHook(hook, values, self.supervisor, self.log)

    def start(
        self,
        hook: Hook,
        values: Mapping[str, str],
        device_id: str | None = None,
        on_done: Callable[[HookResult], None] | None = None,
        *,
        attempt: int = 1,
        index: int | None = None,
    ) -> SupervisedRun:
        """Have the hook started now and return without waiting for it; never raises for the hook's sake.

        Cheap enough for the event thread: one message to the supervisor, which starts the process,
        records it, and enforces its deadline (`hook.timeout_ms`). A hook that cannot start (missing
        program, bad placeholder) gets a failed result. `on_done` is called once, with the final result,
        from the supervisor's reader thread (or at once, for a hook that could not even be asked for).
        `index` is the hook's place among its trigger's hooks in the policy (what `recover` counts).
        """
        supervisor = self.supervisor
        run = supervisor.next_run()
        try:
            argv, error = fill_argv(hook.argv, values), None
        except ValueError as exc:
            argv, error = list(hook.argv), f"bad argv: {exc}"
        label = hook.label if hook.argv else hook.name or "(empty argv)"
        result = HookResult(
            label, hook.trigger, device_id, argv, attempt, time.time(), time.monotonic(), None, run=run
        )
        handle = SupervisedRun(result, on_done)
        if error is not None:
            result.run = None  # never asked for: nothing of it is in the run log
            now = time.time()
            handle.ended(Ended(run, None, now, now, 0.0, None, False, error, ""))
            return handle
        message = _start_message(hook, argv, values, device_id, self.log, attempt=attempt, index=index)
        supervisor.start_run(run, message, handle.ended)
        return handle

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


def program_path(program: str) -> Path | None:
    """Where a hook's program is: a path with a slash as it is, a bare name looked up on the hooks'
    PATH; None when there is no such program."""
    if "/" in program:
        return Path(program)
    found = shutil.which(program, path=hook_path())
    return None if found is None else Path(found)


def preflight(hooks: Iterable[Hook]) -> list[str]:
    """Problems that would stop these hooks from running, or make running them unsafe; one line each,
    empty if none.

    Checks: an empty argv; a program that is not an executable file (a path with a slash) or not found
    on PATH (a bare name); a program that someone other than root (or you) could change, or that sits
    in a directory they could (orchestrator.edges.trust: as policies); unknown placeholders or unmatched
    braces.
    """
    problems: list[str] = []
    for hook in hooks:
        if not hook.argv:
            problems.append(f"{hook.trigger} hook {hook.name or '(unnamed)'}: empty argv")
            continue
        where = f"{hook.trigger} hook {hook.label}"
        program = hook.argv[0]
        path = program_path(program)
        if path is None:
            problems.append(f"{where}: program not found on PATH: {program}")
        elif not (path.is_file() and os.access(path, os.X_OK)):
            missing = not path.exists()
            problems.append(f"{where}: program {'not found' if missing else 'not executable'}: {program}")
        else:
            problems += _distrusted(where, path)
        try:
            unknown = check_placeholders(hook.argv)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        problems += [f"{where}: unknown placeholder {{{name}}}" for name in unknown]
    return problems


def _distrusted(where: str, path: Path) -> list[str]:
    """The trust problem of a hook's program, as one line (none if it is safe to run)."""
    try:
        real, status = trust.walk(path)
        trust.check(real, status)
    except trust.Untrusted as error:
        return [f"{where}: {error.kind} {error.path} is {error.problem}: unsafe to run (fix: {error.fix})"]
    except (OSError, ValueError) as exc:
        return [f"{where}: program {path}: {exc}"]
    return []
