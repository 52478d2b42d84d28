"""The `orchestrator` command line: parse, call, render. No logic of its own.

Commands import what they need when they run, so that `--help` stays fast (Ansible calls often).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from orchestrator.errors import ExitCode, OrchestratorError

app = typer.Typer(
    name="orchestrator",
    help="Live migration of VMs with VFIO devices: drains dependent RDMA workloads on QEMU's VFIO events.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
lab_app = typer.Typer(
    help="A lab of libvirt hosts on this machine, with simulated VFIO devices.", no_args_is_help=True
)
app.add_typer(lab_app, name="lab")

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of tables.")]
LabDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--lab-dir", envvar="ORCH_LAB_DIR", help="Lab directory [default: /var/lib/orchestrator/lab]."
    ),
]


def emit_json(document: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table on stdout (no colour: output is often piped)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        sys.stdout.write(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n"
        )


def info(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    sys.stderr.write(message + "\n")


# --- lab ---------------------------------------------------------------------------------------


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", "-n", help="How many hosts (1-8).")] = 2,
    lab_dir: LabDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start lab hosts (each its own libvirtd); harmless when already up."""
    from orchestrator.lab import hosts as lab

    started = lab.up(hosts, lab_dir)
    if as_json:
        emit_json([{"name": h.name, "uri": h.uri, "running": h.running} for h in started])
        return
    table(["HOST", "URI"], [[h.name, h.uri] for h in started])


@lab_app.command("status")
def lab_status(lab_dir: LabDirOpt = None, as_json: JsonOpt = False) -> None:
    """Show lab hosts and their guests."""
    from orchestrator.lab import hosts as lab

    found = lab.status(lab_dir)
    if as_json:
        emit_json(
            [
                {
                    "name": h.name,
                    "uri": h.uri,
                    "running": h.running,
                    "libvirtd_pid": h.pid("libvirtd"),
                    "guests": [
                        {"name": g.name, "state": g.state, "persistent": g.persistent} for g in h.guests
                    ],
                }
                for h in found
            ]
        )
        return
    if not found:
        info("no lab hosts; start them with: orchestrator lab up")
        return
    rows = []
    for h in found:
        guests = ", ".join(f"{g.name} ({g.state})" for g in h.guests) or "-"
        rows.append([h.name, "up" if h.running else "down", str(h.pid("libvirtd") or "-"), guests, h.uri])
    table(["HOST", "STATE", "PID", "GUESTS", "URI"], rows)


@lab_app.command("down")
def lab_down(lab_dir: LabDirOpt = None, as_json: JsonOpt = False) -> None:
    """Destroy the lab's guests and stop the daemons it started."""
    from orchestrator.lab import hosts as lab

    stopped = lab.down(lab_dir)
    if as_json:
        emit_json({"stopped": stopped})
    else:
        info(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@lab_app.command("guest")
def lab_guest(
    name: Annotated[str, typer.Argument(help="Guest (domain) name.")],
    host: Annotated[str, typer.Option("--host", help="Lab host to define it on, e.g. lab-a.")],
    devices: Annotated[
        int, typer.Option("--devices", help="Simulated VFIO devices (ids nic0, nic1, ...).")
    ] = 1,
    qemu_behaviour: Annotated[
        str,
        typer.Option(
            "--qemu-behaviour", help="11.0 (emits pre-copy-p2p-prepare) or 10.0 (no prepare state)."
        ),
    ] = "11.0",
    precopy: Annotated[bool, typer.Option("--precopy/--no-precopy", help="Devices support precopy.")] = True,
    p2p: Annotated[bool, typer.Option("--p2p/--no-p2p", help="Devices support the P2P states.")] = True,
    transition_ms: Annotated[
        int, typer.Option("--transition-ms", help="Duration of the transition into P2P.")
    ] = 300,
    fail_transition: Annotated[
        str | None,
        typer.Option(
            "--fail-transition", help="Make the P2P transition fail into this state (e.g. running)."
        ),
    ] = None,
    events: Annotated[
        bool, typer.Option("--events/--no-events", help="Add -global vfio-pci.migration-events=on.")
    ] = True,
    memory: Annotated[int, typer.Option("--memory", help="Guest memory in MiB.")] = 64,
    start: Annotated[bool, typer.Option("--start/--no-start", help="Start it after defining it.")] = True,
    lab_dir: LabDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Define and start a tiny TCG guest with simulated VFIO devices on a lab host."""
    from orchestrator.lab import guest as lab_guest_mod
    from orchestrator.lab import hosts as lab

    spec = lab_guest_mod.GuestSpec(
        name=name,
        devices=devices,
        behaviour=qemu_behaviour,
        precopy=precopy,
        p2p=p2p,
        transition_ms=transition_ms,
        fail_transition=fail_transition,
        events=events,
        memory_mib=memory,
    )
    target = lab.host_by_name(host, lab_dir)
    lab_guest_mod.create_guest(target, spec, start=start, root=lab_dir)
    if as_json:
        emit_json({"name": name, "host": target.name, "uri": target.uri, "devices": spec.device_ids})
    else:
        devices_text = ", ".join(spec.device_ids) or "none"
        info(f"{name} {'running' if start else 'defined'} on {target.name} with devices: {devices_text}")


@lab_app.command("demo")
def lab_demo(
    lab_dir: LabDirOpt = None,
    name: Annotated[str, typer.Option("--name", help="Guest name.")] = "demo",
) -> None:
    """Bring up two hosts and live-migrate a guest with simulated VFIO devices back and forth,
    printing every VFIO event seen on both hosts."""
    from orchestrator.lab import demo

    demo.run(name, lab_dir, out=sys.stdout)


# --- entry point -----------------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr and the exit code; never a traceback."""
    sys.stderr.write(f"orchestrator: error: {message}\n")
    raise SystemExit(code)


def _click_exceptions() -> Any:
    """Click's exception classes: Typer >= 0.22 vendors Click, older Typer depends on it."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - depends on the installed Typer
        from click import exceptions  # type: ignore[no-redef,import-not-found,unused-ignore]
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning every failure into one line and a documented exit code."""
    command = typer.main.get_command(app)
    click_exc = _click_exceptions()
    try:
        command.main(args=argv, prog_name="orchestrator", standalone_mode=False)
    except OrchestratorError as exc:
        fail(exc.line(), int(exc.code))
    except (KeyboardInterrupt, click_exc.Abort):
        fail("interrupted", ExitCode.INTERRUPTED)
    except click_exc.UsageError as exc:
        hint = f"; see: {exc.ctx.command_path} --help" if exc.ctx else ""
        fail(f"{exc.format_message()}{hint}", ExitCode.BAD_INPUT)
    except click_exc.ClickException as exc:
        fail(exc.format_message(), ExitCode.BAD_INPUT)
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): quietly stop.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(ExitCode.OK) from None
    except Exception as exc:
        if os.environ.get("ORCH_DEBUG"):
            raise
        fail(
            f"internal error: {exc!r} (set ORCH_DEBUG=1 for a traceback, and please report it)",
            ExitCode.ERROR,
        )
