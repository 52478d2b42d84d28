"""Table-driven tests of the domain-XML read model over the fixtures in tests/fixtures/domxml.

The editor's tests (tests/unit/test_domxml_edit.py) reuse the fixtures, tables and inline
documents defined here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from orchestrator.core import domxml
from orchestrator.core.domxml import DomainXMLError, EventsStatus, VfioDevice
from orchestrator.core.errors import BadInput

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "domxml"
NS = {"qemu": domxml.QEMU_NS}


def load(name: str) -> str:
    """A fixture's exact text (no newline translation)."""
    with (FIXTURES / name).open(encoding="utf-8", newline="") as handle:
        return handle.read()


def pci(
    address: str | None, alias: str | None = None, managed: bool | None = True, override: bool | None = None
) -> VfioDevice:
    return VfioDevice(alias, "pci", address, managed, override)


def mdev(uuid: str, alias: str | None = None, override: bool | None = None) -> VfioDevice:
    return VfioDevice(alias, "mdev", uuid, False, override)


def sim(device_id: str, host: str | None = None, override: bool | None = None) -> VfioDevice:
    return VfioDevice(device_id, "commandline", host, None, override)


# fixture -> what events_status reads: (hostdevs, global_on, commandline devices)
STATUS: dict[str, tuple[list[VfioDevice], bool | None, list[VfioDevice]]] = {
    "managed_pci.xml": ([pci("0000:3b:00.1")], None, []),
    "unmanaged_pci_vfio_driver.xml": ([pci("0000:af:00.2", managed=False)], None, []),
    "mdev_vfio_pci.xml": ([mdev("b1e2a3c4-d5f6-4789-8a9b-0c1d2e3f4a5b")], None, []),
    "three_devices.xml": (
        [pci("0000:5e:00.2"), pci("0000:5e:00.3"), mdev("4f3e2d1c-0b9a-4887-a6b5-c4d3e2f1a0b9")],
        None,
        [],
    ),
    "commandline_other_args.xml": ([pci("0000:18:02.0")], None, []),
    "override_other_device.xml": ([pci("0000:86:00.4")], None, []),
    "nova_metadata.xml": ([pci("0000:3b:02.3"), pci("0000:d8:00.1")], None, []),
    "comments_in_devices.xml": ([pci("0000:17:00.2"), pci("0000:17:00.3")], None, []),
    "ua_alias.xml": ([pci("0000:41:00.1", "ua-rdma0")], None, []),
    "tool_generated_4space.xml": ([pci("0000:c1:00.0")], None, []),
    "live_migratable_non_ua_alias.xml": ([pci("0000:3b:01.0", "hostdev0")], None, []),
    "alias_collision.xml": ([pci("0000:3b:00.1")], None, []),
    "enabled_override.xml": (
        [
            pci("0000:3b:00.2", "ua-vfio-0000-3b-00-2", override=True),
            mdev(
                "0e1d2c3b-4a59-4687-b6a5-94837261504f",
                "ua-vfio-mdev-0e1d2c3b-4a59-4687-b6a5-94837261504f",
                override=True,
            ),
        ],
        None,
        [],
    ),
    "enabled_global.xml": ([pci("0000:65:01.0"), pci("0000:65:01.1")], True, []),
    "partially_enabled_override.xml": (
        [pci("0000:3b:00.4", "ua-vfio-0000-3b-00-4", override=True), pci("0000:3b:00.5")],
        None,
        [],
    ),
    "conflict_global_off.xml": ([pci("0000:3b:00.1")], False, []),
    "conflict_global_driver_form.xml": ([pci("0000:3b:00.1")], False, []),
    "conflict_override_false.xml": ([pci("0000:3b:00.1", "ua-rdma0", override=False)], None, []),
    "conflict_set_device.xml": ([pci("0000:3b:00.1", "ua-rdma0")], None, []),
    "no_vfio_usb.xml": ([], None, []),
    "simulated_commandline_device.xml": (
        [],
        None,
        [
            sim("sim-vfio0", "/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"),
            sim("sim-vfio1", "/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"),
        ],
    ),
    "lab_simulated_devices.xml": ([], None, [sim("nic0", "0000:5e:00.0"), sim("nic1", "0000:5e:00.1")]),
}
# The fixtures whose every VFIO device emits events (enable_events leaves them unchanged).
ALL_ENABLED = frozenset({"enabled_override.xml", "enabled_global.xml"})


def test_every_fixture_has_a_row() -> None:
    names = {path.name for path in FIXTURES.glob("*.xml")}
    assert len(names) >= 12
    assert names - {"doctype_entity.xml"} == set(STATUS)


@pytest.mark.parametrize("name", sorted(STATUS))
def test_events_status(name: str) -> None:
    devices, global_on, commandline = STATUS[name]
    status = domxml.events_status(load(name))
    assert status == EventsStatus(devices, global_on, commandline)
    assert domxml.find_vfio_devices(domxml.parse(load(name))) == devices
    assert status.all_enabled is (name in ALL_ENABLED)


def test_doctype_with_entity_is_refused_and_never_resolved() -> None:
    xml = load("doctype_entity.xml")
    for call in (domxml.parse, domxml.events_status, domxml.domain_name):
        with pytest.raises(DomainXMLError, match="DOCTYPE or entity declaration") as raised:
            call(xml)
        assert "root:" not in str(raised.value)
    # The parser's own settings leave the entity unexpanded: /etc/passwd is never read.
    description = etree.fromstring(xml.encode(), domxml._parser()).find("description")
    assert description is not None
    assert "root:" not in etree.tostring(description, encoding="unicode")


# inline XML -> (exception, message fragment) for parse-level refusals
BAD_XML = [
    ("<domain type='kvm'>\n  <name>x</name>\n  <devices>\n</domain>", "line 4"),
    ("", "malformed domain XML"),
    ("<domain><name>x</name></domain>trailing", "malformed domain XML"),
    ("<domain>&undefined;</domain>", "malformed domain XML"),
    ("<!DOCTYPE domain SYSTEM 'http://example.com/domain.dtd'><domain/>", "DOCTYPE"),
]


@pytest.mark.parametrize(("xml", "fragment"), BAD_XML)
def test_bad_xml(xml: str, fragment: str) -> None:
    with pytest.raises(DomainXMLError, match=fragment) as raised:
        domxml.parse(xml)
    assert isinstance(raised.value, BadInput)


def test_not_a_domain() -> None:
    with pytest.raises(DomainXMLError, match="root element is <network>"):
        domxml.events_status("<network><name>default</name></network>")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("managed_pci.xml", "db-primary-01"),
        ("nova_metadata.xml", "instance-0000a1b2"),
        ("tool_generated_4space.xml", "ml-train-07"),
        ("lab_simulated_devices.xml", "t-3f9a1c2e"),
    ],
)
def test_domain_name(name: str, expected: str) -> None:
    assert domxml.domain_name(load(name)) == expected


def test_domain_without_name() -> None:
    with pytest.raises(DomainXMLError, match="no <name>"):
        domxml.domain_name("<domain type='kvm'/>")


# -------- small inline documents for the corners the fixtures do not reach --------

HOSTDEV = (
    "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
    "<address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/></source>{alias}</hostdev>"
)


def domain(devices: str = HOSTDEV.format(alias=""), tail: str = "", root_attrs: str = "") -> str:
    return f"<domain type='kvm'{root_attrs}><name>t</name><devices>{devices}</devices>{tail}</domain>"


QNS = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"


def commandline(*args: str, env: str = "") -> str:
    values = "".join(f"<qemu:arg value='{arg}'/>" for arg in args)
    return f"<qemu:commandline>{values}{env}</qemu:commandline>"


def override(alias: str, value: str, kind: str = "bool") -> str:
    return (
        f"<qemu:override><qemu:device alias='{alias}'><qemu:frontend>"
        f"<qemu:property name='migration-events' type='{kind}' value='{value}'/>"
        "</qemu:frontend></qemu:device></qemu:override>"
    )


UA = HOSTDEV.format(alias="<alias name='ua-nic'/>")

# inline XML -> (enabled('ua-nic'), global_on, all_enabled)
ENABLED_SEMANTICS = [
    (domain(UA, override("ua-nic", "false") + commandline("-global", "vfio-pci.migration-events=on"), QNS),
     False, True, False),
    (domain(UA, override("ua-nic", "true") + commandline("-global", "vfio-pci.migration-events=off"), QNS),
     True, False, True),
    (domain(UA, commandline("--global", "vfio-pci.migration-events=yes"), QNS), True, True, True),
    (domain(UA, commandline("-global", "vfio-pci.migration-events=on", "-global",
                            "vfio-pci.migration-events=off"), QNS), False, False, False),
    (domain(UA, override("ua-nic", "", kind="remove"), QNS), False, None, False),
    (domain(UA), False, None, False),
]  # fmt: skip


@pytest.mark.parametrize(("xml", "enabled", "global_on", "all_enabled"), ENABLED_SEMANTICS)
def test_device_property_beats_global(
    xml: str, enabled: bool, global_on: bool | None, all_enabled: bool
) -> None:
    status = domxml.events_status(xml)
    assert status.enabled("ua-nic") is enabled
    assert status.global_on is global_on
    assert status.all_enabled is all_enabled
    assert status.enabled("not-a-device") is (global_on is True)


# inline -device values in <qemu:commandline> -> the command-line devices read, with the events on
# through -global: the device's own migration-events beats it.
COMMANDLINE_DEVICES = [
    ("vfio-pci,id=nic0,host=0000:5e:00.0", [sim("nic0", "0000:5e:00.0")], True),
    ("vfio-pci,id=nic1,host=0000:5e:00.1,migration-events=off", [sim("nic1", "0000:5e:00.1", False)], False),
    ("driver=vfio-pci-nohotplug,id=x,sysfsdev=/sys/bus/mdev/devices/u,migration-events=on",
     [sim("x", "/sys/bus/mdev/devices/u", True)], True),
    ('{"driver":"vfio-pci","id":"nic2","host":"0000:5e:00.2","migration-events":false}',
     [sim("nic2", "0000:5e:00.2", False)], False),
    ("virtio-net-pci,id=net0", [], False),
    ("{not json", [], False),
]  # fmt: skip


@pytest.mark.parametrize(("value", "devices", "all_enabled"), COMMANDLINE_DEVICES)
def test_commandline_devices(value: str, devices: list[VfioDevice], all_enabled: bool) -> None:
    xml = domain("", commandline("-device", value, "-global", "vfio-pci.migration-events=on"), QNS)
    status = domxml.events_status(xml)
    assert status.devices == []
    assert status.commandline_devices == devices
    assert status.all_enabled is all_enabled


def test_simulator_settings_are_not_devices() -> None:
    """The lab's <qemu:env> settings mean nothing to the read model: only -device declares a device."""
    env = "<qemu:env name='ORCH_SIM_OVERRIDES' value='nic0:precopy=off'/>"
    assert domxml.events_status(domain("", commandline(env=env), QNS)) == EventsStatus([], None, [])


NOT_VFIO = [
    "<hostdev mode='subsystem' type='pci'><driver name='kvm'/><source>"
    "<address domain='0' bus='1' slot='0' function='0'/></source></hostdev>",
    "<hostdev mode='subsystem' type='mdev' model='vfio-ccw'><source><address uuid='u'/></source></hostdev>",
    "<hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source></hostdev>",
    "<interface type='network'><source network='default'/></interface>",
]


@pytest.mark.parametrize("devices", NOT_VFIO)
def test_not_vfio(devices: str) -> None:
    assert domxml.find_vfio_devices(domxml.parse(domain(devices))) == []


# -------- the switchover-group label in <metadata> --------

# What `virsh metadata DOMAIN --uri urn:orchestrator:group:1 --key orch --set '<group>job1</group>'` stores:
# libvirt declares the key as the element's prefix (virXMLInjectNamespace).
LIBVIRT_LABEL = "<orch:group xmlns:orch='urn:orchestrator:group:1'>job1</orch:group>"
NOVA = (
    "<nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>"
    "<nova:name>group</nova:name></nova:instance>"
)

# <metadata> content -> the label read
GROUP_LABELS = [
    (LIBVIRT_LABEL, "job1"),
    (NOVA + LIBVIRT_LABEL, "job1"),  # among other applications' metadata
    ("<x:group xmlns:x='urn:orchestrator:group:1'>job1</x:group>", "job1"),  # any prefix: by namespace
    ("<group xmlns='urn:orchestrator:group:1'>job1</group>", "job1"),  # a default namespace
    ("<orch:group xmlns:orch='urn:orchestrator:group:1'>\n  rdma job\t7\n</orch:group>", "rdma job 7"),
    ("<orch:group xmlns:orch='urn:orchestrator:group:1'/>", None),  # empty
    ("<orch:group xmlns:orch='urn:orchestrator:group:1'>  </orch:group>", None),  # blank
    ("<orch:group xmlns:orch='urn:orchestrator:group:2'>job1</orch:group>", None),  # another version
    ("<group>job1</group>", None),  # no namespace: not ours
    ("<orch:job xmlns:orch='urn:orchestrator:group:1'>job1</orch:job>", None),  # another element
    (NOVA, None),
    ("", None),
]


@pytest.mark.parametrize(("metadata", "label"), GROUP_LABELS)
def test_group_label(metadata: str, label: str | None) -> None:
    assert domxml.group_label(domain(tail=f"<metadata>{metadata}</metadata>")) == label


def test_group_label_absent_and_outside_metadata() -> None:
    assert domxml.group_label(domain()) is None
    assert domxml.group_label(domain(tail=LIBVIRT_LABEL)) is None, "only <domain><metadata> counts"
    assert domxml.group_label(load("nova_metadata.xml")) is None


def test_group_label_constants_are_what_virsh_is_given() -> None:
    assert (domxml.GROUP_NS, domxml.GROUP_KEY, domxml.GROUP_ELEMENT) == (
        "urn:orchestrator:group:1",
        "orch",
        "group",
    )


def test_group_label_parses_safely() -> None:
    with pytest.raises(DomainXMLError, match="DOCTYPE or entity declaration"):
        domxml.group_label(load("doctype_entity.xml"))
    with pytest.raises(DomainXMLError, match="root element is <network>"):
        domxml.group_label("<network><metadata>" + LIBVIRT_LABEL + "</metadata></network>")
