#!/usr/bin/env python3
"""Drain latency: from QEMU's `pre-copy-p2p-prepare` event to the drain hook's own first instruction.

Measured through real libvirt on a lab of its own (two libvirtd daemons, real QEMU, the simulated
VFIO device), for two ways of starting a drain hook:

- orchestrator: `orchestrator migrate` with a policy whose drain hook is a tiny C program; QEMU's
  timestamp of each prepare event comes from the orchestrator's journal (`orchestrator history ID
  --json`).
- baseline: what an admin would otherwise write, `virsh qemu-monitor-event --loop` piped into a
  POSIX shell loop that runs the same C program on each prepare event, around a plain libvirt
  migration; QEMU's timestamp comes from virsh's own output line. Not `--timestamp`: with it virsh
  replaces QEMU's timestamp by its own clock at receipt, in milliseconds (see VIRSH_LINE), which
  would leave libvirt's delivery to virsh out of the baseline's latency.

Both hooks are the same C program, compiled here with gcc into a temporary directory: its first
statement reads CLOCK_REALTIME, then it appends "<device_id> <seconds.nanoseconds>" to the file
named by argv[1] with one write. The guest migrates back and forth, the two methods interleaved
(orchestrator, baseline, baseline, orchestrator, ...) so that both see the same machine conditions
and both directions, until each has at least --events prepare events. A libvirt subscriber of the
benchmark's own records every prepare event's QEMU timestamp independently, as a cross-check of the
timestamps both methods report.

Usage: .venv/bin/python bench/drain_latency.py [--events N] [--devices D] [--json PATH] [--lab-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.lab import guest as lab_guest
from orchestrator.lab import hosts as lab_hosts
from orchestrator.virt import Host, MigrateRequest, Subscription, migrate

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SVG = REPO / "bench-results" / "drain_latency.svg"
PREPARE = "pre-copy-p2p-prepare"
TRANSITION_MS = 20  # the simulated P2P transition: prepare events of a VM's devices come 20 ms apart
HOOK_DEADLINE_S = 10.0  # how long to wait for the baseline's hooks after the migration returned
VIRSH_READY_S = 0.3  # virsh connects and registers in ~10 ms; checked afterwards (see BaselineRun)
MIGRATE_TIMEOUT_S = 180.0

# The hook. Its first statement takes the time; everything else comes after, on purpose.
HOOK_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (argc < 3)
        return 2;
    char line[256];
    int len = snprintf(line, sizeof line, "%s %lld.%09ld\n", argv[2], (long long)now.tv_sec, now.tv_nsec);
    if (len < 0 || len >= (int)sizeof line)
        return 3;
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return 4;
    ssize_t written = write(fd, line, (size_t)len);
    close(fd);
    return written == len ? 0 : 5;
}
"""

# The admin's baseline: virsh's event loop piped into a shell loop that runs the hook on each prepare
# event. Every line is also copied to the loop's stdout (a file) after the hook, for QEMU's timestamp.
# $1 source URI, $2 domain, $3 hook, $4 hook log.
BASELINE_SH = """\
virsh -c "$1" qemu-monitor-event --domain "$2" --event VFIO_MIGRATION --loop |
while IFS= read -r line; do
  case $line in
    *pre-copy-p2p-prepare*)
      dev=${line#*'"device-id":"'}
      dev=${dev%%'"'*}
      "$3" "$4" "$dev" ;;
  esac
  printf '%s\\n' "$line"
done
"""

POLICY_TOML = """\
description = "drain latency benchmark: a C hook that records its first instruction's time"
[[hooks.drain]]
argv = {drain}
timeout_ms = 2000
on_failure = "abort"
[[hooks.undrain]]
argv = {undrain}
timeout_ms = 2000
on_failure = "continue"
"""

# virsh without --timestamp prints QEMU's own timestamp (seconds.microseconds) in each line:
#   "event VFIO_MIGRATION at 1795319252.239123 for domain 'vm': {json}"
# With --timestamp it prints "<YYYY-MM-DD HH:MM:SS.mmm+0000>: event ... for domain 'vm': {json}"
# instead, and that time is virsh's clock when the event reached it (virTimeStringNowRaw), not QEMU's.
VIRSH_LINE = re.compile(
    r"^event (?P<event>\S+) at (?P<seconds>\d+)\.(?P<micros>\d{6}) for domain '(?P<domain>[^']*)': "
    r"(?P<data>\{.*\})$"
)


class BenchError(Exception):
    """The benchmark could not measure what it should (one line, printed on exit)."""


@dataclass(frozen=True)
class Sample:
    """One prepare event and the start of the drain hook it triggered."""

    migration: int
    device: str
    qemu_ns: int  # QEMU's timestamp of the prepare event (µs resolution), as the method reported it
    hook_ns: int  # the hook's own first instruction (CLOCK_REALTIME)
    checked_ns: int | None = None  # the same timestamp from the benchmark's own subscriber, if it saw it
    received_ns: int | None = None  # orchestrator only: when its event callback got it (the journal's)

    @property
    def latency_ms(self) -> float:
        """Hook start minus event timestamp."""
        return (self.hook_ns - self.qemu_ns) / 1e6

    @property
    def confirmed(self) -> bool:
        """Whether the independent subscriber saw the same QEMU timestamp."""
        return self.checked_ns == self.qemu_ns


@dataclass
class Series:
    """All samples of one method."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    migrations: int = 0

    @property
    def latencies(self) -> list[float]:
        """Latencies in ms, in the order measured."""
        return [s.latency_ms for s in self.samples]


# --- small pure helpers ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated linearly between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """count, p50, p90, p99, max (ms)."""
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 50), 4),
        "p90_ms": round(percentile(values, 90), 4),
        "p99_ms": round(percentile(values, 99), 4),
        "max_ms": round(max(values), 4) if values else math.nan,
        "min_ms": round(min(values), 4) if values else math.nan,
        "mean_ms": round(sum(values) / len(values), 4) if values else math.nan,
    }


def parse_hook_log(path: Path) -> dict[str, list[int]]:
    """device id -> hook start times (ns since the epoch), from the C hook's log."""
    times: dict[str, list[int]] = {}
    if not path.exists():
        return times
    for line in path.read_text().splitlines():
        device, stamp = line.split()
        seconds, nanos = stamp.split(".")
        times.setdefault(device, []).append(int(seconds) * 1_000_000_000 + int(nanos))
    return times


@dataclass(frozen=True)
class VirshEvent:
    """One line of `virsh qemu-monitor-event` output."""

    ns: int  # QEMU's timestamp of the event (microseconds), in ns since the epoch
    event: str
    domain: str
    data: dict[str, Any]


def parse_virsh_line(line: str) -> VirshEvent | None:
    """A virsh event line, or None for anything else (e.g. "events received: N")."""
    match = VIRSH_LINE.match(line.strip())
    if match is None:
        return None
    ns = (int(match["seconds"]) * 1_000_000 + int(match["micros"])) * 1000
    data = json.loads(match["data"])
    return VirshEvent(ns, match["event"], match["domain"], data if isinstance(data, dict) else {})


def qemu_ns(seconds: float) -> int:
    """A QEMU timestamp (float seconds with microseconds) in integer nanoseconds, rounded to the µs."""
    return round(seconds * 1_000_000) * 1000


# --- the plot ---------------------------------------------------------------------------------------


def render_svg(series: Sequence[tuple[str, str, Sequence[float]]], title: str) -> str:
    """A CDF of each (label, colour, latencies ms) on a logarithmic x axis, as a standalone SVG."""
    width, height = 760, 440
    left, right, top, bottom = 70, 20, 50, 60
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, _, vs in series for v in vs if v > 0]
    lo = 10 ** math.floor(math.log10(min(values))) if values else 0.1
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 10.0
    if hi <= lo:
        hi = lo * 10
    span = math.log10(hi) - math.log10(lo)

    def x(ms: float) -> float:
        return left + plot_w * (math.log10(max(ms, lo)) - math.log10(lo)) / span

    def y(fraction: float) -> float:
        return top + plot_h * (1.0 - fraction)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15">{_xml(title)}</text>',
    ]
    decade = lo
    while decade <= hi * 1.0001:
        for mult in (1, 2, 5):
            tick = decade * mult
            if tick > hi * 1.0001:
                break
            tx = x(tick)
            out.append(
                f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{top + plot_h}" '
                f'stroke="#ddd" stroke-width="{1 if mult == 1 else 0.5}"/>'
            )
            out.append(f'<text x="{tx:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{tick:g}</text>')
        decade *= 10
    for fraction in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0):
        ty = y(fraction)
        out.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{left + plot_w}" y2="{ty:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{fraction:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 18}" text-anchor="middle">'
        "latency from QEMU's pre-copy-p2p-prepare timestamp to the hook's first instruction (ms, log)"
        "</text>"
    )
    out.append(
        f'<text x="16" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + plot_h / 2})">fraction of events</text>'
    )
    for index, (label, colour, latencies) in enumerate(series):
        ordered = sorted(latencies)
        points = [f"{x(ordered[0]):.1f},{y(0):.1f}"] if ordered else []
        for rank, value in enumerate(ordered, start=1):
            points.append(f"{x(value):.1f},{y((rank - 1) / len(ordered)):.1f}")
            points.append(f"{x(value):.1f},{y(rank / len(ordered)):.1f}")
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}"/>')
        ly = top + 18 + 18 * index
        legend = (
            f"{label}: n={len(ordered)}, p50 {percentile(ordered, 50):.2f} ms, "
            f"p99 {percentile(ordered, 99):.2f} ms"
        )
        out.append(
            f'<line x1="{left + 12}" y1="{ly - 4}" x2="{left + 36}" y2="{ly - 4}" '
            f'stroke="{colour}" stroke-width="3"/>'
        )
        out.append(f'<text x="{left + 42}" y="{ly}">{_xml(legend)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- measuring ----------------------------------------------------------------------------------------


def compile_hook(workdir: Path) -> Path:
    """Compile HOOK_C with gcc into `workdir`; returns the program's path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc is not installed (the hook is compiled at run time): apt-get install gcc")
    source = workdir / "drain_hook.c"
    source.write_text(HOOK_C)
    program = workdir / "drain_hook"
    result = subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(program), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"gcc failed to compile the hook: {result.stderr.strip()}")
    return program


class ExactTimes:
    """QEMU's timestamps of prepare events, from a libvirt subscriber of the benchmark's own.

    An independent record of what the journal and virsh report: both must show the same timestamps.
    """

    def __init__(self, conns: Sequence[Host], domain: str) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[int]] = {}
        self._subs: list[Subscription] = [
            conn.subscribe_monitor_events(self._make(conn.uri), event="VFIO_MIGRATION", domain=domain)
            for conn in conns
        ]

    def _make(self, uri: str) -> Any:
        def record(_domain: str, _name: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            if data and data.get("device-state") == PREPARE:
                key = (uri, str(data.get("device-id")))
                with self._lock:
                    self._seen.setdefault(key, []).append((seconds * 1_000_000 + micros) * 1000)

        return record

    def take(self, uri: str) -> dict[str, list[int]]:
        """device -> prepare timestamps (ns) seen on `uri` since the last take, and forget them."""
        with self._lock:
            mine = {dev: times for (host, dev), times in self._seen.items() if host == uri}
            for dev in mine:
                del self._seen[(uri, dev)]
        return mine

    def close(self) -> None:
        """Stop recording."""
        for sub in self._subs:
            sub.cancel()


@dataclass
class Bench:
    """One benchmark run: the lab, the guest, the hook, and the collected samples."""

    root: Path
    work: Path
    hook: Path
    hosts: list[lab_hosts.LabHost]
    conns: list[Host]
    domain: str
    devices: list[str]
    exact: ExactTimes
    journal: Path
    where: int = 0  # index of the host the guest runs on
    count: int = 0  # migrations so far (both methods)
    orchestrator: Series = field(default_factory=lambda: Series("orchestrator"))
    baseline: Series = field(default_factory=lambda: Series("baseline"))

    def _next(self) -> tuple[int, int, int]:
        self.count += 1
        return self.count, self.where, 1 - self.where

    def _data_uri(self) -> str:
        return f"unix://{self.root}/migrations/{self.domain}.sock"

    def _pair(
        self,
        index: int,
        events: dict[str, list[int]],
        hooks: dict[str, list[int]],
        exact: dict[str, list[int]],
        method: str,
    ) -> list[Sample]:
        """One sample per device: its one prepare event and its one drain hook run."""
        samples = []
        for device in self.devices:
            seen, ran = events.get(device, []), hooks.get(device, [])
            if len(seen) != 1 or len(ran) != 1:
                raise BenchError(
                    f"{method} migration {index}: device {device} had {len(seen)} prepare event(s) "
                    f"and {len(ran)} drain hook run(s), expected one of each"
                )
            exact_times = exact.get(device, [])
            samples.append(
                Sample(index, device, seen[0], ran[0], exact_times[0] if len(exact_times) == 1 else None)
            )
        return samples

    def run_orchestrator(self) -> None:
        """One `orchestrator migrate` with the C hook as drain and undrain hook."""
        index, src, dst = self._next()
        drain_log = self.work / f"orch-{index}-drain.log"
        undrain_log = self.work / f"orch-{index}-undrain.log"
        policy = self.work / f"orch-{index}.toml"
        policy.write_text(
            POLICY_TOML.format(
                drain=json.dumps([str(self.hook), str(drain_log), "{device_id}"]),
                undrain=json.dumps([str(self.hook), str(undrain_log), "{device_id}"]),
            )
        )
        self.exact.take(self.hosts[src].uri)
        command = [
            sys.executable,
            "-m",
            "orchestrator",
            "migrate",
            self.domain,
            self.hosts[dst].uri,
            "-c",
            self.hosts[src].uri,
            "--policy",
            str(policy),
            "--migrateuri",
            self._data_uri(),
            "--journal",
            str(self.journal),
            "--json",
        ]
        run = _run(command, f"orchestrator migrate (migration {index})")
        report = json.loads(run.stdout)
        if report.get("outcome") != "succeeded":
            raise BenchError(f"orchestrator migration {index}: outcome {report.get('outcome')}: {run.stderr}")
        late = [dev for dev, rec in report.get("devices", {}).items() if rec.get("late")]
        if late:
            raise BenchError(f"orchestrator migration {index}: drains came late (no prepare) for {late}")
        self.where = dst
        history = _run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "history",
                str(report["migration_id"]),
                "--journal",
                str(self.journal),
                "--json",
            ],
            "orchestrator history",
        )
        events: dict[str, list[int]] = {}
        received: dict[str, int] = {}
        for event in json.loads(history.stdout)["events"]:
            if event["kind"] == "vfio" and event["role"] == "source" and event["state"] == PREPARE:
                device = str(event["device_id"])
                events.setdefault(device, []).append(qemu_ns(float(event["qemu_time"])))
                received[device] = round(float(event["received"]) * 1_000_000) * 1000
        exact = self.exact.take(self.hosts[src].uri)
        samples = [
            replace(sample, received_ns=received.get(sample.device))
            for sample in self._pair(index, events, parse_hook_log(drain_log), exact, "orchestrator")
        ]
        undrained = parse_hook_log(undrain_log)
        if sorted(undrained) != sorted(self.devices):
            raise BenchError(f"orchestrator migration {index}: undrain hooks ran for {sorted(undrained)}")
        self.orchestrator.samples += samples
        self.orchestrator.migrations += 1

    def run_baseline(self) -> None:
        """One plain libvirt migration with the admin's virsh | sh pipeline running on the source."""
        index, src, dst = self._next()
        hook_log = self.work / f"base-{index}-drain.log"
        raw_log = self.work / f"base-{index}-virsh.log"
        err_log = self.work / f"base-{index}-virsh.err"
        self.exact.take(self.hosts[src].uri)
        with raw_log.open("wb") as raw, err_log.open("wb") as err:
            pipeline = subprocess.Popen(
                [
                    "/bin/sh",
                    "-c",
                    BASELINE_SH,
                    "baseline",
                    self.hosts[src].uri,
                    self.domain,
                    str(self.hook),
                    str(hook_log),
                ],
                stdin=subprocess.DEVNULL,
                stdout=raw,
                stderr=err,
                start_new_session=True,  # its own process group: virsh and the loop end together
            )
        try:
            time.sleep(VIRSH_READY_S)  # virsh prints nothing until an event; verified below instead
            if pipeline.poll() is not None:
                raise BenchError(f"the virsh pipeline exited early: {err_log.read_text().strip()}")
            source = self.conns[src]
            request = MigrateRequest(destination_uri=self.hosts[dst].uri, data_uri=self._data_uri())
            migrate(source, source.domain(self.domain), request)
            self.where = dst
            deadline = time.monotonic() + HOOK_DEADLINE_S
            while time.monotonic() < deadline:
                hooks = parse_hook_log(hook_log)
                prepares = _virsh_prepares(raw_log, self.domain)
                if len(hooks) == len(self.devices) and len(prepares) == len(self.devices):
                    break
                time.sleep(0.05)  # the loop writes files; there is nothing to wait on
        finally:
            _end_group(pipeline)
        lines = [parse_virsh_line(line) for line in raw_log.read_text().splitlines()]
        seen = {
            str(e.data.get("device-id"))
            for e in lines
            if e is not None and e.domain == self.domain and e.data.get("device-state") == "pre-copy"
        }
        if seen != set(self.devices):
            # pre-copy comes at migration setup, long before the prepare events: virsh was listening.
            raise BenchError(
                f"baseline migration {index}: virsh saw pre-copy for {sorted(seen)} only "
                f"(started too late?); see {raw_log}"
            )
        exact = self.exact.take(self.hosts[src].uri)
        samples = self._pair(
            index, _virsh_prepares(raw_log, self.domain), parse_hook_log(hook_log), exact, "baseline"
        )
        self.baseline.samples += samples
        self.baseline.migrations += 1


def _virsh_prepares(raw_log: Path, domain: str) -> dict[str, list[int]]:
    """device -> virsh's timestamps (ns) of its prepare events, from the pipeline's copy of virsh."""
    prepares: dict[str, list[int]] = {}
    for line in raw_log.read_text().splitlines():
        event = parse_virsh_line(line)
        if event is not None and event.domain == domain and event.data.get("device-state") == PREPARE:
            prepares.setdefault(str(event.data.get("device-id")), []).append(event.ns)
    return prepares


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """End the process group we started for `proc` (by its id), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=MIGRATE_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"{what} exited {result.returncode}: {result.stderr.strip()}")
    return result


# --- reporting ----------------------------------------------------------------------------------------


def table(rows: Sequence[tuple[str, dict[str, float | int]]]) -> str:
    """The results as a fixed-width table."""
    header = f"{'series':<28} {'count':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}"
    lines = [header, "-" * len(header)]
    for name, stats in rows:
        lines.append(
            f"{name:<28} {stats['count']:>6} {stats['p50_ms']:>9.3f} {stats['p90_ms']:>9.3f} "
            f"{stats['p99_ms']:>9.3f} {stats['max_ms']:>9.3f}"
        )
    return "\n".join(lines)


def results(bench: Bench, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    orch, base = bench.orchestrator.latencies, bench.baseline.latencies
    orch_stats, base_stats = summary(orch), summary(base)

    def series(stats: dict[str, float | int], one: Series) -> dict[str, Any]:
        return {
            **stats,
            "migrations": one.migrations,
            "latencies_ms": [round(v, 4) for v in one.latencies],
            "samples": [
                {
                    "migration": s.migration,
                    "device": s.device,
                    "position": bench.devices.index(s.device),  # order of its transition in the switchover
                    "latency_ms": round(s.latency_ms, 4),
                }
                for s in one.samples
            ],
        }

    # (QEMU -> callback, callback -> hook) per orchestrator sample, from the journal's receive times.
    split = [
        ((s.received_ns - s.qemu_ns) / 1e6, (s.hook_ns - s.received_ns) / 1e6)
        for s in bench.orchestrator.samples
        if s.received_ns is not None
    ]

    return {
        "config": {
            "events": args.events,
            "devices": args.devices,
            "transition_ms": TRANSITION_MS,
            "domain": bench.domain,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "elapsed_s": round(elapsed, 1),
        "series": {
            "orchestrator": series(orch_stats, bench.orchestrator),
            "baseline": series(base_stats, bench.baseline),
        },
        # Where the orchestrator's latency goes, from the journal's receive time of each event:
        # QEMU -> libvirtd -> the orchestrator's event callback, then the callback -> the hook's start.
        "orchestrator_breakdown": {
            "qemu_to_callback": summary([delivery for delivery, _ in split]),
            "callback_to_hook": summary([spawn for _, spawn in split]),
        },
        "ratios": {
            "p50": round(float(base_stats["p50_ms"]) / float(orch_stats["p50_ms"]), 3),
            "p99": round(float(base_stats["p99_ms"]) / float(orch_stats["p99_ms"]), 3),
        },
        # QEMU timestamps as reported (journal, virsh) vs. the benchmark's own libvirt subscriber.
        "timestamp_cross_check": {
            name: {
                "confirmed": sum(1 for s in one.samples if s.confirmed),
                "differing": sum(1 for s in one.samples if s.checked_ns is not None and not s.confirmed),
                "unseen": sum(1 for s in one.samples if s.checked_ns is None),
            }
            for name, one in (("orchestrator", bench.orchestrator), ("baseline", bench.baseline))
        },
    }


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200, help="prepare events per method (default 200)")
    parser.add_argument("--devices", type=int, default=8, help="simulated VFIO devices (default 8)")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--svg", type=Path, default=DEFAULT_SVG, help=f"the CDF plot (default {DEFAULT_SVG})")
    parser.add_argument(
        "--lab-dir", type=Path, help="directory for the benchmark's own lab (default: a new temporary one)"
    )
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be at least 1")
    if not 1 <= args.devices <= 16:
        parser.error("--devices must be 1 to 16")
    return args


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks: the lab is torn down


def measure(args: argparse.Namespace, root: Path, work: Path) -> tuple[Bench, float]:
    """Bring up the lab under `root`, measure both methods, tear the lab down; returns (bench, seconds)."""
    began = time.monotonic()
    if any(host.running for host in lab_hosts.status(root, with_guests=False)):
        raise BenchError(f"a lab already runs in {root}: the benchmark needs a lab of its own (--lab-dir)")
    hook = compile_hook(work)
    conns: list[Host] = []
    exact: ExactTimes | None = None
    try:
        hosts = lab_hosts.up(2, root)
        domain = f"bench-{uuid.uuid4().hex[:6]}"
        spec = lab_guest.GuestSpec(name=domain, devices=args.devices, transition_ms=TRANSITION_MS)
        lab_guest.create_guest(hosts[0], spec, root=root)
        conns = [Host.open(host.uri) for host in hosts]
        exact = ExactTimes(conns, domain)
        bench = Bench(
            root=root,
            work=work,
            hook=hook,
            hosts=hosts,
            conns=conns,
            domain=domain,
            devices=spec.device_ids,
            exact=exact,
            journal=work / "journal.sqlite",
        )
        # orchestrator, baseline, baseline, orchestrator, ...: both methods, both directions, interleaved.
        turn = 0
        while len(bench.orchestrator.samples) < args.events or len(bench.baseline.samples) < args.events:
            orchestrator_turn = turn % 4 in (0, 3)
            turn += 1
            if orchestrator_turn and len(bench.orchestrator.samples) < args.events:
                bench.run_orchestrator()
            elif not orchestrator_turn and len(bench.baseline.samples) < args.events:
                bench.run_baseline()
            else:
                continue
            print(
                f"migration {bench.count}: orchestrator {len(bench.orchestrator.samples)}, "
                f"baseline {len(bench.baseline.samples)} events",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if exact is not None:
            exact.close()
        for conn in conns:
            conn.close()
        lab_hosts.down(root)
    return bench, time.monotonic() - began


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="drain-latency-"))
    own_root = args.lab_dir is None
    root = Path(tempfile.mkdtemp(prefix="bench-lab-", dir="/var/tmp")) if own_root else args.lab_dir
    keep = False
    try:
        bench, elapsed = measure(args, root, work)
    except (BenchError, OrchestratorError) as exc:
        keep = True
        text = exc.line() if isinstance(exc, OrchestratorError) else str(exc)
        print(f"drain_latency: error: {text} (work files kept in {work})", file=sys.stderr)
        return 1
    except BaseException:
        keep = True
        print(f"drain_latency: work files kept in {work}", file=sys.stderr)
        raise
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = results(bench, args, elapsed)
    print(
        table(
            [
                ("orchestrator", doc["series"]["orchestrator"]),
                ("baseline (virsh | sh)", doc["series"]["baseline"]),
            ]
        )
    )
    print(
        f"baseline/orchestrator: p50 x{doc['ratios']['p50']:.2f}, p99 x{doc['ratios']['p99']:.2f}   "
        f"({bench.orchestrator.migrations} + {bench.baseline.migrations} migrations, "
        f"{args.devices} devices, {elapsed:.0f} s)"
    )
    parts = doc["orchestrator_breakdown"]
    print(
        "orchestrator p50 split: QEMU -> its event callback "
        f"{parts['qemu_to_callback']['p50_ms']:.3f} ms, callback -> hook "
        f"{parts['callback_to_hook']['p50_ms']:.3f} ms"
    )
    checks = doc["timestamp_cross_check"]
    print(
        "QEMU timestamps confirmed by an independent subscriber: "
        + ", ".join(
            f"{name} {c['confirmed']}/{c['confirmed'] + c['differing'] + c['unseen']}"
            + (f" ({c['differing']} DIFFERING)" if c["differing"] else "")
            for name, c in checks.items()
        )
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    args.svg.write_text(
        render_svg(
            [
                ("orchestrator", "#1f77b4", bench.orchestrator.latencies),
                ("baseline: virsh | sh", "#d62728", bench.baseline.latencies),
            ],
            f"Drain hook start latency, {args.devices} simulated VFIO devices per VM",
        )
    )
    print(f"plot: {args.svg}" + (f", numbers: {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
