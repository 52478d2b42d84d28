"""Domain XML, the read model: which VFIO devices a domain has and whether they emit migration events.

QEMU emits VFIO_MIGRATION events only for vfio-pci devices started with `migration-events=on`.
libvirt has no element for that property; it reaches QEMU through libvirt's QEMU passthrough
namespace, which this module reads:

- `<qemu:override>` properties per device alias (libvirt >= 8.2);
- ``-global vfio-pci.migration-events=...`` in `<qemu:commandline>` (either spelling);
- vfio-pci devices added with ``-device`` in `<qemu:commandline>` (keyval or JSON syntax), with
  their own `migration-events` option, which beats `-global` as in QEMU.

It also reads a domain's switchover-group label from its `<metadata>` (`group_label`).

Parsing resolves no entity and touches neither the network nor the disk. Nothing here writes XML:
`orchestrator.core.domxml_edit` turns the events on and off on top of these readers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from orchestrator.core.errors import BadInput

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# A domain's switchover group, in its <metadata>: what
#   virsh metadata DOMAIN --uri urn:orchestrator:group:1 --key orch --set '<group>NAME</group>'
# stores (libvirt puts the key as the prefix on the element: <orch:group xmlns:orch="...">NAME</orch:group>).
GROUP_NS = "urn:orchestrator:group:1"
GROUP_KEY = "orch"
GROUP_ELEMENT = "group"
EVENTS_PROPERTY = "migration-events"
# vfio-pci-nohotplug is a vfio-pci subtype, so -global vfio-pci.* reaches it too.
VFIO_DRIVERS = frozenset({"vfio-pci", "vfio-pci-nohotplug"})

DeviceKind = Literal["pci", "mdev", "commandline"]

_Q = "{" + QEMU_NS + "}"
_PCI_FIELDS = ("domain", "bus", "slot", "function")
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
# QEMU reads -global DRIVER.PROPERTY=VALUE first, and the driver=,property=,value= form otherwise.
_GLOBAL_SHORT = re.compile(r"([^.=]{1,63})\.([^=]+)=(.*)", re.DOTALL)
_DETAIL_CHARS = 200  # of a parser message, in its one line


class DomainXMLError(BadInput):
    """The domain XML is malformed, unsafe, or conflicts with the events property."""


@dataclass(frozen=True)
class VfioDevice:
    """One VFIO device of a domain, as its XML describes it.

    `host_address` is the host PCI address (``0000:3b:00.1``) or the mdev UUID; `events_override`
    is the value of a `migration-events` property set for this device itself (`<qemu:override>`
    for a hostdev, the ``-device`` option for a `commandline` device), None when there is none.
    """

    alias: str | None
    kind: DeviceKind
    host_address: str | None
    managed: bool | None
    events_override: bool | None


@dataclass(frozen=True)
class EventsStatus:
    """Whether a domain's VFIO devices will emit migration events when QEMU starts."""

    devices: list[VfioDevice]
    global_on: bool | None
    commandline_devices: list[VfioDevice] = field(default_factory=list)

    def device_enabled(self, device: VfioDevice) -> bool:
        """Whether this device emits events: its own property beats `-global`, as in QEMU."""
        if device.events_override is not None:
            return device.events_override
        return self.global_on is True

    def enabled(self, alias: str | None) -> bool:
        """Whether the device with this alias (or QEMU id) emits events; None: a device without one."""
        for device in (*self.devices, *self.commandline_devices):
            if alias is not None and device.alias == alias:
                return self.device_enabled(device)
        return self.global_on is True

    @property
    def all_enabled(self) -> bool:
        """True when the domain has VFIO devices and every one of them emits events."""
        everything = [*self.devices, *self.commandline_devices]
        return bool(everything) and all(self.device_enabled(device) for device in everything)


def parse(xml: str) -> etree._Element:
    """Parse domain XML without resolving entities or touching the network or disk.

    Raises DomainXMLError for malformed XML (with lxml's line and column) and for any document
    with a DOCTYPE or entity declaration, which libvirt never emits.
    """
    try:
        data = xml.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no XML parser can read it
        raise DomainXMLError(
            f"malformed domain XML: not Unicode text ({exc.reason} at character {exc.start})",
            hint="fix the XML and retry",
        ) from None
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        # lxml quotes the offending text, line breaks included: one line, as every error is.
        detail = " ".join(str(exc).split())
        if len(detail) > _DETAIL_CHARS:
            detail = detail[: _DETAIL_CHARS - 3] + "..."
        raise DomainXMLError(f"malformed domain XML: {detail}", hint="fix the XML and retry") from exc
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise DomainXMLError(
            "domain XML has a DOCTYPE or entity declaration; refused",
            hint="libvirt never emits one: remove the <!DOCTYPE ...> block",
        )
    return root


def parse_domain(xml: str) -> etree._Element:
    """`parse`, and refuse a document whose root is not `<domain>`."""
    root = parse(xml)
    if root.tag != "domain":
        raise DomainXMLError(
            f"not a libvirt domain XML: the root element is <{root.tag}>",
            hint="pass the output of virsh dumpxml",
        )
    return root


def domain_name(xml: str) -> str:
    """The domain's `<name>`."""
    name = (parse_domain(xml).findtext("name") or "").strip()
    if not name:
        raise DomainXMLError("domain XML has no <name>", hint="pass the XML of a libvirt domain")
    return name


def group_label(xml: str) -> str | None:
    """The domain's switchover-group label (`GROUP_NS`), None when it has none or an empty one."""
    return read_group_label(parse_domain(xml))


def read_group_label(root: etree._Element) -> str | None:
    """`group_label` of an already parsed domain: matched by namespace, whatever its prefix; its
    whitespace (line breaks included) collapsed, as the label is shown in one-line messages."""
    element = root.find(f"metadata/{{{GROUP_NS}}}{GROUP_ELEMENT}")
    label = " ".join((element.text or "").split()) if element is not None else ""
    return label or None


def find_vfio_devices(root: etree._Element) -> list[VfioDevice]:
    """The VFIO `<hostdev>` (PCI and vfio-pci mdev) and `<interface type='hostdev'>` devices, in order."""
    return [device for _, device in vfio_hostdevs(root)]


def events_status(xml: str) -> EventsStatus:
    """Read whether migration events are on, per device and through `-global`."""
    return read_status(parse_domain(xml))


def read_status(root: etree._Element) -> EventsStatus:
    """`events_status` of an already parsed domain."""
    return EventsStatus(
        devices=find_vfio_devices(root),
        global_on=_global_events(root),
        commandline_devices=_commandline_devices(root),
    )


def vfio_hostdevs(root: etree._Element) -> list[tuple[etree._Element, VfioDevice]]:
    """(element, device) for each VFIO hostdev or hostdev interface, in document order."""
    overrides: dict[str, bool | None] = {}
    for alias, prop in override_properties(root):
        overrides.setdefault(alias, property_value(prop))
    found = []
    for element in root.iterfind("devices/*"):
        device = _vfio_device(element, overrides)
        if device is not None:
            found.append((element, device))
    return found


def override_properties(root: etree._Element) -> list[tuple[str, etree._Element]]:
    """(device alias, property) for each `migration-events` property under `<qemu:override>`."""
    found = []
    for device in root.iterfind(f"{_Q}override/{_Q}device"):
        for prop in device.iterfind(f"{_Q}frontend/{_Q}property"):
            if prop.get("name") == EVENTS_PROPERTY:
                found.append((device.get("alias", ""), prop))
    return found


def property_value(prop: etree._Element) -> bool | None:
    """True or False for a boolean value; None for type='remove' (QEMU's default and -global apply)."""
    if prop.get("type") == "remove":
        return None
    return qemu_bool(prop.get("value"))


def commandline_options(
    root: etree._Element,
) -> Iterator[tuple[str, str, tuple[etree._Element, etree._Element]]]:
    """(option, value, both `qemu:arg` elements) for each -global, -set and -device, in order."""
    args = list(root.iterfind(f"{_Q}commandline/{_Q}arg"))
    index = 0
    while index < len(args) - 1:
        option = args[index].get("value", "")
        option = option[1:] if option.startswith("--") else option
        if option in ("-global", "-set", "-device"):
            yield option, args[index + 1].get("value", ""), (args[index], args[index + 1])
            index += 2
        else:
            index += 1


def global_setting(value: str) -> tuple[str, str, str]:
    """(driver, property, value) of a -global option."""
    short = _GLOBAL_SHORT.fullmatch(value)
    if short is not None:
        return short.group(1), short.group(2), short.group(3)
    fields = _keyval(value)
    return fields.get("driver", ""), fields.get("property", ""), fields.get("value", "")


def device_properties(value: str) -> dict[str, str]:
    """The properties of a -device option, in JSON or keyval syntax (the driver under "driver")."""
    if value.lstrip().startswith("{"):
        try:
            decoded = json.loads(value)
        except ValueError:
            return {}
        if not isinstance(decoded, dict):
            return {}
        return {str(key): _json_text(item) for key, item in decoded.items()}
    driver, _, rest = value.partition(",")
    properties = _keyval(rest)
    if "=" in driver:
        properties.update(_keyval(driver))
    else:
        properties["driver"] = driver
    return properties


def qemu_bool(value: str | None) -> bool | None:
    """A QEMU boolean option value, None when absent or not a boolean."""
    if value is None:
        return None
    word = value.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else None


# --- internals --------------------------------------------------------------------------------


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_blank_text=False
    )


def _vfio_device(element: etree._Element, overrides: dict[str, bool | None]) -> VfioDevice | None:
    kind: DeviceKind
    if element.tag == "hostdev" and element.get("mode", "subsystem") == "subsystem":
        if element.get("type") == "pci":
            kind = "pci"
        elif element.get("type") == "mdev" and element.get("model") == "vfio-pci":
            kind = "mdev"
        else:
            return None
    elif element.tag == "interface" and element.get("type") == "hostdev":
        kind = "pci"
    else:
        return None
    if kind == "pci":
        driver = element.find("driver")
        if driver is not None and driver.get("name", "vfio") != "vfio":
            return None  # legacy KVM or Xen assignment, not VFIO
        host_address = _pci_address(element.find("source/address"))
    else:
        source = element.find("source/address")
        host_address = source.get("uuid") if source is not None else None
    alias_element = element.find("alias")
    alias = alias_element.get("name") if alias_element is not None else None
    return VfioDevice(
        alias=alias,
        kind=kind,
        host_address=host_address,
        managed={"yes": True, "no": False}.get(element.get("managed", "")),
        events_override=overrides.get(alias) if alias is not None else None,
    )


def _pci_address(address: etree._Element | None) -> str | None:
    """``0000:3b:00.1`` from libvirt's domain/bus/slot/function attributes, None when incomplete."""
    if address is None:
        return None
    try:
        parts = [_libvirt_int(address.get(name, "0" if name == "domain" else "")) for name in _PCI_FIELDS]
    except ValueError:
        return None
    return "{:04x}:{:02x}:{:02x}.{:x}".format(*parts)


def _libvirt_int(text: str) -> int:
    """An integer the way libvirt reads it (strtol base 0: 0x hex, leading-0 octal, decimal)."""
    text = text.strip().lower()
    if text.startswith("0x"):
        return int(text[2:], 16)
    if len(text) > 1 and text.startswith("0"):
        return int(text[1:], 8)
    return int(text, 10)


def _keyval(text: str) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` (escaped commas are not expected in these options)."""
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {key: value for key, _, value in pairs}


def _global_events(root: etree._Element) -> bool | None:
    """The last ``-global vfio-pci.migration-events`` value, as QEMU applies globals in order."""
    state = None
    for option, value, _ in commandline_options(root):
        if option == "-global":
            driver, prop, setting = global_setting(value)
            if driver == "vfio-pci" and prop == EVENTS_PROPERTY:
                state = qemu_bool(setting)
    return state


def _json_text(item: object) -> str:
    if isinstance(item, bool):
        return "on" if item else "off"
    return str(item)


def _commandline_devices(root: etree._Element) -> list[VfioDevice]:
    """vfio-pci devices added with -device in `<qemu:commandline>`."""
    devices = []
    for option, value, _ in commandline_options(root):
        properties = device_properties(value) if option == "-device" else {}
        if properties.get("driver") in VFIO_DRIVERS:
            devices.append(
                VfioDevice(
                    alias=properties.get("id"),
                    kind="commandline",
                    host_address=properties.get("host") or properties.get("sysfsdev"),
                    managed=None,
                    events_override=qemu_bool(properties.get(EVENTS_PROPERTY)),
                )
            )
    return devices
