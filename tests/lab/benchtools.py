"""Helpers of the benchmark smoke tests (test_bench_*.py): each benchmark runs on a lab of its own.

The benchmarks bring up and tear down their own lab hosts, so these tests do not use the session's
`lab_env`; they skip (fail under CI) for the same reasons the lab tests do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LAB_PROGRAMS = ("libvirtd", "virtlogd", "qemu-system-x86_64", "unshare", "virsh")


def need_lab(*programs: str) -> None:
    """Skip the test (fail it under CI) unless this machine can host a lab and has `programs` too."""
    reason = None
    if os.geteuid() != 0:
        reason = "the lab needs root"
    else:
        missing = [p for p in (*LAB_PROGRAMS, *programs) if shutil.which(p) is None]
        reason = f"missing {', '.join(missing)} (run deploy/setup.sh)" if missing else None
    if reason:
        if IN_CI:
            pytest.fail(f"the benchmark cannot run under CI: {reason}")
        pytest.skip(reason)


def processes_mentioning(text: str) -> list[str]:
    """The command lines of the running processes that contain `text`."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if text in line]


def run_bench(
    script: str, *args: str, timeout: float = 150
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run bench/`script` on a lab directory of the test's own; returns (result, processes left behind)."""
    # Short, like the session lab's: libvirt's unix socket paths live under it.
    lab_dir = Path(tempfile.mkdtemp(prefix="bench-smoke-", dir="/var/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, str(BENCH / script), *args, "--lab-dir", str(lab_dir)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        return proc, processes_mentioning(str(lab_dir))
    finally:
        shutil.rmtree(lab_dir, ignore_errors=True)
