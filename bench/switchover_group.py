#!/usr/bin/env python3
"""Switchover groups: the stall a distributed job's RDMA peers see when its VMs migrate one after the other,
all at once, or as one switchover group (issue 22).

On a lab of its own (two libvirtd daemons, real QEMU, the simulated VFIO device), --vms guests (4) that
dirty their memory (`workload="dirty"`: 4 MiB rewritten at 64 MiB/s, so at `--bandwidth 32` pre-copy
iterates until the downtime limit reaches ~125 ms), each with two simulated devices (`nic0`, `nic1`, a
P2P transition of --transition-ms each way), and a stand-in for every device's RDMA peers (`orchestrator
lab peer DOMAIN --device nicN --timeout-ms T`: 8 for 4 guests) move from one host to the other, once per
cell and round, under one gated policy whose hooks disarm and re-arm the peers (--hooks spawned, the
default: `orchestrator-rdma-hook drain|undrain --domain D --device N`, a process per device and event;
armed: `orchestrator-rdma-hook serve --domain D`, started with each migration and woken through its
stdin), the migration data over `unix://<lab>/migrations/{domain}.sock`. The cells, for each simulated
QEMU of --behaviours (11.0: with the pre-copy-p2p-prepare state; 10.0: without):

- j1: `orchestrator evacuate -c SRC --to DST -j 1 --per-destination 1 --drain gated --include 'SET*'`:
  the guests one after the other, each held at its own gate, drained, switched over, undrained;
- j4: the same at `-j 4 --per-destination 4`: all at once (up to 4), each with its own gate and drain;
- group: `orchestrator migrate-group bench VM... --to DST -c SRC`: every guest held at its gate until all
  would converge, every device drained once, every guest released at once, every device undrained once.

Every command also gets `--policy P --bandwidth B --journal J --json`; after an evacuation, `orchestrator
history ID --json` gives each VM's own report (how its gate went, what drained each device). The guests
of one QEMU behaviour exist only while its cells run (created, booted, peers started; removed
afterwards): each set has the machine's CPUs to itself. Before the first set's cells, one untimed
`evacuate -j 4` (the first migrations into fresh daemons are slower; --no-warmup skips it). Rounds run
each cell once, in order, then in reverse order, and so on, so that all cells see the same drift of
machine conditions; each run moves the guests to the other host.

What the peers saw, per run, from the command's start until every peer had settled after it (its device
answering again, 0.25 s on): each device's outages (no answer for more than two probe intervals + 5 ms:
from the peer's last answer to its next one) and its drained spans (from a disarm to the next re-arm: the
peer report's `disarms` and `arms`). The union of these over all the job's devices, intervals less than
--merge-ms apart joined, gives the job's stall windows: their count, and their total length, the job's
total stalled time. A window with no drained span and no outage the device itself announced as quiet is a
hiccup (a probe answered late on a busy machine: on the lab's one machine, typically every device and
peer at once, 15-80 ms, while processes start: QEMU, the orchestrator), counted apart too. Also: the
peers' timeouts, in their device's quiet time and outside it; the late devices, those that went quiet
(as the device said) with their peers disarmed only after their window's first device had gone quiet, or
not at all (what a gate, and a group's release, are there to prevent); and per guest, its own stalled
time (the union of its two devices' spans alone). One VM's window: the median, over the guests and
rounds of the j1 cell, of each guest's own stalled time. Each cell's total stalled time (median over its
rounds) is given against one VM's window and against the j1 cell's.

The control: before each set's cells, the peers watch the guests for --idle-s seconds with no migration
running; the windows they see then are all hiccups, the machine's own rate of them. Each run and the
control also give the CPU time the machine's hypervisor took from it meanwhile (`steal` in /proc/stat,
all CPUs): the peers and devices stall with everything else then.

Targets (issue 22), per QEMU behaviour: the group gives exactly 1 stall window and 0 peer timeouts in
every round, its total stalled time at most 1.5x one VM's window and at most 0.4x the j1 cell's (set for
4 guests: with 2, the j1 cell has about 2 windows, and 0.4x cannot be reached by design).

Usage: .venv/bin/python bench/switchover_group.py [--vms 4] [--rounds 1] [--behaviours 11.0,10.0]
           [--modes j1,j4,group] [--bandwidth 32] [--transition-ms 300] [--timeout-ms 30]
           [--hooks spawned|armed] [--merge-ms 1] [--idle-s 10] [--no-warmup] [--json PATH]
           [--svg PATH] [--lab-dir DIR]
Smallest (the smoke test's): --vms 2 --rounds 1 --behaviours 11.0 (about a minute on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    own_lab,
    program,
    rounded,
    svg_start,
    write_json,
    xml,
)
from rdma_survival import GUEST_READY_S, PEER_READY_S, PeerProcess

from orchestrator.lab import guest as lab_guest
from orchestrator.lab.rdma_hook import control_path

DEFAULT_JSON = RESULTS / "switchover_group.json"
DEFAULT_SVG = RESULTS / "switchover_group.svg"
DEVICES = 2  # simulated devices per guest
MODES = ("j1", "j4", "group")
QEMUS = ("11.0", "10.0")
HOOKS = ("spawned", "armed")
GROUP_NAME = "bench"
STEP_TIMEOUT_S = 900.0  # one whole command: j1 of 4 dirtying guests on a busy 2-core machine
# The targets of issue 22, for the group cell.
TARGET_WINDOWS = 1
TARGET_TIMEOUTS = 0
TARGET_VS_ONE_VM = 1.5
TARGET_VS_J1 = 0.4

POLICY_TOML = """\
description = "switchover group benchmark: gated, orchestrator-rdma-hook ({hooks}) disarming the peers"
[devices]
match = ["*"]
[events]
when_off = "refuse"
[migration]
data_uri = "unix://{root}/migrations/{{domain}}.sock"
[switchover]
drain = "gated"
[[hooks.drain]]
name = "rdma-drain"
argv = {drain}{armed}
timeout_ms = 2000
on_failure = "abort"
[[hooks.undrain]]
name = "rdma-undrain"
argv = {undrain}{armed}
timeout_ms = 5000
on_failure = "continue"
"""

Interval = tuple[float, float]  # (start, end), epoch seconds


def merge(intervals: Sequence[Interval], gap_s: float) -> list[Interval]:
    """The union of `intervals`, those less than `gap_s` apart joined; sorted."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start - merged[-1][1] < gap_s:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def length_ms(intervals: Sequence[Interval]) -> float:
    """Their total length in ms (they do not overlap: `merge`d)."""
    return sum(end - start for start, end in intervals) * 1000


def steal_ms() -> float:
    """The time this machine's CPUs have been taken away by its hypervisor so far (all CPUs, ms; the
    `steal` column of /proc/stat), NaN where unknown. Every process stalls then, the peers and devices
    too: a hiccup no drain can prevent."""
    try:
        with Path("/proc/stat").open() as stat:
            fields = stat.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else math.nan


# --- the peers ----------------------------------------------------------------------------------------


class DevicePeer(PeerProcess):
    """`orchestrator lab peer DOMAIN --device DEVICE` in a child process, for the guests' whole life
    (rdma_survival's peer, for any device)."""

    def __init__(self, lab: OwnLab, domain: str, device: str, timeout_ms: float, work: Path) -> None:
        self.domain, self.device = domain, device
        self.control = control_path(str(lab.root / "fabric"), domain, device)
        self.err_path = work / f"peer-{domain}-{device}.err"
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    *program("orchestrator"),
                    *("lab", "peer", domain, "--device", device),
                    *("--lab-dir", str(lab.root), "--timeout-ms", f"{timeout_ms:g}"),
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
                self.kill()
                raise BenchError(
                    f"the peer of {domain}/{device} did not start: {self.err_path.read_text().strip()}"
                )
            time.sleep(0.02)  # it writes a file; nothing to wait on


@dataclass
class DeviceSeen:
    """What one device's peer saw of one run."""

    domain: str
    device: str
    outages: list[tuple[float, float, bool, bool]]  # (start, end, device said quiet, timed out)
    drained: list[Interval]  # disarm to the next re-arm
    unarmed: int  # disarms with no re-arm after them (the span then runs to the end of the observation)
    timeouts_quiet: int
    timeouts_other: int

    @property
    def spans(self) -> list[Interval]:
        """Every interval in which the device's peers were stalled: outages and drained spans."""
        return [(s, e) for s, e, _q, _t in self.outages] + list(self.drained)


def device_seen(domain: str, device: str, before: dict[str, Any], after: dict[str, Any]) -> DeviceSeen:
    """What the peer recorded between two of its reports (`after` taken once it had settled)."""
    until = time.time()
    outages = [
        (
            float(o["start"]),
            float(o["end"]) if o.get("end") is not None else until,
            bool(o["device_quiet"]),
            bool(o["timed_out"]),
        )
        for o in after["outages"][len(before["outages"]) :]
    ]
    disarms = [float(t) for t in after["disarms"][len(before["disarms"]) :]]
    arms = [float(t) for t in after["arms"][len(before["arms"]) :]]
    drained, unarmed = [], 0
    for disarm in disarms:
        rearm = next((t for t in arms if t >= disarm), None)
        if rearm is None:
            unarmed += 1
        drained.append((disarm, until if rearm is None else rearm))
    return DeviceSeen(
        domain,
        device,
        outages,
        drained,
        unarmed,
        int(after["timeouts_quiet"]) - int(before["timeouts_quiet"]),
        int(after["timeouts_other"]) - int(before["timeouts_other"]),
    )


# --- one run of a cell --------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of a cell (one command moving every guest) and the job's stall as its peers saw it."""

    behaviour: str
    mode: str
    round: int
    direction: str  # "lab-a -> lab-b"
    began: float  # epoch seconds: the command started (the peers' clock too)
    wall_s: float  # the command, start to exit
    steal_ms: float | None  # CPU time the hypervisor took from this machine meanwhile (all CPUs)
    windows: list[dict[str, Any]]  # the stall windows: start_ms (from `began`), ms, devices, hiccup
    total_stalled_ms: float
    hiccup_windows: int  # windows with no drained span and nothing the device announced as quiet
    late_devices: int  # devices disarmed after their window's first device went quiet (or never)
    timeouts_quiet: int
    timeouts_other: int
    vm_stalled_ms: dict[str, float]  # per guest: the union of its own devices' spans
    vm_windows: dict[str, int]
    unarmed: int  # disarms never followed by a re-arm (undrains that did not reach the peer)
    report: dict[str, Any]  # what the command said of it (its own figures)
    devices: list[dict[str, Any]]  # per device: outages and drained spans, ms from `began`

    @property
    def timeouts(self) -> int:
        return self.timeouts_quiet + self.timeouts_other


def late_devices(inside: Sequence[DeviceSeen], start: float, end: float) -> list[str]:
    """The devices of a window that went quiet (as the device said) but were disarmed only after the
    window's first device had gone quiet, or not at all: what a gated drain, and a group's release,
    should never let happen."""
    quiet = [s for one in inside for s, _e, q, _t in one.outages if q and start <= s <= end]
    if not quiet:
        return []
    first = min(quiet)
    late = []
    for one in inside:
        if not any(q and start <= s <= end for s, _e, q, _t in one.outages):
            continue
        disarm = min((s for s, _e in one.drained if start <= s <= end), default=None)
        if disarm is None or disarm > first:
            late.append(f"{one.domain}/{one.device}")
    return sorted(late)


def analyse(seen: Sequence[DeviceSeen], began: float, gap_s: float) -> dict[str, Any]:
    """The stall windows of a job from what its devices' peers saw (see the module's docstring)."""

    def rel(t: float) -> float:
        return round((t - began) * 1000, 1)

    windows = merge([span for one in seen for span in one.spans], gap_s)
    described = []
    for start, end in windows:
        inside = [
            one
            for one in seen
            if any(s <= end and e >= start for s, e in one.spans)  # touches the window
        ]
        drained = any(s <= end and e >= start for one in inside for s, e in one.drained)
        announced = any(q and s <= end and e >= start for one in inside for s, e, q, _t in one.outages)
        described.append(
            {
                "start_ms": rel(start),
                "ms": round((end - start) * 1000, 1),
                "devices": sorted(f"{one.domain}/{one.device}" for one in inside),
                "drained": drained,
                "hiccup": not drained and not announced,
                "late": late_devices(inside, start, end),
            }
        )
    by_vm: dict[str, list[Interval]] = {}
    for one in seen:
        by_vm.setdefault(one.domain, []).extend(one.spans)
    vm_windows = {vm: merge(spans, gap_s) for vm, spans in sorted(by_vm.items())}
    return {
        "windows": described,
        "total_stalled_ms": round(length_ms(windows), 1),
        "hiccup_windows": sum(1 for w in described if w["hiccup"]),
        "late_devices": sum(len(w["late"]) for w in described),
        "timeouts_quiet": sum(one.timeouts_quiet for one in seen),
        "timeouts_other": sum(one.timeouts_other for one in seen),
        "vm_stalled_ms": {vm: round(length_ms(w), 1) for vm, w in vm_windows.items()},
        "vm_windows": {vm: len(w) for vm, w in vm_windows.items()},
        "unarmed": sum(one.unarmed for one in seen),
        "devices": [
            {
                "device": f"{one.domain}/{one.device}",
                "outages": [
                    {"start_ms": rel(s), "ms": round((e - s) * 1000, 1), "device_quiet": q, "timed_out": t}
                    for s, e, q, t in one.outages
                ],
                "drained": [{"start_ms": rel(s), "ms": round((e - s) * 1000, 1)} for s, e in one.drained],
            }
            for one in seen
        ],
    }


def how_drained(report: dict[str, Any]) -> dict[str, Any]:
    """From one migration's report: how its gate went, what drained each device, and the drain's lead
    (how long before the device went quiet its drain had finished; negative: after)."""
    devices = report.get("devices") or {}
    return {
        "gate": report.get("gate"),
        "triggers": {name: d.get("trigger") for name, d in sorted(devices.items())},
        "lead_ms": {name: d.get("lead_ms") for name, d in sorted(devices.items())},
        "late": sorted(name for name, d in devices.items() if d.get("late")),
    }


def command_report(mode: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The command's own view of the run, kept beside the peers' (and checked: every guest moved)."""
    if mode == "group":
        if doc.get("outcome") != "succeeded":
            raise BenchError(f"migrate-group: outcome {doc.get('outcome')}: {doc.get('error')}")
        return {
            "outcome": doc["outcome"],
            "stall_ms": doc.get("stall_ms"),  # the group's own: first quiet (or drain) to last running
            "steps": [s["step"] for s in doc.get("steps", [])],
            "members": {
                m["domain"]: {
                    "outcome": m.get("outcome"),
                    "downtime_ms": m.get("timings", {}).get("downtime_ms"),
                    "limit_ms": m.get("limit_ms"),
                    "release_lag_ms": m.get("release_lag_ms"),
                    **how_drained(m),
                }
                for m in doc.get("members", [])
            },
        }
    if not doc.get("empty"):
        raise BenchError(f"evacuate left {doc.get('left')}: {doc.get('message')}")
    failed = [r for r in doc.get("results", []) if r.get("outcome") != "succeeded"]
    if failed:
        raise BenchError(f"evacuate: not every guest moved: {failed}")
    return {
        "results": {
            r["domain"]: {"outcome": r["outcome"], "attempts": r["attempts"], "seconds": r["seconds"]}
            for r in doc.get("results", [])
        }
    }


# --- measuring ----------------------------------------------------------------------------------------


@dataclass
class Bench:
    """The lab, the current set of guests and their peers, and the runs so far."""

    lab: OwnLab
    work: Path
    args: argparse.Namespace
    guests: list[str] = field(default_factory=list)  # the current behaviour's
    peers: list[DevicePeer] = field(default_factory=list)
    where: int = 0  # the host the current guests run on
    runs: list[Run] = field(default_factory=list)
    peer_reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # "domain/device" -> at the end
    count: int = 0  # commands run (their output files are numbered)
    policy_text: str = ""  # the policy's TOML, once written
    idle: dict[str, dict[str, Any]] = field(default_factory=dict)  # behaviour -> the idle control

    @property
    def journal(self) -> Path:
        return self.work / "journal.sqlite"

    @property
    def policy(self) -> Path:
        """The gated policy with the spawned RDMA hooks (written once)."""
        path = self.work / "policy.toml"
        if not path.exists():
            hook = program("orchestrator-rdma-hook")
            if self.args.hooks == "armed":  # started with each migration, woken through their stdin
                drain = undrain = [*hook, "serve", "--domain", "{domain}"]
            else:  # a process per device and drain or undrain
                drain = [*hook, "drain", "--domain", "{domain}", "--device", "{device_id}"]
                undrain = [*hook, "undrain", "--domain", "{domain}", "--device", "{device_id}"]
            self.policy_text = POLICY_TOML.format(
                root=self.lab.root,
                hooks=self.args.hooks,
                drain=json.dumps(drain),
                undrain=json.dumps(undrain),
                armed="\narmed = true" if self.args.hooks == "armed" else "",
            )
            path.write_text(self.policy_text)
        return path

    def add_guests(self, behaviour: str) -> None:
        """The behaviour's dirtying guests on host A, booted at once, then a peer per device."""
        tag = uuid.uuid4().hex[:4]
        prefix = f"sg{behaviour.replace('.', '')}-{tag}-"
        self.guests = [f"{prefix}{i}" for i in range(self.args.vms)]
        self.where = 0
        host, conn = self.lab.hosts[0], self.lab.conns[0]
        for name in self.guests:
            spec = lab_guest.GuestSpec(
                name=name,
                devices=DEVICES,
                behaviour=behaviour,
                transition_ms=self.args.transition_ms,
                workload="dirty",
            )
            lab_guest.create_guest(host, spec, start=False, root=self.lab.root)
        for name in self.guests:
            conn.start(conn.domain(name))
        with ThreadPoolExecutor(max_workers=len(self.guests)) as pool:
            list(pool.map(lambda n: lab_guest.wait_ready(n, self.lab.root, GUEST_READY_S), self.guests))
        for name in self.guests:
            for index in range(DEVICES):
                self.peers.append(DevicePeer(self.lab, name, f"nic{index}", self.args.timeout_ms, self.work))

    def remove_guests(self) -> None:
        """Stop the peers (their final reports kept) and remove the guests."""
        try:
            for peer in self.peers:
                self.peer_reports[f"{peer.domain}/{peer.device}"] = peer.finish()
        finally:
            for peer in self.peers:
                peer.kill()
            self.peers = []
            for name in self.guests:
                self.lab.remove(name)
            self.guests = []

    def command(self, mode: str, src: int, dst: int) -> list[str]:
        """The argv of a cell's command moving every current guest from host `src` to `dst`."""
        hosts = self.lab.hosts
        common = [
            *("-c", hosts[src].uri, "--policy", str(self.policy), "--journal", str(self.journal)),
            *("--bandwidth", str(self.args.bandwidth), "--json"),
        ]
        if mode == "group":
            return [
                *program("orchestrator"),
                *("migrate-group", GROUP_NAME, *self.guests, "--to", hosts[dst].uri),
                *common,
            ]
        jobs = "1" if mode == "j1" else "4"
        prefix = self.guests[0].rsplit("-", 1)[0]
        return [
            *program("orchestrator"),
            *("evacuate", "--to", hosts[dst].uri, "-j", jobs, "--per-destination", jobs),
            *("--drain", "gated", "--include", f"{prefix}-*"),
            *common,
        ]

    def execute(self, argv: list[str], what: str) -> tuple[dict[str, Any], float, float]:
        """Run one command, its stdout and stderr kept in the work directory; (its JSON, began, wall)."""
        self.count += 1
        out, err = self.work / f"{self.count:03d}-{what}.json", self.work / f"{self.count:03d}-{what}.err"
        began, began_mono = time.time(), time.monotonic()
        with out.open("w") as stdout, err.open("w") as stderr:
            try:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=self.lab.env,
                    timeout=STEP_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise BenchError(
                    f"{what}: {' '.join(argv)} did not finish in {STEP_TIMEOUT_S:.0f} s"
                ) from None
        wall = time.monotonic() - began_mono
        if proc.returncode != 0:
            tail = err.read_text().strip()[-2000:]
            raise BenchError(f"{what}: {' '.join(argv)} exited {proc.returncode}: {tail} (output in {out})")
        try:
            doc = json.loads(out.read_text())
        except ValueError:
            raise BenchError(f"{what}: its output is not JSON (in {out})") from None
        return doc, began, wall

    def check_on(self, index: int, when: str) -> None:
        """Every current guest runs on host `index` and on no other."""
        for i, conn in enumerate(self.lab.conns):
            active = {d.name for d in conn.domains() if d.active}
            wrong = set(self.guests) - active if i == index else set(self.guests) & active
            if wrong:
                state = "not running on" if i == index else "still running on"
                raise BenchError(f"{when}: {sorted(wrong)} {state} {self.lab.hosts[i].name}")

    def warm_up(self) -> None:
        """Move the guests once, untimed (`evacuate -j 4`): the first migrations into fresh daemons."""
        src, dst = self.where, 1 - self.where
        self.execute(self.command("j4", src, dst), "warm-up")
        self.where = dst
        self.check_on(dst, "after the warm-up")
        for peer in self.peers:
            peer.settled(time.monotonic())

    def watch_idle(self, behaviour: str) -> dict[str, Any]:
        """The control: what the peers see in --idle-s seconds with no migration running."""
        before = [peer.stats() for peer in self.peers]
        began, began_mono, stolen = time.time(), time.monotonic(), steal_ms()
        time.sleep(self.args.idle_s)
        after = [peer.settled(time.monotonic()) for peer in self.peers]
        seconds = time.monotonic() - began_mono
        seen = [
            device_seen(peer.domain, peer.device, b, a)
            for peer, b, a in zip(self.peers, before, after, strict=True)
        ]
        found = analyse(seen, began, self.args.merge_ms / 1000)
        self.idle[behaviour] = {
            "seconds": round(seconds, 2),
            "steal_ms": rounded(steal_ms() - stolen, 0),
            "windows": len(found["windows"]),
            "hiccup_windows": found["hiccup_windows"],
            "hiccups_per_minute": round(found["hiccup_windows"] * 60 / seconds, 2),
            "total_stalled_ms": found["total_stalled_ms"],
            "timeouts_quiet": found["timeouts_quiet"],
            "timeouts_other": found["timeouts_other"],
            "window_list": found["windows"],
        }
        return self.idle[behaviour]

    def run_cell(self, behaviour: str, mode: str, number: int) -> Run:
        """One run of a cell: every guest moved to the other host; what the peers saw of it."""
        src, dst = self.where, 1 - self.where
        hosts = self.lab.hosts
        before = [peer.stats() for peer in self.peers]
        stolen = steal_ms()
        doc, began, wall = self.execute(self.command(mode, src, dst), f"{behaviour}-{mode}-r{number}")
        ended_mono = time.monotonic()
        stolen = steal_ms() - stolen
        self.where = dst
        report = command_report(mode, doc)
        after = [peer.settled(ended_mono) for peer in self.peers]
        self.check_on(dst, f"{behaviour} {mode} round {number}")
        if mode != "group":  # each VM's own report (its gate, its drains) is in the journal
            history = [
                *program("orchestrator"),
                *("history", str(doc["evacuation_id"]), "--journal", str(self.journal), "--json"),
            ]
            shown, _began, _wall = self.execute(history, f"{behaviour}-{mode}-r{number}-history")
            for item in shown.get("items", []):
                summary = item.get("summary") or {}
                if item.get("domain") in report["results"]:
                    report["results"][item["domain"]].update(how_drained(summary))
        seen = [
            device_seen(peer.domain, peer.device, b, a)
            for peer, b, a in zip(self.peers, before, after, strict=True)
        ]
        return Run(
            behaviour=behaviour,
            mode=mode,
            round=number,
            direction=f"{hosts[src].name} -> {hosts[dst].name}",
            began=began,
            wall_s=round(wall, 3),
            steal_ms=rounded(stolen, 0),
            report=report,
            **analyse(seen, began, self.args.merge_ms / 1000),
        )


def schedule(modes: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, mode) in the order they run: every cell once per round, reversed every other round."""
    return [
        (number, mode)
        for number in range(1, rounds + 1)
        for mode in (modes if number % 2 else list(reversed(modes)))
    ]


def measure(args: argparse.Namespace, work: Path) -> tuple[Bench, float]:
    """Every behaviour's cells, round after round, on a lab of the benchmark's own; (bench, seconds)."""
    began = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {text}", file=sys.stderr, flush=True)

    with own_lab(args.lab_dir) as lab:
        bench = Bench(lab, work, args)
        try:
            plan = schedule(args.modes, args.rounds)
            for index, behaviour in enumerate(args.behaviours):
                bench.add_guests(behaviour)
                progress(f"QEMU {behaviour}: {len(bench.guests)} guests ready, {len(bench.peers)} peers")
                if args.warmup and index == 0:
                    bench.warm_up()
                    progress("warm-up done")
                if args.idle_s:
                    idle = bench.watch_idle(behaviour)
                    progress(
                        f"QEMU {behaviour} idle control: {idle['windows']} window(s) in "
                        f"{idle['seconds']:.0f} s, {idle['timeouts_quiet']}/{idle['timeouts_other']} timeouts"
                    )
                for step, (number, mode) in enumerate(plan, start=1):
                    one = bench.run_cell(behaviour, mode, number)
                    bench.runs.append(one)
                    progress(
                        f"QEMU {behaviour} [{step}/{len(plan)}] {mode} round {number} {one.direction}: "
                        f"{len(one.windows)} window(s) ({one.hiccup_windows} hiccup), "
                        f"{one.total_stalled_ms:.0f} ms stalled, {one.timeouts_quiet}/{one.timeouts_other} "
                        f"timeouts, {one.wall_s:.1f} s"
                    )
                bench.remove_guests()
        finally:
            for peer in bench.peers:
                peer.kill()
            for name in bench.guests:
                lab.remove(name)
    return bench, time.monotonic() - began


# --- reporting ----------------------------------------------------------------------------------------


def ratio(value: float, base: float) -> float:
    """value / base, NaN when either is missing or the base is 0."""
    return value / base if base and not (math.isnan(value) or math.isnan(base)) else math.nan


def summarise(bench: Bench, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per behaviour: one VM's window, each cell's figures, and the targets."""
    out: dict[str, dict[str, Any]] = {}
    for behaviour in args.behaviours:
        runs = [r for r in bench.runs if r.behaviour == behaviour]
        j1 = [r for r in runs if r.mode == "j1"]
        one_vm = median([ms for r in j1 for ms in r.vm_stalled_ms.values()])
        j1_total = median([r.total_stalled_ms for r in j1])
        cells = {}
        for mode in args.modes:
            mine = [r for r in runs if r.mode == mode]
            total = median([r.total_stalled_ms for r in mine])
            windows = [len(r.windows) for r in mine]
            cells[mode] = {
                "runs": len(mine),
                "windows": windows,
                "windows_median": rounded(median(windows), 1),
                "hiccup_windows": [r.hiccup_windows for r in mine],
                "total_stalled_ms": [r.total_stalled_ms for r in mine],
                "total_stalled_ms_median": rounded(total, 1),
                "timeouts_quiet": sum(r.timeouts_quiet for r in mine),
                "timeouts_other": sum(r.timeouts_other for r in mine),
                "vm_stalled_ms_median": rounded(
                    median([ms for r in mine for ms in r.vm_stalled_ms.values()]), 1
                ),
                "vs_one_vm": rounded(ratio(total, one_vm)),
                "vs_j1": rounded(ratio(total, j1_total)),
                "wall_s_median": rounded(median([r.wall_s for r in mine]), 2),
                "steal_ms_median": rounded(median([r.steal_ms for r in mine if r.steal_ms is not None]), 0),
                "unarmed": sum(r.unarmed for r in mine),
                "late_devices": sum(r.late_devices for r in mine),
            }
        out[behaviour] = {
            "one_vm_window_ms": rounded(one_vm, 1),
            "j1_total_stalled_ms": rounded(j1_total, 1),
            "cells": cells,
            "targets": targets(cells.get("group"), one_vm, j1_total),
        }
    return out


def targets(group: dict[str, Any] | None, one_vm: float, j1_total: float) -> dict[str, Any]:
    """Issue 22's targets for the group cell: each {"target", "value", "shown", "met"} (met None: not
    measured, for want of a j1 cell)."""
    if group is None or not group["runs"]:
        return {}
    total = group["total_stalled_ms_median"]
    vs_one, vs_j1 = ratio(total, one_vm), ratio(total, j1_total)
    timeouts = group["timeouts_quiet"] + group["timeouts_other"]
    return {
        "windows": {
            "target": f"stall windows: exactly {TARGET_WINDOWS} in every round",
            "value": group["windows"],
            "shown": ", ".join(
                f"{w} ({h} of them hiccups)" if h else str(w)
                for w, h in zip(group["windows"], group["hiccup_windows"], strict=True)
            ),
            "met": all(w == TARGET_WINDOWS for w in group["windows"]),
        },
        "timeouts": {
            "target": f"peer timeouts: {TARGET_TIMEOUTS}",
            "value": timeouts,
            "shown": f"{group['timeouts_quiet']} in the quiet time, {group['timeouts_other']} outside",
            "met": timeouts == TARGET_TIMEOUTS,
        },
        "vs_one_vm": {
            "target": f"total stalled <= {TARGET_VS_ONE_VM}x one VM's window ({fmt(one_vm, '.0f', 1)} ms)",
            "value": rounded(vs_one),
            "shown": f"{fmt(total, '.0f', 1)} ms, {fmt(vs_one, '.2f', 1)}x",
            "met": None if math.isnan(vs_one) else vs_one <= TARGET_VS_ONE_VM,
        },
        "vs_j1": {
            "target": f"total stalled <= {TARGET_VS_J1}x the j1 cell's ({fmt(j1_total, '.0f', 1)} ms)",
            "value": rounded(vs_j1),
            "shown": f"{fmt(vs_j1, '.2f', 1)}x",
            "met": None if math.isnan(vs_j1) else vs_j1 <= TARGET_VS_J1,
        },
    }


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The results as a fixed-width table, one row per cell."""
    header = (
        f"{'qemu':<5} {'mode':<6} {'runs':>4} {'windows':>8} {'hiccups':>7} {'stalled ms':>10} "
        f"{'to quiet/out':>12} {'x one VM':>8} {'x j1':>6} {'VM own ms':>9} {'late':>4} {'wall s':>7} "
        f"{'steal ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for behaviour, one in summary.items():
        for mode, c in one["cells"].items():
            windows = c["windows"]
            if not windows:
                shown = "-"
            elif min(windows) == max(windows):
                shown = str(windows[0])
            else:
                shown = f"{min(windows)}-{max(windows)}"
            lines.append(
                f"{behaviour:<5} {mode:<6} {c['runs']:>4} {shown:>8} {sum(c['hiccup_windows']):>7} "
                f"{fmt(c['total_stalled_ms_median'], '.1f', 10)} "
                f"{c['timeouts_quiet']:>6}/{c['timeouts_other']:<5} "
                f"{fmt(c['vs_one_vm'], '.2f', 8)} {fmt(c['vs_j1'], '.2f', 6)} "
                f"{fmt(c['vm_stalled_ms_median'], '.1f', 9)} {c['late_devices']:>4} "
                f"{fmt(c['wall_s_median'], '.1f', 7)} "
                f"{fmt(c['steal_ms_median'], '.0f', 8)}"
            )
    return "\n".join(lines)


def target_lines(summary: dict[str, dict[str, Any]], vms: int) -> list[str]:
    """Per behaviour: whether the group cell met all its targets, then each target, met or not."""
    words = {True: "met", False: "NOT met", None: "not measured (no j1 cell)"}
    lines = []
    for behaviour, one in summary.items():
        found = one["targets"]
        if not found:
            lines.append(f"targets, QEMU {behaviour}: not measured (no group cell)")
            continue
        verdict = "all met" if all(t["met"] is True for t in found.values()) else "NOT all met"
        lines.append(f"targets of the group cell, QEMU {behaviour}: {verdict}")
        lines += [f"  {t['target']}: {words[t['met']]} ({t['shown']})" for t in found.values()]
    if vms != 4:
        lines.append(f"(the targets are set for 4 guests; this run had {vms})")
    return lines


def results(bench: Bench, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    summary = summarise(bench, args)
    return {
        "config": {
            "command": " ".join(["bench/switchover_group.py", *args.argv]),
            "vms": args.vms,
            "devices_per_vm": DEVICES,
            "rounds": args.rounds,
            "behaviours": list(args.behaviours),
            "modes": list(args.modes),
            "bandwidth_mib_s": args.bandwidth,
            "transition_ms": args.transition_ms,
            "peer_timeout_ms": args.timeout_ms,
            "peer_interval_ms": 5.0,
            "merge_ms": args.merge_ms,
            "hooks": args.hooks,
            "warmup": args.warmup,
            "idle_s": args.idle_s,
            "guest": "workload dirty: 4 MiB rewritten at 64 MiB/s, 128 MiB",
            "policy": bench.policy_text,
            "targets": {
                "windows": TARGET_WINDOWS,
                "timeouts": TARGET_TIMEOUTS,
                "vs_one_vm": TARGET_VS_ONE_VM,
                "vs_j1": TARGET_VS_J1,
            },
            **machine(),
        },
        "elapsed_s": round(elapsed, 1),
        "behaviours": summary,
        "idle": bench.idle,
        "runs": [{**asdict(r), "timeouts": r.timeouts, "windows_count": len(r.windows)} for r in bench.runs],
        "peers": bench.peer_reports,
    }


COLOURS = {"j1": "#1f77b4", "j4": "#ff7f0e", "group": "#2ca02c"}


def render_svg(bench: Bench, args: argparse.Namespace) -> str:
    """A timeline per run (its first round): the stall windows against the seconds since its command
    started (hiccups lighter), labelled with their count and total."""
    runs = [r for r in bench.runs if r.round == 1]
    row_h, top, left, width = 26, 60, 150, 960
    plot_w = width - left - 200
    height = top + row_h * len(runs) + 50
    span = max(
        [r.wall_s for r in runs]
        + [w["start_ms"] / 1000 + w["ms"] / 1000 for r in runs for w in r.windows]
        + [1.0]
    )
    out = svg_start(width, height)

    def text(x: float, y: float, content: str, anchor: str = "start", extra: str = "") -> None:
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{xml(content)}</text>')

    def x(seconds: float) -> float:
        return left + plot_w * seconds / span

    text(
        width / 2,
        22,
        f"Stall windows seen by the RDMA peers: {args.vms} dirtying guests x {DEVICES} devices, "
        f"{args.bandwidth} MiB/s, {args.transition_ms} ms transition",
        anchor="middle",
        extra=' font-size="14"',
    )
    text(left, top - 10, "seconds since the command started (round 1)", extra=' fill="#555"')
    for i, r in enumerate(runs):
        y = top + row_h * i
        text(
            left - 8,
            y + row_h * 0.65,
            f"{r.behaviour} {r.mode}",
            anchor="end",
            extra=' font-family="monospace"',
        )
        out.append(
            f'<line x1="{x(0):.1f}" y1="{y + row_h / 2:.1f}" x2="{x(r.wall_s):.1f}" y2="{y + row_h / 2:.1f}" '
            'stroke="#bbb"/>'
        )
        for w in r.windows:
            a, b = x(w["start_ms"] / 1000), x((w["start_ms"] + w["ms"]) / 1000)
            opacity = 0.35 if w["hiccup"] else 1.0
            out.append(
                f'<rect x="{a:.1f}" y="{y + 5:.1f}" width="{max(b - a, 1.5):.1f}" height="{row_h - 10}" '
                f'fill="{COLOURS[r.mode]}" fill-opacity="{opacity}"/>'
            )
        text(
            left + plot_w + 10,
            y + row_h * 0.65,
            f"{len(r.windows)} window(s), {r.total_stalled_ms:.0f} ms, {r.timeouts} timeout(s)",
            extra=' font-size="11"',
        )
    bottom = top + row_h * len(runs)
    out.append(f'<line x1="{x(0):.1f}" y1="{bottom}" x2="{x(span):.1f}" y2="{bottom}" stroke="#444"/>')
    step = max(1, math.ceil(span / 10))
    for s in range(0, int(span) + 1, step):
        out.append(f'<line x1="{x(s):.1f}" y1="{bottom}" x2="{x(s):.1f}" y2="{bottom + 4}" stroke="#444"/>')
        text(x(s), bottom + 16, f"{s}", anchor="middle", extra=' font-size="10"')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- main ---------------------------------------------------------------------------------------------


def _choices(text: str, allowed: Sequence[str], option: str, parser: argparse.ArgumentParser) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
        parser.error(f"{option}: expected some of {','.join(allowed)}, not {text!r}")
    return [v for v in allowed if v in values]  # in the table's order


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--vms", type=int, default=4, help="guests per set, 2 to 8 (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell (default 1)")
    parser.add_argument(
        "--behaviours", default=",".join(QEMUS), help=f"simulated QEMUs (default {','.join(QEMUS)})"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"cells (default {','.join(MODES)})")
    parser.add_argument("--bandwidth", type=int, default=32, help="migration bandwidth, MiB/s (default 32)")
    parser.add_argument(
        "--transition-ms", type=int, default=300, help="the P2P transition, each way (default 300)"
    )
    parser.add_argument("--timeout-ms", type=float, default=30.0, help="the peers' timeout (default 30)")
    parser.add_argument(
        "--hooks",
        choices=HOOKS,
        default=HOOKS[0],
        help="the RDMA hooks: a process per device and event (`drain|undrain`, default) or armed "
        "(`serve`, started with each migration)",
    )
    parser.add_argument(
        "--merge-ms", type=float, default=1.0, help="join stall intervals closer than this (default 1)"
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="the control: seconds the peers watch with no migration, per set (default 10; 0: none)",
    )
    parser.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the untimed first evacuation"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    parser.add_argument("--svg", type=Path, default=DEFAULT_SVG, help=f"(default {DEFAULT_SVG})")
    parser.add_argument(
        "--lab-dir", type=Path, help="directory of the benchmark's own lab (default: temporary)"
    )
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.argv = raw
    args.behaviours = _choices(args.behaviours, QEMUS, "--behaviours", parser)
    args.modes = _choices(args.modes, MODES, "--modes", parser)
    if not 2 <= args.vms <= 8:
        parser.error("--vms must be 2 to 8 (a group has at least two members)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 1 <= args.bandwidth <= 100000:
        parser.error("--bandwidth must be 1 to 100000 MiB/s")
    if not 0 <= args.transition_ms <= 60000:
        parser.error("--transition-ms must be 0 to 60000")
    if args.timeout_ms <= 0:
        parser.error("--timeout-ms must be > 0")
    if not 0 <= args.idle_s <= 3600:
        parser.error("--idle-s must be 0 to 3600")
    if not 0 <= args.merge_ms <= 1000:
        parser.error("--merge-ms must be 0 to 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success (whether the targets are met or not), 1 with one line on stderr
    otherwise."""
    args = parse_args(argv)
    exit_on_sigterm()
    measured = in_work_dir("switchover_group", "switchover-group-", lambda work: measure(args, work))
    if measured is None:
        return 1
    bench, elapsed = measured
    doc = results(bench, args, elapsed)
    print(table(doc["behaviours"]))
    print(
        f"{args.vms} dirtying guests x {DEVICES} devices, {args.rounds} round(s), {args.bandwidth} MiB/s, "
        f"{args.transition_ms} ms transition each way, peer timeout {args.timeout_ms:g} ms, "
        f"intervals within {args.merge_ms:g} ms joined, {elapsed:.0f} s"
    )
    for behaviour, idle in doc["idle"].items():
        print(
            f"idle control, QEMU {behaviour}: {idle['windows']} window(s) in {idle['seconds']:.0f} s with no "
            f"migration ({idle['hiccups_per_minute']:g} hiccups a minute), {idle['timeouts_quiet']}/"
            f"{idle['timeouts_other']} peer timeouts, {fmt(idle['steal_ms'], '.0f', 1)} ms stolen by the "
            "hypervisor"
        )
    print("\n".join(target_lines(doc["behaviours"], args.vms)))
    write_json(args.json, doc)
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    args.svg.write_text(render_svg(bench, args))
    print(f"plot: {args.svg}, numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
