"""The hook runner: has every hook started by the hook supervisor (orchestrator.edges.supervisor),
which records each one's start and end in the migration's run log, enforces its deadline and kills its
tree: starting a hook is one message on a socket, cheap enough for the event thread the moment a
prepare event arrives. Every run gets a `HookResult`, including runs that could not start. Also the
pre-flight checks of a policy's hooks (`preflight`): programs found, trusted, placeholders known.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from orchestrator.core.hooks import (
    RETRIED_TRIGGERS,
    Hook,
    HookResult,
    check_placeholders,
    fill_argv,
)
from orchestrator.edges import trust
from orchestrator.edges.armed_hook import ArmedHook, start_message
from orchestrator.edges.supervisor import Ended, Supervisor, hook_path, shared

_log = logging.getLogger(__name__)


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
        message = start_message(hook, argv, values, device_id, self.log, attempt=attempt, index=index)
        supervisor.start_run(run, message, handle.ended)
        return handle

    def run(self, hook: Hook, values: Mapping[str, str], device_id: str | None = None) -> HookResult:
        """Run the hook to its end and return the last result.

        Before/after-* hooks are retried `hook.retries` times while they fail, waiting `hook.backoff_ms`
        before the first retry and twice as long before each next one; drain/undrain hooks run once.
        """
        import tenacity  # here: importing it would slow every start, and only these hooks retry

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
