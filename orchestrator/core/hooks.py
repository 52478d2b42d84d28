"""Hooks as a policy defines them and as a run reports them: pure, no process is started here.

The types (`Trigger`, `OnFailure`, `PLACEHOLDERS`, `Hook`) are the contract shared with the policy
(orchestrator.core.policy); `fill_argv` and `hook_values_env` give a hook's argv and environment for a
run; `HookResult` is what one run did. Running hooks is orchestrator.edges.hook_runner's.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum


class Trigger(StrEnum):
    """When a hook runs."""

    BEFORE = "before"  # on the source host, before anything starts; failure aborts cleanly
    DRAIN = "drain"  # per device, on pre-copy-p2p-prepare (or the earliest P2P state on old QEMU)
    UNDRAIN = "undrain"  # per device, once the device runs again (destination or source)
    AFTER_SUCCESS = "after-success"
    AFTER_FAILURE = "after-failure"
    # A switchover group's (orchestrator migrate-group): once for the whole group, beside the devices'.
    GROUP_DRAIN = "group-drain"  # when every member would switch over; the release waits for it
    GROUP_UNDRAIN = "group-undrain"  # when every member's devices run again (after the group drain ended)


class OnFailure(StrEnum):
    """What a failing hook does to the migration."""

    ABORT = "abort"
    CONTINUE = "continue"


# Placeholders a hook's argv may use; each is also exported as ORCH_<NAME> in the hook's environment.
PLACEHOLDERS: tuple[str, ...] = (
    "domain",
    "device_id",
    "qom_path",
    "state",
    "migration_id",
    "source",
    "destination",
    "group",  # a switchover group's name ("" outside a group)
    "group_id",
    "members",  # the group's VMs, comma-separated
    "devices",  # a group hook's: every member's devices, as DOMAIN/DEVICE, comma-separated
)


@dataclass(frozen=True)
class Hook:
    """One command to run on a trigger."""

    trigger: Trigger
    argv: tuple[str, ...]
    timeout_ms: int = 5000
    on_failure: OnFailure = OnFailure.ABORT
    retries: int = 0  # extra attempts; only for before/after-* hooks
    backoff_ms: int = 200  # first retry delay, doubled each time
    name: str = ""  # for reports; defaults to the program's base name
    armed: bool = False  # started with the migration, woken via stdin at the event; drain/undrain only

    @property
    def label(self) -> str:
        """A short name for tables and the journal."""
        return self.name or self.argv[0].rsplit("/", 1)[-1]


# Retries and backoff apply only to these; drain/undrain hooks run once, right now, under their deadline.
RETRIED_TRIGGERS: frozenset[Trigger] = frozenset(
    {Trigger.BEFORE, Trigger.AFTER_SUCCESS, Trigger.AFTER_FAILURE}
)

_KNOWN = frozenset(PLACEHOLDERS)
_FORMATTER = string.Formatter()


def _fields(arg: str) -> Iterable[tuple[str, str | None]]:
    """Split one argument into (literal text, placeholder name or None) pairs.

    `str.format`'s parser handles `{{`/`}}` and reports unmatched braces (ValueError); a format spec or
    conversion is folded into the name, so `{domain:>9}` or `{domain!r}` is an unknown placeholder.
    """
    for literal, field, spec, conversion in _FORMATTER.parse(arg):
        if field is None:
            yield literal, None
            continue
        name = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
        yield literal, name


def check_placeholders(argv: Sequence[str]) -> list[str]:
    """Return the unknown placeholder names in `argv`, each once, in order of appearance.

    Raises ValueError for an argument with an unmatched brace.
    """
    unknown: list[str] = []
    for arg in argv:
        try:
            names = [name for _, name in _fields(arg) if name is not None]
        except ValueError as exc:
            raise ValueError(f"argument {arg!r}: {exc} (write {{{{ or }}}} for a literal brace)") from None
        unknown += [name for name in names if name not in _KNOWN and name not in unknown]
    return unknown


def fill_argv(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Replace `{name}` placeholders in each argument with `values[name]`, as plain text.

    Only names in PLACEHOLDERS are allowed; `{{` and `}}` are literal braces. Values are inserted
    verbatim: never formatted, never expanded again, never seen by a shell. Raises ValueError naming
    an unknown placeholder, a placeholder without a value, or an unmatched brace.
    """
    filled: list[str] = []
    for arg in argv:
        if "{" not in arg and "}" not in arg:
            filled.append(arg)  # the common case: no parsing
            continue
        parts: list[str] = []
        try:
            for literal, name in _fields(arg):
                parts.append(literal)
                if name is None:
                    continue
                if name not in _KNOWN:
                    raise ValueError(f"unknown placeholder {{{name}}}; known: {', '.join(PLACEHOLDERS)}")
                if name not in values:
                    raise ValueError(f"no value for placeholder {{{name}}} here")
                parts.append(values[name])
        except ValueError as exc:
            raise ValueError(f"argument {arg!r}: {exc}") from None
        filled.append("".join(parts))
    return filled


def hook_values_env(values: Mapping[str, str]) -> dict[str, str]:
    """ORCH_<NAME> for every placeholder value: what a hook gets in its environment besides ours (the
    supervisor's, with PATH as `supervisor.hook_path`). Keys of `values` that are not placeholders are
    not exported."""
    return {f"ORCH_{name.upper()}": value for name, value in values.items() if name in _KNOWN}


@dataclass
class HookResult:
    """What one run of one hook did: the record the journal keeps and reports show."""

    label: str
    trigger: Trigger
    device_id: str | None
    argv: list[str]
    attempt: int  # 1 for the first run; retries count up
    started: float  # epoch seconds, taken immediately before the spawn
    start_monotonic: float  # the same instant on the monotonic clock, to order against other events
    pid: int | None  # None if the program could not be started
    ended: float = 0.0
    duration_ms: float = 0.0
    exit_code: int | None = None  # None if it never started or was killed by a signal
    timed_out: bool = False
    error: str | None = None  # None when the hook exited with status 0 in time
    output_tail: str = ""  # the last OUTPUT_TAIL_BYTES of stdout and stderr together
    # The supervisor's run: its start and end are in the run log already (None: the orchestrator's own
    # result, an armed hook's answer, which the migration records itself).
    run: str | None = None
    arming: bool = False  # an armed hook's own process (its start, or an unclean exit), not an action

    @property
    def ok(self) -> bool:
        """True if the hook ran, exited with status 0, and did so before its deadline."""
        return self.error is None and self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict[str, object]:
        """The result as one JSON object."""
        record = asdict(self)
        record["trigger"] = self.trigger.value
        record["ok"] = self.ok
        return record
