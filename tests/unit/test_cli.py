"""The CLI's own behaviour that needs no libvirt: --version, history on a missing journal, help text,
and bad option values as one line in our own words."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; its exit code, stdout and stderr."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# --- history ----------------------------------------------------------------------------------------


def test_history_of_a_missing_journal_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = tmp_path / "state" / "journal.sqlite"
    assert run(["history", "--journal", str(journal)], capsys) == (0, "", "no migrations recorded\n")
    code, out, err = run(["history", "--journal", str(journal), "--json"], capsys)
    assert (code, json.loads(out), err) == (0, [], "")
    code, out, err = run(["history", "3f2a", "--journal", str(journal)], capsys)
    assert code == 2
    assert err.startswith(
        f"orchestrator: error: no migration 3f2a in {journal} (there is no journal there yet)"
    )
    assert list(tmp_path.iterdir()) == [], "history created a file or directory"


def test_history_reads_an_existing_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.journal import Journal, MigrationKind

    journal = tmp_path / "journal.sqlite"
    with Journal.open(journal) as writer:
        writer.begin_migration(
            "3f2a9c",
            MigrationKind.MIGRATE,
            "vm1",
            "qemu:///system",
            "qemu+ssh://b/system",
            "default",
            1_700_000_000.0,
        )
    code, out, _ = run(["history", "--journal", str(journal), "--json"], capsys)
    assert code == 0
    assert [row["id"] for row in json.loads(out)] == ["3f2a9c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.sqlite"]


# --- --version ---------------------------------------------------------------------------------------


def test_version_is_the_installed_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    expected = f"orchestrator {metadata.version('vfio-migration-orchestrator')}\n"
    assert run(["--version"], capsys) == (0, expected, "")
    assert "--version" in run(["--help"], capsys)[1]


def test_version_imports_nothing_heavy() -> None:
    probe = (
        "import sys\n"
        "from orchestrator.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('pydantic', 'libvirt', 'lxml', 'rich', 'orchestrator.virt', 'orchestrator.migration')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.startswith("orchestrator ")
    assert done.stderr.strip() == "[]"
