"""`orchestrator-rdma-hook drain|undrain --domain D --device X [--state S]`: disarm or re-arm the
RDMA peers of a device (the lab's peer stand-in, `orchestrator lab peer`).

`orchestrator-rdma-hook serve --domain D` is its armed form (the README's "Armed hooks"): started
with the migration, it says `ready`, then reads `drain|undrain DEVICE STATE QEMU_TIME` lines on
stdin, disarms or re-arms that device's peers at once and answers `ok DEVICE` or `fail DEVICE WHY`;
it exits when stdin closes. No process start, no import at the event: the budget is the peers'.

This runs on the drain path, where the peers' timeout (tens of ms) is the whole budget from QEMU's
prepare event to the peers being disarmed: it imports nothing but `os`, `socket` and `sys` (it
starts several times faster than the orchestrator's package would). Exit 0 when the peer
acknowledged; 1 with one line on stderr when no peer answered; 2 for a usage error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

FABRIC_ENV = "ORCH_RDMA_FABRIC"
USAGE = (
    "usage: orchestrator-rdma-hook drain|undrain --domain DOMAIN --device DEVICE [--state STATE]\n"
    "       orchestrator-rdma-hook serve --domain DOMAIN   (armed: commands on stdin)"
)


def fabric_dir() -> str:
    """The lab's fabric directory: $ORCH_RDMA_FABRIC, else <$ORCH_LAB_DIR or the default lab>/fabric."""
    return os.environ.get(FABRIC_ENV) or os.path.join(
        os.environ.get("ORCH_LAB_DIR", "/var/lib/orchestrator/lab"), "fabric"
    )


def control_path(fabric: str, domain: str, device: str) -> str:
    """Where the peer of `domain`'s `device` takes commands."""
    return os.path.join(fabric, domain, f"{device}.peer.sock")


def send_command(path: str, command: str, timeout_s: float = 1.0) -> str:
    """Send one command to a peer's control socket and return its answer."""
    reply_path = os.path.join(os.path.dirname(path), f".reply.{os.getpid()}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(reply_path)
        sock.settimeout(timeout_s)
        sock.sendto(command.encode(), path)
        return sock.recv(1 << 20).decode()
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(reply_path)


def parse(args: list[str]) -> tuple[str, dict[str, str]] | None:
    """(action, options) or None when the arguments are not `drain|undrain|serve --key value ...`."""
    if not args or args[0] not in ("drain", "undrain", "serve") or len(args) % 2 == 0:
        return None
    options = {}
    for key, value in zip(args[1::2], args[2::2], strict=True):
        if not key.startswith("--") or key[2:] not in ("domain", "device", "state"):
            return None
        options[key[2:]] = value
    if "domain" not in options or ("device" not in options) != (args[0] == "serve"):
        return None
    return args[0], options


def serve(domain: str, lines: list[str] | None = None) -> None:
    """The armed form: answer each `ACTION DEVICE STATE QEMU_TIME` line of stdin until it closes."""
    fabric = fabric_dir()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin if lines is None else lines:
        words = line.split()
        if len(words) < 2 or words[0] not in ("drain", "undrain"):
            out.write(f"orchestrator-rdma-hook: ignored {line.strip()!r}\n")
            out.flush()
            continue
        action, device = words[0], words[1]
        try:
            send_command(control_path(fabric, domain, device), "disarm" if action == "drain" else "arm")
        except OSError as exc:
            out.write(f"fail {device} no RDMA peer answered: {exc}\n")
        else:
            out.write(f"ok {device}\n")
        out.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parsed = parse(list(sys.argv[1:] if argv is None else argv))
    if parsed is None:
        sys.stderr.write(USAGE + "\n")
        sys.exit(2)
    action, options = parsed
    if action == "serve":
        serve(options["domain"])
        return
    path = control_path(fabric_dir(), options["domain"], options["device"])
    try:
        send_command(path, "disarm" if action == "drain" else "arm")
    except OSError as exc:
        sys.stderr.write(f"orchestrator-rdma-hook: no RDMA peer answered at {path}: {exc}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
