"""The lab itself, on real libvirtd + QEMU: hosts, guests, migrations and the simulated device's
VFIO_MIGRATION sequences as a libvirt QEMU-monitor-event subscriber receives them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.errors import ConnectError, MigrationError
from orchestrator.edges.virt import Host
from orchestrator.lab import hosts as lab

SOURCE_11 = ["pre-copy", "pre-copy-p2p-prepare", "pre-copy-p2p", "stop-copy", "stop"]
SOURCE_10 = ["pre-copy", "pre-copy-p2p", "stop-copy", "stop"]
DESTINATION = ["resuming", "running-p2p", "running"]


def states(pairs: list[tuple[str, str]], device: str = "nic0") -> list[str]:
    return [state for dev, state in pairs if dev == device]


def migrated(rec: Any, dst: int) -> Any:
    """Wait until the destination reports the guest resumed."""
    return rec.wait_for(lambda evs: any(e.host == dst and e.event == "RESUME" for e in evs))


def test_hosts_up_distinct_and_idempotent(lab_env: Any) -> None:
    # The host UUID libvirt tells hosts apart by (getCapabilities: the lab's daemons probed QEMU by now).
    uuids = {conn.conn.getCapabilities().split("<uuid>", 1)[1].split("<", 1)[0] for conn in lab_env.conns}
    assert len(uuids) == 3, "each lab host needs its own host UUID or libvirt refuses to migrate"
    pids = [h.pid("libvirtd") for h in lab_env.hosts]
    assert all(pids)
    again = lab.up(3, lab_env.root)
    assert [h.pid("libvirtd") for h in again] == pids, "`up` when up must leave the daemons alone"


def test_migrate_there_and_back_with_11_0_sequence(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(0, devices=1)
    rec = recorder(name)
    lab_env.migrate(name, 0, 1)
    migrated(rec, 1)
    assert states(rec.vfio(0)) == SOURCE_11
    assert states(rec.vfio(1)) == DESTINATION
    assert lab_env.conn(1).domain(name).state() == "running"
    assert lab_env.conn(0).find_domain(name) is None

    # QEMU timestamps: monotonic per host, close to when libvirt delivered them, and the P2P
    # transition between prepare and pre-copy-p2p lasts the configured 300 ms.
    src = rec.vfio_events(0)
    times = [e.qemu_time for e in src]
    assert times == sorted(times)
    assert all(abs(e.received - e.qemu_time) < 1.0 for e in src)
    by_state = {e.vfio[1]: e.qemu_time for e in src}
    assert 0.28 <= by_state["pre-copy-p2p"] - by_state["pre-copy-p2p-prepare"] < 1.5

    rec2 = recorder(name)
    lab_env.migrate(name, 1, 0)
    migrated(rec2, 0)
    assert states(rec2.vfio(1)) == SOURCE_11
    assert states(rec2.vfio(0)) == DESTINATION
    lab_env.remove(name)


def test_10_x_behaviour_has_no_prepare_state(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(0, behaviour="10.0")
    rec = recorder(name)
    lab_env.migrate(name, 0, 2)
    migrated(rec, 2)
    assert states(rec.vfio(0)) == SOURCE_10
    assert states(rec.vfio(2)) == DESTINATION
    lab_env.remove(name)


def test_no_precopy_goes_through_running_p2p(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(1, precopy=False)
    rec = recorder(name)
    lab_env.migrate(name, 1, 2)
    migrated(rec, 2)
    assert states(rec.vfio(1)) == ["running-p2p", "stop-copy", "stop"]
    assert states(rec.vfio(2)) == DESTINATION
    lab_env.remove(name)


def test_no_p2p_goes_straight_to_stop_copy(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(0, p2p=False)
    rec = recorder(name)
    lab_env.migrate(name, 0, 1)
    migrated(rec, 1)
    assert states(rec.vfio(0)) == ["pre-copy", "stop-copy", "stop"]
    assert states(rec.vfio(1)) == ["resuming", "running"]
    lab_env.remove(name)


def test_failed_transition_falls_back_and_fails_the_migration(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(0, fail_transition="running")
    rec = recorder(name)
    with pytest.raises(MigrationError):
        lab_env.migrate(name, 0, 1)
    rec.wait_for(lambda evs: any(e.host == 0 and e.event == "RESUME" for e in evs))
    assert states(rec.vfio(0)) == ["pre-copy", "pre-copy-p2p-prepare", "running"]
    assert lab_env.conn(0).domain(name).state() == "running"
    assert lab_env.conn(1).find_domain(name) is None
    lab_env.remove(name)


def test_cancelled_migration_returns_the_device_to_running(lab_env: Any, recorder: Any) -> None:
    # 1 MiB/s for a 64 MiB guest keeps the migration in pre-copy long enough to cancel it.
    name = lab_env.guest(0)
    rec = recorder(name)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            lab_env.migrate(name, 0, 1, bandwidth_mib=1)
        except MigrationError as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    rec.wait_for(lambda evs: any(e.host == 0 and e.vfio == ("nic0", "pre-copy") for e in evs))
    dom = lab_env.conn(0).domain(name)
    stats = dom.job_stats()
    assert stats is not None and stats.elapsed_ms >= 0, "libvirt reports the running job"
    assert dom.abort_job()
    thread.join(60)
    assert failure, "an aborted migration must fail"
    rec.wait_for(lambda evs: any(e.host == 0 and e.vfio == ("nic0", "running") for e in evs))
    assert states(rec.vfio(0)) == ["pre-copy", "running"]
    assert dom.state() == "running"
    lab_env.remove(name)


def test_property_off_means_no_events(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(0, events=False)
    rec = recorder(name)
    lab_env.migrate(name, 0, 1)
    migrated(rec, 1)
    assert any(e.event == "MIGRATION" for e in rec.events), "the subscriber did receive the migration"
    assert rec.vfio(0) == [] and rec.vfio(1) == []
    lab_env.remove(name)


def test_two_devices_transition_in_turn(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(1, devices=2, transition_ms=200)
    rec = recorder(name)
    lab_env.migrate(name, 1, 0)
    migrated(rec, 0)
    src = rec.vfio(1)
    for device in ("nic0", "nic1"):
        assert states(src, device) == SOURCE_11
        assert states(rec.vfio(0), device) == DESTINATION
    # QEMU runs each device's vm-state handler in turn: nic1's prepare follows nic0's transition.
    order = [pair for pair in src if "p2p" in pair[1]]
    assert order == [
        ("nic0", "pre-copy-p2p-prepare"),
        ("nic0", "pre-copy-p2p"),
        ("nic1", "pre-copy-p2p-prepare"),
        ("nic1", "pre-copy-p2p"),
    ]
    lab_env.remove(name)


def test_guest_settings_survive_migration(lab_env: Any, recorder: Any) -> None:
    name = lab_env.guest(0, behaviour="10.0", transition_ms=100)
    lab_env.migrate(name, 0, 1)
    rec = recorder(name)
    lab_env.migrate(name, 1, 0)
    migrated(rec, 0)
    assert states(rec.vfio(1)) == SOURCE_10, "the 10.0 behaviour travelled with the domain"
    lab_env.remove(name)


def test_down_after_a_crash_stops_leftovers(tmp_path: Any) -> None:
    """A lab whose daemon was killed (a crash) is still cleaned up by `down`, by PID."""
    from orchestrator.lab import guest as lab_guest

    root = tmp_path / "lab"
    hosts = lab.up(1, root)
    lab_guest.create_guest(hosts[0], lab_guest.GuestSpec(name="crashy"), root=root)
    qemu = lab._qemu_pids(hosts[0])
    assert len(qemu) == 1
    daemon = hosts[0].pid("libvirtd")
    assert daemon is not None
    os.kill(daemon, signal.SIGKILL)
    assert lab.down(root) == ["lab-a"]
    assert not hosts[0].running
    assert hosts[0].pid("virtlogd") is None
    assert lab._is_zombie(qemu[0]), "the guest's QEMU, orphaned by the crash, was stopped"
    with pytest.raises(ConnectError):
        Host.open(hosts[0].uri, keepalive=False)


# --- a storm of signals; what a crashed libvirtd leaves ---------------------------------------------

RECORD_HOOK = Path(__file__).resolve().parent.parent / "hooks" / "record-hook"


def test_a_storm_of_sigterms_ends_in_130_with_the_report_whole_and_devices_undrained(
    lab_env: Any, tmp_path: Path
) -> None:
    """20 SIGTERMs in a row while the job runs (the device mid-transition, drained), then one every
    10 ms until the process is gone: the first interrupts; none kills it before its report, its undrain
    and its journal's outcome are written."""
    name = lab_env.guest(0, transition_ms=3000)
    log, journal, policy = tmp_path / "hooks.ndjson", tmp_path / "journal.sqlite", tmp_path / "policy.toml"
    hook = [str(RECORD_HOOK), str(log), "{device_id}"]
    policy.write_text(
        f'[migration]\ndata_uri = "unix://{lab_env.root / "migrations" / name}.sock"\n'
        f"[[hooks.drain]]\nargv = {json.dumps([*hook, 'drain'])}\n"
        f'[[hooks.undrain]]\nargv = {json.dumps([*hook, "undrain"])}\non_failure = "continue"\n'
    )
    argv = [sys.executable, "-m", "orchestrator", "migrate", name, lab_env.hosts[1].uri]
    argv += ["-c", lab_env.hosts[0].uri, "--policy", str(policy), "--journal", str(journal), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sent = 0
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "drain" in log.read_text()):  # the device is drained: mid-switchover
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        for _ in range(20):
            os.kill(proc.pid, signal.SIGTERM)  # not reaped before poll(): the PID stays its own
            sent += 1
        while proc.poll() is None and time.monotonic() < deadline:
            os.kill(proc.pid, signal.SIGTERM)
            sent += 1
            time.sleep(0.01)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    doc = json.loads(out)  # whole: it parses
    calls = [json.loads(line)["args"] for line in log.read_text().splitlines()]
    assert calls == [["nic0", "drain"], ["nic0", "undrain"]], ("drained once, undrained once", err)
    history = subprocess.run(
        [sys.executable, "-m", "orchestrator", "history", "--journal", str(journal), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    # The abort is sent mid-transition; the transition holds QEMU's monitor, and the abort then races
    # libvirt's own migrate-continue (see test_failing_drain_hook): either side may win.
    if doc["location"] == "source":
        assert proc.returncode == 130, (sent, out, err)
        assert doc["outcome"] == "interrupted" and doc["exit_code"] == 130, (out, err)
        assert len([line for line in err.splitlines() if "orchestrator: error:" in line]) == 1, err
        assert [row["outcome"] for row in json.loads(history.stdout)] == ["interrupted"]
        assert lab_env.conn(0).domain(name).state() == "running", "it stays on the source"
    else:
        assert proc.returncode == 0 and doc["outcome"] == "succeeded", (sent, out, err)
        assert "the abort came too late" in doc["error"], out
        assert [row["outcome"] for row in json.loads(history.stdout)] == ["succeeded"]
        assert lab_env.conn(1).domain(name).state() == "running", "it runs on the destination"
    lab_env.remove(name)


def lab_leftovers(host_dir: Path) -> list[str]:
    """Live processes of one lab host: a daemon whose command line names its directory, or any process
    in its mount namespace (QEMU, the simulator), which has that directory's binds."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            mounts = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        if lab._is_zombie(pid) or not cmdline:
            continue
        if f"{host_dir}/".encode() in cmdline or f" {host_dir}/" in mounts:
            shown = cmdline.replace(b"\0", b" ")[:80]
            found.append(f"{pid} {shown!r}")
    return found


def crash(host: lab.LabHost) -> None:
    """SIGKILL the host's libvirtd, and wait until it is gone (not merely signalled)."""
    pid = host.pid("libvirtd")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not lab._is_zombie(pid):
        assert time.monotonic() < deadline, f"libvirtd {pid} outlived SIGKILL"
        time.sleep(0.01)


def test_down_after_a_crash_stops_its_virtlogd_without_a_pid_file(tmp_path: Path) -> None:
    """libvirtd SIGKILLed leaves its virtlogd (and QEMU) running; `up` again restarted the host over
    the crashed one's virtlogd pid file. Neither `up` nor `down` leaves one of them behind."""
    from orchestrator.lab import guest as lab_guest

    root = tmp_path / "lab"
    (host,) = lab.up(1, root)
    lab_guest.create_guest(host, lab_guest.GuestSpec(name="crashy"), root=root)
    crashed_virtlogd = host.pid("virtlogd")
    assert crashed_virtlogd is not None
    crash(host)
    assert lab._daemon_pids("virtlogd", host.dir) == [crashed_virtlogd], "a crash leaves virtlogd"

    lab.up(1, root)  # after a crash: restarts it
    assert lab._is_zombie(crashed_virtlogd), "the crashed daemon's virtlogd was stopped, not orphaned"
    assert lab._daemon_pids("virtlogd", host.dir) == [host.pid("virtlogd")]

    lab_guest.create_guest(host, lab_guest.GuestSpec(name="crashy2"), root=root)
    qemu = lab._qemu_pids(host)
    assert qemu
    crash(host)
    (host.dir / "virtlogd.pid").unlink()  # and its pid file is gone: found by its command line
    seen = {int(entry.split()[0]) for entry in lab_leftovers(host.dir)}
    assert {*qemu, *lab._daemon_pids("virtlogd", host.dir)} <= seen, "what lab_leftovers sees"
    assert lab.down(root) == ["lab-a"]
    assert lab_leftovers(host.dir) == []
    assert all(lab._is_zombie(pid) for pid in qemu)
    assert lab._daemon_pids("virtlogd", host.dir) == []
