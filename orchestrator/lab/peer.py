"""A stand-in for a VFIO device's RDMA peers, and the hook that disarms and re-arms them.

The peer sends a request to the simulated device every few milliseconds (the device's liveness
socket, see `simulator`) and counts a connection timeout when no answer comes within its timeout
while its timeout mechanism is armed: exactly what kills real RDMA connections when a device goes
quiet for a P2P transition. Its control socket takes `disarm` and `arm`, which is what the drain and
undrain hooks send (`orchestrator-rdma-hook drain|undrain ...`).

Paths, under the lab's fabric directory (`<lab-dir>/fabric`):
  <domain>/<device>@<pid>.sock      the device (bound by the simulator of the QEMU that runs it)
  <domain>/<device>.peer.sock       the peer's control socket (datagrams: disarm, arm, stats)

The hook itself lives in `rdma_hook` (it must start fast).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.lab.rdma_hook import control_path, fabric_dir
from orchestrator.lab.realtime import make_realtime


@dataclass
class Outage:
    """A time the device did not answer."""

    start: float  # the last answer before it (epoch seconds)
    end: float | None = None  # the first answer after it
    armed: bool = False  # whether the peer's timeout was armed when the outage exceeded it
    timed_out: bool = False
    # The device said it was quiet (its P2P transition and after: what a drain is for). False: nothing
    # said so, the device or this machine was just slow (a hiccup no drain can prevent).
    device_quiet: bool = False


@dataclass
class PeerStats:
    """What the peer saw."""

    domain: str
    device: str
    interval_ms: float
    timeout_ms: float
    probes: int = 0
    answers: int = 0
    timeouts: int = 0
    disarms: list[float] = field(default_factory=list)
    arms: list[float] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)

    def timeout_left_ms(self) -> list[float]:
        """For each disarm: how much of the peers' timeout was left when it came, counted from the
        device going quiet (its last answer); negative = too late, a timeout. (Not the report's `lead`,
        which is the orchestrator's view: its drain's end against QEMU's timestamp of the quiet.)

        The disarm belongs to the nearest outage: the last one that began before it (even if it had
        already ended: a disarm that late is that outage's) or the first one after it.
        """
        margins = []
        for disarm in self.disarms:
            before = [o for o in self.outages if o.start <= disarm]
            after = [o for o in self.outages if o.start > disarm]
            gap_before = None
            if before:
                end = before[-1].end
                gap_before = 0.0 if end is None or end >= disarm else disarm - end
            gap_after = after[0].start - disarm if after else None
            if gap_before is None and gap_after is None:
                continue
            if gap_after is None or (gap_before is not None and gap_before <= gap_after):
                outage = before[-1]
            else:
                outage = after[0]
            margins.append(round((outage.start + self.timeout_ms / 1000 - disarm) * 1000, 3))
        return margins

    @property
    def timeouts_quiet(self) -> int:
        """Timeouts in the device's own quiet time: a drain came too late (or not at all)."""
        return sum(1 for o in self.outages if o.timed_out and o.device_quiet)

    @property
    def timeouts_other(self) -> int:
        """Timeouts outside it: the device answering late on a busy machine, which no drain prevents."""
        return self.timeouts - self.timeouts_quiet

    def to_json(self) -> dict[str, Any]:
        """The report."""
        doc = asdict(self)
        doc["timeout_left_ms"] = self.timeout_left_ms()
        doc["timeouts_quiet"] = self.timeouts_quiet
        doc["timeouts_other"] = self.timeouts_other
        return doc


class Peer:
    """Probes one device and counts timeouts while armed."""

    def __init__(
        self, fabric: Path, domain: str, device: str, interval_ms: float = 5.0, timeout_ms: float = 30.0
    ):
        self.dir = fabric / domain
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.stats = PeerStats(domain, device, interval_ms, timeout_ms)
        self.armed = True
        self.last_answer = time.time()
        self.last_quiet = 0.0  # when the device last said it was quiet
        self.outage: Outage | None = None
        self.control_path = Path(control_path(str(fabric), domain, device))
        self.probe_path = self.dir / f"{device}.peer-probe.{os.getpid()}.sock"
        self.control = self._bind(self.control_path)
        self.probe = self._bind(self.probe_path)
        self.stop = False

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        return sock

    def _send_probes(self) -> None:
        self.stats.probes += 1
        for target in self.dir.glob(f"{self.device}@*.sock"):
            with contextlib.suppress(OSError):  # a stale socket of a QEMU that is gone
                self.probe.sendto(b"ping", str(target))

    def _on_reply(self, data: bytes, now: float) -> None:
        if data.startswith(b"quiet"):
            self.last_quiet = now
            if self.outage is not None:
                self.outage.device_quiet = True
        else:
            self._on_answer(now)

    def _on_answer(self, now: float) -> None:
        self.stats.answers += 1
        self.last_answer = now
        if self.outage is not None:
            self.outage.end = now
            self.outage = None

    def _check(self, now: float) -> None:
        quiet_ms = (now - self.last_answer) * 1000
        if quiet_ms <= self.stats.interval_ms * 2 + 5 and self.outage is None:
            return
        if self.outage is None and quiet_ms > self.stats.interval_ms * 2 + 5:
            self.outage = Outage(start=self.last_answer, device_quiet=self.last_quiet > self.last_answer)
            self.stats.outages.append(self.outage)
        outage = self.outage
        if outage is None or outage.timed_out or not self.armed:
            return
        # The timer runs from the last answer, or from re-arming if that came later.
        since = max(self.last_answer, self.stats.arms[-1] if self.stats.arms else 0.0)
        if (now - since) * 1000 > self.stats.timeout_ms:
            outage.timed_out = outage.armed = True
            self.stats.timeouts += 1

    def _on_control(self) -> None:
        try:
            data, addr = self.control.recvfrom(256)
        except OSError:
            return
        command = data.decode(errors="replace").strip()
        now = time.time()
        if command == "disarm":
            self.armed = False
            self.stats.disarms.append(now)
        elif command == "arm":
            self.armed = True
            self.stats.arms.append(now)
        elif command == "stop":
            self.stop = True
        reply = json.dumps(self.stats.to_json()) if command == "stats" else f"ok {command}"
        if addr:
            with contextlib.suppress(OSError):
                self.control.sendto(reply.encode(), addr)

    def run(self, duration_s: float | None = None) -> PeerStats:
        """Probe until `stop` (control command or signal) or the duration ends."""
        # The peers are other hosts in real life: keep them from queueing behind this machine's work.
        refused = make_realtime()
        if refused is not None:
            sys.stderr.write(f"peer of {self.stats.domain}/{self.device}: note: {refused}\n")
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(self.probe, selectors.EVENT_READ, "probe")
        end = None if duration_s is None else time.monotonic() + duration_s
        interval = self.stats.interval_ms / 1000
        next_probe = time.monotonic()
        try:
            while not self.stop and (end is None or time.monotonic() < end):
                now_mono = time.monotonic()
                if now_mono >= next_probe:
                    self._send_probes()
                    next_probe = now_mono + interval
                for key, _ in sel.select(max(0.0, next_probe - time.monotonic())):
                    if key.data == "control":
                        self._on_control()
                    else:
                        with contextlib.suppress(OSError):
                            while True:
                                data, _addr = self.probe.recvfrom(64)
                                self._on_reply(data, time.time())
                self._check(time.time())
        finally:
            sel.close()
            for sock, path in ((self.control, self.control_path), (self.probe, self.probe_path)):
                sock.close()
                path.unlink(missing_ok=True)
        return self.stats


def serve(
    domain: str, device: str, interval_ms: float, timeout_ms: float, duration_s: float | None
) -> PeerStats:
    """Run a peer in this process until SIGINT/SIGTERM, `stop`, or the duration."""
    peer = Peer(Path(fabric_dir()), domain, device, interval_ms, timeout_ms)

    def on_signal(_signum: int, _frame: object) -> None:
        peer.stop = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sys.stderr.write(f"peer of {domain}/{device} ready at {peer.control_path}\n")
        sys.stderr.flush()
        return peer.run(duration_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
