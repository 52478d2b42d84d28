"""The `orchestrator` program's first lines: what must happen before anything else is imported.

A command that may run hooks (migrate, migrate-group, evacuate, recover) forks its hook supervisor
here, while the process is small and has no thread (orchestrator.edges.supervisor): the supervisor is
then a copy of a bare interpreter, not of one that loaded Typer and libvirt. Then the CLI.
"""

from __future__ import annotations

import sys
from typing import NoReturn

HOOK_COMMANDS = frozenset({"migrate", "migrate-group", "evacuate", "recover"})
_NO_HOOKS = frozenset({"--dry-run", "-h", "--help"})  # what runs no hook (and needs no supervisor)


def main() -> NoReturn:
    """Fork the hook supervisor when the command may run hooks, then run the CLI (`program.entry`)."""
    args = sys.argv[1:]
    if args and args[0] in HOOK_COMMANDS and not _NO_HOOKS.intersection(args):
        from orchestrator.edges import supervisor

        supervisor.shared()
    from orchestrator.commands.program import entry

    entry()
