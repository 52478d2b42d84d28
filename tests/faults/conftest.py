"""Fixtures of the fault tests: a lab of their own (two hosts), brought up once for tests/faults and
stopped when its last test ends, so that a whole-suite run never keeps two labs up at once (tests/lab
has its own, for the session). Built from tests/lab/conftest.py's pieces (`Lab`, the skip/fail rule
under CI); its `recorder` fixture is reused as it is.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab.conftest import IN_CI, Lab, _lab_unavailable, recorder

from orchestrator.lab import hosts as lab
from orchestrator.virt import Host

__all__ = ["lab_env", "recorder"]


@pytest.fixture(scope="package")
def lab_env() -> Iterator[Lab]:
    """Two lab hosts (0: source, 1: destination) for the fault tests."""
    reason = _lab_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"the lab cannot run under CI: {reason}")
        pytest.skip(f"lab tests skipped: {reason}")
    root = Path(tempfile.mkdtemp(prefix="orch-faults-", dir="/var/tmp"))
    try:
        hosts = lab.up(2, root)
    except Exception as exc:
        lab.down(root)
        if IN_CI:
            pytest.fail(f"the lab did not start under CI: {exc}")
        pytest.skip(f"the lab did not start: {exc}")
    env = Lab(root=root, hosts=hosts, conns=[Host.open(h.uri) for h in hosts])
    try:
        yield env
    finally:
        for conn in env.conns:
            conn.close()
        lab.down(root)
        shutil.rmtree(root, ignore_errors=True)
