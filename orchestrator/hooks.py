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


def _spawn(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """Start the program; return the process, or None and why it could not start."""
    if not argv:
        return None, "empty argv"
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
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


class HookRunner:
    """Starts hooks as argv commands (never through a shell) and reports how each run went."""

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
