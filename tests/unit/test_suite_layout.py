"""The suite's own layout: pytest imports test modules by their basename (the test directories are not
packages), so two test files of one name in different directories stop the whole run at collection;
and the unit tests run without libvirt-python (no root, no libvirt: a module that imports it at the
top, reached from a unit test, breaks that)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_basename() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py") if "__pycache__" not in path.parts)
    assert len(names) > 10, "found the suite"
    assert [name for name, count in names.items() if count > 1] == []


def libvirt_importable() -> bool:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_unit_tests_run_without_libvirt(tmp_path: Path) -> None:
    if not libvirt_importable():
        # This run is the proof: every other unit test runs in it, without libvirt-python. Running
        # them all again in a nested run (half the suite's time) would prove nothing more.
        assert not any(name.split(".")[0] in ("libvirt", "libvirtmod") for name in sys.modules)
        return
    # libvirt-python made unimportable, as on a machine without it; this test left out (it would recurse)
    for module in ("libvirt", "libvirtmod", "libvirt_qemu"):
        (tmp_path / f"{module}.py").write_text('raise ImportError("no libvirt-python here")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HYPOTHESIS_PROFILE": "smoke"}
    this = f"{Path(__file__).relative_to(TESTS.parent)}::test_the_unit_tests_run_without_libvirt"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit", "--deselect", this],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
