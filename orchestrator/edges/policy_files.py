"""Policy files: found by name or path, trust-checked and read; their text is validated by
orchestrator.core.policy_toml.

A policy names commands that run with the orchestrator's privileges (root), so it is treated as code:
a policy file, and every directory on the way to it, must be owned by root (or by the invoking user
when not root) and not writable by group or others, as sudo and sshd require of their files
(orchestrator.edges.trust); and the file must be a regular file of at most 1 MiB.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from orchestrator.core.policy import Policy, PolicyError
from orchestrator.core.policy_toml import parse_policy
from orchestrator.edges import trust

SYSTEM_POLICY_DIR = Path("/etc/orchestrator/policies")
SHIPPED_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
# Searched in this order for a policy given by name; ORCH_POLICY_DIR, when set, comes first.
DEFAULT_POLICY_DIRS: tuple[Path, ...] = (SYSTEM_POLICY_DIR, SHIPPED_POLICY_DIR)
POLICY_DIR_ENV = "ORCH_POLICY_DIR"
DEFAULT_POLICY_NAME = "default"
MAX_POLICY_BYTES = 1024 * 1024  # a policy file larger than this is refused unread


def _untrusted(error: trust.Untrusted) -> PolicyError:
    return PolicyError(
        str(error.path), error.kind, f"{error.problem}, unsafe for a policy", f"fix: {error.fix}"
    )


def _walk(path: Path) -> tuple[Path, os.stat_result]:
    """trust.walk, its refusal as a PolicyError."""
    try:
        return trust.walk(path)
    except trust.Untrusted as error:
        raise _untrusted(error) from None


def _check_trust(path: Path, status: os.stat_result) -> None:
    """Refuse `path` when someone other than root (or you) could change it: the error names it and the fix."""
    try:
        trust.check(path, status)
    except trust.Untrusted as error:
        raise _untrusted(error) from None


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read_trusted(source: str, path: Path) -> bytes:
    """The bytes of the policy file at `path`, after the checks of `_walk` and of the file itself."""
    real, status = _walk(path)
    if not stat.S_ISREG(status.st_mode):
        raise PolicyError(
            source,
            "file",
            f"not a regular file ({_file_kind(status.st_mode)})",
            "expected a policy TOML file",
        )
    # O_NONBLOCK: should the file be swapped for a FIFO after the check, opening it cannot hang.
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino) or not stat.S_ISREG(
            opened.st_mode
        ):
            raise PolicyError(source, "file", "changed while it was read", "expected a policy file at rest")
        _check_trust(real, opened)
        too_big = PolicyError(
            source, "file", "larger than 1 MiB", f"expected a policy of at most {MAX_POLICY_BYTES} bytes"
        )
        if opened.st_size > MAX_POLICY_BYTES:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_POLICY_BYTES:
            chunk = os.read(fd, MAX_POLICY_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_POLICY_BYTES:  # it grew since fstat
            raise too_big
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file, refusing one that someone other than root (or you) could change."""
    source = str(path)
    try:
        data = _read_trusted(source, path)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise PolicyError(
            source,
            "file",
            "not found",
            'expected the path of an existing policy file, or a policy name such as "default"',
        ) from None
    except OSError as error:
        raise PolicyError(
            source, "file", f"cannot read it ({error.strerror})", "expected a readable file"
        ) from None
    except UnicodeDecodeError as error:
        raise PolicyError(
            source, f"byte {error.start}", "not UTF-8 text", "expected a UTF-8 TOML file"
        ) from None
    except ValueError:  # a NUL in the path
        raise PolicyError(source, "file", "a NUL character in the path", "expected a file path") from None
    return replace(parse_policy(text, source), path=path.absolute())


def policy_dirs() -> tuple[Path, ...]:
    """Where policy names are looked up, in order: $ORCH_POLICY_DIR if set, then DEFAULT_POLICY_DIRS."""
    override = os.environ.get(POLICY_DIR_ENV)
    return (Path(override), *DEFAULT_POLICY_DIRS) if override else DEFAULT_POLICY_DIRS


def available_policies(dirs: Iterable[Path] | None = None) -> Mapping[str, Path]:
    """Policy names and the file each resolves to; a name in an earlier directory hides later ones."""
    found: dict[str, Path] = {}
    for directory in policy_dirs() if dirs is None else dirs:
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def _check_directory(directory: Path) -> bool:
    """Whether `directory` exists; raises PolicyError when it, or a directory on the way to it, could be
    changed by someone other than root (or you)."""
    try:
        real, status = _walk(directory)
    except (OSError, ValueError):
        return False
    if not stat.S_ISDIR(status.st_mode):
        return False
    _check_trust(real, status)
    return True


def resolve_policy(name_or_path: str | None = None, dirs: Sequence[Path] | None = None) -> Policy:
    """The policy for `--policy`: None means "default"; a value with "/" or ending in .toml is a path;
    anything else is a name looked up as `<dir>/<name>.toml` in `dirs` (default: `policy_dirs()`).

    Every directory searched up to the one holding the policy must be trusted as the file is."""
    value = DEFAULT_POLICY_NAME if name_or_path is None else name_or_path
    if "/" in value or value.endswith(".toml"):
        return load_policy(Path(value))
    searched = policy_dirs() if dirs is None else tuple(dirs)
    if value and "\0" not in value:
        for directory in searched:
            path = directory / f"{value}.toml"
            if _check_directory(directory) and (path.exists() or path.is_symlink()):
                return load_policy(path)
    choices = ", ".join(available_policies(searched)) or "(none)"
    raise PolicyError(
        value or repr(value),  # an empty name shows as ''
        "policy name",
        f"not found in {', '.join(str(directory) for directory in searched)}",
        f"expected one of {choices}, or the path of a .toml file",
    )
