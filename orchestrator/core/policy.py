"""Migration policies: TOML files validated into typed, immutable objects.

Pure: reads files and text, never libvirt. Every error is one line naming the file, the key path and
what was expected, so that a user can fix a policy from what the CLI prints. `policies/default.toml`
documents every key.

A policy names commands that run with the orchestrator's privileges (root), so it is treated as code:
a policy file, and every directory on the way to it, must be owned by root (or by the invoking user
when not root) and not writable by group or others, as sudo and sshd require of their files; the
file must be a regular file of at most 1 MiB; and anything that would only fail later (a NUL byte, an
argument too long for the kernel, a value libvirt or QEMU rejects) is refused when it is loaded.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import TypeGuard, TypeVar
from urllib.parse import urlsplit

from orchestrator.core.errors import BadInput
from orchestrator.core.hooks import PLACEHOLDERS, Hook, OnFailure, Trigger
from orchestrator.edges import trust

SYSTEM_POLICY_DIR = Path("/etc/orchestrator/policies")
SHIPPED_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
# Searched in this order for a policy given by name; ORCH_POLICY_DIR, when set, comes first.
DEFAULT_POLICY_DIRS: tuple[Path, ...] = (SYSTEM_POLICY_DIR, SHIPPED_POLICY_DIR)
POLICY_DIR_ENV = "ORCH_POLICY_DIR"
DEFAULT_POLICY_NAME = "default"

MAX_HOOK_TIMEOUT_MS = 600_000
MAX_HOOK_RETRIES = 10
DATA_URI_SCHEMES = ("tcp", "rdma", "unix")
MAX_DOWNTIME_MS = 2_000_000  # QEMU caps downtime-limit at 2000 s
# libvirt's QEMU_DOMAIN_MIG_BANDWIDTH_MAX (qemu_domain.h) on 64-bit hosts: INT64_MAX / (1024 * 1024) MiB/s.
MAX_BANDWIDTH_MIB = (2**63 - 1) // (1024 * 1024)
MAX_DURATION_S = 7 * 24 * 3600  # completion and stall timeouts, step times: a week is more than any migration
MAX_ARGV_ELEMENTS = 256
MAX_ARG_BYTES = 4096
MAX_POLICY_BYTES = 1024 * 1024  # a policy file larger than this is refused unread
MAX_NESTING = 32  # levels of arrays and tables; a real policy uses 4
MAX_MESSAGE_CHARS = 300
# An armed hook serves every device of the VM: these come on its stdin, per event, not in its argv.
PER_DEVICE_PLACEHOLDERS: tuple[str, ...] = ("device_id", "qom_path", "state")
_INT64 = range(-(2**63), 2**63)

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# `{{` and `}}` are literal braces, `{name}` a placeholder, any other brace is unbalanced.
_PLACEHOLDER_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_TOML_POSITION = re.compile(
    r"^(?P<what>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$", re.DOTALL
)
_RETRIED_TRIGGERS = (Trigger.BEFORE, Trigger.AFTER_SUCCESS, Trigger.AFTER_FAILURE)
_ARMED_TRIGGERS = (Trigger.DRAIN, Trigger.UNDRAIN)
# Control characters (C0, DEL, C1), the Unicode line and paragraph separators and the bidirectional
# controls, escaped in messages so that a message stays on one line and cannot drive the terminal.
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    **{
        code: f"\\u{code:04x}"
        for code in (0x061C, 0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A))
    },
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def _plain(number: float) -> str:
    """A number as a person writes it: 2000000, not 2e+06; 0.5 as 0.5."""
    return str(int(number)) if float(number).is_integer() else f"{number:.6g}"


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS, keep_end: float = 1 / 3) -> str:
    """`text` on one line (control characters escaped), cut in the middle to `limit` characters, keeping
    `keep_end` of them from its end."""
    text = text.translate(_ESCAPES)
    if len(text) <= limit:
        return text
    tail = int(limit * keep_end)
    return f"{text[: limit - tail - 3]}...{text[len(text) - tail :]}"


class PolicyError(BadInput):
    """A policy that cannot be found, parsed or used: `<file>: <where>: <problem>; <remedy>`, one line
    of at most MAX_MESSAGE_CHARS; when cut, the remedy (up to two thirds of it) is kept whole."""

    def __init__(self, source: str, where: str, problem: str, remedy: str) -> None:
        remedy = one_line(remedy, MAX_MESSAGE_CHARS * 2 // 3)
        head = one_line(f"{source}: {where}: {problem}", MAX_MESSAGE_CHARS - len(remedy) - 2, 1 / 2)
        super().__init__(f"{head}; {remedy}")
        self.source = source
        # a key path such as `hooks.drain[0].timeout_ms`, or a position in the file
        self.where = one_line(where)


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

    def overridden(
        self,
        *,
        p2p: bool | None = None,
        persist: bool | None = None,
        undefine_source: bool | None = None,
        data_uri: str | None = None,
        bandwidth_mib: int | None = None,
        max_downtime_ms: int | None = None,
        completion_timeout_s: float | None = None,
        compressed: bool | None = None,
        auto_converge: bool | None = None,
    ) -> MigrationSettings:
        """These settings with the command line's options applied (None: keep the policy's), checked
        against the same limits as a policy file, each error one line naming the option."""
        changes: dict[str, object] = {}
        if p2p is not None:
            changes["mode"] = MigrationMode.P2P if p2p else MigrationMode.DIRECT
        if data_uri is not None:
            if not _data_uri_is_valid(data_uri):
                raise BadInput(
                    f"--migrateuri {data_uri!r} is not a migration URI",
                    "give tcp://HOST[:PORT], rdma://HOST[:PORT] or unix:///PATH",
                )
            changes["data_uri"] = data_uri
        numbers: tuple[tuple[str, str, float | None, float, float], ...] = (
            ("bandwidth_mib", "--bandwidth", bandwidth_mib, 0, MAX_BANDWIDTH_MIB),
            ("max_downtime_ms", "--max-downtime", max_downtime_ms, 1, MAX_DOWNTIME_MS),
            ("completion_timeout_s", "--timeout", completion_timeout_s, 0.001, MAX_DURATION_S),
        )
        for field, option, value, low, high in numbers:
            if value is None:
                continue
            if not low <= value <= high:
                raise BadInput(
                    f"{option} must be between {_plain(low)} and {_plain(high)}, not {_plain(value)}",
                    f"fix {option}",
                )
            changes[field] = value
        for field, flag in (
            ("persist", persist),
            ("undefine_source", undefine_source),
            ("compressed", compressed),
            ("auto_converge", auto_converge),
        ):
            if flag is not None:
                changes[field] = flag
        return replace(self, **changes)  # type: ignore[arg-type]


class DrainMode(StrEnum):
    """When the drain hooks run, relative to the switchover."""

    PREPARE = "prepare"  # drain on the device's pre-copy-p2p-prepare event (late fallback on QEMU < 11.0)
    GATED = "gated"  # hold the switchover (downtime limit at its floor), drain, then release it
    START = "start"  # drain before the migration job starts


@dataclass(frozen=True)
class DowntimeStep:
    """One step of the convergence schedule."""

    downtime_ms: int  # the downtime QEMU may use from this step on
    after_s: float | None = None  # this step applies after this many seconds of the job ...
    after_iterations: int | None = None  # ... or after this many memory passes, whichever comes first


@dataclass(frozen=True)
class Switchover:
    """How the switchover is reached: when to drain, and the downtime allowed over time."""

    drain: DrainMode = DrainMode.PREPARE
    # The convergence schedule; empty = one step at migration.max_downtime_ms (or QEMU's 300 ms).
    steps: tuple[DowntimeStep, ...] = ()
    stall_timeout_s: float | None = None  # abort when the remaining data has not shrunk for this long


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
    switchover: Switchover = Switchover()

    def hooks_for(self, trigger: Trigger) -> tuple[Hook, ...]:
        """The hooks run on `trigger`, in file order."""
        return self.hooks.get(trigger, ())

    def all_hooks(self) -> tuple[Hook, ...]:
        """Every hook, grouped by trigger in Trigger order (for pre-flight checks and plans)."""
        return tuple(hook for trigger in Trigger for hook in self.hooks_for(trigger))


_TOP_KEYS = ("description", "devices", "migration", "switchover", "events", "hooks")
_DEVICE_KEYS = tuple(field.name for field in fields(DeviceSelector))
_MIGRATION_KEYS = tuple(field.name for field in fields(MigrationSettings))
_SWITCHOVER_KEYS = tuple(field.name for field in fields(Switchover))
_STEP_KEYS = tuple(field.name for field in fields(DowntimeStep))
_EVENTS_KEYS = ("when_off",)
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
    """Problems with the `{placeholders}` of an argv, one sentence each; empty when all are known.

    Stands in for `orchestrator.core.hooks.check_placeholders` until the hook runner provides it.
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
    )


# --- Files: who may have written them, and reading them safely -------------------------------------


def _untrusted(error: trust.Untrusted) -> PolicyError:
    return PolicyError(
        str(error.path), error.kind, f"{error.problem}, unsafe for a policy", f"fix: {error.fix}"
    )


def _walk(path: Path) -> tuple[Path, os.stat_result]:
    """trust.walk, its refusal as a PolicyError."""
    try:
        return trust.walk(path)
    except trust.Untrusted as error:
        raise _untrusted(error) from None


def _check_trust(path: Path, status: os.stat_result) -> None:
    """Refuse `path` when someone other than root (or you) could change it: the error names it and the fix."""
    try:
        trust.check(path, status)
    except trust.Untrusted as error:
        raise _untrusted(error) from None


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read_trusted(source: str, path: Path) -> bytes:
    """The bytes of the policy file at `path`, after the checks of `_walk` and of the file itself."""
    real, status = _walk(path)
    if not stat.S_ISREG(status.st_mode):
        raise PolicyError(
            source,
            "file",
            f"not a regular file ({_file_kind(status.st_mode)})",
            "expected a policy TOML file",
        )
    # O_NONBLOCK: should the file be swapped for a FIFO after the check, opening it cannot hang.
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino) or not stat.S_ISREG(
            opened.st_mode
        ):
            raise PolicyError(source, "file", "changed while it was read", "expected a policy file at rest")
        _check_trust(real, opened)
        too_big = PolicyError(
            source, "file", "larger than 1 MiB", f"expected a policy of at most {MAX_POLICY_BYTES} bytes"
        )
        if opened.st_size > MAX_POLICY_BYTES:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_POLICY_BYTES:
            chunk = os.read(fd, MAX_POLICY_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_POLICY_BYTES:  # it grew since fstat
            raise too_big
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file, refusing one that someone other than root (or you) could change."""
    source = str(path)
    try:
        data = _read_trusted(source, path)
        text = data.decode("utf-8")
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
    except ValueError:  # a NUL in the path
        raise PolicyError(source, "file", "a NUL character in the path", "expected a file path") from None
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


def _check_directory(directory: Path) -> bool:
    """Whether `directory` exists; raises PolicyError when it, or a directory on the way to it, could be
    changed by someone other than root (or you)."""
    try:
        real, status = _walk(directory)
    except (OSError, ValueError):
        return False
    if not stat.S_ISDIR(status.st_mode):
        return False
    _check_trust(real, status)
    return True


def resolve_policy(name_or_path: str | None = None, dirs: Sequence[Path] | None = None) -> Policy:
    """The policy for `--policy`: None means "default"; a value with "/" or ending in .toml is a path;
    anything else is a name looked up as `<dir>/<name>.toml` in `dirs` (default: `policy_dirs()`).

    Every directory searched up to the one holding the policy must be trusted as the file is."""
    value = DEFAULT_POLICY_NAME if name_or_path is None else name_or_path
    if "/" in value or value.endswith(".toml"):
        return load_policy(Path(value))
    searched = policy_dirs() if dirs is None else tuple(dirs)
    if value and "\0" not in value:
        for directory in searched:
            path = directory / f"{value}.toml"
            if _check_directory(directory) and (path.exists() or path.is_symlink()):
                return load_policy(path)
    choices = ", ".join(available_policies(searched)) or "(none)"
    raise PolicyError(
        value or repr(value),  # an empty name shows as ''
        "policy name",
        f"not found in {', '.join(str(directory) for directory in searched)}",
        f"expected one of {choices}, or the path of a .toml file",
    )
