"""Armed hooks: a drain or undrain hook started with the migration and woken through its stdin at each
event, so that acting on an event starts no process (the protocol: `ArmedHook`). Also the message that
asks the hook supervisor (orchestrator.edges.supervisor) to start a hook, armed or not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from orchestrator.core.hooks import Hook, HookResult, Trigger, fill_argv, hook_values_env
from orchestrator.edges.process_tree import KILL_GRACE_S, KILL_WAIT_S
from orchestrator.edges.supervisor import Ended, Supervisor
from orchestrator.edges.supervisor_process import OUTPUT_TAIL_BYTES

_log = logging.getLogger(__name__)

_READ_CHUNK = 65536
ARM_TIMEOUT_S = 10.0  # an armed hook must print `ready` within this long of its start


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
        message = start_message(hook, argv, values, None, log, armed=True)
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


def start_message(
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
    """The supervisor's `start` message for a run of `hook` (all but its run id)."""
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
