"""Lab hosts: independent libvirtd daemons on one machine, each in its own mount namespace.

Each host is a directory under the lab root holding what libvirt would keep in /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt; `unshare --mount`
bind-mounts them over those paths for that daemon only. Every process the lab starts is recorded
by PID (libvirtd's and virtlogd's pid files), and `down` ends exactly those, after checking that the
PID still belongs to the process it started (its command line names the host's directory). After a
crash it also finds them without pid files: a virtlogd by its command line, QEMU by libvirt's.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.core.errors import BadInput, EnvironmentProblem
from orchestrator.core.hypervisor import DomainInfo
from orchestrator.edges import procfs

if TYPE_CHECKING:
    from orchestrator.edges.virt import Host

DEFAULT_ROOT = Path("/var/lib/orchestrator/lab")
ROOT_ENV = "ORCH_LAB_DIR"
HOST_NAMES = tuple(f"lab-{c}" for c in string.ascii_lowercase)
MAX_HOSTS = 8
_KILL_WAIT_S = 5.0  # after a SIGKILL, how long `down` waits for the process to go

# The libvirt directories each host gets its own copy of: (name under the host dir, system path).
_BIND_DIRS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)
_REQUIRED_PROGRAMS = ("libvirtd", "virtlogd", "qemu-system-x86_64", "unshare", "mount")

# Keeps QEMU inside the caller's cgroup and sandbox: this machine has neither cgroup controllers
# nor a separate qemu user, and the lab needs neither.
_QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
migration_port_min = {port_min}
migration_port_max = {port_max}
"""

_LIBVIRTD_CONF = """\
unix_sock_dir = "{sock}"
unix_sock_rw_perms = "0777"
unix_sock_ro_perms = "0777"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "{host_uuid}"
log_outputs = "3:stderr"
"""

# Runs inside the new mount namespace: bind the host's directories, start virtlogd (libvirt needs
# it for QEMU's log), then become libvirtd: the daemon is a child of the reaper we start (lab/reaper.py).
_START_SCRIPT = """\
set -e
H=$1
mount --bind "$H/etc" /etc/libvirt
mount --bind "$H/run" /run/libvirt
mount --bind "$H/lib" /var/lib/libvirt
mount --bind "$H/cache" /var/cache/libvirt
mount --bind "$H/log" /var/log/libvirt
virtlogd -d -p "$H/virtlogd.pid"
exec libvirtd -p "$H/libvirtd.pid" -f /etc/libvirt/libvirtd.conf
"""


def lab_root(root: Path | None = None) -> Path:
    """The lab's directory: explicit, else $ORCH_LAB_DIR, else the default."""
    if root is not None:
        return root
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else DEFAULT_ROOT


def lab_command(words: str, root: Path | None = None) -> str:
    """`orchestrator lab WORDS` for a hint, with `--lab-dir` when the lab is not the default one, so
    that the hint works when pasted."""
    path = lab_root(root)
    where = "" if path == DEFAULT_ROOT else f" --lab-dir {shlex.quote(str(path))}"
    return f"{program()} lab {words}{where}"


def program() -> str:
    """How to run the orchestrator again, as it was run: `orchestrator` when that is what PATH finds,
    else the path it was run by (`.venv/bin/orchestrator`, as `make demo` runs it)."""
    invoked = sys.argv[0] if sys.argv else ""
    if Path(invoked).name != "orchestrator":
        return "orchestrator"  # run as a module or in-process: the usual name
    found = shutil.which("orchestrator")
    if found is not None and Path(found).resolve() == Path(invoked).resolve():
        return "orchestrator"
    return shlex.quote(invoked)


@dataclass
class LabHost:
    """One lab host: its directory, daemon PIDs and connection URI."""

    name: str
    dir: Path
    index: int
    guests: list[DomainInfo] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        """libvirtd's read-write socket."""
        return self.dir / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI to connect to this host, as virsh takes it."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        """libvirtd's own log (its stderr)."""
        return self.dir / "libvirtd.log"

    def pid(self, daemon: str) -> int | None:
        """The PID of `daemon` (libvirtd or virtlogd) if it runs and is the one this lab started."""
        try:
            pid = int((self.dir / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_ours(pid, daemon, self.dir) else None

    @property
    def running(self) -> bool:
        """Whether this host's libvirtd runs."""
        return self.pid("libvirtd") is not None


def _is_ours(pid: int, daemon: str, host_dir: Path) -> bool:
    """True if `pid` is alive and is `daemon` started for `host_dir` (guards against PID reuse): its
    command line names a file in that directory (its pid file), as a whole path."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    inside = str(host_dir).encode() + b"/"
    return (
        bool(cmdline)
        and Path(cmdline[0].decode(errors="replace")).name == daemon
        and any(arg.startswith(inside) for arg in cmdline[1:])
    )


def _daemon_pids(daemon: str, host_dir: Path) -> list[int]:
    """Every live `daemon` started for `host_dir`, found by its command line, not its pid file: a
    virtlogd whose libvirtd was killed outlives it, and once `up` restarted the host its pid file
    names the new one (it was truncated, or unlinked as stale)."""
    found = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and _is_ours(int(entry.name), daemon, host_dir):
                found.append(int(entry.name))
    return found


def connect(host: LabHost) -> Host:
    """A connection to a lab host (libvirt is imported only here: the lab's pure parts load without it)."""
    from orchestrator.edges.virt import Host

    return Host.open(host.uri, keepalive=False)


def _hosts(root: Path) -> Iterator[LabHost]:
    hosts_dir = root / "hosts"
    if not hosts_dir.is_dir():
        return
    for index, name in enumerate(HOST_NAMES):
        path = hosts_dir / name
        if path.is_dir():
            yield LabHost(name=name, dir=path, index=index)


def check_machine() -> None:
    """Fail with one line if this machine cannot run the lab."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "the lab must run as root (it starts libvirtd in mount namespaces)", "use sudo"
        )
    missing = [p for p in _REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        raise EnvironmentProblem(
            f"missing programs for the lab: {', '.join(missing)}", "run deploy/setup.sh to install them"
        )
    for _name, system_path in _BIND_DIRS:
        Path(system_path).mkdir(parents=True, exist_ok=True)


def _prepare(host: LabHost) -> None:
    for name, _system in _BIND_DIRS:
        (host.dir / name).mkdir(parents=True, exist_ok=True)
    (host.dir / "sock").mkdir(exist_ok=True)
    conf = host.dir / "etc" / "libvirtd.conf"
    if not conf.exists():
        # Same UUID on two hosts makes libvirt refuse migration as "to the same host".
        conf.write_text(_LIBVIRTD_CONF.format(sock=host.dir / "sock", host_uuid=uuid.uuid4()))
    port_min = 49152 + 100 * host.index
    (host.dir / "etc" / "qemu.conf").write_text(_QEMU_CONF.format(port_min=port_min, port_max=port_min + 99))


def _start(host: LabHost, timeout: float) -> None:
    # The host is not running: a virtlogd of its still is the one a crashed libvirtd left (the start
    # script makes its own, and the pid file it would overwrite was the only way `down` found it).
    _stop_virtlogd(host)
    (host.dir / "libvirtd.pid").unlink(missing_ok=True)
    host.socket.unlink(missing_ok=True)
    with host.log.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.lab.reaper",  # reaps the QEMUs libvirtd stops at once (see there)
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                _START_SCRIPT,
                "lab",
                str(host.dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # survives the CLI that started it; `lab down` ends it by PID
        )
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        code = proc.poll()
        if code is not None:
            _stop_virtlogd(host)
            raise EnvironmentProblem(
                f"lab host {host.name} failed to start (exit {code}): {_log_tail(host.log)}",
                f"see {host.log}",
            )
        daemon = host.pid("libvirtd")
        found = None if daemon is None else procfs.proc(daemon)
        if host.socket.exists() and found is not None and found.ppid == proc.pid:
            try:
                connect(host).close()
                return
            except Exception:  # noqa: S110 - not accepting yet; retry until the deadline
                pass
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            _stop_virtlogd(host)
            raise EnvironmentProblem(
                f"lab host {host.name} did not answer within {timeout:.0f} s", f"see {host.log}"
            )
        time.sleep(delay)  # polling a daemon's socket: there is no event to wait on
        delay = min(delay * 2, 0.25)


def _log_tail(log: Path) -> str:
    """libvirtd's last meaningful error lines, without the noise this machine always produces."""
    noise = ("dmidecode", "/dev/kvm", "cgroup controller", "Driver state initialization failed")
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [
        line.split(" : ", 2)[-1]
        for line in lines
        if " error : " in line and not any(n in line for n in noise)
    ]
    return " | ".join(errors[-2:]) if errors else "no error logged"


def _terminate(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; waits for the process to go (a while after the
    SIGKILL too: `down` says it is stopped, and a new `up` must not find it still there)."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_WAIT_S)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if _reap(pid):
                return
            time.sleep(0.05)  # no pidfd wait for a non-child on Python 3.11's stdlib everywhere


def _reap(pid: int) -> bool:
    """Reap `pid` if it is our exited child (so it does not linger as a zombie)."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return Path(f"/proc/{pid}/stat").exists() and _is_zombie(pid)
    return done == pid


def _is_zombie(pid: int) -> bool:
    found = procfs.proc(pid)
    return found is None or found.dead


def _stop_virtlogd(host: LabHost) -> None:
    """Stop every virtlogd of this host: the one its pid file names, and any other its command line
    shows was started for it (left behind by a crashed libvirtd)."""
    pids = set(_daemon_pids("virtlogd", host.dir))
    recorded = host.pid("virtlogd")
    if recorded is not None:
        pids.add(recorded)
    for pid in sorted(pids):
        _terminate(pid)
    (host.dir / "virtlogd.pid").unlink(missing_ok=True)


def up(count: int = 2, root: Path | None = None, timeout: float = 60.0) -> list[LabHost]:
    """Start `count` lab hosts (those already running are left alone) and return all of them."""
    if not 1 <= count <= MAX_HOSTS:
        raise BadInput(f"--hosts must be between 1 and {MAX_HOSTS}, not {count}", "pick a smaller number")
    check_machine()
    root = lab_root(root)
    (root / "hosts").mkdir(parents=True, exist_ok=True)
    (root / "fabric").mkdir(exist_ok=True)
    (root / "migrations").mkdir(exist_ok=True)
    started: list[LabHost] = []
    try:
        for index in range(count):
            host = LabHost(name=HOST_NAMES[index], dir=root / "hosts" / HOST_NAMES[index], index=index)
            if host.running:
                continue
            _prepare(host)
            _start(host, timeout)
            started.append(host)
    except BaseException:
        for host in started:  # nothing left running from a failed `up`
            _stop(host)
        raise
    return list(_hosts(root))


def status(root: Path | None = None, with_guests: bool = True) -> list[LabHost]:
    """The lab's hosts, with their guests if they run."""
    hosts = list(_hosts(lab_root(root)))
    if with_guests:
        for host in hosts:
            if host.running:
                with connect(host) as conn:
                    host.guests = conn.domains()
    return hosts


def host_by_name(name: str, root: Path | None = None) -> LabHost:
    """A running lab host by name, or a one-line error listing the ones that exist."""
    hosts = list(_hosts(lab_root(root)))
    for host in hosts:
        if host.name == name:
            if not host.running:
                raise BadInput(
                    f"lab host {name} is not running",
                    f"start the lab with: {lab_command(f'up --hosts {host.index + 1}', root)}",
                )
            return host
    known = ", ".join(h.name for h in hosts) or "none"
    hint = (
        f"start the lab with: {lab_command('up', root)}"
        if not hosts
        else f"see: {lab_command('status', root)}"
    )
    raise BadInput(f"no lab host named {name!r} (lab hosts: {known})", hint)


def _qemu_pids(host: LabHost) -> list[int]:
    """PIDs of QEMU processes this host's libvirtd started (its pid files), still alive."""
    pids = []
    for pidfile in (host.dir / "run" / "qemu").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"qemu" in cmdline or b"vfio-sim" in cmdline:
            pids.append(pid)
    return pids


def _stop(host: LabHost) -> None:
    if host.running:
        try:
            with connect(host) as conn:
                for guest in conn.domains():
                    conn.destroy_and_undefine(guest.name)
        except Exception:  # noqa: S110 - a wedged daemon still gets stopped below, by PID
            pass
    pid = host.pid("libvirtd")
    if pid is not None:
        _terminate(pid)
    for qemu in _qemu_pids(host):  # left behind by a crashed daemon
        _terminate(qemu, grace=2.0)
    _stop_virtlogd(host)
    (host.dir / "libvirtd.pid").unlink(missing_ok=True)


def down(root: Path | None = None) -> list[str]:
    """Destroy every lab guest and stop every lab daemon; returns the host names stopped."""
    check_machine()
    stopped = []
    for host in _hosts(lab_root(root)):
        _stop(host)
        stopped.append(host.name)
    return stopped
