#!/usr/bin/env python3
"""Start-up cost of the CLI: `orchestrator --help` and `orchestrator migrate --help`, before and after.

Ansible calls the tool often, so what it costs to start matters. Each command is timed as a
subprocess, --runs times (after one untimed warm-up run, which also compiles the byte code), for
three variants, interleaved run by run so that all see the same machine conditions:

- before: the package as it was at BEFORE_REV (the last commit before the start-up work; override
  with --before-rev), extracted with `git archive` into a temporary directory. No stash, no checkout:
  the working tree is not touched. There, help was rendered by Typer's rich help (rich, rich.markdown,
  markdown_it) and every `COMMAND --help` imported Pydantic to coerce the group's absent help flag;
- after: the package of this working tree;
- installed: `.venv/bin/orchestrator`, the entry point users run (the same code as "after").

"before" and "after" run the same launcher (`python -c`, what the console script does) from a
neutral directory with PYTHONPATH set to their tree, so they differ only in the package's code.

Also reported, to explain the difference:

- the cost of the imports that were removed, each timed on its own as a subprocess
  (`python -c "import typer, typer.rich_utils"` minus `python -c "import typer"`, same for
  typer._adapters, which imports Pydantic) and of the interpreter's own start (`python -c pass`);
- `python -X importtime` of `migrate --help` for both variants: the top-level imports by cumulative
  time, and the time per package (sum of self times), the slowest first;
- where the time of the "after" variant goes, measured inside one process: importing typer,
  importing orchestrator.commands.program, building the Click commands (`typer.main.get_command`: an
  upper bound of what lazy command registration could save) and running `migrate --help`.

Usage: .venv/bin/python bench/startup.py [--runs 20] [--json PATH] [--before-rev REV]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from common import BenchError, percentile, write_json

REPO = Path(__file__).resolve().parent.parent
# The last commit whose orchestrator/cli.py had Typer's rich help (before the start-up work).
BEFORE_REV = "b689d8f707c03879ce4ee561ecc40fef40e11ba4"
COMMANDS: tuple[tuple[str, ...], ...] = (("--help",), ("migrate", "--help"))
VARIANTS = ("before", "after", "installed")
# The module of the CLI's `main` in each variant's tree: the package was sorted into subpackages since.
CLI_MODULE = {"before": "orchestrator.cli", "after": "orchestrator.commands.program"}
# What the console script `.venv/bin/orchestrator` does, with the CLI's `main` from {module}.
LAUNCH = "import sys; from {module} import main; sys.argv[0] = 'orchestrator'; sys.exit(main())"
# Where the time of one `migrate --help` goes, inside one process (printed as JSON).
PHASES = """\
import json, sys, time
t0 = time.perf_counter()
import typer
t1 = time.perf_counter()
import orchestrator.commands.program
from orchestrator.commands.app import app
t2 = time.perf_counter()
command = typer.main.get_command(app)
t3 = time.perf_counter()
try:
    command.main(args=["migrate", "--help"], prog_name="orchestrator", standalone_mode=False)
except SystemExit:
    pass
t4 = time.perf_counter()
sys.stderr.write(json.dumps({"import typer": t1 - t0, "import orchestrator.commands.program": t2 - t1,
                             "get_command (all commands built)": t3 - t2, "run migrate --help": t4 - t3}))
"""
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("python -c pass", "pass"),
    ("import typer", "import typer"),
    ("import typer, typer.rich_utils", "import typer, typer.rich_utils"),
    ("import typer, typer._adapters", "import typer, typer._adapters"),
)
IMPORTTIME = re.compile(
    r"^import time:\s+(?P<self>\d+) \|\s+(?P<cumulative>\d+) \|(?P<indent> *)(?P<name>\S+)$"
)
TOP = 8


@dataclass(frozen=True)
class Setup:
    """Where the variants' code lives and how to start them."""

    python: str
    before_tree: Path
    neutral: Path  # an empty working directory, so that '' on sys.path finds no package

    def env(self, tree: Path | None) -> dict[str, str]:
        """The environment of a run: PYTHONPATH at `tree` (None: as inherited, minus PYTHONPATH)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        env["COLUMNS"] = "100"  # the same help width whatever the terminal
        return env

    def command(self, variant: str, args: Sequence[str], *, importtime: bool = False) -> list[str]:
        """The argv of one run of `variant`."""
        if variant == "installed":
            return [str(Path(self.python).with_name("orchestrator")), *args]
        flags = ["-X", "importtime"] if importtime else []
        return [self.python, *flags, "-c", LAUNCH.format(module=CLI_MODULE[variant]), *args]

    def tree(self, variant: str) -> Path | None:
        """The package tree of `variant` (None: the installed one)."""
        return {"before": self.before_tree, "after": REPO}.get(variant)


# --- small pure helpers -----------------------------------------------------------------------------


def summary(values_ms: Sequence[float]) -> dict[str, Any]:
    """count, median, p90, min, max (ms) and the values."""
    return {
        "count": len(values_ms),
        "median_ms": round(statistics.median(values_ms), 2),
        "p90_ms": round(percentile(values_ms, 90), 2),
        "min_ms": round(min(values_ms), 2),
        "max_ms": round(max(values_ms), 2),
        "runs_ms": [round(v, 2) for v in values_ms],
    }


@dataclass(frozen=True)
class ImportLine:
    """One line of `python -X importtime`."""

    name: str
    self_us: int
    cumulative_us: int
    depth: int


def parse_importtime(stderr: str) -> list[ImportLine]:
    """The import lines of `-X importtime` output (other lines are ignored)."""
    lines = []
    for raw in stderr.splitlines():
        match = IMPORTTIME.match(raw)
        if match:
            lines.append(
                ImportLine(
                    match["name"], int(match["self"]), int(match["cumulative"]), len(match["indent"]) // 2
                )
            )
    return lines


def offenders(lines: Sequence[ImportLine]) -> dict[str, Any]:
    """Top-level imports by cumulative time and packages by summed self time, slowest first (ms)."""
    top_level = sorted((ln for ln in lines if ln.depth == 0), key=lambda ln: -ln.cumulative_us)
    packages: dict[str, int] = {}
    for line in lines:
        root = line.name.split(".")[0]
        packages[root] = packages.get(root, 0) + line.self_us
    return {
        "modules": len(lines),
        "total_ms": round(sum(ln.self_us for ln in lines) / 1000, 2),
        "top_level": [
            {"module": ln.name, "cumulative_ms": round(ln.cumulative_us / 1000, 2)} for ln in top_level
        ],
        "packages": [
            {"package": name, "self_ms": round(us / 1000, 2)}
            for name, us in sorted(packages.items(), key=lambda item: -item[1])
        ],
        "package_names": sorted(packages),
    }


# --- measuring ------------------------------------------------------------------------------------


def extract_before(rev: str, into: Path) -> Path:
    """`git archive REV orchestrator` extracted under `into`; returns the tree (its parent dir)."""
    git = shutil.which("git")
    if git is None:
        raise BenchError("git is not installed: it extracts the 'before' variant (apt-get install git)")
    result = subprocess.run(
        [git, "-C", str(REPO), "archive", "--format=tar", rev, "orchestrator"],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"git archive {rev} failed: {result.stderr.decode(errors='replace').strip()}")
    tree = into / "before"
    tree.mkdir()
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        archive.extractall(tree, filter="data")
    return tree


def run_once(setup: Setup, variant: str, args: Sequence[str]) -> float:
    """One run of `variant` with `args`; its wall time in ms. A BenchError unless it exits 0 with help."""
    command = setup.command(variant, args)
    began = time.perf_counter()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=setup.neutral,
        env=setup.env(setup.tree(variant)),
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    elapsed = (time.perf_counter() - began) * 1000
    if result.returncode != 0 or "Usage:" not in result.stdout:
        raise BenchError(
            f"{variant}: orchestrator {' '.join(args)} exited {result.returncode} "
            f"without help: {result.stderr.strip()[-300:]}"
        )
    return elapsed


def check_variant(setup: Setup, variant: str) -> str:
    """The file the CLI's `main` is imported from in `variant`, so each runs the code meant."""
    module = CLI_MODULE.get(variant, CLI_MODULE["after"])  # installed: the code of this tree
    result = subprocess.run(
        [setup.python, "-c", f"import {module} as c; print(c.__file__)"],
        capture_output=True,
        text=True,
        cwd=setup.neutral,
        env=setup.env(setup.tree(variant)),
        check=False,
    )
    where = result.stdout.strip()
    tree = setup.tree(variant)
    if result.returncode != 0 or (tree is not None and not where.startswith(str(tree))):
        raise BenchError(f"{variant}: {module} comes from {where or result.stderr.strip()}, not {tree}")
    return where


def time_commands(setup: Setup, runs: int) -> dict[str, dict[str, list[float]]]:
    """command -> variant -> wall times (ms), the variants interleaved and rotated run by run."""
    times: dict[str, dict[str, list[float]]] = {}
    for args in COMMANDS:
        key = " ".join(args)
        times[key] = {variant: [] for variant in VARIANTS}
        for variant in VARIANTS:
            run_once(setup, variant, args)  # warm-up: byte code compiled, files cached
        for index in range(runs):
            shift = index % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                times[key][variant].append(run_once(setup, variant, args))
        print(f"timed orchestrator {key}", file=sys.stderr, flush=True)
    return times


def time_components(setup: Setup, runs: int) -> dict[str, dict[str, Any]]:
    """The interpreter's start and the removed imports, each as its own subprocess (ms)."""
    values: dict[str, list[float]] = {label: [] for label, _code in COMPONENTS}
    for index in range(runs + 1):
        for label, code in COMPONENTS:
            began = time.perf_counter()
            # Output captured (pipes) as in run_once: without pipes, a wait with a timeout polls
            # every 50 ms, which would quantize the times.
            subprocess.run(
                [setup.python, "-c", code],
                capture_output=True,
                cwd=setup.neutral,
                env=setup.env(None),
                check=True,
                timeout=60,
            )
            if index:  # the first round warms up
                values[label].append((time.perf_counter() - began) * 1000)
    return {label: summary(times) for label, times in values.items()}


def importtime(setup: Setup, variant: str, args: Sequence[str]) -> list[ImportLine]:
    """`python -X importtime` of `variant` running `args`."""
    result = subprocess.run(
        setup.command(variant, args, importtime=True),
        capture_output=True,
        text=True,
        cwd=setup.neutral,
        env=setup.env(setup.tree(variant)),
        timeout=60,
        check=False,
    )
    lines = parse_importtime(result.stderr)
    if result.returncode != 0 or not lines:
        raise BenchError(
            f"{variant}: -X importtime exited {result.returncode}: {result.stderr.strip()[-300:]}"
        )
    return lines


def phases(setup: Setup, runs: int) -> dict[str, float]:
    """Median time (ms) of each phase of `migrate --help` in the "after" variant, inside one process."""
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        result = subprocess.run(
            [setup.python, "-c", PHASES],
            capture_output=True,
            text=True,
            cwd=setup.neutral,
            env=setup.env(REPO),
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(f"phases: exited {result.returncode}: {result.stderr.strip()[-300:]}")
        for name, seconds in json.loads(result.stderr.strip().splitlines()[-1]).items():
            samples.setdefault(name, []).append(seconds * 1000)
    return {name: round(statistics.median(values), 2) for name, values in samples.items()}


# --- reporting ------------------------------------------------------------------------------------


def results(
    args: argparse.Namespace,
    times: dict[str, dict[str, list[float]]],
    components: dict[str, dict[str, Any]],
    imports: dict[str, list[ImportLine]],
    inside: dict[str, float],
    sources: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    """Everything measured, as one JSON document."""
    commands = {}
    for key, by_variant in times.items():
        stats = {variant: summary(values) for variant, values in by_variant.items()}
        before, after = stats["before"]["median_ms"], stats["after"]["median_ms"]
        commands[key] = {
            **stats,
            "saved_ms": round(before - after, 2),
            "after_over_before": round(after / before, 3),
        }
    base = components["import typer"]["median_ms"]
    removed = {
        "typer.rich_utils (rich help)": round(
            components["import typer, typer.rich_utils"]["median_ms"] - base, 2
        ),
        "typer._adapters (pydantic)": round(
            components["import typer, typer._adapters"]["median_ms"] - base, 2
        ),
    }
    before_offenders, after_offenders = offenders(imports["before"]), offenders(imports["after"])
    gone_names = set(before_offenders["package_names"]) - set(after_offenders["package_names"])
    gone = [p for p in before_offenders["packages"] if p["package"] in gone_names]  # slowest first
    versions: dict[str, str | None] = {}
    for dist in ("typer", "rich", "pydantic", "markdown-it-py"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "config": {
            "runs": args.runs,
            "before_rev": args.before_rev,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "versions": versions,
            "cli_sources": sources,
        },
        "elapsed_s": round(elapsed, 1),
        "commands": commands,
        "components": components,
        "removed_imports_ms": removed,
        "importtime_migrate_help": {
            name: {key: value for key, value in found.items() if key != "package_names"}
            for name, found in (("before", before_offenders), ("after", after_offenders))
        },
        "packages_no_longer_imported": gone,
        "after_phases_ms": inside,
    }


def table(doc: dict[str, Any]) -> str:
    """The wall times as a fixed-width table."""
    header = (
        f"{'command':<29} {'before p50':>10} {'p90':>7} {'after p50':>10} {'p90':>7} "
        f"{'installed p50':>13} {'saved':>7} {'after/before':>12}"
    )
    lines = [header, "-" * len(header)]
    for key, c in doc["commands"].items():
        lines.append(
            f"{'orchestrator ' + key:<29} {c['before']['median_ms']:>10.1f} {c['before']['p90_ms']:>7.1f} "
            f"{c['after']['median_ms']:>10.1f} {c['after']['p90_ms']:>7.1f} "
            f"{c['installed']['median_ms']:>13.1f} {c['saved_ms']:>7.1f} {c['after_over_before']:>12.2f}"
        )
    lines.append("(ms, wall time of the whole process)")
    return "\n".join(lines)


def details(doc: dict[str, Any]) -> str:
    """Components, import offenders and phases, a few lines each."""
    comp = doc["components"]
    out = [
        "components (median ms): "
        + ", ".join(f"{label} {c['median_ms']:.1f}" for label, c in comp.items())
        + "; removed: "
        + ", ".join(f"{label} {ms:.1f}" for label, ms in doc["removed_imports_ms"].items()),
    ]
    for name in ("before", "after"):
        found = doc["importtime_migrate_help"][name]
        top = ", ".join(f"{t['module']} {t['cumulative_ms']:.1f}" for t in found["top_level"][:TOP])
        packages = ", ".join(f"{p['package']} {p['self_ms']:.1f}" for p in found["packages"][:TOP])
        out.append(
            f"-X importtime migrate --help, {name}: {found['modules']} modules, {found['total_ms']:.1f} ms\n"
            f"  top-level (cumulative ms): {top}\n  packages (self ms): {packages}"
        )
    gone = doc["packages_no_longer_imported"]
    out.append(
        f"no longer imported ({len(gone)} packages, self ms): "
        + (", ".join(f"{p['package']} {p['self_ms']:.1f}" for p in gone[:TOP]) or "-")
        + (", ..." if len(gone) > TOP else "")
    )
    out.append(
        "after, inside one process (median ms): "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in doc["after_phases_ms"].items())
    )
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--runs", type=int, default=20, help="timed runs per command and variant (default 20)"
    )
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    parser.add_argument(
        "--before-rev",
        default=BEFORE_REV,
        help=f"git revision of the 'before' variant (default {BEFORE_REV[:12]})",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    began = time.monotonic()
    python = REPO / ".venv" / "bin" / "python"
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        neutral = work / "cwd"
        neutral.mkdir()
        setup = Setup(
            str(python if python.exists() else sys.executable), extract_before(args.before_rev, work), neutral
        )
        sources = {variant: check_variant(setup, variant) for variant in VARIANTS}
        times = time_commands(setup, args.runs)
        components = time_components(setup, args.runs)
        imports = {
            variant: importtime(setup, variant, ("migrate", "--help")) for variant in ("before", "after")
        }
        inside = phases(setup, args.runs)
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        print(f"startup: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = results(args, times, components, imports, inside, sources, time.monotonic() - began)
    print(table(doc))
    print(details(doc))
    if args.json is not None:
        write_json(args.json, doc)
        print(f"numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
