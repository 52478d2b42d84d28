"""The ports a migration uses: the journal it writes, the hook runner it starts hooks with.

Protocols only (and `NullJournal`, the journal that keeps nothing): the driver
(`orchestrator.flows.migration`) is written against these, so that its tests run it on fakes. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from orchestrator.core.actions import Notice
from orchestrator.core.hooks import Hook, HookResult


class RunLogLike(Protocol):
    """A migration's open run log (orchestrator.edges.runlog.RunLog): what the hook supervisor needs."""

    @property
    def fd(self) -> int:
        """Its file descriptor, handed to the hook supervisor that records into it."""


class JournalLike(Protocol):
    """What a migration writes to the journal (orchestrator.edges.journal.Journal, or NullJournal)."""

    def begin_migration(
        self,
        id: str,
        kind: str,
        domain: str,
        source_uri: str,
        destination_uri: str,
        policy: str,
        started: float,
        parent: str | None = None,
        *,
        drain_mode: str = ...,
        policy_text: str | None = ...,
        policy_sha256: str | None = ...,
        supervisor: int | None = ...,
    ) -> None:
        """Record that a migration started (its run log, room reserved: EnvironmentProblem if not)."""

    def run_log(self, migration_id: str) -> RunLogLike | None:
        """The migration's open run log (the hook supervisor records into it), if it has one."""

    def record_phase(self, migration_id: str, phase: str, at: float) -> None:
        """Record a phase change."""

    def record_event(
        self,
        migration_id: str,
        host: str,
        role: str | None,
        kind: str,
        name: str,
        device_id: str | None,
        state: str | None,
        qemu_time: float | None,
        received: float,
        data: object = ...,
    ) -> None:
        """Record an event or a note."""

    def record_device_action(
        self, migration_id: str, device_id: str, action: str, status: str, at: float, detail: str | None = ...
    ) -> str | None:
        """Record a drain or undrain starting (durable before it returns) or ending; why it could not
        be written, if it could not."""

    def record_hook(self, migration_id: str, result: Mapping[str, Any]) -> None:
        """Record one hook run."""

    def finish_migration(
        self,
        id: str,
        outcome: str,
        changed: bool | None,
        error: str | None,
        exit_code: int | None,
        ended: float,
        summary: Mapping[str, object] | None = ...,
    ) -> None:
        """Record how a migration ended."""

    @property
    def failures(self) -> list[str]:
        """Every record that could not be written or imported, one line each."""


class Started(Protocol):
    """A hook just asked for (orchestrator.edges.hook_runner.SupervisedRun)."""

    def wait(self) -> HookResult:
        """Until it has ended; its result."""


class Armed(Protocol):
    """An armed hook (orchestrator.edges.armed_hook.ArmedHook): started with the migration, woken per
    event."""

    def wait_ready(self) -> HookResult:
        """Until it is ready (or failed to be); the arming's result."""

    def fire(
        self,
        device_id: str,
        state: str,
        qemu_time: float | None,
        on_done: Callable[[HookResult], None] | None,
    ) -> object:
        """Act for one device now; `on_done` gets the result."""

    def close(self) -> HookResult | None:
        """The migration is over; a result only if it did not exit cleanly."""


class Hooks(Protocol):
    """What a migration needs of the hook runner (orchestrator.edges.hook_runner.HookRunner, or a fake)."""

    def attach(self, log: str, fd: int) -> None:
        """Record every hook started from now on in the run log `log` (open as `fd`)."""

    def detach(self) -> None:
        """The run is over (its run log is closed once its hooks have ended)."""

    @property
    def supervisor_pid(self) -> int | None:
        """The hook supervisor's process, written in the run log (None: hooks are not run by one)."""

    def start(
        self,
        hook: Hook,
        values: Mapping[str, str],
        device_id: str | None = None,
        on_done: Callable[[HookResult], None] | None = None,
        *,
        index: int | None = None,
    ) -> Started:
        """Start one hook now; `on_done` gets its result. `index`: its place among its trigger's hooks."""

    def run(self, hook: Hook, values: Mapping[str, str], device_id: str | None = None) -> HookResult:
        """Run one hook to its end (with its retries)."""

    def arm(self, hook: Hook, values: Mapping[str, str]) -> Armed:
        """Start an armed hook."""


class GroupLink(Protocol):
    """A group member's line to its switchover group (orchestrator.flows.group)."""

    names: tuple[str, str, str]  # the group's name, id and members (comma-separated): placeholders

    def arrive(self) -> bool:
        """The member is ready to start its job: wait until the group lets it (True) or gives up
        (False: the group aborted it)."""

    def tell(self, notice: Notice, detail: str) -> None:
        """What the member's machine tells the group (never called with the member's lock held)."""


class NullJournal:
    """No journal (a dry run, or a caller that keeps none): every record is dropped."""

    def begin_migration(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def record_phase(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def run_log(self, migration_id: str) -> RunLogLike | None:
        """None: no run log."""
        return None

    def record_device_action(self, *args: Any, **kwargs: Any) -> str | None:
        """Dropped."""
        return None

    def record_hook(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    def finish_migration(self, *args: Any, **kwargs: Any) -> None:
        """Dropped."""

    @property
    def failures(self) -> list[str]:
        """Nothing was written, so nothing failed."""
        return []
