"""`orchestrator watch`: relay VFIO_MIGRATION events from several hosts as NDJSON.

A host that cannot be reached at the start is reported (one line) and retried in the background
every few seconds until it connects (reported too); the reachable ones are watched meanwhile. A host
that goes away later is reported and the others are kept. The libvirt edge (`orchestrator.edges.virt`) is
imported only when a host is opened, so that the logic here runs without libvirt in unit tests.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from orchestrator.core import vfio
from orchestrator.core.errors import ConnectError, OrchestratorError, shell_uri

RETRY_S = 5.0
"""Seconds between two attempts to reach a host that was unreachable at the start."""

MonitorCallback = Callable[[str, str, int, int, dict[str, Any] | None], None]
"""(domain name, event name, seconds, microseconds, data), as orchestrator.edges.virt delivers them."""


class SubscriptionLike(Protocol):
    """What watch needs of orchestrator.edges.virt.Subscription."""

    def cancel(self) -> None: ...


class HostLike(Protocol):
    """What watch needs of orchestrator.edges.virt.Host."""

    def on_close(self, callback: Callable[[str], None]) -> None: ...

    def subscribe_monitor_events(
        self, callback: MonitorCallback, *, events: Sequence[str] | None = None, domain: str | None = None
    ) -> SubscriptionLike: ...

    def find_domain(self, name: str) -> object | None: ...

    def close(self) -> None: ...


OpenHost = Callable[[str], HostLike]


def open_libvirt_host(uri: str) -> HostLike:
    """Open `uri` through the libvirt edge (raises ConnectError with one clear line)."""
    from orchestrator.edges.virt import Host

    return Host.open(uri)


def event_record(
    host: str, domain: str, seconds: int, micros: int, data: dict[str, Any] | None, event: str = vfio.EVENT
) -> dict[str, Any]:
    """One relayed event: QEMU's timestamp, when we got it, where, and what (a VFIO_MIGRATION_PREPARE,
    QEMU's first design, relayed as the prepare state it announces, as VFIO_MIGRATION would say it)."""
    data = data or {}
    state = data.get("device-state")
    if event == vfio.PREPARE_EVENT and isinstance(state, str) and not state.endswith("-prepare"):
        state += "-prepare"
    return {
        "qemu_time": seconds + micros / 1_000_000,
        "received": time.time(),
        "host": host,
        "domain": domain,
        "device_id": data.get("device-id"),
        "qom_path": data.get("qom-path"),
        "state": state,
    }


def unique_uris(uris: Sequence[str]) -> list[str]:
    """The URIs in the order given, each once (`-c A -c A` watches A once)."""
    return list(dict.fromkeys(uris))


class Watcher:
    """Relays the events of several hosts to `out`; `start()`, then `wait()`, and `close()`."""

    def __init__(
        self,
        uris: Sequence[str],
        domain: str | None,
        out: TextIO,
        log: Callable[[str], None],
        *,
        open_host: OpenHost | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        """`open_host(uri)` opens one host (default: through libvirt); `retry_s`: seconds between two
        attempts to reach a host unreachable at the start."""
        self.uris = unique_uris(uris)
        self.domain = domain
        self._out = out
        self._log = log
        self._open_host = open_host or open_libvirt_host
        self._retry_s = retry_s
        self._lock = threading.Condition()
        self._alive: set[str] = set()  # connected and subscribed
        self._pending: set[str] = set()  # unreachable at the start, being retried
        self._hosts: list[HostLike] = []
        self._subs: list[SubscriptionLike] = []
        self._retries: list[threading.Thread] = []
        self._stop = threading.Event()

    # --- what tests and the CLI look at ---------------------------------------------------------
    @property
    def alive(self) -> set[str]:
        """The hosts being watched now."""
        with self._lock:
            return set(self._alive)

    @property
    def pending(self) -> set[str]:
        """The hosts unreachable so far, being retried."""
        with self._lock:
            return set(self._pending)

    # --- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to every host; report (and keep retrying) the unreachable ones.

        Raises ConnectError (one line, exit 3) when none can be reached.
        """
        failures: dict[str, OrchestratorError] = {}
        for uri in self.uris:
            try:
                self._connect(uri)
            except OrchestratorError as exc:
                failures[uri] = exc
        if not self.alive:
            raise self._none_reachable(failures)
        for uri, failure in failures.items():
            self._log(f"orchestrator: warning: {failure.message}; retrying every {self._retry_s:g} s")
            with self._lock:
                self._pending.add(uri)
            thread = threading.Thread(target=self._retry, args=(uri,), name=f"watch-retry {uri}", daemon=True)
            self._retries.append(thread)
            thread.start()
        if self.domain is not None and not self._domain_seen():
            where = "the reachable hosts" if failures else "the watched hosts"
            self._log(
                f"orchestrator: warning: domain {self.domain!r} exists on none of {where}; "
                "watching for it anyway (it may be created or migrated in)"
            )
        self._log(f"orchestrator: watching {len(self.alive)} host(s); Ctrl-C to stop")

    def wait(self) -> None:
        """Block until `stop()`, or until every host has gone away (then ConnectError)."""
        with self._lock:
            while (self._alive or self._pending) and not self._stop.is_set():
                self._lock.wait(1.0)
        if not self._stop.is_set():
            raise ConnectError("every watched host went away", "check the libvirt daemons, then watch again")

    def stop(self) -> None:
        """End `wait()` (from a signal handler or another thread)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()

    def close(self) -> None:
        """Stop retrying, unsubscribe and close every connection."""
        self._stop.set()
        with self._lock:
            subs, self._subs = self._subs, []
            hosts, self._hosts = self._hosts, []
            self._alive.clear()
            self._pending.clear()
        for sub in subs:
            sub.cancel()
        for host in hosts:
            host.close()
        for thread in self._retries:
            thread.join(0.5)  # one stuck in a slow connect closes what it opens itself (see _connect)

    # --- internals ------------------------------------------------------------------------------
    def _connect(self, uri: str) -> None:
        host = self._open_host(uri)
        try:
            host.on_close(self._gone(uri))
            sub = host.subscribe_monitor_events(
                self._relay(uri), events=list(vfio.EVENTS), domain=self.domain
            )
        except BaseException:
            host.close()
            raise
        with self._lock:
            if self._stop.is_set():  # closed while this connect was under way
                late = True
            else:
                late = False
                self._hosts.append(host)
                self._subs.append(sub)
                self._alive.add(uri)
                self._pending.discard(uri)
                self._lock.notify_all()
        if late:
            sub.cancel()
            host.close()

    def _retry(self, uri: str) -> None:
        while not self._stop.wait(self._retry_s):
            try:
                self._connect(uri)
            except OrchestratorError:
                continue  # said once at the start; quiet until it connects
            if not self._stop.is_set():
                self._log(f"orchestrator: connected to {uri}; watching {len(self.alive)} host(s)")
            return

    def _none_reachable(self, failures: dict[str, OrchestratorError]) -> ConnectError:
        if len(failures) == 1:
            ((uri, exc),) = failures.items()
            return ConnectError(
                exc.message,
                f"check the URI and that libvirtd runs there: virsh -c {shell_uri(uri)} list",
            )
        return ConnectError(
            f"cannot reach any of the {len(failures)} watched hosts: "
            + "; ".join(exc.message for exc in failures.values()),
            "check the URIs and that libvirtd runs there: virsh -c 'URI' list",
        )

    def _domain_seen(self) -> bool:
        with self._lock:
            hosts = list(self._hosts)
        for host in hosts:
            try:
                if host.find_domain(self.domain or "") is not None:
                    return True
            except OrchestratorError:
                continue  # cannot tell on that host: not a reason to warn, nor to stop
        return False

    def _relay(self, uri: str) -> MonitorCallback:
        def write(dom: str, event: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            line = json.dumps(event_record(uri, dom, seconds, micros, data, event))
            with self._lock:
                self._out.write(line + "\n")
                self._out.flush()

        return write

    def _gone(self, uri: str) -> Callable[[str], None]:
        def closed(reason: str) -> None:
            with self._lock:
                self._alive.discard(uri)
                left = len(self._alive)
                self._lock.notify_all()
            if not self._stop.is_set():
                self._log(f"orchestrator: host {uri} went away ({reason}); still watching {left} host(s)")

        return closed


def run(
    uris: Sequence[str],
    domain: str | None,
    out: TextIO,
    log: Callable[[str], None],
    *,
    open_host: OpenHost | None = None,
    retry_s: float = RETRY_S,
) -> None:
    """Relay until Ctrl-C/SIGTERM or until every host has gone away (then ConnectError).

    Raises ConnectError at once when no host can be reached.
    """
    watcher = Watcher(uris, domain, out, log, open_host=open_host, retry_s=retry_s)

    def on_signal(_signum: int, _frame: object) -> None:
        watcher.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        watcher.start()
        watcher.wait()
    finally:
        watcher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
