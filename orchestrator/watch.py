"""`orchestrator watch`: relay VFIO_MIGRATION events from several hosts as NDJSON."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from orchestrator.errors import ConnectError
from orchestrator.virt import Host, Subscription


def event_record(
    host: str, domain: str, seconds: int, micros: int, data: dict[str, Any] | None
) -> dict[str, Any]:
    """One relayed event: QEMU's timestamp, when we got it, where, and what."""
    data = data or {}
    return {
        "qemu_time": seconds + micros / 1_000_000,
        "received": time.time(),
        "host": host,
        "domain": domain,
        "device_id": data.get("device-id"),
        "qom_path": data.get("qom-path"),
        "state": data.get("device-state"),
    }


def run(uris: Sequence[str], domain: str | None, out: TextIO, log: Callable[[str], None]) -> None:
    """Relay until Ctrl-C/SIGTERM or until every host has gone away (then ConnectError)."""
    lock = threading.Condition()
    alive: set[str] = set()
    hosts: list[Host] = []
    subs: list[Subscription] = []
    stop = threading.Event()

    def relay(uri: str) -> Callable[[str, str, int, int, dict[str, Any] | None], None]:
        def write(dom: str, _event: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            line = json.dumps(event_record(uri, dom, seconds, micros, data))
            with lock:
                out.write(line + "\n")
                out.flush()

        return write

    def gone(uri: str) -> Callable[[str], None]:
        def closed(reason: str) -> None:
            with lock:
                alive.discard(uri)
                left = len(alive)
                lock.notify_all()
            if not stop.is_set():
                log(f"orchestrator: host {uri} went away ({reason}); still watching {left} host(s)")

        return closed

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()
        with lock:
            lock.notify_all()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for uri in uris:
            host = Host.open(uri)
            hosts.append(host)
            host.on_close(gone(uri))
            subs.append(host.subscribe_monitor_events(relay(uri), events=["VFIO_MIGRATION"], domain=domain))
            alive.add(uri)
        log(f"orchestrator: watching {len(uris)} host(s); Ctrl-C to stop")
        with lock:
            while alive and not stop.is_set():
                lock.wait(1.0)
        if not stop.is_set():
            raise ConnectError("every watched host went away", "check the libvirt daemons, then watch again")
    finally:
        stop.set()
        for sub in subs:
            sub.cancel()
        for host in hosts:
            host.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
