"""What Linux says of a process (/proc/PID/stat) and the child-subreaper flag: standard library only,
for the hook runner, the liveness checks of the journal, the locks and recover, the lab and its reaper
(which imports nothing else)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Proc:
    """What /proc/PID/stat says of one process."""

    ppid: int
    pgid: int
    start: int  # clock ticks after boot
    dead: bool  # a zombie (or being reaped)


def proc(pid: int) -> Proc | None:
    """The process `pid`, None when it is gone (or there is no /proc)."""
    try:
        # "pid (comm) S ppid pgid ...": the fields follow the last ')' (comm may contain one)
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        return Proc(int(fields[1]), int(fields[2]), int(fields[19]), fields[0] in (b"Z", b"X"))
    except (OSError, IndexError, ValueError):  # gone, or not a process
        return None


def alive(pid: int) -> bool:
    """True if `pid` is a live process (not a zombie) on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    found = proc(pid)
    return found is None or not found.dead  # None: no /proc, and kill(0) is all we know


def same_process(pid: object, start: object) -> bool:
    """Whether the process `pid`, started at `start` (clock ticks after boot, as `Proc.start`; None: any
    start), still runs here: not gone, not a zombie, and not another process that reused the pid."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    found = proc(pid)
    return found is not None and not found.dead and (start is None or found.start == start)


def environ(pid: int) -> bytes:
    """The environment the process `pid` was started with (NUL-separated); raises OSError when it is
    gone or not ours to read. Empty for a zombie, and for a moment in the middle of an exec."""
    return Path(f"/proc/{pid}/environ").read_bytes()


def set_child_subreaper(on: bool) -> str | None:
    """Make this process the reaper of its descendants' orphans (or stop being one): None when done,
    else why not."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0:
            return None
        return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError):  # no libc or no prctl: not Linux as we know it
        return "no prctl"
