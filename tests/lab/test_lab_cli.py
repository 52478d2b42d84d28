"""The `orchestrator lab` command line on the real lab, as a user runs it: exit codes, JSON output,
and one line on stderr (never a traceback) for every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.errors import ExitCode
from orchestrator.lab import hosts as lab

LAB_HOSTS = ["lab-a", "lab-b", "lab-c"]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)

    def one_line_error(self, code: ExitCode) -> str:
        """The error line, after checking it is the only output and the exit code is `code`."""
        assert self.code == code, (self.code, self.out, self.err)
        assert self.out == ""
        assert "Traceback" not in self.err
        assert self.err.count("\n") == 1, self.err
        assert self.err.startswith("orchestrator: error: "), self.err
        return self.err.removeprefix("orchestrator: error: ").rstrip("\n")


def orchestrator(*args: str | Path) -> Result:
    """Run the CLI as a user would: a new process, the environment without debugging switches."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORCH_DEBUG", "ORCH_LAB_DIR")}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {shown}")
    return found


def unique_name() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def guest_name(lab_env: Any) -> Iterator[str]:
    """A guest name nobody uses yet; whatever the test made under it is removed afterwards."""
    name = unique_name()
    yield name
    lab_env.remove(name)


def test_status_json_lists_the_hosts_with_their_pids(lab_env: Any) -> None:
    status = orchestrator("lab", "status", "--json", "--lab-dir", lab_env.root).json()
    assert [h["name"] for h in status] == LAB_HOSTS
    for host, shown in zip(lab_env.hosts, status, strict=True):
        assert shown["running"] is True
        assert shown["uri"] == host.uri
        assert shown["libvirtd_pid"] == host.pid("libvirtd")
        assert isinstance(shown["libvirtd_pid"], int)
        assert isinstance(shown["guests"], list)


def test_status_table(lab_env: Any) -> None:
    result = orchestrator("lab", "status", "--lab-dir", lab_env.root)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["HOST", "STATE", "PID", "GUESTS", "URI"]
    assert [line.split()[:3] for line in lines[1:]] == [
        [h.name, "up", str(h.pid("libvirtd"))] for h in lab_env.hosts
    ]


def test_up_again_is_harmless(lab_env: Any) -> None:
    pids = [h.pid("libvirtd") for h in lab_env.hosts]
    result = orchestrator("lab", "up", "--hosts", "3", "--lab-dir", lab_env.root)
    assert result.code == 0, result.err
    assert [line.split()[0] for line in result.out.splitlines()] == ["HOST", *LAB_HOSTS]
    again = orchestrator("lab", "up", "--hosts", "3", "--json", "--lab-dir", lab_env.root).json()
    assert again == [{"name": h.name, "uri": h.uri, "running": True} for h in lab_env.hosts]
    assert [h.pid("libvirtd") for h in lab_env.hosts] == pids, "the daemons were left alone"
    assert all(conn.is_alive() for conn in lab_env.conns), "existing connections survive"


def test_guest_runs_where_asked(lab_env: Any, guest_name: str) -> None:
    made = orchestrator(
        "lab", "guest", guest_name, "--host", "lab-b", "--devices", "2", "--json", "--lab-dir", lab_env.root
    ).json()
    assert made == {
        "name": guest_name,
        "host": "lab-b",
        "uri": lab_env.hosts[1].uri,
        "devices": ["nic0", "nic1"],
    }
    assert lab_env.conn(1).domain(guest_name).state() == "running"
    assert lab_env.conn(0).find_domain(guest_name) is None
    assert lab_env.conn(2).find_domain(guest_name) is None
    status = orchestrator("lab", "status", "--json", "--lab-dir", lab_env.root).json()
    guests = {h["name"]: [g for g in h["guests"] if g["name"] == guest_name] for h in status}
    assert guests == {
        "lab-a": [],
        "lab-b": [{"name": guest_name, "state": "running", "persistent": True}],
        "lab-c": [],
    }

    # The same name again: refused in one line, and the running guest is left alone.
    again = orchestrator("lab", "guest", guest_name, "--host", "lab-b", "--lab-dir", lab_env.root)
    line = again.one_line_error(ExitCode.BAD_INPUT)
    assert f"{guest_name!r} already exists on lab-b" in line
    assert lab_env.conn(1).domain(guest_name).state() == "running"


def test_guest_name_in_use_on_another_host_is_refused(lab_env: Any, guest_name: str) -> None:
    assert orchestrator("lab", "guest", guest_name, "--host", "lab-a", "--lab-dir", lab_env.root).code == 0
    other = orchestrator("lab", "guest", guest_name, "--host", "lab-c", "--lab-dir", lab_env.root)
    assert guest_name in other.one_line_error(ExitCode.BAD_INPUT)
    assert lab_env.conn(2).find_domain(guest_name) is None


BAD_GUEST_OPTIONS = {
    "unknown host": (["--host", "lab-z"], "no lab host named 'lab-z' (lab hosts: lab-a, lab-b, lab-c)"),
    "too many devices": (["--host", "lab-a", "--devices", "99"], "--devices must be 0 to 16, not 99"),
    "unknown QEMU behaviour": (
        ["--host", "lab-a", "--qemu-behaviour", "9.0"],
        "'--qemu-behaviour': '9.0' is not one of '11.0', '10.0'",
    ),
    "negative transition": (["--host", "lab-a", "--transition-ms", "-1"], "--transition-ms must be"),
    "no memory": (["--host", "lab-a", "--memory", "1"], "--memory must be 16 to 4096 MiB"),
    "devices not a number": (["--host", "lab-a", "--devices", "two"], "Invalid value for '--devices'"),
    "no host": ([], "Missing option '--host'"),
}


@pytest.mark.parametrize(("options", "named"), BAD_GUEST_OPTIONS.values(), ids=BAD_GUEST_OPTIONS.keys())
def test_bad_guest_options(lab_env: Any, guest_name: str, options: list[str], named: str) -> None:
    result = orchestrator("lab", "guest", guest_name, *options, "--lab-dir", lab_env.root)
    assert named in result.one_line_error(ExitCode.BAD_INPUT)
    assert all(conn.find_domain(guest_name) is None for conn in lab_env.conns), "nothing defined"


def test_bad_guest_name(lab_env: Any) -> None:
    result = orchestrator("lab", "guest", "-bad/name", "--host", "lab-a", "--lab-dir", lab_env.root)
    assert result.one_line_error(ExitCode.BAD_INPUT)


@pytest.mark.parametrize("count", ["0", "9", "-1"])
def test_up_with_a_bad_host_count(lab_env: Any, count: str) -> None:
    pids = [h.pid("libvirtd") for h in lab_env.hosts]
    result = orchestrator("lab", "up", "--hosts", count, "--lab-dir", lab_env.root)
    assert f"--hosts must be between 1 and {lab.MAX_HOSTS}, not {count}" in result.one_line_error(
        ExitCode.BAD_INPUT
    )
    assert [h.pid("libvirtd") for h in lab_env.hosts] == pids


@pytest.fixture
def broken_lab() -> Iterator[Path]:
    """A lab directory of its own (short path: it holds unix sockets), stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="orch-bad-", dir="/var/tmp"))
    yield root
    lab.down(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("count", "broken"),
    [(1, "lab-a"), (2, "lab-b")],
    ids=["the only host fails", "the second host fails after the first started"],
)
def test_a_host_that_fails_to_start_leaves_nothing_running(
    lab_env: Any, broken_lab: Path, count: int, broken: str
) -> None:
    etc = broken_lab / "hosts" / broken / "etc"
    etc.mkdir(parents=True)
    (etc / "libvirtd.conf").write_text("unix_sock_dir = 42\n")
    result = orchestrator("lab", "up", "--hosts", str(count), "--lab-dir", broken_lab)
    line = result.one_line_error(ExitCode.ENVIRONMENT)
    assert line.startswith(f"lab host {broken} failed to start")
    assert str(broken_lab / "hosts" / broken / "libvirtd.log") in line
    if broken != "lab-a":
        assert "libvirt version" in (broken_lab / "hosts" / "lab-a" / "libvirtd.log").read_text(), (
            "lab-a did start before lab-b failed"
        )
    assert processes_mentioning(str(broken_lab)) == []
    status = orchestrator("lab", "status", "--json", "--lab-dir", broken_lab).json()
    assert status, "the hosts' directories are there"
    assert not any(h["running"] for h in status)
