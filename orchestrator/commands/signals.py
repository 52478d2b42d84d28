"""SIGINT, SIGTERM and SIGHUP while a command works: handed to the work from a thread the signal wakes,
and never the death of the process before its report is out and its journal closed."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

# The `orchestrator` program's own entry points (module, name): when `__main__` runs one of them, the
# process is the program and exits when its command ends (the console script and `python -m
# orchestrator` run orchestrator.entry.main; the program module's main is accepted as well).
PROGRAM_MAINS = frozenset({("orchestrator.entry", "main"), ("orchestrator.commands.program", "main")})


class SignalGuard:
    """SIGINT, SIGTERM and SIGHUP from `on_signals` to the exit of the `orchestrator` process (ignored from
    the end of the command on: Python puts the default action back for its shutdown, and a signal then
    would turn exit 130 into death by SIGTERM); when the CLI runs in another program (tests), to the
    end of the command (the click context's close: after its report is printed and its journal
    closed, on every path). Each signal is recorded in `received`, then:

    - while the work runs, handed to the handler, on a thread of its own (it takes locks that the
      interrupted main thread may hold) that the signal wakes at once (`signal.set_wakeup_fd`): Python
      runs a signal's handler in the main thread only, after the call it is in returns, and a libvirt
      call can last as long as QEMU's monitor is busy (during a device's P2P transition, which is
      exactly when an abort must land); with no handler, the first one raises KeyboardInterrupt in
      the main thread, as Ctrl-C does by default (exit 130);
    - once `ended()`, only recorded: a storm of signals never kills the process (the default action)
      before its report is written, its devices undrained and its journal closed;
    - SIGHUP only ever recorded (and `on_hangup` told): the migration runs in libvirt anyway, so it is
      finished, undrained and recorded; the terminal's streams are `render.Outlasting`.

    Its threads are daemon threads: the one following the wakeups blocks until `restore()`, which the
    program, exiting when its command ends, never calls.
    """

    def __init__(
        self, handler: Callable[[str], None] | None, on_hangup: Callable[[], None] | None = None
    ) -> None:
        import signal

        self.received: list[str] = []
        self._handler = handler
        self._on_hangup = on_hangup
        self._running = True
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        self._wakeup: tuple[int, int] | None = None  # (its write end, the previous wakeup fd)
        if handler is not None:
            self._follow_wakeups()

    def _follow_wakeups(self) -> None:
        """Dispatch each SIGINT/SIGTERM from a thread that the signal itself wakes."""
        import signal

        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        try:
            previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: the main thread's handler dispatches, later
            os.close(read_end)
            os.close(write_end)
            return
        self._wakeup = (write_end, previous)
        threading.Thread(
            target=self._follow, args=(read_end,), name="orchestrator-signals", daemon=True
        ).start()

    def _follow(self, read_end: int) -> None:
        import signal

        try:
            while data := os.read(read_end, 64):  # one byte per signal received; EOF: restored
                for signum in data:
                    if signum == signal.SIGHUP and self._running and self._on_hangup is not None:
                        try:
                            self._on_hangup()
                        except Exception as exc:  # a bug: one line, and the run goes on
                            sys.stderr.write(f"orchestrator: error: handling SIGHUP failed: {exc!r}\n")
                    elif signum in (signal.SIGINT, signal.SIGTERM) and self._running and self._handler:
                        name = signal.Signals(signum).name
                        try:
                            self._handler(name)
                        except Exception as exc:  # a bug: one line, and the next signal still counts
                            sys.stderr.write(f"orchestrator: error: handling {name} failed: {exc!r}\n")
        finally:
            os.close(read_end)

    def ended(self) -> None:
        """The work is over: from now on signals are recorded and ignored."""
        self._running = False

    def restore(self) -> None:
        """Put the previous handlers back (the command is over)."""
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if self._wakeup is not None:
            write_end, previous_fd = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous_fd)
            os.close(write_end)  # the following thread reads EOF and ends

    def ignore_to_exit(self) -> None:
        """The command is over and the process only exits now: ignore the signals to the end."""
        import signal

        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, _frame: object) -> None:
        import signal

        name = signal.Signals(signum).name
        self.received.append(name)
        if not self._running or signum == signal.SIGHUP:  # a hang-up never stops the work
            return
        if self._handler is not None:
            if self._wakeup is None:  # else the wakeup's thread has dispatched it already
                threading.Thread(
                    target=self._handler, args=(name,), name=f"orchestrator-{name}", daemon=True
                ).start()
            return
        self._running = False
        raise KeyboardInterrupt(name)


def is_the_program() -> bool:
    """Whether this process is the `orchestrator` program itself (its `__main__` runs one of
    PROGRAM_MAINS), rather than another program running the CLI in-process."""
    main = getattr(sys.modules.get("__main__"), "main", None)
    return (getattr(main, "__module__", None), getattr(main, "__qualname__", None)) in PROGRAM_MAINS


def on_signals(
    handler: Callable[[str], None] | None, on_hangup: Callable[[], None] | None = None
) -> SignalGuard:
    """Guard SIGINT, SIGTERM and SIGHUP until the command ends (see `SignalGuard`): `handler(signal name)`
    stops the work, or, None, the first SIGINT/SIGTERM raises KeyboardInterrupt; SIGHUP (the terminal
    hung up: the admin's ssh session died) never stops it, `on_hangup` is told."""
    guard = SignalGuard(handler, on_hangup)
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - depends on the installed Typer
        from click import get_current_context  # type: ignore[no-redef,import-not-found,unused-ignore]
    context = get_current_context(silent=True)
    if context is not None:  # else (outside a command) the caller restores
        # The `orchestrator` program itself (console script, `python -m orchestrator`) exits when
        # the command ends; a program running the CLI in-process gets its own handlers back.
        context.call_on_close(guard.ignore_to_exit if is_the_program() else guard.restore)
    return guard
