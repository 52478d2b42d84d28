"""Switchover groups on the lab: several dirtying guests migrated as one (`orchestrator migrate-group`),
real libvirtd and QEMU, simulated devices, an RDMA peer stand-in per device.

Every path ends with the three facts: each drained device undrained exactly once, never before its
drain ended; every VM running on exactly one host; the journal saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lab.runner import RECORD_HOOK, Run, cli
from lab.test_switchover import BANDWIDTH, RDMA_DRAIN, calls, never_quiet, runs_on

from orchestrator.lab.demo import start_peer, stop_peer


def group_policy(tmp: Path, lab: Any, *drain_options: str, peers: bool = True) -> Path:
    """A gated policy whose hooks record into hooks.ndjson (and disarm/re-arm the peers)."""
    log = tmp / "hooks.ndjson"
    record = [str(RECORD_HOOK), str(log), "{trigger}", "{domain}", "{device_id}", "{state}"]
    drain = json.dumps([*(a.replace("{trigger}", "drain") for a in record), *drain_options])
    undrain = json.dumps([a.replace("{trigger}", "undrain") for a in record])
    text = (
        f'[migration]\ndata_uri = "unix://{lab.root}/migrations/{{domain}}.sock"\n'
        '[switchover]\ndrain = "gated"\n'
        f'[[hooks.drain]]\nargv = {drain}\ntimeout_ms = 10000\non_failure = "abort"\n'
        f'[[hooks.undrain]]\nargv = {undrain}\non_failure = "continue"\n'
    )
    if peers:
        rdma = json.dumps(RDMA_DRAIN)
        text += f'[[hooks.drain]]\nargv = {rdma}\ntimeout_ms = 10000\non_failure = "abort"\n'
        text += (
            '[[hooks.undrain]]\nargv = ["orchestrator-rdma-hook", "undrain", "--domain", "{domain}", '
            '"--device", "{device_id}"]\non_failure = "continue"\n'
        )
    path = tmp / "policy.toml"
    path.write_text(text)
    return path


def migrate_group(lab: Any, tmp: Path, policy: Path, name: str, *members: str) -> Run:
    return cli(
        "migrate-group",
        name,
        *members,
        "--to",
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
        env={"ORCH_LAB_DIR": str(lab.root)},
        timeout=300,
    )


def each_device_undrained_once_after_its_drain(tmp: Path) -> set[tuple[str, str]]:
    """Fact 1 from the hooks' own records: every (domain, device) drained once and undrained once, the
    undrain starting after the drain ended. Returns the drained devices."""
    drains, undrains = calls(tmp, "drain"), calls(tmp, "undrain")
    ends = {
        json.loads(line)["pid"]: json.loads(line)["end"]
        for line in (tmp / "hooks.ndjson.ends").read_text().splitlines()
    }
    drained = [(d["args"][1], d["args"][2]) for d in drains]
    undrained = [(u["args"][1], u["args"][2]) for u in undrains]
    assert sorted(drained) == sorted(set(drained)), ("each device drained once", drained)
    assert sorted(undrained) == sorted(drained), ("each drained device undrained once", drained, undrained)
    for drain in drains:
        undrain = next(u for u in undrains if u["args"][1:3] == drain["args"][1:3])
        assert ends[drain["pid"]] <= undrain["t"], ("undrained after its drain ended", drain, undrain)
    return set(drained)


def history(tmp: Path, *args: str) -> Any:
    run = cli("history", *args, "--journal", str(tmp / "journal.sqlite"), "--json")
    assert run.code == 0, run.err
    return run.doc


def test_a_group_drains_once_and_switches_over_together(lab_env: Any, tmp_path: Path) -> None:
    guests = [lab_env.guest(0, workload="dirty", devices=2) for _ in range(2)]
    peers = [start_peer(g, f"nic{i}", lab_env.root) for g in guests for i in range(2)]
    policy = group_policy(tmp_path, lab_env)
    run = migrate_group(lab_env, tmp_path, policy, "job1", *guests)
    stats = [stop_peer(p) for p in peers]
    assert run.code == 0, run.err
    doc = run.doc
    assert doc["outcome"] == "succeeded", doc["error"]
    assert [s["step"] for s in doc["steps"]] == ["start", "drain", "release", "undrain"]
    members = {m["domain"]: m for m in doc["members"]}
    assert sorted(members) == sorted(guests)
    devices = [d for m in doc["members"] for d in m["devices"].values()]
    assert len(devices) == 4 and all(d["trigger"] == "gate" for d in devices)
    assert all(m["gate"] == "opened" and m["outcome"] == "succeeded" for m in doc["members"])
    # One drain window for the whole job: every device's drain had ended before any device went quiet
    # (the release waits for the last drain), and no undrain started before the last device ran again.
    last_drained = max(d["drain_finished"] for d in devices)
    assert all(d["quiet_at"] is not None and d["quiet_at"] >= last_drained for d in devices), devices
    last_running = max(d["running_at"] for d in devices)
    assert all(d["undrain_started"] >= last_running for d in devices), devices
    assert doc["drain_started"] <= last_drained <= doc["released"] <= min(d["quiet_at"] for d in devices)
    assert doc["stall_ms"] is not None and doc["stall_ms"] > 0
    assert all(s["timeouts_quiet"] == 0 for s in stats), stats
    drained = each_device_undrained_once_after_its_drain(tmp_path)
    assert drained == {(g, f"nic{i}") for g in guests for i in range(2)}
    for g in guests:
        assert runs_on(lab_env, 1, g) and lab_env.conn(0).find_domain(g) is None
    # The journal: the group as its own row, its members pointing to it.
    rows = history(tmp_path)
    group = next(r for r in rows if r["id"] == doc["group_id"])
    assert group["kind"] == "group" and group["outcome"] == "succeeded" and group["domain"] == "job1"
    shown = history(tmp_path, doc["group_id"])
    items = shown.get("items") or shown.get("children") or []
    assert sorted(i["domain"] for i in items) == sorted(guests), shown.keys()
    assert all(i["kind"] == "group-member" and i["outcome"] == "succeeded" for i in items)
    for g in guests:
        lab_env.remove(g)


def test_a_member_failing_its_drain_aborts_every_member_before_any_switchover(
    lab_env: Any, tmp_path: Path
) -> None:
    guests = [lab_env.guest(0, workload="dirty") for _ in range(2)]
    peers = [start_peer(g, "nic0", lab_env.root) for g in guests]
    policy = group_policy(tmp_path, lab_env, f"--exit-{guests[1]}=1", "--sleep-ms=100")
    run = migrate_group(lab_env, tmp_path, policy, "job2", *guests)
    stats = [stop_peer(p) for p in peers]
    assert run.code == 5, run.err
    doc = run.doc
    assert doc["outcome"] == "aborted" and "release" not in [s["step"] for s in doc["steps"]]
    assert [s["step"] for s in doc["steps"]][-2:] == ["abort", "undrain"], doc["steps"]
    assert all(never_quiet(s) for s in stats), ("no device went quiet", stats)
    assert all(m["outcome"] in ("aborted", "rolled-back") for m in doc["members"])
    drained = each_device_undrained_once_after_its_drain(tmp_path)
    assert {g for g, _ in drained} <= set(guests) and (guests[1], "nic0") in drained
    for g in guests:
        assert runs_on(lab_env, 0, g) and lab_env.conn(1).find_domain(g) is None
    rows = history(tmp_path)
    assert next(r for r in rows if r["id"] == doc["group_id"])["outcome"] == "aborted"
    for g in guests:
        lab_env.remove(g)


def test_a_member_refused_by_its_preflight_refuses_the_group(lab_env: Any, tmp_path: Path) -> None:
    guest = lab_env.guest(0, workload="dirty")
    policy = group_policy(tmp_path, lab_env, peers=False)
    run = migrate_group(lab_env, tmp_path, policy, "job3", guest, "no-such-vm")
    assert run.code == 2, run.err
    assert run.doc["outcome"] == "refused"
    assert not (tmp_path / "hooks.ndjson").exists() or not calls(tmp_path, "drain")
    assert runs_on(lab_env, 0, guest) and lab_env.conn(1).find_domain(guest) is None
    lab_env.remove(guest)


def test_a_group_killed_during_its_drain_is_finished_by_recover(lab_env: Any, tmp_path: Path) -> None:
    guests = [lab_env.guest(0, workload="dirty") for _ in range(2)]
    # The first drain hook SIGKILLs the orchestrator: the group is held (no release), partly drained.
    policy = group_policy(tmp_path, lab_env, "--kill-orchestrator=KILL", "--sleep-ms=300", peers=False)
    run = migrate_group(lab_env, tmp_path, policy, "job4", *guests)
    assert run.code == -9, (run.code, run.err)
    recovered = cli(
        "recover",
        "--journal",
        str(tmp_path / "journal.sqlite"),
        "--json",
        env={"ORCH_LAB_DIR": str(lab_env.root)},
        timeout=300,
    )
    assert recovered.code == 0, recovered.err
    drained = each_device_undrained_once_after_its_drain(tmp_path)
    assert drained, "the kill came in a drain hook: something was drained"
    # Held at the gate's floor, never released: recover aborted the jobs; each VM runs on its source.
    for g in guests:
        assert runs_on(lab_env, 0, g) and lab_env.conn(1).find_domain(g) is None
    rows = history(tmp_path)
    assert all(r["outcome"] not in (None, "running") for r in rows), rows
    group = next(r for r in rows if r["kind"] == "group")
    assert group["outcome"] == "interrupted" and group["domain"] == "job4"
    members = [r for r in rows if r["kind"] == "group-member"]
    assert sorted(m["domain"] for m in members) == sorted(guests)
    assert all(m["parent"] == group["id"] for m in members)
    assert recover_again_finds_nothing(tmp_path, lab_env)
    for g in guests:
        lab_env.remove(g)


def recover_again_finds_nothing(tmp: Path, lab: Any) -> bool:
    again = cli(
        "recover", "--journal", str(tmp / "journal.sqlite"), "--json", env={"ORCH_LAB_DIR": str(lab.root)}
    )
    return again.code == 0 and again.doc["recovered"] == [] and again.doc["skipped"] == []
