"""`orchestrator migrate` on the lab: real libvirtd + QEMU, simulated VFIO devices, real hook processes.

Orders are asserted from what the hooks themselves recorded (their first instruction's time) against
QEMU's own event timestamps from the journal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from lab.runner import Run, Scenario, assert_paired, cli


def test_success_drains_on_prepare_and_undrains_on_destination_running(lab_env: Any, tmp_path: Path) -> None:
    sc = Scenario(lab_env, tmp_path)
    run = sc.migrate()
    assert run.code == 0, run.err
    doc = run.doc
    assert doc["outcome"] == "succeeded" and doc["changed"] is True
    assert doc["devices"]["nic0"]["late"] is False
    assert doc["timings"]["downtime_ms"] is not None
    record = sc.history(doc["migration_id"])
    prepare = sc.event_time(record, "source", "nic0", "pre-copy-p2p-prepare")
    p2p = sc.event_time(record, "source", "nic0", "pre-copy-p2p")
    dest_running = sc.event_time(record, "destination", "nic0", "running")
    (drain,) = sc.calls("drain")
    (undrain,) = sc.calls("undrain")
    assert prepare < drain["t"] < p2p, "the drain hook must start inside the P2P transition"
    assert undrain["t"] > dest_running
    assert drain["args"] == ["drain", sc.name, "nic0", "pre-copy-p2p-prepare"]
    assert (
        drain["env"]["ORCH_DEVICE_ID"] == "nic0" and drain["env"]["ORCH_MIGRATION_ID"] == doc["migration_id"]
    )
    assert sc.running_on(1) and lab_env.conn(0).find_domain(sc.name) is None
    # The destination keeps the events property on, live and persistent.
    dom = lab_env.conn(1).domain(sc.name)
    assert "vfio-pci.migration-events=on" in lab_env.conn(1).xml(dom)
    assert "vfio-pci.migration-events=on" in lab_env.conn(1).xml(dom, inactive=True)
    assert [m["id"] for m in cli("history", "--journal", str(sc.journal), "--json").doc] == [
        doc["migration_id"]
    ]
    # Ansible idempotence: again, and the VM is already there.
    again = sc.migrate()
    assert again.code == 0, again.err
    assert again.doc["outcome"] == "unchanged" and again.doc["changed"] is False
    sc.remove()


def test_qemu_10_fallback_drains_late_on_pre_copy_p2p(lab_env: Any, tmp_path: Path) -> None:
    sc = Scenario(lab_env, tmp_path, behaviour="10.0")
    run = sc.migrate()
    assert run.code == 0, run.err
    assert run.doc["devices"]["nic0"]["late"] is True
    record = sc.history(run.doc["migration_id"])
    p2p = sc.event_time(record, "source", "nic0", "pre-copy-p2p")
    (drain,) = sc.calls("drain")
    assert drain["t"] > p2p and drain["args"][3] == "pre-copy-p2p"
    assert_paired(sc, ["nic0"])
    sc.remove()


def test_qemus_first_design_drains_on_its_separate_prepare_event(lab_env: Any, tmp_path: Path) -> None:
    """QEMU's first design of the feature sent VFIO_MIGRATION_PREPARE (device-state: the state about to
    come): a QEMU carrying that patch is drained on it, as on the prepare state."""
    sc = Scenario(lab_env, tmp_path, behaviour="11.0-event")
    run = sc.migrate()
    assert run.code == 0, run.err
    device = run.doc["devices"]["nic0"]
    assert (device["trigger"], device["late"], device["quiet_bound"]) == ("prepare", False, "exact"), device
    (drain,) = sc.calls("drain")
    assert drain["args"][3] == "pre-copy-p2p-prepare"
    assert_paired(sc, ["nic0"])
    sc.remove()


def test_injected_transition_failure_rolls_back_and_undrains_on_source(lab_env: Any, tmp_path: Path) -> None:
    sc = Scenario(lab_env, tmp_path, fail_transition="running")
    run = sc.migrate()
    assert run.code == 4, run.err
    assert run.doc["outcome"] == "rolled-back"
    record = sc.history(run.doc["migration_id"])
    back = sc.event_time(record, "source", "nic0", "running")
    (undrain,) = sc.calls("undrain")
    assert undrain["t"] > back
    assert_paired(sc, ["nic0"])
    assert sc.running_on(0) and lab_env.conn(1).find_domain(sc.name) is None
    assert record["outcome"] == "rolled-back"
    sc.remove()


def test_cancelled_migration_undrains_on_source(lab_env: Any, tmp_path: Path, recorder: Any) -> None:
    sc = Scenario(lab_env, tmp_path, transition_ms=1500)
    rec = recorder(sc.name)
    result: list[Run] = []
    thread = threading.Thread(target=lambda: result.append(sc.migrate()))
    thread.start()
    rec.wait_for(lambda evs: any(e.host == 0 and e.vfio == ("nic0", "pre-copy-p2p-prepare") for e in evs))
    assert lab_env.conn(0).domain(sc.name).abort_job()
    thread.join(120)
    (run,) = result
    assert_paired(sc, ["nic0"])
    # Mid-transition the abort races libvirt's migrate-continue for QEMU's monitor: either may win.
    if run.doc["location"] == "source":
        assert run.code == 4, run.err
        assert sc.running_on(0)
    else:
        assert run.code == 0 and run.doc["outcome"] == "succeeded", run.err
        assert sc.running_on(1)
    sc.remove()


def test_killed_destination_undrains_on_source(lab_env: Any, tmp_path: Path, recorder: Any) -> None:
    sc = Scenario(lab_env, tmp_path, transition_ms=1000)
    rec = recorder(sc.name)
    result: list[Run] = []
    thread = threading.Thread(target=lambda: result.append(sc.migrate()))
    thread.start()
    rec.wait_for(lambda evs: any(e.host == 0 and e.vfio == ("nic0", "pre-copy-p2p-prepare") for e in evs))
    pidfile = lab_env.hosts[1].dir / "run" / "qemu" / f"{sc.name}.pid"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    thread.join(120)
    (run,) = result
    assert run.code == 4, run.err
    assert_paired(sc, ["nic0"])
    assert sc.running_on(0)
    sc.remove()


def test_drain_hook_timeout_with_abort_rolls_back(lab_env: Any, tmp_path: Path) -> None:
    # The deadline (500 ms) falls inside the 3 s transition, and leaves the hook time to record itself.
    # In prepare mode the abort races libvirt's migrate-continue for QEMU's monitor (held by the
    # transition): it usually wins; when it does not, the run must say so rather than claim success.
    sc = Scenario(lab_env, tmp_path, transition_ms=3000)
    sc.write_policy(drain="--sleep-ms=10000", drain_timeout_ms=500)
    run = sc.migrate()
    doc = run.doc
    assert "timed out" in doc["error"], run.err
    drain_results = [h for h in doc["hooks"] if h["trigger"] == "drain"]
    assert drain_results and drain_results[0]["timed_out"] is True
    assert_paired(sc, ["nic0"])
    if doc["location"] == "source":
        assert run.code == 5 and doc["outcome"] == "aborted", run.err
        assert sc.running_on(0)
    else:
        assert run.code == 0 and doc["outcome"] == "succeeded", run.err
        assert "the abort came too late" in doc["error"]
        assert sc.running_on(1)
    sc.remove()


def test_sigterm_mid_migration_aborts_undrains_and_exits_130(lab_env: Any, tmp_path: Path) -> None:
    # The drain hook sends SIGTERM at the prepare event, as the device's 1.5 s transition begins. The
    # abort then races libvirt's migrate-continue for QEMU's monitor, which the transition holds: it
    # usually lands; when it does not, the VM moved and the run must say the abort came too late.
    sc = Scenario(lab_env, tmp_path, transition_ms=1500)
    sc.write_policy(drain="--kill-orchestrator=TERM")
    run = sc.migrate()
    assert_paired(sc, ["nic0"])
    rows = cli("history", "--journal", str(sc.journal), "--json").doc
    if run.doc["location"] == "source":
        assert run.code == 130, run.err
        assert run.doc["outcome"] == "interrupted" and rows[0]["outcome"] == "interrupted"
        assert sc.running_on(0)
    else:
        assert run.code == 0 and run.doc["outcome"] == "succeeded", run.err
        assert "the abort came too late" in run.doc["error"] and rows[0]["outcome"] == "succeeded"
        assert sc.running_on(1)
    sc.remove()


def test_two_devices_hooks_run_in_parallel(lab_env: Any, tmp_path: Path) -> None:
    sc = Scenario(lab_env, tmp_path, devices=2, transition_ms=200)
    sc.write_policy(undrain="--sleep-ms=2000")
    run = sc.migrate()
    assert run.code == 0, run.err
    assert_paired(sc, ["nic0", "nic1"])
    first, second = sorted(sc.calls("undrain"), key=lambda h: h["t"])
    ends = sc.ends()
    assert second["t"] < ends[first["pid"]]["end"], "both undrains run at once, not one after the other"
    sc.remove()


def test_bad_input_is_one_line_with_its_exit_code(lab_env: Any, tmp_path: Path) -> None:
    a, b = lab_env.hosts[0].uri, lab_env.hosts[1].uri
    journal = str(tmp_path / "j.sqlite")
    cases = [
        (["migrate", "no-such-vm", b, "-c", a], 2, "no domain 'no-such-vm'"),
        (["migrate", "x", a, "-c", a], 2, "same"),
        (["migrate", "x", "qemu+unix:///system?socket=/nonexistent", "-c", a], 3, "cannot connect"),
        (["migrate", "x", b, "-c", a, "--policy", "no-such-policy"], 2, "no-such-policy"),
        (["migrate", "x", b, "-c", a, "--postcopy"], 2, "post-copy"),
    ]
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text('[[hooks.drain]]\nargv = ["/no/such/hook"]\ntimeout_ms = "fast"\n')
    cases.append((["migrate", "x", b, "-c", a, "--policy", str(bad_policy)], 2, "timeout_ms"))
    missing = tmp_path / "missing.toml"
    missing.write_text('[[hooks.drain]]\nargv = ["/no/such/hook", "{device_id}"]\n')
    name = lab_env.guest(0)
    cases.append((["migrate", name, b, "-c", a, "--policy", str(missing)], 2, "/no/such/hook"))
    for args, code, text in cases:
        run = cli(*args, "--journal", journal)
        assert run.code == code, (args, run.err)
        lines = run.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("orchestrator: error:"), run.err
        assert text in lines[0], (text, lines[0])
        assert "Traceback" not in run.err
    assert lab_env.conn(0).domain(name).state() == "running", "bad input never stops the VM"
    lab_env.remove(name)


def test_dry_run_changes_nothing(lab_env: Any, tmp_path: Path) -> None:
    sc = Scenario(lab_env, tmp_path)
    run = sc.migrate("--dry-run")
    assert run.code == 0, run.err
    doc = run.doc
    assert doc["outcome"] == "planned" and doc["changed"] is False
    assert any("drain" in line or "pre-copy-p2p-prepare" in line for line in doc["plan"])
    assert sc.hooks() == [] and sc.running_on(0)
    # Nothing written either (Ansible's check mode): no journal row, no run log.
    assert cli("history", "--journal", str(sc.journal), "--json").doc == []
    assert not sc.journal.with_name(sc.journal.name + ".runs").exists()
    sc.remove()


def test_watch_relays_ndjson_and_survives_a_host_going_away(lab_env: Any, tmp_path: Path) -> None:
    from orchestrator.lab import hosts as lab

    # Short roots: a unix socket path (under <root>/hosts/lab-a/sock/) must fit in 108 bytes.
    roots = Path(tempfile.mkdtemp(prefix="orch-w-", dir="/var/tmp"))
    extra_root, late_root = roots / "x", roots / "l"
    extra = lab.up(1, extra_root)[0]  # a host this test may kill
    # late_root: a host that is not up yet when the watch starts
    late = lab.LabHost(name=lab.HOST_NAMES[0], dir=late_root / "hosts" / lab.HOST_NAMES[0], index=0)
    alone = cli("watch", "-c", late.uri, timeout=60)
    assert alone.code == 3, "no reachable host at all: exit 3"
    assert alone.err.startswith(f"orchestrator: error: cannot connect to {late.uri}"), alone.err
    assert len(alone.err.splitlines()) == 1, alone.err
    name = lab_env.guest(0)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "watch",
            "-c",
            lab_env.hosts[0].uri,
            "-c",
            lab_env.hosts[1].uri,
            "-c",
            lab_env.hosts[0].uri,  # given twice, watched once
            "-c",
            extra.uri,
            "-c",
            late.uri,
            "--domain",
            name,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        unreachable = proc.stderr.readline()
        assert f"warning: cannot connect to {late.uri}" in unreachable, unreachable
        assert "retrying every" in unreachable, unreachable
        # the repeated URI counts once, and the domain exists: no warning about it
        assert "watching 3 host(s)" in proc.stderr.readline()
        daemon = extra.pid("libvirtd")
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        assert "went away" in proc.stderr.readline(), "the lost host is reported"
        lab.up(1, late_root)
        connected = proc.stderr.readline()
        assert f"connected to {late.uri}; watching 3 host(s)" in connected, connected
        lab_env.migrate(name, 0, 1)
        lines = []
        while not lines or lines[-1]["state"] != "running":
            lines.append(json.loads(proc.stdout.readline()))
        assert {tuple(sorted(line)) for line in lines} == {
            ("device_id", "domain", "host", "qemu_time", "qom_path", "received", "state")
        }
        source = [line["state"] for line in lines if line["host"] == lab_env.hosts[0].uri]
        dest = [line["state"] for line in lines if line["host"] == lab_env.hosts[1].uri]
        assert source[:2] == ["pre-copy", "pre-copy-p2p-prepare"]
        assert dest == ["resuming", "running-p2p", "running"]
        assert all(
            line["domain"] == name and line["qom_path"] == "/machine/peripheral/nic0" for line in lines
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "Ctrl-C ends the watch cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
        lab.down(extra_root)
        lab.down(late_root)
        shutil.rmtree(roots, ignore_errors=True)
        lab_env.remove(name)
