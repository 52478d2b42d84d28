"""Smoke test of bench/drain_latency.py: a short run (1 VM, then 2 VMs at once) on a lab of its own.

The benchmark brings up and tears down its own two lab hosts, so this test does not use the session's
`lab_env`; it skips (fails under CI) for the same reasons the lab tests do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "drain_latency.py"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = pytest.mark.lab


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    programs = ("libvirtd", "virtlogd", "qemu-system-x86_64", "unshare", "virsh", "gcc")
    missing = [p for p in programs if shutil.which(p) is None]
    return f"missing {', '.join(missing)} (run deploy/setup.sh)" if missing else None


def _processes_mentioning(text: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if text in line]


def test_drain_latency_bench_smoke(tmp_path: Path) -> None:
    reason = _unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"the benchmark cannot run under CI: {reason}")
        pytest.skip(reason)
    out_json, out_svg = tmp_path / "drain.json", tmp_path / "drain.svg"
    # Short, like the session lab's: libvirt's unix socket paths live under it.
    lab_dir = Path(tempfile.mkdtemp(prefix="bench-smoke-", dir="/var/tmp"))
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--events",
                "8",
                "--devices",
                "4",
                "--vms",
                "1,2",
                "--json",
                str(out_json),
                "--svg",
                str(out_svg),
                "--lab-dir",
                str(lab_dir),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=180,
            check=False,
        )
        leftovers = _processes_mentioning(str(lab_dir))
    finally:
        shutil.rmtree(lab_dir, ignore_errors=True)
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
