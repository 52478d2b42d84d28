"""`orchestrator lab ...`: a lab of libvirt hosts on this machine, with guests whose VFIO devices are
simulated, their RDMA peers, and a demo."""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.commands.app import JsonOpt, lab_app
from orchestrator.commands.inputs import raise_bad
from orchestrator.commands.render import emit_json, info, table

LabDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--lab-dir",
        envvar="ORCH_LAB_DIR",
        metavar="PATH",
        help="Lab directory [default: /var/lib/orchestrator/lab].",
    ),
]


class QemuBehaviour(enum.StrEnum):
    """`lab guest --qemu-behaviour`: which QEMU's event sequence the simulated devices follow."""

    V11_0 = "11.0"
    V10_0 = "10.0"
    V11_0_EVENT = "11.0-event"  # QEMU's first design: the prepare as VFIO_MIGRATION_PREPARE


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", "-n", metavar="N", help="How many hosts (1-8).")] = 2,
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
        info(f"no lab hosts; start them with: {lab.lab_command('up', lab_dir)}")
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
    name: Annotated[str, typer.Argument(metavar="DOMAIN", help="Guest (domain) name.")],
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="Lab host to define it on, e.g. lab-a.")
    ],
    devices: Annotated[
        int, typer.Option("--devices", metavar="N", help="Simulated VFIO devices (ids nic0, nic1, ...).")
    ] = 1,
    qemu_behaviour: Annotated[
        QemuBehaviour,
        typer.Option(
            "--qemu-behaviour", help="11.0 (emits pre-copy-p2p-prepare) or 10.0 (no prepare state)."
        ),
    ] = QemuBehaviour.V11_0,
    precopy: Annotated[bool, typer.Option("--precopy/--no-precopy", help="Devices support precopy.")] = True,
    p2p: Annotated[bool, typer.Option("--p2p/--no-p2p", help="Devices support the P2P states.")] = True,
    transition_ms: Annotated[
        int, typer.Option("--transition-ms", metavar="MS", help="Duration of the transition into P2P.")
    ] = 300,
    fail_transition: Annotated[
        str | None,
        typer.Option(
            "--fail-transition",
            metavar="STATE",
            help="Make the P2P transition fail into this state (e.g. running).",
        ),
    ] = None,
    events: Annotated[
        bool, typer.Option("--events/--no-events", help="Add -global vfio-pci.migration-events=on.")
    ] = True,
    memory: Annotated[
        int | None,
        typer.Option("--memory", metavar="MIB", help="Guest memory in MiB [default: 64 idle, 128 dirty]."),
    ] = None,
    workload: Annotated[
        str,
        typer.Option(
            "--workload",
            metavar="idle|dirty",
            help="idle: firmware only, converges at any downtime limit; dirty: a Linux guest "
            "rewriting memory at --dirty-rate, so pre-copy iterates as with a loaded VM.",
        ),
    ] = "idle",
    dirty_rate: Annotated[
        float,
        typer.Option("--dirty-rate", metavar="MIB_S", help="dirty: MiB of memory rewritten per second."),
    ] = 64.0,
    dirty_mib: Annotated[
        int, typer.Option("--dirty-mib", metavar="SIZE", help="dirty: MiB of memory it cycles through.")
    ] = 4,
    disk_mib: Annotated[
        int,
        typer.Option(
            "--disk-mib",
            metavar="MIB",
            help="A qcow2 disk (vda) of this size, local to the host: "
            "/var/lib/libvirt/images/DOMAIN.qcow2 in its own images directory [default: no disk].",
        ),
    ] = 0,
    start: Annotated[bool, typer.Option("--start/--no-start", help="Start it after defining it.")] = True,
    lab_dir: LabDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Define and start a tiny TCG guest with simulated VFIO devices on a lab host."""
    from orchestrator.lab import guest as lab_guest_mod
    from orchestrator.lab import hosts as lab

    if memory is not None and memory <= 0:  # to GuestSpec, 0 means "the workload's default"
        raise_bad(f"--memory must be 16 to 4096 MiB, not {memory}", "pick another size")
    spec = lab_guest_mod.GuestSpec(
        name=name,
        devices=devices,
        behaviour=qemu_behaviour.value,
        precopy=precopy,
        p2p=p2p,
        transition_ms=transition_ms,
        fail_transition=fail_transition,
        events=events,
        memory_mib=memory if memory is not None else 0,  # 0: the workload's default
        workload=workload,
        dirty_rate=dirty_rate,
        dirty_mib=dirty_mib,
        disk_mib=disk_mib,
    )
    target = lab.host_by_name(host, lab_dir)
    ready_s = lab_guest_mod.create_guest(target, spec, start=start, root=lab_dir).ready_s
    if as_json:
        report: dict[str, object] = {
            "name": name,
            "host": target.name,
            "uri": target.uri,
            "devices": spec.device_ids,
        }
        if disk_mib:
            report["disk"] = {
                "target": lab_guest_mod.DISK_TARGET,
                "path": str(spec.disk),
                "file": str(lab_guest_mod.host_disk_file(target, name)),
                "mib": disk_mib,
            }
        if workload != "idle":
            report.update(
                workload=workload,
                memory_mib=spec.memory_mib,
                dirty_rate_mib_s=dirty_rate,
                dirty_mib=dirty_mib,
                console_log=str(lab_guest_mod.console_log(name, lab_dir)),
                ready_s=ready_s,
            )
        emit_json(report)
    else:
        devices_text = ", ".join(spec.device_ids) or "none"
        info(f"{name} {'running' if start else 'defined'} on {target.name} with devices: {devices_text}")
        if disk_mib:
            info(
                f"disk {lab_guest_mod.DISK_TARGET}: {disk_mib} MiB qcow2 {spec.disk} "
                f"(on this machine {lab_guest_mod.host_disk_file(target, name)})"
            )
        if workload != "idle":
            ready = f", ready after {ready_s:.1f} s" if ready_s is not None else ""
            info(
                f"workload {workload}: {dirty_rate:g} MiB/s over {dirty_mib} MiB{ready}; "
                f"console log {lab_guest_mod.console_log(name, lab_dir)}"
            )


@lab_app.command("peer")
def lab_peer(
    domain: Annotated[
        str, typer.Argument(metavar="DOMAIN", help="The guest whose device the peer talks to.")
    ],
    device: Annotated[str, typer.Option("--device", metavar="ID", help="Device id.")] = "nic0",
    interval_ms: Annotated[
        float, typer.Option("--interval-ms", metavar="MS", help="Request every this many ms.")
    ] = 5.0,
    timeout_ms: Annotated[
        float, typer.Option("--timeout-ms", metavar="MS", help="The peers' RDMA timeout.")
    ] = 30.0,
    duration: Annotated[
        float | None, typer.Option("--duration", metavar="SECONDS", help="Stop after this many seconds.")
    ] = None,
    lab_dir: LabDirOpt = None,
) -> None:
    """Stand in for a device's RDMA peers: probe it, count timeouts while armed; JSON report at the end.

    The rdma-drain policy's hooks (orchestrator-rdma-hook) disarm and re-arm it.
    """
    from orchestrator.lab import peer

    if interval_ms <= 0 or timeout_ms <= 0:
        raise_bad("--interval-ms and --timeout-ms must be > 0", "give positive numbers")
    if lab_dir is not None:
        os.environ["ORCH_LAB_DIR"] = str(lab_dir)
    stats = peer.serve(domain, device, interval_ms, timeout_ms, duration)
    emit_json(stats.to_json())


@lab_app.command("demo")
def lab_demo(
    lab_dir: LabDirOpt = None,
    name: Annotated[str, typer.Option("--name", metavar="DOMAIN", help="Guest name.")] = "demo",
) -> None:
    """Bring up two hosts and live-migrate a guest with simulated VFIO devices back and forth,
    printing every VFIO event seen on both hosts."""
    from orchestrator.lab import demo

    demo.run(name, lab_dir, out=sys.stdout)
