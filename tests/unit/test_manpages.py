"""Man pages generated from the CLI (orchestrator.commands.manpages): one per command, naming every option of
it, rendering without troff warnings, with the exit codes of ExitCode and the README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

from orchestrator.commands import manpages, program  # noqa: F401 - program registers every command
from orchestrator.commands.app import app
from orchestrator.core.errors import ExitCode

README = Path(__file__).resolve().parents[2] / "README.md"
GROFF = shutil.which("groff")


def commands(command: Any, path: tuple[str, ...] = ("orchestrator",)) -> dict[str, Any]:
    """Page name -> Click command, walked straight from Click's tree (not through manpages)."""
    found = {"-".join(path): command}
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            found.update(commands(sub, (*path, name)))
    return found


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Page name -> troff text, as `python -m orchestrator.commands.manpages DIR` writes them."""
    out = tmp_path_factory.mktemp("man1")
    assert manpages.main([str(out)]) == 0
    return {path.name.removesuffix(".1"): path.read_text(encoding="utf-8") for path in out.glob("*.1")}


def render(page: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """groff's plain-text rendering of a page (no bold or underline), with every warning on."""
    assert GROFF is not None
    return subprocess.run(
        [GROFF, "-man", "-Tascii", "-ww", "-P-cbou", *extra, str(page)],
        capture_output=True,
        text=True,
        check=False,
    )


def sections(text: str) -> dict[str, str]:
    """Section name -> its troff lines."""
    parts = re.split(r"^\.SH (.+)$", text, flags=re.MULTILINE)
    return {name.strip('"'): body for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_command_has_a_page(written: dict[str, str]) -> None:
    expected = commands(typer.main.get_command(app))
    assert {
        "orchestrator",
        "orchestrator-migrate",
        "orchestrator-evacuate",
        "orchestrator-recover",
        "orchestrator-watch",
        "orchestrator-history",
        "orchestrator-events",
        "orchestrator-events-status",
        "orchestrator-events-enable",
        "orchestrator-events-disable",
        "orchestrator-lab",
        "orchestrator-lab-up",
        "orchestrator-lab-status",
        "orchestrator-lab-down",
        "orchestrator-lab-guest",
        "orchestrator-lab-peer",
        "orchestrator-lab-demo",
    } <= set(expected)
    assert sorted(written) == sorted(expected)


def command_paths(command: Any, path: tuple[str, ...] = ("orchestrator",)) -> dict[str, tuple[str, ...]]:
    """Page name -> the words that run its command (a command's name may hold a '-')."""
    found = {"-".join(path): path}
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            found.update(command_paths(sub, (*path, name)))
    return found


def test_each_page_is_a_man_page_of_its_command(written: dict[str, str]) -> None:
    paths = command_paths(typer.main.get_command(app))
    for name, text in written.items():
        assert text.startswith(manpages.MARKER + "\n.TH ")
        assert text.splitlines()[1].startswith(f'.TH "{manpages.escape(name.upper())}" 1 ')
        found = sections(text)
        assert list(found)[:3] == ["NAME", "SYNOPSIS", "DESCRIPTION"], name
        assert {"OPTIONS", "EXIT STATUS", "SEE ALSO"} <= set(found), name
        assert found["NAME"].strip().startswith(f"{manpages.escape(name)} \\- "), name
        assert found["SYNOPSIS"].startswith(f"\n.B {manpages.escape(' '.join(paths[name]))}\n"), name


def test_each_page_names_every_option_and_argument_of_its_command(written: dict[str, str]) -> None:
    for name, command in commands(typer.main.get_command(app)).items():
        text = written[name]
        options = sections(text)["OPTIONS"]
        assert "\\fB\\-h\\fR, \\fB\\-\\-help\\fR" in options, name
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "argument":
                metavar = param.metavar or (param.name or "").upper()
                assert f"\\fI{manpages.escape(metavar)}\\fR" in sections(text)["ARGUMENTS"], (name, metavar)
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                assert f"\\fB{manpages.escape(opt)}\\fR" in options, (name, opt)
            if param.metavar:
                assert f"\\fI{manpages.escape(param.metavar)}\\fR" in options, (name, param.metavar)


def test_option_help_default_and_choices_are_what_help_shows(written: dict[str, str]) -> None:
    migrate = " ".join(written["orchestrator-migrate"].split())  # troff source lines joined
    assert "\\fB\\-\\-drain\\fR \\fI<prepare|gated|start>\\fR" in migrate
    assert "\\fB\\-\\-p2p\\fR / \\fB\\-\\-direct\\fR" in migrate
    assert "[default: 0.0]" in migrate  # --lock-wait's, from Click, not written anywhere by hand
    assert "[env var: ORCH_JOURNAL]" in migrate
    assert "\\fBLIBVIRT_DEFAULT_URI\\fR" in sections(written["orchestrator-migrate"])["ENVIRONMENT"]
    commands_of_root = sections(written["orchestrator"])["COMMANDS"]
    for name in ("migrate", "evacuate", "lab", "events"):
        assert f"See \\fBorchestrator\\-{name}\\fR(1)." in commands_of_root


def test_see_also_links_pages_that_exist_and_every_page_is_linked(written: dict[str, str]) -> None:
    linked: set[str] = set()
    see_also: dict[str, list[str]] = {}
    for name, text in written.items():
        refs = re.findall(r"^\.BR (\S+) \(1\),?$", sections(text)["SEE ALSO"], flags=re.MULTILINE)
        targets = [ref.replace("\\-", "-") for ref in refs]
        assert targets, name
        assert set(targets) <= set(written) - {name}, name
        linked.update(targets)
        see_also[name] = targets
    assert linked == set(written)
    assert see_also["orchestrator-events-enable"] == [
        "orchestrator",
        "orchestrator-events",
        "orchestrator-events-status",
        "orchestrator-events-disable",
    ]


def test_exit_status_matches_exit_code_and_the_readme(written: dict[str, str]) -> None:
    assert list(manpages.EXIT_STATUS) == list(ExitCode)
    # The README's "Exit codes" table, backticks dropped: the man pages say the same.
    table = README.read_text(encoding="utf-8").split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", table, flags=re.MULTILINE)
    assert [(int(code), meaning.replace("`", "")) for code, meaning in rows] == [
        (int(code), meaning) for code, meaning in manpages.EXIT_STATUS.items()
    ]
    for name, text in written.items():
        codes = re.findall(r"^\.TP\n\\fB(\d+)\\fR$", sections(text)["EXIT STATUS"], flags=re.MULTILINE)
        assert [int(code) for code in codes] == [int(code) for code in ExitCode], name


@pytest.mark.skipif(GROFF is None, reason="groff is not installed: the structure is checked above")
def test_pages_render_without_troff_warnings(tmp_path: Path, written: dict[str, str]) -> None:
    for name, text in written.items():
        page = tmp_path / f"{name}.1"
        page.write_text(text, encoding="utf-8")
        result = render(page, "-rLL=300n")
        assert (result.returncode, result.stderr) == (0, ""), name
        shown = result.stdout
        assert f"{name} - " in shown  # NAME: the hyphens print as ASCII hyphen-minus
        assert "EXIT STATUS" in shown
        for option in re.findall(r"\\fB(\\-[^\\]*(?:\\-[^\\]*)*)\\fR", sections(text)["OPTIONS"]):
            assert option.replace("\\-", "-") in shown, (name, option)


def test_troff_special_characters_print_as_written(tmp_path: Path) -> None:
    nasty = typer.Typer(name="nasty", rich_markup_mode=None, add_completion=False)

    @nasty.command("run")
    def _run(
        path: str = typer.Option(
            "C:\\temp\\new", "--path-name", "-P", metavar="DIR", help="A \\fB-looking path; 'quoted'."
        ),
    ) -> None:
        """Runs things: a \\ backslash, and \\fIno font change\\fR.

        .TH is not a request here, 'nor is this' line.

        \b
        .keep these
        'lines as they are
        """

    @nasty.command("other")
    def _other() -> None:
        """Résumé … with non-ASCII."""

    root = typer.main.get_command(nasty)
    done = manpages.write_pages(tmp_path, root, date="2024-01-02")
    assert sorted(p.name for p in done.pages) == [
        "orchestrator-other.1",
        "orchestrator-run.1",
        "orchestrator.1",
    ]
    text = (tmp_path / "orchestrator-run.1").read_text(encoding="utf-8")
    assert text.isascii()
    for line in text.splitlines()[1:]:
        assert not line.startswith("'"), line
        assert not line.startswith(".") or re.match(r"\.(TH|nh|SH|TP|PP|B|BR|nf|fi)( |$)", line), line
    assert "\\fB\\-\\-path\\-name\\fR" in text
    if GROFF is None:
        return
    result = render(tmp_path / "orchestrator-run.1", "-rLL=300n")
    assert (result.returncode, result.stderr) == (0, "")
    shown = " ".join(result.stdout.split())
    for literal in (
        "Runs things: a \\ backslash, and \\fIno font change\\fR.",
        ".TH is not a request here, 'nor is this' line.",
        ".keep these",
        "'lines as they are",
        "-P, --path-name DIR",
        "A \\fB-looking path; 'quoted'. [default: C:\\temp\\new]",
        "2024-01-02",
    ):
        assert literal in shown, literal
    other = render(tmp_path / "orchestrator-other.1", "-Tutf8", "-rLL=300n")
    assert other.stderr == ""


def test_only_changed_pages_are_rewritten_and_stale_ones_of_ours_removed(tmp_path: Path) -> None:
    first = manpages.write_pages(tmp_path, date="2024-01-02")
    assert first.changed == first.pages and first.removed == []
    (tmp_path / "orchestrator-gone.1").write_text(manpages.MARKER + "\n.TH X 1\n", encoding="utf-8")
    (tmp_path / "orchestrator-vfio-sim.1").write_text(".TH ORCHESTRATOR-VFIO-SIM 1\n", encoding="utf-8")
    migrate = tmp_path / "orchestrator-migrate.1"
    migrate.write_text("edited by hand\n", encoding="utf-8")
    again = manpages.write_pages(tmp_path, date="2024-01-02")
    assert (again.changed, again.removed) == ([migrate], [tmp_path / "orchestrator-gone.1"])
    assert (tmp_path / "orchestrator-vfio-sim.1").exists(), "not ours: left alone"
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_date_is_the_sources_not_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert manpages.source_date() == "2023-11-14"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", manpages.source_date())


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manpages.main([]) == ExitCode.BAD_INPUT
    assert "usage: python -m orchestrator.commands.manpages DIR" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert manpages.main([str(blocker / "man1")]) == ExitCode.ENVIRONMENT
    assert capsys.readouterr().err.startswith(f"manpages: cannot write to {blocker / 'man1'}: ")
