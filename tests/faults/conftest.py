"""Fixtures of the fault tests: a lab of their own (two hosts), brought up once for tests/faults and
stopped when its last test ends, so that a whole-suite run never keeps two labs up at once (tests/lab
has its own, for the session). Built with tests/lab/conftest.py's `lab_of` (and its skip/fail rule
under CI); its `recorder` fixture is reused as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lab.conftest import Lab, lab_of, recorder

__all__ = ["lab_env", "recorder"]


@pytest.fixture(scope="package")
def lab_env() -> Iterator[Lab]:
    """Two lab hosts (0: source, 1: destination) for the fault tests."""
    yield from lab_of(2, "orch-faults-")
