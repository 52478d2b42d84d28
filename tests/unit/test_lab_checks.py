"""Whether this machine can host the lab: root and the programs it starts. os.geteuid and
shutil.which are replaced, since this machine is root and has them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.commands.program import main
from orchestrator.core.errors import BadInput, EnvironmentProblem, ExitCode
from orchestrator.lab import hosts

NOT_ROOT = "the lab must run as root (it starts libvirtd in mount namespaces); use sudo"


@pytest.fixture
def bind_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system directories check_machine creates, moved under tmp_path."""
    system = tmp_path / "system"
    monkeypatch.setattr(hosts, "_BIND_DIRS", tuple((n, str(system / n)) for n, _ in hosts._BIND_DIRS))
    return system


def test_not_root(monkeypatch: pytest.MonkeyPatch, bind_dirs: Path) -> None:
    monkeypatch.setattr("orchestrator.lab.hosts.os.geteuid", lambda: 1000)
    with pytest.raises(EnvironmentProblem) as caught:
        hosts.check_machine()
    assert caught.value.code == ExitCode.ENVIRONMENT
    assert (
        caught.value.line() == "the lab must run as root (it starts libvirtd in mount namespaces); use sudo"
    )
    assert not bind_dirs.exists(), "nothing touched"


@pytest.mark.parametrize(
    ("absent", "listed"),
    [
        ({"virtlogd"}, "virtlogd"),
        ({"qemu-system-x86_64", "unshare"}, "qemu-system-x86_64, unshare"),
        (set(hosts._REQUIRED_PROGRAMS), ", ".join(hosts._REQUIRED_PROGRAMS)),
    ],
)
def test_missing_programs(
    monkeypatch: pytest.MonkeyPatch, bind_dirs: Path, absent: set[str], listed: str
) -> None:
    monkeypatch.setattr("orchestrator.lab.hosts.os.geteuid", lambda: 0)
    monkeypatch.setattr(
        "orchestrator.lab.hosts.shutil.which", lambda p: None if p in absent else f"/usr/bin/{p}"
    )
    with pytest.raises(EnvironmentProblem) as caught:
        hosts.check_machine()
    assert caught.value.code == ExitCode.ENVIRONMENT
    assert (
        caught.value.line() == f"missing programs for the lab: {listed}; run deploy/setup.sh to install them"
    )
    assert not bind_dirs.exists()


def test_a_fit_machine_gets_the_mount_points(monkeypatch: pytest.MonkeyPatch, bind_dirs: Path) -> None:
    monkeypatch.setattr("orchestrator.lab.hosts.os.geteuid", lambda: 0)
    monkeypatch.setattr("orchestrator.lab.hosts.shutil.which", lambda p: f"/usr/bin/{p}")
    hosts.check_machine()
    assert sorted(p.name for p in bind_dirs.iterdir()) == sorted(n for n, _ in hosts._BIND_DIRS)


@pytest.mark.parametrize("count", [0, -1, hosts.MAX_HOSTS + 1])
def test_up_refuses_a_bad_count_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, count: int
) -> None:
    monkeypatch.setattr("orchestrator.lab.hosts.os.geteuid", lambda: 1000)  # the count is checked first
    with pytest.raises(BadInput, match=f"between 1 and {hosts.MAX_HOSTS}, not {count}"):
        hosts.up(count, tmp_path / "lab")
    assert not (tmp_path / "lab").exists()


@pytest.mark.parametrize("command", [["up", "--hosts", "1"], ["down"]])
def test_cli_not_root_is_one_line_and_exit_7(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    bind_dirs: Path,
    command: list[str],
) -> None:
    monkeypatch.setattr("orchestrator.lab.hosts.os.geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as caught:
        main(["lab", *command, "--lab-dir", str(tmp_path / "lab")])
    assert caught.value.code == ExitCode.ENVIRONMENT
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"orchestrator: error: {NOT_ROOT}\n"
    assert not (tmp_path / "lab").exists()


def test_cli_missing_programs_is_one_line_and_exit_7(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, bind_dirs: Path
) -> None:
    monkeypatch.setattr("orchestrator.lab.hosts.os.geteuid", lambda: 0)
    monkeypatch.setattr(
        "orchestrator.lab.hosts.shutil.which", lambda p: None if p == "libvirtd" else f"/usr/bin/{p}"
    )
    with pytest.raises(SystemExit) as caught:
        main(["lab", "up", "--hosts", "2", "--lab-dir", str(tmp_path / "lab")])
    assert caught.value.code == ExitCode.ENVIRONMENT
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("orchestrator: error: missing programs for the lab: libvirtd;")


@pytest.mark.parametrize(
    ("outages", "disarm", "margin"),
    [
        ([(10.000, 10.600)], 10.010, 20.0),  # quiet at 10.000, disarmed 10 ms later: 20 ms of 30 left
        ([(10.000, 10.600)], 9.990, 40.0),  # disarmed before the device went quiet
        ([(10.000, 10.050)], 10.300, -270.0),  # disarmed after the device answered again: that outage's
        ([(1.0, 1.1), (10.000, 10.600)], 10.040, -10.0),  # not the old outage
        ([(10.000, 10.600), (20.0, 20.6)], 10.700, -670.0),  # late, nearer the first than the next
        ([(10.000, None)], 10.020, 10.0),  # still quiet when stopped
    ],
)
def test_peer_margins_pair_each_disarm_with_its_nearest_outage(outages, disarm, margin) -> None:
    from orchestrator.lab.peer import Outage, PeerStats

    stats = PeerStats("vm", "nic0", 5.0, 30.0, disarms=[disarm], outages=[Outage(s, e) for s, e in outages])
    assert stats.timeout_left_ms() == [pytest.approx(margin, abs=0.01)]


@pytest.mark.parametrize(
    ("replies", "quiet", "other"),
    [
        ([(100.005, "quiet pre-copy")], 1, 0),  # the device said it was quiet: a drain came too late
        ([], 0, 1),  # silence only: the device (or this machine) was slow, no drain could help
        ([(100.010, "alive running"), (100.040, "alive running")], 0, 0),  # answered in time
    ],
)
def test_peer_tells_timeouts_in_the_devices_quiet_time_from_the_others(replies, quiet, other) -> None:
    from orchestrator.lab.peer import Peer, PeerStats

    peer = Peer.__new__(Peer)  # the bookkeeping only: no sockets
    peer.stats = PeerStats("vm", "nic0", 5.0, 30.0)
    peer.armed, peer.last_answer, peer.last_quiet, peer.outage = True, 100.0, 0.0, None
    for at, reply in replies:
        peer._on_reply(reply.encode(), at)
    peer._check(100.020)  # past 15 ms without an answer: an outage
    peer._check(100.050)  # 50 ms without one: past the 30 ms timeout
    stats = peer.stats.to_json()
    assert (stats["timeouts_quiet"], stats["timeouts_other"]) == (quiet, other), stats


def test_a_lab_daemon_is_found_by_its_command_line_and_whole_paths(tmp_path: Path) -> None:
    """`down` finds a virtlogd whose pid file is gone by its command line; a lab at /b/a is not the
    lab at /a (a path is compared whole, not as a substring)."""
    import subprocess
    import sys

    host_dir = tmp_path / "b" / "a" / "hosts" / "lab-a"
    fake = subprocess.Popen(  # a process that looks like that host's virtlogd
        ["virtlogd", "-c", "import time; print(flush=True); time.sleep(60)", str(host_dir / "virtlogd.pid")],
        executable=sys.executable,
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None
        fake.stdout.readline()  # started (just after the exec, its command line may not be readable yet)
        assert hosts._is_ours(fake.pid, "virtlogd", host_dir)
        assert not hosts._is_ours(fake.pid, "libvirtd", host_dir)
        assert not hosts._is_ours(fake.pid, "virtlogd", Path(str(host_dir).replace("/b/a/", "/a/")))
        assert not hosts._is_ours(fake.pid, "virtlogd", host_dir.parent / "lab-b")
        assert hosts._daemon_pids("virtlogd", host_dir) == [fake.pid]
    finally:
        fake.kill()
        fake.communicate()
    assert hosts._daemon_pids("virtlogd", host_dir) == []
