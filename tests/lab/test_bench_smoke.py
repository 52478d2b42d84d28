"""Smoke test of bench/drain_latency.py: a short run (1 VM, then 2 VMs at once) on a lab of its own.

The benchmark brings up and tears down its own two lab hosts, so this test does not use the session's
`lab_env`; it skips (fails under CI) for the same reasons the lab tests do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lab.benchtools import need_lab, run_bench

pytestmark = pytest.mark.lab


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
    assert header.split() == ["vms", "method", "count", "p50", "ms", "p90", "ms", "p99", "ms", "max", "ms"]
    rows = [line.split() for line in lines]
    for vms in ("1", "2"):
        assert [vms, "orchestrator"] in [row[:2] for row in rows], proc.stdout
        assert [vms, "baseline"] in [row[:2] for row in rows], proc.stdout
        assert [vms, "baseline/orchestrator"] in [row[:2] for row in rows], proc.stdout
    assert "x" in next(row for row in rows if row[1:2] == ["baseline/orchestrator"])[2]

    doc = json.loads(out_json.read_text())
    assert doc["config"]["vms"] == [1, 2] and doc["config"]["events"] == 8
    assert sorted(doc["scenarios"]) == ["1", "2"]
    for vms, scenario in doc["scenarios"].items():
        domains = scenario["domains"]
        assert len(domains) == int(vms) == scenario["vms"]
        for name in ("orchestrator", "baseline"):
            series = scenario["series"][name]
            assert series["count"] >= 8 and len(series["latencies_ms"]) == series["count"], (vms, name)
            assert series["migrations"] == series["rounds"] * int(vms), (vms, name, series)
            assert all(0 < v < 1000 for v in series["latencies_ms"]), (vms, name, series["latencies_ms"])
            assert 0 < series["p50_ms"] <= series["p90_ms"] <= series["p99_ms"] <= series["max_ms"], series
            assert scenario["timestamp_cross_check"][name]["differing"] == 0, scenario[
                "timestamp_cross_check"
            ]
            # exact pairing: one sample per (round, domain, device), every VM of every round present
            keys = {(r, domain, device) for r, domain, device, _pos, _ms in series["samples"]}
            assert len(keys) == len(series["samples"]) == series["count"], (vms, name)
            assert {domain for _r, domain, _dev, _pos, _ms in series["samples"]} == set(domains)
            assert len(keys) == series["rounds"] * int(vms) * doc["config"]["devices"], (vms, name)
        assert scenario["ratios"]["p50"] > 0 and scenario["ratios"]["p99"] > 0
    svg = out_svg.read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4
    assert "1 VM migrating" in svg and "2 VMs migrating at once" in svg
