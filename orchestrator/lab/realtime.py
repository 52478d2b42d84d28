"""Real-time priority for the lab's stand-ins of hardware and remote hosts.

The simulated device (its event proxy) and the RDMA peer stand-ins run on the same few shared cores as
TCG's QEMU, libvirtd and the orchestrator under test. A device or a peer is hardware or another host
in real life: starved of CPU here, it would answer late and the peers would count outages that no
drain could have prevented. SCHED_FIFO at the lowest real-time priority puts them ahead of every
ordinary process (they sleep almost all the time; the kernel's real-time throttling still leaves
the rest of the machine its share), so a peer timeout in the lab means a drain came too late.
"""

from __future__ import annotations

import os

PRIORITY = 1  # the lowest SCHED_FIFO priority: ahead of every SCHED_OTHER process, behind the kernel's


def make_realtime() -> str | None:
    """Run this process under SCHED_FIFO at PRIORITY: None when done, else why not, in words."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PRIORITY))
    except (OSError, AttributeError) as exc:  # EPERM without CAP_SYS_NICE; not Linux
        reason = getattr(exc, "strerror", None) or str(exc)
        return (
            f"real-time priority refused ({reason}): on a busy machine this stand-in may answer late "
            "and the peers count outages no drain could prevent (run the lab as root)"
        )
    return None
