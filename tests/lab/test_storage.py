"""`orchestrator migrate --copy-storage-all` / `--migrate-disks` on the lab: a guest with a local qcow2 disk.

Every lab host sees /var/lib/libvirt/images as its own directory (its mount namespace), so the disk
is the same path on both hosts and two different files, as on hosts without shared storage. The
destination's file is pre-created empty with the same virtual size (`qemu-img create`), as an admin
does (libvirt pre-creates it only inside a storage pool). A known pattern written into the source
image while the guest is shut off must be in the destination's image after the migration.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab.runner import Run, Scenario, assert_paired

from orchestrator.core.errors import BadInput
from orchestrator.lab import guest as lab_guest

DISK_MIB = 16
# (offset, length, byte): a pattern no empty image has, at the start and further in.
PATTERN = ((0, 1 << 20, 0xA5), (8 << 20, 64 << 10, 0x5A))


def _need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        reason = f"missing {', '.join(missing)} (install qemu-utils)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)


def qemu(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def raw_bytes(image: Path) -> bytes:
    """The guest-visible content of a qcow2 image (the file's layout differs from copy to copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "disk.raw"
        qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
        return raw.read_bytes()


def expected_content() -> bytes:
    data = bytearray(DISK_MIB << 20)
    for offset, length, byte in PATTERN:
        data[offset : offset + length] = bytes([byte]) * length
    return bytes(data)


class DiskScenario(Scenario):
    """Scenario's guest and recording policy, with a DISK_MIB qcow2 disk holding PATTERN, its empty
    copy pre-created on the destination, and migration data over loopback TCP (with a unix:// data
    URI, libvirt wants a disks URI for the NBD copy too: --disks-uri, the last test)."""

    def __init__(self, lab: Any, tmp: Path) -> None:
        super().__init__(lab, tmp, disk_mib=DISK_MIB)
        self.source_disk = lab_guest.host_disk_file(lab.hosts[self.src], self.name)
        self.dest_disk = lab_guest.host_disk_file(lab.hosts[self.dst], self.name)
        # Write the pattern while the guest is shut off (the idle guest has no OS to write it).
        dom = lab.conn(self.src).domain(self.name)
        dom.raw.destroy()
        writes = [f"write -P {byte:#x} {offset} {length}" for offset, length, byte in PATTERN]
        qemu("qemu-io", "-f", "qcow2", *(arg for w in writes for arg in ("-c", w)), str(self.source_disk))
        lab.conn(self.src).start(dom)
        lab_guest.create_disk(lab.hosts[self.dst], self.name, DISK_MIB)

    def write_policy(self, *args: Any, **kwargs: Any) -> None:
        super().write_policy(*args, **kwargs)
        text = self.policy.read_text()
        self.policy.write_text(re.sub(r"(?m)^data_uri = .*$", 'data_uri = "tcp://127.0.0.1"', text))

    def migrate(self, *extra: str, env: dict[str, str] | None = None) -> Run:
        return super().migrate("--listen-address", "127.0.0.1", *extra, env=env)

    def shut_off(self, index: int) -> None:
        self.lab.conn(index).domain(self.name).raw.destroy()

    def remove(self) -> None:
        super().remove()
        self.source_disk.unlink(missing_ok=True)
        self.dest_disk.unlink(missing_ok=True)


@pytest.fixture
def disk_guest(lab_env: Any, tmp_path: Path) -> Iterator[DiskScenario]:
    _need("qemu-img", "qemu-io")
    sc = DiskScenario(lab_env, tmp_path)
    try:
        yield sc
    finally:
        sc.remove()


def assert_copied(sc: DiskScenario, run: Run) -> None:
    assert run.code == 0, run.err
    doc = run.doc
    assert doc["outcome"] == "succeeded" and doc["changed"] is True
    assert sc.running_on(sc.dst) and sc.lab.conn(sc.src).find_domain(sc.name) is None
    assert_paired(sc, ["nic0"])
    # The destination runs on its own file, at the same path.
    dest_xml = sc.lab.conn(sc.dst).xml(sc.lab.conn(sc.dst).domain(sc.name))
    assert f"<source file='{lab_guest.disk_path(sc.name)}'" in dest_xml
    sc.shut_off(sc.dst)  # nothing writes to the image while it is read
    assert raw_bytes(sc.dest_disk) == expected_content()
    assert "Images are identical." in qemu("qemu-img", "compare", str(sc.source_disk), str(sc.dest_disk))


def test_copy_storage_all_copies_the_local_disk(disk_guest: DiskScenario) -> None:
    assert raw_bytes(disk_guest.dest_disk) == bytes(DISK_MIB << 20)  # empty before
    assert_copied(disk_guest, disk_guest.migrate("--copy-storage-all"))


def test_migrate_disks_copies_the_named_disk(disk_guest: DiskScenario) -> None:
    assert_copied(disk_guest, disk_guest.migrate("--migrate-disks", lab_guest.DISK_TARGET))


def test_a_unix_data_socket_takes_the_disks_over_a_unix_socket_too(disk_guest: DiskScenario) -> None:
    sockets = disk_guest.lab.root / "migrations"
    data, disks = f"unix://{sockets}/{disk_guest.name}.sock", f"unix://{sockets}/{disk_guest.name}.disks.sock"
    run = super(DiskScenario, disk_guest).migrate(
        "--copy-storage-all", "--migrateuri", data, "--disks-uri", disks
    )
    assert_copied(disk_guest, run)


def test_without_copying_storage_libvirt_refuses_and_the_vm_stays(disk_guest: DiskScenario) -> None:
    run = disk_guest.migrate()
    assert run.code == 4, run.err
    assert run.doc["outcome"] == "rolled-back"
    assert "without shared storage is unsafe" in run.doc["error"]
    errors = [line for line in run.err.splitlines() if line.startswith("orchestrator: error:")]
    assert len(errors) == 1 and "shared storage" in errors[0], run.err
    assert disk_guest.running_on(disk_guest.src)
    assert disk_guest.lab.conn(disk_guest.dst).find_domain(disk_guest.name) is None
    assert disk_guest.calls("drain") == [] and disk_guest.calls("undrain") == []
    assert raw_bytes(disk_guest.dest_disk) == bytes(DISK_MIB << 20)  # nothing was written there


# Pure parts: no lab needed.


def test_disk_guest_xml_names_a_local_qcow2_vda() -> None:
    xml = lab_guest.guest_xml(lab_guest.GuestSpec(name="a", disk_mib=16), "/sim", None)
    assert "<driver name='qemu' type='qcow2'/>" in xml
    assert '<source file="/var/lib/libvirt/images/a.qcow2"/>' in xml
    assert "<target dev='vda' bus='virtio'/>" in xml
    assert "<disk" not in lab_guest.guest_xml(lab_guest.GuestSpec(name="a"), "/sim", None)


@pytest.mark.parametrize("mib", [-1, lab_guest.MAX_DISK_MIB + 1])
def test_disk_size_out_of_range_is_one_line(mib: int) -> None:
    with pytest.raises(BadInput, match="--disk-mib must be 0"):
        lab_guest.GuestSpec(name="a", disk_mib=mib).validate()
