#!/usr/bin/env python3
"""Drain latency: from QEMU's `pre-copy-p2p-prepare` event to the drain hook's own first instruction.

Measured through real libvirt on a lab of its own (two libvirtd daemons, real QEMU, the simulated
VFIO device: D devices per guest, a 20 ms P2P transition each, 64 MiB guests), for two ways of
starting a drain hook, in scenarios of 1 VM and of N VMs emitting at once (--vms 1,16): in each
round every guest of the scenario live-migrates at the same time, each over its own unix migration
socket.

- orchestrator: one `orchestrator migrate` per guest, all started together, with a policy whose drain
  hook is a tiny C program; QEMU's timestamp of each prepare event comes from the orchestrator's
  journal (`orchestrator history ID --json`).
- baseline: what an admin would otherwise write: per guest, `virsh qemu-monitor-event --domain VM
  --loop` piped into a POSIX shell loop that runs the same C program on each prepare event, around
  a plain `virsh migrate` (one per guest, all started together); QEMU's timestamp comes from virsh's
  own output line. Not `--timestamp`: with it virsh replaces QEMU's timestamp by its own clock at
  receipt, in milliseconds (see VIRSH_LINE), which would leave libvirt's delivery to virsh out of
  the baseline's latency.

Both hooks are the same C program, compiled here with gcc into a temporary directory: its first
statement reads CLOCK_REALTIME, then it appends "<domain> <device_id> <seconds.nanoseconds>" to the
file named by argv[1] with one write. Each (domain, device) has exactly one prepare event and one
drain hook run per migration, so every sample pairs the two exactly. Rounds alternate the methods
(orchestrator, baseline, baseline, orchestrator, ...) so that both see the same machine conditions
and both directions, until each has at least --events prepare events in the scenario. A libvirt
subscriber of the benchmark's own records every prepare event's QEMU timestamp independently, as a
cross-check of the timestamps both methods report.

Usage: .venv/bin/python bench/drain_latency.py [--vms 1,16] [--events N] [--devices D] [--json PATH]
       [--svg PATH] [--lab-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    check_no_lab,
    compile_hook,
    exit_on_sigterm,
    in_work_dir,
    lab_root,
    migrate_command,
    percentile,
    svg_start,
    write_json,
    xml,
)

from orchestrator.errors import OrchestratorError
from orchestrator.lab import guest as lab_guest
from orchestrator.lab import hosts as lab_hosts
from orchestrator.virt import Host, Subscription

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SVG = REPO / "bench-results" / "drain_latency.svg"
PREPARE = "pre-copy-p2p-prepare"
TRANSITION_MS = 20  # the simulated P2P transition: prepare events of a VM's devices come 20 ms apart
MEMORY_MIB = 64
HOOK_DEADLINE_S = 10.0  # how long to wait for the baseline's hooks after the migrations returned
VIRSH_READY_S = 0.3  # virsh connects and registers in ~10 ms; checked afterwards (see run_baseline)
VIRSH_READY_PER_VM_S = 0.05  # more pipelines starting at once on a small machine take longer
MIGRATE_TIMEOUT_S = 180.0

Key = tuple[str, str]  # (domain, device id)

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
      "$3" "$4" "$2" "$dev" ;;
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


@dataclass(frozen=True)
class Sample:
    """One prepare event and the start of the drain hook it triggered."""

    round: int
    domain: str
    device: str
    position: int  # the order of the device's transition in its VM's switchover (0 first)
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
    """All samples of one method in one scenario."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    migrations: int = 0
    rounds: int = 0

    @property
    def latencies(self) -> list[float]:
        """Latencies in ms, in the order measured."""
        return [s.latency_ms for s in self.samples]


@dataclass
class Scenario:
    """N guests migrated together, round after round, by both methods."""

    vms: int
    domains: list[str]
    orchestrator: Series = field(default_factory=lambda: Series("orchestrator"))
    baseline: Series = field(default_factory=lambda: Series("baseline"))
    elapsed_s: float = 0.0

    @property
    def label(self) -> str:
        """'1 VM', '16 VMs'."""
        return f"{self.vms} VM" if self.vms == 1 else f"{self.vms} VMs"


# --- small pure helpers ---------------------------------------------------------------------------


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


def ratio(numerator: float | int, denominator: float | int) -> float:
    """numerator / denominator, rounded; NaN when undefined."""
    if not denominator or math.isnan(float(denominator)):
        return math.nan
    return round(float(numerator) / float(denominator), 3)


def parse_hook_log(path: Path) -> dict[Key, list[int]]:
    """(domain, device id) -> hook start times (ns since the epoch), from the C hook's log."""
    times: dict[Key, list[int]] = {}
    if not path.exists():
        return times
    for line in path.read_text().splitlines():
        domain, device, stamp = line.split()
        seconds, nanos = stamp.split(".")
        times.setdefault((domain, device), []).append(int(seconds) * 1_000_000_000 + int(nanos))
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


def parse_vms(text: str) -> list[int]:
    """'1,16' -> [1, 16] (order kept, duplicates dropped); ValueError for anything else."""
    counts: list[int] = []
    for part in text.split(","):
        count = int(part.strip())
        if not 1 <= count <= 32:
            raise ValueError(f"{count} VMs: expected 1 to 32")
        if count not in counts:
            counts.append(count)
    return counts


# --- the plot ---------------------------------------------------------------------------------------

Curve = tuple[str, str, Sequence[float]]  # (label, colour, latencies ms)


def render_svg(panels: Sequence[tuple[str, Sequence[Curve]]], title: str) -> str:
    """One CDF panel per (panel title, curves), stacked, on a shared logarithmic x axis: a standalone SVG."""
    width, panel_h = 760, 330
    left, right, top, gap, bottom = 70, 20, 40, 60, 40
    plot_w, plot_h = width - left - right, panel_h - gap
    height = top + panel_h * len(panels) + bottom
    values = [v for _, curves in panels for _, _, vs in curves for v in vs if v > 0]
    lo = 10 ** math.floor(math.log10(min(values))) if values else 0.1
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 10.0
    if hi <= lo:
        hi = lo * 10
    span = math.log10(hi) - math.log10(lo)

    def x(ms: float) -> float:
        return left + plot_w * (math.log10(max(ms, lo)) - math.log10(lo)) / span

    out = [
        *svg_start(width, height),
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{xml(title)}</text>',
    ]
    for number, (panel_title, curves) in enumerate(panels):
        ptop = top + number * panel_h + 24

        def y(fraction: float, ptop: float = ptop) -> float:
            return ptop + plot_h * (1.0 - fraction)

        out.append(
            f'<text x="{left + plot_w / 2}" y="{ptop - 8}" text-anchor="middle" font-size="13" '
            f'font-weight="bold">{xml(panel_title)}</text>'
        )
        decade = lo
        while decade <= hi * 1.0001:
            for mult in (1, 2, 5):
                tick = decade * mult
                if tick > hi * 1.0001:
                    break
                tx = x(tick)
                out.append(
                    f'<line x1="{tx:.1f}" y1="{ptop}" x2="{tx:.1f}" y2="{ptop + plot_h}" '
                    f'stroke="#ddd" stroke-width="{1 if mult == 1 else 0.5}"/>'
                )
                out.append(
                    f'<text x="{tx:.1f}" y="{ptop + plot_h + 16}" text-anchor="middle">{tick:g}</text>'
                )
            decade *= 10
        for fraction in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0):
            ty = y(fraction)
            out.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{left + plot_w}" y2="{ty:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{fraction:g}</text>')
        out.append(
            f'<rect x="{left}" y="{ptop}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>'
        )
        out.append(
            f'<text x="16" y="{ptop + plot_h / 2}" text-anchor="middle" '
            f'transform="rotate(-90 16 {ptop + plot_h / 2})">fraction of events</text>'
        )
        for index, (label, colour, latencies) in enumerate(curves):
            ordered = sorted(latencies)
            points = [f"{x(ordered[0]):.1f},{y(0):.1f}"] if ordered else []
            for rank, value in enumerate(ordered, start=1):
                points.append(f"{x(value):.1f},{y((rank - 1) / len(ordered)):.1f}")
                points.append(f"{x(value):.1f},{y(rank / len(ordered)):.1f}")
            out.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}"/>'
            )
            # bottom right: the CDFs rise on the left, so their low fractions leave it free
            ly = ptop + plot_h - 12 - 18 * (len(curves) - 1 - index)
            legend = (
                f"{label}: n={len(ordered)}, p50 {percentile(ordered, 50):.2f} ms, "
                f"p99 {percentile(ordered, 99):.2f} ms, max {max(ordered, default=math.nan):.2f} ms"
            )
            out.append(f'<text x="{left + plot_w - 42}" y="{ly}" text-anchor="end">{xml(legend)}</text>')
            out.append(
                f'<line x1="{left + plot_w - 36}" y1="{ly - 4}" x2="{left + plot_w - 12}" y2="{ly - 4}" '
                f'stroke="{colour}" stroke-width="3"/>'
            )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">'
        "latency from QEMU's pre-copy-p2p-prepare timestamp to the hook's first instruction (ms, log)"
        "</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- measuring ----------------------------------------------------------------------------------------


class ExactTimes:
    """QEMU's timestamps of prepare events, from a libvirt subscriber of the benchmark's own.

    An independent record of what the journal and virsh report: both must show the same timestamps.
    """

    def __init__(self, conns: Sequence[Host]) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], list[int]] = {}
        self._subs: list[Subscription] = [
            conn.subscribe_monitor_events(self._make(conn.uri), events=["VFIO_MIGRATION"]) for conn in conns
        ]

    def _make(self, uri: str) -> Any:
        def record(domain: str, _name: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            if data and data.get("device-state") == PREPARE:
                key = (uri, domain, str(data.get("device-id")))
                with self._lock:
                    self._seen.setdefault(key, []).append((seconds * 1_000_000 + micros) * 1000)

        return record

    def take(self, uri: str) -> dict[Key, list[int]]:
        """(domain, device) -> prepare timestamps (ns) seen on `uri` since the last take, and forget them."""
        with self._lock:
            mine = {(dom, dev): times for (host, dom, dev), times in self._seen.items() if host == uri}
            for dom, dev in mine:
                del self._seen[(uri, dom, dev)]
        return mine

    def close(self) -> None:
        """Stop recording."""
        for sub in self._subs:
            sub.cancel()


@dataclass(frozen=True)
class Done:
    """A finished process of `_run_together`."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str


def _run_together(commands: Sequence[list[str]], prefix: Path, what: str) -> list[Done]:
    """Start all `commands` at once (output into files prefix.N.out/.err) and wait for all of them."""
    procs: list[subprocess.Popen[bytes]] = []
    files: list[tuple[Path, Path]] = []
    try:
        for number, command in enumerate(commands):
            out, err = (
                prefix.with_name(f"{prefix.name}.{number}.out"),
                prefix.with_name(f"{prefix.name}.{number}.err"),
            )
            files.append((out, err))
            with out.open("wb") as out_file, err.open("wb") as err_file:
                procs.append(
                    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file)
                )
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        for proc in procs:
            proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _stop_all(procs)
        raise BenchError(
            f"{what} did not finish within {MIGRATE_TIMEOUT_S:g} s (outputs in {prefix}.*)"
        ) from None
    except BaseException:
        _stop_all(procs)
        raise
    return [
        Done(command, proc.returncode, out.read_text(), err.read_text())
        for command, proc, (out, err) in zip(commands, procs, files, strict=True)
    ]


def _stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM what still runs (`orchestrator migrate` then aborts its job and undrains), then reap."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Bench:
    """One benchmark run: the lab, the hook, and the scenarios measured on it."""

    root: Path
    work: Path
    hook: Path
    hosts: list[lab_hosts.LabHost]
    conns: list[Host]
    devices: list[str]
    devices_per_vm: int
    exact: ExactTimes
    journal: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    where: int = 0  # index of the host the guests run on
    rounds: int = 0  # rounds so far (both methods, all scenarios)
    scenarios: list[Scenario] = field(default_factory=list)

    def _next(self) -> tuple[int, int, int]:
        self.rounds += 1
        return self.rounds, self.where, 1 - self.where

    def _data_uri(self, domain: str) -> str:
        return f"unix://{self.root}/migrations/{domain}.sock"

    def add_guests(self, vms: int) -> Scenario:
        """Define and start `vms` guests on the host the guests are on; a new scenario for them."""
        domains = [f"bench-{self.tag}-{vms}v{i:02d}" for i in range(vms)]
        for domain in domains:
            spec = lab_guest.GuestSpec(
                name=domain, devices=self.devices_per_vm, transition_ms=TRANSITION_MS, memory_mib=MEMORY_MIB
            )
            lab_guest.create_guest(self.hosts[self.where], spec, root=self.root)
        scenario = Scenario(vms, domains)
        self.scenarios.append(scenario)
        return scenario

    def remove_guests(self, scenario: Scenario) -> None:
        """Destroy and undefine the scenario's guests wherever they are (the next scenario has the CPUs)."""
        for conn in self.conns:
            for domain in scenario.domains:
                with contextlib.suppress(OrchestratorError):
                    conn.destroy_and_undefine(domain)

    def _pair(
        self,
        scenario: Scenario,
        index: int,
        events: dict[Key, list[int]],
        hooks: dict[Key, list[int]],
        exact: dict[Key, list[int]],
        method: str,
    ) -> list[Sample]:
        """One sample per (domain, device): its one prepare event and its one drain hook run."""
        expected = {(domain, device) for domain in scenario.domains for device in self.devices}
        stray = sorted(set(hooks) - expected)
        if stray:
            raise BenchError(f"{method} round {index}: drain hooks ran for unexpected devices {stray}")
        samples = []
        for domain in scenario.domains:
            for position, device in enumerate(self.devices):
                key = (domain, device)
                seen, ran = events.get(key, []), hooks.get(key, [])
                if len(seen) != 1 or len(ran) != 1:
                    raise BenchError(
                        f"{method} round {index}: {domain} device {device} had {len(seen)} prepare "
                        f"event(s) and {len(ran)} drain hook run(s), expected one of each"
                    )
                exact_times = exact.get(key, [])
                checked = exact_times[0] if len(exact_times) == 1 else None
                samples.append(Sample(index, domain, device, position, seen[0], ran[0], checked))
        return samples

    def run_orchestrator(self, scenario: Scenario) -> None:
        """One `orchestrator migrate` per guest, all at once, with the C hook as drain and undrain hook."""
        index, src, dst = self._next()
        drain_log = self.work / f"orch-{index}-drain.log"
        undrain_log = self.work / f"orch-{index}-undrain.log"
        policy = self.work / f"orch-{index}.toml"
        policy.write_text(
            POLICY_TOML.format(
                drain=json.dumps([str(self.hook), str(drain_log), "{domain}", "{device_id}"]),
                undrain=json.dumps([str(self.hook), str(undrain_log), "{domain}", "{device_id}"]),
            )
        )
        self.exact.take(self.hosts[src].uri)
        orchestrator = [sys.executable, "-m", "orchestrator"]
        commands = [
            migrate_command(
                orchestrator,
                domain,
                self.hosts[dst].uri,
                self.hosts[src].uri,
                str(policy),
                self._data_uri(domain),
                self.journal,
            )
            for domain in scenario.domains
        ]
        runs = _run_together(commands, self.work / f"orch-{index}-migrate", "orchestrator migrate")
        ids: list[str] = []
        for domain, run in zip(scenario.domains, runs, strict=True):
            try:
                report = json.loads(run.stdout)
            except json.JSONDecodeError:
                raise BenchError(
                    f"orchestrator migrate {domain} (round {index}) exited {run.returncode}: "
                    f"{run.stderr.strip()}"
                ) from None
            if run.returncode != 0 or report.get("outcome") != "succeeded":
                raise BenchError(
                    f"orchestrator migrate {domain} (round {index}): outcome {report.get('outcome')}: "
                    f"{run.stderr.strip()}"
                )
            late = [dev for dev, rec in report.get("devices", {}).items() if rec.get("late")]
            if late:
                raise BenchError(
                    f"orchestrator round {index}: {domain}: drains came late (no prepare) for {late}"
                )
            ids.append(str(report["migration_id"]))
        self.where = dst
        histories = _run_together(
            [[*orchestrator, "history", mid, "--journal", str(self.journal), "--json"] for mid in ids],
            self.work / f"orch-{index}-history",
            "orchestrator history",
        )
        events: dict[Key, list[int]] = {}
        received: dict[Key, int] = {}
        for domain, history in zip(scenario.domains, histories, strict=True):
            if history.returncode != 0:
                raise BenchError(
                    f"orchestrator history exited {history.returncode}: {history.stderr.strip()}"
                )
            for event in json.loads(history.stdout)["events"]:
                if event["kind"] == "vfio" and event["role"] == "source" and event["state"] == PREPARE:
                    key = (domain, str(event["device_id"]))
                    events.setdefault(key, []).append(qemu_ns(float(event["qemu_time"])))
                    received[key] = round(float(event["received"]) * 1_000_000) * 1000
        exact = self.exact.take(self.hosts[src].uri)
        samples = [
            replace(sample, received_ns=received.get((sample.domain, sample.device)))
            for sample in self._pair(
                scenario, index, events, parse_hook_log(drain_log), exact, "orchestrator"
            )
        ]
        undrained = set(parse_hook_log(undrain_log))
        expected = {(domain, device) for domain in scenario.domains for device in self.devices}
        if undrained != expected:
            raise BenchError(
                f"orchestrator round {index}: undrain hooks missing for {sorted(expected - undrained)}, "
                f"unexpected for {sorted(undrained - expected)}"
            )
        scenario.orchestrator.samples += samples
        scenario.orchestrator.migrations += len(scenario.domains)
        scenario.orchestrator.rounds += 1

    def run_baseline(self, scenario: Scenario) -> None:
        """Per guest, the admin's virsh | sh pipeline on the source around a `virsh migrate`, all at once."""
        index, src, dst = self._next()
        hook_log = self.work / f"base-{index}-drain.log"
        raw_logs = {domain: self.work / f"base-{index}-{domain}-virsh.log" for domain in scenario.domains}
        self.exact.take(self.hosts[src].uri)
        pipelines: list[subprocess.Popen[bytes]] = []
        try:
            for domain, raw_log in raw_logs.items():
                err_log = raw_log.with_suffix(".err")
                with raw_log.open("wb") as raw, err_log.open("wb") as err:
                    pipelines.append(
                        subprocess.Popen(
                            [
                                "/bin/sh",
                                "-c",
                                BASELINE_SH,
                                "baseline",
                                self.hosts[src].uri,
                                domain,
                                str(self.hook),
                                str(hook_log),
                            ],
                            stdin=subprocess.DEVNULL,
                            stdout=raw,
                            stderr=err,
                            start_new_session=True,  # its own process group: virsh and the loop end together
                        )
                    )
            # virsh prints nothing until an event: whether it listened in time is verified below instead
            time.sleep(VIRSH_READY_S + VIRSH_READY_PER_VM_S * (len(scenario.domains) - 1))
            for domain, pipeline in zip(scenario.domains, pipelines, strict=True):
                if pipeline.poll() is not None:
                    text = raw_logs[domain].with_suffix(".err").read_text().strip()
                    raise BenchError(f"the virsh pipeline for {domain} exited early: {text}")
            commands = [
                [
                    "virsh",
                    "-c",
                    self.hosts[src].uri,
                    "migrate",
                    "--live",
                    "--p2p",
                    "--persistent",
                    "--undefinesource",
                    domain,
                    self.hosts[dst].uri,
                    self._data_uri(domain),
                ]
                for domain in scenario.domains
            ]
            runs = _run_together(commands, self.work / f"base-{index}-migrate", "virsh migrate")
            failed = [
                f"{domain}: {run.stderr.strip()}"
                for domain, run in zip(scenario.domains, runs, strict=True)
                if run.returncode != 0
            ]
            if failed:
                raise BenchError(f"baseline round {index}: virsh migrate failed: {'; '.join(failed)}")
            self.where = dst
            deadline = time.monotonic() + HOOK_DEADLINE_S
            wanted = len(scenario.domains) * len(self.devices)
            while time.monotonic() < deadline:
                hooks = parse_hook_log(hook_log)
                prepares = _virsh_prepares(raw_logs)
                if len(hooks) == wanted and len(prepares) == wanted:
                    break
                time.sleep(0.05)  # the loops write files; there is nothing to wait on
        finally:
            for pipeline in pipelines:
                _end_group(pipeline)
        for domain, raw_log in raw_logs.items():
            lines = [parse_virsh_line(line) for line in raw_log.read_text().splitlines()]
            seen = {
                str(e.data.get("device-id"))
                for e in lines
                if e is not None and e.domain == domain and e.data.get("device-state") == "pre-copy"
            }
            if seen != set(self.devices):
                # pre-copy comes at migration setup, long before the prepare events: virsh was listening.
                raise BenchError(
                    f"baseline round {index}: virsh saw pre-copy of {domain} for {sorted(seen)} only "
                    f"(started too late?); see {raw_log}"
                )
        exact = self.exact.take(self.hosts[src].uri)
        samples = self._pair(
            scenario, index, _virsh_prepares(raw_logs), parse_hook_log(hook_log), exact, "baseline"
        )
        scenario.baseline.samples += samples
        scenario.baseline.migrations += len(scenario.domains)
        scenario.baseline.rounds += 1


def _virsh_prepares(raw_logs: dict[str, Path]) -> dict[Key, list[int]]:
    """(domain, device) -> virsh's timestamps (ns) of its prepare events, from the pipelines' copies."""
    prepares: dict[Key, list[int]] = {}
    for domain, raw_log in raw_logs.items():
        for line in raw_log.read_text().splitlines():
            event = parse_virsh_line(line)
            if event is not None and event.domain == domain and event.data.get("device-state") == PREPARE:
                prepares.setdefault((domain, str(event.data.get("device-id"))), []).append(event.ns)
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


# --- reporting ----------------------------------------------------------------------------------------

BASELINE_LABEL = "baseline (virsh | sh)"


def table(doc: dict[str, Any]) -> str:
    """The results as a fixed-width table: per scenario both methods, then the ratios."""
    header = f"{'vms':>3} {'method':<24} {'count':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9}"
    lines = [header, "-" * len(header)]
    for vms, scenario in doc["scenarios"].items():
        for name, label in (("orchestrator", "orchestrator"), ("baseline", BASELINE_LABEL)):
            stats = scenario["series"][name]
            lines.append(
                f"{vms:>3} {label:<24} {stats['count']:>6} {stats['p50_ms']:>9.3f} {stats['p90_ms']:>9.3f} "
                f"{stats['p99_ms']:>9.3f} {stats['max_ms']:>9.3f}"
            )
        ratios = scenario["ratios"]
        p50, p99 = f"x{ratios['p50']:.2f}", f"x{ratios['p99']:.2f}"
        lines.append(f"{vms:>3} {'baseline/orchestrator':<24} {'':>6} {p50:>9} {'':>9} {p99:>9} {'':>9}")
    return "\n".join(lines)


def scenario_results(scenario: Scenario) -> dict[str, Any]:
    """One scenario's numbers."""
    orch_stats, base_stats = summary(scenario.orchestrator.latencies), summary(scenario.baseline.latencies)

    def series(stats: dict[str, float | int], one: Series) -> dict[str, Any]:
        return {
            **stats,
            "migrations": one.migrations,
            "rounds": one.rounds,
            "latencies_ms": [round(v, 4) for v in one.latencies],
            # [round, domain, device, position of its transition in the switchover, latency ms]
            "samples": [
                [s.round, s.domain, s.device, s.position, round(s.latency_ms, 4)] for s in one.samples
            ],
        }

    # (QEMU -> callback, callback -> hook) per orchestrator sample, from the journal's receive times.
    split = [
        ((s.received_ns - s.qemu_ns) / 1e6, (s.hook_ns - s.received_ns) / 1e6)
        for s in scenario.orchestrator.samples
        if s.received_ns is not None
    ]
    return {
        "vms": scenario.vms,
        "domains": scenario.domains,
        "elapsed_s": round(scenario.elapsed_s, 1),
        "series": {
            "orchestrator": series(orch_stats, scenario.orchestrator),
            "baseline": series(base_stats, scenario.baseline),
        },
        "ratios": {
            "p50": ratio(base_stats["p50_ms"], orch_stats["p50_ms"]),
            "p99": ratio(base_stats["p99_ms"], orch_stats["p99_ms"]),
        },
        # Where the orchestrator's latency goes, from the journal's receive time of each event:
        # QEMU -> libvirtd -> the orchestrator's event callback, then the callback -> the hook's start.
        "orchestrator_breakdown": {
            "qemu_to_callback": summary([delivery for delivery, _ in split]),
            "callback_to_hook": summary([spawn for _, spawn in split]),
        },
        # QEMU timestamps as reported (journal, virsh) vs. the benchmark's own libvirt subscriber.
        "timestamp_cross_check": {
            name: {
                "confirmed": sum(1 for s in one.samples if s.confirmed),
                "differing": sum(1 for s in one.samples if s.checked_ns is not None and not s.confirmed),
                "unseen": sum(1 for s in one.samples if s.checked_ns is None),
            }
            for name, one in (("orchestrator", scenario.orchestrator), ("baseline", scenario.baseline))
        },
    }


def results(bench: Bench, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    return {
        "config": {
            "command": " ".join(["bench/drain_latency.py", *args.argv]),
            "vms": args.vms,
            "events": args.events,
            "devices": args.devices,
            "transition_ms": TRANSITION_MS,
            "memory_mib": MEMORY_MIB,
            "orchestrator": "one `orchestrator migrate` per VM, started together, shared journal",
            "baseline": "per VM `virsh qemu-monitor-event --domain VM --loop | while read ...` "
            "around one `virsh migrate` per VM, started together",
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "elapsed_s": round(elapsed, 1),
        "scenarios": {str(s.vms): scenario_results(s) for s in bench.scenarios},
    }


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--vms",
        default="1,16",
        help="scenarios: how many VMs migrate (and emit) at once, comma-separated (default 1,16)",
    )
    parser.add_argument(
        "--events", type=int, default=1000, help="prepare events per method and scenario (default 1000)"
    )
    parser.add_argument("--devices", type=int, default=8, help="simulated VFIO devices per VM (default 8)")
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--svg", type=Path, default=DEFAULT_SVG, help=f"the CDF plot (default {DEFAULT_SVG})")
    parser.add_argument(
        "--lab-dir", type=Path, help="directory for the benchmark's own lab (default: a new temporary one)"
    )
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.argv = raw
    try:
        args.vms = parse_vms(args.vms)
    except ValueError as exc:
        parser.error(f"--vms: {exc} (e.g. --vms 1,16)")
    if args.events < 1:
        parser.error("--events must be at least 1")
    if not 1 <= args.devices <= 16:
        parser.error("--devices must be 1 to 16")
    return args


def _warm_up(conns: Sequence[Host]) -> None:
    """A fresh libvirtd probes QEMU's capabilities on first use (seconds): do it now, on both, at once."""

    def probe(conn: Host) -> None:
        with contextlib.suppress(Exception):  # a real problem shows on first real use, with its message
            conn.conn.getCapabilities()

    threads = [threading.Thread(target=probe, args=(conn,), daemon=True) for conn in conns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def measure(args: argparse.Namespace, root: Path, work: Path) -> tuple[Bench, float]:
    """Bring up the lab under `root`, measure every scenario, tear the lab down; returns (bench, seconds)."""
    began = time.monotonic()
    check_no_lab(root)
    hook = compile_hook(work)
    conns: list[Host] = []
    exact: ExactTimes | None = None
    try:
        hosts = lab_hosts.up(2, root)
        conns = [Host.open(host.uri) for host in hosts]
        _warm_up(conns)
        exact = ExactTimes(conns)
        bench = Bench(
            root=root,
            work=work,
            hook=hook,
            hosts=hosts,
            conns=conns,
            devices=lab_guest.GuestSpec(name="x", devices=args.devices).device_ids,
            devices_per_vm=args.devices,
            exact=exact,
            journal=work / "journal.sqlite",
        )
        for vms in args.vms:
            started = time.monotonic()
            scenario = bench.add_guests(vms)
            try:
                # orchestrator, baseline, baseline, orchestrator, ...: both methods, both directions.
                turn = 0
                orch, base = scenario.orchestrator, scenario.baseline
                while len(orch.samples) < args.events or len(base.samples) < args.events:
                    orchestrator_turn = turn % 4 in (0, 3)
                    turn += 1
                    if orchestrator_turn and len(orch.samples) < args.events:
                        bench.run_orchestrator(scenario)
                    elif not orchestrator_turn and len(base.samples) < args.events:
                        bench.run_baseline(scenario)
                    else:
                        continue
                    print(
                        f"{scenario.label}, round {bench.rounds}: orchestrator {len(orch.samples)}, "
                        f"baseline {len(base.samples)} events ({time.monotonic() - began:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                bench.remove_guests(scenario)
            scenario.elapsed_s = time.monotonic() - started
    finally:
        if exact is not None:
            exact.close()
        for conn in conns:
            conn.close()
        lab_hosts.down(root)
    return bench, time.monotonic() - began


def report(doc: dict[str, Any], elapsed: float) -> None:
    """The table and the one-line findings, on stdout."""
    print(table(doc))
    for vms, scenario in doc["scenarios"].items():
        orch, base = scenario["series"]["orchestrator"], scenario["series"]["baseline"]
        parts = scenario["orchestrator_breakdown"]
        checks = scenario["timestamp_cross_check"]
        print(
            f"{vms:>3} VM(s): {orch['migrations']} + {base['migrations']} migrations in "
            f"{orch['rounds']} + {base['rounds']} rounds, {scenario['elapsed_s']:.0f} s; "
            f"orchestrator p50 split: QEMU -> callback {parts['qemu_to_callback']['p50_ms']:.3f} ms, "
            f"callback -> hook {parts['callback_to_hook']['p50_ms']:.3f} ms; QEMU timestamps confirmed: "
            + ", ".join(
                f"{name} {c['confirmed']}/{c['confirmed'] + c['differing'] + c['unseen']}"
                + (f" ({c['differing']} DIFFERING)" if c["differing"] else "")
                for name, c in checks.items()
            )
        )
    print(f"total {elapsed:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    exit_on_sigterm()
    with lab_root(args.lab_dir) as root:
        measured = in_work_dir("drain_latency", "drain-latency-", lambda work: measure(args, root, work))
    if measured is None:
        return 1
    bench, elapsed = measured
    doc = results(bench, args, elapsed)
    report(doc, elapsed)
    if args.json is not None:
        write_json(args.json, doc, indent=1)
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    args.svg.write_text(
        render_svg(
            [
                (
                    f"{s.label} migrating at once" if s.vms > 1 else f"{s.label} migrating",
                    [
                        ("orchestrator", "#1f77b4", s.orchestrator.latencies),
                        ("baseline: virsh | sh", "#d62728", s.baseline.latencies),
                    ],
                )
                for s in bench.scenarios
            ],
            f"Drain hook start latency, {args.devices} simulated VFIO devices per VM",
        )
    )
    print(f"plot: {args.svg}" + (f", numbers: {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
