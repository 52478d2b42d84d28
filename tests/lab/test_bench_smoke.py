"""Smoke test of bench/drain_latency.py: a short run (1 VM, then 2 VMs at once) on a lab of its own.

Every row runs: armed and spawned hooks through `orchestrator migrate`, the same through one
`orchestrator evacuate` (2 VMs), the `virsh ... --loop | sh` baseline, and the relay floor of the
benchmark's own libvirt callback. The benchmark brings up and tears down its own two lab hosts, so
this test does not use the session's `lab_env`; it skips (fails under CI) for the same reasons the lab
tests do. About 50 s on an idle machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lab.benchtools import need_lab, run_bench

pytestmark = pytest.mark.lab

ROWS = {
    "1": ["armed", "spawned", "baseline"],
    "2": ["armed", "spawned", "armed-evacuate", "spawned-evacuate", "baseline"],
}
LABELS = {
    "1": ["armed hook", "spawned hook", "virsh | sh", "relay floor (bare callback)"],
    "2": [
        "armed, 2 migrate",
        "spawned, 2 migrate",
        "armed, 1 evacuate",
        "spawned, 1 evacuate",
        "virsh | sh",
        "relay floor (bare callback)",
    ],
}


def test_drain_latency_bench_smoke(tmp_path: Path) -> None:
    need_lab("gcc")
    out_json, out_svg = tmp_path / "drain.json", tmp_path / "drain.svg"
    proc, leftovers = run_bench(
        "drain_latency.py",
        *("--events", "8", "--devices", "4", "--vms", "1,2"),
        *("--json", str(out_json), "--svg", str(out_svg)),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert leftovers == [], "the benchmark tears its lab down"

    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("vms"))
    assert header.split() == [
        *("vms", "row", "count", "p50", "ms", "p90", "ms", "p99", "ms", "max", "ms"),
        *("p50/virsh", "p99/virsh"),
    ]
    start = lines.index(header) + 2  # after the header's rule
    rows = lines[start : start + sum(len(labels) for labels in LABELS.values())]
    for vms, labels in LABELS.items():
        assert [row[4:33].strip() for row in rows if row[:3].strip() == vms] == labels, proc.stdout
    baseline_row = next(row for row in rows if row[4:33].strip() == "virsh | sh")
    assert baseline_row.split()[-2:] == ["x1.00", "x1.00"], baseline_row

    doc = json.loads(out_json.read_text())
    assert doc["config"]["vms"] == [1, 2] and doc["config"]["events"] == 8
    assert doc["config"]["drain"] == "prepare"
    assert sorted(doc["scenarios"]) == ["1", "2"]
    devices = doc["config"]["devices"]
    for vms, scenario in doc["scenarios"].items():
        domains = scenario["domains"]
        assert len(domains) == int(vms) == scenario["vms"]
        assert list(scenario["series"]) == ROWS[vms]
        for name, series in scenario["series"].items():
            assert series["count"] >= 8 and len(series["latencies_ms"]) == series["count"], (vms, name)
            assert series["migrations"] == series["rounds"] * int(vms), (vms, name, series)
            assert all(0 < v < 1000 for v in series["latencies_ms"]), (vms, name, series["latencies_ms"])
            assert 0 < series["p50_ms"] <= series["p90_ms"] <= series["p99_ms"] <= series["max_ms"], series
            assert series["to_baseline"]["p50"] > 0 and series["to_baseline"]["p99"] > 0, series
            checks = series["timestamp_cross_check"]
            assert checks["differing"] == 0, (vms, name, checks)
            # exact pairing: one sample per (round, domain, device), every VM of every round present
            keys = {(r, domain, device) for r, domain, device, _pos, _ms in series["samples"]}
            assert len(keys) == len(series["samples"]) == series["count"], (vms, name)
            assert {domain for _r, domain, _dev, _pos, _ms in series["samples"]} == set(domains)
            assert len(keys) == series["rounds"] * int(vms) * devices, (vms, name)
            # the relay floor of the row's own events: one per event the benchmark's subscriber saw
            assert series["relay_floor"]["count"] == checks["confirmed"], (vms, name)
            if name != "baseline":
                parts = series["breakdown"]
                assert parts["qemu_to_callback"]["count"] == series["count"], (vms, name)
                assert parts["callback_to_hook"]["p50_ms"] > 0, (vms, name, parts)
        assert scenario["series"]["baseline"]["to_baseline"] == {"p50": 1.0, "p90": 1.0, "p99": 1.0}
        floor = scenario["relay_floor"]
        assert floor["count"] == sum(s["relay_floor"]["count"] for s in scenario["series"].values())
        assert floor["count"] >= 0.9 * sum(s["count"] for s in scenario["series"].values()), floor
        assert 0 < floor["p50_ms"] < 1000, floor

    one = doc["scenarios"]["1"]["series"]
    # What armed hooks are for: no process start between the orchestrator's callback and the hook
    # (a pipe write against fork, exec and the dynamic loader: about 0.3 against 1.2 ms here).
    armed_start = one["armed"]["breakdown"]["callback_to_hook"]["p50_ms"]
    spawned_start = one["spawned"]["breakdown"]["callback_to_hook"]["p50_ms"]
    assert armed_start < spawned_start, (armed_start, spawned_start)
    # Nothing beats a bare callback by much: the spawned hook comes after its own process start.
    assert doc["scenarios"]["1"]["relay_floor"]["p50_ms"] < one["spawned"]["p50_ms"], doc["scenarios"]["1"]

    svg = out_svg.read_text()
    # one CDF per row plus the relay floor: 4 for 1 VM, 6 for 2 VMs
    assert svg.startswith("<svg") and svg.count("<polyline") == 10
    assert "1 VM migrating" in svg and "2 VMs migrating at once" in svg
