"""A policy's TOML text validated into a `Policy` (orchestrator.core.policy): pure, no file is read.

Every error is one line naming the file, the key path and what was expected, so that a user can fix a
policy from what the CLI prints. A policy names commands that run with the orchestrator's privileges,
so anything that would only fail later (a NUL byte, an argument too long for the kernel, a value
libvirt or QEMU rejects) is refused here.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TypeGuard, TypeVar

from orchestrator.core.hooks import PLACEHOLDERS, RETRIED_TRIGGERS, Hook, OnFailure, Trigger
from orchestrator.core.policy import (
    MAX_BANDWIDTH_MIB,
    MAX_DOWNTIME_MS,
    MAX_DURATION_S,
    DeviceSelector,
    DowntimeStep,
    DrainMode,
    EvacuateSettings,
    EvacuationGroup,
    GroupBy,
    MigrationMode,
    MigrationSettings,
    Policy,
    PolicyError,
    Switchover,
    TimeoutAction,
    WhenEventsOff,
    data_uri_is_valid,
)

MAX_HOOK_TIMEOUT_MS = 600_000
MAX_HOOK_RETRIES = 10
MAX_ARGV_ELEMENTS = 256
MAX_ARG_BYTES = 4096
MAX_NESTING = 32  # levels of arrays and tables; a real policy uses 4
# An armed hook serves every device of the VM: these come on its stdin, per event, not in its argv.
PER_DEVICE_PLACEHOLDERS: tuple[str, ...] = ("device_id", "qom_path", "state")
_INT64 = range(-(2**63), 2**63)

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# `{{` and `}}` are literal braces, `{name}` a placeholder, any other brace is unbalanced.
_PLACEHOLDER_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_TOML_POSITION = re.compile(
    r"^(?P<what>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$", re.DOTALL
)
_ARMED_TRIGGERS = (Trigger.DRAIN, Trigger.UNDRAIN)

_TOP_KEYS = ("description", "devices", "migration", "switchover", "events", "hooks", "evacuate")
_DEVICE_KEYS = tuple(field.name for field in fields(DeviceSelector))
_MIGRATION_KEYS = tuple(field.name for field in fields(MigrationSettings))
_SWITCHOVER_KEYS = tuple(field.name for field in fields(Switchover))
_STEP_KEYS = tuple(field.name for field in fields(DowntimeStep))
_EVENTS_KEYS = ("when_off",)
_EVACUATE_KEYS = tuple(field.name for field in fields(EvacuateSettings))
_GROUP_KEYS = tuple(field.name for field in fields(EvacuationGroup))
_HOOK_KEYS = ("argv", "timeout_ms", "on_failure", "retries", "backoff_ms", "name", "armed")
_DEFAULT_MIGRATION = MigrationSettings()
_DEFAULT_DEVICES = DeviceSelector()

_Choice = TypeVar("_Choice", bound=StrEnum)


def _expected(source: str, key: str, problem: str, expected: str) -> PolicyError:
    return PolicyError(source, key, problem, f"expected {expected}")


def _show(value: object) -> str:
    """A value as the user wrote it, shortened, for `got ...`."""
    if isinstance(value, dict):
        return "a table"
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (ValueError, RecursionError):  # an integer of thousands of digits, a deep nesting
        return "a value too large to show"
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

    def seconds(self, name: str, expected: str, maximum: float = MAX_DURATION_S) -> float:
        value = self.values.get(name, 0)
        if not (_is_int(value) or isinstance(value, float)) or not 0 <= value <= maximum:  # NaN fails too
            raise self.invalid(name, value, expected)
        return float(value)

    def array_of_tables(self, name: str, each: str) -> list[_Table]:
        """The tables of `[[name]]` blocks, each with its key path `name[index]`; `each` names one."""
        entries = self.values.get(name, [])
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise self.invalid(name, entries, f"an array of tables, one [[{self.key(name)}]] per {each}")
        return [
            _Table(self.source, self.key(f"{name}[{index}]"), entry) for index, entry in enumerate(entries)
        ]

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
    """Problems with the `{placeholders}` of an argv, one sentence each (for a policy file's error line);
    empty when all are known. `core.hooks.check_placeholders` answers the runner's question instead."""
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
    if len(argv) > MAX_ARGV_ELEMENTS:
        raise _expected(
            table.source, table.key("argv"), f"{len(argv)} elements", f"at most {MAX_ARGV_ELEMENTS}"
        )
    for index, arg in enumerate(argv):
        size = len(arg.encode("utf-8", "surrogatepass"))
        if size > MAX_ARG_BYTES:
            raise _expected(
                table.source,
                table.key(f"argv[{index}]"),
                f"{size} bytes",
                f"at most {MAX_ARG_BYTES} bytes per argument",
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


def _armed(table: _Table, trigger: Trigger, argv: Sequence[str]) -> bool:
    armed = table.boolean("armed", Hook.armed)
    if not armed:
        return False
    if trigger not in _ARMED_TRIGGERS:
        raise table.invalid(
            "armed", armed, f"false: {trigger} hooks are never armed (only drain and undrain)"
        )
    for arg in argv:
        for token in _PLACEHOLDER_TOKEN.finditer(arg):
            if token[1] in PER_DEVICE_PLACEHOLDERS:
                per_device = ", ".join(f"{{{name}}}" for name in PER_DEVICE_PLACEHOLDERS)
                raise _expected(
                    table.source,
                    table.key("argv"),
                    f"{token[0]} in {_show(arg)} with armed = true",
                    f"none of {per_device}: an armed hook serves every device of the VM "
                    "and reads them from its stdin",
                )
    return True


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
    if retries and trigger not in RETRIED_TRIGGERS:
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
        armed=_armed(table, trigger, argv),
    )


def _hooks(top: _Table) -> Mapping[Trigger, tuple[Hook, ...]]:
    table = top.table("hooks")
    table.allow_only([trigger.value for trigger in Trigger])
    return MappingProxyType(
        {
            trigger: tuple(_hook(entry, trigger) for entry in table.array_of_tables(trigger.value, "hook"))
            for trigger in Trigger
        }
    )


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


def _migration(top: _Table) -> MigrationSettings:
    table = top.table("migration")
    table.allow_only(_MIGRATION_KEYS)
    data_uri = table.string("data_uri", "", 'a migration URI, or "" for libvirt\'s default')
    if data_uri and not data_uri_is_valid(data_uri):
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
            "bandwidth_mib",
            defaults.bandwidth_mib,
            f"an integer of MiB/s >= 0 (0 = unlimited), at most {MAX_BANDWIDTH_MIB} (libvirt's maximum)",
            0,
            MAX_BANDWIDTH_MIB,
        ),
        data_uri=data_uri or None,
        max_downtime_ms=table.integer(
            "max_downtime_ms",
            0,
            "an integer of milliseconds >= 0 (0 = the libvirt/QEMU default), "
            f"at most {MAX_DOWNTIME_MS} (QEMU's maximum)",
            0,
            MAX_DOWNTIME_MS,
        )
        or None,
        completion_timeout_s=table.seconds(
            "completion_timeout_s",
            f"a number of seconds >= 0 (0 = no timeout), at most {MAX_DURATION_S} (7 days)",
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


def _step(table: _Table, earlier: Sequence[tuple[str, DowntimeStep]], cap: int | None) -> DowntimeStep:
    """One `[[switchover.steps]]` entry, checked against the steps before it (with their key paths)."""
    table.allow_only(_STEP_KEYS)
    expected_downtime = f"an integer of milliseconds from 1 to {MAX_DOWNTIME_MS}"
    if "downtime_ms" not in table.values:
        raise _expected(
            table.source,
            table.key("downtime_ms"),
            "missing",
            f"{expected_downtime}: the downtime QEMU may use from this step on",
        )
    downtime_ms = table.integer("downtime_ms", 0, expected_downtime, 1, MAX_DOWNTIME_MS)
    after_s = (
        table.seconds("after_s", f"a number of seconds of the job >= 0, at most {MAX_DURATION_S} (7 days)")
        if "after_s" in table.values
        else None
    )
    after_iterations = (
        table.integer("after_iterations", 0, "an integer of memory passes >= 1", 1)
        if "after_iterations" in table.values
        else None
    )
    if not earlier:
        for name in ("after_s", "after_iterations"):
            if name in table.values:
                raise table.invalid(
                    name,
                    table.values[name],
                    "no after_s or after_iterations on the first step: it applies from the start "
                    "(or when the gate opens)",
                )
    elif after_s is None and after_iterations is None:
        raise _expected(
            table.source,
            table.path,
            "neither after_s nor after_iterations",
            "at least one of them on every step but the first: when the step applies",
        )
    if cap is not None and downtime_ms > cap:
        raise table.invalid(
            "downtime_ms", downtime_ms, f"at most {cap}, migration.max_downtime_ms, which caps every step"
        )
    if earlier:
        where, previous = earlier[-1]
        if downtime_ms <= previous.downtime_ms:
            raise table.invalid(
                "downtime_ms",
                downtime_ms,
                f"more than {previous.downtime_ms}, {where}.downtime_ms: the downtime rises step by step",
            )
    for name, value in (("after_s", after_s), ("after_iterations", after_iterations)):
        if value is None:
            continue
        for where, step in reversed(earlier):
            before = getattr(step, name)
            if before is None:
                continue
            if value < before:
                raise table.invalid(
                    name,
                    table.values[name],
                    f"at least {_show(before)}, {where}.{name}: steps come in the order they apply",
                )
            break
    return DowntimeStep(downtime_ms=downtime_ms, after_s=after_s, after_iterations=after_iterations)


def _switchover(top: _Table, migration: MigrationSettings) -> Switchover:
    table = top.table("switchover")
    table.allow_only(_SWITCHOVER_KEYS)
    drain = table.choice("drain", DrainMode, DrainMode.PREPARE)
    steps: list[tuple[str, DowntimeStep]] = []
    for entry in table.array_of_tables("steps", "step"):
        steps.append((entry.path, _step(entry, steps, migration.max_downtime_ms)))
    stall_timeout_s = table.seconds(
        "stall_timeout_s", f"a number of seconds >= 0 (0 = never), at most {MAX_DURATION_S} (7 days)"
    )
    return Switchover(
        drain=drain, steps=tuple(step for _, step in steps), stall_timeout_s=stall_timeout_s or None
    )


def _when_events_off(top: _Table) -> WhenEventsOff:
    table = top.table("events")
    table.allow_only(_EVENTS_KEYS)
    return table.choice("when_off", WhenEventsOff, WhenEventsOff.REFUSE)


def _evacuate(top: _Table) -> EvacuateSettings:
    table = top.table("evacuate")
    table.allow_only(_EVACUATE_KEYS)
    groups: list[EvacuationGroup] = []
    for entry in table.array_of_tables("groups", "group"):
        entry.allow_only(_GROUP_KEYS)
        expected_name = "the group's name: a string on one line, without leading, trailing or double spaces"
        expected_include = 'a non-empty list of domain-name globs such as "job1-*": the VMs of the group'
        for key, expected in (("name", expected_name), ("include", expected_include)):
            if key not in entry.values:
                raise _expected(entry.source, entry.key(key), "missing", expected)
        name = entry.string("name", "", expected_name)
        if not name or " ".join(name.split()) != name:  # as a domain's label is read (domxml.group_label)
            raise entry.invalid("name", name, expected_name)
        earlier = next((group for group in groups if group.name == name), None)
        if earlier is not None:
            raise entry.invalid(
                "name", name, f"a name of its own: {table.key('groups')}[{groups.index(earlier)}] has it"
            )
        include = entry.strings("include", (), 'a domain-name glob such as "job1-*"', non_empty=True)
        groups.append(EvacuationGroup(name=name, include=tuple(include)))
    return EvacuateSettings(group_by=table.choice("group_by", GroupBy, GroupBy.NONE), groups=tuple(groups))


def _check_document(source: str, document: Mapping[str, object]) -> None:
    """Refuse, anywhere in the document, what no key accepts and later code would trip on: NUL
    characters (no program can receive them), integers beyond TOML's 64 bits, deep nesting."""
    pending: list[tuple[str, object, int]] = [("", document, 0)]  # a stack, next item last
    while pending:
        where, value, depth = pending.pop()
        if depth > MAX_NESTING:
            raise _expected(
                source, where, "arrays or tables nested too deeply", f"at most {MAX_NESTING} levels"
            )
        if isinstance(value, str) and "\0" in value:
            raise _expected(source, where, f"got {_show(value)}", "text without NUL characters (\\u0000)")
        if _is_int(value) and value not in _INT64:
            raise _expected(source, where, "got an integer beyond 64 bits", "a TOML integer (64-bit)")
        if isinstance(value, dict):
            for key in value:
                if "\0" in key:
                    raise _expected(
                        source, where or "top level", f"key {_show(key)}", "keys without NUL characters"
                    )
            children = [(f"{where}.{key}" if where else key, item) for key, item in value.items()]
        elif isinstance(value, list):
            children = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        else:
            continue
        pending.extend((path, item, depth + 1) for path, item in reversed(children))


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
    except RecursionError:
        raise PolicyError(
            source, "TOML", "arrays or tables nested too deeply", f"expected at most {MAX_NESTING} levels"
        ) from None
    except ValueError as error:  # Python's own limits, e.g. an integer of more than 4300 digits
        problem = "an integer of thousands of digits" if "digits" in str(error) else str(error)
        raise PolicyError(source, "TOML", problem, "expected a TOML integer (64-bit)") from None
    _check_document(source, document)
    top = _Table(source, "", document)
    top.allow_only(_TOP_KEYS)
    migration = _migration(top)
    return Policy(
        name=Path(source).stem,
        path=None,
        devices=_devices(top),
        migration=migration,
        when_events_off=_when_events_off(top),
        hooks=_hooks(top),
        description=top.string("description", ""),
        switchover=_switchover(top, migration),
        evacuate=_evacuate(top),
    )
