"""Fixtures of the lab tests: the lab (real libvirtd + QEMU) and an event recorder.

Lab tests RUN under CI=true: a lab that cannot start there is a failure. Elsewhere they skip with
the reason printed, when the machine cannot host the lab (not root, packages missing).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.hypervisor import MigrateRequest
from orchestrator.edges.virt import Host, Subscription
from orchestrator.lab import guest as lab_guest
from orchestrator.lab import hosts as lab

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [
        p for p in ("libvirtd", "virtlogd", "qemu-system-x86_64", "unshare") if shutil.which(p) is None
    ]
    if missing:
        return f"missing {', '.join(missing)} (run deploy/setup.sh)"
    return None


@dataclass
class Lab:
    """The running lab for a test session."""

    root: Path
    hosts: list[lab.LabHost]
    conns: list[Host] = field(default_factory=list)

    def conn(self, index: int) -> Host:
        return self.conns[index]

    def guest(self, host: int = 0, **spec: Any) -> str:
        """Create a uniquely named guest on host `host`; returns its name."""
        name = spec.pop("name", None) or f"t-{uuid.uuid4().hex[:8]}"
        lab_guest.create_guest(self.hosts[host], lab_guest.GuestSpec(name=name, **spec), root=self.root)
        return name

    def migrate(self, name: str, src: int, dst: int, **request: Any) -> None:
        """Live-migrate `name` from host `src` to host `dst` with libvirt (p2p, unix data socket)."""
        sock = self.root / "migrations" / f"{name}.sock"
        req = MigrateRequest(destination_uri=self.hosts[dst].uri, data_uri=f"unix://{sock}", **request)
        self.conns[src].migrate(self.conns[src].domain(name), req)

    def remove(self, name: str) -> None:
        for conn in self.conns:
            conn.destroy_and_undefine(name)


@pytest.fixture(scope="session")
def lab_env() -> Iterator[Lab]:
    """Three lab hosts for the whole session, stopped at the end."""
    yield from lab_of(3, "orch-lab-")


def lab_of(count: int, prefix: str) -> Iterator[Lab]:
    """A lab of `count` hosts under a new /var/tmp/PREFIX... directory, for a fixture to yield from:
    skipped with its reason if it cannot start (a failure under CI), stopped and removed after."""
    reason = _lab_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"the lab cannot run under CI: {reason}")
        pytest.skip(f"lab tests skipped: {reason}")
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        hosts = lab.up(count, root)
    except Exception as exc:
        lab.down(root)
        if IN_CI:
            pytest.fail(f"the lab did not start under CI: {exc}")
        pytest.skip(f"the lab did not start: {exc}")
    env = Lab(root=root, hosts=hosts, conns=[Host.open(h.uri) for h in hosts])
    try:
        yield env
    finally:
        for conn in env.conns:
            conn.close()
        lab.down(root)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Seen:
    """One monitor event as a subscriber received it."""

    host: int
    domain: str
    event: str
    qemu_time: float
    received: float
    data: dict[str, Any] | None

    @property
    def vfio(self) -> tuple[str, str] | None:
        if self.event != "VFIO_MIGRATION" or not self.data:
            return None
        return self.data["device-id"], self.data["device-state"]


class Recorder:
    """Subscribes to every QEMU monitor event on the lab's hosts for one domain; lets a test wait
    for a condition on what arrived (no sleeps)."""

    def __init__(self, env: Lab, domain: str) -> None:
        self.domain = domain
        self.events: list[Seen] = []
        self._cond = threading.Condition()
        self._subs: list[Subscription] = []
        for index, conn in enumerate(env.conns):
            self._subs.append(conn.subscribe_monitor_events(self._make(index)))

    def _make(self, host: int) -> Callable[[str, str, int, int, dict[str, Any] | None], None]:
        def record(domain: str, event: str, seconds: int, micros: int, data: dict[str, Any] | None) -> None:
            if domain != self.domain:
                return
            with self._cond:
                self.events.append(Seen(host, domain, event, seconds + micros / 1e6, time.time(), data))
                self._cond.notify_all()

        return record

    def wait_for(self, predicate: Callable[[list[Seen]], bool], timeout: float = 30.0) -> list[Seen]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.events), timeout):
                raise AssertionError(
                    f"timed out; events so far: {[(e.host, e.event, e.data) for e in self.events]}"
                )
            return list(self.events)

    def vfio(self, host: int) -> list[tuple[str, str]]:
        with self._cond:
            return [e.vfio for e in self.events if e.host == host and e.vfio is not None]

    def vfio_events(self, host: int) -> list[Seen]:
        with self._cond:
            return [e for e in self.events if e.host == host and e.vfio is not None]

    def close(self) -> None:
        for sub in self._subs:
            sub.cancel()


@pytest.fixture
def recorder(lab_env: Lab) -> Iterator[Callable[[str], Recorder]]:
    made: list[Recorder] = []

    def make(domain: str) -> Recorder:
        rec = Recorder(lab_env, domain)
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.close()
