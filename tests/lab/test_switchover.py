"""Switchover control on the lab: gated drains, the convergence schedule and stalls, with guests that
dirty their memory (a Linux guest rewriting 4 MiB at 64 MiB/s: at 32 MiB/s pre-copy iterates until
the downtime limit reaches ~125 ms), real libvirtd and QEMU, simulated devices, RDMA peer stand-ins.

The device's quiet time is what its peer saw: the start of its outage (the last answer before it).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from lab.runner import RECORD_HOOK, Run, cli

from orchestrator.lab.demo import start_peer, stop_peer

BANDWIDTH = "32"  # MiB/s: slower than the guest dirties its working set


def write_policy(
    tmp: Path, lab: Any, name: str, body: str, drain_hooks: list[list[str]], *, peers: bool = False
) -> Path:
    """A policy recording every hook run; with `peers`, also disarming/re-arming the devices' RDMA peers."""
    log = tmp / "hooks.ndjson"
    drains = "".join(
        f'[[hooks.drain]]\nargv = {json.dumps(argv)}\ntimeout_ms = 2000\non_failure = "abort"\n'
        for argv in drain_hooks
    )
    undrain = json.dumps([str(RECORD_HOOK), str(log), "undrain", "{domain}", "{device_id}", "{state}"])
    path = tmp / "policy.toml"
    rearm = (
        '[[hooks.undrain]]\nargv = ["orchestrator-rdma-hook", "undrain", "--domain", "{domain}", '
        '"--device", "{device_id}"]\non_failure = "continue"\n'
    )
    path.write_text(
        f'[migration]\ndata_uri = "unix://{lab.root}/migrations/{name}.sock"\n{body}\n{drains}'
        f'[[hooks.undrain]]\nargv = {undrain}\non_failure = "continue"\n' + (rearm if peers else "")
    )
    return path


def record(tmp: Path, trigger: str, *options: str) -> list[str]:
    return [
        str(RECORD_HOOK),
        str(tmp / "hooks.ndjson"),
        trigger,
        "{domain}",
        "{device_id}",
        "{state}",
        *options,
    ]


RDMA_DRAIN = ["orchestrator-rdma-hook", "drain", "--domain", "{domain}", "--device", "{device_id}"]


def calls(tmp: Path, trigger: str) -> list[dict[str, Any]]:
    log = tmp / "hooks.ndjson"
    lines = log.read_text().splitlines() if log.exists() else []
    return [entry for entry in map(json.loads, lines) if entry["args"][0] == trigger]


def migrate(lab: Any, name: str, policy: Path, tmp: Path, *extra: str) -> Run:
    return cli(
        "migrate",
        name,
        lab.hosts[1].uri,
        "-c",
        lab.hosts[0].uri,
        "--policy",
        str(policy),
        "--journal",
        str(tmp / "journal.sqlite"),
        "--bandwidth",
        BANDWIDTH,
        "--json",
        *extra,
        env={"ORCH_LAB_DIR": str(lab.root)},
        timeout=180,
    )


def switchover_outage(stats: dict[str, Any]) -> dict[str, Any]:
    """The outage the peer saw at the device's P2P transition: the one in which the device said it was
    quiet (a loaded machine also makes hiccups: the simulated device answering late)."""
    quiet = [o for o in stats["outages"] if o["device_quiet"]]
    assert len(quiet) == 1, ("the device went quiet once, at the switchover", stats["outages"])
    return dict(quiet[0])


def never_quiet(stats: dict[str, Any]) -> bool:
    """The device never said it was quiet (hiccups of a loaded machine may still show as outages)."""
    return stats["timeouts_quiet"] == 0 and not any(o["device_quiet"] for o in stats["outages"])


def runs_on(lab: Any, index: int, name: str) -> bool:
    dom = lab.conn(index).find_domain(name)
    return dom is not None and dom.state() == "running"


def test_gated_switches_over_only_after_a_slow_drain_on_qemu_11_and_10(lab_env: Any, tmp_path: Path) -> None:
    for behaviour in ("11.0", "10.0"):
        tmp = tmp_path / behaviour
        tmp.mkdir()
        name = lab_env.guest(0, workload="dirty", behaviour=behaviour)
        peer = start_peer(name, "nic0", lab_env.root)
        # A drain that takes 200 ms, far more than the peers' 30 ms timeout: gated, nothing races.
        policy = write_policy(
            tmp,
            lab_env,
            name,
            '[switchover]\ndrain = "gated"',
            [record(tmp, "drain", "--sleep-ms=200"), RDMA_DRAIN],
            peers=True,
        )
        run = migrate(lab_env, name, policy, tmp)
        stats = stop_peer(peer)
        assert run.code == 0, run.err
        doc = run.doc
        assert doc["outcome"] == "succeeded" and doc["gate"] == "opened", (behaviour, doc["gate"])
        device = doc["devices"]["nic0"]
        assert device["trigger"] == "gate" and device["late"] is False
        slow = next(h for h in doc["hooks"] if h["trigger"] == "drain" and h["label"] == "record-hook")
        quiet = switchover_outage(stats)
        # The switchover came after the slow drain ended, by the orchestrator's own chain of records: the
        # supervisor stamps the hook's end before telling the orchestrator, which only then releases the
        # gate; the device's quiet time starts at QEMU's prepare event (11.0) or after the gate's release
        # (10.0). (A peer can date an outage only to its last unanswered probe, which a busy machine may
        # have sent just before the device went quiet: not a measure of this order.)
        assert slow["ended"] <= device["drain_finished"], (behaviour, slow, device)
        assert device["lead_ms"] is not None and device["lead_ms"] >= 0, (behaviour, device)
        assert slow["ended"] < quiet["end"], (behaviour, slow["ended"], quiet)
        assert stats["timeouts_quiet"] == 0, stats
        assert len(calls(tmp, "drain")) == 1 and len(calls(tmp, "undrain")) == 1
        assert runs_on(lab_env, 1, name) and lab_env.conn(0).find_domain(name) is None
        lab_env.remove(name)


def test_gated_failing_drain_aborts_before_any_device_goes_quiet(lab_env: Any, tmp_path: Path) -> None:
    name = lab_env.guest(0, workload="dirty", devices=2)
    peers = [start_peer(name, f"nic{i}", lab_env.root) for i in range(2)]
    policy = write_policy(
        tmp_path,
        lab_env,
        name,
        '[switchover]\ndrain = "gated"',
        [record(tmp_path, "drain", "--exit=1")],
        peers=True,
    )
    run = migrate(lab_env, name, policy, tmp_path)
    stats = [stop_peer(peer) for peer in peers]
    assert run.code == 5, run.err
    assert run.doc["outcome"] == "aborted" and run.doc["gate"] == "draining"
    assert all(never_quiet(s) for s in stats), ("no device went quiet", stats)
    assert all(d["quiet_at"] is None for d in run.doc["devices"].values())
    drains, undrains = calls(tmp_path, "drain"), calls(tmp_path, "undrain")
    assert sorted(d["args"][2] for d in drains) == sorted(u["args"][2] for u in undrains) == ["nic0", "nic1"]
    assert runs_on(lab_env, 0, name) and lab_env.conn(1).find_domain(name) is None
    lab_env.remove(name)


def test_an_idle_guest_passes_the_gate_early_and_is_drained_on_prepare(lab_env: Any, tmp_path: Path) -> None:
    name = lab_env.guest(0)  # firmware only: dirties nothing, converges even at the gate's 1 ms
    policy = write_policy(
        tmp_path, lab_env, name, '[switchover]\ndrain = "gated"', [record(tmp_path, "drain")]
    )
    run = migrate(lab_env, name, policy, tmp_path)
    assert run.code == 0, run.err
    assert run.doc["gate"] == "passed early"
    assert run.doc["devices"]["nic0"]["trigger"] == "prepare (gate passed early)"
    (drain,) = calls(tmp_path, "drain")
    assert drain["args"][3] == "pre-copy-p2p-prepare" and len(calls(tmp_path, "undrain")) == 1
    lab_env.remove(name)


def test_the_schedule_steps_are_read_back_from_qemu_at_their_times(lab_env: Any, tmp_path: Path) -> None:
    name = lab_env.guest(0, workload="dirty")
    steps = "[[switchover.steps]]\ndowntime_ms = 40\n[[switchover.steps]]\nafter_s = 4\ndowntime_ms = 400\n"
    policy = write_policy(tmp_path, lab_env, name, steps, [record(tmp_path, "drain")])
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        conn = lab_env.conn(0)
        while not stop.is_set():
            dom = conn.find_domain(name)
            if dom is not None and dom.job_stats() is not None:
                value = dom.max_downtime()  # None: the job ended meanwhile
                if value is not None and (not seen or seen[-1] != value):
                    seen.append(value)
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run = migrate(lab_env, name, policy, tmp_path)
    stop.set()
    watcher.join(10)
    assert run.code == 0, run.err
    assert seen == [40, 400], seen
    timeline = run.doc["timeline"]
    job = next(e["t"] for e in timeline if e["text"] == "phase job-running")
    step = next(e["t"] for e in timeline if "downtime limit 400 ms (step 2/2 (after 4 s))" in e["text"])
    assert step - job >= 4.0, "the orchestrator's own record: the second step came no earlier than due"
    lab_env.remove(name)


def test_a_stalled_migration_is_aborted_and_stays_on_the_source(lab_env: Any, tmp_path: Path) -> None:
    name = lab_env.guest(0, workload="dirty")
    body = "[switchover]\nstall_timeout_s = 4\n[[switchover.steps]]\ndowntime_ms = 20\n"
    policy = write_policy(tmp_path, lab_env, name, body, [record(tmp_path, "drain")])
    run = migrate(lab_env, name, policy, tmp_path)
    assert run.code == 4, run.err
    assert run.doc["outcome"] == "rolled-back" and "stalled" in run.doc["error"]
    assert calls(tmp_path, "drain") == [], "it never reached the switchover"
    assert runs_on(lab_env, 0, name) and lab_env.conn(1).find_domain(name) is None
    lab_env.remove(name)
