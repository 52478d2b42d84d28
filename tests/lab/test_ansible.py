"""The Ansible collection `vfio.orchestrator` (deploy/ansible) run by ansible-core against the lab:
the maintenance playbook (check mode changes nothing, a real run evacuates lab-a, a second run changes
nothing) and the `vfio_events` module on its own (idempotent; a domain without VFIO device is ok)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core import domxml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
COLLECTIONS = ANSIBLE_DIR / "collections"
PLAYBOOK = ANSIBLE_DIR / "playbooks" / "maintenance.yml"
BIN = Path(sys.executable).parent
ORCHESTRATOR = str(BIN / "orchestrator")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RECAP = re.compile(r"^localhost\s*:\s*(?P<counts>ok=.*)$", re.MULTILINE)
ADHOC = re.compile(r"^localhost \| (?P<status>[A-Z]+)!? => (?P<result>\{.*\})\s*$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def ansible() -> Path:
    """The venv's ansible-core (the `dev` extra installs it)."""
    if not (BIN / "ansible-playbook").exists():
        reason = f"ansible-core is not installed in {BIN.parent} (run deploy/setup.sh)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return BIN


@dataclass
class Played:
    code: int
    out: str
    err: str

    @property
    def recap(self) -> dict[str, int]:
        """The PLAY RECAP line of localhost: ok, changed, failed, ..."""
        found = RECAP.findall(self.out)
        assert found, f"no PLAY RECAP in:\n{self.out}\n{self.err}"
        return {key: int(value) for key, value in (item.split("=") for item in found[-1].split())}

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def run_ansible(program: Path, args: list[str], tmp: Path, timeout: float = 400) -> Played:
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
    }
    proc = subprocess.run(
        [str(program), "-i", "localhost,", "-c", "local", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Played(proc.returncode, proc.stdout, proc.stderr)


def where(lab: Any, name: str) -> list[str]:
    """The lab hosts on which `name` runs."""
    running = []
    for host, conn in zip(lab.hosts, lab.conns, strict=True):
        dom = conn.find_domain(name)
        if dom is not None and dom.state() in ("running", "paused"):
            running.append(host.name)
    return running


@pytest.fixture
def guests(lab_env: Any) -> Iterator[list[str]]:
    """Names of the guests a test creates; removed from every lab host afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        lab_env.remove(name)


@pytest.mark.timeout(900)
def test_maintenance_playbook_check_then_evacuate_then_idempotent(
    lab_env: Any, ansible: Path, guests: list[str], tmp_path: Path
) -> None:
    prefix = f"ans-{uuid.uuid4().hex[:6]}"
    for index, devices in enumerate((1, 0)):
        guests.append(lab_env.guest(0, name=f"{prefix}-{index}", devices=devices))
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[migration]\ndata_uri = "unix://{lab_env.root}/migrations/{{domain}}.sock"\n')
    marker = tmp_path / "maintenance.done"
    variables = tmp_path / "vars.json"
    variables.write_text(
        json.dumps(
            {
                "source_uri": lab_env.hosts[0].uri,
                "destinations": [lab_env.hosts[1].uri, lab_env.hosts[2].uri],
                "policy": str(policy),
                "journal": str(tmp_path / "journal.sqlite"),
                "maintenance_marker": str(marker),
                "orchestrator": ORCHESTRATOR,
                # Only this test's guests: the session's lab may hold other tests' VMs.
                "include": [f"{prefix}-*"],
            }
        )
    )
    playbook = ansible / "ansible-playbook"
    args = [str(PLAYBOOK), "-e", f"@{variables}"]

    check = run_ansible(playbook, [*args, "--check", "--diff"], tmp_path)
    assert check.code == 0, str(check)
    assert check.recap["failed"] == 0, str(check)
    assert check.recap["changed"] >= 1, str(check)  # the evacuation would move both guests
    for name in guests:
        assert where(lab_env, name) == ["lab-a"], f"{name}: {check}"
        assert name in check.out, str(check)  # the plan and the diff name every guest
    assert not marker.exists(), "check mode wrote the marker"

    first = run_ansible(playbook, args, tmp_path)
    assert first.code == 0, str(first)
    assert first.recap["failed"] == 0, str(first)
    assert first.recap["changed"] >= 2, str(first)  # the evacuation and the maintenance task
    for name in guests:
        assert where(lab_env, name) in (["lab-b"], ["lab-c"]), f"{name}: {first}"
    assert marker.exists()

    second = run_ansible(playbook, args, tmp_path)
    assert second.code == 0, str(second)
    assert second.recap["changed"] == 0, str(second)
    assert second.recap["failed"] == 0, str(second)
    for name in guests:
        assert where(lab_env, name) in (["lab-b"], ["lab-c"]), f"{name}: {second}"


def events_task(
    lab: Any, ansible: Path, tmp: Path, name: str, *flags: str, **options: str
) -> tuple[str, dict[str, Any], Played]:
    """Run vfio_events ad hoc; returns the task's status (SUCCESS, CHANGED, FAILED), its result, the run."""
    module_args = {"domain": name, "uri": lab.hosts[0].uri, "orchestrator": ORCHESTRATOR, **options}
    played = run_ansible(
        ansible / "ansible",
        ["localhost", "-m", "vfio.orchestrator.vfio_events", "-a", json.dumps(module_args), *flags],
        tmp,
        timeout=120,
    )
    found = ADHOC.search(played.out)
    assert found, str(played)
    return found["status"], json.loads(found["result"]), played


def events_on(lab: Any, name: str) -> bool:
    conn = lab.conn(0)
    return bool(domxml.events_status(conn.xml(conn.domain(name), inactive=True)).all_enabled)


def test_vfio_events_module_is_idempotent_and_skips_a_domain_without_vfio(
    lab_env: Any, ansible: Path, guests: list[str], tmp_path: Path
) -> None:
    name = lab_env.guest(0, events=False)
    guests.append(name)
    assert not events_on(lab_env, name)

    status, result, played = events_task(lab_env, ansible, tmp_path, name, "--check", "--diff")
    assert (status, result["changed"], result["dry_run"]) == ("CHANGED", True, True), str(played)
    assert "migration-events" in played.out, str(played)  # the diff of the definition
    assert not events_on(lab_env, name), "check mode changed the definition"

    status, result, played = events_task(lab_env, ansible, tmp_path, name)
    assert (status, result["changed"], result["action"]) == ("CHANGED", True, "enable"), str(played)
    assert events_on(lab_env, name)
    assert where(lab_env, name) == ["lab-a"], "enabling the events restarted the VM"

    status, result, played = events_task(lab_env, ansible, tmp_path, name)
    assert (status, result["changed"]) == ("SUCCESS", False), str(played)
    assert "already on" in result["msg"], str(played)

    status, result, played = events_task(lab_env, ansible, tmp_path, name, state="disabled")
    assert (status, result["changed"]) == ("CHANGED", True), str(played)
    assert not events_on(lab_env, name)

    plain = lab_env.guest(0, devices=0)
    guests.append(plain)
    status, result, played = events_task(lab_env, ansible, tmp_path, plain)
    assert status == "SUCCESS" and result["changed"] is False, str(played)
    assert result["rc"] == 6 and result["skipped_reason"] == result["msg"], str(played)
    assert result["msg"].startswith(f"nothing to do: {plain} has no VFIO device; only VFIO PCI"), str(played)
    assert not result.get("failed"), str(played)


def adhoc(
    ansible: Path, tmp: Path, module: str, args: dict[str, Any], *flags: str
) -> tuple[str, dict[str, Any]]:
    """Run one module ad hoc; its status (SUCCESS, CHANGED, FAILED) and its result."""
    played = run_ansible(
        ansible / "ansible", ["localhost", "-m", module, "-a", json.dumps(args), *flags], tmp, timeout=300
    )
    found = ADHOC.search(played.out)
    assert found, str(played)
    return found["status"], json.loads(found["result"])


def test_vfio_evacuate_check_mode_returns_the_plan_as_objects(
    lab_env: Any, ansible: Path, guests: list[str], tmp_path: Path
) -> None:
    name = lab_env.guest(0, name=f"ansplan-{uuid.uuid4().hex[:6]}")
    guests.append(name)
    args = {
        "source_uri": lab_env.hosts[0].uri,
        "destinations": [lab_env.hosts[1].uri],
        "include": [name],
        "orchestrator": ORCHESTRATOR,
    }
    status, result = adhoc(ansible, tmp_path, "vfio.orchestrator.vfio_evacuate", args, "--check")
    assert status == "CHANGED", result
    (entry,) = result["plan"]
    assert set(entry) == {"domain", "destination", "memory_mib", "order", "reason", "running"}, entry
    assert (entry["domain"], entry["destination"], entry["order"], entry["running"]) == (
        name,
        lab_env.hosts[1].uri,
        1,
        True,
    )
    assert isinstance(entry["memory_mib"], int) and entry["reason"], entry
    assert where(lab_env, name) == ["lab-a"], "check mode moved the VM"


def test_vfio_migrate_failure_lists_the_failed_hook_and_is_not_a_change(
    lab_env: Any, ansible: Path, guests: list[str], tmp_path: Path
) -> None:
    name = lab_env.guest(0, name=f"ansfail-{uuid.uuid4().hex[:6]}")
    guests.append(name)
    policy = tmp_path / "failing.toml"
    policy.write_text(
        f'[migration]\ndata_uri = "unix://{lab_env.root}/migrations/{{domain}}.sock"\n'
        "[[hooks.drain]]\n"
        'name = "disarm-peers"\n'
        'argv = ["/bin/sh", "-c", "echo disarming {device_id}; echo peer 10.0.0.7 refused >&2; exit 3"]\n'
        "timeout_ms = 2000\n"
        'on_failure = "abort"\n'
    )
    args = {
        "domain": name,
        "source_uri": lab_env.hosts[0].uri,
        "dest_uri": lab_env.hosts[1].uri,
        "policy": str(policy),
        "journal": str(tmp_path / "journal.sqlite"),
        "orchestrator": ORCHESTRATOR,
    }
    status, result = adhoc(ansible, tmp_path, "vfio.orchestrator.vfio_migrate", args)
    assert status == "FAILED", result
    assert result["changed"] is False, "an aborted migration leaves the VM where it was: no change"
    assert where(lab_env, name) == ["lab-a"], result
    hook_lines = [
        line for line in result["msg"].splitlines() if line.startswith("drain hook disarm-peers on nic0")
    ]
    assert len(hook_lines) == 1, result["msg"]
    assert "peer 10.0.0.7 refused" in hook_lines[0] and "disarming nic0" in hook_lines[0], result["msg"]
    assert "note:" not in result["msg"], result["msg"]
    lines = result["msg"].splitlines()
    assert len(lines) == len(set(lines)), result["msg"]
