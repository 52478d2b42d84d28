"""The shape of the `orchestrator` command line: its Typer apps and the options several commands share.

Each command module (migrate, recover, evacuate, watch, history, lab, events) registers its command(s)
on these apps when it is imported; `orchestrator.commands.program` imports them all. Commands import
what they need when they run, so that `--help` stays fast (Ansible calls often). Start-up cost
(measured by bench/startup.py) is kept down three ways:

- help is plain Click text (`rich_markup_mode=None`): Typer's rich help imports rich, rich.markdown
  and markdown_it for every `--help`;
- the help flags of the groups default to False (HELP_DEFAULTS): when absent, their value is then
  already a bool, so Typer does not build a Pydantic adapter to coerce it; that import (pydantic,
  pydantic_core, typer._adapters) would be paid by every `orchestrator COMMAND --help`;
- json is imported when a command prints JSON, not at start.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.commands import values

# Click's default_map for a group's context: its own help flag is False unless given (see above).
HELP_DEFAULTS: dict[str, Any] = {"help": False}

values.install()  # option values without Pydantic: a shorter start for every command

app = typer.Typer(
    name="orchestrator",
    help="Live migration of VMs with VFIO devices: drains dependent RDMA workloads on QEMU's VFIO events.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"], "default_map": HELP_DEFAULTS},
)
lab_app = typer.Typer(
    help="A lab of libvirt hosts on this machine, with simulated VFIO devices.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"default_map": HELP_DEFAULTS},
)
app.add_typer(lab_app, name="lab")
events_app = typer.Typer(
    help="Turn QEMU's VFIO migration events on or off in a domain's definition.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"default_map": HELP_DEFAULTS},
)
app.add_typer(events_app, name="events")


# --- options of every kind of command ----------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of tables.")]
ConnectOpt = Annotated[
    str | None,
    typer.Option(
        "--connect",
        "-c",
        envvar="LIBVIRT_DEFAULT_URI",
        metavar="URI",
        help="Source libvirt URI [default: qemu:///system].",
    ),
]
JournalOpt = Annotated[
    Path | None,
    typer.Option(
        "--journal",
        envvar="ORCH_JOURNAL",
        metavar="PATH",
        help="Journal file [default: /var/lib/orchestrator/journal.sqlite].",
    ),
]


def complete_domain(ctx: typer.Context, incomplete: str) -> list[str]:
    """The shell's completion of a DOMAIN: the domains of the -c URI (else $LIBVIRT_DEFAULT_URI, else
    qemu:///system), where that is cheap: a daemon of this machine (a URI without a host), read-only.
    Nothing on a remote URI (an ssh connection per Tab) or any failure."""
    from urllib.parse import urlsplit

    uri = ctx.params.get("connect") or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    if urlsplit(uri).hostname:
        return []
    try:
        from orchestrator.edges.virt import domain_names
    except ImportError:  # no libvirt-python: no names
        return []
    return [name for name in domain_names(uri) if name.startswith(incomplete)]


DomainArg = Annotated[
    str, typer.Argument(metavar="DOMAIN", help="Domain name or UUID.", autocompletion=complete_domain)
]


# --- the migration options of migrate and evacuate ---------------------------------------------


class DrainChoice(enum.StrEnum):
    """`--drain`: when to drain (the policy's `switchover.drain`)."""

    PREPARE = "prepare"
    GATED = "gated"
    START = "start"


PolicyOpt = Annotated[
    str | None,
    typer.Option(
        "--policy", "-p", help="Policy name (from /etc/orchestrator/policies, then the shipped ones) or path."
    ),
]
DrainOpt = Annotated[
    DrainChoice | None,
    typer.Option(
        "--drain",
        help="When to drain: prepare (on the device's prepare event), gated (hold the switchover until "
        "every device is drained) or start (before the job) [default: the policy's].",
    ),
]
MaxDowntimeOpt = Annotated[
    int | None,
    typer.Option(
        "--max-downtime", metavar="MS", help="The most downtime QEMU may use; caps the policy's steps."
    ),
]
BandwidthOpt = Annotated[int | None, typer.Option("--bandwidth", metavar="MIB/S", help="Bandwidth limit.")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", metavar="SECONDS", help="Abort a job that runs longer than this."),
]
AutoConvergeOpt = Annotated[
    bool | None, typer.Option("--auto-converge", help="Throttle the vCPUs of a guest that does not converge.")
]
CompressedOpt = Annotated[bool | None, typer.Option("--compressed", help="Compress the migration data.")]
CompMethodsOpt = Annotated[
    str | None,
    typer.Option(
        "--comp-methods", metavar="LIST", help="Compression methods, comma-separated: mt,xbzrle,zlib,zstd."
    ),
]
ParallelOpt = Annotated[bool, typer.Option("--parallel", help="Several connections for the data (multifd).")]
ParallelConnectionsOpt = Annotated[
    int | None, typer.Option("--parallel-connections", metavar="N", help="How many (implies --parallel).")
]
TlsOpt = Annotated[bool, typer.Option("--tls", help="Encrypt the migration data with TLS.")]
