"""How `migrate`, `evacuate` and `recover` end, driven through `orchestrator.commands.program.main` with the
work faked (no libvirt): every failure is exactly one `orchestrator: error:` line on stderr, and signals
once the work has ended never kill the process before its report is out and its journal closed."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.commands.program import main
from orchestrator.core.report import Outcome, Report

SOURCE, DESTINATION = "qemu+unix:///system?socket=/a", "qemu+unix:///system?socket=/b"


@pytest.fixture
def no_libvirt(monkeypatch: pytest.MonkeyPatch) -> None:
    """`orchestrator.edges.virt` (the libvirt edge) replaced: hosts that are never asked anything."""

    @contextlib.contextmanager
    def open_hosts(*_uris: str) -> Iterator[tuple[object, object]]:
        yield object(), object()

    virt = types.ModuleType("orchestrator.edges.virt")
    virt.open_hosts = open_hosts  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orchestrator.edges.virt", virt)
    monkeypatch.setattr("orchestrator.commands.groundwork.reconcile", lambda *_args, **_kwargs: None)


def migration_ending(report: Report | BaseException) -> type:
    """A Migration whose run() returns `report` (or raises it)."""

    class Fake:
        def __init__(self, request: Any, *_args: Any, **_kwargs: Any) -> None:
            self.request = request

        def run(self) -> Report:
            if isinstance(report, BaseException):
                raise report
            return report

        def interrupt(self, _name: str) -> None:  # pragma: no cover - no signal here
            pass

        def hung_up(self) -> None:  # pragma: no cover - no signal here
            pass

    return Fake


def report(outcome: Outcome, **fields: Any) -> Report:
    return Report("3f2a9c0d1e2f", "vm1", SOURCE, DESTINATION, "default", outcome=outcome, **fields)


def run_migrate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, list[str]]:
    try:
        main(["migrate", "vm1", DESTINATION, "-c", SOURCE, "--journal", str(tmp_path / "j.sqlite"), *extra])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def failed_undrain() -> Report:
    from orchestrator.core.hooks import HookResult, Trigger

    hook = HookResult("rdma", Trigger.UNDRAIN, "nic0", ["rdma"], 1, 0.0, 0.0, 42, exit_code=3)
    hook.error = "exited with status 3"
    return report(Outcome.SUCCEEDED, hooks=[hook], undrain_failed=True)


@pytest.mark.parametrize(
    ("made", "code", "words"),
    [
        (lambda: report(Outcome.ROLLED_BACK, error="the job failed"), 4, "rolled-back: the job failed"),
        (lambda: report(Outcome.ABORTED, error="drain hook rdma failed"), 5, "aborted: drain hook rdma"),
        (lambda: report(Outcome.FAILED, error="on neither host"), 9, "failed: on neither host"),
        (failed_undrain, 9, "the undrain of nic0 failed (exited with status 3)"),
        (lambda: report(Outcome.SUCCEEDED, journal_error="disk full"), 7, "its record is not in the journal"),
        (lambda: report(Outcome.INTERRUPTED, error="SIGTERM received"), 130, "interrupted: SIGTERM"),
        (KeyboardInterrupt, 130, "interrupted"),  # Ctrl-C before our handler (was exit 0)
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_every_failure_of_migrate_is_one_line_on_stderr(
    no_libvirt: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    made: Any,
    code: int,
    words: str,
    as_json: bool,
) -> None:
    monkeypatch.setattr("orchestrator.flows.migration.Migration", migration_ending(made()))
    got, out, err = run_migrate(tmp_path, capsys, *(["--json"] if as_json else []))
    assert got == code, err
    errors = [line for line in err if line.startswith("orchestrator: error: ")]
    assert len(errors) == 1, err
    assert words in errors[0]
    assert "" not in err, "no blank line either"
    if as_json and words != "interrupted":
        assert json.loads(out)["exit_code"] == code


def test_a_successful_migrate_has_no_error_line(
    no_libvirt: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("orchestrator.flows.migration.Migration", migration_ending(report(Outcome.SUCCEEDED)))
    code, _out, err = run_migrate(tmp_path, capsys)
    assert code == 0 and not [line for line in err if "error" in line], err


# --- signals once the work has ended ------------------------------------------------------------------

# Runs in a process of its own (a signal with the default action would end pytest). The work is faked;
# signals come as a storm of 20 SIGTERMs from another thread while it runs, then from the main thread
# itself while the journal is closed and the report printed: with the default handler back, any of
# them would kill the process there.
SIGNAL_PRELUDE = r"""
import contextlib, json, os, signal, sys, threading, time, types
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets it (unless its parent ignored it)

virt = types.ModuleType("orchestrator.edges.virt")
@contextlib.contextmanager
def open_hosts(*uris):
    yield object(), object()
virt.open_hosts = open_hosts
sys.modules["orchestrator.edges.virt"] = virt

from orchestrator.commands import evacuate, groundwork, migrate, program, recover
from orchestrator.edges import journal
groundwork.reconcile = lambda *args, **kwargs: None
state = Path(sys.argv[1])
me = os.getpid()

def storm():
    for _ in range(20):
        os.kill(me, signal.SIGTERM)

storming = threading.Thread(target=storm)

def signals_to_self(*signums):
    for signum in signums:
        os.kill(me, signum)

close = journal.Journal.close
def closing(self):
    signals_to_self(signal.SIGTERM, signal.SIGINT, signal.SIGTERM)
    return close(self)
journal.Journal.close = closing

emit_json = migrate.emit_json
def emitting(document):
    signals_to_self(signal.SIGTERM, signal.SIGTERM, signal.SIGINT)
    emit_json(document)
for command in (migrate, evacuate, recover):
    command.emit_json = emitting
"""

SIGNAL_EPILOGUE = r"""
if sys.argv[3] == "program":  # this process is the orchestrator program (its __main__ has its main)
    main = program.main
try:
    program.main(ARGV)
    code = 0
except SystemExit as exc:
    code = exc.code
names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored", signal.default_int_handler: "python"}
state.write_text(json.dumps({"code": code, "handlers": [names.get(signal.getsignal(s), "ours")
                                                        for s in (signal.SIGTERM, signal.SIGINT)]}))
if sys.argv[3] == "program":
    signals_to_self(signal.SIGTERM, signal.SIGINT)  # as it exits
sys.exit(code)
"""

MIGRATE_WORK = r"""
from orchestrator.flows import migration
from orchestrator.core.report import Outcome, Report

class Migration:
    def __init__(self, request, *args, **kwargs):
        self.interrupted = threading.Event()
    def interrupt(self, name):
        self.interrupted.set()
    def hung_up(self):
        pass
    def run(self):
        storming.start()
        assert self.interrupted.wait(10)
        storming.join()
        return Report("3f2a9c0d1e2f", "vm1", "src", "dst", "default", outcome=Outcome.INTERRUPTED,
                      error="SIGTERM received")
migration.Migration = Migration
ARGV = ["migrate", "vm1", "qemu+unix:///b", "-c", "qemu+unix:///a", "--journal", sys.argv[2], "--json"]
"""

EVACUATE_WORK = r"""
from orchestrator.flows import evacuation

class Evacuation:
    def __init__(self, request, **kwargs):
        self.request, self.stopped = request, threading.Event()
    def stop(self):
        self.stopped.set()
    def run(self):
        storming.start()
        assert self.stopped.wait(10)
        storming.join()
        report = evacuation.EvacuationReport("e1", self.request.source_uri, ["qemu+unix:///b"], False)
        report.interrupted, report.left = True, ["vm1"]
        return report
evacuation.Evacuation = Evacuation
ARGV = ["evacuate", "-c", "qemu+unix:///a", "--to", "qemu+unix:///b", "--journal", sys.argv[2], "--json"]
"""

RECOVER_WORK = r"""
from orchestrator.flows import recovery

class Recovery:
    def __init__(self, *args, **kwargs):
        pass
    def run(self, domain, dry_run=False):
        storming.start()
        while True:  # as long as it takes: the first signal stops it (KeyboardInterrupt)
            time.sleep(0.01)
    def close(self):
        storming.join()  # the rest of the storm lands while it unwinds
        signals_to_self(signal.SIGTERM, signal.SIGINT)
recovery.Recovery = Recovery
close(journal.Journal.open(Path(sys.argv[2])))  # the unpatched close: no signal yet
ARGV = ["recover", "--journal", sys.argv[2], "--json"]
"""


@pytest.mark.parametrize(
    ("caller", "handlers"),
    [
        ("program", ["ignored", "ignored"]),  # `orchestrator`: ignored to its exit
        ("in-process", ["default", "python"]),  # a program running the CLI: its handlers back
    ],
)
@pytest.mark.parametrize(
    ("work", "error"),
    [
        (MIGRATE_WORK, "orchestrator: error: migration of vm1 interrupted: SIGTERM received;"),
        (EVACUATE_WORK, "orchestrator: error: evacuation e1 of qemu+unix:///a: interrupted;"),
        (RECOVER_WORK, "orchestrator: error: interrupted"),
    ],
    ids=["migrate", "evacuate", "recover"],
)
def test_a_storm_of_signals_never_kills_before_the_report_and_the_journal(
    tmp_path: Path, work: str, error: str, caller: str, handlers: list[str]
) -> None:
    state = tmp_path / "state.json"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SIGNAL_PRELUDE + work + SIGNAL_EPILOGUE,
            str(state),
            str(tmp_path / "j.sqlite"),
            caller,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 130, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(error), done.stderr
    if "recover" not in work:
        assert json.loads(done.stdout)["exit_code"] == 130, "the report, whole"
    assert json.loads(state.read_text()) == {"code": 130, "handlers": handlers}


# --- the terminal hangs up (the admin's ssh session died) ------------------------------------------------

HANGUP = r"""
import contextlib, json, os, signal, sys, threading, types
from pathlib import Path

virt = types.ModuleType("orchestrator.edges.virt")
@contextlib.contextmanager
def open_hosts(*uris):
    yield object(), object()
virt.open_hosts = open_hosts
sys.modules["orchestrator.edges.virt"] = virt

from orchestrator.commands import groundwork, program
from orchestrator.flows import migration
from orchestrator.core.report import Outcome, Report
groundwork.reconcile = lambda *args, **kwargs: None
told = []

class Migration:
    def __init__(self, request, *args, **kwargs):
        self.hangup = threading.Event()
    def interrupt(self, name):
        told.append(name)
    def hung_up(self):
        told.append("SIGHUP")
        self.hangup.set()
    def run(self):
        os.kill(os.getpid(), signal.SIGHUP)
        assert self.hangup.wait(10)
        # The terminal is gone: stderr now fails every write (EPIPE), as a dead ssh session's EIO does.
        read_end, write_end = os.pipe()
        os.close(read_end)
        os.dup2(write_end, 2)
        print("a line for the terminal that is gone", file=sys.stderr, flush=True)
        return Report("3f2a9c0d1e2f", "vm1", "src", "dst", "default", outcome=Outcome.SUCCEEDED)
migration.Migration = Migration
try:
    program.main(
        ["migrate", "vm1", "qemu+unix:///b", "-c", "qemu+unix:///a", "--journal", sys.argv[1], "--json"]
    )
    code = 0
except SystemExit as exc:
    code = exc.code
Path(sys.argv[2]).write_text(json.dumps({"code": code, "told": told}))
"""


def test_a_hang_up_and_a_vanished_terminal_never_stop_a_migration(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    done = subprocess.run(
        [sys.executable, "-c", HANGUP, str(tmp_path / "j.sqlite"), str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert json.loads(state.read_text()) == {"code": 0, "told": ["SIGHUP"]}, "told, and never interrupted"
    assert json.loads(done.stdout)["outcome"] == "succeeded", "the report, whole"


# --- a signal while the main thread is inside a long call ------------------------------------------------

# Python runs a signal's handler in the main thread only, once the call it is in returns; a libvirt
# call there (the job's statistics while QEMU's monitor is busy with a device's P2P transition) took
# 1.5 s, and the abort came too late. Here the main thread blocks the signal instead, for as long as
# it takes the handler to run: the handler must run anyway, once.
BUSY_MAIN_THREAD = r"""
import json, os, signal, sys, threading
from orchestrator.commands import signals

called = threading.Event()
names = []
guard = signals.SignalGuard(lambda name: (names.append(name), called.set()))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the main thread is "in a call"
os.kill(os.getpid(), signal.SIGTERM)  # delivered to another thread then
ran = called.wait(10)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
for _ in range(1000):  # the main thread's own handler runs here, at a bytecode boundary
    pass
guard.restore()
print(json.dumps({"ran_while_busy": ran, "handled": names, "received": guard.received}))
"""


def test_a_signal_is_handled_while_the_main_thread_is_inside_a_long_call() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BUSY_MAIN_THREAD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "ran_while_busy": True,
        "handled": ["SIGTERM"],
        "received": ["SIGTERM"],
    }


FAILING_HANDLER = r"""
import json, os, signal, sys, threading
from orchestrator.commands import signals

calls = []
second = threading.Event()

def handler(name):
    calls.append(name)
    if len(calls) == 1:
        raise RuntimeError("a bug")
    second.set()

guard = signals.SignalGuard(handler)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGINT)
ran = second.wait(10)
guard.restore()
print(json.dumps({"second_ran": ran, "calls": calls}))
"""


def test_a_handler_that_fails_is_one_line_and_the_next_signal_still_counts() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FAILING_HANDLER], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"second_ran": True, "calls": ["SIGTERM", "SIGINT"]}
    assert done.stderr == "orchestrator: error: handling SIGTERM failed: RuntimeError('a bug')\n"
