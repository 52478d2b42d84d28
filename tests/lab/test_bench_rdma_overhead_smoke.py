"""Smoke tests of bench/rdma_survival.py and bench/overhead.py: tiny runs, each on a lab of its own.

Like test_bench_smoke.py, they do not use the session's `lab_env` (each benchmark brings up and tears
down its own two hosts) and skip (fail under CI) when the machine cannot host a lab. Together they
take about a minute on an idle machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lab.benchtools import need_lab, run_bench

pytestmark = pytest.mark.lab


def test_rdma_survival_bench_smoke(tmp_path: Path) -> None:
    need_lab()
    out_json, out_svg = tmp_path / "rdma.json", tmp_path / "rdma.svg"
    proc, leftovers = run_bench(
        "rdma_survival.py", "--migrations", "2", "--json", str(out_json), "--svg", str(out_svg)
    )
    assert proc.returncode == 0, proc.stderr
    assert leftovers == [], "the benchmark tears its lab down"
    assert proc.stdout.splitlines()[0].split()[:2] == ["configuration", "migr"], proc.stdout
    assert "promise (a) = 0 timeouts: kept" in proc.stdout, proc.stdout

    doc = json.loads(out_json.read_text())
    assert doc["config"]["migrations"] == 2 and doc["config"]["transition_ms"] == 300
    configs: dict[str, Any] = doc["configurations"]
    assert sorted(configs) == ["a", "b", "c"]
    for key, one in configs.items():
        assert one["migrations"] == 2 and len(one["timeouts_per_migration"]) == 2, key
        assert one["timeouts_total"] == sum(one["timeouts_per_migration"]), key
        assert one["timeouts_total"] == one["peer"]["timeouts"], key
        assert len(one["migrations_detail"]) == 2 and one["outages"] >= 2, key
        assert {m["direction"] for m in one["migrations_detail"]} == {"lab-a -> lab-b", "lab-b -> lab-a"}
    a, b, c = configs["a"], configs["b"], configs["c"]
    # The promise: draining on the prepare event, the peers never time out; without it they do.
    assert a["timeouts_total"] == 0, json.dumps(a["migrations_detail"])
    assert a["disarms"] == 2 and a["arms"] == 2 and a["late_drains"] == 0
    assert a["margin_ms_min"] is not None and a["margin_ms_min"] > 0, a["margins_ms"]
    assert min(c["timeouts_per_migration"]) >= 1, c["timeouts_per_migration"]
    assert c["disarms"] == 0 and c["margin_ms_min"] is None
    assert b["late_drains"] == 2 and b["margin_ms_median"] < 0, b["margins_ms"]
    assert doc["promise_zero_timeouts_with_prepare_drain"] is True
    svg = out_svg.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and svg.count("<rect") > 6


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
