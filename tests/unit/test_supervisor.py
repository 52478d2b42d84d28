"""The hook supervisor with real processes: what it records, what it reaps, and what it does when the
orchestrator dies (a child process plays the orchestrator and SIGKILLs itself)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.core.hooks import Hook, HookResult, Trigger
from orchestrator.edges import procfs, runlog
from orchestrator.edges.hook_runner import HookRunner
from orchestrator.edges.supervisor import Supervisor, hook_path
from orchestrator.edges.supervisor_process import HOOK_RUN_ENV


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    """A supervisor of the test's own (not the shared one)."""
    started = Supervisor.start({**os.environ, "PATH": hook_path()})
    yield started
    started.close(timeout=10)


def sh(script: str, *args: str, trigger: Trigger = Trigger.DRAIN, timeout_ms: int = 5000) -> Hook:
    return Hook(trigger, ("/bin/sh", "-c", script, "sh", *args), timeout_ms=timeout_ms, name="sh")


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    """Until the process (not our child) has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_hooks_get_a_tag_of_their_run_and_the_supervisor_reaps_what_they_left(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    runner = HookRunner(supervisor)
    tags = [runner.run(sh('echo "$ORCH_HOOK_RUN"'), {}).output_tail.strip() for _ in range(2)]
    assert tags[0] != tags[1] and all(tag.startswith(f"{supervisor.pid}.") for tag in tags), tags
    flag = ctypes.c_int(-1)
    assert ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 0, "the orchestrator itself is no subreaper (libvirt's ssh, a lab's QEMUs)"
    # A hook that starts a daemon and ends; a later one stops it and waits for its PID to vanish, as
    # start-stop-daemon does: the daemon, the supervisor's child now, is reaped as it exits.
    pidfile = tmp_path / "daemon.pid"
    daemonise = '(setsid sh -c \'echo $$ > "$0"; exec sleep 100\' "$1" </dev/null >/dev/null 2>&1 &)'
    started = runner.run(sh(f'{daemonise}; while [ ! -s "$1" ]; do sleep 0.01; done', str(pidfile)), {})
    assert started.ok, started
    daemon = int(pidfile.read_text())
    found = procfs.proc(daemon)
    assert found is not None and found.ppid == supervisor.pid, "re-parented to the supervisor"
    stop = 'kill $(cat "$1"); while kill -0 $(cat "$1") 2>/dev/null; do sleep 0.01; done'
    stopped = runner.run(sh(stop, str(pidfile), timeout_ms=10000), {})
    assert stopped.ok, stopped
    assert procfs.proc(daemon) is None, "reaped, not a zombie"


def test_each_hooks_start_and_end_are_in_the_run_log_written_by_the_supervisor(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    log = runlog.RunLog.create(tmp_path / "runs", "m1")
    log.write({"k": "begin", "id": "m1"}, vital=True)
    runner = HookRunner(supervisor)
    runner.attach("m1", log.fd)
    ok = runner.start(sh("echo hi"), {"domain": "vm1"}, "nic0", index=0).wait()
    failed = runner.start(sh("exit 3"), {}, "nic1", index=1).wait()
    missing = runner.start(Hook(Trigger.UNDRAIN, ("/no/such/hook",)), {}, "nic0", index=0).wait()
    runner.detach()
    records = runlog.read(log.path)
    assert [r["k"] for r in records] == ["begin", *["hook-start", "hook-end"] * 3]
    start, end = records[1], records[2]
    assert (start["run"], start["device_id"], start["hook"], start["trigger"]) == (ok.run, "nic0", 0, "drain")
    assert start["pid"] == ok.pid and start["tag"] == f"{HOOK_RUN_ENV}={supervisor.tag(str(ok.run))}"
    assert (end["exit_code"], end["error"], end["output_tail"]) == (0, None, "hi\n")
    assert records[4]["error"] == "exited with status 3" and failed.error == records[4]["error"]
    assert records[5]["pid"] is None and "program not found" in records[6]["error"] == missing.error
    log.close()


# The orchestrator's part, in a process of its own that SIGKILLs itself with a hook still running.
ORCHESTRATOR = textwrap.dedent(
    r"""
    import json, os, signal, sys, threading
    from pathlib import Path
    from orchestrator.edges import runlog
    from orchestrator.core.hooks import Hook, Trigger
    from orchestrator.edges.hook_runner import HookRunner
    from orchestrator.edges.supervisor import Supervisor

    runs, mode, release = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    supervisor = Supervisor.start(dict(os.environ))
    log = runlog.RunLog.create(runs, "m1")
    runner = HookRunner(supervisor)
    runner.attach("m1", log.fd)
    if mode == "spawned":
        runner.start(Hook(Trigger.DRAIN, ("/bin/sh", "-c", 'while [ ! -e "$1" ]; do sleep 0.01; done', "sh",
                                          str(release)), timeout_ms=60000), {}, "nic0", index=0)
    else:  # an armed hook that ignores the end of its stdin: killed at its timeout
        script = 'echo ready; trap "" TERM; while :; do sleep 0.05; done'
        armed = runner.arm(Hook(Trigger.DRAIN, ("/bin/sh", "-c", script), timeout_ms=500, armed=True), {})
        assert armed.wait_ready().ok
    print(json.dumps({"supervisor": supervisor.pid}), flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("mode", ["spawned", "armed"])
def test_an_orchestrator_killed_mid_hook_leaves_the_hooks_end_recorded(tmp_path: Path, mode: str) -> None:
    release = tmp_path / "release"
    orchestrator = subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, str(tmp_path / "runs"), mode, str(release)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert orchestrator.stdout is not None and orchestrator.stdin is not None
    supervisor = json.loads(orchestrator.stdout.readline())["supervisor"]
    orchestrator.stdin.write("die\n")
    orchestrator.stdin.flush()
    assert orchestrator.wait(30) == -signal.SIGKILL
    records = runlog.read(tmp_path / "runs" / "m1.log")
    assert "hook-end" not in [r["k"] for r in records], "the hook still runs: its end is not written yet"
    release.touch()  # the spawned hook may end now (the armed one is killed at its timeout)
    assert wait_gone(supervisor), "the supervisor exits once its hooks have ended"
    records = runlog.read(tmp_path / "runs" / "m1.log")
    assert [r["k"] for r in records] == ["hook-start", "hook-end", "supervised"], records
    end = records[1]
    if mode == "spawned":
        assert (end["exit_code"], end["error"]) == (0, None), end
    else:
        assert end["timed_out"] and "timed out" in end["error"], end


def test_the_supervisor_ignores_the_terminal_and_holds_nothing_of_ours(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()  # open before the fork: the supervisor must not keep a copy
    supervisor = Supervisor.start({**os.environ, "PATH": hook_path()})
    try:
        assert HookRunner(supervisor).run(sh("true"), {}).ok  # it is up (past closing what is ours)
        inode = os.fstat(write_end).st_ino
        fds = Path(f"/proc/{supervisor.pid}/fd")
        theirs = {(fds / fd).stat().st_ino for fd in os.listdir(fds)}
        assert inode not in theirs
        assert os.getsid(supervisor.pid) == supervisor.pid, "a session of its own: no terminal"
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            os.kill(supervisor.pid, sig)
        assert HookRunner(supervisor).run(sh("true"), {}).ok, "still there after SIGINT, SIGHUP, SIGTERM"
    finally:
        os.close(read_end)
        os.close(write_end)
        supervisor.close(timeout=10)
    assert procfs.proc(supervisor.pid) is None, "gone once the orchestrator let it go"


def test_a_supervisor_that_dies_fails_the_running_hooks_and_every_later_one(tmp_path: Path) -> None:
    supervisor = Supervisor.start({**os.environ, "PATH": hook_path()})
    runner = HookRunner(supervisor)
    ended = threading.Event()
    results: list[HookResult] = []
    running = runner.start(sh("sleep 30"), {}, on_done=lambda r: (results.append(r), ended.set()))
    os.kill(supervisor.pid, signal.SIGKILL)
    assert ended.wait(30)
    assert results == [running.wait()] and results[0].error == "the hook supervisor died while it ran"
    later = runner.run(sh("true"), {})
    assert not later.ok and later.error is not None and "not started" in later.error
    with contextlib.suppress(ChildProcessError):
        os.waitpid(supervisor.pid, 0)
