"""Migration policies: TOML files validated into typed, immutable objects.

Pure: reads files and text, never libvirt. Every error is one line naming the file, the key path and
what was expected, so that a user can fix a policy from what the CLI prints. `policies/default.toml`
documents every key.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import TypeGuard, TypeVar
from urllib.parse import urlsplit

from orchestrator.errors import BadInput
from orchestrator.hooks import PLACEHOLDERS, Hook, OnFailure, Trigger

SYSTEM_POLICY_DIR = Path("/etc/orchestrator/policies")
SHIPPED_POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
# Searched in this order for a policy given by name; ORCH_POLICY_DIR, when set, comes first.
DEFAULT_POLICY_DIRS: tuple[Path, ...] = (SYSTEM_POLICY_DIR, SHIPPED_POLICY_DIR)
POLICY_DIR_ENV = "ORCH_POLICY_DIR"
DEFAULT_POLICY_NAME = "default"

MAX_HOOK_TIMEOUT_MS = 600_000
MAX_HOOK_RETRIES = 10
DATA_URI_SCHEMES = ("tcp", "rdma", "unix")

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# `{{` and `}}` are literal braces, `{name}` a placeholder, any other brace is unbalanced.
_PLACEHOLDER_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_TOML_POSITION = re.compile(
    r"^(?P<what>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$", re.DOTALL
)
_RETRIED_TRIGGERS = (Trigger.BEFORE, Trigger.AFTER_SUCCESS, Trigger.AFTER_FAILURE)


class PolicyError(BadInput):
    """A policy that cannot be found, parsed or used: `<file>: <where>: <problem>; <remedy>`."""

    def __init__(self, source: str, where: str, problem: str, remedy: str) -> None:
        super().__init__(f"{source}: {where}: {problem}; {remedy}")
        self.source = source
        self.where = where  # a key path such as `hooks.drain[0].timeout_ms`, or a position in the file


class MigrationMode(StrEnum):
    """Who drives the migration."""

    P2P = "p2p"  # the source libvirtd talks to the destination libvirtd
    DIRECT = "direct"  # this process drives both sides (client-driven migrate3)


class TimeoutAction(StrEnum):
    """What happens when the completion timeout expires; post-copy is refused because VFIO forbids it."""

    ABORT = "abort"


class WhenEventsOff(StrEnum):
    """What to do when a covered device of the running VM does not emit migration events."""

    REFUSE = "refuse"  # stop before migrating, and say how to turn the events on
    PROCEED = "proceed"  # migrate without device hooks


@dataclass(frozen=True)
class DeviceSelector:
    """Which VFIO devices a policy covers, by device id (libvirt alias = QEMU id) and host PCI address."""

    match: tuple[str, ...] = ("*",)  # fnmatch globs on the device id
    pci: tuple[str, ...] = ()  # lowercase host PCI addresses; empty = any

    def covers(self, device_id: str, pci_address: str | None = None) -> bool:
        """Whether the device is covered; a device with no known address passes only an empty pci filter."""
        if not any(fnmatchcase(device_id, glob) for glob in self.match):
            return False
        if not self.pci:
            return True
        return pci_address is not None and pci_address.lower() in self.pci


@dataclass(frozen=True)
class MigrationSettings:
    """How to migrate; None means libvirt's or QEMU's own default."""

    mode: MigrationMode = MigrationMode.P2P
    persist: bool = True  # define the VM on the destination
    undefine_source: bool = True  # undefine it on the source after success
    bandwidth_mib: int = 0  # MiB/s, 0 = unlimited
    data_uri: str | None = None
    max_downtime_ms: int | None = None
    completion_timeout_s: float | None = None
    timeout_action: TimeoutAction = TimeoutAction.ABORT
    compressed: bool = False
    auto_converge: bool = False


@dataclass(frozen=True)
class Policy:
    """A validated policy: the devices it covers, how to migrate, and the hooks to run."""

    name: str
    path: Path | None  # None when parsed from text
    devices: DeviceSelector
    migration: MigrationSettings
    when_events_off: WhenEventsOff
    hooks: Mapping[Trigger, tuple[Hook, ...]]  # every trigger present, in Trigger order
    description: str = ""

    def hooks_for(self, trigger: Trigger) -> tuple[Hook, ...]:
        """The hooks run on `trigger`, in file order."""
        return self.hooks.get(trigger, ())

    def all_hooks(self) -> tuple[Hook, ...]:
        """Every hook, grouped by trigger in Trigger order (for pre-flight checks and plans)."""
        return tuple(hook for trigger in Trigger for hook in self.hooks_for(trigger))


_TOP_KEYS = ("description", "devices", "migration", "events", "hooks")
_DEVICE_KEYS = tuple(field.name for field in fields(DeviceSelector))
_MIGRATION_KEYS = tuple(field.name for field in fields(MigrationSettings))
_EVENTS_KEYS = ("when_off",)
_HOOK_KEYS = ("argv", "timeout_ms", "on_failure", "retries", "backoff_ms", "name")
_DEFAULT_MIGRATION = MigrationSettings()
_DEFAULT_DEVICES = DeviceSelector()

_Choice = TypeVar("_Choice", bound=StrEnum)


def _expected(source: str, key: str, problem: str, expected: str) -> PolicyError:
    return PolicyError(source, key, problem, f"expected {expected}")


def _show(value: object) -> str:
    """A value as the user wrote it, shortened, for `got ...`."""
    if isinstance(value, dict):
        return "a table"
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML's true is not 1


@dataclass(frozen=True)
class _Table:
    """A TOML table under validation, with the file and key path that error messages name."""

    source: str
    path: str
    values: Mapping[str, object]

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def invalid(self, name: str, value: object, expected: str) -> PolicyError:
        return _expected(self.source, self.key(name), f"got {_show(value)}", expected)

    def allow_only(self, allowed: Sequence[str]) -> None:
        for name in self.values:
            if name not in allowed:
                raise _expected(self.source, self.key(name), "unknown key", f"one of {', '.join(allowed)}")

    def table(self, name: str) -> _Table:
        value = self.values.get(name, {})
        if not isinstance(value, dict):
            raise self.invalid(name, value, f"a table, written [{self.key(name)}]")
        return _Table(self.source, self.key(name), value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.values.get(name, default)
        if not isinstance(value, bool):
            raise self.invalid(name, value, "true or false")
        return value

    def integer(
        self, name: str, default: int, expected: str, minimum: int, maximum: int | None = None
    ) -> int:
        value = self.values.get(name, default)
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            raise self.invalid(name, value, expected)
        return value

    def seconds(self, name: str, expected: str) -> float:
        value = self.values.get(name, 0)
        if not (_is_int(value) or isinstance(value, float)) or value < 0 or not math.isfinite(value):
            raise self.invalid(name, value, expected)
        return float(value)

    def string(self, name: str, default: str, expected: str = "a string") -> str:
        value = self.values.get(name, default)
        if not isinstance(value, str):
            raise self.invalid(name, value, expected)
        return value

    def choice(self, name: str, kind: type[_Choice], default: _Choice, why: str = "") -> _Choice:
        value = self.values.get(name, default.value)
        if isinstance(value, str) and value in {member.value for member in kind}:
            return kind(value)
        options = [f'"{member.value}"' for member in kind]
        expected = options[0] if len(options) == 1 else f"one of {', '.join(options)}"
        raise self.invalid(name, value, expected + why)

    def strings(self, name: str, default: tuple[str, ...], expected: str, *, non_empty: bool) -> list[str]:
        """A list of non-empty strings; `expected` describes one element."""
        value = self.values.get(name, list(default))
        if not isinstance(value, list) or (non_empty and not value):
            qualifier = "a non-empty" if non_empty else "a"
            raise self.invalid(name, value, f"{qualifier} list of strings, each {expected}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.invalid(f"{name}[{index}]", item, expected)
        return value


def _check_placeholders(argv: Sequence[str]) -> list[str]:
    """Problems with the `{placeholders}` of an argv, one sentence each; empty when all are known.

    Stands in for `orchestrator.hooks.check_placeholders` until the hook runner provides it.
    """
    problems = []
    for arg in argv:
        for token in _PLACEHOLDER_TOKEN.finditer(arg):
            if token[0] in ("{{", "}}"):
                continue
            if token[1] is None:
                problems.append(f'unbalanced "{token[0]}" in {_show(arg)}')
            elif token[1] not in PLACEHOLDERS:
                problems.append(f"unknown placeholder {token[0]} in {_show(arg)}")
    return problems


def _argv(table: _Table) -> tuple[str, ...]:
    if "argv" not in table.values:
        raise _expected(
            table.source,
            table.key("argv"),
            "missing",
            "a non-empty list of strings: the program and its arguments (no shell)",
        )
    argv = table.strings(
        "argv", (), "a non-empty string (no shell: one argument per element)", non_empty=True
    )
    program = argv[0]
    if "{" in program or "}" in program or ("/" in program and not program.startswith("/")):
        raise table.invalid(
            "argv[0]",
            program,
            "a program: an absolute path or a name looked up in PATH, without placeholders",
        )
    problems = _check_placeholders(argv)
    if problems:
        known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
        raise _expected(
            table.source,
            table.key("argv"),
            ", ".join(problems),
            f"placeholders among {known}, and {{{{ or }}}} for a literal brace",
        )
    return tuple(argv)


def _hook(table: _Table, trigger: Trigger) -> Hook:
    table.allow_only(_HOOK_KEYS)
    argv = _argv(table)
    retries = table.integer(
        "retries",
        Hook.retries,
        f"an integer of extra attempts from 0 to {MAX_HOOK_RETRIES}",
        0,
        MAX_HOOK_RETRIES,
    )
    if retries and trigger not in _RETRIED_TRIGGERS:
        raise table.invalid(
            "retries", retries, f"0: {trigger} hooks are never retried (only before and after-*)"
        )
    return Hook(
        trigger=trigger,
        argv=argv,
        timeout_ms=table.integer(
            "timeout_ms",
            Hook.timeout_ms,
            f"an integer of milliseconds > 0 (at most {MAX_HOOK_TIMEOUT_MS})",
            1,
            MAX_HOOK_TIMEOUT_MS,
        ),
        on_failure=table.choice("on_failure", OnFailure, Hook.on_failure),
        retries=retries,
        backoff_ms=table.integer(
            "backoff_ms",
            Hook.backoff_ms,
            f"an integer of milliseconds >= 0 (at most {MAX_HOOK_TIMEOUT_MS})",
            0,
            MAX_HOOK_TIMEOUT_MS,
        ),
        name=table.string("name", Hook.name),
    )


def _hooks(top: _Table) -> Mapping[Trigger, tuple[Hook, ...]]:
    table = top.table("hooks")
    table.allow_only([trigger.value for trigger in Trigger])
    hooks: dict[Trigger, tuple[Hook, ...]] = {}
    for trigger in Trigger:
        entries = table.values.get(trigger.value, [])
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise table.invalid(
                trigger.value, entries, f"an array of tables, one [[{table.key(trigger.value)}]] per hook"
            )
        hooks[trigger] = tuple(
            _hook(_Table(top.source, table.key(f"{trigger.value}[{index}]"), entry), trigger)
            for index, entry in enumerate(entries)
        )
    return MappingProxyType(hooks)


def _devices(top: _Table) -> DeviceSelector:
    table = top.table("devices")
    table.allow_only(_DEVICE_KEYS)
    match = table.strings(
        "match", _DEFAULT_DEVICES.match, 'a non-empty device-id glob such as "*"', non_empty=True
    )
    expected_pci = 'a host PCI address such as "0000:3b:00.1"'
    addresses = table.strings("pci", _DEFAULT_DEVICES.pci, expected_pci, non_empty=False)
    for index, address in enumerate(addresses):
        if not _PCI_ADDRESS.match(address.lower()):
            raise table.invalid(f"pci[{index}]", address, expected_pci)
    return DeviceSelector(match=tuple(match), pci=tuple(address.lower() for address in addresses))


def _data_uri_is_valid(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
        _ = parts.port  # raises ValueError on a port that is not a number
    except ValueError:
        return False
    if parts.scheme == "unix":
        return not parts.netloc and parts.path.startswith("/")
    return parts.scheme in DATA_URI_SCHEMES and bool(parts.hostname)


def _migration(top: _Table) -> MigrationSettings:
    table = top.table("migration")
    table.allow_only(_MIGRATION_KEYS)
    data_uri = table.string("data_uri", "", 'a migration URI, or "" for libvirt\'s default')
    if data_uri and not _data_uri_is_valid(data_uri):
        raise table.invalid(
            "data_uri",
            data_uri,
            '"tcp://HOST[:PORT]", "rdma://HOST[:PORT]", "unix:///PATH", or "" for libvirt\'s default',
        )
    defaults = _DEFAULT_MIGRATION
    return MigrationSettings(
        mode=table.choice("mode", MigrationMode, defaults.mode),
        persist=table.boolean("persist", defaults.persist),
        undefine_source=table.boolean("undefine_source", defaults.undefine_source),
        bandwidth_mib=table.integer(
            "bandwidth_mib", defaults.bandwidth_mib, "an integer of MiB/s >= 0 (0 = unlimited)", 0
        ),
        data_uri=data_uri or None,
        max_downtime_ms=table.integer(
            "max_downtime_ms", 0, "an integer of milliseconds >= 0 (0 = the libvirt/QEMU default)", 0
        )
        or None,
        completion_timeout_s=table.seconds(
            "completion_timeout_s", "a number of seconds >= 0 (0 = no timeout)"
        )
        or None,
        timeout_action=table.choice(
            "timeout_action",
            TimeoutAction,
            defaults.timeout_action,
            " (post-copy is refused for VMs with VFIO devices: VFIO forbids it)",
        ),
        compressed=table.boolean("compressed", defaults.compressed),
        auto_converge=table.boolean("auto_converge", defaults.auto_converge),
    )


def _when_events_off(top: _Table) -> WhenEventsOff:
    table = top.table("events")
    table.allow_only(_EVENTS_KEYS)
    return table.choice("when_off", WhenEventsOff, WhenEventsOff.REFUSE)


def _syntax_error(source: str, error: tomllib.TOMLDecodeError) -> PolicyError:
    text = str(error)
    position = _TOML_POSITION.match(text)
    if position is None:
        return PolicyError(source, "TOML", text, "fix the TOML syntax")
    if position["line"] is None:
        where = "end of file"
    else:
        where = f"line {position['line']}, column {position['column']}"
    return PolicyError(source, where, position["what"], "fix the TOML syntax")


def parse_policy(text: str, source: str) -> Policy:
    """Validate a policy's TOML text; `source` names it in errors, and its stem is the policy's name."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _syntax_error(source, error) from None
    top = _Table(source, "", document)
    top.allow_only(_TOP_KEYS)
    return Policy(
        name=Path(source).stem,
        path=None,
        devices=_devices(top),
        migration=_migration(top),
        when_events_off=_when_events_off(top),
        hooks=_hooks(top),
        description=top.string("description", ""),
    )


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file."""
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PolicyError(
            source,
            "file",
            "not found",
            'expected the path of an existing policy file, or a policy name such as "default"',
        ) from None
    except OSError as error:
        raise PolicyError(
            source, "file", f"cannot read it ({error.strerror})", "expected a readable file"
        ) from None
    except UnicodeDecodeError as error:
        raise PolicyError(
            source, f"byte {error.start}", "not UTF-8 text", "expected a UTF-8 TOML file"
        ) from None
    return replace(parse_policy(text, source), path=path.absolute())


def policy_dirs() -> tuple[Path, ...]:
    """Where policy names are looked up, in order: $ORCH_POLICY_DIR if set, then DEFAULT_POLICY_DIRS."""
    override = os.environ.get(POLICY_DIR_ENV)
    return (Path(override), *DEFAULT_POLICY_DIRS) if override else DEFAULT_POLICY_DIRS


def available_policies(dirs: Iterable[Path] | None = None) -> Mapping[str, Path]:
    """Policy names and the file each resolves to; a name in an earlier directory hides later ones."""
    found: dict[str, Path] = {}
    for directory in policy_dirs() if dirs is None else dirs:
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def resolve_policy(name_or_path: str | None = None, dirs: Sequence[Path] | None = None) -> Policy:
    """The policy for `--policy`: None means "default"; a value with "/" or ending in .toml is a path;
    anything else is a name looked up as `<dir>/<name>.toml` in `dirs` (default: `policy_dirs()`)."""
    value = DEFAULT_POLICY_NAME if name_or_path is None else name_or_path
    if "/" in value or value.endswith(".toml"):
        return load_policy(Path(value))
    searched = policy_dirs() if dirs is None else tuple(dirs)
    names = available_policies(searched)
    if value in names:
        return load_policy(names[value])
    choices = ", ".join(names) or "(none)"
    raise PolicyError(
        value or repr(value),  # an empty name shows as ''
        "policy name",
        f"not found in {', '.join(str(directory) for directory in searched)}",
        f"expected one of {choices}, or the path of a .toml file",
    )
