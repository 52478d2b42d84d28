"""Tests of the hook runner with real tiny programs.

The hooks under test run `/bin/sh -c SCRIPT sh ARGS...`: the shell is the hook's own program here,
the runner itself never uses one.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.core.hooks import (
    Hook,
    HookResult,
    Trigger,
    check_placeholders,
    fill_argv,
    hook_values_env,
)
from orchestrator.edges import procfs
from orchestrator.edges.armed_hook import ArmedHook
from orchestrator.edges.hook_runner import HookRunner, preflight
from orchestrator.edges.supervisor import hook_path, shared
from orchestrator.edges.supervisor_process import HOOK_RUN_ENV, OUTPUT_TAIL_BYTES

VALUES = {"domain": "vm1", "device_id": "hostdev0", "state": "pre-copy-p2p-prepare"}


def sh(
    script: str,
    *args: str,
    trigger: Trigger = Trigger.DRAIN,
    timeout_ms: int = 5000,
    retries: int = 0,
    backoff_ms: int = 200,
) -> Hook:
    """A hook running a shell script (as the hook's program, in tests only)."""
    argv = ("/bin/sh", "-c", script, "sh", *args)
    return Hook(trigger, argv, timeout_ms=timeout_ms, retries=retries, backoff_ms=backoff_ms, name="sh")


def gone(pid: int) -> bool:
    """True once the process no longer exists or is a zombie (this container's init may not reap)."""
    found = procfs.proc(pid)  # None also when it vanishes while /proc is read (ESRCH)
    return found is None or found.dead


def pid_of(run: str | None, timeout: float = 5.0) -> int:
    """The process the shared supervisor started for `run`, found by its ORCH_HOOK_RUN entry."""
    assert run is not None
    tag = f"{HOOK_RUN_ENV}={shared().tag(run)}".encode()
    found: list[int] = []

    def look() -> bool:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if tag in procfs.environ(int(entry.name)).split(b"\0"):
                        proc = procfs.proc(int(entry.name))
                        if proc is not None and proc.ppid == shared().pid:  # the hook, not its children
                            found.append(int(entry.name))
                            return True
        return False

    assert wait_until(look, timeout), f"no process of run {run}"
    return found[0]


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# --- placeholders ------------------------------------------------------------------------------

FILL_CASES = [
    (["drain", "{domain}"], {"domain": "vm1"}, ["drain", "vm1"]),
    (["--dev={device_id}", "--at={state}"], VALUES, ["--dev=hostdev0", "--at=pre-copy-p2p-prepare"]),
    (["{source}->{destination}"], {"source": "a", "destination": "b"}, ["a->b"]),
    (["{{literal}}", "{{{domain}}}", "}}{{"], {"domain": "vm1"}, ["{literal}", "{vm1}", "}{"]),
    (["no placeholders", ""], {}, ["no placeholders", ""]),
    # Values are text: never run, never formatted, never expanded again.
    (["{domain}"], {"domain": "$(rm -rf /)"}, ["$(rm -rf /)"]),
    (["{domain}"], {"domain": "{device_id}"}, ["{device_id}"]),
    (["{domain}"], {"domain": "{0.__class__} `id` ; |"}, ["{0.__class__} `id` ; |"]),
    (["x{domain}y"], {"domain": "a b\nc"}, ["xa b\ncy"]),
]


@pytest.mark.parametrize(("argv", "values", "expected"), FILL_CASES)
def test_fill_argv(argv: list[str], values: dict[str, str], expected: list[str]) -> None:
    assert fill_argv(argv, values) == expected


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("{nope}", "unknown placeholder {nope}"),
        ("--x={domain.__class__}", "unknown placeholder {domain.__class__}"),
        ("{domain[0]}", "unknown placeholder {domain[0]}"),
        ("{domain!r}", "unknown placeholder {domain!r}"),
        ("{domain:>10}", "unknown placeholder {domain:>10}"),
        ("{}", "unknown placeholder {}"),
        ("{0}", "unknown placeholder {0}"),
        ("{migration_id}", "no value for placeholder {migration_id}"),
        ("{domain", "argument '{domain'"),
        ("x}", "Single '}'"),
    ],
)
def test_fill_argv_rejects(arg: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        fill_argv(["prog", arg], VALUES)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [
        (["prog", "{domain}", "{device_id}", "{{x}}"], []),
        (["prog", "{dom}", "{dom}", "{domain:x}", "{qom_path}"], ["dom", "domain:x"]),
        (["{PROGRAM}"], ["PROGRAM"]),
    ],
)
def test_check_placeholders(argv: list[str], unknown: list[str]) -> None:
    assert check_placeholders(argv) == unknown


def test_check_placeholders_unmatched_brace() -> None:
    with pytest.raises(ValueError, match="write"):
        check_placeholders(["prog", "{domain"])


def test_hook_env() -> None:
    env = hook_values_env({**VALUES, "not_a_placeholder": "x"})
    assert env["ORCH_DOMAIN"] == "vm1"
    assert env["ORCH_DEVICE_ID"] == "hostdev0"
    assert env["ORCH_STATE"] == "pre-copy-p2p-prepare"
    assert "ORCH_NOT_A_PLACEHOLDER" not in env
    # The caller's PATH first (it wins), then the orchestrator's own bin directory.
    path = hook_path().split(os.pathsep)
    assert path[: len(os.environ["PATH"].split(os.pathsep))] == os.environ["PATH"].split(os.pathsep)
    assert str(Path(sys.executable).parent) in path


# --- running -----------------------------------------------------------------------------------


def test_success_argv_env_and_output(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    values = {**VALUES, "domain": f"$(touch {pwned})"}
    hook = sh('printf "%s|%s|%s\\n" "$1" "$ORCH_DEVICE_ID" "$ORCH_DOMAIN"; echo err >&2', "{domain}")
    result = HookRunner().run(hook, values, "hostdev0")
    assert result.ok, result
    assert result.output_tail == f"$(touch {pwned})|hostdev0|$(touch {pwned})\nerr\n"
    assert not pwned.exists()
    assert (result.exit_code, result.error, result.timed_out, result.attempt) == (0, None, False, 1)
    assert result.argv[4] == f"$(touch {pwned})"
    assert result.device_id == "hostdev0"
    assert result.label == "sh"
    assert result.trigger is Trigger.DRAIN
    assert result.pid is not None
    assert result.started <= result.ended
    assert 0 < result.duration_ms < 5000


@pytest.mark.parametrize(
    ("script", "exit_code", "error"),
    [
        ("echo oops >&2; exit 3", 3, "exited with status 3"),
        ("kill -9 $$", None, "killed by signal 9"),
    ],
)
def test_failure(script: str, exit_code: int | None, error: str) -> None:
    result = HookRunner().run(sh(script), VALUES)
    assert not result.ok
    assert (result.exit_code, result.error, result.timed_out) == (exit_code, error, False)
    if exit_code:
        assert result.output_tail == "oops\n"


@pytest.mark.parametrize(
    ("program", "error"),
    [
        ("/nonexistent/prog", "program not found: /nonexistent/prog"),
        ("no-such-program-on-path-xyz", "program not found: no-such-program-on-path-xyz"),
    ],
)
def test_missing_program_never_raises(program: str, error: str) -> None:
    calls: list[HookResult] = []
    running = HookRunner().start(Hook(Trigger.DRAIN, (program, "{domain}")), VALUES, "hostdev0", calls.append)
    result = running.wait()
    assert (result.error, result.exit_code, result.pid, result.ok) == (error, None, None, False)
    assert calls == [result]
    assert result.to_json()["error"] == error


def test_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    result = HookRunner().run(Hook(Trigger.DRAIN, (str(script),)), VALUES)
    assert result.error == f"program not executable: {script}"


def test_bad_placeholder_is_a_failed_result() -> None:
    result = HookRunner().run(Hook(Trigger.DRAIN, ("/bin/true", "{nope}")), VALUES)
    assert result.error is not None
    assert result.error.startswith("bad argv:")
    assert "{nope}" in result.error
    assert result.pid is None


def test_output_tail_is_bounded() -> None:
    result = HookRunner().run(
        sh('i=0; while [ $i -lt 2000 ]; do echo "line $i"; i=$((i+1)); done; echo END'), VALUES
    )
    assert result.ok
    assert len(result.output_tail) <= OUTPUT_TAIL_BYTES
    assert result.output_tail.endswith("line 1999\nEND\n")


def test_output_is_decoded_with_replacement() -> None:
    result = HookRunner().run(sh("printf 'a\\377b'"), VALUES)
    assert result.output_tail == "a\ufffdb"


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    hook = sh('sleep 30 & echo $! > "$1"; echo started; wait', str(child_pid), timeout_ms=300)
    result = HookRunner().run(hook, VALUES)
    assert result.timed_out
    assert result.error == "timed out after 300 ms"
    assert result.exit_code is None
    assert not result.ok
    assert result.output_tail == "started\n"
    assert result.duration_ms >= 300, "the supervisor's own record: not before its deadline"
    pid = int(child_pid.read_text())
    assert wait_until(lambda: gone(pid)), f"child {pid} of the timed-out hook survived"


def test_timeout_escalates_to_sigkill(tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    # Both the shell and its child ignore SIGTERM (an ignored signal survives exec).
    hook = sh('trap "" TERM; sleep 30 & echo $! > "$1"; wait', str(child_pid), timeout_ms=200)
    result = HookRunner().run(hook, VALUES)
    assert result.timed_out
    assert result.duration_ms >= 200 + 200  # the deadline, then the grace before SIGKILL
    pid = int(child_pid.read_text())
    assert wait_until(lambda: gone(pid))


@pytest.mark.parametrize(
    "background",
    ["sleep 2", "yes"],  # quiet, and writing as fast as it can
)
def test_exit_is_noticed_though_a_grandchild_holds_the_output(tmp_path: Path, background: str) -> None:
    child_pid = tmp_path / "child.pid"
    hook = sh(f'{background} & echo $! > "$1"; echo bye', str(child_pid), timeout_ms=5000)
    try:
        result = HookRunner().run(hook, VALUES)
    finally:  # `yes` may be gone already: SIGPIPE once the pipe closed, then reaped (we are its reaper)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child_pid.read_text()), signal.SIGKILL)
    assert result.ok, result
    assert set(result.output_tail.splitlines()) <= {"bye", "y", ""}
    assert not result.timed_out, "its own exit ended it, not the deadline (5 s)"


def test_start_returns_at_once_and_on_done_is_called_once(tmp_path: Path) -> None:
    release = tmp_path / "release"
    calls: list[HookResult] = []
    called = threading.Event()

    def on_done(result: HookResult) -> None:
        calls.append(result)
        called.set()

    hook = sh('while [ ! -e "$1" ]; do sleep 0.01; done', str(release), timeout_ms=30000)
    running = HookRunner().start(hook, VALUES, "hostdev0", on_done)
    assert not running.done.is_set()
    pending = running.result
    assert pending is None
    assert not gone(pid_of(running.run))
    release.touch()
    result = running.wait()
    assert running.done.is_set()
    assert called.is_set()
    assert calls == [result]
    assert running.result is result
    assert result.ok


def test_parallel_hooks_overlap(tmp_path: Path) -> None:
    # Each hook records when it started and ended; their intervals must overlap.
    script = 'date +%s.%N > "$1"; sleep 0.3; date +%s.%N >> "$1"'
    stamps = [tmp_path / "a", tmp_path / "b"]
    hooks = [(sh(script, str(path)), VALUES, f"nic{n}") for n, path in enumerate(stamps)]
    results = HookRunner().run_parallel(hooks)
    assert [r.ok for r in results] == [True, True]
    assert [r.device_id for r in results] == ["nic0", "nic1"]
    (a_start, a_end), (b_start, b_end) = ([float(t) for t in path.read_text().split()] for path in stamps)
    assert a_start < b_end
    assert b_start < a_end


def test_retries_with_backoff(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    # Fails on its first two runs, succeeds on the third; logs when each run started.
    script = 'date +%s.%N >> "$1"; [ "$(wc -l < "$1")" -ge 3 ]'
    hook = sh(script, str(log), trigger=Trigger.BEFORE, retries=3, backoff_ms=100)
    result = HookRunner().run(hook, VALUES)
    assert result.ok
    assert result.attempt == 3
    starts = [float(line) for line in log.read_text().split()]
    assert len(starts) == 3
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.1  # backoff_ms
    assert gaps[1] >= 0.2  # doubled


def test_retries_exhausted_return_the_last_failure() -> None:
    hook = sh("exit 4", trigger=Trigger.AFTER_FAILURE, retries=2, backoff_ms=10)
    result = HookRunner().run(hook, VALUES)
    assert (result.ok, result.attempt, result.error) == (False, 3, "exited with status 4")


def test_drain_hooks_are_not_retried(tmp_path: Path) -> None:
    log = tmp_path / "attempts"
    hook = sh('echo x >> "$1"; exit 1', str(log), trigger=Trigger.DRAIN, retries=3, backoff_ms=10)
    result = HookRunner().run(hook, VALUES)
    assert (result.ok, result.attempt) == (False, 1)
    assert log.read_text() == "x\n"


def test_result_to_json() -> None:
    record = HookRunner().run(sh("exit 0"), VALUES, "hostdev0").to_json()
    assert set(record) == {
        "label",
        "trigger",
        "device_id",
        "argv",
        "attempt",
        "started",
        "start_monotonic",
        "pid",
        "ended",
        "duration_ms",
        "exit_code",
        "timed_out",
        "error",
        "output_tail",
        "run",
        "arming",
        "ok",
    }
    assert record["trigger"] == "drain"
    assert record["ok"] is True


# --- preflight ---------------------------------------------------------------------------------


def test_preflight(tmp_path: Path) -> None:
    not_executable = tmp_path / "plain"
    not_executable.write_text("")
    hooks = [
        Hook(Trigger.DRAIN, ("/bin/sh", "-c", "true", "{domain}")),
        Hook(Trigger.DRAIN, ("sh", "{device_id}")),
        Hook(Trigger.DRAIN, (sys.executable, "-c", "pass")),
        Hook(Trigger.DRAIN, ("/nonexistent/drain", "{domain}")),
        Hook(Trigger.UNDRAIN, (str(not_executable),)),
        Hook(Trigger.BEFORE, ("no-such-program-xyz",)),
        Hook(Trigger.BEFORE, (), name="empty"),
        Hook(Trigger.AFTER_SUCCESS, ("/bin/true", "{domian}", "{bad")),
        Hook(Trigger.AFTER_FAILURE, ("/bin/true", "{domian}", "{qom}")),
    ]
    assert preflight(hooks) == [
        "drain hook drain: program not found: /nonexistent/drain",
        f"undrain hook plain: program not executable: {not_executable}",
        "before hook no-such-program-xyz: program not found on PATH: no-such-program-xyz",
        "before hook empty: empty argv",
        "after-success hook true: argument '{bad': expected '}' before end of string"
        " (write {{ or }} for a literal brace)",
        "after-failure hook true: unknown placeholder {domian}",
        "after-failure hook true: unknown placeholder {qom}",
    ]


def test_a_hook_gets_no_descriptor_of_ours(tmp_path: Path) -> None:
    # Even one opened without close-on-exec (a library's careless descriptor): Popen's close_fds.
    careless = os.open(tmp_path / "careless", os.O_WRONLY | os.O_CREAT)
    os.set_inheritable(careless, True)
    read_end, write_end = os.pipe()
    try:
        hook = sh("ls /proc/self/fd", trigger=Trigger.DRAIN)
        result = HookRunner().start(hook, VALUES).wait()
    finally:
        for fd in (careless, read_end, write_end):
            os.close(fd)
    assert result.ok, result
    # 0, 1, 2, and the descriptor ls opens to list the directory.
    assert sorted(int(fd) for fd in result.output_tail.split()) == [0, 1, 2, 3]


def test_a_hook_runs_in_a_session_of_its_own() -> None:
    result = HookRunner().start(sh('[ "$(ps -o sid= -p $$)" -eq $$ ]'), VALUES).wait()
    assert result.ok, result.error


# --- armed hooks ------------------------------------------------------------------------------------

# A tiny armed hook speaking the protocol (README "Armed hooks"), in Python for the test.
ARMED = r"""
import sys, time
mode = sys.argv[1]
if mode == "die-at-once":
    sys.exit(3)
if mode == "never-ready":
    time.sleep(30)
print("ready", flush=True)
for line in sys.stdin:
    action, device, state, when = line.split()
    print("acting", action, device, state, when, flush=True)  # no braces: argv has placeholders
    if mode == "slow":
        time.sleep(5)
    if mode == "die-on-event":
        sys.exit(4)
    print(("fail " + device + " no peer answered") if mode == "fail" else ("ok " + device), flush=True)
"""


def armed(mode: str, timeout_ms: int = 2000) -> ArmedHook:
    return HookRunner().arm(
        Hook(Trigger.DRAIN, (sys.executable, "-c", ARMED, mode), timeout_ms=timeout_ms), VALUES
    )


def fire(hook: ArmedHook, device: str = "nic0") -> HookResult:
    done = threading.Event()
    results: list[HookResult] = []

    def on_done(result: HookResult) -> None:
        results.append(result)
        done.set()

    hook.fire(device, "pre-copy-p2p-prepare", 1700000000.5, on_done)
    assert done.wait(10)
    return results[0]


def test_an_armed_hook_acts_per_line_and_exits_when_stdin_closes() -> None:
    hook = armed("ok")
    ready = hook.wait_ready()
    assert ready.ok, ready
    first, second = fire(hook, "nic0"), fire(hook, "nic1")
    assert first.ok and second.ok and first.device_id == "nic0" and second.device_id == "nic1"
    assert not first.timed_out
    assert hook.close() is None, "a clean exit leaves no result"


def test_an_armed_hook_answering_fail_fails_the_action() -> None:
    hook = armed("fail")
    hook.wait_ready()
    result = fire(hook)
    assert not result.ok and result.error == "answered fail: no peer answered"
    hook.close()


def test_an_armed_hook_that_dies_fails_its_action_and_every_later_one() -> None:
    hook = armed("die-on-event")
    hook.wait_ready()
    result = fire(hook)
    assert not result.ok and "exited with status 4" in (result.error or "")
    later = fire(hook, "nic1")
    assert not later.ok and "cannot act" in (later.error or "")
    closed = hook.close()
    assert closed is not None and closed.exit_code == 4


def test_an_armed_hook_that_is_late_is_killed_with_its_group() -> None:
    hook = armed("slow", timeout_ms=300)
    hook.wait_ready()
    pid = pid_of(hook.run)
    result = fire(hook)
    assert result.timed_out and "timed out after 300 ms" in (result.error or "")
    assert wait_until(lambda: gone(pid))
    hook.close()


@pytest.mark.parametrize(
    ("mode", "why"), [("die-at-once", "exited with status 3"), ("never-ready", "not ready")]
)
def test_an_armed_hook_that_does_not_arm_is_a_failure_before_anything(mode: str, why: str) -> None:
    hook = armed(mode)
    result = hook.wait_ready(timeout_s=1.0)
    assert not result.ok and why in (result.error or "")
    assert not fire(hook).ok
    hook.close()


def test_an_armed_hook_told_after_its_close_writes_nothing_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = armed("ok")
    assert hook.wait_ready().ok
    number = hook._stdin_fd
    assert number >= 0
    assert hook.close() is None
    # Its stdin's number is free again (a file opened now may get it): no write may go to it.
    written: list[int] = []
    real_write = os.write
    me = threading.get_ident()

    def write(fd: int, data: bytes) -> int:
        if threading.get_ident() == me:
            written.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    late = fire(hook, "nic1")
    assert number not in written
    assert not late.ok and late.error == "the armed hook cannot act: its migration has ended"


# An armed hook that leaves a process holding its stdout open when it exits.
LEAVES_STDOUT_OPEN = r"""
import subprocess, sys
left = subprocess.Popen(["sleep", "30"])  # inherits stdout
print("ready", left.pid, flush=True)
print("ready", flush=True)
sys.stdin.read()
"""


def test_an_armed_hook_whose_output_outlives_it_is_followed_without_spinning() -> None:
    hook = HookRunner().arm(Hook(Trigger.DRAIN, (sys.executable, "-c", LEAVES_STDOUT_OPEN)), VALUES)
    assert hook.wait_ready().ok
    left = int(hook._tail.decode().split()[1])
    try:
        assert hook.close() is None
        # The reader still follows the output (the leftover holds it open), with no deadline to
        # watch: it must block, not wake again and again on the wakeup pipe closed by close().
        before = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - before < 0.25, "a thread spun after the armed hook closed"
    finally:
        os.kill(left, signal.SIGKILL)


def test_an_armed_hook_that_cannot_start() -> None:
    hook = HookRunner().arm(Hook(Trigger.DRAIN, ("/no/such/armed-hook",)), VALUES)
    assert "program not found" in (hook.wait_ready().error or "")
    assert not fire(hook).ok and hook.close() is None


# --- a killed hook's whole tree -----------------------------------------------------------------------

# Leaves two processes outside the hook's process group, their PIDs in "$1" and "$2": a `setsid`
# grandchild that keeps the output pipe open, and a double-forked daemon (re-parented to us at once)
# that ignores SIGTERM.
SPAWN_TREE = r"""
setsid sleep 100 & echo $! > "$1"
(trap "" TERM; setsid sh -c 'echo $$ > "$0"; exec sleep 100' "$2" </dev/null >/dev/null 2>&1 &)
while [ ! -s "$2" ]; do sleep 0.01; done
"""
PR_GET_CHILD_SUBREAPER = 37


def pid_files(directory: Path) -> list[str]:
    directory.mkdir(exist_ok=True)
    return [str(directory / "setsid.pid"), str(directory / "daemon.pid")]


def pids_in(directory: Path) -> list[int]:
    pids = [int(Path(name).read_text()) for name in pid_files(directory)]
    assert len(set(pids)) == 2
    return pids


def left_behind(pid: int) -> bool:
    """Alive, or a zombie of ours: what a killed hook must not leave (init's zombies are init's)."""
    found = procfs.proc(pid)  # None also when it vanishes while /proc is read (ESRCH)
    return found is not None and (not found.dead or found.ppid == os.getpid())


def bury(pids: list[int]) -> None:
    """Kill what a test left running on purpose, and reap it if it became our child."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def subreaper_flag() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(-1)
    assert libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
    return flag.value


def test_a_timed_out_hooks_whole_tree_dies_setsid_and_daemons_included(tmp_path: Path) -> None:
    hook = sh(SPAWN_TREE + "echo started; sleep 30", *pid_files(tmp_path), timeout_ms=1000)
    result = HookRunner().run(hook, VALUES)
    assert result.timed_out and result.output_tail == "started\n", "ended, though a grandchild holds its pipe"
    survivors = [pid for pid in pids_in(tmp_path) if left_behind(pid)]
    assert survivors == [], "killed and reaped before the result is final"


def test_a_killed_tree_spares_other_hooks_and_what_a_successful_hook_left(tmp_path: Path) -> None:
    killed_dir, running_dir, finished_dir = tmp_path / "killed", tmp_path / "running", tmp_path / "done"
    runner = HookRunner()
    killed = runner.start(sh(SPAWN_TREE + "sleep 30", *pid_files(killed_dir), timeout_ms=800), VALUES)
    running = runner.start(sh(SPAWN_TREE + "sleep 2", *pid_files(running_dir), timeout_ms=10000), VALUES)
    # Exits 0 at once, leaving a setsid grandchild and a daemon: a hook may daemonise something.
    finished = runner.start(sh(SPAWN_TREE + "echo done", *pid_files(finished_dir)), VALUES).wait()
    spared: list[int] = []
    try:
        assert finished.ok, finished
        spared = pids_in(finished_dir)
        assert killed.wait().timed_out
        assert [pid for pid in pids_in(killed_dir) if left_behind(pid)] == []
        spared += pids_in(running_dir)
        assert running.result is None and not gone(pid_of(running.run))
        assert [pid for pid in spared if gone(pid)] == [], "another hook's tree, or a finished one's"
        assert running.wait().ok
        assert [pid for pid in spared if gone(pid)] == []
    finally:
        bury(spared)


@pytest.mark.parametrize(
    ("mode", "script"),
    [
        ("late", "echo ready; read line; sleep 30"),  # answers no event: killed at its deadline
        ("deaf", 'echo ready; trap "" TERM; while :; do sleep 0.05; done'),  # ignores its stdin's end
    ],
)
def test_an_armed_hook_that_is_killed_takes_its_whole_tree(tmp_path: Path, mode: str, script: str) -> None:
    argv = ("/bin/sh", "-c", SPAWN_TREE + script, "sh", *pid_files(tmp_path))
    hook = HookRunner().arm(Hook(Trigger.DRAIN, argv, timeout_ms=300), VALUES)
    assert hook.wait_ready().ok
    pids = pids_in(tmp_path)
    if mode == "late":
        assert fire(hook).timed_out
        assert wait_until(lambda: not any(left_behind(pid) for pid in pids))
        hook.close()
    else:
        closed = hook.close()
        assert closed is not None and closed.error == f"armed hook killed by signal {signal.SIGKILL.value}"
        assert [pid for pid in pids if left_behind(pid)] == []
