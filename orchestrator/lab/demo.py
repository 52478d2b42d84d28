"""The main job in the lab: live-migrate a guest with simulated VFIO devices there and back with
`orchestrator migrate` and the shipped `rdma-drain` policy, while stand-ins for the devices' RDMA
peers count timeouts; every event of both hosts and every hook is printed as it happens."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from orchestrator.core.report import Report, TimelineEntry
from orchestrator.core.request import Request
from orchestrator.edges.policy_files import resolve_policy
from orchestrator.edges.virt import Host
from orchestrator.flows.migration import Migration
from orchestrator.lab import guest as lab_guest
from orchestrator.lab import hosts as lab

DEVICES = 2
BANDWIDTH_MIB = 32


def run(name: str, root: Path | None, out: TextIO) -> list[Report]:
    """Up two hosts, ensure the guest, migrate it A -> B -> A; returns the migration reports."""
    root = lab.lab_root(root)
    os.environ["ORCH_LAB_DIR"] = str(root)  # where the rdma-drain hooks find the peers
    hosts = lab.up(2, root)[:2]
    conns = [Host.open(h.uri) for h in hosts]
    lock = threading.Lock()
    reports: list[Report] = []
    peers: list[subprocess.Popen[str]] = []
    try:
        where = next((i for i, c in enumerate(conns) if c.find_domain(name) is not None), None)
        if where is None:
            spec = lab_guest.GuestSpec(name=name, devices=DEVICES, workload="dirty")
            out.write(
                f"creating guest {name} on {hosts[0].name}: {DEVICES} simulated VFIO devices, QEMU 11.0, "
                f"a Linux guest rewriting {spec.dirty_mib} MiB at {spec.dirty_rate:g} MiB/s (a loaded VM)\n"
            )
            lab_guest.create_guest(hosts[0], spec, root=root)
            where = 0
        # Separate processes, as real peers are: in our process they would share its GIL.
        peers = [start_peer(name, f"nic{i}", root) for i in range(DEVICES)]
        policy = resolve_policy("rdma-drain")
        # 32 MiB/s: slower than the guest dirties, so QEMU iterates until the gate lets it switch over.
        settings = replace(
            policy.migration,
            data_uri=f"unix://{root}/migrations/{{domain}}.sock",
            bandwidth_mib=BANDWIDTH_MIB,
        )
        for src, dst in itertools.pairwise([where, 1 - where, where]):
            out.write(
                f"\n--- orchestrator migrate {name}: {hosts[src].name} -> {hosts[dst].name}, rdma-drain "
                f"(gated, armed hooks), {BANDWIDTH_MIB} MiB/s\n"
            )
            request = Request(name, hosts[src].uri, hosts[dst].uri, policy, settings=settings)
            start = [0.0]

            def show(entry: TimelineEntry, start: list[float] = start) -> None:
                with lock:
                    start[0] = start[0] or entry.at
                    out.write(f"{entry.at - start[0]:8.3f}s  {entry.host:12}  {entry.kind:8}  {entry.text}\n")
                    out.flush()

            report = Migration(request, conns[src], conns[dst], on_entry=show).run()
            reports.append(report)
            timings = report.to_json()["timings"]
            error = f": {report.error}" if report.error else ""
            took = f"{timings['total_s']:.2f} s, downtime {timings['downtime_ms']} ms, gate {report.gate}"
            out.write(f"--- {report.outcome.value}, {took}{error}\n")
            for device in report.devices.values():
                bound = {"at least": "at least ", "at most": "at most "}.get(device.quiet_bound or "", "")
                lead = (
                    "-" if device.lead_ms is None else f"{bound}{device.lead_ms:.0f} ms before it went quiet"
                )
                out.write(f"    {device.device_id}: drained by {device.trigger}, {lead}\n")
        out.write("\n" + summary([stop_peer(p) for p in peers]) + "\n")
        out.write(
            f"\nThe lab is still up in {root}: {', '.join(h.name for h in hosts)} (guest {name} on "
            f"{hosts[where].name}). Look around with: {lab.lab_command('status', root)}\n"
            f"Stop it with: {lab.lab_command('down', root)}\n"
        )
    finally:
        for peer in peers:
            if peer.poll() is None:
                peer.kill()
        for conn in conns:
            conn.close()
    return reports


def start_peer(domain: str, device: str, root: Path) -> subprocess.Popen[str]:
    """`orchestrator lab peer` for one device, once it is ready."""
    peer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "lab",
            "peer",
            domain,
            "--device",
            device,
            "--lab-dir",
            str(root),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert peer.stderr is not None
    peer.stderr.readline()  # "peer of ... ready at ..."
    return peer


def stop_peer(peer: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop a peer and return its report."""
    peer.send_signal(signal.SIGINT)
    out, _err = peer.communicate(timeout=30)
    report: dict[str, Any] = json.loads(out)
    return report


def summary(stats: list[dict[str, Any]]) -> str:
    """One line per device's peers: timeouts (the product's promise is zero) and the margin left."""
    lines = []
    for s in stats:
        left = ", ".join(f"{m:.1f} ms" for m in s["timeout_left_ms"]) or "-"
        other = (
            f"; {s['timeouts_other']} more outside it: the device answered late on a busy machine, "
            "which no drain prevents"
            if s["timeouts_other"]
            else ""
        )
        lines.append(
            f"RDMA peers of {s['device']}: {s['timeouts_quiet']} timeouts in the device's quiet time "
            f"({s['timeout_ms']:.0f} ms timeout, {len(s['outages'])} outages, disarmed "
            f"{len(s['disarms'])}x, timeout left when disarmed {left}){other}"
        )
    return "\n".join(lines)
