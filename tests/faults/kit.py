"""What the fault tests share: a case (a lab guest, a policy whose hooks log every run, a journal), an
`orchestrator migrate` running in the background that a test can kill at a chosen instant, and the
three facts every fault test ends with (`assert_three_facts`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.runner import RECORD_HOOK, Run, cli

ACTIVE = ("running", "paused")
BACK_ON_SOURCE = ("rolled-back", "aborted", "interrupted")  # outcomes that say: it runs on the source


class UndrainedTwice(AssertionError):
    """A drained device's undrain hooks ran more than once (the hook log says so)."""


class Background:
    """`orchestrator ...` running in the background; its stderr read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._cv = threading.Condition()
        self._ended = 0  # readers that reached the end of their stream
        self._readers = [
            threading.Thread(target=self._read, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._cv:
                lines.append(line)
                self._cv.notify_all()
        with self._cv:
            self._ended += 1
            self._cv.notify_all()

    def wait_line(self, pattern: str, timeout: float = 60.0) -> str:
        """The first stderr line matching `pattern` (waits for it; fails if the process ends first)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.err:
                    if regex.search(line):
                        return line
                if time.monotonic() > deadline or self._ended == len(self._readers):
                    raise AssertionError(f"no stderr line matching {pattern!r}; stderr:\n{''.join(self.err)}")
                self._cv.wait(0.2)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc.poll() is None, f"it already ended ({self.proc.returncode}):\n{''.join(self.err)}"
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 120.0) -> Run:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return Run(code, "".join(self.out), "".join(self.err))

    def stop(self) -> None:
        """End it if a failed test left it running (our own child, by its PID)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


class Case:
    """A lab guest on host 0 (devices nic0..), a policy whose hooks append to a log, and a journal."""

    def __init__(self, lab: Any, tmp: Path, **guest: Any) -> None:
        self.lab, self.tmp = lab, tmp
        self.dst_host, self.dst_conn = lab.hosts[1], lab.conn(1)  # a test may migrate elsewhere
        self.name = lab.guest(0, **guest)
        self.devices = [f"nic{i}" for i in range(guest.get("devices", 1))]
        self.log = tmp / "hooks.ndjson"
        self.journal = tmp / "journal.sqlite"
        self.policy = tmp / "policy.toml"
        self.running: list[Background] = []
        self.write_policy()

    def twin(self, label: str) -> Case:
        """Another run for the same VM and journal, with a policy and hook log of its own."""
        other = copy.copy(self)
        other.log, other.policy = self.tmp / f"{label}.ndjson", self.tmp / f"{label}.toml"
        other.running = []
        return other

    # --- the policy -----------------------------------------------------------------------------
    def hook(self, trigger: str, options: str = "", **keys: object) -> str:
        """One [[hooks.TRIGGER]] table running the record hook (with `options`, e.g. --sleep-ms=N)."""
        argv = [
            str(RECORD_HOOK),
            str(self.log),
            trigger,
            "{domain}",
            "{device_id}",
            "{state}",
            *options.split(),
        ]
        table = f"[[hooks.{trigger}]]\nargv = {json.dumps(argv)}\n"
        return table + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())

    def write_policy(
        self,
        *,
        drain: str = "",
        undrain: str = "",
        drain_keys: dict[str, object] | None = None,
        undrain_keys: dict[str, object] | None = None,
        hooks: str = "",
        migration: str = "",
        switchover: str = "",
        mode: int = 0o600,
    ) -> None:
        """A policy with one recording drain and undrain hook (`drain`/`undrain`: its options), plus
        `hooks` (more tables, e.g. from `hook`), `migration` and `switchover` keys."""
        sock = self.lab.root / "migrations" / f"{self.name}.sock"
        drain_keys = {"timeout_ms": 2000, "on_failure": "abort", **(drain_keys or {})}
        undrain_keys = {"timeout_ms": 5000, "on_failure": "continue", **(undrain_keys or {})}
        self.policy.write_text(
            f'[migration]\ndata_uri = "unix://{sock}"\n{migration}\n[switchover]\n{switchover}\n'
            + self.hook("drain", drain, **drain_keys)
            + self.hook("undrain", undrain, **undrain_keys)
            + hooks
        )
        self.policy.chmod(mode)

    # --- running the orchestrator ----------------------------------------------------------------
    def migrate_args(self, *extra: str) -> list[str]:
        return [
            "migrate",
            self.name,
            self.dst_host.uri,
            "-c",
            self.lab.hosts[0].uri,
            "--policy",
            str(self.policy),
            "--journal",
            str(self.journal),
            "--json",
            *extra,
        ]

    def migrate(self, *extra: str, timeout: float = 120) -> Run:
        return cli(*self.migrate_args(*extra), timeout=timeout)

    def start(self, *extra: str) -> Background:
        run = Background(self.migrate_args(*extra))
        self.running.append(run)
        return run

    def recover(self) -> Run:
        return cli("recover", "--journal", str(self.journal), "--json", timeout=180)

    def history_rows(self) -> list[dict[str, Any]]:
        run = cli("history", "--journal", str(self.journal), "--json")
        assert run.code == 0, run.err
        rows: list[dict[str, Any]] = json.loads(run.out)
        return rows

    def migration_ids(self) -> list[str]:
        return [row["id"] for row in self.history_rows()]

    def history(self, migration_id: str) -> dict[str, Any]:
        run = cli("history", migration_id, "--journal", str(self.journal), "--json")
        assert run.code == 0, run.err
        return dict(run.doc)

    # --- what happened ---------------------------------------------------------------------------
    def hooks(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def ends(self) -> dict[int, dict[str, Any]]:
        """How each hook run ended, by its PID (record-hook writes LOG.ends as it exits or is killed)."""
        ends = self.log.with_name(self.log.name + ".ends")
        if not ends.exists():
            return {}
        return {record["pid"]: record for record in map(json.loads, ends.read_text().splitlines())}

    def calls(self, trigger: str, device: str | None = None) -> list[dict[str, Any]]:
        return [h for h in self.hooks() if h["args"][0] == trigger and device in (None, h["args"][2])]

    def wait_hook(self, trigger: str, timeout: float = 60.0, count: int = 1) -> dict[str, Any]:
        """Until `count` runs of a `trigger` hook have recorded themselves; the last of them."""
        deadline = time.monotonic() + timeout
        while len(found := self.calls(trigger)) < count:
            ended = [run for run in self.running if run.proc.poll() is not None]
            stderr = "".join(ended[0].err if ended else self.running[-1].err if self.running else [])
            assert not ended, f"it ended ({ended[0].proc.returncode}) before a {trigger} hook ran:\n{stderr}"
            assert time.monotonic() < deadline, (
                f"no {trigger} hook ran; hooks: {self.hooks()}; stderr:\n{stderr}"
            )
            time.sleep(0.02)
        return found[count - 1]

    def state(self, host: int) -> str:
        """The VM's state on the source (0) or the destination (1)."""
        dom = (self.dst_conn if host else self.lab.conn(0)).find_domain(self.name)
        return "absent" if dom is None else dom.state()

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop what a test left: our background runs, record hooks still sleeping (by the PIDs they
        logged, checked to be record hooks), and the guest on both hosts."""
        for run in self.running:
            run.stop()
        for entry in self.hooks():
            with contextlib.suppress(OSError):
                if str(RECORD_HOOK) in Path(f"/proc/{entry['pid']}/cmdline").read_text():
                    os.kill(entry["pid"], signal.SIGKILL)
        self.lab.remove(self.name)


def still_drained(actions: list[dict[str, Any]]) -> set[str]:
    """Devices a migration's device actions leave drained (the rule of core.records.still_drained)."""
    drained: set[str] = set()
    for row in sorted(actions, key=lambda r: r["seq"]):
        if row["action"] == "drain" and row["status"] == "starting":
            drained.add(row["device_id"])
        elif row["action"] == "undrain" and row["status"] in ("done", "failed", "ended"):
            drained.discard(row["device_id"])
    return drained


def assert_three_facts(
    case: Case, migration_id: str | None, *, on: str | None = None, recovered: bool = False
) -> str:
    """The three facts after any fault, checked from outside the orchestrator; returns where the VM runs.

    1. Every device that was drained (per the hook log) was undrained exactly once, never before its
       drain hook had ended (per the hook's own record of its end), and none was drained twice (undrain
       runs by `recover` count: they log to the same file).
    2. The VM runs on exactly one host (`on`: which, if the test knows), and is not paused.
    3. The journal tells the truth (`orchestrator history ID`): the outcome matches where the VM runs,
       `recovered` is set if and only if `recover` finished it, and no device is left drained per its
       device actions, which name the very devices the hook log shows drained.
    With `migration_id` None (refused before anything started) the journal must not show a migration
    that did anything. UndrainedTwice is raised for an undrain that ran twice, after checking the rest.
    """
    states = [case.state(0), case.state(1)]
    active = [i for i, state in enumerate(states) if state in ACTIVE]
    assert len(active) == 1, f"the VM must be active on exactly one host: {states}"
    assert states[active[0]] == "running", f"the VM is {states[active[0]]}, not running: {states}"
    where = "source" if active == [0] else "destination"
    assert on in (None, where), f"the VM runs on the {where}, expected the {on}"

    drained = sorted({h["args"][2] for h in case.calls("drain")})
    if migration_id is None:
        assert case.hooks() == [], "refused before anything: no hook ran"
        assert where == "source"
        if case.journal.exists():  # at most refusals, which did nothing
            for row in case.history_rows():
                record = case.history(row["id"])
                assert record["outcome"] == "refused", record
                assert record["hook_runs"] == [] and record["device_actions"] == [], record
        return where

    record = case.history(migration_id)
    outcome = record["outcome"]
    if where == "destination":
        assert outcome == "succeeded", (outcome, record["error"])
    else:
        assert outcome in BACK_ON_SOURCE, (outcome, record["error"])
    assert (record["recovered"] is not None) == recovered, record["recovered"]
    actions = record["device_actions"]
    assert still_drained(actions) == set(), actions
    journaled = sorted({a["device_id"] for a in actions if a["action"] == "drain"})
    assert journaled == drained, (journaled, drained)

    undrained_twice = []
    for device in drained:
        drains, undrains = case.calls("drain", device), case.calls("undrain", device)
        assert len(drains) == 1, f"{device} drained {len(drains)} times: {case.hooks()}"
        assert undrains, f"{device} was drained and never undrained: {case.hooks()}"
        end = case.ends().get(drains[0]["pid"])
        assert end is not None, f"{device}'s drain hook never recorded its end: {case.hooks()}"
        assert end["end"] < undrains[0]["t"], f"{device} undrained before its drain ended: {end}, {undrains}"
        if len(undrains) > 1:
            undrained_twice.append(f"{device} undrained {len(undrains)} times")
    never_drained = {h["args"][2] for h in case.calls("undrain")} - set(drained)
    assert not never_drained, f"undrained without a drain: {never_drained}"
    if undrained_twice:
        raise UndrainedTwice("; ".join(undrained_twice) + f": {case.hooks()}")
    return where
