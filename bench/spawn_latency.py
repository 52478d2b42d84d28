#!/usr/bin/env python3
"""Spawn latency: from just before the call that starts a drain hook to the hook's own first instruction.

No lab. One process shaped like the orchestrator during a migration starts the C drain hook of
bench/drain_latency.py (bench/common.py's HOOK_C, compiled here with gcc: its first statement records
CLOCK_REALTIME) from a non-main thread, --count times per variant, the variants taking turns spawn by
spawn (and the first of each round rotating) so that all see the same machine conditions. The
process: libvirt, lxml, sqlite3 and the orchestrator imported; libvirt's event loop thread running
with a test:///default connection open; the journal open; 6 idle threads; ~8 MiB of heap; 40
extra close-on-exec descriptors standing in for connections and other hooks' pipes, and 2 that are
not close-on-exec (a library's careless descriptor). The hook's environment is the orchestrator's (with
the hooks' PATH) and the placeholders' ORCH_* values.

For each start: CLOCK_REALTIME just before the call, again when it returns (`call`), and the hook's
own first-instruction time (`first instruction`). The variants:

- popen: subprocess.Popen as `_spawn` called it before (close_fds=True, start_new_session=True);
  CPython 3.11 forks with vfork() here (no preexec_fn, no user/group change) and closes the other
  descriptors in the child with close_range(2);
- popen-no-close-fds: the same with close_fds=False (what close_fds costs);
- popen-path: the same, with the hook given by name and found on PATH (its directory last; Popen's
  child tries execve in each directory);
- popen-fork: the same with subprocess._USE_VFORK = False: a real fork() of this address space;
- posix_spawn+scan: os.posix_spawn (new session, pipe on stdout and stderr, /dev/null on stdin), with
  a close action for every descriptor /proc/self/fd lists without FD_CLOEXEC;
- posix_spawn-cloexec: the same without the scan, trusting close-on-exec (leaks the 2 careless
  descriptors: shown for what the scan costs, not a candidate);
- supervisor: orchestrator.edges.hook_runner.HookRunner.start as a migration calls it now: one message
  to the hook supervisor (a small process forked before any thread), which starts the hook with
  posix_spawnp and writes its start into the run log (here: none attached);
- supervisor-path: the same, with the hook given by name and found on PATH (its directory last);
- supervisor-static: the same with the hook linked statically (no dynamic loader: the hook's share).

After the timed runs every variant starts `sleep` once and the descriptors the child holds (from
/proc/PID/fd) are counted: anything above 2 leaked from this process.

Usage: .venv/bin/python bench/spawn_latency.py [--count N] [--gap-ms MS] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import lxml.etree
from common import BenchError, compile_hook, in_work_dir, machine, percentile, rounded, write_json

from orchestrator.core import hooks
from orchestrator.edges import virt
from orchestrator.edges.hook_runner import HookRunner
from orchestrator.edges.journal import Journal
from orchestrator.edges.supervisor import Supervisor, hook_path
from orchestrator.edges.supervisor_process import HOOK_RUN_ENV

IDLE_THREADS = 6
HEAP_OBJECTS = 25_000  # small dicts with a string each: ~8 MiB
CLOEXEC_FDS = 40  # 20 pipes
CARELESS_FDS = 2  # one pipe, not close-on-exec
VALUES = {"domain": "vm1", "device_id": "hostdev0", "state": "pre-copy-p2p-prepare"}
SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)  # what Popen's restore_signals resets


@dataclass
class Started:
    """A started hook: its pid (0: found by `find_pid`, when needed) and how to reap it, close its pipe."""

    pid: int
    finish: Callable[[], None]
    find_pid: Callable[[], int] | None = None

    def process(self) -> int:
        return self.pid or (self.find_pid() if self.find_pid is not None else 0)


Start = Callable[[list[str], dict[str, str]], Started]


@dataclass
class Variant:
    """One way to start the hook, and what it measured."""

    key: str
    what: str
    start: Start
    hook: str = "dynamic"  # dynamic, static, or path (dynamic, by name)
    call_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    leaked: int | None = None


def _popen_started(process: subprocess.Popen[bytes]) -> Started:
    def finish() -> None:
        process.wait()
        assert process.stdout is not None
        process.stdout.close()

    return Started(process.pid, finish)


def popen(argv: list[str], env: dict[str, str], *, close_fds: bool = True) -> Started:
    """subprocess.Popen with `_spawn`'s former arguments."""
    return _popen_started(
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=close_fds,
            start_new_session=True,
        )
    )


def popen_fork(argv: list[str], env: dict[str, str]) -> Started:
    """Popen forced to fork() (only the measuring thread spawns, so the switch is safe here)."""
    subprocess._USE_VFORK = False  # type: ignore[attr-defined]
    try:
        return popen(argv, env)
    finally:
        subprocess._USE_VFORK = True  # type: ignore[attr-defined]


def _careless_fds() -> list[int]:
    """This process's descriptors above 2 without FD_CLOEXEC, from /proc/self/fd."""
    found = []
    for name in os.listdir("/proc/self/fd"):  # noqa: PTH208 - measured: the quickest listing
        fd = int(name)
        if fd > 2:
            try:
                if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                    found.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
    return found


def posix_spawn(argv: list[str], env: dict[str, str], *, scan: bool = True) -> Started:
    """os.posix_spawn: new session, pipe on stdout+stderr, /dev/null on stdin (+ closing what leaks)."""
    read_end, write_end = os.pipe()
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_DUP2, write_end, 1),
        (os.POSIX_SPAWN_DUP2, write_end, 2),
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
    ]
    if scan:
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _careless_fds()]
    try:
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=SIGDEF)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)

    def finish() -> None:
        os.waitpid(pid, 0)
        os.close(read_end)

    return Started(pid, finish)


_RUNNERS: dict[str, HookRunner] = {}  # by PATH: a supervisor each, started before any thread


def start_supervisors(*envs: dict[str, str]) -> None:
    """One hook supervisor per environment (PATH), forked now, as the CLI forks its own first thing."""
    for env in envs:
        _RUNNERS.setdefault(env["PATH"], HookRunner(Supervisor.start(env)))


def _pid_of(runner: HookRunner, run: str) -> int:
    """The process of a supervised run, by its ORCH_HOOK_RUN entry (the benchmark's leak count only)."""
    tag = f"{HOOK_RUN_ENV}={runner.supervisor.tag(run)}".encode()
    for _ in range(1000):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    environ = Path(f"/proc/{entry.name}/environ").read_bytes()
                except OSError:
                    continue
                if tag in environ.split(b"\0"):
                    return int(entry.name)
        time.sleep(0.001)
    raise BenchError(f"no process of run {run}")


def orchestrator_spawn(argv: list[str], env: dict[str, str]) -> Started:
    """HookRunner.start, as a migration's event thread calls it: one message to the supervisor."""
    runner = _RUNNERS[env["PATH"]]
    running = runner.start(hooks.Hook(hooks.Trigger.DRAIN, tuple(argv), timeout_ms=60000), {})
    run = running.run or ""

    def finish() -> None:
        result = running.wait()
        if result.pid is None:  # it never started: the benchmark measured nothing
            raise BenchError(f"the supervisor could not start the hook: {result.error}")

    return Started(0, finish, lambda: _pid_of(runner, run))


def variants() -> list[Variant]:
    """The variants, in the order of the table."""
    return [
        Variant("popen", "Popen, close_fds, new session (before)", popen),
        Variant("popen-no-close-fds", "Popen, close_fds=False", lambda a, e: popen(a, e, close_fds=False)),
        Variant("popen-path", "Popen, hook found on PATH", popen, hook="path"),
        Variant("popen-fork", "Popen with fork() instead of vfork()", popen_fork),
        Variant("posix_spawn+scan", "os.posix_spawn + /proc/self/fd scan", posix_spawn),
        Variant(
            "posix_spawn-cloexec",
            "os.posix_spawn, CLOEXEC only (leaks)",
            lambda a, e: posix_spawn(a, e, scan=False),
        ),
        Variant("supervisor", "HookRunner.start via the hook supervisor (now)", orchestrator_spawn),
        Variant("supervisor-path", "the supervisor, hook found on PATH", orchestrator_spawn, hook="path"),
        Variant("supervisor-static", "the supervisor, static hook", orchestrator_spawn, hook="static"),
    ]


# --- the process around the measurement ---------------------------------------------------------------


@dataclass
class Ballast:
    """What makes this process look like the orchestrator; `close()` releases it."""

    conn: Any
    journal: Journal
    fds: list[int]
    heap: list[Any]
    stop: threading.Event

    def close(self) -> None:
        self.stop.set()
        for fd in self.fds:
            os.close(fd)
        self.journal.close()
        self.conn.close()


def shape_process(work: Path) -> Ballast:
    """libvirt's event loop and a connection, the journal, idle threads, heap and descriptors."""
    virt.ensure_event_loop()  # libvirt's event thread, as the orchestrator runs it
    conn = libvirt.open("test:///default")
    journal = Journal.open(work / "journal.sqlite")
    stop = threading.Event()
    for n in range(IDLE_THREADS):
        threading.Thread(target=stop.wait, name=f"idle-{n}", daemon=True).start()
    # A parsed domain definition, then dicts and strings: ~8 MiB of ordinary Python heap.
    heap: list[Any] = [lxml.etree.fromstring(conn.lookupByName("test").XMLDesc(0))]
    heap += [{"n": n, "text": f"{n:064d}"} for n in range(HEAP_OBJECTS)]
    fds: list[int] = []
    for _ in range(CLOEXEC_FDS // 2):
        fds += os.pipe()
    careless = os.pipe()
    for fd in careless:
        os.set_inheritable(fd, True)
    fds += careless
    return Ballast(conn, journal, fds, heap, stop)


# --- measuring ----------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The hooks and the environment."""

    hook: Path
    static_hook: Path
    log: Path
    env: dict[str, str]
    path_env: dict[str, str]


def _argv(setup: Setup, variant: Variant, index: int) -> tuple[list[str], dict[str, str]]:
    args = [str(setup.log), variant.key, str(index)]
    if variant.hook == "static":
        return [str(setup.static_hook), *args], setup.env
    if variant.hook == "path":
        return [setup.hook.name, *args], setup.path_env
    return [str(setup.hook), *args], setup.env


def measure_all(setup: Setup, all_variants: list[Variant], count: int, gap_s: float) -> None:
    """`count` starts per variant, alternating; fills each variant's call_ms (first_ms: `collect`)."""
    starts: dict[tuple[str, int], int] = {}
    for index in range(count):
        turn = index % len(all_variants)
        for variant in all_variants[turn:] + all_variants[:turn]:
            argv, env = _argv(setup, variant, index)
            before = time.time_ns()
            started = variant.start(argv, env)
            after = time.time_ns()
            started.finish()
            starts[(variant.key, index)] = before
            variant.call_ms.append((after - before) / 1e6)
            time.sleep(gap_s)  # the previous hook's exit and our reaping out of the way
    first: dict[tuple[str, int], int] = {}
    for line in setup.log.read_text().splitlines():
        key, index_text, stamp = line.split()
        seconds, nanos = stamp.split(".")
        first[(key, int(index_text))] = int(seconds) * 10**9 + int(nanos)
    for variant in all_variants:
        for index in range(count):
            hook_ns = first.get((variant.key, index))
            if hook_ns is None:
                raise BenchError(f"{variant.key}: start {index} left no time in {setup.log}")
            variant.first_ms.append((hook_ns - starts[(variant.key, index)]) / 1e6)


def count_leaks(all_variants: list[Variant], env: dict[str, str]) -> None:
    """Start `sleep` with each variant and count the descriptors above 2 it holds once settled."""
    sleep = ["/bin/sleep", "30"]
    for variant in all_variants:
        started = variant.start(sleep, env)
        try:
            # The call returns when the child has begun its exec: the kernel closes close-on-exec
            # descriptors a little later, and sleep's dynamic loader opens libc for a moment.
            time.sleep(0.1)
            pid = started.process()
            held = [int(entry.name) for entry in Path(f"/proc/{pid}/fd").iterdir()]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.process(), signal.SIGKILL)
            started.finish()
        variant.leaked = sum(1 for fd in held if fd > 2)


def resident_mib() -> float:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_in_thread(target: Callable[[], None]) -> None:
    """Run `target` in a new (non-main) thread, as libvirt's event thread starts hooks; re-raise."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    thread = threading.Thread(target=body, name="spawner")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the hooks, shape the process, measure every variant; returns the JSON document."""
    hook, static_hook = compile_hook(work), compile_hook(work, static=True)
    env = {**os.environ, "PATH": hook_path(), **hooks.hook_values_env(VALUES)}
    setup = Setup(hook, static_hook, work / "hook.log", env, {**env, "PATH": f"{env['PATH']}:{work}"})
    inherited = len(_careless_fds())  # from whoever started us: they leak too where nothing closes them
    start_supervisors(setup.env, setup.path_env)  # before the threads of the orchestrator's shape
    ballast = shape_process(work)
    all_variants = variants()
    began = time.monotonic()
    try:
        threads = threading.active_count()
        run_in_thread(lambda: measure_all(setup, all_variants, args.count, args.gap_ms / 1000))
        run_in_thread(lambda: count_leaks(all_variants, env))
        fds = sum(1 for _ in Path("/proc/self/fd").iterdir())
        rss_mib = resident_mib()
    finally:
        ballast.close()
    return {
        "config": {
            "command": " ".join(["bench/spawn_latency.py", *args.argv]),
            "count": args.count,
            "gap_ms": args.gap_ms,
            "threads": threads,
            "fds": fds,
            "rss_mib": rss_mib,
            "env_vars": len(env),
            "not_cloexec_fds": {"inherited": inherited, "ours": CARELESS_FDS},
            "posix_spawn_available": False,
            **machine(),
        },
        "elapsed_s": round(time.monotonic() - began, 1),
        "variants": {
            v.key: {
                "what": v.what,
                "call": stats(v.call_ms),
                "first_instruction": stats(v.first_ms),
                "leaked_fds": v.leaked,
                "first_instruction_ms": [round(x, 4) for x in v.first_ms],
            }
            for v in all_variants
        },
    }


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99, max in ms."""
    return {
        "p50_ms": rounded(percentile(values, 50), 4),
        "p90_ms": rounded(percentile(values, 90), 4),
        "p99_ms": rounded(percentile(values, 99), 4),
        "max_ms": rounded(max(values), 4) if values else None,
    }


# --- reporting ----------------------------------------------------------------------------------------


def table(doc: dict[str, Any]) -> str:
    """One line per variant: the call's p50, then the first instruction's p50/p90/p99/max, leaks."""
    header = (
        f"{'variant':<20} {'what':<40} {'call p50':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'leaked':>6}"
    )
    lines = [header, "-" * len(header)]
    for key, v in doc["variants"].items():
        first = v["first_instruction"]
        lines.append(
            f"{key:<20} {v['what']:<40} {v['call']['p50_ms']:>9.3f} {first['p50_ms']:>8.3f} "
            f"{first['p90_ms']:>8.3f} {first['p99_ms']:>8.3f} {first['max_ms']:>8.3f} {v['leaked_fds']:>6}"
        )
    before, after = (
        doc["variants"]["popen"]["first_instruction"],
        doc["variants"]["supervisor"]["first_instruction"],
    )
    lines.append(
        f"before -> after (popen -> supervisor), to the first instruction: p50 {before['p50_ms']:.3f} -> "
        f"{after['p50_ms']:.3f} ms, p99 {before['p99_ms']:.3f} -> {after['p99_ms']:.3f} ms"
    )
    config = doc["config"]
    lines.append(
        f"{config['count']} starts per variant from a non-main thread; {config['threads']} threads, "
        f"{config['fds']} descriptors ({config['not_cloexec_fds']['inherited']} inherited + "
        f"{config['not_cloexec_fds']['ours']} of ours not close-on-exec), {config['rss_mib']} MiB resident, "
        f"{config['env_vars']} environment variables; "
        f"{config['cpus']} CPUs, load {config['load_1m']}; {doc['elapsed_s']:.0f} s"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1000, help="starts per variant (default 1000)")
    parser.add_argument(
        "--gap-ms", type=float, default=1.0, help="pause after each hook has been reaped (default 1 ms)"
    )
    parser.add_argument("--json", type=Path, help="write the numbers as JSON here")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.argv = raw
    if args.count < 1:
        parser.error("--count must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 with one line on stderr otherwise."""
    args = parse_args(argv)
    doc = in_work_dir("spawn_latency", "spawn-latency-", lambda work: measure(args, work))
    if doc is None:
        return 1
    print(table(doc))
    if args.json is not None:
        write_json(args.json, doc, indent=1)
        print(f"numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
