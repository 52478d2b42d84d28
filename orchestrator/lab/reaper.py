"""A lab host's reaper: the parent of the host's daemons, reaping every process orphaned below it.

libvirtd daemonises QEMU (from its start, QEMU is an orphan) and, when it stops a domain, waits in
200 ms steps for the process to be gone, which for an orphan means reaped by whoever adopted it. On a
machine whose init reaps late (on a timer of its own) every stopped QEMU held libvirt until that
timer fired, inside the migration call of every live migration (the source QEMU is stopped before the
call returns): a lab migration's length then depended on that timer's phase. Started as
`python -m orchestrator.lab.reaper COMMAND [ARG...]`, this process makes itself the child subreaper
(Linux), runs COMMAND as its child and reaps every child at once, orphans included, while COMMAND
runs; it exits with COMMAND's status when COMMAND ends (what is left is init's again, as before: only
a running libvirtd needs its QEMUs reaped at once). SIGTERM and SIGINT are passed on to COMMAND.

Imports nothing of the orchestrator but `procfs` (standard library only): it lives as long as the
host, and should cost little.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence

from orchestrator.edges.procfs import set_child_subreaper


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command given and reap everything below it; its exit status."""
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        sys.stderr.write("usage: python -m orchestrator.lab.reaper COMMAND [ARG...]\n")
        return 2
    failure = set_child_subreaper(True)
    if failure is not None:
        sys.stderr.write(
            f"orchestrator.lab.reaper: cannot be a subreaper here ({failure}); orphans go to init\n"
        )
    passed_on = {signal.SIGTERM, signal.SIGINT}
    children: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    # The handlers are in place, and the signals held, before the fork: a SIGTERM sent as soon as the
    # command shows life (on a busy machine, before this process ran on) reaches the command, and is
    # not the default death of this process, which would leave the command running with no parent.
    signal.pthread_sigmask(signal.SIG_BLOCK, passed_on)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, passed_on)  # the mask would outlive the exec
        try:
            os.execvp(command[0], command)  # noqa: S606 - argv from the lab's own code, no shell
        except OSError as exc:
            sys.stderr.write(f"orchestrator.lab.reaper: cannot run {command[0]}: {exc.strerror}\n")
        os._exit(127)
    children.append(child)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, passed_on)  # one held meanwhile is delivered now
    while True:
        try:
            pid, status = os.wait()  # any child: the command, or an orphan handed to us
        except ChildProcessError:
            return 0
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
