"""`orchestrator evacuate` on a three-host lab: placement, limits (from the journal's timestamps),
paired hooks, interruption and resumption, dry run, a destination down, nothing fitting."""

from __future__ import annotations

import json
import sqlite3
from itertools import combinations
from pathlib import Path
from typing import Any

from lab.runner import RECORD_HOOK, cli


def policy(lab: Any, tmp: Path, drain_opts: str = "") -> Path:
    path = tmp / f"evacuate{len(drain_opts)}.toml"
    log = tmp / "hooks.ndjson"

    def argv(trigger: str, opts: str) -> str:
        return json.dumps([str(RECORD_HOOK), str(log), trigger, "{domain}", "{device_id}", *opts.split()])

    path.write_text(
        f"""
[migration]
data_uri = "unix://{lab.root}/migrations/{{domain}}.sock"
[[hooks.drain]]
argv = {argv("drain", drain_opts)}
timeout_ms = 3000
[[hooks.undrain]]
argv = {argv("undrain", "")}
on_failure = "continue"
"""
    )
    return path


def hook_calls(tmp: Path) -> list[dict[str, Any]]:
    log = tmp / "hooks.ndjson"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def evacuate(lab: Any, tmp: Path, *args: str, to: tuple[int, ...] = (1, 2)) -> Any:
    dests = [a for i in to for a in ("--to", lab.hosts[i].uri)]
    return cli(
        "evacuate", "-c", lab.hosts[0].uri, *dests, "--journal", str(tmp / "j.sqlite"), "--json", *args
    )


def on_host(lab: Any, index: int, names: list[str]) -> set[str]:
    return {d.name for d in lab.conn(index).domains() if d.active and d.name in names}


def intervals(tmp: Path, parent: str) -> list[tuple[float, float, str]]:
    db = sqlite3.connect(tmp / "j.sqlite")
    rows = db.execute(
        "SELECT started, ended, destination_uri FROM migrations WHERE parent = ? AND outcome = 'succeeded'",
        (parent,),
    ).fetchall()
    return [(float(s), float(e), d) for s, e, d in rows]


def max_overlap(spans: list[tuple[float, float, str]]) -> int:
    points = sorted([(s, 1) for s, _e, _d in spans] + [(e, -1) for _s, e, _d in spans])
    best = level = 0
    for _t, step in points:
        level += step
        best = max(best, level)
    return best


def test_evacuate_six_guests_within_limits_with_paired_hooks(lab_env: Any, tmp_path: Path) -> None:
    names = [lab_env.guest(0, devices=1 if i % 2 == 0 else 0, transition_ms=100) for i in range(6)]
    dry = evacuate(
        lab_env,
        tmp_path,
        "--concurrency",
        "3",
        "--per-destination",
        "2",
        "--dry-run",
        "--policy",
        str(policy(lab_env, tmp_path)),
    )
    assert dry.code == 0, dry.err
    assert dry.doc["changed"] is False and len(dry.doc["plan"]) >= 6
    assert on_host(lab_env, 0, names) == set(names), "a dry run moves nothing"
    assert hook_calls(tmp_path) == []

    run = evacuate(
        lab_env,
        tmp_path,
        "--concurrency",
        "3",
        "--per-destination",
        "2",
        "--policy",
        str(policy(lab_env, tmp_path)),
    )
    assert run.code == 0, run.err
    doc = run.doc
    assert doc["empty"] is True and doc["changed"] is True
    assert on_host(lab_env, 0, names) == set()
    assert on_host(lab_env, 1, names) | on_host(lab_env, 2, names) == set(names)
    assert on_host(lab_env, 1, names) and on_host(lab_env, 2, names), "spread across both destinations"
    spans = intervals(tmp_path, doc["evacuation_id"])
    assert len(spans) == 6
    assert max_overlap(spans) <= 3
    for dest in {d for _s, _e, d in spans}:
        assert max_overlap([s for s in spans if s[2] == dest]) <= 2
    assert any(a[1] > b[0] and b[1] > a[0] for a, b in combinations(spans, 2)), (
        "migrations did run concurrently"
    )
    calls = hook_calls(tmp_path)
    for name in names[::2]:
        mine = [c["args"][0] for c in calls if c["args"][1] == name]
        assert mine == ["drain", "undrain"], (name, calls)
    again = evacuate(lab_env, tmp_path, "--policy", str(policy(lab_env, tmp_path)))
    assert again.code == 0 and again.doc["changed"] is False and again.doc["results"] == []
    for name in names:
        lab_env.remove(name)


def test_interrupted_evacuation_resumes_with_only_the_rest(lab_env: Any, tmp_path: Path) -> None:
    names = [lab_env.guest(0, devices=1, transition_ms=100) for _ in range(3)]
    # The first drain hook sends SIGTERM to the orchestrator: it finishes the running migration,
    # starts no other, and exits 130.
    first = evacuate(
        lab_env,
        tmp_path,
        "--concurrency",
        "1",
        "--policy",
        str(policy(lab_env, tmp_path, "--kill-orchestrator=TERM")),
    )
    assert first.code == 130, first.err
    doc = first.doc
    assert doc["interrupted"] is True
    moved = [r["domain"] for r in doc["results"] if r["outcome"] == "succeeded"]
    assert len(moved) == 1 and sorted(doc["left"]) == sorted(set(names) - set(moved))
    rest = evacuate(lab_env, tmp_path, "--policy", str(policy(lab_env, tmp_path)))
    assert rest.code == 0, rest.err
    assert sorted(r["domain"] for r in rest.doc["results"]) == sorted(set(names) - set(moved))
    assert on_host(lab_env, 0, names) == set()
    calls = hook_calls(tmp_path)
    for name in names:
        assert [c["args"][0] for c in calls if c["args"][1] == name] == ["drain", "undrain"]
    for name in names:
        lab_env.remove(name)


def test_one_destination_down_the_other_takes_all(lab_env: Any, tmp_path: Path) -> None:
    names = [lab_env.guest(0, devices=0) for _ in range(2)]
    down = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    run = cli(
        "evacuate",
        "-c",
        lab_env.hosts[0].uri,
        "--to",
        down,
        "--to",
        lab_env.hosts[2].uri,
        "--journal",
        str(tmp_path / "j.sqlite"),
        "--json",
        "--policy",
        str(policy(lab_env, tmp_path)),
    )
    assert run.code == 0, run.err
    assert [u["uri"] for u in run.doc["unreachable"]] == [down]
    assert on_host(lab_env, 2, names) == set(names)
    for name in names:
        lab_env.remove(name)


def test_nothing_fits_moves_nothing_and_says_why(lab_env: Any, tmp_path: Path) -> None:
    name = lab_env.guest(0, devices=0)
    run = evacuate(lab_env, tmp_path, "--reserve", "100000000", "--policy", str(policy(lab_env, tmp_path)))
    assert run.code == 8, run.err
    assert run.doc["changed"] is False and run.doc["results"] == []
    unplaced = {u["domain"]: u["reason"] for u in run.doc["unplaced"]}
    assert "needs 64 MiB" in unplaced[name]
    assert name in on_host(lab_env, 0, [name])
    lab_env.remove(name)


def test_evacuate_bad_input(lab_env: Any, tmp_path: Path) -> None:
    a = lab_env.hosts[0].uri
    cases = [
        (["evacuate", "-c", a], 2, "--to"),
        (["evacuate", "-c", a, "--to", a], 2, "source itself"),
        (["evacuate", "-c", a, "--to", lab_env.hosts[1].uri, "--concurrency", "0"], 2, "--concurrency"),
        (
            ["evacuate", "-c", a, "--to", lab_env.hosts[1].uri, "--include", "no-such-*"],
            6,
            "matches --include",
        ),
    ]
    for args, code, text in cases:
        run = cli(*args, "--journal", str(tmp_path / "j.sqlite"))
        lines = run.err.strip().splitlines()
        assert run.code == code and len(lines) == 1 and text in lines[0], (args, run.code, run.err)


def test_inactive_vms_move_by_definition_only(lab_env: Any, tmp_path: Path) -> None:
    import uuid

    from orchestrator.core import domxml
    from orchestrator.lab import guest as lab_guest

    name = f"off-{uuid.uuid4().hex[:8]}"
    lab_guest.create_guest(lab_env.hosts[0], lab_guest.GuestSpec(name=name), start=False, root=lab_env.root)
    without = evacuate(lab_env, tmp_path, "--include", name, "--policy", str(policy(lab_env, tmp_path)))
    assert without.code == 0 and without.doc["results"] == [], "shut-off VMs stay unless --inactive"
    run = evacuate(
        lab_env,
        tmp_path,
        "--include",
        name,
        "--inactive",
        "--to",
        lab_env.hosts[1].uri,
        "--policy",
        str(policy(lab_env, tmp_path)),
        to=(),
    )
    assert run.code == 0, run.err
    assert [(r["domain"], r["outcome"]) for r in run.doc["results"]] == [(name, "succeeded")]
    assert lab_env.conn(0).find_domain(name) is None
    moved = lab_env.conn(1).domain(name)
    assert moved.state() == "shut off", "moved by definition only: not started"
    assert domxml.events_status(lab_env.conn(1).xml(moved, inactive=True)).all_enabled
    lab_env.remove(name)


def recording_policy(lab: Any, tmp: Path) -> Path:
    """Hooks that record into hooks.ndjson (as lab.test_group's, which each_device_undrained_once_...
    reads), with room for a loaded machine; the policy's drain mode is prepare: a group drains gated."""
    log = tmp / "hooks.ndjson"

    def argv(trigger: str) -> str:
        return json.dumps([str(RECORD_HOOK), str(log), trigger, "{domain}", "{device_id}", "{state}"])

    path = tmp / "group-policy.toml"
    path.write_text(
        f'[migration]\ndata_uri = "unix://{lab.root}/migrations/{{domain}}.sock"\n'
        f"[[hooks.drain]]\nargv = {argv('drain')}\ntimeout_ms = 20000\n"
        f'[[hooks.undrain]]\nargv = {argv("undrain")}\ntimeout_ms = 20000\non_failure = "continue"\n'
    )
    return path


def test_evacuate_moves_a_metadata_group_as_one_switchover_group(lab_env: Any, tmp_path: Path) -> None:
    """Two dirtying guests labelled with one group in their <metadata> and one unlabelled guest:
    `evacuate --group-by metadata` moves all three, the two as one switchover group (the group's row a
    child of the evacuation's, theirs children of the group's), each device drained and undrained once."""
    import libvirt
    from lab.test_group import each_device_undrained_once_after_its_drain, history
    from lab.test_switchover import BANDWIDTH

    from orchestrator.core import domxml

    grouped = [lab_env.guest(0, workload="dirty") for _ in range(2)]
    alone = lab_env.guest(0)
    names = [*grouped, alone]
    for name in grouped:  # what `virsh metadata NAME --uri URN --key orch --set '<group>...'` does
        lab_env.conn(0).domain(name).raw.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            "<group>job-e</group>",
            domxml.GROUP_KEY,
            domxml.GROUP_NS,
            libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
        assert domxml.group_label(lab_env.conn(0).xml(lab_env.conn(0).domain(name))) == "job-e"
    run = cli(
        "evacuate",
        "-c",
        lab_env.hosts[0].uri,
        "--to",
        lab_env.hosts[1].uri,
        "--to",
        lab_env.hosts[2].uri,
        *(a for name in names for a in ("--include", name)),
        "--group-by",
        "metadata",
        "--concurrency",
        "3",
        "--policy",
        str(recording_policy(lab_env, tmp_path)),
        "--journal",
        str(tmp_path / "journal.sqlite"),
        "--bandwidth",
        BANDWIDTH,
        "--json",
        env={"ORCH_LAB_DIR": str(lab_env.root)},
        timeout=300,
    )
    assert run.code == 0, run.err
    doc = run.doc
    assert doc["empty"] is True and doc["changed"] is True
    results = {r["domain"]: r for r in doc["results"]}
    assert {n: (r["outcome"], r["group"]) for n, r in results.items()} == {
        grouped[0]: ("succeeded", "job-e"),
        grouped[1]: ("succeeded", "job-e"),
        alone: ("succeeded", None),
    }
    assert on_host(lab_env, 0, names) == set()
    assert on_host(lab_env, 1, names) | on_host(lab_env, 2, names) == set(names)
    (group,) = doc["groups"]
    assert group["group"] == "job-e" and group["outcome"] == "succeeded"
    assert sorted(group["members"]) == sorted(grouped)
    # The journal: evacuation -> group -> its members; the unlabelled VM an item of the evacuation.
    evacuation = history(tmp_path, doc["evacuation_id"])
    assert evacuation["kind"] == "evacuation"
    items = {i["id"]: i for i in evacuation["items"]}
    assert items[group["group_id"]]["kind"] == "group"
    assert items[results[alone]["migration_id"]]["kind"] == "evacuate-item"
    shown = history(tmp_path, group["group_id"])
    assert shown["kind"] == "group" and shown["parent"] == doc["evacuation_id"]
    assert shown["outcome"] == "succeeded" and shown["domain"] == "job-e"
    members = {i["domain"]: i for i in shown["items"]}
    assert sorted(members) == sorted(grouped)
    for name in grouped:
        assert members[name]["kind"] == "group-member" and members[name]["parent"] == group["group_id"]
        assert members[name]["id"] == results[name]["migration_id"]
        assert members[name]["outcome"] == "succeeded"
    drained = each_device_undrained_once_after_its_drain(tmp_path)
    assert drained == {(name, "nic0") for name in names}
    for name in names:
        lab_env.remove(name)
