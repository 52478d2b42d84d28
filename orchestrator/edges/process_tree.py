"""A hook's process tree: what it started, found by walking /proc, and killing all of it.

A hook's tree is the hook's process group, every process carrying its `ORCH_HOOK_RUN=<supervisor
pid>.<run>` environment entry, and their descendants by parent links (orphans are re-parented to the
hook supervisor: it is their subreaper). A killed tree gets SIGTERM, KILL_GRACE_S for the hook itself,
then SIGKILL until nothing of it is left (at most KILL_WAIT_S). Used by the hook supervisor
(orchestrator.edges.supervisor_process) and by `recover`, for a run whose supervisor died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Final

from orchestrator.edges import procfs

KILL_GRACE_S: Final = 0.2  # between SIGTERM and SIGKILL of a killed hook's tree
KILL_WAIT_S: Final = 2.0  # after SIGKILL: how long the tree gets to vanish
KILL_POLL_S: Final = 0.005


class Tree:
    """The processes of one run, followed across its death and their re-parenting."""

    def __init__(self, leader: int, tag: bytes, since: int, others: Callable[[], set[int]]) -> None:
        self.leader = leader
        self.tag = tag  # b"ORCH_HOOK_RUN=<pid>.<run>"
        self.since = max(0, since - 1)  # a tick of slack for the rounding of both clocks
        self.seen: dict[int, int] = {leader: since}
        self._others = others  # the other runs' leaders: never ours to kill

    def look(self) -> dict[int, procfs.Proc]:
        """Every process of the tree now, zombies included."""
        procs = _processes()
        me, others = os.getpid(), self._others() - {self.leader}

        def eligible(pid: int) -> bool:
            return pid not in (me, 1) and pid not in others and procs[pid].start >= self.since

        roots = {pid for pid, start in self.seen.items() if pid in procs and procs[pid].start == start}
        for pid, proc in procs.items():
            if pid not in roots and eligible(pid) and (proc.pgid == self.leader or _carries(pid, self.tag)):
                roots.add(pid)
        children: dict[int, list[int]] = {}
        for pid, proc in procs.items():
            children.setdefault(proc.ppid, []).append(pid)
        tree: dict[int, procfs.Proc] = {}
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid not in tree and eligible(pid):
                tree[pid] = procs[pid]
                stack += children.get(pid, [])
        self.seen.update((pid, proc.start) for pid, proc in tree.items())
        return tree

    def signal_until_gone(self) -> None:
        """Kill the whole tree from outside the supervisor (`recover`, for a run whose supervisor died):
        SIGTERM, KILL_GRACE_S, then SIGKILL until nothing of it is left (at most KILL_WAIT_S)."""
        if not self.signal(signal.SIGTERM):
            return
        time.sleep(KILL_GRACE_S)  # the grace a hook gets to clean up; nothing to wait on for another's child
        deadline = time.monotonic() + KILL_WAIT_S
        while self.signal(signal.SIGKILL) and time.monotonic() < deadline:
            time.sleep(KILL_POLL_S)

    def signal(self, signum: signal.Signals) -> bool:
        """Send `signum` to every live process of the tree and its group; True if any was alive."""
        tree = self.look()
        alive = [pid for pid, proc in tree.items() if not proc.dead]
        if any(proc.pgid == self.leader for proc in tree.values()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.leader, signum)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        return bool(alive)


def _processes() -> dict[int, procfs.Proc]:
    found = {}
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and (proc := procfs.proc(int(entry.name))) is not None:
                found[int(entry.name)] = proc
    return found


def _carries(pid: int, tag: bytes) -> bool:
    """True if the process was started with `tag` (NAME=VALUE) in its environment."""
    for _attempt in range(3):  # in the middle of an exec it reads empty for a moment
        try:
            environ = procfs.environ(pid)
        except OSError:  # gone, a zombie, or not ours to read
            return False
        if environ:
            return tag in environ.split(b"\0")
    return False
