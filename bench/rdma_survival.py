#!/usr/bin/env python3
"""RDMA survival: peer timeouts per live migration of a loaded VM, per drain mode, QEMU, host load and
drain hook duration.

On a lab of its own (two libvirtd daemons, real QEMU, the simulated VFIO device), a guest that dirties
its memory (`workload="dirty"`: 4 MiB rewritten at 64 MiB/s, so at `--bandwidth 32` pre-copy iterates
until the downtime limit reaches ~125 ms) with one simulated device (`nic0`, a P2P transition of
--transition-ms each way) migrates back and forth with `orchestrator migrate --drain MODE --bandwidth
32`, --migrations times per cell of the matrix

    {prepare, gated, start} x {QEMU 11.0, 10.0} x {quiet, loaded} x {drain hook done in 10 ms, 100 ms}

- drain modes (`--drain`): prepare = on the device's pre-copy-p2p-prepare event (QEMU 10.0 has no such
  state: the drain then comes on pre-copy-p2p, once the transition is over: late); gated = QEMU's
  downtime limit held at 1 ms, the device drained once QEMU would converge, then the limit raised;
  start = drained before the job starts;
- QEMU: the simulator's 11.0 (prepare state) or 10.0 behaviour (one guest each, made at the start);
- host: quiet, or loaded with a CPU hog on every core (`nproc` busy-loop shells started just before
  the migration, ended by their PIDs when it returns);
- the drain hook (spawned, once per device): a script in the work directory that disarms the peer with
  `orchestrator-rdma-hook drain` while a `sleep` of 10 or 100 ms runs beside it, and exits when both
  have: the disarm comes as early as the hook program can start, the hook takes 10 or 100 ms in all
  (more if the disarm itself takes longer; the report gives the measured durations). The undrain hook
  is `orchestrator-rdma-hook undrain`.

Plus one pair of cells with the shipped `rdma-drain` policy as it is, its hooks armed (`orchestrator-
rdma-hook serve`, started with the migration, woken through its stdin; it answers at once, no sleep):
`prepare/11.0/quiet/armed` and `gated/11.0/quiet/armed`, against the spawned 10 ms cells of the same
conditions.

Rounds run every selected cell once, in order, then in reverse order, and so on, so that all cells see
the same drift of machine conditions. A stand-in for the device's RDMA peers (`orchestrator lab peer
DOMAIN --timeout-ms T`) runs per guest for the whole run: it probes the device every 5 ms and counts a
timeout when no answer comes within T ms while armed; the hooks disarm and re-arm it. Around each
migration the benchmark reads its counters (`stats` on its control socket). Per cell: peer timeouts per
migration (those within the device's quiet time, the P2P transition, and elsewhere: probes answered
late under load), the margin of each disarm (the peer's formula on the peer's own times: the device's
outage start + timeout - the disarm; negative = too late; the outage is this migration's quiet time,
its first outage of at least 80 % of the transition), the time the device stayed drained (the report's
`drained_ms`), the measured drain hook duration, and the migration's wall time.

Usage: .venv/bin/python bench/rdma_survival.py [--migrations N] [--modes prepare,gated,start]
           [--cells PATTERN,...] [--bandwidth MIB/S] [--transition-ms MS] [--timeout-ms MS]
           [--json PATH] [--svg PATH] [--lab-dir DIR]
--cells takes shell-style patterns on the cell names MODE/QEMU/LOAD/HOOK, e.g. 'gated/*/quiet/*' or
'*/11.0/*/armed'; --list-cells prints the names.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
MODES = ("prepare", "gated", "start")
QEMUS = ("11.0", "10.0")
LOADS = ("quiet", "loaded")
HOOK_MS = (10, 100)
ARMED = "armed"
PEER_READY_S = 15.0  # the peer imports the package and binds its sockets
GUEST_READY_S = 120.0  # the dirty guest's Linux boots in ~5 s under TCG; more on a busy machine
SETTLE_S = 0.25  # after a migration returns: the peer's last timeouts are counted by then
SETTLE_LIMIT_S = 15.0  # how long the device may stay quiet after a migration before it is an error
MIGRATE_TIMEOUT_S = 600.0  # a loaded migration of a dirtying guest can take long on a busy machine

# The 10/100 ms drain hook: the disarm starts at once, beside a sleep for the hook's whole duration.
# $1 orchestrator-rdma-hook, $2 domain, $3 device, $4 seconds the hook takes in all.
DRAIN_SH = """\
#!/bin/sh
sleep "$4" &
"$1" drain --domain "$2" --device "$3"
status=$?
wait
exit $status
"""

POLICY_TOML = """\
description = "rdma survival benchmark: orchestrator-rdma-hook drain, the hook taking {ms} ms in all"
[devices]
match = ["*"]
[events]
when_off = "refuse"
[[hooks.drain]]
name = "rdma-drain-{ms}ms"
argv = {drain}
timeout_ms = 2000
on_failure = "abort"
[[hooks.undrain]]
name = "rdma-undrain"
argv = {undrain}
timeout_ms = 5000
on_failure = "continue"
"""


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix."""

    mode: str  # the drain mode: prepare, gated, start
    qemu: str  # the simulated QEMU: 11.0 or 10.0
    load: str  # quiet or loaded
    hook: str  # "10ms", "100ms" (the spawned script) or "armed" (the shipped rdma-drain as it is)

    @property
    def name(self) -> str:
        """MODE/QEMU/LOAD/HOOK, what --cells matches."""
        return f"{self.mode}/{self.qemu}/{self.load}/{self.hook}"

    @property
    def armed(self) -> bool:
        """The shipped policy's armed hooks rather than the spawned script."""
        return self.hook == ARMED

    @property
    def hook_ms(self) -> int | None:
        """How long the spawned drain hook takes in all (None: armed)."""
        return None if self.armed else int(self.hook.removesuffix("ms"))


def all_cells() -> list[Cell]:
    """The matrix in table order (the three modes side by side), the armed pair after the spawned
    10 ms cells of the same conditions."""
    cells = []
    for qemu in QEMUS:
        for load in LOADS:
            for ms in HOOK_MS:
                cells += [Cell(mode, qemu, load, f"{ms}ms") for mode in MODES]
                if (qemu, load, ms) == ("11.0", "quiet", 10):
                    cells += [Cell(mode, qemu, load, ARMED) for mode in ("prepare", "gated")]
    return cells


def select_cells(modes: Sequence[str], patterns: Sequence[str]) -> list[Cell]:
    """The cells of `modes` whose names match one of `patterns` (every cell when there is none)."""
    return [
        cell
        for cell in all_cells()
        if cell.mode in modes and (not patterns or any(fnmatch.fnmatchcase(cell.name, p) for p in patterns))
    ]


def schedule(cells: Sequence[Cell], rounds: int) -> list[tuple[int, Cell]]:
    """(round, cell) in the order they run: every cell once per round, reversed every other round."""
    return [
        (number, cell)
        for number in range(1, rounds + 1)
        for cell in (cells if number % 2 else list(reversed(cells)))
    ]


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else math.nan


@dataclass
class Migration:
    """One migration of a cell and what the peer saw during it."""

    cell: str
    round: int
    direction: str  # "lab-a -> lab-b"
    began: float  # epoch seconds (the peer's clock too)
    ended: float
    wall_s: float  # `orchestrator migrate`, start to exit
    timeouts: int  # the peer's timeouts from just before this migration until it had settled after it
    outage_ms: list[float]  # every outage the peer saw in that time
    quiet_ms: float | None  # the device's quiet time: its first outage of >= 80 % of the transition
    quiet_timed_out: bool | None  # whether the peer timed out in it
    timeout_left_ms: list[float]  # per disarm: quiet start + peer timeout - disarm (< 0: too late)
    peer_timeout_left_ms: list[
        float
    ]  # the peer's own timeout_left_ms of the same disarms (its nearest outage)
    drained_ms: float | None  # the report's device record: drain finished to undrain started
    drain_hook_ms: float | None  # the drain hook's run (armed: the line written to its answer)
    trigger: str  # what drained the device: prepare, late, gate, start, ...
    late: bool
    gate: str | None  # gated: how the gate went
    downtime_ms: int | None
    hooks: list[str]  # "trigger:label:ok|failed"
    hogs: int  # CPU hogs running during the migration


@dataclass
class CellRun:
    """All migrations of one cell."""

    cell: Cell
    migrations: list[Migration] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The numbers of the table."""
        ms = self.migrations
        counts = [m.timeouts for m in ms]
        margins = [v for m in ms for v in m.timeout_left_ms]
        peer_margins = [v for m in ms for v in m.peer_timeout_left_ms]
        drained = [m.drained_ms for m in ms if m.drained_ms is not None]
        hook = [m.drain_hook_ms for m in ms if m.drain_hook_ms is not None]
        walls = [m.wall_s for m in ms]
        in_quiet = sum(1 for m in ms if m.quiet_timed_out)
        return {
            "migrations": len(ms),
            "timeouts_per_migration_mean": rounded(statistics.fmean(counts) if counts else math.nan),
            "timeouts_per_migration_max": max(counts) if counts else None,
            "timeouts_total": sum(counts),
            "timeouts_in_device_quiet": in_quiet,  # at most one per migration
            "timeouts_elsewhere": sum(counts) - in_quiet,  # probes answered late: CPU contention
            "timeout_left_ms_min": rounded(min(margins) if margins else math.nan, 2),
            "timeout_left_ms_median": rounded(median(margins), 2),
            "peer_timeout_left_ms_min": rounded(min(peer_margins) if peer_margins else math.nan, 2),
            "peer_timeout_left_ms_median": rounded(median(peer_margins), 2),
            "drained_ms_median": rounded(median(drained), 1),
            "drained_ms_max": rounded(max(drained) if drained else math.nan, 1),
            "drain_hook_ms_median": rounded(median(hook), 1),
            "drain_hook_ms_max": rounded(max(hook) if hook else math.nan, 1),
            "wall_s_median": rounded(median(walls), 3),
            "wall_s_max": rounded(max(walls) if walls else math.nan, 3),
            "device_quiet_ms_median": rounded(median([m.quiet_ms for m in ms if m.quiet_ms is not None]), 1),
            "downtime_ms_median": rounded(
                median([m.downtime_ms for m in ms if m.downtime_ms is not None]), 1
            ),
            "late_drains": sum(1 for m in ms if m.late),
            "triggers": dict(Counter(m.trigger for m in ms)),
            "gates": dict(Counter(m.gate for m in ms if m.gate)),
            "disarms": sum(len(m.timeout_left_ms) for m in ms),
        }


# --- the peer and the CPU hogs ------------------------------------------------------------------------


class PeerProcess:
    """`orchestrator lab peer DOMAIN` in a child process, for the whole run."""

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


class Hogs:
    """A busy-loop shell per CPU while in the `with` block, each ended by its PID afterwards."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Hogs:
        for _ in range(self.count):
            self.procs.append(
                subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"], stdin=subprocess.DEVNULL)
            )
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # by its PID
        for proc in self.procs:
            proc.wait(5)
        self.procs.clear()


# --- measuring ----------------------------------------------------------------------------------------


@dataclass
class Guest:
    """One guest per simulated QEMU, its peer, and where it runs."""

    domain: str
    journal: Path
    peer: PeerProcess | None = None  # started once the guest's workload runs
    where: int = 0
    count: int = 0
    final: dict[str, Any] = field(default_factory=dict)  # the peer's report at the end


def analyse(
    before: dict[str, Any],
    after: dict[str, Any],
    began: float,
    ended: float,
    timeout_ms: float,
    transition_ms: int,
) -> dict[str, Any]:
    """What the peer saw of one migration, from its counters before and after it.

    The device's quiet time is the first outage that starts during the migration and lasts at least 80 %
    of the transition (shorter ones are probes answered late: CPU contention); without a transition,
    its longest outage. The margin of a disarm during the migration is the peer's formula applied to
    that outage: quiet start + timeout - disarm. (The peer's own `timeout_left_ms`, also kept, attribute each
    disarm to its nearest outage, which for a gated or start drain, seconds before the switchover, can
    be a short one of CPU contention.)
    """
    outages = [o for o in after.get("outages", []) if o.get("end") is not None]
    new_outages = after.get("outages", [])[len(before.get("outages", [])) :]
    first_disarm = len(before.get("disarms", []))
    disarms = [float(t) for t in after.get("disarms", [])[first_disarm:]]
    shortest = 0.8 * transition_ms / 1000
    during = [o for o in outages if began <= o["start"] <= ended]
    long = [o for o in during if o["end"] - o["start"] >= shortest] if transition_ms else []
    quiet = long[0] if long else max(during, key=lambda o: o["end"] - o["start"], default=None)
    return {
        "timeouts": int(after["timeouts"]) - int(before["timeouts"]),
        "outage_ms": [round((o["end"] - o["start"]) * 1000, 1) for o in new_outages if o.get("end")],
        "quiet_ms": None if quiet is None else round((quiet["end"] - quiet["start"]) * 1000, 1),
        "quiet_timed_out": None if quiet is None else bool(quiet.get("timed_out")),
        "timeout_left_ms": []
        if quiet is None
        else [
            round((quiet["start"] + timeout_ms / 1000 - d) * 1000, 2) for d in disarms if began <= d <= ended
        ],
        "peer_timeout_left_ms": [float(v) for v in after.get("timeout_left_ms", [])[first_disarm:]],
    }


@dataclass
class Bench:
    """The lab, the guests, the hooks and the results so far."""

    lab: OwnLab
    work: Path
    args: argparse.Namespace
    guests: dict[str, Guest] = field(default_factory=dict)
    runs: dict[str, CellRun] = field(default_factory=dict)
    rdma_hook: list[str] = field(default_factory=lambda: program("orchestrator-rdma-hook"))

    def policy(self, cell: Cell) -> str:
        """The cell's policy: the shipped rdma-drain (armed), or the spawned script's, written once."""
        if cell.armed:
            return "rdma-drain"
        path = self.work / f"policy-{cell.hook}.toml"
        if not path.exists():
            script = self.work / "drain-hook.sh"
            if not script.exists():
                script.write_text(DRAIN_SH)
                script.chmod(0o755)
            ms = cell.hook_ms or 0
            drain = [str(script), self.rdma_hook[-1], "{domain}", "{device_id}", f"{ms / 1000:.3f}"]
            undrain = [*self.rdma_hook, "undrain", "--domain", "{domain}", "--device", "{device_id}"]
            path.write_text(POLICY_TOML.format(ms=ms, drain=json.dumps(drain), undrain=json.dumps(undrain)))
        return str(path)

    def add_guest(self, qemu: str) -> None:
        """The dirtying guest of one simulated QEMU on host A, and its peer."""
        domain = f"rs{qemu.replace('.', '')}-{uuid.uuid4().hex[:6]}"
        spec = lab_guest.GuestSpec(
            name=domain, devices=1, behaviour=qemu, transition_ms=self.args.transition_ms, workload="dirty"
        )
        lab_guest.create_guest(self.lab.hosts[0], spec, root=self.lab.root)
        self.guests[qemu] = Guest(domain, self.work / f"journal-{qemu}.sqlite")

    def start_peers(self) -> None:
        """Wait for every guest's workload to run, then start its peer."""
        for guest in self.guests.values():
            lab_guest.wait_ready(guest.domain, self.lab.root, timeout=GUEST_READY_S)
            guest.peer = PeerProcess(self.lab, guest.domain, self.args.timeout_ms, self.work)

    def migrate(self, number: int, cell: Cell) -> Migration:
        """Migrate the cell's guest to the other host once, under the cell's conditions."""
        guest = self.guests[cell.qemu]
        src, dst = guest.where, 1 - guest.where
        guest.count += 1
        hosts = self.lab.hosts
        command = [
            *migrate_command(
                program("orchestrator"),
                guest.domain,
                hosts[dst].uri,
                hosts[src].uri,
                self.policy(cell),
                self.lab.data_uri(guest.domain),
                guest.journal,
            ),
            *("--drain", cell.mode, "--bandwidth", str(self.args.bandwidth)),
        ]
        peer = guest.peer
        if peer is None:
            raise BenchError(f"the peer of {guest.domain} is not running")
        before = peer.stats()
        hogs = len(os.sched_getaffinity(0)) if cell.load == "loaded" else 0  # what `nproc` says
        with Hogs(hogs):
            began, began_mono = time.time(), time.monotonic()
            result = run(
                command,
                f"{cell.name}: orchestrator migrate (round {number})",
                env=self.lab.env,
                timeout=MIGRATE_TIMEOUT_S,
            )
            ended, wall = time.time(), time.monotonic() - began_mono
        guest.where = dst
        report = json.loads(result.stdout)
        if report.get("outcome") != "succeeded":
            raise BenchError(
                f"{cell.name}, round {number}: outcome {report.get('outcome')}: {report.get('error')}"
            )
        after = peer.settled(began_mono + wall)
        seen = analyse(before, after, began, ended, self.args.timeout_ms, self.args.transition_ms)
        device = report.get("devices", {}).get(DEVICE, {})
        drains = [
            h for h in report.get("hooks", []) if h.get("trigger") == "drain" and h.get("device_id") == DEVICE
        ]
        return Migration(
            cell=cell.name,
            round=number,
            direction=f"{hosts[src].name} -> {hosts[dst].name}",
            began=began,
            ended=ended,
            wall_s=round(wall, 3),
            **seen,
            drained_ms=device.get("drained_ms"),
            drain_hook_ms=round(float(drains[0]["duration_ms"]), 2) if drains else None,
            trigger=str(device.get("trigger", "")),
            late=bool(device.get("late")),
            gate=report.get("gate"),
            downtime_ms=report.get("timings", {}).get("downtime_ms"),
            hooks=[
                f"{h['trigger']}:{h['label']}:{'ok' if h['ok'] else 'failed'}"
                for h in report.get("hooks", [])
            ],
            hogs=hogs,
        )


def measure(args: argparse.Namespace, work: Path) -> tuple[Bench, float]:
    """Every selected cell, round after round, on one lab of the benchmark's own; (bench, seconds)."""
    began = time.monotonic()
    with own_lab(args.lab_dir) as lab:
        bench = Bench(lab, work, args, runs={cell.name: CellRun(cell) for cell in args.cells})
        try:
            for qemu in QEMUS:
                if any(cell.qemu == qemu for cell in args.cells):
                    bench.add_guest(qemu)
            bench.start_peers()
            plan = schedule(args.cells, args.migrations)
            for step, (number, cell) in enumerate(plan, start=1):
                migration = bench.migrate(number, cell)
                bench.runs[cell.name].migrations.append(migration)
                print(
                    f"[{step}/{len(plan)}] {cell.name} round {number} {migration.direction}: "
                    f"{migration.timeouts} peer timeout(s), timeout left {migration.timeout_left_ms} ms, "
                    f"drained {fmt(migration.drained_ms, '.0f', 1)} ms ({migration.trigger}), "
                    f"{migration.wall_s:.2f} s ({time.monotonic() - began:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            for guest in bench.guests.values():
                if guest.peer is not None:
                    guest.final = guest.peer.finish()
        finally:
            for guest in bench.guests.values():
                if guest.peer is not None:
                    guest.peer.kill()
                lab.remove(guest.domain)
    return bench, time.monotonic() - began


# --- reporting ----------------------------------------------------------------------------------------


def table(bench: Bench) -> str:
    """The results as a fixed-width table, one row per cell."""
    header = (
        f"{'cell':<26} {'migr':>4} {'to/migr':>7} {'max':>3} {'in quiet':>8} {'left min':>10} "
        f"{'median ms':>9} {'drained ms':>10} {'hook ms':>7} {'wall s':>7}  gate/trigger"
    )
    lines = [header, "-" * len(header)]
    for one in bench.runs.values():
        s = one.summary()
        how = ", ".join(f"{k} {v}" for k, v in {**s["gates"], **s["triggers"]}.items())
        lines.append(
            f"{one.cell.name:<26} {s['migrations']:>4} {fmt(s['timeouts_per_migration_mean'], '.2f', 7)} "
            f"{fmt(s['timeouts_per_migration_max'], 'd', 3)} {s['timeouts_in_device_quiet']:>8} "
            f"{fmt(s['timeout_left_ms_min'], '.1f', 10)} {fmt(s['timeout_left_ms_median'], '.1f', 9)} "
            f"{fmt(s['drained_ms_median'], '.0f', 10)} {fmt(s['drain_hook_ms_median'], '.1f', 7)} "
            f"{fmt(s['wall_s_median'], '.2f', 7)}  {how}"
        )
    return "\n".join(lines)


def results(bench: Bench, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    return {
        "config": {
            "command": " ".join(["bench/rdma_survival.py", *args.argv]),
            "migrations": args.migrations,
            "cells": [cell.name for cell in args.cells],
            "bandwidth_mib_s": args.bandwidth,
            "transition_ms": args.transition_ms,
            "peer_timeout_ms": args.timeout_ms,
            "peer_interval_ms": 5.0,
            "device": DEVICE,
            "guest": "workload dirty: 4 MiB rewritten at 64 MiB/s, 128 MiB",
            "hogs_when_loaded": len(os.sched_getaffinity(0)),
            "drain_hook": DRAIN_SH,
            **machine(),
        },
        "elapsed_s": round(elapsed, 1),
        "cells": {
            name: {
                **asdict(one.cell),
                **one.summary(),
                "timeouts_per_migration": [m.timeouts for m in one.migrations],
                "timeout_left_ms": [v for m in one.migrations for v in m.timeout_left_ms],
                "migrations_detail": [asdict(m) for m in one.migrations],
            }
            for name, one in bench.runs.items()
        },
        "peers": {qemu: guest.final for qemu, guest in bench.guests.items()},
    }


COLOURS = {"prepare": "#ff7f0e", "gated": "#2ca02c", "start": "#1f77b4"}


def render_svg(bench: Bench, args: argparse.Namespace) -> str:
    """One row per cell, three horizontal bar panels: peer timeouts per migration (bar: mean, tick: max),
    the timeout left at the disarm (bar: median, tick: min; < 0 too late) and the migration's wall time
    (median)."""
    runs = list(bench.runs.values())
    row_h, top, left = 22, 70, 200
    panels = [
        ("peer timeouts per migration", 200),
        ("timeout left at the disarm, ms (median, | min)", 260),
        ("wall s", 160),
    ]
    gap = 30
    width = left + sum(w for _, w in panels) + gap * len(panels) + 10
    height = top + row_h * len(runs) + 50
    out = svg_start(width, height)

    def text(x: float, y: float, content: str, anchor: str = "middle", extra: str = "") -> None:
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{xml(content)}</text>')

    text(
        width / 2,
        22,
        f"RDMA peers across live migrations of a dirtying guest at {args.bandwidth} MiB/s: "
        f"{args.transition_ms} ms P2P transition, {args.timeout_ms:g} ms peer timeout",
        extra=' font-size="14"',
    )
    summaries = [one.summary() for one in runs]
    for i, one in enumerate(runs):
        text(
            left - 8,
            top + row_h * i + row_h * 0.65,
            one.cell.name,
            anchor="end",
            extra=' font-family="monospace"',
        )

    def panel(
        x0: float, w: float, title: str, lo: float, hi: float, bars: list[tuple[float | None, float | None]]
    ) -> None:
        def x(value: float) -> float:
            return x0 + w * (value - lo) / (hi - lo)

        text(x0 + w / 2, top - 12, title)
        out.append(
            f'<rect x="{x0}" y="{top}" width="{w}" height="{row_h * len(runs)}" fill="none" stroke="#888"/>'
        )
        if lo < 0 < hi:
            bottom = top + row_h * len(runs)
            out.append(f'<line x1="{x(0):.1f}" y1="{top}" x2="{x(0):.1f}" y2="{bottom}" stroke="#444"/>')
        text(x0, top + row_h * len(runs) + 14, f"{lo:g}", anchor="start")
        text(x0 + w, top + row_h * len(runs) + 14, f"{hi:g}", anchor="end")
        for i, ((value, tick), one) in enumerate(zip(bars, runs, strict=True)):
            y = top + row_h * i + 4
            if value is None:
                text(x0 + 4, y + row_h * 0.55, "-", anchor="start", extra=' fill="#555"')
                continue
            a, b = sorted((x(max(lo, 0.0)), x(value)))
            opacity = 0.5 if one.cell.load == "loaded" else 1.0
            out.append(
                f'<rect x="{a:.1f}" y="{y:.1f}" width="{b - a:.1f}" height="{row_h - 8}" '
                f'fill="{COLOURS[one.cell.mode]}" fill-opacity="{opacity}"/>'
            )
            if tick is not None:
                out.append(
                    f'<line x1="{x(tick):.1f}" y1="{y - 2:.1f}" x2="{x(tick):.1f}" y2="{y + row_h - 6:.1f}" '
                    'stroke="#222" stroke-width="2"/>'
                )
            text(
                b + 3 if value >= 0 else a - 3,
                y + row_h * 0.55,
                f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}",
                anchor="start" if value >= 0 else "end",
                extra=' font-size="10"',
            )

    x0 = left + gap / 2
    timeouts = [(s["timeouts_per_migration_mean"], s["timeouts_per_migration_max"]) for s in summaries]
    hi = max([1.0, *(float(t) for _, t in timeouts if t is not None)]) * 1.3
    panel(x0, panels[0][1], panels[0][0], 0.0, hi, timeouts)
    x0 += panels[0][1] + gap
    margins = [(s["timeout_left_ms_median"], s["timeout_left_ms_min"]) for s in summaries]
    values = [v for pair in margins for v in pair if v is not None]
    lo = min([0.0, *values]) * 1.2 - 5
    hi = max([args.timeout_ms, *values]) * 1.2 + 5
    panel(x0, panels[1][1], panels[1][0], lo, hi, margins)
    x0 += panels[1][1] + gap
    walls = [(s["wall_s_median"], s["wall_s_max"]) for s in summaries]
    hi = max([1.0, *(float(w) for _, w in walls if w is not None)]) * 1.3
    panel(x0, panels[2][1], panels[2][0], 0.0, hi, walls)

    ly = top + row_h * len(runs) + 36
    x = left
    for mode, colour in COLOURS.items():
        out.append(f'<rect x="{x}" y="{ly - 10}" width="12" height="12" fill="{colour}"/>')
        text(x + 16, ly, mode, anchor="start")
        x += 90
    text(x, ly, "(lighter: host loaded with a CPU hog per core)", anchor="start", extra=' fill="#555"')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--migrations", type=int, default=20, help="per cell (default 20)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"drain modes to run, comma-separated (default {','.join(MODES)})",
    )
    parser.add_argument(
        "--cells",
        default="",
        help="only the cells whose name MODE/QEMU/LOAD/HOOK matches one of these comma-separated shell "
        "patterns, e.g. 'gated/11.0/*/10ms,*/*/quiet/armed' (default: all)",
    )
    parser.add_argument("--list-cells", action="store_true", help="print the selected cells' names and exit")
    parser.add_argument("--bandwidth", type=int, default=32, help="migration bandwidth, MiB/s (default 32)")
    parser.add_argument(
        "--transition-ms", type=int, default=300, help="the P2P transition, each way (default 300)"
    )
    parser.add_argument("--timeout-ms", type=float, default=30.0, help="the peers' timeout (default 30)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    parser.add_argument("--svg", type=Path, default=DEFAULT_SVG, help=f"(default {DEFAULT_SVG})")
    parser.add_argument(
        "--lab-dir", type=Path, help="directory of the benchmark's own lab (default: temporary)"
    )
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.argv = raw
    if args.migrations < 1:
        parser.error("--migrations must be at least 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: expected some of {', '.join(MODES)}, not {args.modes!r}")
    patterns = [p.strip() for p in args.cells.split(",") if p.strip()]
    args.cells = select_cells(modes, patterns)
    if not args.cells:
        parser.error(f"no cell matches --modes {args.modes} --cells {','.join(patterns)} (see --list-cells)")
    if not 1 <= args.bandwidth <= 100000:
        parser.error("--bandwidth must be 1 to 100000 MiB/s")
    if not 0 <= args.transition_ms <= 60000:
        parser.error("--transition-ms must be 0 to 60000")
    if args.timeout_ms <= 0:
        parser.error("--timeout-ms must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    if args.list_cells:
        print("\n".join(cell.name for cell in args.cells))
        return 0
    exit_on_sigterm()
    measured = in_work_dir("rdma_survival", "rdma-survival-", lambda work: measure(args, work))
    if measured is None:
        return 1
    bench, elapsed = measured
    doc = results(bench, args, elapsed)
    print(table(bench))
    print(
        f"{args.migrations} migration(s) per cell, {len(args.cells)} cells, dirtying guest at "
        f"{args.bandwidth} MiB/s, {args.transition_ms} ms transition each way, peer timeout "
        f"{args.timeout_ms:g} ms, {elapsed:.0f} s"
    )
    write_json(args.json, doc)
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    args.svg.write_text(render_svg(bench, args))
    print(f"plot: {args.svg}, numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
