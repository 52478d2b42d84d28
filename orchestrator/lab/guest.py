"""Lab guests: tiny diskless TCG VMs whose emulator is the VFIO device simulator."""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from orchestrator.errors import BadInput, EnvironmentProblem
from orchestrator.lab.hosts import LabHost, lab_root, status
from orchestrator.virt import Host

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DEVICE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
SIMULATOR = "orchestrator-vfio-sim"


@dataclass(frozen=True)
class GuestSpec:
    """What a lab guest looks like; every field maps to a simulator setting or a domain element."""

    name: str
    devices: int = 1
    device_prefix: str = "nic"
    behaviour: str = "11.0"  # "11.0" (prepare state) or "10.0"
    precopy: bool = True
    p2p: bool = True
    transition_ms: int = 300
    fail_transition: str | None = None
    events: bool = True  # add -global vfio-pci.migration-events=on
    memory_mib: int = 64

    @property
    def device_ids(self) -> list[str]:
        """The simulated devices' ids (QEMU ids, the aliases policies match)."""
        return [f"{self.device_prefix}{i}" for i in range(self.devices)]

    def validate(self) -> None:
        """One clear line for each bad value."""
        if not _NAME.match(self.name):
            raise BadInput(f"invalid guest name {self.name!r}", "use letters, digits, '.', '_' or '-'")
        if not 0 <= self.devices <= 16:
            raise BadInput(f"--devices must be 0 to 16, not {self.devices}", "pick fewer devices")
        if not _DEVICE_ID.match(f"{self.device_prefix}0"):
            raise BadInput(f"invalid device prefix {self.device_prefix!r}", "start with a letter")
        if self.behaviour not in ("11.0", "10.0"):
            raise BadInput(f"--qemu-behaviour must be 11.0 or 10.0, not {self.behaviour!r}", "pick one")
        if not 0 <= self.transition_ms <= 60000:
            raise BadInput(
                f"--transition-ms must be 0 to 60000, not {self.transition_ms}", "pick a smaller value"
            )
        if not 16 <= self.memory_mib <= 4096:
            raise BadInput(f"--memory must be 16 to 4096 MiB, not {self.memory_mib}", "pick another size")


def simulator_path() -> str:
    """The simulator program: beside this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / SIMULATOR
    if beside.exists():
        return str(beside)
    found = shutil.which(SIMULATOR)
    if found is None:
        raise EnvironmentProblem(f"{SIMULATOR} is not installed", "run deploy/setup.sh")
    return found


def guest_xml(spec: GuestSpec, emulator: str, fabric: Path | None) -> str:
    """The domain XML of a lab guest."""
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
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{spec.name}</name>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <serial type='pty'/>
    <console type='pty'/>
    <memballoon model='none'/>
  </devices>
{commandline}
</domain>
"""


def create_guest(host: LabHost, spec: GuestSpec, *, start: bool = True, root: Path | None = None) -> str:
    """Define (and start) a lab guest on `host`; returns its XML. Refuses a name in use on any lab host."""
    spec.validate()
    xml = guest_xml(spec, simulator_path(), lab_root(root) / "fabric")
    for other in status(lab_root(root)):  # a name is unique across the lab, so migrations never collide
        if any(guest.name == spec.name for guest in other.guests):
            raise BadInput(
                f"a guest named {spec.name!r} already exists on {other.name}",
                f"pick another name or remove it: virsh -c '{other.uri}' undefine {spec.name}",
            )
    with Host.open(host.uri, keepalive=False) as conn:
        dom = conn.define(xml)
        if start:
            try:
                conn.start(dom)
            except BaseException:
                conn.destroy_and_undefine(spec.name)  # nothing half-made left behind
                raise
    return xml
