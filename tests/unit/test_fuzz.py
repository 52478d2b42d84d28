"""Fuzzing of what reaches the orchestrator from outside its control, with hypothesis (no libvirt):

- domain XML (libvirt's, a user's `--xml FILE`) through `domxml.events_status` and
  `domxml_edit.enable_events`/`disable_events`/`destination_xml`: arbitrary text, fixtures mutated
  as text and as trees, and generated libvirt-like domains; each call gives a result or one
  one-line `OrchestratorError` (BadInput; NothingToDo from `enable_events`), never another
  exception, and on generated domains without events `disable(enable(x)) == x` byte for byte;
- VFIO_MIGRATION payloads through `vfio.VfioEvent.from_qmp`: an event or a one-line ValueError.

Policies and event orders are fuzzed elsewhere (tests/unit/test_policy.py,
tests/unit/test_migration_properties.py). Each property stays within a few seconds at the default
profile (250 examples, tests/unit/conftest.py); HYPOTHESIS_PROFILE=thorough runs 5,000.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lxml import etree

from orchestrator.core import domxml, domxml_edit
from orchestrator.core.errors import BadInput, NothingToDo, OrchestratorError
from orchestrator.core.vfio import DeviceState, Role, VfioEvent

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "domxml"
DOCUMENTS = {path.name: path.read_text(encoding="utf-8") for path in sorted(FIXTURES.glob("*.xml"))}
QEMU_NS = domxml.QEMU_NS
SLOW = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the contract --------------------------------------------------------------------------------

Call = Callable[[str], object]
CALLS: dict[str, tuple[Call, tuple[type[OrchestratorError], ...]]] = {
    "events_status": (domxml.events_status, (BadInput,)),
    "enable override": (lambda xml: domxml_edit.enable_events(xml, "override"), (BadInput, NothingToDo)),
    "enable global": (lambda xml: domxml_edit.enable_events(xml, "global"), (BadInput, NothingToDo)),
    "disable": (domxml_edit.disable_events, (BadInput,)),
    "destination_xml": (domxml_edit.destination_xml, (BadInput,)),
}


def one_line(error: OrchestratorError) -> None:
    line = error.line()
    assert line.strip() and not any(c in line for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), repr(line)
    assert len(line) <= 1000, f"{len(line)} characters: {line[:200]}..."


def outcome(name: str, xml: str) -> object:
    """The call's result, or the OrchestratorError it raised (checked: an allowed kind, one line)."""
    call, allowed = CALLS[name]
    try:
        return call(xml)
    except OrchestratorError as exc:
        assert isinstance(exc, allowed), (name, type(exc), exc.line())
        one_line(exc)
        return exc


def check_contract(xml: str) -> dict[str, object]:
    """Every call on `xml` keeps the contract; enable's results are consistent with the read model."""
    results = {name: outcome(name, xml) for name in CALLS}
    for name in ("enable override", "enable global"):
        result = results[name]
        if isinstance(result, tuple):
            new_xml, changed = result
            assert isinstance(new_xml, str) and isinstance(changed, bool)
            assert changed or new_xml == xml
            status = domxml.events_status(new_xml)
            assert status.all_enabled, (name, new_xml)
            assert domxml_edit.enable_events(new_xml, "global") == (new_xml, False), "idempotent"
            assert domxml_edit.enable_events(new_xml, "override") == (new_xml, False), "idempotent"
    if isinstance(results["enable global"], tuple):
        assert results["destination_xml"] == results["enable global"][0]
    # Well-formed input is always mapped to its tree (that error says "please report this XML").
    for result in results.values():
        if isinstance(result, OrchestratorError):
            assert "cannot map" not in result.message, (result.line(), xml)
    return results


# --- arbitrary and text-mutated documents --------------------------------------------------------

FRAGMENTS = [
    "<",
    ">",
    "/>",
    "</hostdev>",
    "</qemu:commandline>",
    "'",
    '"',
    "&amp;",
    "&#0;",
    "&#x10FFFF;",
    "&undefined;",
    "<!--",
    "-->",
    "<!-- c -->",
    "<![CDATA[x]]>",
    "<?pi data?>",
    "<?xml version='1.0'?>",
    "<!DOCTYPE domain [<!ENTITY x 'y'>]>",
    "\x00",
    "\ud800",
    "\r\n",
    "\u2028",
    "é",
    " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'",
    " xmlns='urn:other'",
    "<alias name='ua-x'/>",
    "<alias name='hostdev0'/>",
    "<hostdev mode='subsystem' type='pci'><source><address bus='0x5e' slot='0' function='0x1'/></source>"
    "</hostdev>",
    "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='x'/></source></hostdev>",
    "<interface type='hostdev'/>",
    "<qemu:arg value='-global'/>",
    "<qemu:arg value='-device'/>",
    "<qemu:arg value='-set'/>",
    "<qemu:arg value='vfio-pci.migration-events=on'/>",
    "<qemu:arg value='vfio-pci.migration-events=off'/>",
    "<qemu:arg value='driver=vfio-pci,property=migration-events,value=on'/>",
    "<qemu:arg value='vfio-pci,id=nic9,host=0000:5e:00.3,migration-events=on'/>",
    "<qemu:arg value='vfio-pci,id=nic9,host=0000:5e:00.3'/>",
    """<qemu:arg value='{"driver":"vfio-pci","id":3,"migration-events":true}'/>""",
    "<qemu:override><qemu:device alias='ua-x'><qemu:frontend><qemu:property name='migration-events' "
    "type='bool' value='true'/></qemu:frontend></qemu:device></qemu:override>",
    "<qemu:property name='migration-events' type='remove'/>",
    "<qemu:commandline/>",
    "<qemu:override/>",
]
POSITIONS = st.floats(min_value=0.0, max_value=1.0)
EDIT = st.tuples(
    st.sampled_from(["delete", "insert", "duplicate", "replace"]),
    POSITIONS,
    st.integers(min_value=0, max_value=40),
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)),
)


def apply_edits(text: str, edits: list[tuple[str, float, int, str]]) -> str:
    for op, where, length, fragment in edits:
        i = int(where * len(text))
        j = min(len(text), i + length)
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + fragment + text[i:]
        elif op == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + fragment + text[j:]
    return text


@given(
    st.one_of(
        st.text(),
        st.builds(lambda a, b: f"<domain>{a}</domain>{b}", st.text(max_size=30), st.text(max_size=5)),
        st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    )
)
def test_arbitrary_text_is_a_result_or_one_line(xml: str) -> None:
    check_contract(xml)


@SLOW
@given(st.sampled_from(sorted(DOCUMENTS)), st.lists(EDIT, min_size=1, max_size=4))
def test_fixtures_mutated_as_text_are_a_result_or_one_line(name: str, edits: list[Any]) -> None:
    check_contract(apply_edits(DOCUMENTS[name], edits))


# --- tree-mutated fixtures (always well-formed) --------------------------------------------------

XML_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
    max_size=12,
)
INTERESTING_VALUES = [
    "vfio-pci",
    "vfio-pci-nohotplug",
    "ua-x",
    "ua-vfio-0000-5e-00-0",
    "hostdev0",
    "nic0",
    "migration-events",
    "true",
    "false",
    "on",
    "off",
    "remove",
    "bool",
    "-global",
    "-device",
    "-set",
    "--global",
    "vfio-pci.migration-events=on",
    "vfio-pci.migration-events=off",
    "device.ua-x.migration-events=on",
    "vfio-pci,id=ua-x,host=0000:5e:00.0",
    '{"driver": "vfio-pci", "id": "j0", "migration-events": "on"}',
    '{"driver": "vfio-pci", "id": ["x"]}',
    "pci",
    "mdev",
    "hostdev",
    "subsystem",
    "capabilities",
    "0x5e",
    "0x",
    "08",
    "-1",
    "99999999999999999999",
    "",
]
ATTRIBUTES = ["value", "name", "alias", "type", "mode", "model", "bus", "slot", "function", "domain", "uuid"]
VALUES = st.one_of(st.sampled_from(INTERESTING_VALUES), XML_TEXT)
TREE_EDIT = st.tuples(
    st.sampled_from(["remove", "duplicate", "move", "set", "text", "comment", "retag"]),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(ATTRIBUTES),
    VALUES,
)
TAGS = ["hostdev", "interface", "alias", "address", "source", "driver", "devices", "disk"]
QEMU_TAGS = ["commandline", "arg", "override", "device", "frontend", "property", "env"]


def apply_tree_edits(xml: str, edits: list[tuple[str, int, int, str, str]]) -> str:
    root = etree.fromstring(xml.encode())
    for op, a, b, attribute, value in edits:
        elements = [e for e in root.iter() if isinstance(e.tag, str)]
        target, other = elements[a % len(elements)], elements[b % len(elements)]
        parent = target.getparent()
        if op == "remove" and parent is not None:
            parent.remove(target)
        elif op == "duplicate" and parent is not None:
            target.addnext(copy.deepcopy(target))
        elif (
            op == "move"
            and parent is not None
            and other is not target
            and target not in other.iterancestors()
        ):
            other.append(target)
        elif op == "set":
            target.set(attribute, value)
        elif op == "text":
            target.text = value
        elif op == "comment":
            target.append(etree.Comment(value.replace("-", "_") or "c"))
        elif op == "retag" and parent is not None:
            tags = TAGS + [f"{{{QEMU_NS}}}{tag}" for tag in QEMU_TAGS]
            target.tag = tags[b % len(tags)]
    return etree.tostring(root, encoding="unicode")


@SLOW
@given(st.sampled_from(sorted(DOCUMENTS)), st.lists(TREE_EDIT, min_size=1, max_size=6))
def test_fixtures_mutated_as_trees_are_a_result_or_one_line(name: str, edits: list[Any]) -> None:
    source = DOCUMENTS[name]
    assume("<!DOCTYPE" not in source)
    check_contract(apply_tree_edits(source, edits))


# --- generated libvirt-like domains: the enable/disable round trip -------------------------------


@st.composite
def pci_address(draw: st.DrawFn) -> str:
    domain = draw(st.integers(0, 0xFFFF))
    bus = draw(st.integers(0, 0xFF))
    slot = draw(st.integers(0, 0x1F))
    function = draw(st.integers(0, 7))
    if draw(st.booleans()):
        return f"domain='0x{domain:04x}' bus='0x{bus:02x}' slot='0x{slot:02x}' function='0x{function:x}'"
    return f"bus='{bus}' slot='{slot}' function='{function}'"  # decimal, domain omitted


ALIASES = st.one_of(
    st.none(),
    st.from_regex(r"ua-[a-z0-9][a-z0-9_.-]{0,10}", fullmatch=True),
    st.integers(0, 9).map(lambda n: f"hostdev{n}"),
)


@st.composite
def hostdev(draw: st.DrawFn, unit: str) -> tuple[str, bool]:
    """A device element (lines indented by two `unit`s) and whether it is a VFIO device."""
    kind = draw(st.sampled_from(["pci", "pci", "mdev", "interface", "legacy", "other"]))
    alias = draw(ALIASES)
    indent, inner = unit * 2, unit * 3
    alias_line = f"{inner}<alias name='{alias}'/>\n" if alias else ""
    guest = (
        f"{inner}<address type='pci' domain='0x0000' bus='0x0{draw(st.integers(1, 9))}' slot='0x00' "
        "function='0x0'/>\n"
        if draw(st.booleans())
        else ""
    )
    managed = draw(st.sampled_from(["", " managed='yes'", " managed='no'"]))
    if kind == "pci":
        source = f"{inner}<source>\n{inner}{unit}<address {draw(pci_address())}/>\n{inner}</source>\n"
        driver = f"{inner}<driver name='vfio'/>\n" if draw(st.booleans()) else ""
        body = driver + source + alias_line + guest
        return f"{indent}<hostdev mode='subsystem' type='pci'{managed}>\n{body}{indent}</hostdev>\n", True
    if kind == "mdev":
        mdev = uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))
        source = f"{inner}<source>\n{inner}{unit}<address uuid='{mdev}'/>\n{inner}</source>\n"
        return (
            f"{indent}<hostdev mode='subsystem' type='mdev' model='vfio-pci'>\n{source}{alias_line}{guest}"
            f"{indent}</hostdev>\n",
            True,
        )
    if kind == "interface":
        source = (
            f"{inner}<source>\n{inner}{unit}<address type='pci' {draw(pci_address())}/>\n{inner}</source>\n"
        )
        mac = f"{inner}<mac address='52:54:00:00:00:{draw(st.integers(0, 255)):02x}'/>\n"
        return (
            f"{indent}<interface type='hostdev'{managed}>\n{mac}{source}{alias_line}{guest}"
            f"{indent}</interface>\n",
            True,
        )
    if kind == "legacy":  # KVM assignment: not VFIO
        source = f"{inner}<source>\n{inner}{unit}<address {draw(pci_address())}/>\n{inner}</source>\n"
        return (
            f"{indent}<hostdev mode='subsystem' type='pci'>\n{inner}<driver name='kvm'/>\n{source}"
            f"{indent}</hostdev>\n",
            False,
        )
    return f"{indent}<serial type='pty'>\n{inner}<target port='0'/>\n{indent}</serial>\n", False


@st.composite
def pristine_domain(draw: st.DrawFn) -> tuple[str, int, int]:
    """(XML, VFIO hostdevs, vfio-pci command-line devices) of a domain with no events turned on."""
    unit = draw(st.sampled_from(["  ", "    ", "\t"]))
    prefix = draw(st.sampled_from(["qemu", "q", "lv"]))
    quote = draw(st.sampled_from(["'", '"']))
    devices, vfio = [], 0
    for _ in range(draw(st.integers(0, 4))):
        text, is_vfio = draw(hostdev(unit))
        devices.append(text)
        vfio += is_vfio
    if draw(st.booleans()):
        devices.insert(draw(st.integers(0, len(devices))), f"{unit * 2}<!-- a comment -->\n")
    args: list[str] = []
    commandline_vfio = 0
    for n in range(draw(st.integers(0, 3))):
        arg = draw(
            st.sampled_from(
                [
                    ["-device", f"vfio-pci,id=sim{n},host=0000:5e:00.{n}"],
                    ["-device", json.dumps({"driver": "vfio-pci", "id": f"j{n}", "host": f"0000:5f:00.{n}"})],
                    ["-device", "virtio-rng-pci"],
                    ["-global", "ICH9-LPC.disable_s3=1"],
                    ["-global", "vfio-pci.x-no-mmap=on"],
                    ["-cpu", "host"],
                ]
            )
        )
        commandline_vfio += arg[0] == "-device" and "vfio-pci" in arg[1]
        args += arg
    env = draw(st.booleans())
    other_override = draw(st.one_of(st.none(), st.sampled_from(["ua-other", "ua-x"])))
    q = quote
    lines = [f"<domain type={q}qemu{q}"]
    uses_qemu = bool(args) or env or other_override is not None
    if uses_qemu:
        lines[0] += f" xmlns:{prefix}={q}{QEMU_NS}{q}"
    lines[0] += ">\n"
    lines.append(f"{unit}<name>fuzz</name>\n{unit}<memory unit={q}KiB{q}>65536</memory>\n")
    lines.append(f"{unit}<devices>\n{unit * 2}<emulator>/usr/bin/qemu-system-x86_64</emulator>\n")
    lines += [d.replace("'", q) for d in devices]
    lines.append(f"{unit}</devices>\n")
    if args or env:
        lines.append(f"{unit}<{prefix}:commandline>\n")
        for item in args:
            value = item.replace("&", "&amp;").replace('"', "&quot;").replace("'", "&apos;")
            lines.append(f"{unit * 2}<{prefix}:arg value={q}{value}{q}/>\n")
        if env:
            lines.append(f"{unit * 2}<{prefix}:env name={q}X{q} value={q}1{q}/>\n")
        lines.append(f"{unit}</{prefix}:commandline>\n")
    if other_override is not None:
        lines.append(
            f"{unit}<{prefix}:override>\n{unit * 2}<{prefix}:device alias={q}{other_override}{q}>\n"
            f"{unit * 3}<{prefix}:frontend>\n"
            f"{unit * 4}<{prefix}:property name={q}x-foo{q} type={q}string{q} value={q}bar{q}/>\n"
            f"{unit * 3}</{prefix}:frontend>\n{unit * 2}</{prefix}:device>\n{unit}</{prefix}:override>\n"
        )
    lines.append("</domain>" + draw(st.sampled_from(["", "\n", "\n\n"])))
    return "".join(lines), vfio, commandline_vfio


@SLOW
@given(pristine_domain())
def test_generated_domains_round_trip_enable_then_disable(case: tuple[str, int, int]) -> None:
    xml, vfio, commandline_vfio = case
    status = domxml.events_status(xml)
    assert len(status.devices) == vfio and len(status.commandline_devices) == commandline_vfio
    assert not any(status.device_enabled(d) for d in (*status.devices, *status.commandline_devices))
    results = check_contract(xml)
    assert domxml_edit.disable_events(xml) == (xml, False), "nothing to remove from a pristine document"
    if not vfio and not commandline_vfio:
        assert isinstance(results["enable global"], NothingToDo)
        assert results["destination_xml"] == xml
        return
    # Global mode reaches every vfio-pci device: it never refuses a pristine document.
    assert isinstance(results["enable global"], tuple), results["enable global"]
    for mode in ("global", "override"):
        result = results[f"enable {mode}"]
        if isinstance(result, OrchestratorError):
            assert mode == "override" and isinstance(result, domxml.DomainXMLError), result.line()
            assert any(
                why in result.message
                for why in ("not a user alias", "is already used", "which <qemu:override> cannot reach")
            ), result.line()
            continue
        assert isinstance(result, tuple)
        new_xml, changed = result
        assert changed and new_xml != xml
        assert domxml_edit.disable_events(new_xml) == (xml, True), (mode, new_xml)


# --- VFIO_MIGRATION payloads ---------------------------------------------------------------------


def json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    json_containers,
    max_leaves=12,
)
STATES = st.one_of(
    st.sampled_from([s.value for s in DeviceState]),
    st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    st.text(max_size=30),
)
FIELD = st.one_of(st.text(max_size=30), STATES, JSON)
PAYLOAD_OBJECT = st.fixed_dictionaries(
    {},
    optional={"device-id": FIELD, "qom-path": FIELD, "device-state": FIELD, "extra": JSON},
)
NESTING = st.builds(
    lambda opener, depth: opener * depth,
    st.sampled_from(["[", '{"a":', '{"device-id":[']),
    st.integers(1, 200_000),
)


def from_qmp(details: object, seconds: int = 1_700_000_000, micros: int = 5) -> VfioEvent | ValueError:
    try:
        return VfioEvent.from_qmp("host-a", Role.SOURCE, "vm1", seconds, micros, details, 123.0)  # type: ignore[arg-type]
    except ValueError as exc:
        message = str(exc)
        assert message.startswith("malformed VFIO_MIGRATION event from host-a for domain vm1: "), message
        assert "\n" not in message and "\r" not in message and len(message) < 1000, message
        return exc


@given(
    st.one_of(
        PAYLOAD_OBJECT.map(json.dumps),
        PAYLOAD_OBJECT,
        JSON.map(json.dumps),
        JSON,
        st.text(),
        NESTING,
    ),
    st.integers(0, 2**40),
    st.integers(0, 999_999),
)
def test_vfio_payloads_are_an_event_or_one_line(details: Any, seconds: int, micros: int) -> None:
    result = from_qmp(details, seconds, micros)
    if isinstance(result, ValueError):
        return
    data = json.loads(details) if isinstance(details, str) else details
    assert isinstance(data, dict)
    assert result.device_id and isinstance(result.state, str)
    assert result.device_id == (
        data.get("device-id") or str(data.get("qom-path", "")).rstrip("/").rsplit("/", 1)[-1]
    )
    assert result.qom_path == data.get("qom-path", "")
    assert result.qemu_time == pytest.approx(seconds + micros / 1e6)
    assert (result.host, result.role, result.domain, result.received) == ("host-a", Role.SOURCE, "vm1", 123.0)


def test_vfio_payload_nested_beyond_the_recursion_limit_is_one_line() -> None:
    for opener in ("[", '{"a":'):
        assert isinstance(from_qmp(opener * 200_000), ValueError)


# --- what the fuzzing found (each fixed in the product) ------------------------------------------


def test_found_malformed_xml_and_lone_surrogates_are_one_line() -> None:
    for xml in ("<!--\x80\n\n", "<domain><name>x</name>\n<![CDATA[\n", "<domain>\ud800</domain>"):
        error = outcome("events_status", xml)
        assert isinstance(error, domxml.DomainXMLError) and error.message.startswith("malformed domain XML")


def test_found_a_dangling_global_is_refused_not_completed_with_ours() -> None:
    xml = DOCUMENTS["enabled_global.xml"].replace(
        "    <qemu:arg value='vfio-pci.migration-events=on'/>\n", ""
    )
    for mode in ("global", "override"):
        error = outcome(f"enable {mode}", xml)
        assert isinstance(error, domxml.DomainXMLError)
        assert "ends with '-global' without its value" in error.message


def test_found_an_alias_without_a_name_is_refused_in_override_mode() -> None:
    xml = DOCUMENTS["managed_pci.xml"].replace("</source>", "</source>\n      <alias/>", 1)
    error = outcome("enable override", xml)
    assert isinstance(error, domxml.DomainXMLError) and "<alias> without a name" in error.message
    assert isinstance(outcome("enable global", xml), tuple)
