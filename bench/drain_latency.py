#!/usr/bin/env python3
"""Drain latency: from QEMU's `pre-copy-p2p-prepare` event to the drain hook's own first instruction.

Measured through real libvirt on a lab of its own (two libvirtd daemons, real QEMU, the simulated
VFIO device: D devices per guest, a 20 ms P2P transition each, 64 MiB guests), in scenarios of 1 VM
and of N VMs emitting at once (--vms 1,16): in each round every guest of the scenario live-migrates
at the same time, each over its own unix migration socket. The orchestrator drains on each device's
prepare event (`--drain prepare`): what is measured is the event path, not a drain policy. The rows
(methods) of a scenario:

- armed: `orchestrator migrate` (one per guest, all started together) with an armed drain hook, a
  tiny C program started with the migration that says `ready` and is woken by one line on its stdin
  per device (bench/common.py ARMED_HOOK_C: its first statement after its blocking read returns takes
  the time);
- spawned: the same, with a C program started per device and event (bench/common.py HOOK_C: its first
  statement takes the time);
- armed evacuate, spawned evacuate (scenarios of more than one VM): the same hooks, the N guests moved
  by ONE `orchestrator evacuate --concurrency N --per-destination N` process instead of N `migrate`s;
- baseline: what an admin would otherwise write: per guest, `virsh qemu-monitor-event --domain VM
  --loop` piped into a POSIX shell loop that runs HOOK_C on each prepare event, around a plain `virsh
  migrate` (one per guest, all started together).

QEMU's timestamp of each prepare event comes from the orchestrator's journal, or from virsh's own
output line for the baseline (not `--timestamp`: with it virsh replaces QEMU's timestamp by its own
clock at receipt, in milliseconds, see VIRSH_LINE). Each (domain, device) has exactly one prepare event
and one drain per migration, so every sample pairs the two exactly. A libvirt subscriber of the
benchmark's own records every prepare event's QEMU timestamp, as a cross-check of the timestamps the
methods report, and the moment its bare callback received it: the relay floor (QEMU -> libvirtd ->
a libvirt client's callback) that no method can beat, for the same events, in the same run.

Rounds go through the scenario's methods in order, then in reverse (armed, spawned, baseline,
baseline, spawned, armed, ...), the direction of the migrations flipping every round, so that every
method sees the same machine conditions and both directions, until each has at least --events
prepare events in the scenario. Each row's percentiles are also given as a ratio to the baseline's.

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
    machine,
    migrate_command,
    percentile,
    program,
    svg_start,
    write_json,
    xml,
)

from orchestrator.core.errors import OrchestratorError
from orchestrator.edges.journal import Journal
from orchestrator.edges.virt import Host, Subscription
from orchestrator.lab import guest as lab_guest
from orchestrator.lab import hosts as lab_hosts

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SVG = REPO / "bench-results" / "drain_latency.svg"
PREPARE = "pre-copy-p2p-prepare"
TRANSITION_MS = 20  # the simulated P2P transition: prepare events of a VM's devices come 20 ms apart
MEMORY_MIB = 64
HOOK_DEADLINE_S = 10.0  # how long to wait for the baseline's hooks after the migrations returned
VIRSH_READY_S = 0.3  # virsh connects and registers in ~10 ms; checked afterwards (see run_baseline)
VIRSH_READY_PER_VM_S = 0.05  # more pipelines starting at once on a small machine take longer
MIGRATE_TIMEOUT_S = 180.0
EVACUATE_TIMEOUT_S = 600.0  # one evacuation of every guest of the scenario

Key = tuple[str, str]  # (domain, device id)


@dataclass(frozen=True)
class Method:
    """One row of a scenario: how the drain hook is started."""

    key: str
    armed: bool  # an armed hook (woken via stdin) rather than one process per device and event
    evacuate: bool  # one `orchestrator evacuate` for all guests rather than one `migrate` per guest
    colour: str

    @property
    def orchestrator(self) -> bool:
        """False for the virsh | sh baseline."""
        return self.key != "baseline"

    def label(self, vms: int) -> str:
        """The row's name in the table and the plot."""
        if not self.orchestrator:
            return "virsh | sh"
        hook = "armed" if self.armed else "spawned"
        if self.evacuate:
            return f"{hook}, 1 evacuate"
        return f"{hook} hook" if vms == 1 else f"{hook}, {vms} migrate"


ARMED = Method("armed", armed=True, evacuate=False, colour="#2ca02c")
SPAWNED = Method("spawned", armed=False, evacuate=False, colour="#1f77b4")
ARMED_EVACUATE = Method("armed-evacuate", armed=True, evacuate=True, colour="#17becf")
SPAWNED_EVACUATE = Method("spawned-evacuate", armed=False, evacuate=True, colour="#9467bd")
BASELINE = Method("baseline", armed=False, evacuate=False, colour="#d62728")
FLOOR_COLOUR = "#7f7f7f"


def methods_for(vms: int) -> list[Method]:
    """The rows of a scenario of `vms` VMs: evacuate only where there is more than one VM to move."""
    if vms == 1:
        return [ARMED, SPAWNED, BASELINE]
    return [ARMED, SPAWNED, ARMED_EVACUATE, SPAWNED_EVACUATE, BASELINE]


def round_order(methods: Sequence[Method], turn: int) -> list[Method]:
    """The methods of set number `turn` of rounds: in order, then reversed, alternately."""
    return list(methods) if turn % 2 == 0 else list(reversed(methods))


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

# The orchestrator's policy: drain on the prepare event; the C hook (spawned or armed) for both drain
# and undrain; the lab's unix data sockets (what `orchestrator evacuate` uses, having no --migrateuri).
POLICY_TOML = """\
description = "drain latency benchmark: a C hook that records its first instruction's time"
[migration]
data_uri = "unix://{root}/migrations/{{domain}}.sock"
[switchover]
drain = "prepare"
[[hooks.drain]]
argv = {drain}
armed = {armed}
timeout_ms = 2000
on_failure = "abort"
[[hooks.undrain]]
argv = {undrain}
armed = {armed}
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
    bare_ns: int | None = None  # when that subscriber's bare libvirt callback received the event
    received_ns: int | None = None  # orchestrator only: when its event callback got it (the journal's)

    @property
    def latency_ms(self) -> float:
        """Hook start minus event timestamp."""
        return (self.hook_ns - self.qemu_ns) / 1e6

    @property
    def confirmed(self) -> bool:
        """Whether the independent subscriber saw the same QEMU timestamp."""
        return self.checked_ns == self.qemu_ns

    @property
    def floor_ms(self) -> float | None:
        """The relay floor of this event: the bare callback's receive time minus QEMU's timestamp."""
        if self.bare_ns is None or self.checked_ns is None:
            return None
        return (self.bare_ns - self.checked_ns) / 1e6


@dataclass
class Series:
    """All samples of one method in one scenario."""

    method: Method
    samples: list[Sample] = field(default_factory=list)
    migrations: int = 0
    rounds: int = 0

    @property
    def latencies(self) -> list[float]:
        """Latencies in ms, in the order measured."""
        return [s.latency_ms for s in self.samples]

    @property
    def floors(self) -> list[float]:
        """The relay floor (ms) of this series' events, where the benchmark's subscriber saw them."""
        return [f for f in (s.floor_ms for s in self.samples) if f is not None]


@dataclass
class Scenario:
    """N guests migrated together, round after round, by every method."""

    vms: int
    domains: list[str]
    series: dict[str, Series] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.series:
            self.series = {m.key: Series(m) for m in methods_for(self.vms)}

    @property
    def label(self) -> str:
        """'1 VM', '16 VMs'."""
        return f"{self.vms} VM" if self.vms == 1 else f"{self.vms} VMs"

    @property
    def floors(self) -> list[float]:
        """The relay floor (ms) of every event of the scenario, all methods."""
        return [f for one in self.series.values() for f in one.floors]


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
    """QEMU's timestamps of prepare events, and when a bare libvirt callback received them, from a
    subscriber of the benchmark's own.

    An independent record of what the journal and virsh report (both must show the same timestamps),
    and the relay floor: the callback takes the time first thing, on libvirt's event thread.
    """

    def __init__(self, conns: Sequence[Host]) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
        self._subs: list[Subscription] = [
            conn.subscribe_monitor_events(self._make(conn.uri), events=["VFIO_MIGRATION"]) for conn in conns
        ]

    def _make(self, uri: str) -> Any:
        def record(domain: str, _name: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            now = time.time_ns()
            if data and data.get("device-state") == PREPARE:
                key = (uri, domain, str(data.get("device-id")))
                with self._lock:
                    self._seen.setdefault(key, []).append(((seconds * 1_000_000 + micros) * 1000, now))

        return record

    def take(self, uri: str) -> dict[Key, list[tuple[int, int]]]:
        """(domain, device) -> (QEMU timestamp, receive time) in ns of the prepare events seen on `uri`
        since the last take, and forget them."""
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


def _run_together(
    commands: Sequence[list[str]], prefix: Path, what: str, timeout_s: float = MIGRATE_TIMEOUT_S
) -> list[Done]:
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
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _stop_all(procs)
        raise BenchError(f"{what} did not finish within {timeout_s:g} s (outputs in {prefix}.*)") from None
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
    """One benchmark run: the lab, the hooks, and the scenarios measured on it."""

    root: Path
    work: Path
    hook: Path  # HOOK_C: started per device and event (spawned rows, baseline)
    armed_hook: Path  # ARMED_HOOK_C: started with the migration, woken via stdin (armed rows)
    hosts: list[lab_hosts.LabHost]
    conns: list[Host]
    devices: list[str]
    devices_per_vm: int
    exact: ExactTimes
    journal: Path
    orchestrator: list[str] = field(default_factory=lambda: program("orchestrator"))
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    where: int = 0  # index of the host the guests run on
    rounds: int = 0  # rounds so far (all methods, all scenarios)
    scenarios: list[Scenario] = field(default_factory=list)

    def _next(self) -> tuple[int, int, int]:
        self.rounds += 1
        return self.rounds, self.where, 1 - self.where

    def _data_uri(self, domain: str) -> str:
        return f"unix://{self.root}/migrations/{domain}.sock"

    def _glob(self, vms: int) -> str:
        return f"bench-{self.tag}-{vms}v*"

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

    def run(self, scenario: Scenario, method: Method) -> None:
        """One round of `method`: every guest of the scenario migrates to the other host."""
        if method.orchestrator:
            self.run_orchestrator(scenario, method)
        else:
            self.run_baseline(scenario)

    def _pair(
        self,
        scenario: Scenario,
        index: int,
        events: dict[Key, list[int]],
        hooks: dict[Key, list[int]],
        exact: dict[Key, list[tuple[int, int]]],
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
                checked, bare = exact_times[0] if len(exact_times) == 1 else (None, None)
                samples.append(Sample(index, domain, device, position, seen[0], ran[0], checked, bare))
        return samples

    def _policy(self, index: int, method: Method) -> tuple[Path, Path, Path]:
        """Write the round's policy; returns (policy, drain log, undrain log)."""
        drain_log = self.work / f"{method.key}-{index}-drain.log"
        undrain_log = self.work / f"{method.key}-{index}-undrain.log"
        policy = self.work / f"{method.key}-{index}.toml"

        def argv(log: Path) -> str:
            if method.armed:  # one process per migration: the device comes on its stdin
                return json.dumps([str(self.armed_hook), str(log), "{domain}"])
            return json.dumps([str(self.hook), str(log), "{domain}", "{device_id}"])

        policy.write_text(
            POLICY_TOML.format(
                root=self.root,
                drain=argv(drain_log),
                undrain=argv(undrain_log),
                armed="true" if method.armed else "false",
            )
        )
        return policy, drain_log, undrain_log

    def _migrate_all(self, scenario: Scenario, method: Method, index: int, policy: Path) -> list[str]:
        """One `orchestrator migrate` per guest, all at once; their migration ids, in domain order."""
        _index, src, dst = index, self.where, 1 - self.where
        commands = [
            [
                *migrate_command(
                    self.orchestrator,
                    domain,
                    self.hosts[dst].uri,
                    self.hosts[src].uri,
                    str(policy),
                    self._data_uri(domain),
                    self.journal,
                ),
                "--drain",
                "prepare",
            ]
            for domain in scenario.domains
        ]
        runs = _run_together(commands, self.work / f"{method.key}-{index}-migrate", "orchestrator migrate")
        ids: list[str] = []
        for domain, run in zip(scenario.domains, runs, strict=True):
            try:
                report = json.loads(run.stdout)
            except json.JSONDecodeError:
                raise BenchError(
                    f"orchestrator migrate {domain} (round {index}) exited {run.returncode}: "
                    f"{run.stderr.strip()[-2000:]}"
                ) from None
            if run.returncode != 0 or report.get("outcome") != "succeeded":
                raise BenchError(
                    f"orchestrator migrate {domain} (round {index}): outcome {report.get('outcome')}: "
                    f"{run.stderr.strip()[-2000:]}"
                )
            late = [dev for dev, rec in report.get("devices", {}).items() if rec.get("late")]
            if late:
                raise BenchError(
                    f"{method.key} round {index}: {domain}: drains came late (no prepare) for {late}"
                )
            ids.append(str(report["migration_id"]))
        return ids

    def _evacuate(self, scenario: Scenario, method: Method, index: int, policy: Path) -> list[str]:
        """ONE `orchestrator evacuate` moving every guest of the scenario at once; migration ids."""
        src, dst, count = self.where, 1 - self.where, str(len(scenario.domains))
        command = [
            *self.orchestrator,
            "evacuate",
            "-c",
            self.hosts[src].uri,
            "--to",
            self.hosts[dst].uri,
            "--concurrency",
            count,
            "--per-destination",
            count,
            "--include",
            self._glob(scenario.vms),
            "--policy",
            str(policy),
            "--drain",
            "prepare",
            "--journal",
            str(self.journal),
            "--json",
        ]
        (run,) = _run_together(
            [command],
            self.work / f"{method.key}-{index}-evacuate",
            "orchestrator evacuate",
            EVACUATE_TIMEOUT_S,
        )
        try:
            doc = json.loads(run.stdout)
        except json.JSONDecodeError:
            raise BenchError(
                f"orchestrator evacuate (round {index}) exited {run.returncode}: {run.stderr.strip()[-2000:]}"
            ) from None
        results = {r["domain"]: r for r in doc.get("results", [])}
        bad = [
            f"{d}: {results.get(d, {}).get('outcome')}"
            for d in scenario.domains
            if results.get(d, {}).get("outcome") != "succeeded"
        ]
        if run.returncode != 0 or bad:
            raise BenchError(
                f"orchestrator evacuate (round {index}) exited {run.returncode}: {'; '.join(bad)} "
                f"{doc.get('message', '')} {run.stderr.strip()[-1000:]}"
            )
        return [str(results[domain]["migration_id"]) for domain in scenario.domains]

    def _journal_events(
        self, scenario: Scenario, ids: Sequence[str]
    ) -> tuple[dict[Key, list[int]], dict[Key, int]]:
        """From the journal: (domain, device) -> QEMU timestamps (ns) of its source prepare events, and
        when the orchestrator's event callback received them (ns)."""
        events: dict[Key, list[int]] = {}
        received: dict[Key, int] = {}
        journal = Journal.open_readonly(self.journal)
        try:
            for domain, mid in zip(scenario.domains, ids, strict=True):
                for event in journal.get_migration(mid).events:
                    if event.kind == "vfio" and event.role == "source" and event.state == PREPARE:
                        key = (domain, str(event.device_id))
                        events.setdefault(key, []).append(qemu_ns(float(event.qemu_time or 0.0)))
                        received[key] = round(float(event.received) * 1_000_000) * 1000
        finally:
            journal.close()
        return events, received

    def run_orchestrator(self, scenario: Scenario, method: Method) -> None:
        """One round of an orchestrator method: every guest moves, drained by the C hook (armed or not)."""
        index, src, dst = self._next()
        policy, drain_log, undrain_log = self._policy(index, method)
        self.exact.take(self.hosts[src].uri)
        if method.evacuate:
            ids = self._evacuate(scenario, method, index, policy)
        else:
            ids = self._migrate_all(scenario, method, index, policy)
        self.where = dst
        events, received = self._journal_events(scenario, ids)
        exact = self.exact.take(self.hosts[src].uri)
        samples = [
            replace(sample, received_ns=received.get((sample.domain, sample.device)))
            for sample in self._pair(scenario, index, events, parse_hook_log(drain_log), exact, method.key)
        ]
        undrained = set(parse_hook_log(undrain_log))
        expected = {(domain, device) for domain in scenario.domains for device in self.devices}
        if undrained != expected:
            raise BenchError(
                f"{method.key} round {index}: undrain hooks missing for {sorted(expected - undrained)}, "
                f"unexpected for {sorted(undrained - expected)}"
            )
        series = scenario.series[method.key]
        series.samples += samples
        series.migrations += len(scenario.domains)
        series.rounds += 1

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
        series = scenario.series[BASELINE.key]
        series.samples += samples
        series.migrations += len(scenario.domains)
        series.rounds += 1


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

FLOOR_LABEL = "relay floor (bare callback)"


def table(doc: dict[str, Any]) -> str:
    """The results as a fixed-width table: per scenario every row, its ratios to the baseline's
    percentiles, then the relay floor of the same events."""
    header = (
        f"{'vms':>3} {'row':<28} {'count':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9} "
        f"{'p50/virsh':>9} {'p99/virsh':>9}"
    )
    lines = [header, "-" * len(header)]
    for vms, scenario in doc["scenarios"].items():
        rows = [(one["label"], one, one["to_baseline"]) for one in scenario["series"].values()]
        rows.append((FLOOR_LABEL, scenario["relay_floor"], None))
        for label, stats, ratios in rows:
            p50 = f"x{ratios['p50']:.2f}" if ratios else ""
            p99 = f"x{ratios['p99']:.2f}" if ratios else ""
            lines.append(
                f"{vms:>3} {label:<28} {stats['count']:>6} {stats['p50_ms']:>9.3f} {stats['p90_ms']:>9.3f} "
                f"{stats['p99_ms']:>9.3f} {stats['max_ms']:>9.3f} {p50:>9} {p99:>9}"
            )
    return "\n".join(lines)


def scenario_results(scenario: Scenario) -> dict[str, Any]:
    """One scenario's numbers."""
    base = summary(scenario.series[BASELINE.key].latencies)

    def series(one: Series) -> dict[str, Any]:
        stats = summary(one.latencies)
        doc: dict[str, Any] = {
            "label": one.method.label(scenario.vms),
            "armed": one.method.armed,
            "evacuate": one.method.evacuate,
            **stats,
            "migrations": one.migrations,
            "rounds": one.rounds,
            "to_baseline": {
                "p50": ratio(stats["p50_ms"], base["p50_ms"]),
                "p90": ratio(stats["p90_ms"], base["p90_ms"]),
                "p99": ratio(stats["p99_ms"], base["p99_ms"]),
            },
            # the relay floor of this row's own events
            "relay_floor": summary(one.floors),
            "latencies_ms": [round(v, 4) for v in one.latencies],
            # [round, domain, device, position of its transition in the switchover, latency ms]
            "samples": [
                [s.round, s.domain, s.device, s.position, round(s.latency_ms, 4)] for s in one.samples
            ],
        }
        if one.method.orchestrator:
            # Where the latency goes, from the journal's receive time of each event: QEMU -> libvirtd
            # -> the orchestrator's event callback, then the callback -> the hook's first instruction.
            split = [
                ((s.received_ns - s.qemu_ns) / 1e6, (s.hook_ns - s.received_ns) / 1e6)
                for s in one.samples
                if s.received_ns is not None
            ]
            doc["breakdown"] = {
                "qemu_to_callback": summary([delivery for delivery, _ in split]),
                "callback_to_hook": summary([start for _, start in split]),
            }
        # QEMU timestamps as reported (journal, virsh) vs. the benchmark's own libvirt subscriber.
        doc["timestamp_cross_check"] = {
            "confirmed": sum(1 for s in one.samples if s.confirmed),
            "differing": sum(1 for s in one.samples if s.checked_ns is not None and not s.confirmed),
            "unseen": sum(1 for s in one.samples if s.checked_ns is None),
        }
        return doc

    return {
        "vms": scenario.vms,
        "domains": scenario.domains,
        "elapsed_s": round(scenario.elapsed_s, 1),
        "series": {key: series(one) for key, one in scenario.series.items()},
        # QEMU's timestamp -> the benchmark's bare libvirt callback, for every event of the scenario
        "relay_floor": summary(scenario.floors),
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
            "drain": "prepare",
            "methods": {
                "armed": "one `orchestrator migrate --drain prepare` per VM, started together, an armed C "
                "hook (started with the migration, woken by a line on its stdin)",
                "spawned": "the same with a C hook started per device and event",
                "armed-evacuate": "ONE `orchestrator evacuate --concurrency N --per-destination N --drain "
                "prepare` for the N VMs, armed C hook",
                "spawned-evacuate": "the same with the spawned C hook",
                "baseline": "per VM `virsh qemu-monitor-event --domain VM --loop | while read ...` "
                "around one `virsh migrate` per VM, started together",
                "relay_floor": "the benchmark's own libvirt callback: its receive time minus QEMU's "
                "timestamp, same events",
            },
            **machine(),
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
        "--events", type=int, default=1000, help="prepare events per row and scenario (default 1000)"
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


def measure_scenario(bench: Bench, scenario: Scenario, events: int, began: float) -> None:
    """Rounds of the scenario's methods, in order then reversed, until every row has `events` samples."""
    methods = methods_for(scenario.vms)
    turn = 0
    while any(len(scenario.series[m.key].samples) < events for m in methods):
        for method in round_order(methods, turn):
            if len(scenario.series[method.key].samples) >= events:
                continue
            bench.run(scenario, method)
            counts = ", ".join(f"{key} {len(one.samples)}" for key, one in scenario.series.items())
            print(
                f"{scenario.label}, round {bench.rounds} ({method.key}): {counts} events "
                f"({time.monotonic() - began:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        turn += 1


def measure(args: argparse.Namespace, root: Path, work: Path) -> tuple[Bench, float]:
    """Bring up the lab under `root`, measure every scenario, tear the lab down; returns (bench, seconds)."""
    began = time.monotonic()
    check_no_lab(root)
    hook, armed_hook = compile_hook(work), compile_hook(work, armed=True)
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
            armed_hook=armed_hook,
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
                measure_scenario(bench, scenario, args.events, began)
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
        rounds = " + ".join(f"{one['rounds']}" for one in scenario["series"].values())
        parts = "; ".join(
            f"{one['label']}: QEMU -> callback {one['breakdown']['qemu_to_callback']['p50_ms']:.3f} ms, "
            f"callback -> hook {one['breakdown']['callback_to_hook']['p50_ms']:.3f} ms"
            for one in scenario["series"].values()
            if "breakdown" in one
        )
        checks = ", ".join(
            f"{key} {c['confirmed']}/{c['confirmed'] + c['differing'] + c['unseen']}"
            + (f" ({c['differing']} DIFFERING)" if c["differing"] else "")
            for key, c in ((key, one["timestamp_cross_check"]) for key, one in scenario["series"].items())
        )
        print(
            f"{vms:>3} VM(s): {rounds} rounds, {scenario['elapsed_s']:.0f} s; p50 split: {parts}; "
            f"QEMU timestamps confirmed: {checks}"
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
                        *(
                            (one.method.label(s.vms), one.method.colour, one.latencies)
                            for one in s.series.values()
                        ),
                        (FLOOR_LABEL, FLOOR_COLOUR, s.floors),
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
