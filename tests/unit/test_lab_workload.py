"""Lab workload guests without a daemon: the spec's defaults and checks, and the domain XML."""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree

import pytest

from orchestrator.core.errors import BadInput, EnvironmentProblem
from orchestrator.lab import guest as lab_guest

IMAGE = (Path("/img/vmlinuz"), Path("/img/initrd.img"))


def test_memory_defaults_to_the_workloads() -> None:
    assert lab_guest.GuestSpec(name="a").memory_mib == 64
    assert lab_guest.GuestSpec(name="a", workload="dirty").memory_mib == 128
    assert lab_guest.GuestSpec(name="a", workload="dirty", memory_mib=256).memory_mib == 256


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"workload": "busy"}, "--workload must be idle or dirty, not 'busy'"),
        ({"workload": "dirty", "dirty_rate": 0}, "--dirty-rate must be above 0"),
        ({"workload": "dirty", "dirty_rate": 2048}, "--dirty-rate must be above 0 and at most 1024"),
        ({"workload": "dirty", "dirty_mib": 0}, "--dirty-mib must be 1 to 4096"),
        ({"workload": "dirty", "dirty_mib": 100}, "--dirty-mib 100 does not fit in --memory 128"),
        ({"workload": "dirty", "memory_mib": 80, "dirty_mib": 8}, "--memory 80 is too small"),
    ],
)
def test_bad_workload_settings(fields: dict[str, object], named: str) -> None:
    with pytest.raises(BadInput, match=re.escape(named)):
        lab_guest.GuestSpec(name="a", **fields).validate()  # type: ignore[arg-type]


def test_idle_guest_xml_has_no_kernel_and_a_plain_pty() -> None:
    xml = lab_guest.guest_xml(lab_guest.GuestSpec(name="a"), "/sim", None, console=Path("/c.log"))
    root = ElementTree.fromstring(xml)
    assert root.find("os/kernel") is None
    assert root.find("devices/serial/log") is None
    assert root.findtext("memory") == "64"


def test_dirty_guest_xml_boots_the_image_with_its_parameters() -> None:
    spec = lab_guest.GuestSpec(name="a", workload="dirty", dirty_rate=12.5, dirty_mib=16, devices=2)
    xml = lab_guest.guest_xml(spec, "/sim", None, image=IMAGE, console=Path("/lab/consoles/a.log"))
    root = ElementTree.fromstring(xml)
    assert root.findtext("memory") == "128"
    assert root.findtext("os/kernel") == "/img/vmlinuz"
    assert root.findtext("os/initrd") == "/img/initrd.img"
    cmdline = (root.findtext("os/cmdline") or "").split()
    assert "console=ttyS0" in cmdline
    assert {"orch.workload=dirty", "orch.dirty_mib_s=12.5", "orch.dirty_mib=16"} <= set(cmdline)
    assert root.findtext("devices/emulator") == "/sim"
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"
    log = serial.find("log")
    assert log is not None and log.get("file") == "/lab/consoles/a.log" and log.get("append") == "on"
    assert "vfio-pci,id=nic1" in xml, "the simulated devices are declared as for idle guests"


def test_a_missing_image_says_to_run_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lab_guest.GUEST_IMAGE_ENV, str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="workload guest image is not built") as raised:
        lab_guest.guest_xml(lab_guest.GuestSpec(name="a", workload="dirty"), "/sim", None)
    assert raised.value.hint == "run deploy/setup.sh"


def test_wait_ready_reads_the_console_log(tmp_path: Path) -> None:
    log = lab_guest.console_log("a", tmp_path)
    log.parent.mkdir(parents=True)
    log.write_text("booting\norch-guest: ready workload=dirty rate=64 MiB/s\n")
    assert lab_guest.wait_ready("a", tmp_path, timeout=1) < 1
    with pytest.raises(EnvironmentProblem, match="did not report ready"):
        lab_guest.wait_ready("b", tmp_path, timeout=0.2)
