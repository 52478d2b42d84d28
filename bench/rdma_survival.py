#!/usr/bin/env python3
"""RDMA survival: peer timeouts per live migration, with and without the prepare-event drain.

On a lab of its own (two libvirtd daemons, real QEMU, the simulated VFIO device), one guest with one
simulated device (`nic0`, a P2P transition of --transition-ms each way) migrates back and forth
--migrations times with `orchestrator migrate`, for each configuration:

- (a) QEMU 11.0 behaviour + the `rdma-drain` policy: the peers are disarmed on pre-copy-p2p-prepare,
  just before the device goes quiet;
- (b) QEMU 10.0 behaviour + `rdma-drain`: no prepare state, so the drain runs on the first P2P state
  (`pre-copy-p2p`), once the transition is over: the world before the prepare state;
- (c) QEMU 11.0 behaviour + the `default` policy: no hooks.

A stand-in for the device's RDMA peers (`orchestrator lab peer DOMAIN --timeout-ms T`) runs for the
whole series of a configuration: it probes the device every 5 ms and counts a timeout when no answer
comes within T ms while armed; the drain and undrain hooks disarm and re-arm it. Between migrations
the benchmark reads its counters (`stats` on its control socket); at the end it stops it with SIGINT
for its report. The margin of a disarm is the peer's own (`margins_ms`): how much of its timeout was
left when the disarm came, counted from the device going quiet; negative means too late. The
product's promise is (a) = zero timeouts.

Usage: .venv/bin/python bench/rdma_survival.py [--migrations N] [--transition-ms MS] [--timeout-ms MS]
                                               [--json PATH] [--svg PATH] [--lab-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    BenchError,
    OwnLab,
    exit_on_sigterm,
    fmt,
    in_work_dir,
    machine,
    migrate_command,
    own_lab,
    program,
    rounded,
    run,
    svg_start,
    write_json,
    xml,
)

from orchestrator.lab import guest as lab_guest
from orchestrator.lab.rdma_hook import control_path, send_command

DEFAULT_JSON = RESULTS / "rdma_survival.json"
DEFAULT_SVG = RESULTS / "rdma_survival.svg"
DEVICE = "nic0"
PEER_READY_S = 15.0  # the peer imports the package and binds its sockets
SETTLE_S = 0.25  # after a migration returns: the peer's last timeouts are counted by then
SETTLE_LIMIT_S = 15.0  # how long the device may stay quiet after a migration before it is an error


@dataclass(frozen=True)
class Config:
    """One configuration of the comparison."""

    key: str
    label: str
    behaviour: str  # the simulated QEMU: "11.0" (prepare state) or "10.0"
    policy: str  # the orchestrator policy


CONFIGS = (
    Config("a", "(a) 11.0 + rdma-drain: drain on prepare", "11.0", "rdma-drain"),
    Config("b", "(b) 10.0 + rdma-drain: drain on pre-copy-p2p", "10.0", "rdma-drain"),
    Config("c", "(c) 11.0 + default: no hooks", "11.0", "default"),
)
COLOURS = {"a": "#2ca02c", "b": "#ff7f0e", "c": "#d62728"}


@dataclass
class Migration:
    """One migration of a series and what the peer saw during it."""

    index: int
    direction: str  # "lab-a -> lab-b"
    began: float  # epoch seconds (the peer's clock too)
    ended: float
    timeouts: int  # the peer's timeouts from just before this migration until it had settled after it
    outage_ms: list[float]  # every outage the peer saw in that time
    late: bool  # the orchestrator drained on the first P2P state (no prepare state)
    hooks: list[str]  # "label:ok|failed"
    # From the peer's final report (see Series.analyse):
    quiet_ms: float | None = None  # the device's quiet time for its P2P transition and switchover
    quiet_timed_out: bool | None = None  # whether the peers timed out in it
    margins_ms: list[float] = field(default_factory=list)  # per disarm in this migration

    @property
    def wall_s(self) -> float:
        """Wall time of `orchestrator migrate`."""
        return self.ended - self.began


@dataclass
class Series:
    """All migrations of one configuration, and the peer's final report."""

    config: Config
    domain: str
    timeout_ms: float
    transition_ms: int
    migrations: list[Migration] = field(default_factory=list)
    peer: dict[str, Any] = field(default_factory=dict)

    def analyse(self) -> None:
        """Attribute the peer's outages and disarms to the migrations.

        The device's quiet time in a migration is the first outage that starts during it and lasts at
        least 80 % of the transition (shorter ones are probes answered late: CPU contention); without a
        transition, its longest outage. The margin of a disarm during the migration is the peer's formula
        applied to that outage: quiet start + timeout - disarm. Unlike the peer's own `margins_ms`, which
        measures from the next outage that has not ended by the disarm, this stays right when a late
        disarm comes after the device already answers again on the destination (very negative instead
        of measured against the next migration's outage).
        """
        outages = [o for o in self.peer.get("outages", []) if o.get("end") is not None]
        disarms = [float(t) for t in self.peer.get("disarms", [])]
        shortest = 0.8 * self.transition_ms / 1000
        for m in self.migrations:
            during = [o for o in outages if m.began <= o["start"] <= m.ended]
            long = [o for o in during if o["end"] - o["start"] >= shortest] if self.transition_ms else []
            quiet = long[0] if long else max(during, key=lambda o: o["end"] - o["start"], default=None)
            if quiet is None:
                continue
            m.quiet_ms = round((quiet["end"] - quiet["start"]) * 1000, 1)
            m.quiet_timed_out = bool(quiet.get("timed_out"))
            m.margins_ms = [
                round((quiet["start"] + self.timeout_ms / 1000 - disarm) * 1000, 2)
                for disarm in disarms
                if m.began <= disarm <= m.ended
            ]

    @property
    def per_migration(self) -> list[int]:
        """Peer timeouts of each migration."""
        return [m.timeouts for m in self.migrations]

    @property
    def margins(self) -> list[float]:
        """The margin (ms) of each disarm, attributed to its migration's quiet time."""
        return [v for m in self.migrations for v in m.margins_ms]

    def summary(self) -> dict[str, Any]:
        """The numbers of the table."""
        counts, margins = self.per_migration, self.margins
        quiet = [m.quiet_ms for m in self.migrations if m.quiet_ms is not None]
        in_quiet = sum(1 for m in self.migrations if m.quiet_timed_out)
        return {
            "migrations": len(counts),
            "timeouts_per_migration_mean": rounded(statistics.fmean(counts) if counts else math.nan),
            "timeouts_per_migration_max": max(counts) if counts else None,
            "timeouts_total": sum(counts),
            "timeouts_in_device_quiet": in_quiet,  # at most one per migration
            "timeouts_elsewhere": sum(counts) - in_quiet,  # probes answered late: CPU contention
            "peer_timeouts_reported": self.peer.get("timeouts"),
            "outages": len(self.peer.get("outages", [])),
            "device_quiet_ms_median": rounded(statistics.median(quiet) if quiet else math.nan, 1),
            "disarms": len(self.peer.get("disarms", [])),
            "arms": len(self.peer.get("arms", [])),
            "margin_ms_min": rounded(min(margins) if margins else math.nan, 2),
            "margin_ms_median": rounded(statistics.median(margins) if margins else math.nan, 2),
            "peer_margins_ms": self.peer.get("margins_ms", []),
            "late_drains": sum(1 for m in self.migrations if m.late),
            "migration_s_median": rounded(statistics.median([m.wall_s for m in self.migrations]), 3)
            if self.migrations
            else None,
        }


# --- the peer ---------------------------------------------------------------------------------------


class PeerProcess:
    """`orchestrator lab peer DOMAIN` in a child process, for one series."""

    def __init__(self, lab: OwnLab, domain: str, timeout_ms: float, work: Path) -> None:
        self.control = control_path(str(lab.root / "fabric"), domain, DEVICE)
        self.err_path = work / f"peer-{domain}.err"
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    *program("orchestrator"),
                    "lab",
                    "peer",
                    domain,
                    "--device",
                    DEVICE,
                    "--lab-dir",
                    str(lab.root),
                    "--timeout-ms",
                    f"{timeout_ms:g}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=lab.env,
            )
        deadline = time.monotonic() + PEER_READY_S
        while "ready" not in self.err_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the peer of {domain} did not start: {self.err_path.read_text().strip()}")
            time.sleep(0.02)  # it writes a file; nothing to wait on

    def stats(self) -> dict[str, Any]:
        """The peer's counters so far."""
        try:
            doc = json.loads(send_command(self.control, "stats", timeout_s=2.0))
        except (OSError, ValueError) as exc:
            raise BenchError(f"the peer at {self.control} did not answer `stats`: {exc}") from None
        if not isinstance(doc, dict):
            raise BenchError(f"the peer at {self.control} answered {doc!r}")
        return doc

    def settled(self, since: float) -> dict[str, Any]:
        """The counters once the device answers again and SETTLE_S has passed since `since` (monotonic)."""
        deadline = since + SETTLE_LIMIT_S
        while True:
            time.sleep(max(0.0, since + SETTLE_S - time.monotonic()) or 0.02)
            doc = self.stats()
            outages = doc.get("outages", [])
            if not outages or outages[-1].get("end") is not None:
                return doc
            if time.monotonic() > deadline:
                raise BenchError(f"the device stayed quiet {SETTLE_LIMIT_S:.0f} s after the migration")

    def finish(self) -> dict[str, Any]:
        """Stop the peer with SIGINT and return its JSON report."""
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise BenchError("the peer did not stop on SIGINT") from None
        if self.proc.returncode != 0:
            raise BenchError(f"the peer exited {self.proc.returncode}: {self.err_path.read_text().strip()}")
        doc = json.loads(out)
        if not isinstance(doc, dict):
            raise BenchError(f"the peer reported {doc!r}")
        return doc

    def kill(self) -> None:
        """End the peer (by its pid) if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --- measuring ----------------------------------------------------------------------------------------


def run_series(lab: OwnLab, config: Config, args: argparse.Namespace, work: Path) -> Series:
    """Create the configuration's guest, run its migrations under one peer, remove the guest."""
    domain = f"rs{config.key}-{uuid.uuid4().hex[:6]}"
    spec = lab_guest.GuestSpec(
        name=domain, devices=1, behaviour=config.behaviour, transition_ms=args.transition_ms
    )
    lab_guest.create_guest(lab.hosts[0], spec, root=lab.root)
    series = Series(config, domain, args.timeout_ms, args.transition_ms)
    journal = work / f"journal-{config.key}.sqlite"
    peer: PeerProcess | None = None
    where = 0
    try:
        peer = PeerProcess(lab, domain, args.timeout_ms, work)
        before = peer.stats()
        for index in range(1, args.migrations + 1):
            src, dst = where, 1 - where
            began, began_mono = time.time(), time.monotonic()
            result = run(
                migrate_command(
                    program("orchestrator"),
                    domain,
                    lab.hosts[dst].uri,
                    lab.hosts[src].uri,
                    config.policy,
                    lab.data_uri(domain),
                    journal,
                ),
                f"{config.label}: orchestrator migrate (migration {index})",
                env=lab.env,
            )
            ended, wall = time.time(), time.monotonic() - began_mono
            where = dst
            report = json.loads(result.stdout)
            if report.get("outcome") != "succeeded":
                raise BenchError(f"{config.label}, migration {index}: outcome {report.get('outcome')}")
            after = peer.settled(began_mono + wall)
            new_outages = after.get("outages", [])[len(before.get("outages", [])) :]
            migration = Migration(
                index=index,
                direction=f"{lab.hosts[src].name} -> {lab.hosts[dst].name}",
                began=began,
                ended=ended,
                timeouts=int(after["timeouts"]) - int(before["timeouts"]),
                outage_ms=[round((o["end"] - o["start"]) * 1000, 1) for o in new_outages if o.get("end")],
                late=any(d.get("late") for d in report.get("devices", {}).values()),
                hooks=[f"{h['label']}:{'ok' if h['ok'] else 'failed'}" for h in report.get("hooks", [])],
            )
            series.migrations.append(migration)
            before = after
            print(
                f"{config.key} {index}/{args.migrations} {migration.direction}: "
                f"{migration.timeouts} peer timeout(s), outage {migration.outage_ms} ms, "
                f"{wall:.2f} s{' (late drain)' if migration.late else ''}",
                file=sys.stderr,
                flush=True,
            )
        series.peer = peer.finish()
        series.analyse()
    finally:
        if peer is not None:
            peer.kill()
        lab.remove(domain)
    return series


def measure(args: argparse.Namespace, work: Path) -> tuple[list[Series], float]:
    """All configurations on one lab of the benchmark's own; returns (series, seconds)."""
    began = time.monotonic()
    with own_lab(args.lab_dir) as lab:
        done = [run_series(lab, config, args, work) for config in CONFIGS]
    return done, time.monotonic() - began


# --- reporting ----------------------------------------------------------------------------------------


def table(done: Sequence[Series]) -> str:
    """The results as a fixed-width table."""
    header = (
        f"{'configuration':<45} {'migr':>4} {'to/migr':>7} {'max':>3} {'total':>5} {'in quiet':>8} "
        f"{'outages':>7} {'margin min ms':>13} {'median ms':>9}"
    )
    lines = [header, "-" * len(header)]
    for one in done:
        s = one.summary()
        lines.append(
            f"{one.config.label:<45} {s['migrations']:>4} {fmt(s['timeouts_per_migration_mean'], '.2f', 7)} "
            f"{fmt(s['timeouts_per_migration_max'], 'd', 3)} {s['timeouts_total']:>5} "
            f"{s['timeouts_in_device_quiet']:>8} {s['outages']:>7} "
            f"{fmt(s['margin_ms_min'], '.1f', 13)} {fmt(s['margin_ms_median'], '.1f', 9)}"
        )
    return "\n".join(lines)


def results(done: Sequence[Series], args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    return {
        "config": {
            "migrations": args.migrations,
            "transition_ms": args.transition_ms,
            "peer_timeout_ms": args.timeout_ms,
            "peer_interval_ms": 5.0,
            "device": DEVICE,
            **machine(),
        },
        "elapsed_s": round(elapsed, 1),
        "configurations": {
            one.config.key: {
                "label": one.config.label,
                "behaviour": one.config.behaviour,
                "policy": one.config.policy,
                **one.summary(),
                "timeouts_per_migration": one.per_migration,
                "margins_ms": one.margins,
                "migrations_detail": [{**vars(m), "wall_s": round(m.wall_s, 3)} for m in one.migrations],
                "peer": one.peer,
            }
            for one in done
        },
        "promise_zero_timeouts_with_prepare_drain": sum(done[0].per_migration) == 0 if done else None,
    }


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """Round tick values covering [lo, hi], at most about six."""
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / 4)) if span > 0 else 1.0
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= 6:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 6) for i in range(int((hi - first) / step) + 1)]


def render_svg(done: Sequence[Series], timeout_ms: float, transition_ms: int) -> str:
    """Two bar charts side by side, as a standalone SVG: peer timeouts per migration (bar: mean,
    tick: max) and the disarm margins (min and median) of each configuration."""
    width, height = 900, 450
    top, plot_h = 60, 290
    out = svg_start(width, height)

    def text(x: float, y: float, content: str, anchor: str = "middle", extra: str = "") -> None:
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{xml(content)}</text>')

    def rect(x: float, y0: float, y1: float, w: float, colour: str, opacity: float = 1.0) -> None:
        low, high = sorted((y0, y1))
        out.append(
            f'<rect x="{x:.1f}" y="{low:.1f}" width="{w:.1f}" height="{high - low:.1f}" '
            f'fill="{colour}" fill-opacity="{opacity}"/>'
        )

    def panel(left: float, plot_w: float, lo: float, hi: float, title: str) -> Callable[[float], float]:
        def y(value: float) -> float:
            return top + plot_h * (hi - value) / (hi - lo)

        text(left + plot_w / 2, top - 12, title)
        for tick in _nice_ticks(lo, hi):
            colour = "#444" if tick == 0 else "#e4e4e4"
            out.append(
                f'<line x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}" '
                f'stroke="{colour}"/>'
            )
            text(left - 6, y(tick) + 4, f"{tick:g}", anchor="end")
        out.append(
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>'
        )
        return y

    text(
        width / 2,
        24,
        f"RDMA peers across live migrations: {transition_ms} ms P2P transition each way, "
        f"{timeout_ms:g} ms peer timeout",
        extra=' font-size="15"',
    )
    slots = max(1, len(done))

    # Left: peer timeouts per migration.
    left, plot_w = 70.0, 330.0
    means = [statistics.fmean(s.per_migration) if s.migrations else 0.0 for s in done]
    maxes = [float(max(s.per_migration, default=0)) for s in done]
    y = panel(left, plot_w, 0.0, max([1.0, *maxes]) * 1.15, "peer timeouts per migration (mean, max)")
    slot = plot_w / slots
    for i, (one, mean, most) in enumerate(zip(done, means, maxes, strict=True)):
        x0, bw = left + slot * (i + 0.2), slot * 0.6
        rect(x0, y(0), y(mean), bw, COLOURS[one.config.key])
        out.append(
            f'<line x1="{x0 + bw * 0.3:.1f}" y1="{y(most):.1f}" x2="{x0 + bw * 0.7:.1f}" '
            f'y2="{y(most):.1f}" stroke="#222" stroke-width="2"/>'
        )
        text(x0 + bw / 2, min(y(mean), y(most)) - 6, f"{mean:.2f}")
        text(x0 + bw / 2, top + plot_h + 16, f"({one.config.key})")

    # Right: disarm margins.
    left, plot_w = 510.0, 370.0
    values = [v for s in done for v in s.margins]
    lo = min([0.0, *values]) * 1.15 - 5
    hi = max([timeout_ms, *values]) * 1.15 + 5
    y = panel(left, plot_w, lo, hi, "disarm margin, ms (min, median; < 0: too late)")
    out.append(
        f'<line x1="{left}" y1="{y(timeout_ms):.1f}" x2="{left + plot_w}" y2="{y(timeout_ms):.1f}" '
        'stroke="#555" stroke-dasharray="4 3"/>'
    )
    text(left + plot_w - 4, y(timeout_ms) - 4, "= disarmed as the device went quiet", "end", ' fill="#555"')
    slot = plot_w / slots
    for i, one in enumerate(done):
        s = one.summary()
        x0, bw = left + slot * (i + 0.15), slot * 0.33
        if not one.margins:
            text(x0 + bw, y(0) - 8, "no disarm", extra=' fill="#555"')
        for j, (name, value) in enumerate((("min", s["margin_ms_min"]), ("median", s["margin_ms_median"]))):
            if value is None:
                continue
            bx = x0 + j * (bw + 2)
            rect(bx, y(0), y(value), bw, COLOURS[one.config.key], 0.55 if j == 0 else 1.0)
            text(bx + bw / 2, y(value) - 5 if value >= 0 else y(value) + 14, f"{value:.0f}")
            text(bx + bw / 2, top + plot_h + 14, name, extra=' font-size="10"')
        text(x0 + bw, top + plot_h + 28, f"({one.config.key})")

    for i, one in enumerate(done):
        ly = top + plot_h + 56 + 16 * i
        rect(70, ly - 10, ly + 2, 12, COLOURS[one.config.key])
        text(88, ly, f"{one.config.label}, {len(one.migrations)} migrations", anchor="start")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--migrations", type=int, default=20, help="per configuration (default 20)")
    parser.add_argument(
        "--transition-ms", type=int, default=300, help="the P2P transition, each way (default 300)"
    )
    parser.add_argument("--timeout-ms", type=float, default=30.0, help="the peers' timeout (default 30)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    parser.add_argument("--svg", type=Path, default=DEFAULT_SVG, help=f"(default {DEFAULT_SVG})")
    parser.add_argument(
        "--lab-dir", type=Path, help="directory of the benchmark's own lab (default: temporary)"
    )
    args = parser.parse_args(argv)
    if args.migrations < 1:
        parser.error("--migrations must be at least 1")
    if not 0 <= args.transition_ms <= 60000:
        parser.error("--transition-ms must be 0 to 60000")
    if args.timeout_ms <= 0:
        parser.error("--timeout-ms must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    exit_on_sigterm()
    measured = in_work_dir("rdma_survival", "rdma-survival-", lambda work: measure(args, work))
    if measured is None:
        return 1
    done, elapsed = measured
    doc = results(done, args, elapsed)
    print(table(done))
    print(
        f"{args.migrations} migrations per configuration, {args.transition_ms} ms transition each way, "
        f"peer timeout {args.timeout_ms:g} ms, {elapsed:.0f} s; promise (a) = 0 timeouts: "
        + ("kept" if doc["promise_zero_timeouts_with_prepare_drain"] else "BROKEN")
    )
    write_json(args.json, doc)
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    args.svg.write_text(render_svg(done, args.timeout_ms, args.transition_ms))
    print(f"plot: {args.svg}, numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
