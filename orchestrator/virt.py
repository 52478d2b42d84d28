"""The one thin edge to libvirt: connections, the event loop, monitor events, errors.

Nothing else in the project imports `libvirt`. Everything here is a small wrapper that turns
libvirt's objects and exceptions into the project's own types, so that the rest of the code can be
reasoned about (and unit-tested) without a daemon.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

import libvirt
import libvirt_qemu

from orchestrator.errors import BadInput, ConnectError, ExitCode, OrchestratorError

VirDomain = Any  # libvirt.virDomain; libvirt-python ships no type information

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread, once.

    Must happen before the first connection is opened, or that connection delivers no events.
    """
    global _loop_thread  # noqa: PLW0603 - one event loop per process is libvirt's own model
    with _loop_lock:
        if _loop_thread is not None:
            return
        # libvirt prints every error to stderr by default; we translate them instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


def error_text(exc: BaseException) -> str:
    """libvirt's message without its redundant prefixes, on one line."""
    msg = (exc.get_error_message() or str(exc)) if isinstance(exc, libvirt.libvirtError) else str(exc)
    return " ".join(msg.split())


# Domain states, in the words virsh uses.
STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "in shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


@dataclass(frozen=True)
class DomainInfo:
    """What `lab status` and evacuation planning need to know of a domain."""

    name: str
    uuid: str
    state: str
    active: bool
    persistent: bool
    memory_kib: int


MonitorCallback = Callable[[str, str, int, int, dict[str, Any] | None], None]
"""(domain name, event name, seconds, microseconds, data) -> None; runs on libvirt's event thread."""


class Subscription:
    """A registered QEMU monitor event callback; `cancel()` deregisters it (idempotent)."""

    def __init__(self, host: Host, callback_id: int) -> None:
        self._host = host
        self._id: int | None = callback_id

    def cancel(self) -> None:
        """Stop delivering events to this subscriber."""
        if self._id is None:
            return
        callback_id, self._id = self._id, None
        # A connection already gone took its callbacks with it.
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_qemu.qemuMonitorEventDeregister(self._host.conn, callback_id)


class Host:
    """One libvirt connection (a host), opened with events enabled."""

    def __init__(self, conn: Any, uri: str) -> None:
        self.conn = conn
        self.uri = uri

    @classmethod
    def open(cls, uri: str, *, keepalive: bool = True) -> Host:
        """Connect to `uri` (virsh's URI syntax) or raise ConnectError with one clear line."""
        ensure_event_loop()
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise ConnectError(
                f"cannot connect to {uri}: {error_text(exc)}",
                "check the URI and that libvirtd runs there (virsh -c URI list)",
            ) from None
        if keepalive:
            # Local drivers have no keepalive; nothing to detect there.
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)
        return cls(conn, uri)

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_alive(self) -> bool:
        """Whether the daemon still answers on this connection."""
        try:
            return bool(self.conn.isAlive())
        except libvirt.libvirtError:
            return False

    def on_close(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` when the connection drops (daemon gone, keepalive timeout)."""
        reasons = {
            libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
            libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "connection closed",
            libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
            libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
        }
        self.conn.registerCloseCallback(
            lambda _conn, reason, _opaque: callback(reasons.get(reason, f"reason {reason}")), None
        )

    # --- facts ------------------------------------------------------------------------------
    def host_uuid(self) -> str:
        """The host UUID libvirt uses to tell hosts apart (equal on both ends = same host)."""
        caps = ElementTree.fromstring(self.conn.getCapabilities())  # noqa: S314 - trusted daemon output
        return caps.findtext("host/uuid", default="")

    def hostname(self) -> str:
        """The host's name as libvirt reports it."""
        return str(self.conn.getHostname())

    def versions(self) -> tuple[int, int]:
        """(libvirt daemon version, hypervisor version) as libvirt's integers (major*1e6+minor*1e3+micro)."""
        return int(self.conn.getLibVersion()), int(self.conn.getVersion())

    def node_memory_mib(self) -> int:
        """The host's memory in MiB (virNodeGetInfo)."""
        try:
            return int(self.conn.getInfo()[1])
        except libvirt.libvirtError as exc:
            raise translate(exc, f"reading the node information of {self.uri}") from None

    # --- domains ----------------------------------------------------------------------------
    def domain(self, name: str) -> VirDomain:
        """Look a domain up by name (or UUID), or raise BadInput naming it and the host."""
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise translate(exc, f"looking up domain {name!r} on {self.uri}") from None
        try:
            return self.conn.lookupByUUIDString(name)
        except libvirt.libvirtError:
            raise BadInput(
                f"no domain {name!r} on {self.uri}", f"list the domains with: virsh -c {self.uri} list --all"
            ) from None

    def find_domain(self, name: str) -> VirDomain | None:
        """The domain named `name`, or None if this host has none."""
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise translate(exc, f"looking up domain {name!r} on {self.uri}") from None

    def domains(self) -> list[DomainInfo]:
        """Every domain of the host, active or defined."""
        result = []
        for dom in self.conn.listAllDomains(0):
            try:
                state, _reason = dom.state()
                info = dom.info()
                result.append(
                    DomainInfo(
                        name=dom.name(),
                        uuid=dom.UUIDString(),
                        state=STATE_NAMES.get(state, str(state)),
                        active=bool(dom.isActive()),
                        persistent=bool(dom.isPersistent()),
                        memory_kib=int(info[2] if dom.isActive() else info[1]),
                    )
                )
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise  # vanished between listing and asking is fine; anything else is not
        return sorted(result, key=lambda d: d.name)

    def is_persistent(self, dom: VirDomain) -> bool:
        """Whether the domain has a persistent definition."""
        return bool(dom.isPersistent())

    def undefine(self, dom: VirDomain) -> None:
        """Remove a (shut off) domain's persistent definition."""
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"undefining {dom.name()!r} on {self.uri}") from None

    def define(self, xml: str) -> VirDomain:
        """Define (persist) a domain from XML, translating libvirt's refusal."""
        try:
            return self.conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        except libvirt.libvirtError as exc:
            raise BadInput(
                f"libvirt refused the domain definition: {error_text(exc)}", "fix the XML"
            ) from None

    def start(self, dom: VirDomain) -> None:
        """Start a defined domain."""
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise OrchestratorError(
                f"cannot start domain {dom.name()!r} on {self.uri}: {error_text(exc)}",
                "see the host's libvirtd log",
            ) from None

    def destroy_and_undefine(self, name: str) -> bool:
        """Stop (hard) and undefine a domain; False if there was none."""
        dom = self.find_domain(name)
        if dom is None:
            return False
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise translate(exc, f"removing domain {name!r}") from None
        return True

    def xml(
        self, dom: VirDomain, *, inactive: bool = False, migratable: bool = False, secure: bool = False
    ) -> str:
        """A domain's XML: live by default, or the persistent definition, optionally migratable.

        `secure` includes secrets (e.g. graphics passwords): needed when the XML is defined back.
        """
        flags = libvirt.VIR_DOMAIN_XML_SECURE if secure else 0
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        if migratable:
            flags |= libvirt.VIR_DOMAIN_XML_MIGRATABLE
        return str(dom.XMLDesc(flags))

    # --- QEMU monitor -----------------------------------------------------------------------
    def subscribe_monitor_events(
        self,
        callback: MonitorCallback,
        *,
        events: Sequence[str] | None = None,
        domain: str | None = None,
        dom: VirDomain | None = None,
    ) -> Subscription:
        """Deliver QEMU monitor events to `callback`, filtered by the daemon where it can be.

        `events`: event names (None: all); sent to libvirt as an anchored regex, so other events
        never cross the connection. `dom`: a domain object, filtered by libvirt too; `domain`: a name,
        filtered here, for a destination where the incoming domain does not exist yet. (With an event
        filter libvirt matches each registration one to one, so several subscribers on one
        connection are fine; without one it would refuse the second as "already tracked".)
        """
        pattern = "^(" + "|".join(re.escape(e) for e in events) + ")$" if events else ".*"

        def relay(
            _conn: Any, virdom: Any, name: str, seconds: int, micros: int, details: str | None, _opaque: Any
        ) -> None:
            # Runs on libvirt's event thread: the hot path from QEMU's event to a drain hook.
            name_of_domain = virdom.name()
            if domain is None or domain == name_of_domain:
                callback(name_of_domain, name, seconds, micros, json.loads(details) if details else None)

        try:
            callback_id = libvirt_qemu.qemuMonitorEventRegister(
                self.conn,
                dom,
                pattern,
                relay,
                None,
                libvirt_qemu.VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX,
            )
        except libvirt.libvirtError as exc:
            raise translate(exc, f"subscribing to QEMU monitor events on {self.uri}") from None
        return Subscription(self, int(callback_id))

    def monitor_command(self, dom: VirDomain, command: dict[str, Any]) -> Any:
        """Run one QMP command through libvirt (read-only queries only: libvirt taints otherwise)."""
        try:
            reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"asking QEMU of {dom.name()!r}") from None
        return json.loads(reply).get("return")


@dataclass(frozen=True)
class MigrateRequest:
    """What to ask libvirt for one live migration (precopy only: VFIO forbids postcopy)."""

    destination_uri: str
    peer2peer: bool = True
    persist: bool = True
    undefine_source: bool = True
    data_uri: str | None = None
    listen_address: str | None = None
    dest_xml: str | None = None
    persist_xml: str | None = None
    bandwidth_mib: int | None = None
    max_downtime_ms: int | None = None
    compressed: bool = False
    auto_converge: bool = False

    def params(self) -> dict[str, Any]:
        """virDomainMigrate3 typed parameters."""
        params: dict[str, Any] = {}
        if self.data_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = self.data_uri
        if self.listen_address:
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = self.listen_address
        if self.dest_xml:
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = self.dest_xml
        if self.persist_xml:
            params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = self.persist_xml
        if self.bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = self.bandwidth_mib
        return params

    def flags(self) -> int:
        """virDomainMigrate3 flags."""
        flags = int(libvirt.VIR_MIGRATE_LIVE)
        if self.peer2peer:
            flags |= libvirt.VIR_MIGRATE_PEER2PEER
        if self.persist:
            flags |= libvirt.VIR_MIGRATE_PERSIST_DEST
        if self.undefine_source:
            flags |= libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        if self.compressed:
            flags |= libvirt.VIR_MIGRATE_COMPRESSED
        if self.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        return flags


def migrate(source: Host, dom: VirDomain, request: MigrateRequest, destination: Host | None = None) -> None:
    """Run one live migration to completion (blocks); raises MigrationError on failure.

    Peer-to-peer: the source daemon talks to the destination itself. Otherwise this process drives
    it through both connections (virDomainMigrate3), so `destination` must be open.
    """
    try:
        if request.max_downtime_ms:
            dom.migrateSetMaxDowntime(request.max_downtime_ms, 0)
        if request.peer2peer:
            dom.migrateToURI3(request.destination_uri, request.params(), request.flags())
        else:
            if destination is None:
                raise ValueError("client-driven migration needs the destination connection")
            dom.migrate3(destination.conn, request.params(), request.flags())
    except libvirt.libvirtError as exc:
        raise MigrationError(f"migration to {request.destination_uri} failed: {error_text(exc)}") from None


class MigrationError(OrchestratorError):
    """libvirt reported the migration failed (the VM stays on the source)."""

    code = ExitCode.MIGRATION_FAILED


def abort_job(dom: VirDomain) -> bool:
    """Abort the domain's running job (a migration); False if there was none to abort."""
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
            return False  # no job: finished or never started
        raise translate(exc, f"aborting the job of {dom.name()!r}") from None
    return True


def job_stats(dom: VirDomain) -> dict[str, Any]:
    """The domain's current job statistics (libvirt's typed parameters), {} when there is no job."""
    try:
        stats = dom.jobStats(0)
    except libvirt.libvirtError:
        return {}
    return dict(stats) if stats else {}


def completed_job_stats(dom: VirDomain) -> dict[str, Any]:
    """Statistics of the domain's last completed job (after a migration, on the destination)."""
    try:
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return {}
    return dict(stats) if stats else {}


def domain_state(dom: VirDomain) -> str:
    """The domain's state in virsh's words ("running", "paused", "shut off", ...)."""
    try:
        state, _reason = dom.state()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return "gone"
        raise translate(exc, "reading the domain's state") from None
    return STATE_NAMES.get(state, str(state))


def translate(exc: BaseException, doing: str) -> OrchestratorError:
    """Turn a libvirt exception into the project's error, with what was being done."""
    text = error_text(exc)
    if isinstance(exc, libvirt.libvirtError) and exc.get_error_code() in (
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_SYSTEM_ERROR,
    ):
        return ConnectError(f"{doing}: {text}", "check that libvirtd runs on that host")
    return OrchestratorError(f"{doing}: {text}", "see the host's libvirtd log")
