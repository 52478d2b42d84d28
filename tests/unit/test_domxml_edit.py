"""Table-driven tests of the byte-preserving domain-XML editor over the fixtures in tests/fixtures/domxml.

The fixtures, what the read model finds in them and the inline documents come from test_domxml.py.
"""

from __future__ import annotations

import difflib
import itertools

import pytest
from lxml import etree
from unit.test_domxml import (
    ALL_ENABLED,
    HOSTDEV,
    NOT_VFIO,
    NS,
    QNS,
    STATUS,
    UA,
    commandline,
    domain,
    load,
    override,
    pci,
)

from orchestrator.core import domxml, domxml_edit
from orchestrator.core.domxml import DomainXMLError
from orchestrator.core.errors import BadInput, NothingToDo

MODES = ("override", "global")

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
    assert set(ENABLE) == set(STATUS)
    # enable_events changes nothing exactly where the read model finds every device emitting
    assert {name for name, outcomes in ENABLE.items() if outcomes == (UNCHANGED, UNCHANGED)} == ALL_ENABLED


@pytest.mark.parametrize(("name", "mode", "outcome"), ENABLE_CASES)
def test_enable_outcome(name: str, mode: domxml_edit.Mode, outcome: Outcome) -> None:
    xml = load(name)
    if isinstance(outcome, tuple):
        error, fragment = outcome
        with pytest.raises(error) as raised:
            domxml_edit.enable_events(xml, mode)
        assert fragment in str(raised.value)
        return
    new_xml, changed = domxml_edit.enable_events(xml, mode)
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
def test_disable_undoes_enable_byte_for_byte(name: str, mode: domxml_edit.Mode, outcome: Outcome) -> None:
    xml = load(name)
    enabled, _ = domxml_edit.enable_events(xml, mode)
    assert domxml_edit.disable_events(enabled) == (xml, True)


@pytest.mark.parametrize(("name", "mode", "outcome"), CHANGED_CASES)
def test_enable_only_inserts(name: str, mode: domxml_edit.Mode, outcome: Outcome) -> None:
    """Outside the inserted lines, only the root tag may change, by gaining the namespace."""
    before = load(name).splitlines(keepends=True)
    after = domxml_edit.enable_events(load(name), mode)[0].splitlines(keepends=True)
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
def test_enable_is_idempotent(
    name: str, mode: domxml_edit.Mode, outcome: Outcome, again: domxml_edit.Mode
) -> None:
    """Once on, in either mode, a second enable in either mode changes nothing (and checks no alias)."""
    enabled, _ = domxml_edit.enable_events(load(name), mode)
    assert domxml_edit.enable_events(enabled, again) == (enabled, False)


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
def test_inserted_lines_look_hand_written(name: str, mode: domxml_edit.Mode) -> None:
    xml = load(name)
    diff = domxml_edit.unified_diff(xml, domxml_edit.enable_events(xml, mode)[0], name).splitlines()
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
    # ... after the lab's -device args, in the same <qemu:commandline>
    (
        "lab_simulated_devices.xml",
        "global",
        "count(qemu:commandline) = 1 and count(qemu:commandline/*) = 12"
        " and qemu:commandline/qemu:arg[6]/@value = 'vfio-pci.migration-events=on'",
    ),
]


@pytest.mark.parametrize(("name", "mode", "xpath"), PLACEMENT)
def test_placement(name: str, mode: domxml_edit.Mode, xpath: str) -> None:
    root = domxml.parse(domxml_edit.enable_events(load(name), mode)[0])
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
    new_xml, did = domxml_edit.disable_events(xml)
    assert did is changed
    assert (new_xml == xml) is not changed
    root = domxml.parse(new_xml)
    assert root.xpath(xpath, namespaces=NS) is True
    if changed:
        assert domxml.QEMU_NS not in root.nsmap.values() or root.xpath("//qemu:*", namespaces=NS)
        assert domxml_edit.disable_events(new_xml) == (new_xml, False)


def test_disable_keeps_a_user_alias_and_other_overrides() -> None:
    enabled, _ = domxml_edit.enable_events(load("ua_alias.xml"), "override")
    disabled, _ = domxml_edit.disable_events(enabled)
    assert disabled == load("ua_alias.xml")
    merged, _ = domxml_edit.enable_events(load("override_other_device.xml"), "override")
    root = domxml.parse(domxml_edit.disable_events(merged)[0])
    assert root.xpath("qemu:override/qemu:device/@alias", namespaces=NS) == ["ua-net0"]


def test_doctype_with_entity_is_refused() -> None:
    xml = load("doctype_entity.xml")
    with pytest.raises(DomainXMLError, match="DOCTYPE or entity declaration") as raised:
        domxml_edit.disable_events(xml)
    assert "root:" not in str(raised.value)
    with pytest.raises(DomainXMLError, match="DOCTYPE"):
        domxml_edit.enable_events(xml, "global")


def test_unknown_mode() -> None:
    with pytest.raises(BadInput, match="unknown events mode"):
        domxml_edit.enable_events(load("managed_pci.xml"), "both")  # type: ignore[arg-type]


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
def test_destination_xml(name: str, mode: domxml_edit.Mode, outcome: object) -> None:
    xml = load(name)
    if outcome is DomainXMLError:
        with pytest.raises(DomainXMLError):
            domxml_edit.destination_xml(xml, mode)
        return
    dest = domxml_edit.destination_xml(xml, mode)
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
        domxml_edit.destination_xml(load("managed_pci.xml"))
        == domxml_edit.enable_events(load("managed_pci.xml"), "global")[0]
    )


def test_unified_diff() -> None:
    xml = load("managed_pci.xml")
    assert domxml_edit.unified_diff(xml, xml, "db-primary-01") == ""
    diff = domxml_edit.unified_diff(xml, domxml_edit.enable_events(xml, "global")[0], "db-primary-01")
    assert diff.startswith("--- a/db-primary-01\n+++ b/db-primary-01\n@@ ")
    assert "+    <qemu:arg value='-global'/>\n" in diff
    assert domxml_edit.unified_diff("<a/>", "<b/>", "x").endswith("+<b/>\n\\ No newline at end of file\n")


# inline XML -> the message fragment enable_events raises with (in both modes)
INLINE_CONFLICTS = [
    (domain(UA, override("ua-nic", "", kind="remove"), QNS), "type='remove' for device 'ua-nic'"),
    (domain(UA, commandline("-global", "vfio-pci-nohotplug.migration-events=no"), QNS), "nohotplug"),
    (domain("", commandline("-device", "vfio-pci,host=0000:3b:00.1,id=x,migration-events=off"), QNS),
     "-device vfio-pci,host=0000:3b:00.1,id=x,migration-events=off"),
    (domain("", commandline("-device", '{"driver":"vfio-pci","id":"nic1","migration-events":false}'), QNS),
     """-device {"driver":"vfio-pci","id":"nic1","migration-events":false}' with migration-events off"""),
    (domain(UA, commandline("-set", "device.ua-nic.migration-events=on"), QNS), "-set device.ua-nic"),
]  # fmt: skip


@pytest.mark.parametrize(("xml", "fragment"), INLINE_CONFLICTS)
@pytest.mark.parametrize("mode", MODES)
def test_inline_conflicts(xml: str, fragment: str, mode: domxml_edit.Mode) -> None:
    with pytest.raises(DomainXMLError, match="conflicts with turning VFIO migration events on") as raised:
        domxml_edit.enable_events(xml, mode)
    assert fragment in raised.value.message
    assert "remove it" in raised.value.hint


@pytest.mark.parametrize("devices", NOT_VFIO)
def test_not_vfio(devices: str) -> None:
    with pytest.raises(NothingToDo, match="domain has no VFIO device"):
        domxml_edit.enable_events(domain(devices), "global")


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
def test_inline_edits(xml: str, mode: domxml_edit.Mode, expected: str) -> None:
    assert domxml_edit.enable_events(xml, mode) == (expected, True)


def test_crlf_document_round_trips() -> None:
    xml = load("managed_pci.xml").replace("\n", "\r\n")
    for mode in MODES:
        enabled, _ = domxml_edit.enable_events(xml, mode)
        assert "\r\n  <qemu:" in enabled and "\n  <qemu:" not in enabled.replace("\r\n", "")
        assert domxml_edit.disable_events(enabled) == (xml, True)


def test_qemu_prefix_taken_by_another_namespace() -> None:
    xml = domain(root_attrs=" xmlns:qemu='http://example.com/not-qemu'")
    with pytest.raises(DomainXMLError, match="prefix 'qemu' is bound to another namespace"):
        domxml_edit.enable_events(xml, "global")


def test_hostdev_without_source_address_in_override_mode() -> None:
    xml = domain("<hostdev mode='subsystem' type='pci' managed='yes'><source/></hostdev>")
    assert domxml.events_status(xml).devices == [pci(None)]
    with pytest.raises(DomainXMLError, match="no source address to derive an alias from"):
        domxml_edit.enable_events(xml, "override")
    assert domxml_edit.enable_events(xml, "global")[1] is True
