"""The vfio.orchestrator Ansible modules' own logic, without libvirt: the CLI is faked at
AnsibleModule.run_command, the modules run as Ansible runs them (arguments in, one JSON result out)."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

COLLECTIONS = Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "collections"
PREFIX = "ansible_collections.vfio.orchestrator.plugins"

basic = pytest.importorskip("ansible.module_utils.basic", reason="ansible-core is not installed")


@pytest.fixture(scope="module")
def plugins() -> Iterator[dict[str, ModuleType]]:
    """The collection's modules, imported from the repository (as ansible-test's import test does)."""
    sys.path.insert(0, str(COLLECTIONS))
    try:
        yield {
            name: importlib.import_module(f"{PREFIX}.{kind}.{name}")
            for kind, name in (
                ("module_utils", "orchestrator_cli"),
                ("modules", "vfio_migrate"),
                ("modules", "vfio_evacuate"),
                ("modules", "vfio_events"),
            )
        }
    finally:
        sys.path.remove(str(COLLECTIONS))


def hook(trigger: str, label: str, device: str | None, ok: bool, **fields: Any) -> dict[str, Any]:
    return {
        "trigger": trigger,
        "label": label,
        "device_id": device,
        "ok": ok,
        "error": None,
        "output_tail": "",
        **fields,
    }


ROLLED_BACK = {
    "migration_id": "3f2a9c1e0b7d4e55",
    "domain": "vm1",
    "source": "qemu+ssh://a/system",
    "destination": "qemu+ssh://b/system",
    "policy": "rdma-drain",
    "outcome": "rolled-back",
    "changed": False,
    "error": "drain hook rdma-drain failed on nic0: exit status 1",
    "notes": ["aborting: drain hook rdma-drain failed on nic0: exit status 1"],
    "hooks": [
        hook("before", "check", None, False, error="exit status 2", output_tail="busy\n"),
        hook("before", "check", None, True),  # its retry succeeded: not a failure
        hook(
            "drain",
            "rdma-drain",
            "nic0",
            False,
            error="exit status 1",
            output_tail="disarming peers\npeer 10.0.0.7: connection refused\n",
        ),
        hook("drain", "rdma-drain", "nic1", True),
        hook("undrain", "rdma-drain", "nic0", False, error="timed out after 5000 ms", output_tail=""),
    ],
    "timings": {"total_s": 2.5, "job_s": None, "downtime_ms": None},
    "devices": {},
    "timeline": [],
    "plan": [],
}


# --- pure helpers ---------------------------------------------------------------------------------


def test_failed_hooks_one_line_each_last_attempt_only(plugins: dict[str, ModuleType]) -> None:
    lines = plugins["vfio_migrate"].failed_hooks(ROLLED_BACK)
    assert lines == [
        "drain hook rdma-drain on nic0: exit status 1; "
        "output: disarming peers / peer 10.0.0.7: connection refused",
        "undrain hook rdma-drain on nic0: timed out after 5000 ms",
    ]


def test_a_long_output_tail_keeps_its_end(plugins: dict[str, ModuleType]) -> None:
    doc = {
        "hooks": [
            hook("drain", "x", "nic0", False, error="exit status 1", output_tail="a" * 1000 + "\nTHE END")
        ]
    }
    (line,) = plugins["vfio_migrate"].failed_hooks(doc)
    assert line.endswith("THE END") and "..." in line and len(line) < 400


def test_failure_message_is_the_error_then_the_hooks_and_no_notes(plugins: dict[str, ModuleType]) -> None:
    message = plugins["vfio_migrate"].failure_message(4, ROLLED_BACK, "")
    lines = message.splitlines()
    assert lines[0] == ROLLED_BACK["error"]
    assert lines[1:] == plugins["vfio_migrate"].failed_hooks(ROLLED_BACK)
    assert "aborting" not in message and "note:" not in message
    assert len(lines) == len(set(lines))


@pytest.mark.parametrize(
    ("outcome", "changed", "check_mode", "expected"),
    [
        ("succeeded", True, False, True),
        ("unchanged", False, False, False),
        ("rolled-back", False, False, False),
        ("aborted", False, False, False),
        ("interrupted", False, False, False),
        ("planned", False, True, True),
        ("unchanged", False, True, False),
    ],
)
def test_changed_is_the_cli_changed_field(
    plugins: dict[str, ModuleType], outcome: str, changed: bool, check_mode: bool, expected: bool
) -> None:
    assert (
        plugins["vfio_migrate"].is_changed({"outcome": outcome, "changed": changed}, check_mode) is expected
    )
    assert plugins["vfio_migrate"].is_changed(None, check_mode) is False


def test_plan_entries_are_objects_with_the_documented_keys(plugins: dict[str, ModuleType]) -> None:
    doc = {
        "plan": [
            {
                "domain": "b",
                "destination": "qemu+ssh://c/system",
                "memory_mib": 2048,
                "order": 2,
                "reason": "r2",
                "running": False,
                "extra": "dropped",
            },
            {
                "domain": "a",
                "destination": "qemu+ssh://b/system",
                "memory_mib": 4096,
                "order": 1,
                "reason": "r1",
            },
            "move c somewhere",  # prose from an incompatible CLI: never passed on
        ]
    }
    assert plugins["vfio_evacuate"].plan_entries(doc) == [
        {
            "domain": "a",
            "destination": "qemu+ssh://b/system",
            "memory_mib": 4096,
            "order": 1,
            "reason": "r1",
            "running": True,
        },
        {
            "domain": "b",
            "destination": "qemu+ssh://c/system",
            "memory_mib": 2048,
            "order": 2,
            "reason": "r2",
            "running": False,
        },
    ]
    assert plugins["vfio_evacuate"].plan_entries(None) == []


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        (
            "orchestrator: watching\norchestrator: error: no domain 'x'; list them\n",
            "no domain 'x'; list them",
        ),
        ("<3>orchestrator: error: bad\n", "bad"),
        (
            "orchestrator: nothing to do: vm1 has no VFIO device; only ...\n",
            "nothing to do: vm1 has no VFIO device; only ...",
        ),
        ("something broke\nnote: aborting: x\norchestrator: warning: y\n", "something broke"),
        ("", ""),
    ],
)
def test_error_line(plugins: dict[str, ModuleType], stderr: str, line: str) -> None:
    assert plugins["orchestrator_cli"].error_line(stderr) == line


# --- the modules as Ansible runs them ---------------------------------------------------------------


def run_module(
    module: ModuleType,
    args: dict[str, Any],
    rc: int,
    out: str,
    err: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[dict[str, Any], list[str]]:
    """Run `module.main()` with `args`, the CLI answering (rc, out, err); its result and the argv run."""
    calls: list[list[str]] = []

    def run_command(self: Any, argv: list[str], check_rc: bool = False, **_kw: Any) -> tuple[int, str, str]:
        calls.append(list(argv))
        return rc, out, err

    monkeypatch.setattr(basic, "_ANSIBLE_ARGS", json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode())
    # ansible-core >= 2.19 serializes results by profile (absent before)
    monkeypatch.setattr(basic, "_ANSIBLE_PROFILE", "legacy", raising=False)
    monkeypatch.setattr(basic.AnsibleModule, "run_command", run_command)
    monkeypatch.setattr(
        basic.AnsibleModule, "get_bin_path", lambda self, name, required=False: f"/usr/bin/{name}"
    )
    with pytest.raises(SystemExit):
        module.main()
    result = json.loads(capsys.readouterr().out)
    (argv,) = calls
    return result, argv


def test_vfio_migrate_failure(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    args = {"domain": "vm1", "dest_uri": "qemu+ssh://b/system", "source_uri": "qemu+ssh://a/system"}
    result, argv = run_module(
        plugins["vfio_migrate"], args, 4, json.dumps(ROLLED_BACK), "", monkeypatch, capsys
    )
    assert argv[-1] == "--json" and argv[1:4] == ["migrate", "vm1", "qemu+ssh://b/system"]
    assert result["failed"] is True and result["changed"] is False and result["rc"] == 4
    assert result["msg"].splitlines()[0] == ROLLED_BACK["error"]
    assert "drain hook rdma-drain on nic0: exit status 1; output:" in result["msg"]
    assert result["outcome"] == "rolled-back" and result["hooks"] == ROLLED_BACK["hooks"]


def test_vfio_migrate_success_is_changed(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    doc = {**ROLLED_BACK, "outcome": "succeeded", "changed": True, "error": None, "hooks": [], "notes": []}
    args = {"domain": "vm1", "dest_uri": "qemu+ssh://b/system"}
    result, _ = run_module(plugins["vfio_migrate"], args, 0, json.dumps(doc), "", monkeypatch, capsys)
    assert result["changed"] is True and not result.get("failed")
    assert result["msg"] == "migrated vm1 to qemu+ssh://b/system (succeeded)"


def test_vfio_evacuate_returns_the_structured_plan(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    placement = {
        "domain": "vm1",
        "destination": "qemu+ssh://b/system",
        "memory_mib": 64,
        "order": 1,
        "reason": "most free memory that fits",
        "running": True,
    }
    doc = {
        "evacuation_id": "9d41",
        "source": "qemu+ssh://a/system",
        "destinations": ["qemu+ssh://b/system"],
        "changed": False,
        "dry_run": True,
        "empty": False,
        "plan": [placement],
        "unplaced": [],
        "unreachable": [],
        "results": [],
        "left": ["vm1"],
        "message": "dry run: nothing moved",
    }
    args = {
        "source_uri": "qemu+ssh://a/system",
        "destinations": ["qemu+ssh://b/system"],
        "_ansible_check_mode": True,
    }
    result, argv = run_module(plugins["vfio_evacuate"], args, 0, json.dumps(doc), "", monkeypatch, capsys)
    assert "--dry-run" in argv
    assert result["plan"] == [placement]
    assert result["changed"] is True and result["msg"] == "would move 1 VM(s) off qemu+ssh://a/system"


def test_vfio_events_nothing_to_do_is_ok_with_the_cli_line(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    err = "orchestrator: nothing to do: vm1 has no VFIO device; only VFIO PCI or mdev hostdevs ...\n"
    result, _ = run_module(plugins["vfio_events"], {"domain": "vm1"}, 6, "", err, monkeypatch, capsys)
    assert result["changed"] is False and result["failed"] is False and result["rc"] == 6
    assert (
        result["msg"]
        == result["skipped_reason"]
        == "nothing to do: vm1 has no VFIO device; only VFIO PCI or mdev hostdevs ..."
    )
