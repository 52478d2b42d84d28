#!/usr/bin/env python3
"""Overhead: wall time of `orchestrator migrate` versus a bare `virsh migrate` of the same guest.

On a lab of its own (two libvirtd daemons, real QEMU, one guest with one simulated VFIO device and a
P2P transition of --transition-ms), the guest migrates back and forth, each run a fresh process as a
user or a playbook would start it:

- orchestrator: `orchestrator migrate DOMAIN DESTURI -c SRC --policy default --migrateuri unix://...
  --journal FILE --json` (pre-flight, event subscriptions on both hosts, the journal, no hooks; --json
  for its outcome and its own timings, which split its wall time);
- virsh: `virsh -c SRC migrate --live --p2p --persistent --undefinesource DOMAIN DESTURI --migrateuri
  unix://...` (the same libvirt flags).

Runs come in pairs whose order alternates (orchestrator, virsh, virsh, orchestrator, ...), so both
methods see the same machine conditions and both directions. One unmeasured pair warms up first. The
ratio is orchestrator / virsh within each pair; the report gives the medians, p90 and the median of
the per-pair ratios and differences.

Usage: .venv/bin/python bench/overhead.py [--pairs N] [--json PATH] [--transition-ms MS] [--lab-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    BenchError,
    OwnLab,
    exit_on_sigterm,
    in_work_dir,
    machine,
    migrate_command,
    own_lab,
    percentile,
    program,
    rounded,
    run,
    write_json,
)

from orchestrator.lab import guest as lab_guest

DEFAULT_JSON = RESULTS / "overhead.json"
METHODS = ("orchestrator", "virsh")


@dataclass(frozen=True)
class Run:
    """One measured migration."""

    pair: int
    method: str  # "orchestrator" | "virsh"
    direction: str  # "lab-a -> lab-b"
    wall_s: float
    # orchestrator only, from its --json report: its own run from start to end (total_s), and of that
    # the libvirt migration call (job_s); wall_s - total_s is the process's start-up and exit.
    total_s: float | None = None
    job_s: float | None = None


@dataclass
class Bench:
    """The lab, the guest, where it runs, and the runs so far."""

    lab: OwnLab
    domain: str
    journal: Path
    where: int = 0
    count: int = 0

    def command(self, method: str, src: int, dst: int) -> list[str]:
        """The argv of one migration of the guest from host `src` to host `dst`."""
        source, destination = self.lab.hosts[src].uri, self.lab.hosts[dst].uri
        data_uri = self.lab.data_uri(self.domain)
        if method == "orchestrator":
            return migrate_command(
                program("orchestrator"), self.domain, destination, source, "default", data_uri, self.journal
            )
        return [
            *program("virsh"),
            "-c",
            source,
            "migrate",
            "--live",
            "--p2p",
            "--persistent",
            "--undefinesource",
            self.domain,
            destination,
            "--migrateuri",
            data_uri,
        ]

    def migrate(self, method: str, pair: int) -> Run:
        """Migrate the guest to the other host with `method`; returns the run, timed around the process."""
        src, dst = self.where, 1 - self.where
        self.count += 1
        command = self.command(method, src, dst)
        began = time.monotonic()
        result = run(command, f"{method} migration {self.count}", env=self.lab.env)
        wall = time.monotonic() - began
        # Checked after the clock stopped: the guest runs on the destination and is gone from the source.
        state = self.lab.conns[dst].domain(self.domain).state()
        if state != "running" or self.lab.conns[src].find_domain(self.domain) is not None:
            raise BenchError(f"{method} migration {self.count}: the guest is {state!r} on the destination")
        self.where = dst
        return Run(
            pair,
            method,
            f"{self.lab.hosts[src].name} -> {self.lab.hosts[dst].name}",
            round(wall, 4),
            *self._timings(method, result.stdout),
        )

    def _timings(self, method: str, stdout: str) -> tuple[float | None, float | None]:
        """(total_s, job_s) of the orchestrator's report; (None, None) for virsh."""
        if method != "orchestrator":
            return None, None
        report = json.loads(stdout)
        if report.get("outcome") != "succeeded":
            raise BenchError(f"orchestrator migration {self.count}: outcome {report.get('outcome')}")
        timings = report.get("timings", {})
        return timings.get("total_s"), timings.get("job_s")


def measure(args: argparse.Namespace, work: Path) -> tuple[list[Run], float]:
    """Warm up, then the pairs; returns (runs, seconds)."""
    began = time.monotonic()
    runs: list[Run] = []
    with own_lab(args.lab_dir) as lab:
        domain = f"ov-{uuid.uuid4().hex[:6]}"
        spec = lab_guest.GuestSpec(name=domain, devices=1, transition_ms=args.transition_ms)
        lab_guest.create_guest(lab.hosts[0], spec, root=lab.root)
        bench = Bench(lab, domain, work / "journal.sqlite")
        try:
            for method in METHODS:  # warm-up: both methods, both directions, not measured
                bench.migrate(method, 0)
            for pair in range(1, args.pairs + 1):
                order = METHODS if pair % 2 else tuple(reversed(METHODS))
                for method in order:
                    runs.append(bench.migrate(method, pair))
                done = {r.method: r.wall_s for r in runs if r.pair == pair}
                print(
                    f"pair {pair}/{args.pairs}: orchestrator {done['orchestrator']:.3f} s, "
                    f"virsh {done['virsh']:.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            lab.remove(domain)
    return runs, time.monotonic() - began


# --- reporting ----------------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, Any]:
    """count, median, p90, min, max."""
    return {
        "count": len(values),
        "median": rounded(statistics.median(values), 4) if values else None,
        "p90": rounded(percentile(values, 90), 4),
        "min": rounded(min(values), 4) if values else None,
        "max": rounded(max(values), 4) if values else None,
    }


def results(runs: Sequence[Run], args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    walls = {m: [r.wall_s for r in runs if r.method == m] for m in METHODS}
    pairs = sorted({r.pair for r in runs})
    by_pair = {(r.pair, r.method): r.wall_s for r in runs}
    ratios = [by_pair[(p, "orchestrator")] / by_pair[(p, "virsh")] for p in pairs]
    diffs_ms = [(by_pair[(p, "orchestrator")] - by_pair[(p, "virsh")]) * 1000 for p in pairs]
    directions = sorted({r.direction for r in runs})
    orch = [r for r in runs if r.method == "orchestrator"]
    return {
        "config": {
            "pairs": args.pairs,
            "transition_ms": args.transition_ms,
            "devices": 1,
            "orchestrator": "orchestrator migrate DOMAIN DESTURI -c SRC --policy default "
            "--migrateuri unix://SOCK --journal FILE",
            "virsh": "virsh -c SRC migrate --live --p2p --persistent --undefinesource DOMAIN DESTURI "
            "--migrateuri unix://SOCK",
            **machine(),
        },
        "elapsed_s": round(elapsed, 1),
        "wall_s": {m: stats(walls[m]) for m in METHODS},
        "ratio": {
            "median": rounded(statistics.median(ratios), 4) if ratios else None,
            "p90": rounded(percentile(ratios, 90), 4),
            "of_medians": rounded(
                statistics.median(walls["orchestrator"]) / statistics.median(walls["virsh"]), 4
            )
            if ratios
            else None,
            "per_pair": [round(v, 4) for v in ratios],
        },
        "difference_ms": {
            "median": rounded(statistics.median(diffs_ms), 1) if diffs_ms else None,
            "p90": rounded(percentile(diffs_ms, 90), 1),
        },
        # Where the orchestrator's wall time goes, from its own report: the process's start-up and exit
        # (wall - total), its own work around the migration (total - job: connections, pre-flight,
        # event subscriptions, journal), and the libvirt migration call (job).
        "orchestrator_split_s": {
            "startup_and_exit": stats([r.wall_s - r.total_s for r in orch if r.total_s is not None]),
            "around_the_job": stats(
                [r.total_s - r.job_s for r in orch if r.total_s is not None and r.job_s is not None]
            ),
            "job": stats([r.job_s for r in orch if r.job_s is not None]),
        },
        "by_direction": {
            d: {m: stats([r.wall_s for r in runs if r.method == m and r.direction == d]) for m in METHODS}
            for d in directions
        },
        "runs": [asdict(r) for r in runs],
    }


def table(doc: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    header = f"{'method':<24} {'runs':>5} {'median s':>9} {'p90 s':>8} {'min s':>8} {'max s':>8}"
    lines = [header, "-" * len(header)]
    for method, label in (("orchestrator", "orchestrator migrate"), ("virsh", "virsh migrate")):
        s = doc["wall_s"][method]
        lines.append(
            f"{label:<24} {s['count']:>5} {s['median']:>9.3f} {s['p90']:>8.3f} "
            f"{s['min']:>8.3f} {s['max']:>8.3f}"
        )
    ratio, diff = doc["ratio"], doc["difference_ms"]
    lines.append(
        f"orchestrator/virsh per pair: median x{ratio['median']:.3f}, p90 x{ratio['p90']:.3f}; "
        f"difference median {diff['median']:+.0f} ms, p90 {diff['p90']:+.0f} ms"
    )
    split = doc["orchestrator_split_s"]
    if split["job"]["count"]:
        lines.append(
            f"orchestrator median split: start-up+exit {split['startup_and_exit']['median']:.3f} s, "
            f"around the job {split['around_the_job']['median']:.3f} s, "
            f"libvirt migration call {split['job']['median']:.3f} s"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=20, help="measured pairs (default 20)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    parser.add_argument(
        "--transition-ms", type=int, default=300, help="the device's P2P transition (default 300)"
    )
    parser.add_argument(
        "--lab-dir", type=Path, help="directory of the benchmark's own lab (default: temporary)"
    )
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if not 0 <= args.transition_ms <= 60000:
        parser.error("--transition-ms must be 0 to 60000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    exit_on_sigterm()
    measured = in_work_dir("overhead", "overhead-", lambda work: measure(args, work))
    if measured is None:
        return 1
    runs, elapsed = measured
    doc = results(runs, args, elapsed)
    print(table(doc))
    print(f"{args.pairs} pairs, {args.transition_ms} ms transition, {elapsed:.0f} s; numbers: {args.json}")
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
