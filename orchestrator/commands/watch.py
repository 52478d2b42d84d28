"""`orchestrator watch`: every VFIO_MIGRATION event of some hosts, relayed as NDJSON."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from orchestrator.commands.app import app
from orchestrator.commands.inputs import source_uri
from orchestrator.commands.render import info


@app.command("watch")
def watch_cmd(
    connect: Annotated[
        list[str] | None,
        typer.Option(
            "--connect",
            "-c",
            metavar="URI",
            help="A host's libvirt URI; repeat for several, each is watched once "
            "[default: $LIBVIRT_DEFAULT_URI, else qemu:///system].",
        ),
    ] = None,
    domain: Annotated[
        str | None,
        typer.Option("--domain", "-d", metavar="DOMAIN", help="Only this domain (it may not exist yet)."),
    ] = None,
) -> None:
    """Relay every VFIO_MIGRATION event from the given hosts as NDJSON on stdout, until Ctrl-C.

    A host unreachable at the start is reported and retried every few seconds while the others are
    watched; a host that goes away is reported. Exit 3 when no host can be reached.
    """
    from orchestrator.flows import watch

    default: list[str | None] = [os.environ.get("LIBVIRT_DEFAULT_URI") or None]
    watch.run([source_uri(uri) for uri in connect or default], domain, out=sys.stdout, log=info)
