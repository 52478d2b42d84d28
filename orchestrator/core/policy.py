"""Migration policies as typed, immutable objects: the devices a policy covers, how to migrate, how the
switchover is reached, and the hooks to run.

Pure. A policy's TOML text is validated into these by orchestrator.core.policy_toml; policy files are
found, trust-checked and read by orchestrator.edges.policy_files. `policies/default.toml` documents
every key. Every error is a `PolicyError`: one line naming the file, the key path and what was
expected, so that a user can fix a policy from what the CLI prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.core.errors import BadInput
from orchestrator.core.hooks import Hook, Trigger

DATA_URI_SCHEMES = ("tcp", "rdma", "unix")
MAX_DOWNTIME_MS = 2_000_000  # QEMU caps downtime-limit at 2000 s
# libvirt's QEMU_DOMAIN_MIG_BANDWIDTH_MAX (qemu_domain.h) on 64-bit hosts: INT64_MAX / (1024 * 1024) MiB/s.
MAX_BANDWIDTH_MIB = (2**63 - 1) // (1024 * 1024)
MAX_DURATION_S = 7 * 24 * 3600  # completion and stall timeouts, step times: a week is more than any migration

MAX_MESSAGE_CHARS = 300
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
            if not data_uri_is_valid(data_uri):
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


class GroupBy(StrEnum):
    """Where an evacuation finds its switchover groups, besides the policy's own `[[evacuate.groups]]`."""

    NONE = "none"  # nowhere else
    METADATA = "metadata"  # each domain's label in its <metadata> (orchestrator.core.domxml.GROUP_NS)


@dataclass(frozen=True)
class EvacuationGroup:
    """A switchover group of an evacuation, named by the policy: the running VMs matching `include`."""

    name: str
    include: tuple[str, ...]  # fnmatch globs on domain names (case-sensitive)

    def matches(self, domain: str) -> bool:
        """Whether the VM belongs to this group."""
        return any(fnmatchcase(domain, glob) for glob in self.include)


@dataclass(frozen=True)
class EvacuateSettings:
    """How `orchestrator evacuate` keeps VMs together: each group moves as one switchover group."""

    group_by: GroupBy = GroupBy.NONE
    groups: tuple[EvacuationGroup, ...] = ()  # in file order: a VM goes with the first that matches


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
    evacuate: EvacuateSettings = EvacuateSettings()

    def hooks_for(self, trigger: Trigger) -> tuple[Hook, ...]:
        """The hooks run on `trigger`, in file order."""
        return self.hooks.get(trigger, ())

    def all_hooks(self) -> tuple[Hook, ...]:
        """Every hook, grouped by trigger in Trigger order (for pre-flight checks and plans)."""
        return tuple(hook for trigger in Trigger for hook in self.hooks_for(trigger))


def data_uri_is_valid(uri: str) -> bool:
    """Whether `uri` is a migration data URI: tcp://HOST[:PORT], rdma://HOST[:PORT] or unix:///PATH."""
    try:
        parts = urlsplit(uri)
        _ = parts.port  # raises ValueError on a port that is not a number
    except ValueError:
        return False
    if parts.scheme == "unix":
        return not parts.netloc and parts.path.startswith("/")
    return parts.scheme in DATA_URI_SCHEMES and bool(parts.hostname)
