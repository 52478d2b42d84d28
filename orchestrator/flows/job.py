"""A migration's libvirt job: its parameters, from the request, and the running job's two knobs (the
downtime limit and the abort), turned as the phase machine decides.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from orchestrator.core.actions import SetDowntime
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.hypervisor import Guest, MigrateRequest
from orchestrator.core.policy import MigrationMode
from orchestrator.core.request import Request
from orchestrator.flows.story import Story


class JobControl:
    """The running job's downtime limit and abort (from any thread); no-ops until the job has a domain."""

    def __init__(self, story: Story) -> None:
        self.story = story
        self.dom: Guest | None = None  # set just before the job starts
        self._abort_sent = False
        self._downtime_lock = threading.Lock()  # downtime changes applied in the order decided

    def abort(self, reason: str) -> None:
        """Abort the job (once it has started); a failure to is noted for the first abort only."""
        dom, first = self.dom, not self._abort_sent
        self._abort_sent = True
        if dom is None:
            return
        try:
            dom.abort_job()
        except OrchestratorError as exc:
            if first:
                self.story.note(f"could not abort the job: {exc.message}")

    def set_downtime(self, action: SetDowntime) -> None:
        """Apply a new downtime limit (once the job has started), in the order decided."""
        dom = self.dom
        if dom is None:
            return
        with self._downtime_lock:
            try:
                dom.set_max_downtime(action.ms)
            except OrchestratorError as exc:
                self.story.note(f"could not set the downtime limit to {action.ms} ms: {exc.message}")
                return
        self.story.decision(action.why, journaled=True)


def migrate_request(request: Request, dom: Guest) -> MigrateRequest:
    """The libvirt job's parameters for `request`, from `dom` on the source."""
    settings, job = request.migration, request.job
    job_request = MigrateRequest(
        destination_uri=request.destination_uri,
        peer2peer=settings.mode is MigrationMode.P2P,
        persist=settings.persist,
        undefine_source=settings.undefine_source,
        # `{domain}` lets one policy give each of several concurrent migrations its own socket.
        data_uri=settings.data_uri.replace("{domain}", request.domain) if settings.data_uri else None,
        listen_address=request.listen_address,
        bandwidth_mib=settings.bandwidth_mib or None,
        compressed=settings.compressed,
        compression_methods=job.compression_methods,
        auto_converge=settings.auto_converge,
        tls=job.tls,
        parallel_connections=job.parallel_connections,
        copy_storage_all=job.copy_storage_all,
        migrate_disks=job.migrate_disks,
        dest_name=job.dest_name,
        disks_uri=job.disks_uri,
    )
    # Carry the events property into the destination's live and persistent definitions (into the
    # user's own --xml when given).
    from orchestrator.core.domxml_edit import destination_xml

    given = job.dest_xml
    migratable = given if given is not None else dom.xml(migratable=True)
    dest = destination_xml(migratable)
    if dest == migratable and given is None:
        return job_request
    return replace(job_request, dest_xml=dest, persist_xml=dest if job_request.persist else None)
