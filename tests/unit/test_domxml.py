"""Table-driven tests of the domain-XML module over the fixtures in tests/fixtures/domxml."""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path

import pytest
from lxml import etree

from orchestrator import domxml
from orchestrator.domxml import DomainXMLError, EventsStatus, VfioDevice
from orchestrator.errors import BadInput, NothingToDo

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "domxml"
NS = {"qemu": domxml.QEMU_NS}
MODES = ("override", "global")


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
    "lab_simulated_devices.xml": ([], None, [sim("nic0"), sim("nic1")]),
}

CHANGED = "changed"
UNCHANGED = "unchanged"
Outcome = str | tuple[type[Exception], str]

# fixture -> what enable_events does in (override mode, global mode)
ENABLE: dict[str, tuple[Outcome, Outcome]] = {
    "managed_pci.xml": (CHANGED, CHANGED),
    "unmanaged_pci_vfio_driver.xml": (CHANGED, CHANGED),
    "mdev_vfio_pci.xml": (CHANGED, CHANGED),
    "three_devices.xml": (CHANGED, CHANGED),
    "commandline_other_args.xml": (CHANGED, CHANGED),
    "override_other_device.xml": (CHANGED, CHANGED),
    "nova_metadata.xml": (CHANGED, CHANGED),
    "comments_in_devices.xml": (CHANGED, CHANGED),
    "ua_alias.xml": (CHANGED, CHANGED),
    "tool_generated_4space.xml": (CHANGED, CHANGED),
    "partially_enabled_override.xml": (CHANGED, CHANGED),
    "enabled_override.xml": (UNCHANGED, UNCHANGED),
    "enabled_global.xml": (UNCHANGED, UNCHANGED),
    "live_migratable_non_ua_alias.xml": ((DomainXMLError, "alias 'hostdev0', not a user alias"), CHANGED),
    "alias_collision.xml": ((DomainXMLError, "'ua-vfio-0000-3b-00-1' derived for"), CHANGED),
    "simulated_commandline_device.xml": ((DomainXMLError, "'sim-vfio0' is declared in"), CHANGED),
    "lab_simulated_devices.xml": ((DomainXMLError, "'nic0' is declared in"), CHANGED),
    "no_vfio_usb.xml": ((NothingToDo, "domain has no VFIO device"),) * 2,
    "conflict_global_off.xml": ((DomainXMLError, "-global vfio-pci.migration-events=off"),) * 2,
    "conflict_global_driver_form.xml": (
        (DomainXMLError, "-global driver=vfio-pci,property=migration-events,value=off"),
    )
    * 2,
    "conflict_override_false.xml": ((DomainXMLError, "migration-events value='false' for device 'ua-rdma0'"),)
    * 2,
    "conflict_set_device.xml": ((DomainXMLError, "-set device.ua-rdma0.migration-events=on"),) * 2,
}

ENABLE_CASES = [
    pytest.param(name, mode, outcome, id=f"{name}-{mode}")
    for name, outcomes in ENABLE.items()
    for mode, outcome in zip(MODES, outcomes, strict=True)
]
CHANGED_CASES = [case for case in ENABLE_CASES if case.values[2] == CHANGED]
# Documents with no events turned on anywhere: disable(enable(x)) must give x back, byte for byte.
PRISTINE_CASES = [
    case
    for case in CHANGED_CASES
    if STATUS[str(case.values[0])][1] is None
    and not any(device.events_override for device in STATUS[str(case.values[0])][0])
]


def test_every_fixture_has_a_row() -> None:
    names = {path.name for path in FIXTURES.glob("*.xml")}
    assert len(names) >= 12
    assert names - {"doctype_entity.xml"} == set(STATUS) == set(ENABLE)


@pytest.mark.parametrize("name", sorted(STATUS))
def test_events_status(name: str) -> None:
    devices, global_on, commandline = STATUS[name]
    status = domxml.events_status(load(name))
    assert status == EventsStatus(devices, global_on, commandline)
    assert domxml.find_vfio_devices(domxml.parse(load(name))) == devices
    expected_all = ENABLE[name] == (UNCHANGED, UNCHANGED)
    assert status.all_enabled is expected_all


@pytest.mark.parametrize(("name", "mode", "outcome"), ENABLE_CASES)
def test_enable_outcome(name: str, mode: domxml.Mode, outcome: Outcome) -> None:
    xml = load(name)
    if isinstance(outcome, tuple):
        error, fragment = outcome
        with pytest.raises(error) as raised:
            domxml.enable_events(xml, mode)
        assert fragment in str(raised.value)
        return
    new_xml, changed = domxml.enable_events(xml, mode)
    assert changed is (outcome == CHANGED)
    if outcome == UNCHANGED:
        assert new_xml is xml
        return
    status = domxml.events_status(new_xml)
    assert status.all_enabled
    root = domxml.parse(new_xml)
    global_pairs = _global_pairs(root)
    properties = root.xpath(
        "qemu:override/qemu:device/qemu:frontend/qemu:property[@name='migration-events']", namespaces=NS
    )
    if mode == "global":
        assert global_pairs == [("-global", "vfio-pci.migration-events=on")]
        assert len(root.xpath("//qemu:property", namespaces=NS)) == len(
            domxml.parse(xml).xpath("//qemu:property", namespaces=NS)
        )
    else:
        assert global_pairs == []
        for device in status.devices:
            assert device.alias is not None and device.alias.startswith("ua-")
            matching = [p for p in properties if p.getparent().getparent().get("alias") == device.alias]
            assert [(p.get("type"), p.get("value")) for p in matching] == [("bool", "true")]
        assert len(root.findall(f"{{{domxml.QEMU_NS}}}override")) == 1


def _global_pairs(root: etree._Element) -> list[tuple[str, str]]:
    values = [arg.get("value") for arg in root.xpath("qemu:commandline/qemu:arg", namespaces=NS)]
    return [(a, b) for a, b in itertools.pairwise(values) if a == "-global"]


@pytest.mark.parametrize(("name", "mode", "outcome"), PRISTINE_CASES)
def test_disable_undoes_enable_byte_for_byte(name: str, mode: domxml.Mode, outcome: Outcome) -> None:
    xml = load(name)
    enabled, _ = domxml.enable_events(xml, mode)
    assert domxml.disable_events(enabled) == (xml, True)


@pytest.mark.parametrize(("name", "mode", "outcome"), CHANGED_CASES)
def test_enable_only_inserts(name: str, mode: domxml.Mode, outcome: Outcome) -> None:
    """Outside the inserted lines, only the root tag may change, by gaining the namespace."""
    before = load(name).splitlines(keepends=True)
    after = domxml.enable_events(load(name), mode)[0].splitlines(keepends=True)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes():
        if tag in ("equal", "insert"):
            continue
        assert tag == "replace" and i2 - i1 == 1 and j2 - j1 == 1, (tag, before[i1:i2], after[j1:j2])
        old, new = before[i1], after[j1]
        assert old.lstrip().startswith("<domain ")
        quote = '"' if '"' in old else "'"
        end = old.rindex(">")
        assert new == f"{old[:end]} xmlns:qemu={quote}{domxml.QEMU_NS}{quote}{old[end:]}"


@pytest.mark.parametrize(("name", "mode", "outcome"), CHANGED_CASES)
@pytest.mark.parametrize("again", MODES)
def test_enable_is_idempotent(name: str, mode: domxml.Mode, outcome: Outcome, again: domxml.Mode) -> None:
    """Once on, in either mode, a second enable in either mode changes nothing (and checks no alias)."""
    enabled, _ = domxml.enable_events(load(name), mode)
    assert domxml.enable_events(enabled, again) == (enabled, False)


# (fixture, mode) -> the lines enable_events inserts, exactly: indentation and quotes follow the document.
INSERTED = {
    ("managed_pci.xml", "override"): [
        "      <alias name='ua-vfio-0000-3b-00-1'/>",
        "  <qemu:override>",
        "    <qemu:device alias='ua-vfio-0000-3b-00-1'>",
        "      <qemu:frontend>",
        "        <qemu:property name='migration-events' type='bool' value='true'/>",
        "      </qemu:frontend>",
        "    </qemu:device>",
        "  </qemu:override>",
    ],
    ("managed_pci.xml", "global"): [
        "  <qemu:commandline>",
        "    <qemu:arg value='-global'/>",
        "    <qemu:arg value='vfio-pci.migration-events=on'/>",
        "  </qemu:commandline>",
    ],
    ("tool_generated_4space.xml", "override"): [
        '            <alias name="ua-vfio-0000-c1-00-0"/>',
        "    <qemu:override>",
        '        <qemu:device alias="ua-vfio-0000-c1-00-0">',
        "            <qemu:frontend>",
        '                <qemu:property name="migration-events" type="bool" value="true"/>',
        "            </qemu:frontend>",
        "        </qemu:device>",
        "    </qemu:override>",
    ],
    ("mdev_vfio_pci.xml", "override"): [
        "      <alias name='ua-vfio-mdev-b1e2a3c4-d5f6-4789-8a9b-0c1d2e3f4a5b'/>",
        "  <qemu:override>",
        "    <qemu:device alias='ua-vfio-mdev-b1e2a3c4-d5f6-4789-8a9b-0c1d2e3f4a5b'>",
        "      <qemu:frontend>",
        "        <qemu:property name='migration-events' type='bool' value='true'/>",
        "      </qemu:frontend>",
        "    </qemu:device>",
        "  </qemu:override>",
    ],
    ("ua_alias.xml", "override"): [
        "  <qemu:override>",
        "    <qemu:device alias='ua-rdma0'>",
        "      <qemu:frontend>",
        "        <qemu:property name='migration-events' type='bool' value='true'/>",
        "      </qemu:frontend>",
        "    </qemu:device>",
        "  </qemu:override>",
    ],
    ("commandline_other_args.xml", "global"): [
        "    <qemu:arg value='-global'/>",
        "    <qemu:arg value='vfio-pci.migration-events=on'/>",
    ],
    ("override_other_device.xml", "override"): [
        "      <alias name='ua-vfio-0000-86-00-4'/>",
        "    <qemu:device alias='ua-vfio-0000-86-00-4'>",
        "      <qemu:frontend>",
        "        <qemu:property name='migration-events' type='bool' value='true'/>",
        "      </qemu:frontend>",
        "    </qemu:device>",
    ],
    ("partially_enabled_override.xml", "override"): [
        "      <alias name='ua-vfio-0000-3b-00-5'/>",
        "    <qemu:device alias='ua-vfio-0000-3b-00-5'>",
        "      <qemu:frontend>",
        "        <qemu:property name='migration-events' type='bool' value='true'/>",
        "      </qemu:frontend>",
        "    </qemu:device>",
    ],
}


@pytest.mark.parametrize(("name", "mode"), sorted(INSERTED))
def test_inserted_lines_look_hand_written(name: str, mode: domxml.Mode) -> None:
    xml = load(name)
    diff = domxml.unified_diff(xml, domxml.enable_events(xml, mode)[0], name).splitlines()
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    added = [line for line in added if not line.lstrip().startswith("<domain ")]
    assert added == INSERTED[(name, mode)]


# Where new elements land: (fixture, mode, XPath that must be true on the result)
PLACEMENT = [
    # the alias goes after <source>, before the guest <address> (libvirt's order)
    ("managed_pci.xml", "override", "name(devices/hostdev/alias/following-sibling::*[1]) = 'address'"),
    (
        "unmanaged_pci_vfio_driver.xml",
        "override",
        "name(devices/hostdev/alias/following-sibling::*[1]) = 'rom'",
    ),
    ("nova_metadata.xml", "override", "name(devices/interface/alias/preceding-sibling::*[1]) = 'vlan'"),
    # a comment just above <address> stays with it
    (
        "comments_in_devices.xml",
        "override",
        "boolean(devices/hostdev[1]/alias/following-sibling::node()[2][self::comment()])",
    ),
    # new -global args go after the existing args, before <qemu:env>
    (
        "commandline_other_args.xml",
        "global",
        "qemu:commandline/qemu:env/preceding-sibling::qemu:arg[1]/@value = 'vfio-pci.migration-events=on'",
    ),
    # a new <qemu:commandline> goes before an existing <qemu:override>, as libvirt formats them
    (
        "override_other_device.xml",
        "global",
        "name(qemu:commandline/following-sibling::*[1]) = 'qemu:override'",
    ),
    ("override_other_device.xml", "override", "count(qemu:override/qemu:device) = 2"),
    ("ua_alias.xml", "override", "count(//alias) = 1 and qemu:override/qemu:device/@alias = 'ua-rdma0'"),
    ("lab_simulated_devices.xml", "global", "count(qemu:commandline) = 1 and count(qemu:commandline/*) = 8"),
]


@pytest.mark.parametrize(("name", "mode", "xpath"), PLACEMENT)
def test_placement(name: str, mode: domxml.Mode, xpath: str) -> None:
    root = domxml.parse(domxml.enable_events(load(name), mode)[0])
    assert root.xpath(xpath, namespaces=NS) is True


# fixture -> after disable_events: (changed, XPath true on the result)
DISABLE = {
    "enabled_override.xml": (True, "not(//alias) and not(qemu:override)"),
    "enabled_global.xml": (
        True,
        "count(qemu:commandline/qemu:arg) = 2 and not(//qemu:arg[@value='-global'])",
    ),
    "partially_enabled_override.xml": (True, "not(//alias) and not(qemu:override)"),
    "override_other_device.xml": (False, "count(qemu:override/qemu:device) = 1"),
    "ua_alias.xml": (False, "devices/hostdev/alias/@name = 'ua-rdma0'"),
    "conflict_override_false.xml": (False, "qemu:override//qemu:property/@value = 'false'"),
    "conflict_global_off.xml": (False, "count(qemu:commandline/qemu:arg) = 2"),
    "managed_pci.xml": (False, "not(qemu:commandline)"),
}


@pytest.mark.parametrize("name", sorted(DISABLE))
def test_disable(name: str) -> None:
    changed, xpath = DISABLE[name]
    xml = load(name)
    new_xml, did = domxml.disable_events(xml)
    assert did is changed
    assert (new_xml == xml) is not changed
    root = domxml.parse(new_xml)
    assert root.xpath(xpath, namespaces=NS) is True
    if changed:
        assert domxml.QEMU_NS not in root.nsmap.values() or root.xpath("//qemu:*", namespaces=NS)
        assert domxml.disable_events(new_xml) == (new_xml, False)


def test_disable_keeps_a_user_alias_and_other_overrides() -> None:
    enabled, _ = domxml.enable_events(load("ua_alias.xml"), "override")
    disabled, _ = domxml.disable_events(enabled)
    assert disabled == load("ua_alias.xml")
    merged, _ = domxml.enable_events(load("override_other_device.xml"), "override")
    root = domxml.parse(domxml.disable_events(merged)[0])
    assert root.xpath("qemu:override/qemu:device/@alias", namespaces=NS) == ["ua-net0"]


def test_doctype_with_entity_is_refused_and_never_resolved() -> None:
    xml = load("doctype_entity.xml")
    for call in (domxml.parse, domxml.events_status, domxml.disable_events, domxml.domain_name):
        with pytest.raises(DomainXMLError, match="DOCTYPE or entity declaration") as raised:
            call(xml)
        assert "root:" not in str(raised.value)
    with pytest.raises(DomainXMLError, match="DOCTYPE"):
        domxml.enable_events(xml, "global")
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


def test_unknown_mode() -> None:
    with pytest.raises(BadInput, match="unknown events mode"):
        domxml.enable_events(load("managed_pci.xml"), "both")  # type: ignore[arg-type]


# fixture, mode -> destination XML outcome
DESTINATION = [
    ("managed_pci.xml", "global", CHANGED),
    ("live_migratable_non_ua_alias.xml", "global", CHANGED),
    ("simulated_commandline_device.xml", "global", CHANGED),
    ("lab_simulated_devices.xml", "global", CHANGED),
    ("three_devices.xml", "override", CHANGED),
    ("enabled_global.xml", "global", UNCHANGED),
    ("enabled_override.xml", "global", UNCHANGED),
    ("no_vfio_usb.xml", "global", UNCHANGED),
    ("live_migratable_non_ua_alias.xml", "override", DomainXMLError),
    ("conflict_global_off.xml", "global", DomainXMLError),
]


@pytest.mark.parametrize(("name", "mode", "outcome"), DESTINATION)
def test_destination_xml(name: str, mode: domxml.Mode, outcome: object) -> None:
    xml = load(name)
    if outcome is DomainXMLError:
        with pytest.raises(DomainXMLError):
            domxml.destination_xml(xml, mode)
        return
    dest = domxml.destination_xml(xml, mode)
    if outcome == UNCHANGED:
        assert dest == xml
        return
    assert domxml.events_status(dest).all_enabled
    assert domxml.domain_name(dest) == domxml.domain_name(xml)
    # aliases, including libvirt's own in a live XML, travel unchanged
    before = domxml.parse(xml).xpath("//alias/@name")
    assert set(before) <= set(domxml.parse(dest).xpath("//alias/@name"))


def test_destination_xml_defaults_to_global() -> None:
    assert (
        domxml.destination_xml(load("managed_pci.xml"))
        == domxml.enable_events(load("managed_pci.xml"), "global")[0]
    )


def test_unified_diff() -> None:
    xml = load("managed_pci.xml")
    assert domxml.unified_diff(xml, xml, "db-primary-01") == ""
    diff = domxml.unified_diff(xml, domxml.enable_events(xml, "global")[0], "db-primary-01")
    assert diff.startswith("--- a/db-primary-01\n+++ b/db-primary-01\n@@ ")
    assert "+    <qemu:arg value='-global'/>\n" in diff
    assert domxml.unified_diff("<a/>", "<b/>", "x").endswith("+<b/>\n\\ No newline at end of file\n")


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


# inline XML -> the message fragment enable_events raises with (in both modes)
INLINE_CONFLICTS = [
    (domain(UA, override("ua-nic", "", kind="remove"), QNS), "type='remove' for device 'ua-nic'"),
    (domain(UA, commandline("-global", "vfio-pci-nohotplug.migration-events=no"), QNS), "nohotplug"),
    (domain("", commandline("-device", "vfio-pci,host=0000:3b:00.1,id=x,migration-events=off"), QNS),
     "-device vfio-pci,host=0000:3b:00.1,id=x,migration-events=off"),
    (domain("", commandline(env="<qemu:env name='ORCH_SIM_DEVICES' value='nic0,nic1:migration-events=off'/>"),
            QNS), "simulated device 'nic1'"),
    (domain(UA, commandline("-set", "device.ua-nic.migration-events=on"), QNS), "-set device.ua-nic"),
]  # fmt: skip


@pytest.mark.parametrize(("xml", "fragment"), INLINE_CONFLICTS)
@pytest.mark.parametrize("mode", MODES)
def test_inline_conflicts(xml: str, fragment: str, mode: domxml.Mode) -> None:
    with pytest.raises(DomainXMLError, match="conflicts with turning VFIO migration events on") as raised:
        domxml.enable_events(xml, mode)
    assert fragment in raised.value.message
    assert "remove it" in raised.value.hint


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
    with pytest.raises(NothingToDo, match="domain has no VFIO device"):
        domxml.enable_events(domain(devices), "global")


# inline XML, mode -> the result, exactly (compact documents get compact edits)
INLINE_EDITS = [
    (domain(), "global",
     "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>t</name><devices>"
     + HOSTDEV.format(alias="") + "</devices><qemu:commandline><qemu:arg value='-global'/>"
     "<qemu:arg value='vfio-pci.migration-events=on'/></qemu:commandline></domain>"),
    (domain(tail="<qemu:commandline/>", root_attrs=QNS), "global",
     domain(tail=commandline("-global", "vfio-pci.migration-events=on"), root_attrs=QNS)),
    (domain(tail="<q:override><q:device alias='ua-vfio-0000-3b-00-1'/></q:override>",
            root_attrs=" xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'"), "override",
     domain(HOSTDEV.format(alias="<alias name='ua-vfio-0000-3b-00-1'/>"),
            "<q:override><q:device alias='ua-vfio-0000-3b-00-1'><q:frontend>"
            "<q:property name='migration-events' type='bool' value='true'/>"
            "</q:frontend></q:device></q:override>",
            " xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'")),
    (domain("<hostdev mode='subsystem' type='pci'><source><address bus='59' slot='0' function='7'/>"
            "</source></hostdev>"), "override",
     "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>t</name><devices>"
     "<hostdev mode='subsystem' type='pci'><source><address bus='59' slot='0' function='7'/></source>"
     "<alias name='ua-vfio-0000-3b-00-7'/></hostdev></devices><qemu:override>"
     "<qemu:device alias='ua-vfio-0000-3b-00-7'><qemu:frontend><qemu:property name='migration-events'"
     " type='bool' value='true'/></qemu:frontend></qemu:device></qemu:override></domain>"),
]  # fmt: skip


@pytest.mark.parametrize(("xml", "mode", "expected"), INLINE_EDITS)
def test_inline_edits(xml: str, mode: domxml.Mode, expected: str) -> None:
    assert domxml.enable_events(xml, mode) == (expected, True)


def test_crlf_document_round_trips() -> None:
    xml = load("managed_pci.xml").replace("\n", "\r\n")
    for mode in MODES:
        enabled, _ = domxml.enable_events(xml, mode)
        assert "\r\n  <qemu:" in enabled and "\n  <qemu:" not in enabled.replace("\r\n", "")
        assert domxml.disable_events(enabled) == (xml, True)


def test_qemu_prefix_taken_by_another_namespace() -> None:
    xml = domain(root_attrs=" xmlns:qemu='http://example.com/not-qemu'")
    with pytest.raises(DomainXMLError, match="prefix 'qemu' is bound to another namespace"):
        domxml.enable_events(xml, "global")


def test_hostdev_without_source_address_in_override_mode() -> None:
    xml = domain("<hostdev mode='subsystem' type='pci' managed='yes'><source/></hostdev>")
    assert domxml.events_status(xml).devices == [pci(None)]
    with pytest.raises(DomainXMLError, match="no source address to derive an alias from"):
        domxml.enable_events(xml, "override")
    assert domxml.enable_events(xml, "global")[1] is True
