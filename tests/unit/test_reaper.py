"""The lab hosts' reaper (orchestrator/lab/reaper.py): orphans below it are reaped at once, its command's
exit status and signals pass through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's"
)


def reaper(*command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.lab.reaper", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie nobody reaped yet), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_an_orphan_below_it_is_reaped_while_the_command_still_runs() -> None:
    # The subshell starts `sleep 0.05` and exits at once: the sleep is an orphan from then on, as a
    # QEMU that libvirtd daemonised is. The command itself runs on for 3 s.
    proc = reaper("sh", "-c", "(sleep 0.05 & echo $!); exec sleep 3")
    try:
        assert proc.stdout is not None
        orphan = int(proc.stdout.readline())
        deadline = time.monotonic() + 0.5  # this sandbox's init reaps only every ~2 s
        while state(orphan) is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling /proc: a process of another parent gives no event to wait on
        assert state(orphan) is None, f"the orphan is still there ({state(orphan)}): nobody reaped it"
        assert proc.poll() is None, "the command still runs"
    finally:
        proc.kill()
        proc.wait()


def test_the_commands_exit_status_is_the_reapers() -> None:
    proc = reaper("sh", "-c", "exit 7")
    assert proc.wait(timeout=30) == 7


def test_sigterm_is_passed_to_the_command() -> None:
    proc = reaper("sh", "-c", "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "got TERM" in out
    assert proc.returncode == 3


def test_a_missing_command_is_exit_127_with_one_line() -> None:
    proc = reaper("/nonexistent/command")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 127
    assert err.strip().splitlines() == [
        "orchestrator.lab.reaper: cannot run /nonexistent/command: No such file or directory"
    ]
