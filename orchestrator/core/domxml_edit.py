"""Domain XML, the editor: turn QEMU's VFIO migration events on or off, byte-preserving.

libvirt has no element for vfio-pci's `migration-events` property, so it goes through libvirt's
QEMU passthrough namespace, in one of two modes:

- ``override`` (libvirt >= 8.2): a `<qemu:override>` property per device, addressed by the device's
  user alias (``ua-...``), which is added to the hostdev when it has none;
- ``global``: ``-global vfio-pci.migration-events=on`` in `<qemu:commandline>`; it also reaches
  vfio-pci devices declared on the command line with ``-device``.

What a document says is read by `orchestrator.core.domxml` (the read model); this module only edits.
Edits are textual and minimal, guided by the lxml tree: everything outside the inserted elements
stays byte-for-byte as it was (libvirt's single quotes, comments, blank lines), and inserted
elements follow the document's indentation and quoting, so a diff looks like a hand edit.

`disable_events` removes what `enable_events` adds, so ``disable(enable(x)) == x`` for a document
that had no events turned on. Its rules:

- it removes every `migration-events` property whose value is true, and every
  ``-global vfio-pci.migration-events=on`` pair (either spelling), never a false one;
- it then removes each `qemu:frontend`, `qemu:device`, `qemu:override` or `qemu:commandline` left
  with no child at all (a comment counts as a child);
- it removes a hostdev's alias only if the alias is exactly the one derived from its source
  (``ua-vfio-0000-3b-00-1``, ``ua-vfio-mdev-<uuid>``) and the `qemu:device` for that alias was
  removed just now: the alias was added for the override and nothing else refers to it;
- it removes the root's declaration of the QEMU namespace once nothing in the document uses it
  (libvirt itself never formats an unused one).

Only an already-empty container present before `enable_events` (`<qemu:override/>`) or a QEMU
namespace declared but unused before it escape the byte-for-byte round trip.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from orchestrator.core.domxml import (
    EVENTS_PROPERTY,
    QEMU_NS,
    VFIO_DRIVERS,
    DomainXMLError,
    EventsStatus,
    VfioDevice,
    commandline_options,
    device_properties,
    global_setting,
    override_properties,
    parse,
    parse_domain,
    property_value,
    qemu_bool,
    read_status,
    vfio_hostdevs,
)
from orchestrator.core.errors import BadInput, NothingToDo

GLOBAL_EVENTS_ON = f"vfio-pci.{EVENTS_PROPERTY}=on"

Mode = Literal["override", "global"]

_Q = "{" + QEMU_NS + "}"
_USER_ALIAS_PREFIX = "ua-"
_ENTITIES = {"'": "&apos;", '"': "&quot;"}  # for the quote character of inserted attribute values

# libvirt formats these after a device's <alias>; a new alias goes before the first of them.
_AFTER_ALIAS = frozenset({"master", "rom", "acpi", "address"})
# libvirt formats <qemu:commandline> before these QEMU elements.
_AFTER_COMMANDLINE = frozenset({f"{_Q}capabilities", f"{_Q}deprecation", f"{_Q}override"})
# One markup token; text between tokens holds no '<' in well-formed XML.
_TOKEN = re.compile(
    r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<![^>]*>|</[^>]*>"
    r"|(?P<head><(?P<name>[^\s/>]+)(?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*)\s*(?P<empty>/?)>",
    re.DOTALL,
)


def enable_events(xml: str, mode: Mode) -> tuple[str, bool]:
    """Turn migration events on for every VFIO device; return (new XML, changed).

    Idempotent: when every device already emits events (in either mode) the input comes back
    unchanged with False. Raises NothingToDo for a domain without VFIO device, DomainXMLError for a
    setting that turns the events off or targets them with `-set`, and, in override mode, for a
    hostdev alias that is not a user alias or a derived alias another device already uses.
    """
    if mode not in ("override", "global"):
        raise BadInput(f"unknown events mode {mode!r}", hint="use 'override' or 'global'")
    document = _Document(xml)
    conflicts = _conflicts(document.root)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise DomainXMLError(
            f"{conflicts[0]}{more}: it conflicts with turning VFIO migration events on",
            hint="remove it from the domain XML (virsh edit) and retry",
        )
    status = read_status(document.root)
    if not status.devices and not status.commandline_devices:
        raise NothingToDo(
            "domain has no VFIO device",
            hint="only VFIO PCI or mdev hostdevs and vfio-pci devices in <qemu:commandline> emit events",
        )
    if status.all_enabled:
        return xml, False
    if mode == "global":
        _add_global(document)
    else:
        _add_overrides(document, status)
    return document.result(), True


def disable_events(xml: str) -> tuple[str, bool]:
    """Remove what `enable_events` adds (see the module docstring); return (new XML, changed)."""
    document = _Document(xml)
    root = document.root
    doomed: set[etree._Element] = {
        prop for _, prop in override_properties(root) if property_value(prop) is True
    }
    for option, value, elements in commandline_options(root):
        if option == "-global" and _is_events_global(value, frozenset({"vfio-pci"}), want=True):
            doomed.update(elements)
    if not doomed:
        return xml, False
    grown = True
    while grown:
        parents = {node.getparent() for node in doomed}
        emptied = {
            parent
            for parent in parents
            if parent is not None
            and parent is not root
            and parent not in doomed
            and _in_qemu_namespace(parent)
            and all(child in doomed for child in parent)
        }
        doomed |= emptied
        grown = bool(emptied)
    dropped_devices = {node.get("alias") for node in doomed if node.tag == f"{_Q}device"}
    for element, device in vfio_hostdevs(root):
        alias = element.find("alias")
        if alias is not None and device.alias == _derived_alias(device) and device.alias in dropped_devices:
            doomed.add(alias)
    for node in doomed:
        if not any(ancestor in doomed for ancestor in node.iterancestors()):
            document.remove(node)
    if not _uses_qemu_namespace(root, doomed):
        document.undeclare_qemu_namespace()
    return document.result(), True


def destination_xml(migratable_xml: str, mode: Mode = "global") -> str:
    """The XML for the destination (VIR_MIGRATE_PARAM_DEST_XML and PERSIST_XML), events on.

    `migratable_xml` is the source's VIR_DOMAIN_XML_MIGRATABLE description. It comes back
    unchanged when the events are already on or the domain has no VFIO device. Global mode is the
    default: a running domain's migratable XML carries libvirt's own aliases (``hostdev0``), which
    override mode cannot address.
    """
    try:
        new_xml, _ = enable_events(migratable_xml, mode)
    except NothingToDo:
        return migratable_xml
    return new_xml


def unified_diff(before: str, after: str, name: str) -> str:
    """A unified diff of two XML texts, for --dry-run; empty when they are equal."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"a/{name}",
        tofile=f"b/{name}",
    )
    return "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines
    )


# --- what an edit must respect ---------------------------------------------------------------


def _is_element(node: etree._Element) -> bool:
    return isinstance(node.tag, str)


def _in_qemu_namespace(node: etree._Element) -> bool:
    return _is_element(node) and node.tag.startswith(_Q)


def _derived_alias(device: VfioDevice) -> str | None:
    """The stable user alias for a device without one: from its PCI address or mdev UUID."""
    if device.host_address is None:
        return None
    if device.kind == "mdev":
        return f"{_USER_ALIAS_PREFIX}vfio-mdev-{device.host_address.lower()}"
    return f"{_USER_ALIAS_PREFIX}vfio-{re.sub(r'[:.]', '-', device.host_address)}"


def _is_events_global(value: str, drivers: frozenset[str], *, want: bool) -> bool:
    """Whether a -global value sets migration-events of one of `drivers` to `want` (or, for
    want=False, to anything but true)."""
    driver, prop, setting = global_setting(value)
    if driver not in drivers or prop != EVENTS_PROPERTY:
        return False
    return qemu_bool(setting) is True if want else qemu_bool(setting) is not True


def _conflicts(root: etree._Element) -> list[str]:
    """Every setting that keeps the events off or that QEMU rejects, described for the user."""
    found = []
    for alias, prop in override_properties(root):
        if property_value(prop) is not True:
            setting = "type='remove'" if prop.get("type") == "remove" else f"value='{prop.get('value')}'"
            found.append(f"<qemu:override> sets {EVENTS_PROPERTY} {setting} for device '{alias}'")
    for option, value, _ in commandline_options(root):
        if option == "-global" and _is_events_global(value, VFIO_DRIVERS, want=False):
            found.append(f"<qemu:commandline> has '-global {value}'")
        elif option == "-set" and value.startswith("device.") and f".{EVENTS_PROPERTY}=" in value:
            found.append(f"<qemu:commandline> has '-set {value}', which QEMU rejects with JSON -device")
        elif option == "-device":
            properties = device_properties(value)
            if (
                properties.get("driver") in VFIO_DRIVERS
                and EVENTS_PROPERTY in properties
                and qemu_bool(properties[EVENTS_PROPERTY]) is not True
            ):
                found.append(f"<qemu:commandline> has '-device {value}' with {EVENTS_PROPERTY} off")
    # An option left without its value would take the first argument added after it as its value.
    commandline = root.find(f"{_Q}commandline")  # the first one: where `-global` goes
    args = commandline.findall(f"{_Q}arg") if commandline is not None else []
    last = args[-1].get("value", "") if args else ""
    if (last[1:] if last.startswith("--") else last) in ("-global", "-set", "-device"):
        found.append(f"<qemu:commandline> ends with '{last}' without its value")
    return found


def _aliases_in_use(root: etree._Element) -> set[str]:
    """Device aliases and command-line device ids: QEMU ids a new alias must not reuse."""
    taken = {alias.get("name", "") for alias in root.iterfind(".//alias")}
    for option, value, _ in commandline_options(root):
        if option == "-device":
            taken.add(device_properties(value).get("id", ""))
    return taken


def _uses_qemu_namespace(root: etree._Element, removed: set[etree._Element]) -> bool:
    for node in root.iter():
        if not _is_element(node) or node in removed or any(a in removed for a in node.iterancestors()):
            continue
        if node.tag.startswith(_Q) or any(str(key).startswith(_Q) for key in node.attrib):
            return True
    return False


def _describe(device: VfioDevice) -> str:
    return f"VFIO {device.kind} device {device.host_address or '(no source address)'}"


# --- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _New:
    """An element to insert; `qemu` ones get the QEMU namespace prefix."""

    tag: str
    attrs: tuple[tuple[str, str], ...] = ()
    children: tuple[_New, ...] = ()
    qemu: bool = True


def _property_element() -> _New:
    return _New("property", (("name", EVENTS_PROPERTY), ("type", "bool"), ("value", "true")))


def _frontend_element() -> _New:
    return _New("frontend", children=(_property_element(),))


def _device_element(alias: str) -> _New:
    return _New("device", (("alias", alias),), (_frontend_element(),))


def _global_args() -> tuple[_New, _New]:
    return _New("arg", (("value", "-global"),)), _New("arg", (("value", GLOBAL_EVENTS_ON),))


def _add_global(document: _Document) -> None:
    root = document.root
    commandline = root.find(f"{_Q}commandline")
    if commandline is not None:
        args = commandline.findall(f"{_Q}arg")
        if args:
            document.insert_after(args[-1], _global_args(), commandline.prefix)
        else:
            document.prepend(commandline, _global_args(), commandline.prefix)
        return
    block = _New("commandline", children=_global_args())
    follower = next((child for child in root if child.tag in _AFTER_COMMANDLINE), None)
    prefix = document.root_qemu_prefix()
    if follower is None:
        document.append(root, [block], prefix)
    else:
        document.insert_before(follower, [block], prefix)


def _add_overrides(document: _Document, status: EventsStatus) -> None:
    root = document.root
    unreachable = [d for d in status.commandline_devices if not status.device_enabled(d)]
    if unreachable:
        raise DomainXMLError(
            f"vfio-pci device '{unreachable[0].alias or unreachable[0].host_address}' is declared in "
            "<qemu:commandline>, which <qemu:override> cannot reach",
            hint="use global mode",
        )
    taken = _aliases_in_use(root)
    targets = []
    for element, device in vfio_hostdevs(root):
        if status.device_enabled(device):
            continue
        alias = device.alias
        if alias is None and element.find("alias") is not None:
            raise DomainXMLError(
                f"{_describe(device)} has an <alias> without a name",
                hint="give it <alias name='ua-...'/>, or use global mode",
            )
        if alias is None:
            alias = _derived_alias(device)
            if alias is None:
                raise DomainXMLError(
                    f"{_describe(device)} has no source address to derive an alias from",
                    hint="give it an <alias name='ua-...'/>, or use global mode",
                )
            if alias in taken:
                raise DomainXMLError(
                    f"the alias '{alias}' derived for {_describe(device)} is already used by another device",
                    hint="give the hostdev its own <alias name='ua-...'/>, or use global mode",
                )
            taken.add(alias)
            follower = next((child for child in element if child.tag in _AFTER_ALIAS), None)
            new_alias = _New("alias", (("name", alias),), qemu=False)
            if follower is None:
                document.append(element, [new_alias], None)
            else:
                document.insert_before(follower, [new_alias], None)
        elif not alias.startswith(_USER_ALIAS_PREFIX):
            raise DomainXMLError(
                f"{_describe(device)} has alias '{alias}', not a user alias (those start with 'ua-')",
                hint="rename it 'ua-...', or use global mode (a running domain's XML has libvirt's aliases)",
            )
        targets.append(alias)
    override = root.find(f"{_Q}override")
    if override is None:
        block = _New("override", children=tuple(_device_element(alias) for alias in targets))
        document.append(root, [block], document.root_qemu_prefix())
        return
    new_devices = []
    for alias in targets:
        existing = next(
            (d for d in root.iterfind(f"{_Q}override/{_Q}device") if d.get("alias") == alias), None
        )
        if existing is None:
            new_devices.append(_device_element(alias))
            continue
        frontend = existing.find(f"{_Q}frontend")
        if frontend is None:
            document.append(existing, [_frontend_element()], existing.prefix)
        else:
            document.append(frontend, [_property_element()], frontend.prefix)
    if new_devices:
        document.append(override, new_devices, override.prefix)


@dataclass
class _Span:
    """Where a node sits in the text: [start, end), its start tag ends at head_end."""

    start: int
    end: int
    head_end: int
    attrs_end: int  # after the last attribute of the start tag
    inner_end: int  # where the end tag starts (head_end for an empty-element tag)
    self_closing: bool
    name: str  # the qualified tag name, '' for comments and processing instructions


def _locate(text: str, nodes: Sequence[etree._Element]) -> dict[etree._Element, _Span]:
    """Map each node of the tree (root.iter() order) to its span in the text."""
    found: list[_Span] = []
    open_elements: list[_Span] = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        if match.group("head") is not None:
            span = _Span(
                start=match.start(),
                end=match.end(),
                head_end=match.end(),
                attrs_end=match.start() + len(match.group("head")),
                inner_end=match.end(),
                self_closing=bool(match.group("empty")),
                name=match.group("name"),
            )
            found.append(span)
            if not span.self_closing:
                open_elements.append(span)
        elif token.startswith("</"):
            span = open_elements.pop()
            span.inner_end, span.end = match.start(), match.end()
        elif token.startswith(("<!--", "<?")):
            end = match.end()
            found.append(_Span(match.start(), end, end, end, end, True, ""))
    # The XML declaration and whatever precedes the root element are not in root.iter().
    first = next(index for index, span in enumerate(found) if span.name)
    located = found[first : first + len(nodes)]
    if len(located) != len(nodes):
        raise DomainXMLError("cannot map the domain XML text to its tree", hint="please report this XML")
    spans = {}
    for node, span in zip(nodes, located, strict=True):
        expected = etree.QName(node).localname if _is_element(node) else ""
        if span.name.rpartition(":")[2] != expected:
            raise DomainXMLError("cannot map the domain XML text to its tree", hint="please report this XML")
        spans[node] = span
    return spans


class _Document:
    """Domain XML text, its tree, where each node sits in the text, and pending text edits."""

    def __init__(self, xml: str) -> None:
        self.text = xml
        self.root = parse_domain(xml)
        self._nodes = list(self.root.iter())  # keeps lxml's proxies alive, so they stay dict keys
        self._spans = _locate(xml, self._nodes)
        self._edits: list[tuple[int, int, str]] = []
        self.newline = "\r\n" if "\r\n" in xml else "\n"
        root_head = xml[self._spans[self.root].start : self._spans[self.root].head_end]
        quote = re.search(r"=\s*([\"'])", root_head)
        self.quote = quote.group(1) if quote else "'"
        self.unit = self._indent_unit()

    def _indent_unit(self) -> str:
        root_indent = self.indent(self.root) or ""
        for child in self.root:
            child_indent = self.indent(child)
            if (
                child_indent is not None
                and child_indent.startswith(root_indent)
                and child_indent != root_indent
            ):
                return child_indent[len(root_indent) :]
        return "  "

    def indent(self, node: etree._Element) -> str | None:
        """The whitespace before node on its line; None when something else precedes it there."""
        start = self._spans[node].start
        prefix = self.text[self.text.rfind("\n", 0, start) + 1 : start]
        return None if prefix.strip() else prefix

    def _lead(self, indent: str | None) -> str:
        return "" if indent is None else self.newline + indent

    def _render(self, block: _New, prefix: str | None, indent: str | None) -> str:
        name = f"{prefix}:{block.tag}" if block.qemu and prefix else block.tag
        attrs = "".join(f" {key}={self._quoted(value)}" for key, value in block.attrs)
        if not block.children:
            return f"<{name}{attrs}/>"
        inner = None if indent is None else indent + self.unit
        body = "".join(self._lead(inner) + self._render(child, prefix, inner) for child in block.children)
        return f"<{name}{attrs}>{body}{self._lead(indent)}</{name}>"

    def _quoted(self, value: str) -> str:
        escaped = value.replace("&", "&amp;").replace("<", "&lt;").replace(self.quote, _ENTITIES[self.quote])
        return f"{self.quote}{escaped}{self.quote}"

    def _insert(self, position: int, indent: str | None, blocks: Sequence[_New], prefix: str | None) -> None:
        text = "".join(self._lead(indent) + self._render(block, prefix, indent) for block in blocks)
        self._edits.append((position, position, text))

    def insert_after(self, node: etree._Element, blocks: Sequence[_New], prefix: str | None) -> None:
        """Insert blocks as the next siblings of node, on their own lines at node's indentation."""
        self._insert(self._spans[node].end, self.indent(node), blocks, prefix)

    def insert_before(self, node: etree._Element, blocks: Sequence[_New], prefix: str | None) -> None:
        """Insert blocks as the previous siblings of node, above the comments that lead to it."""
        previous = node.getprevious()
        while previous is not None and isinstance(previous, etree._Comment):
            node, previous = previous, previous.getprevious()
        if previous is not None:
            self._insert(self._spans[previous].end, self.indent(node), blocks, prefix)
            return
        parent = node.getparent()
        assert parent is not None  # the root is never a follower
        self._insert(self._spans[parent].head_end, self.indent(node), blocks, prefix)

    def prepend(self, parent: etree._Element, blocks: Sequence[_New], prefix: str | None) -> None:
        """Insert blocks as the first children of parent."""
        children = list(parent)
        if children:
            self.insert_before(children[0], blocks, prefix)
        else:
            self.append(parent, blocks, prefix)

    def append(self, parent: etree._Element, blocks: Sequence[_New], prefix: str | None) -> None:
        """Insert blocks as the last children of parent, opening it up if it is empty."""
        children = list(parent)
        if children:
            self.insert_after(children[-1], blocks, prefix)
            return
        span = self._spans[parent]
        outer = self.indent(parent)
        inner = None if outer is None else outer + self.unit
        body = "".join(self._lead(inner) + self._render(block, prefix, inner) for block in blocks)
        body += self._lead(outer)
        if span.self_closing:
            head = self.text[span.start : span.attrs_end]
            self._edits.append((span.start, span.end, f"{head}>{body}</{span.name}>"))
        elif self.text[span.head_end : span.inner_end].strip():
            self._edits.append((span.inner_end, span.inner_end, body))
        else:
            self._edits.append((span.head_end, span.inner_end, body))

    def remove(self, node: etree._Element) -> None:
        """Remove node and the line break and indentation that lead to it."""
        span = self._spans[node]
        previous = node.getprevious()
        parent = node.getparent()
        assert parent is not None  # the root is never removed
        floor = self._spans[previous].end if previous is not None else self._spans[parent].head_end
        gap = self.text[floor : span.start]
        start = span.start
        if not gap.strip() and self.newline in gap:
            start = floor + gap.rindex(self.newline)
        self._edits.append((start, span.end, ""))

    def root_qemu_prefix(self) -> str | None:
        """The root's prefix for the QEMU namespace, declaring ``xmlns:qemu`` when it has none."""
        for prefix, uri in self.root.nsmap.items():
            if uri == QEMU_NS:
                return prefix
        if "qemu" in self.root.nsmap:
            raise DomainXMLError(
                "the prefix 'qemu' is bound to another namespace on <domain>",
                hint="rename that prefix, or declare xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'",
            )
        position = self._spans[self.root].attrs_end
        self._edits.append((position, position, f" xmlns:qemu={self._quoted(QEMU_NS)}"))
        return "qemu"

    def undeclare_qemu_namespace(self) -> None:
        """Remove the root's declaration of the QEMU namespace."""
        span = self._spans[self.root]
        head = self.text[span.start : span.head_end]
        for prefix, uri in self.root.nsmap.items():
            if uri != QEMU_NS:
                continue
            attribute = "xmlns" if prefix is None else f"xmlns:{prefix}"
            match = re.search(rf"\s+{re.escape(attribute)}\s*=\s*([\"']){re.escape(QEMU_NS)}\1", head)
            if match is not None:
                self._edits.append((span.start + match.start(), span.start + match.end(), ""))

    def result(self) -> str:
        """The text with every edit applied; edits at one position keep their order."""
        text = self.text
        ordered = sorted(enumerate(self._edits), key=lambda item: (item[1][0], item[0]), reverse=True)
        for _, (start, end, replacement) in ordered:
            text = text[:start] + replacement + text[end:]
        parse(text)  # an edit must never produce XML libvirt would refuse
        return text
