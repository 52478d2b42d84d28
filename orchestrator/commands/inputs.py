"""The commands' checks of what they were given, before anything is opened: one BadInput line each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn

MAX_LOCK_WAIT_S = 86400.0  # a day: longer than any migration a run could wait for


def raise_bad(message: str, hint: str) -> NoReturn:
    """Raise the BadInput error for a CLI option."""
    from orchestrator.core.errors import BadInput

    raise BadInput(message, hint)


def check_lock_wait(seconds: float, whose: str) -> None:
    """--lock-wait: a finite number of seconds from 0 to MAX_LOCK_WAIT_S (`whose`: what it waits for)."""
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_LOCK_WAIT_S):
        raise_bad(
            f"--lock-wait must be a number of seconds from 0 to {MAX_LOCK_WAIT_S:g}, not {seconds:g}",
            f"give how long to wait for another migration of {whose}",
        )


def plain_argument(what: str, text: str | None) -> None:
    """Refuse an argument with a control character (a newline would split our one-line messages and
    forge log lines; no domain name or URI has one), before anything is opened."""
    if text is not None and any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise_bad(f"{what} {text[:200]!r} contains a control character", "give it without one")


def source_uri(uri: str | None) -> str:
    """The source URI as virsh would pick it (an empty $LIBVIRT_DEFAULT_URI counts as unset).

    An explicit empty one (`-c ''`, or an empty SOURCE_URI in the systemd unit's env file) is bad
    input, not the default: silently acting on qemu:///system instead could empty the wrong host.
    """
    if uri is None:
        return "qemu:///system"
    if not uri.strip():
        raise_bad("the source URI (-c/--connect) is empty", "give a libvirt URI, e.g. -c 'qemu:///system'")
    plain_argument("the source URI (-c/--connect)", uri)
    return uri


def job_options(
    *,
    tls: bool,
    parallel: bool,
    parallel_connections: int | None,
    comp_methods: str | None,
    copy_storage_all: bool = False,
    migrate_disks: str | None = None,
    disks_uri: str | None = None,
    dname: str | None = None,
    xml: Path | None = None,
) -> Any:
    """The per-run options of the libvirt job (request.JobOptions), checked."""
    from orchestrator.core.request import JobOptions

    dest_xml = None
    if xml is not None:
        try:
            dest_xml = xml.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise_bad(f"cannot read --xml {xml}: {exc}", "give a readable domain XML file")
    options = JobOptions(
        tls=tls,
        parallel_connections=parallel_connections or (2 if parallel else None),
        compression_methods=tuple(m.strip() for m in comp_methods.split(",")) if comp_methods else (),
        copy_storage_all=copy_storage_all,
        migrate_disks=tuple(d.strip() for d in migrate_disks.split(",")) if migrate_disks else (),
        dest_name=dname,
        dest_xml=dest_xml,
        disks_uri=disks_uri,
    )
    options.validate()
    return options
