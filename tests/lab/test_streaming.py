"""A migration is told on stderr as it happens, in a pipe (journald, Ansible, `| tee`) and on a
terminal (a pty): lines arrive while it runs, not all at the end, and stdout keeps the result."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lab.runner import Scenario


def command(sc: Scenario) -> list[str]:
    return [
        sys.executable,
        "-m",
        "orchestrator",
        "migrate",
        sc.name,
        sc.lab.hosts[sc.dst].uri,
        "-c",
        sc.lab.hosts[sc.src].uri,
        "--policy",
        str(sc.policy),
        "--journal",
        str(sc.journal),
        "--json",
    ]


def test_in_a_pipe_lines_arrive_as_the_migration_goes(lab_env: Any, tmp_path: Path) -> None:
    # A 1.5 s transition keeps the migration going long enough to see lines arrive during it.
    sc = Scenario(lab_env, tmp_path, transition_ms=1500)
    proc = subprocess.Popen(command(sc), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrivals: list[str] = []
    undrained_when_told: list[bool] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            arrivals.append(line.rstrip("\n"))
            if "-> pre-copy-p2p-prepare" in line and not undrained_when_told:
                # The undrain comes once the destination runs, after the 1.5 s transition: a line that
                # arrives before it was written as it happened, not held back to the end.
                undrained_when_told.append(bool(sc.calls("undrain")))

    reader = threading.Thread(target=read)
    reader.start()
    # Not communicate(): it would read stderr too, and take lines the reader must see.
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait(timeout=120)
    reader.join(10)
    assert proc.returncode == 0, arrivals
    assert json.loads(out)["outcome"] == "succeeded", "stdout keeps the one JSON document"

    def first(text: str) -> int:
        return next(i for i, line in enumerate(arrivals) if text in line)

    assert first("plan: ") < first("phase job-running") < first("-> pre-copy-p2p-prepare")
    assert first("-> pre-copy-p2p-prepare") < first("drain nic0: record-hook"), "each hook with its result"
    assert undrained_when_told == [False], "told during the transition, not at the end"
    assert all("\r" not in line for line in arrivals), "no progress bar redrawn in a pipe"
    sc.remove()


def test_on_a_terminal_the_progress_is_redrawn_in_place(lab_env: Any, tmp_path: Path) -> None:
    sc = Scenario(lab_env, tmp_path, transition_ms=1500)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(command(sc), stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    seen = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal's other end closed: the process is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen.decode(errors="replace")
    assert json.loads(out)["outcome"] == "succeeded"
    text = seen.decode(errors="replace")
    assert "\r[" in text and "%" in text, "a progress bar redrawn in place"
    assert "phase job-running" in text and "drain nic0" in text, "the story's lines, above the bar"
    assert text.rstrip().endswith(("\x1b[K", "\r")) or "\r\x1b[K" in text, "the bar is cleared at the end"
    sc.remove()
