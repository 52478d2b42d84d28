"""Option values are converted without Pydantic (orchestrator/commands/values.py), with the
same results and the same one-line errors as Typer's own conversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.commands.values import _leaf, _simple

RUN = r"""
import sys
import orchestrator.commands.values as values
if sys.argv[1] == "typer":
    values.install = lambda: False
from orchestrator.commands.program import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
print("pydantic imported:", "pydantic" in sys.modules, file=sys.stderr)
"""


def run(converter: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", RUN, converter, *args], check=False, capture_output=True, text=True, timeout=60
    )
    return done.stderr


CASES = [
    ("lab", "up", "-n", "2.5"),
    ("lab", "up", "-n", ""),
    ("history", "--limit", " 4x", "--journal", "/nonexistent/j.sqlite"),
    ("history", "--limit", "3.0", "--journal", "/nonexistent/j.sqlite"),
    ("lab", "guest", "x", "--host", "lab-a", "--qemu-behaviour", "9.0", "--lab-dir", "/nonexistent"),
    ("migrate", "d", "qemu:///x", "--drain", "GATED", "-c", "qemu:///y"),
    ("migrate", "d", "qemu:///x", "--timeout", "soon", "-c", "qemu:///y"),
    ("migrate", "d", "qemu:///x", "--timeout", "inf", "-c", "qemu:///y"),
    ("migrate", "d", "qemu:///x", "--bandwidth", "-3", "-c", "qemu:///y"),
    ("recover", "--job", "later", "--journal", "/nonexistent/j.sqlite"),
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_the_same_values_and_errors_as_typers_own_conversion_without_pydantic(args: tuple[str, ...]) -> None:
    ours, typers = run("ours", *args), run("typer", *args)
    assert ours.replace("pydantic imported: False", "") == typers.replace("pydantic imported: True", "")
    assert "pydantic imported: False" in ours
    valid = "3.0" in args  # taken as 3, as Typer's Pydantic did
    assert ("error:" in ours) is not valid, ours  # bad input is said in one line
    assert "Traceback" not in ours


def test_a_command_that_runs_imports_no_pydantic(tmp_path: Path) -> None:
    out = run("ours", "history", "--journal", str(tmp_path / "none.sqlite"), "--limit", "5")
    assert "pydantic imported: False" in out, out


@pytest.mark.parametrize(
    ("annotation", "text", "value"),
    [
        (int, "42", 42),
        (int, " -7 ", -7),
        (int, "3.00", 3),
        (float, "0.5", 0.5),
        (float, "2", 2.0),
        (bool, "yes", True),
        (bool, "Off", False),
        (str, "qemu:///system", "qemu:///system"),
        (Path, "/tmp/x", Path("/tmp/x")),
    ],
)
def test_leaf_values(annotation: type, text: str, value: object) -> None:
    assert _leaf(annotation, text) == value
    assert type(_leaf(annotation, text)) is type(value)


@pytest.mark.parametrize(
    ("annotation", "text", "message"),
    [
        (int, "1_000", "'1_000' is not a whole number"),
        (int, "2.5", "'2.5' is not a whole number"),
        (int, "1e3", "'1e3' is not a whole number"),
        (float, "fast", "'fast' is not a number"),
        (bool, "maybe", "'maybe' is not a yes/no value"),
    ],
)
def test_bad_leaf_values_say_what_is_wrong(annotation: type, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _leaf(annotation, text)


def test_only_plain_annotations_are_taken() -> None:
    assert all(_simple(a) for a in (str, int, float, bool, Path, list[str]))
    assert not any(_simple(a) for a in (bytes, tuple[int, int], list[list[str]], dict[str, str]))
