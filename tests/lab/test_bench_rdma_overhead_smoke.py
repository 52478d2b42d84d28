"""Smoke tests of bench/rdma_survival.py and bench/overhead.py: tiny runs, each on a lab of its own.

Like test_bench_smoke.py, they do not use the session's `lab_env` (each benchmark brings up and tears
down its own two hosts) and skip (fail under CI) when the machine cannot host a lab. Together they
take about a minute on an idle machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lab.benchtools import BENCH, need_lab, run_bench

SMOKE_CELLS = [
    "gated/11.0/quiet/10ms",
    "prepare/11.0/quiet/armed",
    "start/11.0/loaded/100ms",
    "prepare/10.0/quiet/10ms",
]


def test_rdma_survival_cell_filters() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "rdma_survival.py"), "--list-cells"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    cells = proc.stdout.split()
    # {prepare, gated, start} x {11.0, 10.0} x {quiet, loaded} x {10ms, 100ms}, plus the armed pair
    assert len(cells) == len(set(cells)) == 3 * 2 * 2 * 2 + 2, cells
    assert {c for c in cells if c.endswith("/armed")} == {
        "prepare/11.0/quiet/armed",
        "gated/11.0/quiet/armed",
    }
    proc = subprocess.run(
        [
            *(sys.executable, str(BENCH / "rdma_survival.py"), "--list-cells"),
            *("--modes", "gated,start", "--cells", "*/10.0/quiet/*,*/*/*/armed"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.split() == [
        "gated/11.0/quiet/armed",
        "gated/10.0/quiet/10ms",
        "start/10.0/quiet/10ms",
        "gated/10.0/quiet/100ms",
        "start/10.0/quiet/100ms",
    ], proc.stdout


@pytest.mark.lab
def test_rdma_survival_bench_smoke(tmp_path: Path) -> None:
    need_lab()
    out_json, out_svg = tmp_path / "rdma.json", tmp_path / "rdma.svg"
    proc, leftovers = run_bench(
        "rdma_survival.py",
        *("--migrations", "1", "--cells", ",".join(SMOKE_CELLS)),
        *("--json", str(out_json), "--svg", str(out_svg)),
    )
    assert proc.returncode == 0, proc.stderr
    assert leftovers == [], "the benchmark tears its lab down"
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["cell", "migr", "to/migr", "max"], proc.stdout
    # the table keeps the matrix's order: 11.0 quiet 10 ms (modes side by side), its armed pair, ...
    order = ["gated/11.0/quiet/10ms", "prepare/11.0/quiet/armed", "start/11.0/loaded/100ms"]
    assert [line.split()[0] for line in lines[2:6]] == [*order, "prepare/10.0/quiet/10ms"], proc.stdout

    doc = json.loads(out_json.read_text())
    assert doc["config"]["migrations"] == 1 and doc["config"]["bandwidth_mib_s"] == 32
    assert doc["config"]["transition_ms"] == 300 and doc["config"]["peer_timeout_ms"] == 30
    assert sorted(doc["cells"]) == sorted(SMOKE_CELLS)
    for name, cell in doc["cells"].items():
        assert cell["migrations"] == 1 and len(cell["migrations_detail"]) == 1, name
        (one,) = cell["migrations_detail"]
        assert one["timeouts"] == cell["timeouts_total"] == sum(cell["timeouts_per_migration"]), name
        assert one["hogs"] == (doc["config"]["hogs_when_loaded"] if cell["load"] == "loaded" else 0), name
        assert one["quiet_ms"] is not None and one["quiet_ms"] >= 0.8 * 300, (name, one["outage_ms"])
        assert len(one["timeout_left_ms"]) == 1 == cell["disarms"], (name, one)  # one device, one disarm
        assert all(h.endswith(":ok") for h in one["hooks"]), (name, one["hooks"])
        # a dirtying guest of 128 MiB at 32 MiB/s (its untouched pages travel as zero pages)
        assert 1.0 < one["wall_s"] < 300, (name, one["wall_s"])
        assert 0 < one["drain_hook_ms"] < 2000, (name, one["drain_hook_ms"])
    gated, armed = doc["cells"]["gated/11.0/quiet/10ms"], doc["cells"]["prepare/11.0/quiet/armed"]
    start, late = doc["cells"]["start/11.0/loaded/100ms"], doc["cells"]["prepare/10.0/quiet/10ms"]
    # QEMU 10 has no prepare state: the drain comes after the 300 ms transition, the peers timed out.
    assert late["late_drains"] == 1 and late["triggers"] == {"late": 1}, late["triggers"]
    assert late["timeouts_in_device_quiet"] == 1 and late["timeout_left_ms_min"] < 0, late
    # Gated: drained once QEMU would converge, before the switchover, however long the hook (10 ms + its
    # program's start here); a guest that converged anyway is drained on its prepare event instead.
    if gated["gates"] == {"opened": 1}:
        assert gated["triggers"] == {"gate": 1} and gated["timeout_left_ms_min"] > 30, gated
        assert gated["timeouts_in_device_quiet"] == 0, gated
    # Start: drained before the job, so for all of it (seconds: the whole copy).
    assert start["triggers"] == {"start": 1} and start["drained_ms_median"] > 1000, start
    assert start["drained_ms_median"] > max(gated["drained_ms_max"], armed["drained_ms_max"]), start
    assert start["timeout_left_ms_min"] > 1000 and start["timeouts_in_device_quiet"] == 0, start
    assert start["drain_hook_ms_median"] >= 100, "the 100 ms hook sleeps 100 ms"
    # Armed (the shipped rdma-drain): no process start at the event: the drain is a line on a pipe.
    assert armed["triggers"] == {"prepare": 1} and armed["timeout_left_ms_min"] > 0, armed
    assert armed["drain_hook_ms_median"] < gated["drain_hook_ms_median"], (armed, gated)
    assert any(h.startswith("drain:rdma-drain:") for h in armed["migrations_detail"][0]["hooks"])
    assert set(doc["peers"]) == {"11.0", "10.0"}
    assert all(peer["timeouts"] >= 0 and peer["disarms"] for peer in doc["peers"].values())
    svg = out_svg.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert all(name in svg for name in SMOKE_CELLS)


@pytest.mark.lab
def test_overhead_bench_smoke(tmp_path: Path) -> None:
    need_lab()
    out_json = tmp_path / "overhead.json"
    proc, leftovers = run_bench("overhead.py", "--pairs", "2", "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr
    assert leftovers == [], "the benchmark tears its lab down"
    assert any(line.startswith("orchestrator migrate ") for line in proc.stdout.splitlines())
    assert any(line.startswith("virsh migrate ") for line in proc.stdout.splitlines())
    assert "orchestrator/virsh per pair: median x" in proc.stdout

    doc = json.loads(out_json.read_text())
    runs = doc["runs"]
    assert [(r["pair"], r["method"]) for r in runs] == [
        (1, "orchestrator"),
        (1, "virsh"),
        (2, "virsh"),
        (2, "orchestrator"),
    ]
    for method in ("orchestrator", "virsh"):
        stats = doc["wall_s"][method]
        assert stats["count"] == 2 and 0 < stats["min"] <= stats["median"] <= stats["max"], stats
        assert {r["direction"] for r in runs if r["method"] == method} == {"lab-a -> lab-b", "lab-b -> lab-a"}
    assert doc["ratio"]["median"] > 0 and doc["ratio"]["p90"] > 0 and len(doc["ratio"]["per_pair"]) == 2
    split = doc["orchestrator_split_s"]
    assert split["job"]["count"] == 2 and split["startup_and_exit"]["median"] > 0
