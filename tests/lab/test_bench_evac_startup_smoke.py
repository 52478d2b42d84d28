"""Smoke tests of bench/evacuation.py and bench/startup.py: short runs, so the scripts keep working.

The evacuation benchmark brings up and tears down three lab hosts of its own (not the session's
`lab_env`); it skips (fails under CI) for the same reasons the lab tests do. The start-up benchmark
needs no lab, only git and the history holding its 'before' revision.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lab.benchtools import BENCH, REPO, need_lab, run_bench

STARTUP = BENCH / "startup.py"


@pytest.mark.lab
def test_evacuation_bench_smoke(tmp_path: Path) -> None:
    need_lab()
    out_json, out_svg = tmp_path / "evac.json", tmp_path / "evac.svg"
    proc, leftovers = run_bench(
        "evacuation.py",
        *("--guests", "2", "--concurrency", "1", "--rounds", "1"),
        *("--json", str(out_json), "--svg", str(out_svg)),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert leftovers == [], "the benchmark tears its lab down"

    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("variant"))
    assert header.split() == ["variant", "wall", "s", "s/guest", "x", "serial", "speedup"]
    assert any(line.startswith("virsh serial loop ") for line in lines)
    assert any(line.startswith("evacuate -j1 ") for line in lines)

    doc = json.loads(out_json.read_text())
    assert doc["config"]["guests"] == 2 and doc["config"]["concurrency"] == [1]
    assert [v["name"] for v in doc["variants"]] == ["virsh serial loop", "evacuate -j1"]
    serial, evac = doc["variants"]
    assert serial["kind"] == "virsh" and serial["concurrency"] is None and serial["ratio_to_serial"] == 1.0
    assert evac["kind"] == "orchestrator" and evac["concurrency"] == 1
    for variant in doc["variants"]:
        assert 0 < variant["wall_s"] < 120, variant
        assert len(variant["walls_s"]) == 1
        assert variant["ratio_to_serial"] > 0 and variant["speedup"] > 0
        assert sorted(vm["destination"] for vm in variant["per_vm"]) == ["lab-b", "lab-c"], variant
    svg = out_svg.read_text()
    assert svg.startswith("<svg") and svg.count('fill="#1f77b4"') == 1 and svg.count('fill="#d62728"') == 1


def test_startup_bench_smoke(tmp_path: Path) -> None:
    found = re.search(r'^BEFORE_REV = "([0-9a-f]{40})"$', STARTUP.read_text(), re.MULTILINE)
    assert found, "bench/startup.py names its 'before' revision"
    before_rev = found[1]
    git = shutil.which("git")
    has_rev = git is not None and (
        subprocess.run(
            [git, "-C", str(REPO), "cat-file", "-e", f"{before_rev}^{{commit}}"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if not has_rev:
        pytest.skip(f"needs git and the history holding {before_rev[:12]} (the 'before' variant)")
    out_json = tmp_path / "startup.json"
    proc = subprocess.run(
        [sys.executable, str(STARTUP), "--runs", "3", "--json", str(out_json)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:3] == ["command", "before", "p50"]

    doc = json.loads(out_json.read_text())
    assert doc["config"]["runs"] == 3
    assert set(doc["commands"]) == {"--help", "migrate --help"}
    for command in doc["commands"].values():
        for variant in ("before", "after", "installed"):
            stats = command[variant]
            assert stats["count"] == 3 and len(stats["runs_ms"]) == 3, stats
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"], stats
        assert command["after_over_before"] > 0
    assert doc["config"]["cli_sources"]["after"].startswith(str(REPO))
    assert not doc["config"]["cli_sources"]["before"].startswith(str(REPO))
    for variant in ("before", "after"):
        found = doc["importtime_migrate_help"][variant]
        assert found["modules"] > 0 and found["top_level"] and found["packages"], found
    # What the start-up work removed stays removed: no rich, no pydantic for help.
    gone = {p["package"] for p in doc["packages_no_longer_imported"]}
    assert {"rich", "pydantic"} <= gone, gone
    assert set(doc["removed_imports_ms"]) == {"typer.rich_utils (rich help)", "typer._adapters (pydantic)"}
    assert set(doc["after_phases_ms"]) >= {"import typer", "get_command (all commands built)"}
