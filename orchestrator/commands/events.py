"""`orchestrator events status|enable|disable`: QEMU's VFIO migration events in a domain's definition."""

from __future__ import annotations

import enum
import sys
from typing import Annotated

import typer

from orchestrator.commands.app import ConnectOpt, DomainArg, JsonOpt, events_app
from orchestrator.commands.inputs import source_uri
from orchestrator.commands.render import emit_json, info, table


class EventsMode(enum.StrEnum):
    """`events enable --mode`: how the property gets into the definition."""

    OVERRIDE = "override"
    GLOBAL = "global"


def yes_no(value: bool | None) -> str:
    """A table cell for a tri-state."""
    return "-" if value is None else ("yes" if value else "no")


@events_app.command("status")
def events_status_cmd(
    domain: DomainArg,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One row per VFIO device: events on in the definition and in the running VM, and what QEMU knows."""
    from orchestrator.edges.virt import Host
    from orchestrator.flows import events

    with Host.open(source_uri(connect)) as host:
        report = events.status(host, domain)
    if as_json:
        emit_json(report.to_json())
        return
    sys.stdout.write(
        f"{report.domain} ({report.state}) on {report.uri}\n"
        f"libvirt {report.libvirt_version}, QEMU {report.qemu_version}; modes: {', '.join(report.modes)}\n"
        f"running QEMU knows VFIO_MIGRATION: {yes_no(report.qemu_knows_event)}, "
        f"pre-copy-p2p-prepare: {yes_no(report.qemu_knows_prepare)}\n"
        f"-global vfio-pci.migration-events=on: defined {yes_no(report.global_defined)}, "
        f"running {yes_no(report.global_running)}\n\n"
    )
    if not report.devices:
        raise events.no_vfio_device(report.domain)
    table(
        ["ALIAS", "KIND", "HOST ADDRESS", "EVENTS DEFINED", "EVENTS RUNNING"],
        [
            [d.alias or "-", d.kind, d.host_address or "-", yes_no(d.defined_on), yes_no(d.running_on)]
            for d in report.devices
        ],
    )


def _events_change(
    domain: str, connect: str | None, *, enable: bool, mode: str | None, dry_run: bool, as_json: bool
) -> None:
    from orchestrator.edges.virt import Host
    from orchestrator.flows import events

    with Host.open(source_uri(connect)) as host:
        report = events.change(host, domain, enable=enable, mode=mode, dry_run=dry_run)
    if as_json:
        emit_json(report.to_json())
        return
    if dry_run and report.diff:
        sys.stdout.write(report.diff)
    info(report.message)


@events_app.command("enable")
def events_enable_cmd(
    domain: DomainArg,
    mode: Annotated[
        EventsMode | None,
        typer.Option(
            "--mode",
            help="override: a <qemu:override> per device (libvirt >= 8.2, the default there); "
            "global: -global vfio-pci.migration-events=on (also reaches command-line devices).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the unified diff; write nothing.")
    ] = False,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make every VFIO device of DOMAIN emit migration events (from its next cold boot)."""
    chosen = None if mode is None else mode.value
    _events_change(domain, connect, enable=True, mode=chosen, dry_run=dry_run, as_json=as_json)


@events_app.command("disable")
def events_disable_cmd(
    domain: DomainArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the unified diff; write nothing.")
    ] = False,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove exactly what `events enable` added to DOMAIN's definition."""
    _events_change(domain, connect, enable=False, mode=None, dry_run=dry_run, as_json=as_json)
