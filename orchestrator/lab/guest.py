"""Lab guests: tiny TCG VMs whose emulator is the VFIO device simulator, diskless or with one qcow2 disk.

A guest's disk is a local file, as on hosts without shared storage: /var/lib/libvirt/images/NAME.qcow2,
a path every lab host sees in its own images directory (its `lib/images`, bind-mounted over
/var/lib/libvirt in its mount namespace). Same path, different files: a migration must copy the disk
(`migrate --copy-storage-all`) into a file pre-created at that path on the destination
(`create_disk`), as an admin does with `qemu-img create` on a real destination.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from orchestrator.core.errors import BadInput, EnvironmentProblem
from orchestrator.lab.hosts import LabHost, connect, lab_root, status
from orchestrator.lab.sim_settings import BEHAVIOURS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DEVICE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
SIMULATOR = "orchestrator-vfio-sim"
# The workload guest's kernel and initramfs, built by deploy/setup.sh (same variable there).
GUEST_IMAGE_ENV = "ORCH_GUEST_IMAGE"
DEFAULT_GUEST_IMAGE = Path("/var/lib/orchestrator/guest-image")
WORKLOADS = ("idle", "dirty")
DEFAULT_MEMORY_MIB = {"idle": 64, "dirty": 128}
GUEST_KERNEL_MIB = 64  # what the guest's kernel and initramfs need beside the dirtied memory
WORKLOAD_MIN_MEMORY_MIB = 96  # with a margin: the kernel panics "deadlocked on memory" booting in less
READY_MARKER = "orch-guest: ready"  # the workload guest's /init prints it on its serial console
DISK_DIR = Path("/var/lib/libvirt/images")  # as a lab host sees it; each host has its own
DISK_TARGET = "vda"
MAX_DISK_MIB = 65536


@dataclass(frozen=True)
class GuestSpec:
    """What a lab guest looks like; every field maps to a simulator setting or a domain element."""

    name: str
    devices: int = 1
    device_prefix: str = "nic"
    behaviour: str = "11.0"  # "11.0" (prepare state), "10.0" or "11.0-event" (a prepare event of its own)
    precopy: bool = True
    p2p: bool = True
    transition_ms: int = 300
    fail_transition: str | None = None
    events: bool = True  # add -global vfio-pci.migration-events=on
    memory_mib: int = 0  # 0: the workload's default (DEFAULT_MEMORY_MIB)
    # "idle": no OS at all (firmware only), converges at any downtime limit. "dirty": a Linux
    # kernel whose /init rewrites dirty_mib MiB of memory at dirty_rate MiB/s, as a loaded VM. The
    # defaults rewrite 4 MiB faster than a 32 MiB/s migration sends it: pre-copy iterates until the
    # downtime limit reaches 4 MiB / bandwidth (125 ms at 32 MiB/s).
    workload: str = "idle"
    dirty_rate: float = 64.0  # MiB/s
    dirty_mib: int = 4
    disk_mib: int = 0  # a qcow2 disk (vda) of this many MiB on the guest's host; 0: diskless

    def __post_init__(self) -> None:
        if self.memory_mib == 0:
            object.__setattr__(self, "memory_mib", DEFAULT_MEMORY_MIB.get(self.workload, 64))

    @property
    def device_ids(self) -> list[str]:
        """The simulated devices' ids (QEMU ids, the aliases policies match)."""
        return [f"{self.device_prefix}{i}" for i in range(self.devices)]

    @property
    def disk(self) -> Path | None:
        """The disk's path as the guest's host sees it (None: diskless)."""
        return disk_path(self.name) if self.disk_mib else None

    def validate(self) -> None:
        """One clear line for each bad value."""
        if not _NAME.match(self.name):
            raise BadInput(f"invalid guest name {self.name!r}", "use letters, digits, '.', '_' or '-'")
        if not 0 <= self.disk_mib <= MAX_DISK_MIB:
            raise BadInput(
                f"--disk-mib must be 0 (no disk) to {MAX_DISK_MIB}, not {self.disk_mib}", "pick another size"
            )
        if not 0 <= self.devices <= 16:
            raise BadInput(f"--devices must be 0 to 16, not {self.devices}", "pick fewer devices")
        if not _DEVICE_ID.match(f"{self.device_prefix}0"):
            raise BadInput(f"invalid device prefix {self.device_prefix!r}", "start with a letter")
        if self.behaviour not in BEHAVIOURS:
            raise BadInput(
                f"--qemu-behaviour must be {', '.join(BEHAVIOURS)}, not {self.behaviour!r}", "pick one"
            )
        if not 0 <= self.transition_ms <= 60000:
            raise BadInput(
                f"--transition-ms must be 0 to 60000, not {self.transition_ms}", "pick a smaller value"
            )
        if not 16 <= self.memory_mib <= 4096:
            raise BadInput(f"--memory must be 16 to 4096 MiB, not {self.memory_mib}", "pick another size")
        if self.workload not in WORKLOADS:
            raise BadInput(f"--workload must be {' or '.join(WORKLOADS)}, not {self.workload!r}", "pick one")
        if self.workload != "idle" and self.memory_mib < WORKLOAD_MIN_MEMORY_MIB:
            raise BadInput(
                f"--memory {self.memory_mib} is too small for --workload {self.workload}",
                f"give it {WORKLOAD_MIN_MEMORY_MIB} MiB or more (its Linux kernel does not boot in less)",
            )
        if self.workload == "dirty":
            if not 0 < self.dirty_rate <= 1024:
                raise BadInput(
                    f"--dirty-rate must be above 0 and at most 1024 MiB/s, not {self.dirty_rate:g}",
                    "pick another rate",
                )
            if not 1 <= self.dirty_mib <= 4096:
                raise BadInput(f"--dirty-mib must be 1 to 4096, not {self.dirty_mib}", "pick another size")
            if self.dirty_mib + GUEST_KERNEL_MIB > self.memory_mib:
                raise BadInput(
                    f"--dirty-mib {self.dirty_mib} does not fit in --memory {self.memory_mib}",
                    f"give the guest --memory {self.dirty_mib + GUEST_KERNEL_MIB} or more",
                )

    @property
    def kernel_cmdline(self) -> str:
        """The workload guest's kernel command line: its /init reads the orch.* parameters."""
        return (
            f"console=ttyS0 quiet panic=0 orch.workload={self.workload}"
            f" orch.dirty_mib_s={self.dirty_rate:g} orch.dirty_mib={self.dirty_mib}"
        )


def disk_path(name: str) -> Path:
    """Where guest `name`'s disk is, as every lab host sees it (each in its own images directory)."""
    return DISK_DIR / f"{name}.qcow2"


def host_disk_file(host: LabHost, name: str) -> Path:
    """The file that is guest `name`'s disk on lab host `host`, as this machine sees it."""
    return host.dir / "lib" / "images" / f"{name}.qcow2"  # hosts.py binds <host>/lib over /var/lib/libvirt


def create_disk(host: LabHost, name: str, mib: int) -> Path:
    """A fresh, empty qcow2 image of `mib` MiB for guest `name` on `host` (replacing any left there);
    on a destination, the file a `--copy-storage-all` migration copies the disk into. Returns the
    file as this machine sees it."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise EnvironmentProblem(
            "qemu-img is not installed", "apt-get install -t bookworm-backports qemu-utils"
        )
    path = host_disk_file(host, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", str(path), f"{mib}M"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise EnvironmentProblem(
            f"qemu-img could not create {path}: {done.stderr.strip() or f'exit {done.returncode}'}",
            "check the lab directory's disk space and permissions",
        )
    return path


def guest_image_dir() -> Path:
    """Where deploy/setup.sh built the workload guest's vmlinuz and initrd.img."""
    return Path(os.environ.get(GUEST_IMAGE_ENV) or DEFAULT_GUEST_IMAGE)


def guest_image() -> tuple[Path, Path]:
    """The workload guest's kernel and initramfs; a clear error when they are not built."""
    image = guest_image_dir()
    kernel, initrd = image / "vmlinuz", image / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        raise EnvironmentProblem(
            f"the lab's workload guest image is not built in {image}", "run deploy/setup.sh"
        )
    return kernel, initrd


def console_log(name: str, root: Path | None = None) -> Path:
    """The serial console log of a workload guest (written by the virtlogd of whichever lab host runs it)."""
    return lab_root(root) / "consoles" / f"{name}.log"


def wait_ready(name: str, root: Path | None = None, timeout: float = 60.0) -> float:
    """Wait until a workload guest's console shows READY_MARKER; returns the seconds waited."""
    log, start = console_log(name, root), time.monotonic()
    while True:
        try:
            if READY_MARKER in log.read_text(errors="replace"):
                return time.monotonic() - start
        except FileNotFoundError:
            pass
        if time.monotonic() - start > timeout:
            raise EnvironmentProblem(
                f"guest {name} did not report ready within {timeout:g} s", f"see its console log {log}"
            )
        time.sleep(0.1)


def simulator_path() -> str:
    """The simulator program: beside this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / SIMULATOR
    if beside.exists():
        return str(beside)
    found = shutil.which(SIMULATOR)
    if found is None:
        raise EnvironmentProblem(f"{SIMULATOR} is not installed", "run deploy/setup.sh")
    return found


def guest_xml(
    spec: GuestSpec,
    emulator: str,
    fabric: Path | None,
    *,
    image: tuple[Path, Path] | None = None,
    console: Path | None = None,
) -> str:
    """The domain XML of a lab guest. A workload guest boots `image` (kernel, initrd) directly and
    logs its serial console to `console`."""
    env = {
        "ORCH_SIM_BEHAVIOUR": spec.behaviour,
        "ORCH_SIM_PRECOPY": "on" if spec.precopy else "off",
        "ORCH_SIM_P2P": "on" if spec.p2p else "off",
        "ORCH_SIM_TRANSITION_MS": str(spec.transition_ms),
    }
    if spec.fail_transition:
        env["ORCH_SIM_FAIL_TRANSITION"] = spec.fail_transition
    if fabric is not None:
        env["ORCH_SIM_FABRIC"] = str(fabric)
    qemu_lines = []
    for index, device_id in enumerate(spec.device_ids):
        # Declared as a user adds a vfio-pci device through libvirt's QEMU passthrough; the
        # simulator (the <emulator>) takes it out of QEMU's arguments and simulates it.
        qemu_lines += [
            "    <qemu:arg value='-device'/>",
            f"    <qemu:arg value='vfio-pci,id={device_id},host=0000:5e:{index // 8:02x}.{index % 8}'/>",
        ]
    if spec.events:
        qemu_lines += [
            "    <qemu:arg value='-global'/>",
            "    <qemu:arg value='vfio-pci.migration-events=on'/>",
        ]
    if spec.devices:
        qemu_lines += [f"    <qemu:env name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in env.items()]
    commandline = (
        "\n".join(["  <qemu:commandline>", *qemu_lines, "  </qemu:commandline>"]) if qemu_lines else ""
    )
    boot, serial, disk = "", "<serial type='pty'/>", ""
    if spec.disk is not None:
        disk = (
            "\n    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>"
            f"\n      <source file={quoteattr(str(spec.disk))}/>"
            f"\n      <target dev='{DISK_TARGET}' bus='virtio'/>\n    </disk>"
        )
    if spec.workload != "idle":
        kernel, initrd = image if image is not None else guest_image()
        boot = (
            f"\n    <kernel>{escape(str(kernel))}</kernel>\n    <initrd>{escape(str(initrd))}</initrd>"
            f"\n    <cmdline>{escape(spec.kernel_cmdline)}</cmdline>"
        )
        if console is not None:  # the pty stays (virsh console works), virtlogd also writes a file
            serial = f"<serial type='pty'><log file={quoteattr(str(console))} append='on'/></serial>"
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{spec.name}</name>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>{boot}
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>{disk}
    <controller type='usb' model='none'/>
    {serial}
    <console type='pty'/>
    <memballoon model='none'/>
  </devices>
{commandline}
</domain>
"""


@dataclass(frozen=True)
class CreatedGuest:
    """A lab guest just made: its domain XML, and how long its workload took to say it is ready."""

    xml: str
    ready_s: float | None  # None: not started, or an idle guest (no OS: ready as soon as it runs)


def create_guest(
    host: LabHost, spec: GuestSpec, *, start: bool = True, root: Path | None = None
) -> CreatedGuest:
    """Define (and start) a lab guest on `host`. A started workload guest is returned only once its
    /init reports ready (`wait_ready`): migrating a guest that still boots copies a VM that dirties
    nothing yet, which converges at once and proves nothing. Refuses a name in use on any lab host."""
    spec.validate()
    console = None
    if spec.workload != "idle":
        console = console_log(spec.name, root)
    xml = guest_xml(spec, simulator_path(), lab_root(root) / "fabric", console=console)
    for other in status(lab_root(root)):  # a name is unique across the lab, so migrations never collide
        if any(guest.name == spec.name for guest in other.guests):
            raise BadInput(
                f"a guest named {spec.name!r} already exists on {other.name}",
                f"pick another name or remove it: virsh -c '{other.uri}' undefine {spec.name}",
            )
    if console is not None:
        console.parent.mkdir(parents=True, exist_ok=True)
        console.unlink(missing_ok=True)  # so a ready marker in it is this boot's
    disk = create_disk(host, spec.name, spec.disk_mib) if spec.disk_mib else None
    try:
        with connect(host) as conn:
            dom = conn.define(xml)
            if start:
                try:
                    conn.start(dom)
                except BaseException:
                    conn.destroy_and_undefine(spec.name)  # nothing half-made left behind
                    raise
    except BaseException:
        if disk is not None:
            disk.unlink(missing_ok=True)
        raise
    ready_s = wait_ready(spec.name, root) if start and spec.workload != "idle" else None
    return CreatedGuest(xml, ready_s)
