"""Helpers shared by the lab and fault tests: the `orchestrator` program run as a subprocess (`cli`,
`Run`), the hook that records its calls (`RECORD_HOOK`), and one migration's scenario (`Scenario`): a
guest, a policy whose hooks record into a log, and a journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD_HOOK = Path(__file__).resolve().parent.parent / "hooks" / "record-hook"


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.out)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


class Scenario:
    """A guest, a policy whose hooks record into a log, and a journal, for one test."""

    def __init__(self, lab: Any, tmp: Path, src: int = 0, dst: int = 1, **guest: Any) -> None:
        self.lab, self.tmp, self.src, self.dst = lab, tmp, src, dst
        self.name = lab.guest(src, **guest)
        self.log = tmp / "hooks.ndjson"
        self.journal = tmp / "journal.sqlite"
        self.policy = tmp / "policy.toml"
        self.write_policy()

    def write_policy(
        self,
        drain: str = "",
        undrain: str = "",
        drain_timeout_ms: int = 2000,
        on_failure: str = "abort",
        extra: str = "",
    ) -> None:
        def argv(trigger: str, opts: str) -> str:
            items = [str(RECORD_HOOK), str(self.log), trigger, "{domain}", "{device_id}", "{state}"]
            items += opts.split() if opts else []
            return json.dumps(items)

        sock = self.lab.root / "migrations" / f"{self.name}.sock"
        self.policy.write_text(
            f"""
[migration]
data_uri = "unix://{sock}"
{extra}
[[hooks.drain]]
argv = {argv("drain", drain)}
timeout_ms = {drain_timeout_ms}
on_failure = "{on_failure}"
[[hooks.undrain]]
argv = {argv("undrain", undrain)}
timeout_ms = 5000
on_failure = "continue"
"""
        )

    def migrate(self, *extra: str, env: dict[str, str] | None = None) -> Run:
        return cli(
            "migrate",
            self.name,
            self.lab.hosts[self.dst].uri,
            "-c",
            self.lab.hosts[self.src].uri,
            "--policy",
            str(self.policy),
            "--journal",
            str(self.journal),
            "--json",
            *extra,
            env=env,
        )

    def hooks(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def calls(self, trigger: str) -> list[dict[str, Any]]:
        return [h for h in self.hooks() if h["args"][0] == trigger]

    def ends(self) -> dict[int, dict[str, Any]]:
        """How each hook run ended, by PID (record-hook's LOG.ends)."""
        ends = self.log.with_name(self.log.name + ".ends")
        lines = ends.read_text().splitlines() if ends.exists() else []
        return {record["pid"]: record for record in map(json.loads, lines)}

    def history(self, migration_id: str) -> dict[str, Any]:
        run = cli("history", migration_id, "--journal", str(self.journal), "--json")
        assert run.code == 0, run.err
        return run.doc

    def event_time(self, record: dict[str, Any], role: str, device: str, state: str) -> float:
        times = [
            e["qemu_time"]
            for e in record["events"]
            if e["kind"] == "vfio" and e["role"] == role and e["device_id"] == device and e["state"] == state
        ]
        assert len(times) == 1, (role, device, state, record["events"])
        return float(times[0])

    def running_on(self, index: int) -> bool:
        dom = self.lab.conn(index).find_domain(self.name)
        return dom is not None and dom.state() == "running"

    def remove(self) -> None:
        self.lab.remove(self.name)


def assert_paired(sc: Scenario, devices: list[str]) -> None:
    """Every drained device was undrained exactly once, after its drain."""
    for device in devices:
        drains = [h for h in sc.calls("drain") if h["args"][2] == device]
        undrains = [h for h in sc.calls("undrain") if h["args"][2] == device]
        assert len(drains) == 1 and len(undrains) == 1, (device, sc.hooks())
        assert drains[0]["t"] < undrains[0]["t"]
