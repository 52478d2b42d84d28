"""orchestrator-rdma-hook, both forms, against a stand-in peer control socket (no lab needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.lab.rdma_hook import control_path

HOOK = [sys.executable, "-m", "orchestrator.lab.rdma_hook"]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A peer control socket for vm1/nic0 that acknowledges and records every command."""
    path = Path(control_path(str(tmp_path), "vm1", "nic0"))
    path.parent.mkdir(parents=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    commands: list[str] = []

    def serve() -> None:
        while True:
            data, addr = sock.recvfrom(256)
            if data == b"stop":
                return
            commands.append(data.decode())
            sock.sendto(b"ok " + data, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield tmp_path, commands
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"stop", str(path))
    thread.join(5)
    sock.close()


def test_serve_answers_each_line_and_exits_when_stdin_closes(peer: tuple[Path, list[str]]) -> None:
    fabric, commands = peer
    proc = subprocess.run(
        [*HOOK, "serve", "--domain", "vm1"],
        input="drain nic0 pre-copy-p2p-prepare 1700000000.5\nundrain nic0 running -\ndrain nic9 gate -\n",
        capture_output=True,
        text=True,
        env={**os.environ, "ORCH_RDMA_FABRIC": str(fabric)},
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["ready", "ok nic0", "ok nic0"]
    assert lines[3].startswith("fail nic9 no RDMA peer answered")
    assert commands == ["disarm", "arm"]


def test_one_shot_form_still_works(peer: tuple[Path, list[str]]) -> None:
    fabric, commands = peer
    env = {**os.environ, "ORCH_RDMA_FABRIC": str(fabric)}
    run = subprocess.run(
        [*HOOK, "drain", "--domain", "vm1", "--device", "nic0"], env=env, timeout=30, check=False
    )
    assert run.returncode == 0 and commands == ["disarm"]


@pytest.mark.parametrize(
    "args", [[], ["serve"], ["serve", "--domain", "vm1", "--device", "nic0"], ["drain", "--domain", "vm1"]]
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    run = subprocess.run([*HOOK, *args], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 2 and run.stderr.startswith("usage:")
