"""A simulated VFIO device, usable as a libvirt domain's `<emulator>`.

No VFIO hardware exists in the lab, so this program stands between libvirt and the real QEMU:

1. libvirt starts it with QEMU's arguments and an already-listening monitor socket passed as
   `-chardev socket,id=charmonitor,fd=N,server=on,wait=off`.
2. It removes every vfio-pci device from those arguments (there is no VFIO hardware to give
   QEMU), gives QEMU one end of a socket pair as the monitor instead, forks a proxy that accepts
   libvirt's connection on fd N, and then execs the real QEMU (so the PID libvirt forked stays
   QEMU's).
3. The proxy relays the monitor both ways (file descriptors libvirt passes with SCM_RIGHTS
   included) and, driven by the real migration's own monitor traffic, injects VFIO_MIGRATION
   events that reproduce QEMU's hw/vfio/migration.c sequence for each simulated device, at QMP
   message boundaries. A P2P transition blocks QEMU's later output for its duration, as the real
   ioctl would block QEMU.

The simulated devices are the domain's vfio-pci devices on QEMU's command line, declared as a user
adds one through libvirt's QEMU passthrough (`<qemu:arg value='-device'/><qemu:arg
value='vfio-pci,id=nic0,host=0000:5e:00.0'/>` in `<qemu:commandline>`): every `-device` whose driver
is vfio-pci or vfio-pci-nohotplug, in keyval or JSON syntax. Each needs an `id=` (the QEMU id its
events carry); its own `migration-events` option beats `-global`, as in QEMU. The simulator runs
only when there is such a device and libvirt passed a monitor fd; otherwise it just execs QEMU.

The other settings come from the environment, which libvirt fills from the domain's `<qemu:env>`
entries, so they travel with the domain when it migrates:

- ORCH_SIM_OVERRIDES: per-device overrides of the settings below, comma-separated
  `id:key=value[:key=value]` entries with keys `precopy` and `p2p`; example: `nic1:precopy=off`.
  An id with no vfio-pci `-device` is an error.
- ORCH_SIM_BEHAVIOUR: `11.0` (emits pre-copy-p2p-prepare before the P2P transition, default),
  `10.0` (QEMU 9.1-10.x: no prepare state) or `11.0-event` (QEMU's first design of the feature: the
  prepare as an event of its own, VFIO_MIGRATION_PREPARE, device-state the state about to come).
- ORCH_SIM_PRECOPY, ORCH_SIM_P2P: `on` (default) or `off`: the device's migration features.
- ORCH_SIM_TRANSITION_MS: how long the transition into P2P takes (default 300).
- ORCH_SIM_FAIL_TRANSITION: a device state (e.g. `running`): the transition into P2P fails after
  its duration, the device falls back to that state, and the migration fails (the simulator
  cancels it, as QEMU's migration_file_set_error() would fail it).
- ORCH_SIM_ANSWERING: states in which the device answers its peers (default `running,pre-copy`);
  it also stops answering the moment a P2P transition begins.
- ORCH_SIM_FABRIC: a directory; the device then answers liveness probes on a datagram socket
  `<dir>/<domain>/<device-id>@<pid>.sock` (send anything, get `alive <state>` back while it answers,
  `quiet <state>` inside its P2P transition and after it, nothing otherwise): the stand-in for the
  device's RDMA peers observes that. The event proxy runs at real-time priority (lab/realtime.py).
- ORCH_SIM_QEMU: the real QEMU binary (default: qemu-system-x86_64 on PATH).

Like QEMU, a device emits events only when its `migration-events` property is on:
`-global vfio-pci.migration-events=on` (or the `driver=,property=,value=` form) in the command
line, or `migration-events=on` in that device's own `-device` options.

This module is the program and its monitor proxy; the settings are read by
orchestrator.lab.sim_settings, and the device model (states and event sequences) is
orchestrator.lab.sim_model.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence

from orchestrator.lab.realtime import make_realtime
from orchestrator.lab.sim_model import Device, Simulator, Step, add_prepare_state, restamp
from orchestrator.lab.sim_settings import (
    ConfigError,
    SimConfig,
    domain_name,
    monitor_fd,
    vfio_devices,
    without_vfio_devices,
)

_MAX_FDS = 16


class Proxy:
    """Relays libvirt <-> QEMU monitor traffic and runs the simulator's steps."""

    def __init__(self, listener: socket.socket, qemu: socket.socket, sim: Simulator, domain: str) -> None:
        self.listener = listener
        self.qemu = qemu
        self.sim = sim
        self.domain = domain
        self.libvirt: socket.socket | None = None
        self.sel = selectors.DefaultSelector()
        self.from_libvirt = b""
        self.pending_fds: list[int] = []
        self.from_qemu = b""
        # Everything bound for libvirt, in order, while a scripted sequence runs (a P2P
        # transition blocks QEMU's later output for its duration, as the real ioctl would).
        self.script: deque[Step] = deque()
        self.wake_at: float | None = None
        self.blocked = False  # a wait has run since the queue was last empty
        self.swallow_ids: set[str] = set()
        self.schema_ids: set[str] = set()

    # output ------------------------------------------------------------------------------
    def send_libvirt(self, line: bytes) -> None:
        if self.libvirt is not None:
            self.libvirt.sendall(line)

    def enqueue(self, steps: Sequence[Step]) -> None:
        """Append steps and run them unless a wait is in progress."""
        self.script.extend(steps)
        if self.wake_at is None:
            self.run_script()

    def run_script(self) -> None:
        """Run steps until a wait or the end of the queue."""
        while self.script:
            step = self.script.popleft()
            if step.kind == "wait":
                self.wake_at = time.monotonic() + step.seconds
                self.blocked = True
                return
            if step.kind == "forward":
                self.send_libvirt(restamp(step.line) if self.blocked else step.line)
            elif step.kind == "emit" and step.device is not None:
                line = self.sim.event(step.device, step.state)
                if line is not None:
                    self.send_libvirt(line)
            elif step.kind == "quiet" and step.device is not None:
                step.device.quiet = True
            elif step.kind == "cancel":
                self.swallow_ids.add("vfio-sim-cancel")
                self.qemu.sendall(b'{"execute": "migrate_cancel", "id": "vfio-sim-cancel"}\r\n')
        self.wake_at = None
        self.blocked = False

    # input -------------------------------------------------------------------------------
    def on_libvirt(self) -> bool:
        assert self.libvirt is not None
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = self.libvirt.recvmsg(
                65536, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
            )
        except ConnectionResetError:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        self.pending_fds.extend(fds)
        if not data:
            return False
        self.from_libvirt += data
        # Forward whole commands only, so that an injected command never splits one of libvirt's.
        while b"\n" in self.from_libvirt:
            line, self.from_libvirt = self.from_libvirt.split(b"\n", 1)
            line += b"\n"
            self.inspect_command(line)
            if self.pending_fds:
                self.qemu.sendmsg(
                    [line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.pending_fds))]
                )
                for fd in self.pending_fds:
                    os.close(fd)
                self.pending_fds = []
            else:
                self.qemu.sendall(line)
        return True

    def inspect_command(self, line: bytes) -> None:
        try:
            command = json.loads(line)
        except ValueError:
            return
        if isinstance(command, dict):
            self.sim.on_command(command)
            if (
                command.get("execute") == "query-qmp-schema"
                and self.sim.config.prepare_state
                and "id" in command
            ):
                self.schema_ids.add(json.dumps(command["id"]))

    def on_qemu(self) -> bool:
        data = self.qemu.recv(262144)
        if not data:
            return False
        self.from_qemu += data
        while b"\n" in self.from_qemu:
            line, self.from_qemu = self.from_qemu.split(b"\n", 1)
            self.from_qemu_line(line + b"\n")
        return True

    def from_qemu_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.enqueue([Step("forward", line=line)])
            return
        if "id" in message:
            if message["id"] in self.swallow_ids:  # the reply to a command we injected
                self.swallow_ids.discard(message["id"])
                return
            reply_id = json.dumps(message["id"])
            if reply_id in self.schema_ids and isinstance(message.get("return"), list):
                self.schema_ids.discard(reply_id)
                if add_prepare_state(message["return"]):
                    line = json.dumps(message).encode() + b"\r\n"
        before: list[Step] = []
        after: list[Step] = []
        if "event" in message:
            before, after = self.sim.on_event(message)
        self.enqueue([*before, Step("forward", line=line), *after])

    def on_probe(self, device: Device) -> None:
        assert device.probe is not None
        try:
            _data, addr = device.probe.recvfrom(64)
        except OSError:
            return
        if not addr:
            return
        # `quiet`: the lab's own annotation (no real device says it), so that the peers can tell the
        # device's quiet time from an outage of this machine's making (a starved process answers nothing).
        word = "alive" if self.sim.answering(device) else "quiet" if device.quiet else None
        if word is not None:
            with contextlib.suppress(OSError):
                device.probe.sendto(f"{word} {device.state}".encode(), addr)

    # loop --------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run until QEMU or libvirt closes the monitor."""
        self.open_probes()
        try:
            self.listener.setblocking(True)
            self.libvirt, _ = self.listener.accept()
            self.listener.close()
            self.sel.register(self.libvirt, selectors.EVENT_READ, "libvirt")
            self.sel.register(self.qemu, selectors.EVENT_READ, "qemu")
            while True:
                timeout = None if self.wake_at is None else max(0.0, self.wake_at - time.monotonic())
                for key, _mask in self.sel.select(timeout):
                    if key.data == "libvirt" and not self.on_libvirt():
                        return
                    if key.data == "qemu" and not self.on_qemu():
                        return
                    if isinstance(key.data, Device):
                        self.on_probe(key.data)
                if self.wake_at is not None and time.monotonic() >= self.wake_at:
                    self.wake_at = None
                    self.run_script()
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            self.close_probes()

    def open_probes(self) -> None:
        fabric = self.sim.config.fabric
        if fabric is None:
            return
        for device in self.sim.devices:
            directory = fabric / self.domain
            try:
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / f"{device.config.device_id}@{os.getpid()}.sock"
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                probe.bind(str(path))
            except OSError as exc:
                log(f"liveness socket for {device.config.device_id} unavailable: {exc}")
                continue
            probe.setblocking(False)
            device.probe, device.probe_path = probe, path
            self.sel.register(probe, selectors.EVENT_READ, device)

    def close_probes(self) -> None:
        for device in self.sim.devices:
            if device.probe is not None:
                device.probe.close()
            if device.probe_path is not None:
                device.probe_path.unlink(missing_ok=True)


def log(message: str) -> None:
    """One line into the domain's QEMU log (our stderr is QEMU's)."""
    with contextlib.suppress(OSError):
        sys.stderr.write(f"vfio-sim[{os.getpid()}]: {message}\n")
        sys.stderr.flush()


def real_qemu(env: Mapping[str, str]) -> str:
    """The QEMU binary to exec."""
    binary = env.get("ORCH_SIM_QEMU") or shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    return binary


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: act as QEMU, with simulated VFIO devices when the domain declares some."""
    args = list(sys.argv[1:] if argv is None else argv)
    qemu = real_qemu(os.environ)
    if not vfio_devices(args):
        os.execv(qemu, [qemu, *args])  # noqa: S606 - capability probes and plain guests: just QEMU
    try:
        config = SimConfig.from_env(os.environ, args)
    except ConfigError as exc:
        sys.stderr.write(f"vfio-sim: invalid setting: {exc}\n")
        sys.exit(1)
    args = without_vfio_devices(args)  # no VFIO hardware here: QEMU gets none of them
    found = monitor_fd(args)
    if found is None:
        log("no monitor fd from libvirt: the vfio-pci devices are not simulated")
        os.execv(qemu, [qemu, *args])  # noqa: S606
    assert found is not None
    index, libvirt_fd = found
    qemu_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    args[index] = f"socket,id=charmonitor,fd={qemu_end.fileno()},server=off"
    domain = domain_name(args)
    # Double fork: the proxy is reparented away from QEMU, which would never reap it.
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            qemu_end.close()
            # The device is hardware in real life: it must not queue behind this machine's other work.
            refused = make_realtime()
            if refused is not None:
                log(refused)
            listener = socket.socket(fileno=libvirt_fd)
            try:
                Proxy(listener, proxy_end, Simulator(config), domain).serve()
            except Exception as exc:
                log(f"proxy failed: {exc!r}")
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    proxy_end.close()
    os.close(libvirt_fd)
    os.set_inheritable(qemu_end.fileno(), True)
    os.execv(qemu, [qemu, *args])  # noqa: S606 - become QEMU, with no shell in between


if __name__ == "__main__":
    main()
