"""The product's promise, on the lab: RDMA peers of a device see no timeout when the orchestrator
drains them (the shipped rdma-drain: gated, armed hooks, with a guest that dirties memory as loaded VMs
do, so the gate holds the switchover until the drain finished), and do see them without hooks or with
QEMU 10's late signal. (An idle guest passes the gate early: tests/lab/test_switchover.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lab.runner import cli


def migrate_with_peer(
    lab: Any, tmp_path: Path, policy: str, *extra: str, **guest: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    name = lab.guest(0, transition_ms=300, **guest)
    env = {**os.environ, "ORCH_LAB_DIR": str(lab.root)}
    peer = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "lab", "peer", name, "--lab-dir", str(lab.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert peer.stderr is not None and "ready" in peer.stderr.readline()
        sock = lab.root / "migrations" / f"{name}.sock"
        run = cli(
            "migrate",
            name,
            lab.hosts[1].uri,
            "-c",
            lab.hosts[0].uri,
            "--policy",
            policy,
            "--migrateuri",
            f"unix://{sock}",
            "--journal",
            str(tmp_path / "j.sqlite"),
            "--json",
            *extra,
            env={"ORCH_LAB_DIR": str(lab.root)},
        )
        assert run.code == 0, run.err
        peer.send_signal(signal.SIGINT)
        out, _ = peer.communicate(timeout=30)
        return run.doc, json.loads(out)
    finally:
        if peer.poll() is None:
            peer.kill()
        lab.remove(name)


def test_the_shipped_rdma_drain_means_zero_peer_timeouts(lab_env: Any, tmp_path: Path) -> None:
    doc, peer = migrate_with_peer(lab_env, tmp_path, "rdma-drain", "--bandwidth", "32", workload="dirty")
    actions = [(h["trigger"], h["label"]) for h in doc["hooks"] if h["device_id"] == "nic0"]
    assert actions == [("drain", "rdma-drain"), ("undrain", "rdma-undrain")]
    assert all(h["ok"] for h in doc["hooks"]), "armed (device None) and acted (nic0)"
    assert doc["drain_mode"] == "gated" and doc["gate"] == "opened", doc["gate"]
    assert doc["devices"]["nic0"]["trigger"] == "gate" and doc["devices"]["nic0"]["lead_ms"] > 0
    assert peer["outages"], "the device did go quiet during its P2P transition"
    assert peer["timeouts_quiet"] == 0, json.dumps(peer)
    assert len(peer["disarms"]) == 1 and len(peer["arms"]) == 1
    assert peer["timeout_left_ms"][0] > 0, "disarmed before the device went quiet"


@pytest.mark.parametrize(("policy", "behaviour"), [("default", "11.0"), ("rdma-drain", "10.0")])
def test_without_hooks_or_with_the_late_qemu_10_signal_peers_time_out(
    lab_env: Any, tmp_path: Path, policy: str, behaviour: str
) -> None:
    # An idle guest is not held by the gate: on QEMU 10 its device is only drained on its first P2P
    # state, after it went quiet (tests/lab/test_switchover.py holds a dirtying guest: no timeout).
    _doc, peer = migrate_with_peer(lab_env, tmp_path, policy, behaviour=behaviour)
    assert peer["timeouts_quiet"] >= 1, peer


def test_the_readme_main_job_migrates_there_and_back_with_zero_peer_timeouts(lab_env: Any) -> None:
    name = f"demo-{os.getpid()}"
    run = cli("lab", "demo", "--name", name, "--lab-dir", str(lab_env.root), timeout=300)
    assert run.code == 0, run.err
    assert run.out.count("--- succeeded") == 2, run.out[-3000:]
    assert "pre-copy-p2p-prepare" in run.out and "rdma-drain (" in run.out and "rdma-undrain (" in run.out
    peers = [line for line in run.out.splitlines() if line.startswith("RDMA peers of")]
    assert len(peers) == 2 and all(": 0 timeouts in the device's quiet time" in line for line in peers), peers
    lab_env.remove(name)
