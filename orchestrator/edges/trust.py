"""Who may have changed a file the orchestrator acts on as root: policies and hook programs.

Only root (or the invoking user, when not root) may own such a file, every directory on the way to it
and every symlink followed; none of them may be writable by group or others, except a directory owned
by root with the sticky bit (/tmp: others cannot rename or remove what they do not own there). A path
someone else could change would let them choose what runs as root.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
from pathlib import Path

_MAX_SYMLINKS = 40  # as the kernel's path walk


class Untrusted(Exception):
    """`path` (a `kind`: file, directory, symlink) could be changed by someone else: `problem`, `fix`."""

    def __init__(self, path: Path, kind: str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.kind, self.problem, self.fix = path, kind, problem, fix


def trusted_owners() -> frozenset[int]:
    """Owners a trusted file or directory may have: root, and the invoking user when not root."""
    return frozenset({0, os.geteuid()})


def distrust(path: Path, status: os.stat_result) -> tuple[str, str] | None:
    """How someone other than root (or you) could change `path`, given its lstat `status`, and the
    command that fixes it; None if no one could."""
    mode = status.st_mode
    if stat.S_ISDIR(mode) and mode & stat.S_ISVTX and status.st_uid == 0:
        return None
    problems: list[str] = []
    fixes: list[str] = []
    quoted = shlex.quote(str(path))
    if status.st_uid not in trusted_owners():
        owners = "root" if os.geteuid() == 0 else f"root or uid {os.geteuid()} (you)"
        problems.append(f"owned by uid {status.st_uid}, not {owners}")
        fixes.append(f"chown -h root {quoted}" if stat.S_ISLNK(mode) else f"chown root {quoted}")
    writers = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit]
    if writers and not stat.S_ISLNK(mode):  # a symlink's own mode is meaningless
        problems.append(f"writable by {' and '.join(writers)} (mode {stat.S_IMODE(mode):04o})")
        fixes.append(f"chmod go-w {quoted}")
    if not problems:
        return None
    return " and ".join(problems), " && ".join(fixes)


def check(path: Path, status: os.stat_result) -> None:
    """Raise Untrusted when someone other than root (or you) could change `path` (lstat `status`)."""
    found = distrust(path, status)
    if found is not None:
        mode = status.st_mode
        kind = "directory" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file"
        raise Untrusted(path, kind, *found)


def walk(path: Path) -> tuple[Path, os.stat_result]:
    """Resolve `path` component by component as the kernel does, checking that no one but a trusted
    owner could change any directory looked into or symlink followed; return the real path and its lstat
    (the last component itself is the caller's to check, with `check`).

    Raises Untrusted, OSError (missing, not a directory, a symlink loop) and ValueError (a NUL)."""
    absolute = path if path.is_absolute() else Path.cwd() / path  # Path keeps "..", as the kernel needs
    pending = list(reversed(absolute.parts[1:]))  # a stack, next component last
    current = Path("/")
    checked: set[Path] = set()
    status = current.lstat()
    links = 0
    while pending:
        name = pending.pop()
        if not stat.S_ISDIR(status.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(current))
        if name == "..":  # every ancestor of `current` was looked into on the way to it
            current = current.parent
            status = current.lstat()
            continue
        if current not in checked:
            check(current, status)
            checked.add(current)
        candidate = current / name
        status = candidate.lstat()
        if stat.S_ISLNK(status.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
            check(candidate, status)
            target = candidate.readlink()
            if target.is_absolute():
                current = Path("/")
                pending.extend(reversed(target.parts[1:]))
            else:
                pending.extend(reversed(target.parts))
            status = current.lstat()  # the link is resolved from the directory that holds it
            continue
        current = candidate
    return current, status
