"""Values the libvirt binding hands back that are not what its C API documents."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("libvirt", exc_type=ImportError)  # also the fake libvirt of test_suite_layout

from orchestrator.edges.virt import Domain


class _Raw:
    def __init__(self, downtime: Any) -> None:
        self.downtime = downtime

    def name(self) -> str:
        return "vm1"

    def migrateGetMaxDowntime(self, flags: int) -> Any:
        return self.downtime


@pytest.mark.parametrize(("raw", "expected"), [(300, 300), (1, 1), (None, None), (-1, None)])
def test_the_downtime_limit_is_none_when_libvirt_gives_none(raw: Any, expected: int | None) -> None:
    """As the job ends, the binding returns None (not an error) for the limit: that is "no value",
    never a TypeError in `recover` or a watcher."""
    assert Domain(None, _Raw(raw)).max_downtime() == expected  # type: ignore[arg-type]
