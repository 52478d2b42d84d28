"""Errors users see, and the stable exit codes the CLI maps them to.

Every failure a user can cause or meet is an `OrchestratorError`: one line saying what is wrong
(`message`) and what to do about it (`hint`), and the exit code Ansible and scripts rely on.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Stable exit codes; documented in the README. Never renumber."""

    OK = 0
    ERROR = 1  # an unexpected internal error (a bug): please report it
    BAD_INPUT = 2  # usage, unknown domain, malformed policy or XML, missing hook binary
    CONNECT = 3  # cannot connect to a libvirt URI
    MIGRATION_FAILED = 4  # migration failed or aborted; the VM runs on the source, workloads undrained
    HOOK_FAILED = 5  # a hook with on_failure=abort failed; nothing left drained
    NOTHING_TO_DO = 6  # no VFIO device to act on, or nothing to move
    ENVIRONMENT = 7  # this machine cannot do it: not root, packages missing, lab host failed to start
    PARTIAL = 8  # evacuation finished but the host is not empty
    NEEDS_ADMIN = 9  # the orchestrator could not restore everything (an undrain hook failed, ...)
    INTERRUPTED = 130  # Ctrl-C or SIGTERM, after cleaning up


def shell_uri(uri: str) -> str:
    """A URI single-quoted for a hint the user pastes into a shell (`?`, `&` are common in URIs):
    every hint naming a virsh or orchestrator command writes its URI as `-c 'URI'`."""
    return "'" + uri.replace("'", "'\\''") + "'"


class OrchestratorError(Exception):
    """A failure with a one-line explanation, a hint and an exit code."""

    code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: str = "", code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def line(self) -> str:
        """The single line shown to the user."""
        return f"{self.message}; {self.hint}" if self.hint else self.message


class BadInput(OrchestratorError):
    """The user's input is wrong: fix it and retry."""

    code = ExitCode.BAD_INPUT


class ConnectError(OrchestratorError):
    """A libvirt connection could not be made or was lost."""

    code = ExitCode.CONNECT


class EnvironmentProblem(OrchestratorError):
    """This machine cannot do what was asked (permissions, packages, daemons)."""

    code = ExitCode.ENVIRONMENT


class NothingToDo(OrchestratorError):
    """There is nothing to act on (no VFIO device, nothing to move)."""

    code = ExitCode.NOTHING_TO_DO


class MigrationError(OrchestratorError):
    """libvirt reported the migration failed (the VM stays on the source)."""

    code = ExitCode.MIGRATION_FAILED
