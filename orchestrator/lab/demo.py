"""The main job in the lab: live-migrate a guest with simulated VFIO devices there and back,
printing every VFIO event seen on both hosts."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from orchestrator.lab import guest as lab_guest
from orchestrator.lab import hosts as lab
from orchestrator.virt import Host, MigrateRequest, Subscription, migrate

_SHOWN = ("VFIO_MIGRATION", "MIGRATION", "STOP", "RESUME")


def run(name: str, root: Path | None, out: TextIO) -> None:
    """Up two hosts, ensure the guest, migrate it A -> B -> A with events printed as they come."""
    hosts = lab.up(2, root)[:2]
    conns = [Host.open(h.uri) for h in hosts]
    lock = threading.Lock()
    start = time.time()
    subs: list[Subscription] = []

    def printer(host: str) -> Any:
        def show(domain: str, event: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            if domain != name or event not in _SHOWN:
                return
            t = seconds + micros / 1e6 - start
            detail = data.get("device-state") if event == "VFIO_MIGRATION" and data else None
            what = f"{data['device-id']} -> {detail}" if detail and data else (data or {}).get("status", "")
            with lock:
                out.write(f"{t:8.3f}s  {host:6}  {event:15} {what}\n")
                out.flush()

        return show

    try:
        for host, conn in zip(hosts, conns, strict=True):
            subs.append(conn.subscribe_monitor_events(printer(host.name)))
        where = next((i for i, c in enumerate(conns) if c.find_domain(name) is not None), None)
        if where is None:
            out.write(f"creating guest {name} on {hosts[0].name} with 2 simulated VFIO devices\n")
            lab_guest.create_guest(hosts[0], lab_guest.GuestSpec(name=name, devices=2), root=root)
            where = 0
        order = [where, 1 - where, where]
        for src, dst in itertools.pairwise(order):
            out.write(f"--- live migration of {name}: {hosts[src].name} -> {hosts[dst].name}\n")
            began = time.monotonic()
            sock = lab.lab_root(root) / "migrations" / f"{name}.sock"
            request = MigrateRequest(destination_uri=hosts[dst].uri, data_uri=f"unix://{sock}")
            migrate(conns[src], conns[src].domain(name), request)
            out.write(f"--- done in {time.monotonic() - began:.2f} s\n")
    finally:
        for sub in subs:
            sub.cancel()
        for conn in conns:
            conn.close()
