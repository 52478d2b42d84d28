#!/usr/bin/python
# Copyright: the vfio-migration-orchestrator maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module vfio.orchestrator.vfio_migrate: wraps `orchestrator migrate`."""

# Ansible's module boilerplate; the module only runs on Python 3, where these are no-ops.
from __future__ import absolute_import, division, print_function  # noqa: UP010 - Ansible boilerplate

__metaclass__ = type  # noqa: UP001 - Ansible boilerplate

DOCUMENTATION = r"""
---
module: vfio_migrate
short_description: Live-migrate a VM with VFIO devices, draining its RDMA workloads on QEMU's events
version_added: "0.1.0"
description:
  - Runs C(orchestrator migrate DOMAIN DEST_URI --json) and returns its report.
  - The orchestrator pre-flights the migration, follows every VFIO device on both hosts, runs the
    policy's drain hooks the moment a device is about to be quiesced and its undrain hooks when it runs
    again (exactly once, on every path), and records the migration in its journal.
  - A VM that already runs on the destination is success with C(changed=false), so the task is
    idempotent.
  - Every option of C(orchestrator migrate) is an option of the module (C(--dry-run) is check mode);
    an option left out leaves the policy's or the CLI's default, as on the command line.
  - A failed, rolled-back or aborted migration fails the task with C(changed=false) (the VM then runs on
    the source, its workloads undrained); C(changed) is the CLI's own C(changed) field. C(msg) gives the
    error and, one line each, every hook that failed with its label, device, error and the end of its
    output; the report's fields are returned with it.
author:
  - VFIO orchestrator maintainers (@vfio-orchestrator)
requirements:
  - The C(orchestrator) CLI (the vfio-migration-orchestrator package) on the host the task runs on.
options:
  domain:
    description:
      - Name or UUID of the libvirt domain to migrate.
    type: str
    required: true
  dest_uri:
    description:
      - libvirt connection URI of the destination host (for example C(qemu+ssh://hv2/system)).
    type: str
    required: true
  source_uri:
    description:
      - libvirt connection URI of the source host (C(orchestrator -c)).
      - When omitted, the CLI uses C($LIBVIRT_DEFAULT_URI), else C(qemu:///system).
    type: str
  policy:
    description:
      - Policy name (looked up in C($ORCH_POLICY_DIR), C(/etc/orchestrator/policies), then the shipped
        policies) or path of a policy TOML file. When omitted, the default observe-only policy.
    type: str
  drain:
    description:
      - When the drain hooks run (C(--drain)); overrides the policy's C(switchover.drain).
      - V(prepare) on each device's prepare event (QEMU 11.0; a late fallback on older QEMU), V(gated)
        holds the switchover (downtime limit at its floor) until every device is drained, V(start)
        drains before the migration job starts.
      - When omitted, the policy's C(switchover.drain).
    type: str
    choices: [prepare, gated, start]
  migrateuri:
    description:
      - Migration data URI (C(tcp://HOST:PORT), C(unix:///PATH)); overrides the policy's C(data_uri).
    type: str
  listen_address:
    description:
      - Address the destination listens on for the migration data.
    type: str
  p2p:
    description:
      - V(true) for a peer-to-peer migration, V(false) for a client-driven (direct) one.
      - When omitted, the policy's C(mode).
    type: bool
  timeout:
    description:
      - Abort the migration job when it runs longer than this many seconds (the VM keeps running on the
        source). When omitted, the policy's C(completion_timeout_s).
    type: float
  bandwidth:
    description:
      - Bandwidth limit in MiB/s (C(--bandwidth)). When omitted, the policy's C(bandwidth_mib).
    type: int
  max_downtime:
    description:
      - The most downtime QEMU may use, in milliseconds (C(--max-downtime)); caps the steps of the policy's
        convergence schedule.
      - When omitted, the policy's C(max_downtime_ms) (else QEMU's own limit).
    type: int
  auto_converge:
    description:
      - V(true) throttles the vCPUs of a guest that does not converge (C(--auto-converge)).
      - When omitted or V(false), the policy's C(auto_converge) applies (V(false) in the shipped policies);
        the CLI has no option that turns off what the policy turns on.
    type: bool
  compressed:
    description:
      - V(true) compresses the migration data (C(--compressed)).
      - When omitted or V(false), the policy's C(compressed) applies (V(false) in the shipped policies); the
        CLI has no option that turns off what the policy turns on.
    type: bool
  comp_methods:
    description:
      - The compression methods (C(--comp-methods), comma-separated).
      - When omitted, libvirt's default.
    type: list
    elements: str
    choices: [mt, xbzrle, zlib, zstd]
  parallel:
    description:
      - Send the data over several connections (multifd, C(--parallel)); QEMU's default of 2 unless
        O(parallel_connections) says how many.
    type: bool
    default: false
  parallel_connections:
    description:
      - How many connections for the data, 1 to 255 (C(--parallel-connections); implies O(parallel)).
    type: int
  tls:
    description:
      - Encrypt the migration data with TLS (C(--tls)); both hosts need libvirt's migration TLS set up.
    type: bool
    default: false
  persistent:
    description:
      - Define the VM on the destination (V(true), C(--persistent)) or not (V(false), C(--no-persistent)).
      - When omitted, the policy's C(persist).
    type: bool
  undefinesource:
    description:
      - Undefine the VM on the source after success (V(true), C(--undefinesource)) or keep its definition
        there (V(false), C(--keep-source)).
      - When omitted, the policy's C(undefine_source).
    type: bool
  copy_storage_all:
    description:
      - Copy the VM's non-shared disks too (C(--copy-storage-all)).
    type: bool
    default: false
  migrate_disks:
    description:
      - Copy only these disks, by target (C(--migrate-disks), comma-separated), for example V([vda, vdb]).
    type: list
    elements: str
  disks_uri:
    description:
      - Where the destination takes the disks' copy, C(tcp://HOST:PORT) or C(unix:///PATH)
        (C(--disks-uri)); needed with a C(unix://) O(migrateuri).
    type: str
  dname:
    description:
      - The domain's name on the destination (C(--dname)). When omitted, its name on the source.
    type: str
  xml:
    description:
      - Path of the domain XML for the destination (C(--xml)), read on the host the task runs on.
    type: path
  postcopy:
    description:
      - V(true) is refused and fails the task (C(--postcopy)), as VFIO devices forbid post-copy migration;
        the option is there so that the refusal says why.
    type: bool
    default: false
  lock_wait:
    description:
      - When another migration of the VM runs, wait up to this many seconds (0 to 86400) for it to end
        instead of failing at once (C(--lock-wait)).
      - When omitted, 0 (fail at once).
    type: float
  journal:
    description:
      - Path of the SQLite journal (C(--journal)). When omitted, C($ORCH_JOURNAL), else
        C(/var/lib/orchestrator/journal.sqlite).
      - In check mode nothing is written to it.
    type: path
  orchestrator:
    description:
      - Path of the C(orchestrator) executable, or a name looked up on C(PATH).
    type: str
    default: orchestrator
attributes:
  check_mode:
    support: full
    description:
      - Runs the CLI with C(--dry-run), the pre-flight and plan only; nothing migrates, no hook runs and
        nothing is written to the journal. C(changed) is V(true) when the VM would move, V(false) when it
        already runs on the destination.
  diff_mode:
    support: partial
    description: Shows where the domain runs before and after; not a diff of its configuration.
  platform:
    support: full
    description: The CLI runs on the host the task targets and reaches the hypervisors by their URIs.
    platforms: posix
seealso:
  - module: vfio.orchestrator.vfio_events
  - module: vfio.orchestrator.vfio_evacuate
"""

EXAMPLES = r"""
- name: Live-migrate vm1 to hv2 with the rdma-drain policy
  vfio.orchestrator.vfio_migrate:
    domain: vm1
    source_uri: qemu+ssh://hv1.example.com/system
    dest_uri: qemu+ssh://hv2.example.com/system
    policy: rdma-drain
    timeout: 300
  register: migration

- name: Show how long the guest was paused
  ansible.builtin.debug:
    msg: >-
      {{ migration.migration_id }}: {{ migration.outcome }},
      downtime {{ migration.timings.downtime_ms }} ms

- name: Migrate over a dedicated network and keep the source definition
  vfio.orchestrator.vfio_migrate:
    domain: vm2
    source_uri: qemu+ssh://hv1.example.com/system
    dest_uri: qemu+ssh://hv3.example.com/system
    migrateuri: tcp://10.0.0.3:49152
    bandwidth: 2000
    undefinesource: false
    journal: /var/lib/orchestrator/journal.sqlite

- name: Hold the switchover until every device is drained, over TLS, waiting for a running migration
  vfio.orchestrator.vfio_migrate:
    domain: vm3
    source_uri: qemu+ssh://hv1.example.com/system
    dest_uri: qemu+ssh://hv2.example.com/system
    policy: rdma-drain
    drain: gated
    max_downtime: 500
    auto_converge: true
    tls: true
    parallel_connections: 4
    lock_wait: 120
"""

RETURN = r"""
outcome:
  description:
    - How the migration ended; V(succeeded), V(unchanged) (already on the destination), V(rolled-back),
      V(aborted), V(interrupted), or V(planned) in check mode.
  returned: when the CLI printed its report
  type: str
  sample: succeeded
migration_id:
  description:
    - The migration's id in the journal (C(orchestrator history ID) shows its timeline).
    - In check mode, the dry run's id; nothing is written to the journal.
  returned: when the CLI printed its report
  type: str
  sample: 3f2a9c1e0b7d4e55
domain:
  description: The domain's name.
  returned: when the CLI printed its report
  type: str
  sample: vm1
source:
  description: The source URI.
  returned: when the CLI printed its report
  type: str
  sample: qemu+ssh://hv1.example.com/system
destination:
  description: The destination URI.
  returned: when the CLI printed its report
  type: str
  sample: qemu+ssh://hv2.example.com/system
policy:
  description: The policy's name.
  returned: when the CLI printed its report
  type: str
  sample: rdma-drain
error:
  description: Why the migration failed, V(null) on success.
  returned: when the CLI printed its report
  type: str
  sample: null
timings:
  description: Durations of the migration.
  returned: when the CLI printed its report
  type: dict
  contains:
    total_s:
      description: Seconds from start to end, V(null) when nothing ran.
      type: float
    job_s:
      description: Seconds the libvirt migration job took.
      type: float
    downtime_ms:
      description: Milliseconds the guest was paused at switchover.
      type: int
  sample: {total_s: 4.21, job_s: 3.87, downtime_ms: 312}
devices:
  description: Per drained VFIO device (by id), when it was drained and undrained and why.
  returned: when the CLI printed its report
  type: dict
  sample: {nic0: {drained_at: 1767225600.12, late: false, drain_reason: pre-copy-p2p-prepare,
                  undrained_at: 1767225600.95, undrain_reason: running on the destination}}
timeline:
  description: What happened, in order; C(t) is seconds since the start.
  returned: when the CLI printed its report
  type: list
  elements: dict
  sample: [{t: 0.412, host: orchestrator, kind: decision, text: "drain nic0"}]
hooks:
  description: Every hook run, in the order they started (retries are separate runs).
  returned: when the CLI printed its report
  type: list
  elements: dict
  contains:
    trigger:
      description: When it ran (V(before), V(drain), V(undrain), V(after-success), V(after-failure)).
      type: str
    label:
      description: The hook's name in the policy (its program's base name by default).
      type: str
    device_id:
      description: The VFIO device it ran for, V(null) for before/after hooks.
      type: str
    ok:
      description: Whether it exited with status 0 before its deadline.
      type: bool
    error:
      description: Why it failed, V(null) when it did not.
      type: str
    output_tail:
      description: The end of what it wrote on stdout and stderr.
      type: str
  sample: [{trigger: drain, label: rdma-drain, device_id: nic0, ok: false, error: exit status 1,
            output_tail: "peer 10.0.0.7: connection refused"}]
notes:
  description: Warnings and remarks of the run.
  returned: when the CLI printed its report
  type: list
  elements: str
  sample: []
plan:
  description: The pre-flight's plan, one line per step.
  returned: when the CLI printed its report
  type: list
  elements: str
  sample: ["policy rdma-drain", "migrate vm1 live (peer-to-peer) qemu:///system -> qemu+ssh://hv2/system"]
rc:
  description: The CLI's exit code (see the orchestrator's README, "Exit codes").
  returned: always
  type: int
  sample: 0
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - Ansible wants the docs first
from ansible_collections.vfio.orchestrator.plugins.module_utils.orchestrator_cli import (  # noqa: E402
    COMMON_ARGUMENT_SPEC,
    EXIT_OK,
    MIGRATION_ARGUMENT_SPEC,
    MIGRATION_CLI_OPTIONS,
    CliOption,
    cli_args,
    fail_message,
    failed_hooks,
    run,
)

REPORT_FIELDS = (
    "outcome",
    "migration_id",
    "domain",
    "source",
    "destination",
    "policy",
    "error",
    "timings",
    "devices",
    "timeline",
    "hooks",
    "notes",
    "plan",
)


ARGUMENT_SPEC = {
    "domain": {"type": "str", "required": True},
    "dest_uri": {"type": "str", "required": True},
    "source_uri": {"type": "str"},
    **MIGRATION_ARGUMENT_SPEC,
    "p2p": {"type": "bool"},
    "persistent": {"type": "bool"},
    "undefinesource": {"type": "bool"},
    "migrateuri": {"type": "str"},
    "listen_address": {"type": "str"},
    "copy_storage_all": {"type": "bool", "default": False},
    "migrate_disks": {"type": "list", "elements": "str"},
    "disks_uri": {"type": "str"},
    "dname": {"type": "str"},
    "xml": {"type": "path"},
    "postcopy": {"type": "bool", "default": False},
    "lock_wait": {"type": "float"},
    "journal": {"type": "path"},
    **COMMON_ARGUMENT_SPEC,
}

# The module's options that are options of `orchestrator migrate` (DOMAIN and DESTURI are its
# arguments; check mode is --dry-run; --json is always passed). The collection's README has them as a
# table, and tests/unit/test_ansible_modules.py checks both against the CLI's own options.
CLI_OPTIONS = (
    CliOption("source_uri", "-c"),
    *MIGRATION_CLI_OPTIONS,
    CliOption("p2p", "--p2p", off="--direct"),
    CliOption("persistent", "--persistent", off="--no-persistent"),
    CliOption("undefinesource", "--undefinesource", off="--keep-source"),
    CliOption("migrateuri", "--migrateuri"),
    CliOption("listen_address", "--listen-address"),
    CliOption("copy_storage_all", "--copy-storage-all"),
    CliOption("migrate_disks", "--migrate-disks", joined=True),
    CliOption("disks_uri", "--disks-uri"),
    CliOption("dname", "--dname"),
    CliOption("xml", "--xml"),
    CliOption("postcopy", "--postcopy"),
    CliOption("lock_wait", "--lock-wait"),
    CliOption("journal", "--journal"),
)


def build_args(params, check_mode):
    """The CLI's arguments for the module's options."""
    args = ["migrate", params["domain"], params["dest_uri"], *cli_args(params, CLI_OPTIONS, ARGUMENT_SPEC)]
    if check_mode:
        args.append("--dry-run")
    return args


def failure_message(rc, document, error):
    """The failed task's msg: what went wrong, then one line per failed hook (no repeated line)."""
    lines = [fail_message(rc, document, error), *failed_hooks(document)]
    return "\n".join(dict.fromkeys(line for line in lines if line))


def is_changed(document, check_mode):
    """`changed` as the CLI reports it; in check mode, whether the VM would move."""
    if document is None:
        return False
    if check_mode:
        return bool(document.get("changed")) or document.get("outcome") == "planned"
    return bool(document.get("changed"))


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
    )
    rc, document, error, argv = run(module, build_args(module.params, module.check_mode))
    fields = {key: document.get(key) for key in REPORT_FIELDS} if document else {}
    changed = is_changed(document, module.check_mode)
    result = {"changed": changed, "rc": rc, **fields}

    if rc != EXIT_OK or document is None:
        module.fail_json(msg=failure_message(rc, document, error), cmd=argv, **result)

    domain = document.get("domain") or module.params["domain"]
    destination = document.get("destination")
    if not changed:
        result["msg"] = f"{domain} already runs on {destination}: nothing to do"
    else:
        verb = "would migrate" if module.check_mode else "migrated"
        result["msg"] = f"{verb} {domain} to {destination} ({document.get('outcome')})"
    if module._diff and changed:
        result["diff"] = {
            "before_header": f"{domain} (where it runs)",
            "after_header": f"{domain} (where it runs)",
            "before": f"{document.get('source')}\n",
            "after": f"{destination}\n",
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
