"""An evacuation's plan, pure: which VMs move (`select`) and where each goes (`place`: biggest first,
each to the destination with the most free memory that fits it, which spreads the load). Which of them
move together is `orchestrator.flows.evacuation_groups`'s.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A VM to move."""

    name: str
    memory_mib: int
    running: bool = True  # False: a persistent inactive VM, moved by definition only


@dataclass(frozen=True)
class Target:
    """A destination and its free memory."""

    uri: str
    free_mib: int


@dataclass(frozen=True)
class Placement:
    """One VM's destination, and why."""

    domain: str
    destination: str
    memory_mib: int
    order: int
    reason: str
    running: bool = True
    group: str | None = None  # the switchover group it moves with


@dataclass(frozen=True)
class Unplaced:
    """A VM that fits nowhere, and why."""

    domain: str
    memory_mib: int
    reason: str


@dataclass(frozen=True)
class Plan:
    """The placement of every selected VM."""

    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...]


def select(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """The names matching any include glob (all if none) and no exclude glob."""
    chosen = [n for n in names if not include or any(fnmatch.fnmatchcase(n, g) for g in include)]
    return [n for n in chosen if not any(fnmatch.fnmatchcase(n, g) for g in exclude)]


def place(candidates: Sequence[Candidate], targets: Sequence[Target], reserve_mib: int = 0) -> Plan:
    """Biggest first, each to the target with the most free memory that still fits it."""
    free = {t.uri: t.free_mib - reserve_mib for t in targets}
    placements: list[Placement] = []
    unplaced: list[Unplaced] = []
    ordered = sorted(candidates, key=lambda c: (not c.running, -c.memory_mib, c.name))
    for candidate in ordered:
        # A definition-only move needs no memory now; it still goes where the most is free.
        need = candidate.memory_mib if candidate.running else 0
        fitting = [uri for uri in free if free[uri] >= need]
        if not fitting:
            best = max(free.values(), default=0)
            where = "no destination is reachable" if not free else f"the most free is {best} MiB"
            unplaced.append(Unplaced(candidate.name, candidate.memory_mib, f"needs {need} MiB; {where}"))
            continue
        uri = max(fitting, key=lambda u: (free[u], -list(free).index(u)))
        reason = f"most free memory that fits: {free[uri]} MiB free, needs {need} MiB"
        free[uri] -= need
        placements.append(
            Placement(
                candidate.name, uri, candidate.memory_mib, len(placements) + 1, reason, candidate.running
            )
        )
    return Plan(tuple(placements), tuple(unplaced))
