"""What a migration needs of libvirt: a narrow interface, and the plain records that cross it.

`orchestrator.edges.virt` implements `Hypervisor` and `Guest` on libvirt (like VDSM's DomainAdapter, only
the methods a migration uses); the unit tests implement them with a scripted fake on a fake clock
(tests/unit/scripted.py). Nothing here imports libvirt, so the migration's logic is importable and
testable without it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.core.errors import OrchestratorError

MonitorCallback = Callable[[str, str, int, int, dict[str, Any] | None], None]
"""(domain name, event name, seconds, microseconds, data) -> None; runs on libvirt's event thread."""

JobEnded = Callable[[OrchestratorError | None], None]
"""Called once when a migration job ends: None on success, the error otherwise."""

# Domain states, in the words virsh uses; `GONE` when the domain vanished while we asked.
RUNNING, PAUSED, SHUT_OFF, GONE = "running", "paused", "shut off", "gone"
ACTIVE_STATES = frozenset({RUNNING, PAUSED})


@dataclass(frozen=True)
class DomainInfo:
    """What `lab status` and evacuation planning need to know of a domain."""

    name: str
    uuid: str
    state: str
    active: bool
    persistent: bool
    memory_kib: int


@dataclass(frozen=True)
class JobStats:
    """One reading of a migration job's statistics, normalised (like Nova's JobInfo).

    Built from libvirt's typed parameters (`from_params`); units are bytes, bytes/s and ms.
    `expected_downtime_ms` is QEMU's own estimate while the job runs (the real downtime once
    completed): the data dirtied since the last pass divided by the bandwidth.
    """

    active: bool = True
    elapsed_ms: int = 0
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int | None = None
    bandwidth_bps: int = 0
    dirty_rate_bps: int = 0
    iteration: int = 0
    expected_downtime_ms: int | None = None
    vfio_transferred: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, active: bool = True) -> JobStats:
        """From virDomainGetJobStats' typed parameters (their names are libvirt's, as strings)."""

        def number(key: str) -> int:
            value = params.get(key)
            return int(value) if value is not None else 0

        remaining = params.get("memory_remaining")
        downtime = params.get("downtime")
        page = number("memory_page_size") or 4096
        return cls(
            active=active,
            elapsed_ms=number("time_elapsed"),
            memory_total=number("memory_total"),
            memory_processed=number("memory_processed"),
            memory_remaining=None if remaining is None else int(remaining),
            bandwidth_bps=number("memory_bps"),
            dirty_rate_bps=number("memory_dirty_rate") * page,  # libvirt gives pages/s
            iteration=number("memory_iteration"),
            expected_downtime_ms=None if downtime is None else int(downtime),
            vfio_transferred=number("vfio_data_transferred"),
        )


@dataclass(frozen=True)
class MigrateRequest:
    """What to ask libvirt for one live migration (precopy only: VFIO forbids post-copy)."""

    destination_uri: str
    peer2peer: bool = True
    persist: bool = True
    undefine_source: bool = True
    data_uri: str | None = None
    listen_address: str | None = None
    dest_xml: str | None = None
    persist_xml: str | None = None
    bandwidth_mib: int | None = None
    compressed: bool = False
    compression_methods: tuple[str, ...] = ()  # e.g. ("zstd",); implies compressed
    auto_converge: bool = False
    tls: bool = False
    parallel_connections: int | None = None  # multifd: this many connections (None: one stream)
    copy_storage_all: bool = False  # non-shared disks, copied over NBD
    migrate_disks: tuple[str, ...] = ()  # only these disks (targets such as "vda"); implies copying
    dest_name: str | None = None  # rename the domain on the destination
    disks_uri: str | None = None  # where the destination listens for the disks' NBD copy


class Subscription(Protocol):
    """A registered monitor-event callback."""

    def cancel(self) -> None:
        """Stop delivering events (idempotent)."""


class Guest(Protocol):
    """One domain on one host, as a migration sees it."""

    def name(self) -> str:
        """The domain's name."""

    def uuid(self) -> str:
        """The domain's UUID."""

    def state(self) -> str:
        """The state in virsh's words ("running", "paused", "shut off", ...; "gone" if it vanished)."""

    def xml(self, *, migratable: bool = False, inactive: bool = False) -> str:
        """The live XML (or the persistent definition), optionally migratable."""

    def job_stats(self) -> JobStats | None:
        """The active job's statistics; None when no job runs."""

    def completed_job_stats(self) -> JobStats | None:
        """The last completed job's statistics (after a migration, on the destination)."""

    def abort_job(self) -> bool:
        """Abort the running job; False if there was none."""

    def set_max_downtime(self, ms: int) -> None:
        """Set QEMU's downtime limit (applied at its next iteration; libvirt restores it after the job)."""

    def max_downtime(self) -> int | None:
        """QEMU's downtime limit now, in ms; None when there is none to read (the job ended)."""


class Hypervisor(Protocol):
    """One host (a libvirt connection), as a migration sees it."""

    @property
    def uri(self) -> str:
        """The connection URI."""

    def find_domain(self, name: str) -> Guest | None:
        """The domain named `name` (or with that UUID), None if this host has none."""

    def subscribe_monitor_events(
        self,
        callback: MonitorCallback,
        *,
        events: Sequence[str] | None = None,
        domain: str | None = None,
        dom: Guest | None = None,
    ) -> Subscription:
        """Deliver QEMU monitor events (of `dom`, or of the domain named `domain`) to `callback`."""

    def start_migration(
        self, dom: Guest, request: MigrateRequest, destination: Hypervisor, on_end: JobEnded
    ) -> None:
        """Start the live migration of `dom` and return at once; `on_end` is called when it ends."""


class Clock(Protocol):
    """Time and waiting, injected so that tests can run a migration on a fake clock."""

    def time(self) -> float:
        """Epoch seconds."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        """Wait on `condition` (held by the caller) until notified or `timeout` seconds passed."""


class SystemClock:
    """The real clock."""

    @staticmethod
    def time() -> float:
        """Epoch seconds."""
        return time.time()

    @staticmethod
    def monotonic() -> float:
        """Seconds on a clock that never goes back."""
        return time.monotonic()

    @staticmethod
    def wait(condition: threading.Condition, timeout: float) -> None:
        """Wait on `condition` (held by the caller) until notified or `timeout` seconds passed."""
        condition.wait(timeout)
