"""The suite's own layout: pytest imports test modules by their basename (the test directories are not
packages), so two test files of one name in different directories stop the whole run at collection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_basename() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py") if "__pycache__" not in path.parts)
    assert len(names) > 10, "found the suite"
    assert [name for name, count in names.items() if count > 1] == []
