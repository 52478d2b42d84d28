#!/usr/bin/env python3
"""Evacuation throughput: `orchestrator evacuate` at several concurrencies versus a serial virsh loop.

On a lab of its own (three libvirtd daemons, real QEMU, the simulated VFIO device), --guests guests
of 64 MiB run on host A, every other one with one simulated VFIO device (P2P transition 100 ms).
Each variant empties A onto B and C, timed from the start of its first process to the end of its
last one:

- orchestrator, for each N of --concurrency: `orchestrator evacuate -c A --to B --to C
  --concurrency N --per-destination N --policy P --journal J --json`, where P only sets the data
  URI (`unix://<lab>/migrations/{domain}.sock`, no hooks) and J is a temporary journal;
- baseline, what an admin would otherwise write: a serial loop of `virsh -c A migrate --live --p2p
  --persistent --undefinesource NAME B|C --migrateuri unix://<lab>/migrations/NAME.sock`, the
  destination alternating between B and C.

Between variants the guests go back to A with `orchestrator evacuate -c B --to A` and `-c C --to A`
(not timed), and the benchmark checks that every guest runs on A again. One untimed evacuation and
return comes first, as a warm-up: the first migration into a freshly started libvirtd costs seconds
more than the next ones. The whole set runs --rounds times, the order of the variants reversed every
other round (machine conditions drift), and each variant's median wall time is reported.

Usage: .venv/bin/python bench/evacuation.py [--guests 8] [--concurrency 1,2,4] [--rounds 3]
       [--json PATH] [--svg PATH] [--lab-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    check_no_lab,
    exit_on_sigterm,
    in_work_dir,
    lab_root,
    svg_start,
    write_json,
    xml,
)

from orchestrator.edges.virt import Host
from orchestrator.lab import guest as lab_guest
from orchestrator.lab import hosts as lab_hosts

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SVG = REPO / "bench-results" / "evacuation.svg"
MEMORY_MIB = 64
TRANSITION_MS = 100
STEP_TIMEOUT_S = 600.0  # one whole evacuation, or one virsh migrate
SERIAL = "virsh serial loop"

POLICY_TOML = """\
description = "evacuation benchmark: the lab's unix data sockets, no hooks"
[migration]
data_uri = "unix://{root}/migrations/{{domain}}.sock"
"""


@dataclass
class Variant:
    """One way of emptying host A, and its wall times (seconds), one per round."""

    name: str
    concurrency: int | None  # None: the serial virsh loop
    walls: list[float] = field(default_factory=list)
    per_vm: list[dict[str, Any]] = field(default_factory=list)  # the last round's per-guest seconds

    @property
    def wall(self) -> float:
        """The median wall time over the rounds."""
        return statistics.median(self.walls)


@dataclass
class Lab:
    """The benchmark's three hosts and guests."""

    root: Path
    work: Path
    hosts: list[lab_hosts.LabHost]
    guests: list[str]
    orchestrator: list[str]
    virsh: str

    @property
    def policy(self) -> Path:
        """The evacuation policy (written once)."""
        return self.work / "policy.toml"

    @property
    def journal(self) -> Path:
        """The orchestrator's journal for the whole run."""
        return self.work / "journal.sqlite"

    def where(self) -> dict[str, str]:
        """guest -> name of the host it runs on (guests running nowhere are missing)."""
        found: dict[str, str] = {}
        for host in self.hosts:
            with Host.open(host.uri, keepalive=False) as conn:
                for dom in conn.domains():
                    if dom.active and dom.name in self.guests:
                        found[dom.name] = host.name
        return found

    def check_all_on(self, index: int, when: str) -> None:
        """Every guest runs on host `index`, or a BenchError saying where they are."""
        where = self.where()
        name = self.hosts[index].name
        wrong = {g: where.get(g, "nowhere") for g in self.guests if where.get(g) != name}
        if wrong:
            raise BenchError(f"{when}: expected every guest on {name}, but {wrong}")

    def check_moved(self, when: str) -> None:
        """Every guest runs on B or C, and both got some (when there are several guests)."""
        where = self.where()
        dests = {self.hosts[1].name, self.hosts[2].name}
        wrong = {g: where.get(g, "nowhere") for g in self.guests if where.get(g) not in dests}
        if wrong:
            raise BenchError(f"after {when}: expected every guest on lab-b or lab-c, but {wrong}")
        if len(self.guests) > 1 and set(where.values()) != dests:
            raise BenchError(f"after {when}: the guests were not spread over both destinations: {where}")

    def evacuate(self, src: int, dests: Sequence[int], concurrency: int) -> dict[str, Any]:
        """`orchestrator evacuate` from host `src` to `dests`; its JSON report (exit 0 required)."""
        command = [
            *self.orchestrator,
            "evacuate",
            "-c",
            self.hosts[src].uri,
            *[arg for d in dests for arg in ("--to", self.hosts[d].uri)],
            "--concurrency",
            str(concurrency),
            "--per-destination",
            str(concurrency),
            "--policy",
            str(self.policy),
            "--journal",
            str(self.journal),
            "--json",
        ]
        result = _run(command, f"orchestrator evacuate -c {self.hosts[src].name}")
        report: dict[str, Any] = json.loads(result.stdout)
        if not report.get("empty"):
            raise BenchError(f"evacuation of {self.hosts[src].name} left {report.get('left')}")
        return report

    def virsh_migrate(self, guest: str, dest: int) -> None:
        """One plain `virsh migrate` of `guest` from A to host `dest`."""
        _run(
            [
                self.virsh,
                "-c",
                self.hosts[0].uri,
                "migrate",
                "--live",
                "--p2p",
                "--persistent",
                "--undefinesource",
                guest,
                self.hosts[dest].uri,
                "--migrateuri",
                f"unix://{self.root}/migrations/{guest}.sock",
            ],
            f"virsh migrate {guest}",
        )

    def back_to_a(self) -> None:
        """Move every guest from B and C back to A (not timed; both at once) and check they are there."""
        where = self.where()
        sources = [i for i in (1, 2) if self.hosts[i].name in where.values()]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(self.evacuate, i, [0], 2) for i in sources]:
                future.result()
        self.check_all_on(0, "after moving the guests back")


def _run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run a program to completion; a BenchError with its stderr when it fails."""
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=STEP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} took longer than {STEP_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"{what} exited {result.returncode}: {result.stderr.strip()}")
    return result


# --- measuring ------------------------------------------------------------------------------------


def run_serial(lab: Lab, variant: Variant) -> None:
    """The admin's loop: one `virsh migrate` after the other, B and C alternating."""
    lab.check_all_on(0, f"before {variant.name}")
    per_vm: list[dict[str, Any]] = []
    began = time.monotonic()
    for index, guest in enumerate(lab.guests):
        dest = 1 + index % 2
        one = time.monotonic()
        lab.virsh_migrate(guest, dest)
        per_vm.append(
            {"domain": guest, "destination": lab.hosts[dest].name, "seconds": time.monotonic() - one}
        )
    variant.walls.append(time.monotonic() - began)
    variant.per_vm = per_vm


def run_evacuate(lab: Lab, variant: Variant) -> None:
    """One `orchestrator evacuate` of A onto B and C at the variant's concurrency."""
    assert variant.concurrency is not None
    lab.check_all_on(0, f"before {variant.name}")
    began = time.monotonic()
    report = lab.evacuate(0, [1, 2], variant.concurrency)
    variant.walls.append(time.monotonic() - began)
    names = {h.uri: h.name for h in lab.hosts}
    moved = [r for r in report["results"] if r["outcome"] == "succeeded"]
    if sorted(r["domain"] for r in moved) != sorted(lab.guests):
        raise BenchError(f"{variant.name}: not every guest moved: {report['results']}")
    variant.per_vm = [
        {
            "domain": r["domain"],
            "destination": names.get(r["destination"], r["destination"]),
            "seconds": r["seconds"],
            "attempts": r["attempts"],
        }
        for r in sorted(report["results"], key=lambda r: r["domain"])
    ]


def measure(args: argparse.Namespace, root: Path, work: Path) -> tuple[list[Variant], float]:
    """Bring up the lab under `root`, time every variant, tear the lab down; (variants, seconds)."""
    began = time.monotonic()
    check_no_lab(root)
    virsh = shutil.which("virsh")
    if virsh is None:
        raise BenchError("virsh is not installed (run deploy/setup.sh)")
    program = Path(sys.executable).with_name("orchestrator")
    orchestrator = [str(program)] if program.exists() else [sys.executable, "-m", "orchestrator"]
    variants = [Variant(SERIAL, None)] + [Variant(f"evacuate -j{n}", n) for n in args.concurrency]
    probes: list[subprocess.Popen[bytes]] = []
    try:
        hosts = lab_hosts.up(3, root)
        tag = uuid.uuid4().hex[:4]
        guests = [f"ev{index}-{tag}" for index in range(args.guests)]
        lab = Lab(root, work, hosts, guests, orchestrator, virsh)
        lab.policy.write_text(POLICY_TOML.format(root=root))
        # A fresh libvirtd probes every installed QEMU binary on its first capabilities request
        # (~8 s here), which `orchestrator evacuate` makes of each host (their UUIDs), one after the
        # other. The three daemons do it now, at once, while the guests are created on A.
        probes += [
            subprocess.Popen(
                [virsh, "-c", host.uri, "capabilities"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for host in hosts
        ]
        for index, name in enumerate(guests):
            spec = lab_guest.GuestSpec(
                name=name,
                devices=1 if index % 2 == 0 else 0,
                transition_ms=TRANSITION_MS,
                memory_mib=MEMORY_MIB,
            )
            lab_guest.create_guest(hosts[0], spec, root=root)
        for probe in probes:
            probe.wait(STEP_TIMEOUT_S)
        _progress(f"lab up, {len(guests)} guests on {hosts[0].name}", began)
        # Warm-up, not timed: the first migrations into fresh daemons are slower, and that would all
        # fall on the first variant.
        lab.evacuate(0, [1, 2], concurrency=2)
        _progress("warm-up: guests on lab-b and lab-c", began)
        lab.back_to_a()
        _progress("warm-up done", began)
        runs = [
            variant
            for round_index in range(args.rounds)
            for variant in (variants if round_index % 2 == 0 else variants[::-1])
        ]
        for count, variant in enumerate(runs, start=1):
            if count > 1:
                lab.back_to_a()
            if variant.concurrency is None:
                run_serial(lab, variant)
            else:
                run_evacuate(lab, variant)
            lab.check_moved(variant.name)
            _progress(f"run {count}/{len(runs)}: {variant.name}: {variant.walls[-1]:.2f} s", began)
    finally:
        for probe in probes:  # only left running when something failed early
            if probe.poll() is None:
                probe.kill()
                probe.wait()
        lab_hosts.down(root)
    return variants, time.monotonic() - began


def _progress(text: str, began: float) -> None:
    print(f"[{time.monotonic() - began:6.1f} s] {text}", file=sys.stderr, flush=True)


# --- reporting ------------------------------------------------------------------------------------


def results(variants: Sequence[Variant], args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    serial = next(v for v in variants if v.concurrency is None)
    return {
        "config": {
            "guests": args.guests,
            "memory_mib": MEMORY_MIB,
            "guests_with_device": (args.guests + 1) // 2,
            "transition_ms": TRANSITION_MS,
            "concurrency": list(args.concurrency),
            "rounds": args.rounds,
            "destinations": 2,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "elapsed_s": round(elapsed, 1),
        "baseline": SERIAL,
        "variants": [
            {
                "name": v.name,
                "kind": "virsh" if v.concurrency is None else "orchestrator",
                "concurrency": v.concurrency,
                "wall_s": round(v.wall, 3),
                "walls_s": [round(w, 3) for w in v.walls],
                "per_guest_s": round(v.wall / args.guests, 3),
                # wall time relative to the serial virsh loop (< 1: faster), and its inverse
                "ratio_to_serial": round(v.wall / serial.wall, 3),
                "speedup": round(serial.wall / v.wall, 3),
                "per_vm": [{**one, "seconds": round(float(one["seconds"]), 3)} for one in v.per_vm],
            }
            for v in variants
        ],
    }


def table(doc: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    header = f"{'variant':<22} {'wall s':>8} {'s/guest':>8} {'x serial':>9} {'speedup':>8}"
    lines = [header, "-" * len(header)]
    for v in doc["variants"]:
        lines.append(
            f"{v['name']:<22} {v['wall_s']:>8.2f} {v['per_guest_s']:>8.2f} "
            f"{v['ratio_to_serial']:>9.3f} {v['speedup']:>8.2f}"
        )
    return "\n".join(lines)


def render_svg(doc: dict[str, Any]) -> str:
    """A bar chart of each variant's wall time, labelled with its ratio to the serial loop."""
    variants = doc["variants"]
    width, height = 720, 420
    left, right, top, bottom = 70, 20, 60, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = max(v["wall_s"] for v in variants) * 1.15 or 1.0
    step = _nice_step(top_value / 5)
    cfg = doc["config"]
    title = (
        f"Emptying a host: {cfg['guests']} guests x {cfg['memory_mib']} MiB to 2 hosts "
        f"({cfg['guests_with_device']} with a VFIO device)"
    )
    out = [
        *svg_start(width, height),
        f'<text x="{width / 2}" y="26" text-anchor="middle" font-size="15">{xml(title)}</text>',
    ]

    def y(seconds: float) -> float:
        return top + plot_h * (1.0 - seconds / top_value)

    tick = 0.0
    while tick <= top_value:
        out.append(
            f'<line x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}" stroke="#eee"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
        tick += step
    slot = plot_w / len(variants)
    bar = slot * 0.6
    for index, v in enumerate(variants):
        x = left + slot * index + (slot - bar) / 2
        colour = "#d62728" if v["kind"] == "virsh" else "#1f77b4"
        out.append(
            f'<rect x="{x:.1f}" y="{y(v["wall_s"]):.1f}" width="{bar:.1f}" '
            f'height="{top + plot_h - y(v["wall_s"]):.1f}" fill="{colour}"/>'
        )
        label = f"{v['wall_s']:.1f} s (x{v['ratio_to_serial']:.2f})"
        middle = x + bar / 2
        out.append(
            f'<text x="{middle:.1f}" y="{y(v["wall_s"]) - 6:.1f}" text-anchor="middle">{xml(label)}</text>'
        )
        out.append(
            f'<text x="{middle:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{xml(v["name"])}</text>'
        )
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 20}" text-anchor="middle">'
        "wall time to empty host A (s); x = ratio to the serial virsh loop</text>"
    )
    out.append(
        f'<text x="18" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {top + plot_h / 2})">seconds</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least `raw`."""
    power = 10.0 ** len(str(int(raw))) / 10.0 if raw >= 1 else 0.1
    for mult in (1, 2, 5, 10):
        if power * mult >= raw:
            return power * mult
    return power * 10


# --- main -----------------------------------------------------------------------------------------


def _concurrency(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("give integers >= 1, e.g. 1,2,4")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--guests", type=int, default=8, help="guests to evacuate (default 8)")
    parser.add_argument(
        "--concurrency",
        type=_concurrency,
        default=[1, 2, 4],
        help="orchestrator concurrencies (default 1,2,4)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="repeat every variant this often; medians (default 3)"
    )
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    parser.add_argument(
        "--svg", type=Path, default=DEFAULT_SVG, help=f"the bar chart (default {DEFAULT_SVG})"
    )
    parser.add_argument(
        "--lab-dir", type=Path, help="directory for the benchmark's own lab (default: a new temporary one)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.guests <= 32:
        parser.error("--guests must be 1 to 32")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    exit_on_sigterm()
    with lab_root(args.lab_dir) as root:
        measured = in_work_dir("evacuation", "evacuation-bench-", lambda work: measure(args, root, work))
    if measured is None:
        return 1
    variants, elapsed = measured
    doc = results(variants, args, elapsed)
    print(table(doc))
    print(
        f"{args.guests} guests x {MEMORY_MIB} MiB from lab-a to lab-b + lab-c, "
        f"{(args.guests + 1) // 2} with a simulated VFIO device ({TRANSITION_MS} ms transition); "
        f"median of {args.rounds} round(s), {elapsed:.0f} s in all"
    )
    if args.json is not None:
        write_json(args.json, doc)
    args.svg.parent.mkdir(parents=True, exist_ok=True)
    args.svg.write_text(render_svg(doc))
    print(f"plot: {args.svg}" + (f", numbers: {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
