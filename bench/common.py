"""Helpers shared by the benchmarks in bench/: their own lab, work directory, statistics, output.

The scripts run as programs (`.venv/bin/python bench/NAME.py`), so this module is imported as
`common` from the scripts' directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from orchestrator.core.errors import OrchestratorError
from orchestrator.edges.virt import Host
from orchestrator.lab import hosts as lab_hosts

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench-results"
# libvirt's cache of QEMU capabilities, kept between the benchmarks' labs (libvirtd validates every
# entry against the QEMU binary, libvirt and the kernel, and probes again when one does not match).
CAPS_CACHE = Path("/var/tmp/orch-bench-qemu-caps")
CAPS_SUBDIR = Path("cache") / "qemu" / "capabilities"  # under a lab host's directory
MIGRATE_TIMEOUT_S = 180.0

T = TypeVar("T")


class BenchError(Exception):
    """The benchmark could not measure what it should (one line, printed on exit)."""


# --- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated linearly between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def rounded(value: float, digits: int = 3) -> float | None:
    """`value` rounded for JSON, None for NaN (no data)."""
    return None if math.isnan(value) else round(value, digits)


def fmt(value: float | None, spec: str = ".1f", width: int = 9) -> str:
    """A table cell: the number formatted, or '-' when there is none."""
    text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
    return f"{text:>{width}}"


def xml(text: str) -> str:
    """Escape text for SVG."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_start(width: float, height: float) -> list[str]:
    """The first lines of a standalone SVG: its element (sans-serif, 12 px) and a white background."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]


# --- processes --------------------------------------------------------------------------------------


def program(name: str) -> list[str]:
    """argv prefix of one of the package's programs: the console script beside this Python (what a
    user runs), else `python -m orchestrator` for the main one."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found is not None:
        return [found]
    if name == "orchestrator":
        return [sys.executable, "-m", "orchestrator"]
    raise BenchError(f"{name} is not installed (run deploy/setup.sh)")


def run(
    command: Sequence[str], what: str, env: dict[str, str] | None = None, timeout: float = MIGRATE_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; BenchError with its stderr when it fails."""
    try:
        result = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"{what} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


# The drain hook of the latency benchmarks: its first statement takes the time (CLOCK_REALTIME), then
# it appends "<argv[2]> <argv[3]> <seconds.nanoseconds>" to the file argv[1] with one write.
HOOK_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (argc < 4)
        return 2;
    char line[512];
    int len = snprintf(line, sizeof line, "%s %s %lld.%09ld\n", argv[2], argv[3], (long long)now.tv_sec,
                       now.tv_nsec);
    if (len < 0 || len >= (int)sizeof line)
        return 3;
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return 4;
    ssize_t written = write(fd, line, (size_t)len);
    close(fd);
    return written == len ? 0 : 5;
}
"""


# The armed form of the same hook (the orchestrator's armed-hook protocol, orchestrator/edges/armed_hook.py
# ArmedHook): it prints `ready`, then loops on a blocking read of stdin; its first statement after the
# read returns takes the time (CLOCK_REALTIME), and for each line `ACTION DEVICE STATE QEMU_TIME` it
# appends "<argv[2]> <DEVICE> <seconds.nanoseconds>" to the file argv[1] with one write and answers
# `ok DEVICE`. Lines that arrived in one read share that read's time. It exits 0 when stdin closes.
ARMED_HOOK_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t done = write(fd, data, len);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += done;
        len -= (size_t)done;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int log = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (log < 0)
        return 4;
    if (write_all(1, "ready\n", 6) != 0)
        return 5;
    char buf[8192];
    size_t have = 0;
    for (;;) {
        ssize_t got = read(0, buf + have, sizeof buf - 1 - have);
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        if (got == 0)
            return 0;
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return 6;
        }
        have += (size_t)got;
        char *start = buf, *end = buf + have, *newline;
        while ((newline = memchr(start, '\n', (size_t)(end - start))) != NULL) {
            *newline = '\0';
            char action[32], device[256];
            if (sscanf(start, "%31s %255s", action, device) == 2) {
                char line[512];
                int len = snprintf(line, sizeof line, "%s %s %lld.%09ld\n", argv[2], device,
                                   (long long)now.tv_sec, now.tv_nsec);
                if (len < 0 || len >= (int)sizeof line || write_all(log, line, (size_t)len) != 0)
                    return 7;
                len = snprintf(line, sizeof line, "ok %s\n", device);
                if (len < 0 || len >= (int)sizeof line || write_all(1, line, (size_t)len) != 0)
                    return 8;
            }
            start = newline + 1;
        }
        have = (size_t)(end - start);
        memmove(buf, start, have);
        if (have == sizeof buf - 1)
            have = 0; /* a line longer than the buffer: dropped */
    }
}
"""


def compile_hook(workdir: Path, *, static: bool = False, armed: bool = False) -> Path:
    """Compile HOOK_C (`armed`: ARMED_HOOK_C) with gcc into `workdir` (`static`: linked statically, no
    dynamic loader at start); returns the program's path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc is not installed (the hook is compiled at run time): apt-get install gcc")
    name = "armed_hook" if armed else "drain_hook"
    source = workdir / f"{name}.c"
    source.write_text(ARMED_HOOK_C if armed else HOOK_C)
    program = workdir / (f"{name}_static" if static else name)
    result = subprocess.run(
        [
            gcc,
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            *(["-static"] if static else []),
            "-o",
            str(program),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"gcc failed to compile the hook: {result.stderr.strip()}")
    return program


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks: children stopped, the lab torn down


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143), so that `finally` blocks tear the lab down."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def migrate_command(
    orchestrator: Sequence[str],
    domain: str,
    dest_uri: str,
    source_uri: str,
    policy: str,
    data_uri: str,
    journal: Path,
) -> list[str]:
    """The argv of one `orchestrator migrate ... --json` (`orchestrator`: the program's argv prefix)."""
    return [
        *orchestrator,
        "migrate",
        domain,
        dest_uri,
        "-c",
        source_uri,
        "--policy",
        policy,
        "--migrateuri",
        data_uri,
        "--journal",
        str(journal),
        "--json",  # one JSON document instead of a table: the outcome and the timings
    ]


def in_work_dir(name: str, prefix: str, measure: Callable[[Path], T]) -> T | None:
    """`measure(work)` in a new temporary work directory, removed afterwards unless it fails.

    On a BenchError or OrchestratorError: one line "NAME: error: ..." on stderr and None (the caller
    exits 1); on anything else (SIGTERM's SystemExit included) the exception propagates. Either way
    the work files are kept and stderr says where.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        found = measure(work)
    except (BenchError, OrchestratorError) as exc:
        text = exc.line() if isinstance(exc, OrchestratorError) else str(exc)
        print(f"{name}: error: {text} (work files kept in {work})", file=sys.stderr)
        return None
    except BaseException:
        print(f"{name}: work files kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return found


# --- the benchmark's own lab ------------------------------------------------------------------------


@dataclass
class OwnLab:
    """A running two-host lab of the benchmark's own, with a libvirt connection to each host."""

    root: Path
    hosts: list[lab_hosts.LabHost]
    conns: list[Host]

    @property
    def env(self) -> dict[str, str]:
        """The environment for the orchestrator and its hooks: the lab's directory (the RDMA fabric)."""
        return {**os.environ, "ORCH_LAB_DIR": str(self.root)}

    def data_uri(self, domain: str) -> str:
        """The migration data socket for `domain` (both lab hosts see the same file system)."""
        return f"unix://{self.root}/migrations/{domain}.sock"

    def remove(self, domain: str) -> None:
        """Destroy and undefine `domain` wherever it is."""
        for conn in self.conns:
            conn.destroy_and_undefine(domain)


@contextlib.contextmanager
def lab_root(lab_dir: Path | None) -> Iterator[Path]:
    """`lab_dir`, or a new temporary directory under /var/tmp (short: libvirt's unix socket paths
    live under it), removed on the way out."""
    root = Path(tempfile.mkdtemp(prefix="bench-lab-", dir="/var/tmp")) if lab_dir is None else lab_dir
    try:
        yield root
    finally:
        if lab_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def check_no_lab(root: Path) -> None:
    """A BenchError when a lab already runs in `root`: the benchmark's numbers need a lab of its own."""
    if any(host.running for host in lab_hosts.status(root, with_guests=False)):
        raise BenchError(f"a lab already runs in {root}: the benchmark needs a lab of its own (--lab-dir)")


@contextlib.contextmanager
def own_lab(lab_dir: Path | None, count: int = 2) -> Iterator[OwnLab]:
    """Bring up `count` lab hosts in `lab_dir` (default: a new temporary directory, see `lab_root`)
    and tear them down on the way out, whatever happens (SIGTERM included, with `exit_on_sigterm`)."""
    with lab_root(lab_dir) as root:
        check_no_lab(root)
        conns: list[Host] = []
        try:
            _seed_capabilities(root, count)
            hosts = lab_hosts.up(count, root)
            conns = [Host.open(host.uri) for host in hosts]
            for conn in conns:
                # A lab daemon with an empty cache probes every installed QEMU binary (seconds each)
                # the first time it is asked for its capabilities: pay that here, not in the first
                # measured migration.
                conn.conn.getCapabilities()
            yield OwnLab(root, hosts, conns)
        finally:
            for conn in conns:
                conn.close()
            for host in lab_hosts.status(root, with_guests=False):
                _keep_capabilities(host)  # also what starting a guest added (its machine types)
            lab_hosts.down(root)


def _seed_capabilities(root: Path, count: int) -> None:
    """Give each lab host to be started a copy of the kept QEMU capabilities cache, if there is one."""
    kept = sorted(CAPS_CACHE.glob("*.xml")) if CAPS_CACHE.is_dir() else []
    for name in lab_hosts.HOST_NAMES[:count] if kept else ():
        target = root / "hosts" / name / CAPS_SUBDIR
        target.mkdir(parents=True, exist_ok=True)
        for entry in kept:
            shutil.copy2(entry, target / entry.name)


def _keep_capabilities(host: lab_hosts.LabHost) -> None:
    """Keep a lab host's QEMU capabilities cache for the next lab (each file replaced atomically)."""
    with contextlib.suppress(OSError):  # only an optimisation
        CAPS_CACHE.mkdir(exist_ok=True)
        for entry in (host.dir / CAPS_SUBDIR).glob("*.xml"):
            partial = CAPS_CACHE / f".{entry.name}.{os.getpid()}"
            shutil.copy2(entry, partial)
            partial.replace(CAPS_CACHE / entry.name)


# --- output -------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)}


def write_json(path: Path, doc: dict[str, Any], indent: int = 2) -> None:
    """Write `doc` as indented JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent) + "\n")
