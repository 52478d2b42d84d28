"""The CLI's own behaviour that needs no libvirt: --version, history on a missing journal, help text,
and bad option values as one line in our own words."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.commands.app import app
from orchestrator.commands.program import main


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
    from orchestrator.core.records import MigrationKind
    from orchestrator.edges.journal import Journal

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
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, _ = run(["history", "--journal", str(journal), "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [(row["id"], row["outcome"]) for row in rows] == [("3f2a9c", "running")], "read from its run log"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "history writes nothing"


# --- --version ---------------------------------------------------------------------------------------


def test_version_is_the_installed_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    expected = f"orchestrator {metadata.version('vfio-migration-orchestrator')}\n"
    assert run(["--version"], capsys) == (0, expected, "")
    assert "--version" in run(["--help"], capsys)[1]


def test_version_imports_nothing_heavy() -> None:
    probe = (
        "import sys\n"
        "from orchestrator.commands.program import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('pydantic', 'libvirt', 'lxml', 'rich',\n"
        "         'orchestrator.edges.virt', 'orchestrator.flows.migration')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.startswith("orchestrator ")
    assert done.stderr.strip() == "[]"


# --- help text and bad values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["events", "enable"], ["{DOMAIN}", "-c, --connect URI", "--mode <override|global>"]),
        (["events", "status"], ["{DOMAIN}", "-c, --connect URI"]),
        (["events", "disable"], ["{DOMAIN}", "-c, --connect URI"]),
        (["watch"], ["-c, --connect URI", "-d, --domain DOMAIN"]),
        (["history"], ["[ID]", "-d, --domain DOMAIN", "--limit N", "--journal PATH"]),
        (["lab", "up"], ["-n, --hosts N", "--lab-dir PATH"]),
        (
            ["lab", "guest"],
            [
                "{DOMAIN}",
                "--host HOST",
                "--devices N",
                "--qemu-behaviour <11.0|10.0|11.0-event>",
                "--transition-ms MS",
            ],
        ),
        (["lab", "peer"], ["{DOMAIN}", "--interval-ms MS", "--timeout-ms MS", "--duration SECONDS"]),
        (["lab", "demo"], ["--name DOMAIN", "--lab-dir PATH"]),
    ],
)
def test_help_shows_readable_metavars(
    command: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    options = out.split("Options:")[1]
    bare = [line.split()[0] for line in options.splitlines() if re.search(r"<(str|int|float)>", line)]
    assert bare == [], "options without a readable metavar"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "up", "--hosts", "abc"], "Invalid value for '--hosts' / '-n': 'abc' is not a whole number"),
        (["lab", "up", "-n", ""], "Invalid value for '--hosts' / '-n': '' is not a whole number"),
        (["lab", "up", "-n", "2.5"], "Invalid value for '--hosts' / '-n': '2.5' is not a whole number"),
        (
            ["lab", "peer", "vm1", "--timeout-ms", "soon"],
            "Invalid value for '--timeout-ms': 'soon' is not a number",
        ),
        (["history", "--limit", "many"], "Invalid value for '--limit': 'many' is not a whole number"),
        (
            ["lab", "guest", "vm1", "--host", "lab-a", "--qemu-behaviour", "9.0"],
            "Invalid value for '--qemu-behaviour': '9.0' is not one of '11.0', '10.0', '11.0-event'",
        ),
        (
            ["events", "enable", "vm1", "--mode", "sideways"],
            "Invalid value for '--mode': 'sideways' is not one of 'override', 'global'",
        ),
        (
            ["evacuate", "--to", "qemu+ssh://b/system", "--group-by", "label"],
            "Invalid value for '--group-by': 'label' is not one of 'metadata', 'none'",
        ),
    ],
)
def test_a_bad_value_is_one_line_in_our_words(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    command = " ".join(["orchestrator", *argv[: 2 if argv[0] in ("lab", "events") else 1]])
    assert (code, out) == (2, "")
    assert err == f"orchestrator: error: {message}; see: {command} --help\n"
    for pydantic_words in ("Input should", "Value error", "unable to parse"):
        assert pydantic_words not in err


# --- hints that work when pasted ---------------------------------------------------------------------


def test_lab_hints_name_the_lab_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "my lab"
    code, _, err = run(["lab", "guest", "vm1", "--host", "lab-b", "--lab-dir", str(root)], capsys)
    assert code == 2
    assert err.endswith(f"; start the lab with: orchestrator lab up --lab-dir '{root}'\n")
    code, _, err = run(["lab", "status", "--lab-dir", str(root)], capsys)
    assert (code, err) == (0, f"no lab hosts; start them with: orchestrator lab up --lab-dir '{root}'\n")


def test_lab_hints_for_the_default_lab_need_no_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.lab import hosts

    monkeypatch.delenv("ORCH_LAB_DIR", raising=False)
    assert hosts.lab_command("status") == "orchestrator lab status"
    assert hosts.lab_command("up --hosts 3", hosts.DEFAULT_ROOT) == "orchestrator lab up --hosts 3"


# --- start-up: one command's tree, and the exit without the interpreter's teardown ------------------


def _every_command() -> list[list[str]]:
    argvs = [[info.name or ""] for info in app.registered_commands]
    for group in app.registered_groups:
        argvs.append([group.name or ""])
        argvs += [[group.name or "", sub.name or ""] for sub in group.typer_instance.registered_commands]
    return argvs


@pytest.mark.parametrize("words", _every_command(), ids=" ".join)
def test_the_command_alone_has_the_help_and_errors_of_the_whole_tree(
    words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    import typer

    from orchestrator.commands import program

    def through(command: object, argv: list[str]) -> tuple[int, str, str]:
        try:
            code = command.main(args=argv, prog_name="orchestrator", standalone_mode=False)  # type: ignore[attr-defined]
        except SystemExit as exc:
            code = exc.code
        except Exception as exc:  # a usage error: its text is what is compared
            code = f"{type(exc).__name__}: {exc}"
        out, err = capsys.readouterr()
        return code, out, err

    lazy = program._command_for(words)
    assert list(lazy.commands) == [words[0]]  # only the command asked for was built
    full = typer.main.get_command(app)
    for argv in ([*words, "--help"], [*words, "--no-such-option"]):
        assert through(lazy, argv) == through(full, argv)


@pytest.mark.parametrize("argv", [[], ["--help"], ["--version"], ["no-such-command"], ["-x", "migrate"]])
def test_anything_but_a_command_first_gets_the_whole_tree(argv: list[str]) -> None:
    import typer

    from orchestrator.commands import program

    assert list(program._command_for(argv).commands) == list(typer.main.get_command(app).commands)


def _entry(argv: list[str]) -> subprocess.CompletedProcess[str]:
    probe = (
        f"import sys\nsys.argv = ['orchestrator', *{argv!r}]\n"
        "from orchestrator.commands.program import entry\nentry()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60
    )


def test_entry_flushes_what_it_printed_and_keeps_the_exit_code() -> None:
    done = _entry(["--version"])  # stdout is a pipe: block-buffered, lost if not flushed
    assert (done.returncode, done.stdout.startswith("orchestrator "), done.stderr) == (0, True, "")
    done = _entry(["migrate", "vm", "qemu:///system", "--bandwidth", "x"])
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("orchestrator: error: Invalid value for '--bandwidth'")


def test_entry_leaves_at_once_only_when_no_thread_is_left_to_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from orchestrator.commands import program

    left: list[int] = []
    monkeypatch.setattr(program.os, "_exit", left.append)
    monkeypatch.setattr(program, "main", lambda: None)
    program.entry()
    assert left == [0]  # only daemon threads (or none): straight out
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=False)  # e.g. a journal still writing
    worker.start()
    try:

        def failing() -> None:
            raise SystemExit(9)

        monkeypatch.setattr(program, "main", failing)
        with pytest.raises(SystemExit) as exited:
            program.entry()
        assert exited.value.code == 9  # the normal exit, which waits for the thread
        assert left == [0]
    finally:
        release.set()
        worker.join()


def test_sha256_without_hashlib_is_hashlibs() -> None:
    import hashlib

    from orchestrator.core.digest import sha256_hex

    for data in (b"", b"abc", bytes(range(256)) * 99):
        assert sha256_hex(data) == hashlib.sha256(data).hexdigest()


def complete(*words: str) -> list[str]:
    """What the shell's completion offers for the last word (bash's protocol), from the real program."""
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator"],
        env={
            **os.environ,
            "_ORCHESTRATOR_COMPLETE": "complete_bash",
            "COMP_WORDS": " ".join(["orchestrator", *words]),
            "COMP_CWORD": str(len(words)),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_shell_completes_commands_options_and_local_domain_names() -> None:
    assert complete("mig") == ["migrate", "migrate-group"]
    assert {"--drain", "--dry-run"} <= set(complete("migrate", "--dr"))
    assert "-j" in complete("evacuate", "-")
    pytest.importorskip("libvirt", exc_type=ImportError)  # a machine without libvirt-python: no names
    # The test driver's domain "test", read-only; a remote URI is never asked (an ssh connection per Tab).
    assert complete("migrate", "-c", "test:///default", "t") == ["test"]
    assert complete("events", "status", "-c", "test:///default", "") == ["test"]
    assert complete("migrate", "-c", "qemu+ssh://nowhere.invalid/system", "t") == []


def test_a_range_is_said_in_plain_numbers() -> None:
    from orchestrator.core.errors import BadInput
    from orchestrator.edges.policy_files import resolve_policy

    with pytest.raises(BadInput) as caught:
        resolve_policy("default").migration.overridden(max_downtime_ms=2000001)
    assert "--max-downtime must be between 1 and 2000000, not 2000001" in caught.value.line()
