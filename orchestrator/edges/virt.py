"""The one thin edge to libvirt: connections, the event loop, monitor events, errors.

Nothing else in the project imports `libvirt`. Everything here is a small wrapper that turns
libvirt's objects and exceptions into the project's own types, so that the rest of the code can be
reasoned about (and unit-tested) without a daemon. `Host` and `Domain` implement the narrow interface
a migration needs (`orchestrator.core.hypervisor.Hypervisor` and `Guest`).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import libvirt
import libvirt_qemu

from orchestrator.core.errors import BadInput, ConnectError, MigrationError, OrchestratorError, shell_uri
from orchestrator.core.hypervisor import (
    GONE,
    DomainInfo,
    Guest,
    Hypervisor,
    JobEnded,
    JobStats,
    MigrateRequest,
    MonitorCallback,
)

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


def _connect(uri: str, keepalive: bool) -> Any:
    """A libvirt connection to `uri`, or ConnectError with one clear line."""
    ensure_event_loop()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ConnectError(
            f"cannot connect to {uri}: {error_text(exc)}",
            f"check the URI and that libvirtd runs there: virsh -c {shell_uri(uri)} list",
        ) from None
    if keepalive:
        # Local drivers have no keepalive; nothing to detect there.
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(5, 3)
    return conn


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


class Subscription:
    """A registered QEMU monitor event callback; `cancel()` deregisters it (idempotent)."""

    def __init__(self, conn: Any, callback_id: int) -> None:
        self._conn = conn  # the connection it was registered on (a host's events connection)
        self._id: int | None = callback_id

    def cancel(self) -> None:
        """Stop delivering events to this subscriber."""
        if self._id is None:
            return
        callback_id, self._id = self._id, None
        # A connection already gone took its callbacks with it.
        with contextlib.suppress(libvirt.libvirtError):
            libvirt_qemu.qemuMonitorEventDeregister(self._conn, callback_id)


class Domain:
    """One libvirt domain on one host (implements `orchestrator.core.hypervisor.Guest`)."""

    def __init__(self, host: Host, raw: VirDomain) -> None:
        self.host = host
        self.raw = raw  # the libvirt.virDomain
        self._name: str = raw.name()

    def name(self) -> str:
        """The domain's name."""
        return self._name

    def uuid(self) -> str:
        """The domain's UUID."""
        return str(self.raw.UUIDString())

    def state(self) -> str:
        """The state in virsh's words ("running", "paused", "shut off", ...; "gone" if it vanished)."""
        try:
            state, _reason = self.raw.state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return GONE
            raise translate(exc, f"reading the state of {self._name!r} on {self.host.uri}") from None
        return STATE_NAMES.get(state, str(state))

    def is_persistent(self) -> bool:
        """Whether the domain has a persistent definition."""
        return bool(self.raw.isPersistent())

    def xml(self, *, inactive: bool = False, migratable: bool = False, secure: bool = False) -> str:
        """The domain's XML: live by default, or the persistent definition, optionally migratable.

        `secure` includes secrets (e.g. graphics passwords): needed when the XML is defined back.
        """
        flags = libvirt.VIR_DOMAIN_XML_SECURE if secure else 0
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        if migratable:
            flags |= libvirt.VIR_DOMAIN_XML_MIGRATABLE
        try:
            return str(self.raw.XMLDesc(flags))
        except libvirt.libvirtError as exc:
            raise translate(exc, f"reading the XML of {self._name!r} on {self.host.uri}") from None

    def job_stats(self) -> JobStats | None:
        """The active job's statistics; None when no job runs (or the domain is gone)."""
        try:
            stats = self.raw.jobStats(0)
        except libvirt.libvirtError:
            return None
        if not stats or stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        return JobStats.from_params(stats)

    def completed_job_stats(self) -> JobStats | None:
        """The last completed job's statistics (after a migration, on the destination)."""
        try:
            stats = self.raw.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError:
            return None
        return JobStats.from_params(stats, active=False) if stats else None

    def abort_job(self) -> bool:
        """Abort the running job (a migration); False if there was none to abort."""
        try:
            self.raw.abortJob()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return False  # no job: finished or never started
            raise translate(exc, f"aborting the job of {self._name!r}") from None
        return True

    def set_max_downtime(self, ms: int) -> None:
        """Set QEMU's downtime limit (0 is passed on: QEMU then switches over only with nothing pending)."""
        try:
            self.raw.migrateSetMaxDowntime(ms, 0)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"setting the downtime limit of {self._name!r} to {ms} ms") from None

    def max_downtime(self) -> int | None:
        """QEMU's downtime limit now, in ms; None when libvirt gives no value (the job just ended: the
        binding then returns None rather than raising)."""
        try:
            value = self.raw.migrateGetMaxDowntime(0)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"reading the downtime limit of {self._name!r}") from None
        return None if value is None or value < 0 else int(value)


class Host:
    """One libvirt connection (a host), opened with events enabled (implements `Hypervisor`)."""

    def __init__(self, conn: Any, uri: str, *, keepalive: bool = True) -> None:
        self.conn = conn
        self.uri = uri
        self._keepalive = keepalive
        self._events_lock = threading.Lock()
        self._events_conn: Any = None  # opened by the first subscription

    @classmethod
    def open(cls, uri: str, *, keepalive: bool = True) -> Host:
        """Connect to `uri` (virsh's URI syntax) or raise ConnectError with one clear line."""
        return cls(_connect(uri, keepalive), uri, keepalive=keepalive)

    def close(self) -> None:
        """Close the connections; safe to call twice."""
        with self._events_lock:
            events, self._events_conn = self._events_conn, None
        for conn in (events, self.conn):
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

    def _events(self) -> Any:
        """The connection events are subscribed on: one of their own, so that nothing delays them.
        A QEMU event that reaches a connection while a thread waits on it for a reply (the migration
        call, which lasts the whole job, or a statistics poll) is read by that thread, queued, and
        handed to the event loop through a timer: later than on an idle connection (bench/drain_latency.py
        and docs/PERFORMANCE.md have the figures)."""
        with self._events_lock:
            if self._events_conn is None:
                self._events_conn = _connect(self.uri, self._keepalive)
            return self._events_conn

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
    def identity(self) -> frozenset[tuple[str, int]]:
        """The (UUID, ID) of every running domain. Domain IDs are counted per daemon, so two connections
        showing the same non-empty set reach the same daemon. Costs one call, where the host UUID
        (getCapabilities) makes a fresh daemon probe every QEMU binary first, which takes seconds."""
        try:
            return frozenset((dom.UUIDString(), dom.ID()) for dom in self.conn.listAllDomains(1))
        except libvirt.libvirtError as exc:
            raise translate(exc, f"listing the domains of {self.uri}") from None

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
    def domain(self, name: str) -> Domain:
        """Look a domain up by name (or UUID), or raise BadInput naming it and the host."""
        found = self.find_domain(name)
        if found is None:
            raise BadInput(
                f"no domain {name!r} on {self.uri}",
                f"list the domains with: virsh -c '{self.uri}' list --all",
            )
        return found

    def find_domain(self, name: str) -> Domain | None:
        """The domain named `name` (or with that UUID), or None if this host has none."""
        for lookup in (self.conn.lookupByName, self.conn.lookupByUUIDString):
            try:
                return Domain(self, lookup(name))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_ARG):
                    raise translate(exc, f"looking up domain {name!r} on {self.uri}") from None
        return None

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

    def is_persistent(self, dom: Domain) -> bool:
        """Whether the domain has a persistent definition."""
        return dom.is_persistent()

    def undefine(self, dom: Domain) -> None:
        """Remove a (shut off) domain's persistent definition."""
        try:
            dom.raw.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"undefining {dom.name()!r} on {self.uri}") from None

    def define(self, xml: str) -> Domain:
        """Define (persist) a domain from XML, translating libvirt's refusal."""
        try:
            return Domain(self, self.conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE))
        except libvirt.libvirtError as exc:
            raise BadInput(
                f"libvirt refused the domain definition: {error_text(exc)}", "fix the XML"
            ) from None

    def start(self, dom: Domain) -> None:
        """Start a defined domain."""
        try:
            dom.raw.create()
        except libvirt.libvirtError as exc:
            raise OrchestratorError(
                f"cannot start domain {dom.name()!r} on {self.uri}: {error_text(exc)}",
                "see the host's libvirtd log",
            ) from None

    def destroy_and_undefine(self, name: str) -> bool:
        """Stop (hard) and undefine a domain; False if there was none."""
        found = self.find_domain(name)
        if found is None:
            return False
        dom = found.raw
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
        self, dom: Domain, *, inactive: bool = False, migratable: bool = False, secure: bool = False
    ) -> str:
        """A domain's XML (see `Domain.xml`)."""
        return dom.xml(inactive=inactive, migratable=migratable, secure=secure)

    # --- QEMU monitor -----------------------------------------------------------------------
    def subscribe_monitor_events(
        self,
        callback: MonitorCallback,
        *,
        events: Sequence[str] | None = None,
        domain: str | None = None,
        dom: Guest | None = None,
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

        conn = self._events()
        try:
            # The domain as an object of the events connection (one lookup, by UUID).
            raw = None if dom is None else conn.lookupByUUIDString(_raw(dom).UUIDString())
            callback_id = libvirt_qemu.qemuMonitorEventRegister(
                conn,
                raw,
                pattern,
                relay,
                None,
                libvirt_qemu.VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX,
            )
        except libvirt.libvirtError as exc:
            raise translate(exc, f"subscribing to QEMU monitor events on {self.uri}") from None
        return Subscription(conn, int(callback_id))

    def monitor_command(self, dom: Domain, command: dict[str, Any]) -> Any:
        """Run one QMP command through libvirt (read-only queries only: libvirt taints otherwise)."""
        try:
            reply = libvirt_qemu.qemuMonitorCommand(dom.raw, json.dumps(command), 0)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"asking QEMU of {dom.name()!r}") from None
        return json.loads(reply).get("return")

    # --- migration --------------------------------------------------------------------------
    def migrate(self, dom: Domain, request: MigrateRequest, destination: Host | None = None) -> None:
        """Run one live migration to completion (blocks); raises MigrationError on failure.

        Peer-to-peer: the source daemon talks to the destination itself. Otherwise this process drives
        it through both connections (virDomainMigrate3), so `destination` must be open.
        """
        flags, params = _flags_and_params(request)
        try:
            if request.peer2peer:
                dom.raw.migrateToURI3(request.destination_uri, params, flags)
            else:
                if destination is None:
                    raise ValueError("client-driven migration needs the destination connection")
                dom.raw.migrate3(destination.conn, params, flags)
        except libvirt.libvirtError as exc:
            raise MigrationError(
                f"migration to {request.destination_uri} failed: {error_text(exc)}"
            ) from None

    def start_migration(
        self, dom: Guest, request: MigrateRequest, destination: Hypervisor, on_end: JobEnded
    ) -> None:
        """Start the live migration of `dom` on a thread of its own; `on_end` is called when it ends."""
        if not isinstance(destination, Host) or not isinstance(dom, Domain):
            raise TypeError("a libvirt migration needs a libvirt destination and domain")

        def job() -> None:
            error: OrchestratorError | None = None
            try:
                self.migrate(dom, request, destination)
            except OrchestratorError as exc:
                error = exc
            except Exception as exc:  # handed over: the migration reports it, never a silent thread death
                error = OrchestratorError(f"unexpected error from the migration job: {exc!r}")
            on_end(error)

        threading.Thread(target=job, name=f"migrate-{dom.name()}", daemon=True).start()


def domain_names(uri: str) -> list[str]:
    """The names of the domains of `uri`, read-only, for the shell's completion: empty on any failure
    (completion never errs, never prompts for a password)."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no libvirt message on the terminal
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError:
        return []
    try:
        return sorted(dom.name() for dom in conn.listAllDomains())
    except libvirt.libvirtError:
        return []
    finally:
        conn.close()


def _raw(dom: Guest | None) -> VirDomain:
    """The libvirt object behind a domain of this module (None stays None)."""
    if dom is None:
        return None
    if not isinstance(dom, Domain):
        raise TypeError(f"not a libvirt domain: {dom!r}")
    return dom.raw


def _flags_and_params(request: MigrateRequest) -> tuple[int, dict[str, Any]]:
    """virDomainMigrate3's flags and typed parameters for a request."""
    params: dict[str, Any] = {}
    if request.data_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = request.data_uri
    if request.listen_address:
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = request.listen_address
    if request.dest_xml:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = request.dest_xml
    if request.persist_xml:
        params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = request.persist_xml
    if request.bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = request.bandwidth_mib
    if request.compression_methods:
        params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = list(request.compression_methods)
    if request.parallel_connections:
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = request.parallel_connections
    if request.migrate_disks:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(request.migrate_disks)
    if request.dest_name:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_NAME] = request.dest_name
    if request.disks_uri:
        params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = request.disks_uri
    flags = int(libvirt.VIR_MIGRATE_LIVE)
    for wanted, flag in (
        (request.peer2peer, libvirt.VIR_MIGRATE_PEER2PEER),
        (request.persist, libvirt.VIR_MIGRATE_PERSIST_DEST),
        (request.undefine_source, libvirt.VIR_MIGRATE_UNDEFINE_SOURCE),
        (request.compressed or bool(request.compression_methods), libvirt.VIR_MIGRATE_COMPRESSED),
        (request.auto_converge, libvirt.VIR_MIGRATE_AUTO_CONVERGE),
        (request.tls, libvirt.VIR_MIGRATE_TLS),
        (bool(request.parallel_connections), libvirt.VIR_MIGRATE_PARALLEL),
        (request.copy_storage_all or bool(request.migrate_disks), libvirt.VIR_MIGRATE_NON_SHARED_DISK),
    ):
        if wanted:
            flags |= flag
    return flags, params


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


@contextlib.contextmanager
def open_hosts(source_uri: str, destination_uri: str) -> Iterator[tuple[Host, Host]]:
    """Both connections of a migration, closed on the way out."""
    source = Host.open(source_uri)
    try:
        destination = Host.open(destination_uri)
    except BaseException:
        source.close()
        raise
    try:
        yield source, destination
    finally:
        destination.close()
        source.close()
