"""Switchover groups in an evacuation: which VMs move together, and when a group may start. Pure.

Each running VM has at most one group: its own label (`<metadata>`, orchestrator.core.domxml.GROUP_NS)
when the evacuation groups by metadata, else the first of the policy's `[[evacuate.groups]]` matching
its name. After placement, `group_placements` turns the plan into the queue's units: a VM alone, or a
group's members (each to its own destination). A group with a member that fits nowhere stays whole on
the source; a label only one VM has is no group: that VM moves alone. `next_unit` picks what starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from orchestrator.core.policy import EvacuationGroup
from orchestrator.flows.evacuation_plan import Placement, Plan, Unplaced


@dataclass(frozen=True)
class Unit:
    """One item of the evacuation's queue: one VM alone (`group` None), or a switchover group."""

    members: tuple[Placement, ...]
    group: str | None = None


@dataclass(frozen=True)
class Grouping:
    """The plan as units, in plan order (a group where its first member is)."""

    units: tuple[Unit, ...]
    plan: Plan  # each placement with its group; a group that cannot move whole among the unplaced
    notes: tuple[str, ...] = ()


def assign_labels(
    names: Sequence[str], own: Mapping[str, str], groups: Sequence[EvacuationGroup]
) -> tuple[dict[str, str], list[str]]:
    """Each running VM's group: its own label (`own`) first, else the first policy group matching it;
    and a note for each VM that more than one would have."""
    labels: dict[str, str] = {}
    notes: list[str] = []
    for name in names:
        matching = [group.name for group in groups if group.matches(name)]
        label = own.get(name) or (matching[0] if matching else None)
        if label is None:
            continue
        labels[name] = label
        others = [group for group in matching if group != label]
        if others:
            why = "its own label" if name in own else "the first of the policy's groups matching it"
            notes.append(f"{name}: goes with group {label} ({why}), not with {', '.join(others)}")
    return labels, notes


def group_placements(plan: Plan, labels: Mapping[str, str]) -> Grouping:
    """The queue's units from the plan: running VMs sharing a label (`labels`, by domain) form a group."""
    members: dict[str, list[Placement]] = {}
    for placement in plan.placements:
        label = labels.get(placement.domain) if placement.running else None
        if label is not None:
            members.setdefault(label, []).append(replace(placement, group=label))
    units: list[Unit] = []
    unplaced = list(plan.unplaced)
    notes: list[str] = []
    for placement in plan.placements:
        label = labels.get(placement.domain) if placement.running else None
        if label is None:
            units.append(Unit((placement,)))
            continue
        missing = sorted(u.domain for u in plan.unplaced if labels.get(u.domain) == label)
        if missing:
            why = f"its group {label} cannot move whole: {', '.join(missing)} fit(s) nowhere"
            unplaced.append(Unplaced(placement.domain, placement.memory_mib, why))
        elif len(members[label]) == 1:
            notes.append(f"{placement.domain}: the only VM of group {label} here: moves alone")
            units.append(Unit((placement,)))
        elif placement.domain == members[label][0].domain:
            units.append(Unit(tuple(members[label]), label))
            names = ", ".join(member.domain for member in members[label])
            notes.append(f"group {label}: {names} move as one switchover group (gated); never retried")
    placed = [member for unit in units for member in unit.members]
    return Grouping(
        tuple(units), Plan(tuple(sorted(placed, key=lambda p: p.order)), tuple(unplaced)), tuple(notes)
    )


def next_unit(
    queue: Sequence[Unit],
    running: int,
    incoming: Mapping[str, int],
    concurrency: int,
    per_destination: int,
) -> Unit | None:
    """The first unit of `queue` the limits let start now, `running` VMs moving (a group counts each
    member), `incoming` of them per destination. A VM alone needs a free slot and room at its
    destination (later units may pass it). A group needs a free slot per member, or, larger than
    `concurrency`, nothing else running; it ignores `per_destination` (its members count towards it
    for the others), and nothing after it passes it while it waits."""
    free = concurrency - running
    for unit in queue:
        if unit.group is None:
            if free >= 1 and incoming.get(unit.members[0].destination, 0) < per_destination:
                return unit
            continue
        size = len(unit.members)
        return unit if size <= free or (size > concurrency and running == 0) else None
    return None
