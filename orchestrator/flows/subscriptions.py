"""A migration's monitor-event subscriptions on both hosts: the events it follows, on the source by the
domain object, on the destination by name until the incoming domain exists, then by object.

The listeners are the migration's own (libvirt's event thread calls them directly); on the destination
an event delivered through both subscriptions in the handover reaches the listener once.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

from orchestrator.core import vfio
from orchestrator.core.hypervisor import Guest, Hypervisor, Subscription

FOLLOWED_EVENTS = ("MIGRATION", "RESUME", "SHUTDOWN", "STOP", *vfio.EVENTS)

Listener = Callable[[str, str, int, int, dict[str, Any] | None], None]


class Subscriptions:
    """One migration's event subscriptions, on its source and its destination."""

    def __init__(self, source: Hypervisor, destination: Hypervisor, destination_domain: str) -> None:
        self.source = source
        self.destination = destination
        self.destination_domain = destination_domain
        self._subs: list[Subscription] = []
        self._arrivals: _Arrivals | None = None
        self._by_name: Subscription | None = None

    def subscribe(self, dom: Guest, on_source: Listener, on_destination: Listener) -> None:
        """Follow `dom`'s events on the source, and the incoming domain's on the destination."""
        events = sorted(FOLLOWED_EVENTS)
        self._subs.append(self.source.subscribe_monitor_events(on_source, events=events, dom=dom))
        # The incoming domain does not exist yet on the destination: filtered by name here, which means
        # every domain's events cross the connection, until `narrow` follows the domain.
        self._arrivals = _Arrivals(on_destination)
        self._by_name = self.destination.subscribe_monitor_events(
            self._arrivals, events=events, domain=self.destination_domain
        )
        self._subs.append(self._by_name)

    def narrow(self) -> None:
        """Once the incoming domain exists, follow it by object (libvirt then filters for us) and drop the
        subscription by name; an event delivered through both in the handover counts once."""
        if self._by_name is None or self._arrivals is None:
            return
        there = self.destination.find_domain(self.destination_domain)
        if there is None:
            return
        events = sorted(FOLLOWED_EVENTS)
        self._subs.append(self.destination.subscribe_monitor_events(self._arrivals, events=events, dom=there))
        self._by_name.cancel()
        self._by_name = None

    def cancel(self) -> None:
        """Cancel every subscription."""
        for sub in self._subs:
            sub.cancel()
        self._subs.clear()


class _Arrivals:
    """The destination's events, through the subscription by name and then the one by object: while
    both are registered libvirt delivers an event to each, so one seen already (same event, same
    QEMU timestamp) is dropped."""

    _REMEMBERED = 64

    def __init__(self, deliver: Listener) -> None:
        self._deliver = deliver
        self._seen: collections.deque[tuple[str, int, int, str | None]] = collections.deque(
            maxlen=self._REMEMBERED
        )
        self._lock = threading.Lock()

    def __call__(
        self, domain: str, name: str, seconds: int, micros: int, data: dict[str, Any] | None
    ) -> None:
        key = (name, seconds, micros, None if data is None else str(data))
        with self._lock:
            if key in self._seen:
                return
            self._seen.append(key)
        self._deliver(domain, name, seconds, micros, data)
