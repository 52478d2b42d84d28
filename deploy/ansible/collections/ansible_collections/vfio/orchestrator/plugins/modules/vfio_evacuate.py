#!/usr/bin/python
# Copyright: the vfio-migration-orchestrator maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module vfio.orchestrator.vfio_evacuate: wraps `orchestrator evacuate`."""

# Ansible's module boilerplate; the module only runs on Python 3, where these are no-ops.
from __future__ import absolute_import, division, print_function  # noqa: UP010 - Ansible boilerplate

__metaclass__ = type  # noqa: UP001 - Ansible boilerplate

DOCUMENTATION = r"""
---
module: vfio_evacuate
short_description: Empty a libvirt host by live-migrating its VMs (with their VFIO devices) elsewhere
version_added: "0.1.0"
description:
  - Runs C(orchestrator evacuate -c SOURCE_URI --to URI ... --json) and returns the plan and the outcome
    of every VM.
  - Every running VM of the source (and with O(inactive) its persistent shut-off ones, by definition
    only) goes to the destination with the most free memory that fits it, at most O(concurrency)
    migrations at once and O(per_destination) into one destination. Each goes through the same path as
    M(vfio.orchestrator.vfio_migrate) (policy, drain and undrain hooks, journal); transient failures are
    retried.
  - The task succeeds when the source is empty (of the selected VMs) and fails, listing what is left,
    when it is not. Re-running moves only what is still there, so the task is idempotent
    (C(changed=false) once the host is empty).
  - An O(include) glob that matches nothing on the source is not an error (nothing to move); the task
    reports C(changed=false) and says why in C(msg) and RV(skipped_reason).
  - An unreachable destination is reported in RV(unreachable) and the others are used.
  - Every option of C(orchestrator evacuate) is an option of the module (C(--dry-run) is check mode);
    an option left out leaves the policy's or the CLI's default, as on the command line.
author:
  - VFIO orchestrator maintainers (@vfio-orchestrator)
requirements:
  - The C(orchestrator) CLI (the vfio-migration-orchestrator package) on the host the task runs on.
options:
  source_uri:
    description:
      - libvirt connection URI of the host to empty (C(orchestrator evacuate -c)).
    type: str
    required: true
  destinations:
    description:
      - libvirt connection URIs of the hosts that may take the VMs (one C(--to) each).
    type: list
    elements: str
    required: true
  concurrency:
    description:
      - At most this many migrations at once. When omitted, the CLI's default (2).
    type: int
  per_destination:
    description:
      - At most this many incoming migrations at once per destination. When omitted, the CLI's default
        (2).
    type: int
  group_by:
    description:
      - V(metadata) moves running VMs that share a switchover-group label in their domain metadata
        (C(urn:orchestrator:group:1)) as one group, drained once and switched over together, as do the
        policy's C([[evacuate.groups]]); V(none) moves every VM on its own. When omitted, the policy's
        C([evacuate] group_by).
    type: str
    choices: [metadata, none]
  include:
    description:
      - Only the VMs whose name matches one of these globs (C(--include), repeated).
    type: list
    elements: str
  exclude:
    description:
      - Not the VMs whose name matches one of these globs (C(--exclude), repeated).
    type: list
    elements: str
  policy:
    description:
      - Policy name (looked up in C($ORCH_POLICY_DIR), C(/etc/orchestrator/policies), then the shipped
        policies) or path of a policy TOML file, used for every VM. C({domain}) in the policy's
        C(data_uri) is replaced by each VM's name.
    type: str
  drain:
    description:
      - When the drain hooks run, for every VM (C(--drain)); overrides the policy's C(switchover.drain).
      - V(prepare) on each device's prepare event (QEMU 11.0; a late fallback on older QEMU), V(gated)
        holds the switchover (downtime limit at its floor) until every device is drained, V(start)
        drains before the migration job starts.
      - When omitted, the policy's C(switchover.drain).
    type: str
    choices: [prepare, gated, start]
  bandwidth:
    description:
      - Bandwidth limit of every migration in MiB/s (C(--bandwidth)). When omitted, the policy's
        C(bandwidth_mib).
    type: int
  max_downtime:
    description:
      - The most downtime QEMU may use for each VM, in milliseconds (C(--max-downtime)); caps the steps of
        the policy's convergence schedule.
      - When omitted, the policy's C(max_downtime_ms) (else QEMU's own limit).
    type: int
  timeout:
    description:
      - Abort a VM's migration job when it runs longer than this many seconds (C(--timeout)); the VM keeps
        running on the source. When omitted, the policy's C(completion_timeout_s).
    type: float
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
      - Send each VM's data over several connections (multifd, C(--parallel)); QEMU's default of 2 unless
        O(parallel_connections) says how many.
    type: bool
    default: false
  parallel_connections:
    description:
      - How many connections for each VM's data, 1 to 255 (C(--parallel-connections); implies
        O(parallel)).
    type: int
  tls:
    description:
      - Encrypt the migration data with TLS (C(--tls)); the hosts need libvirt's migration TLS set up.
    type: bool
    default: false
  inactive:
    description:
      - Also move the persistent shut-off VMs (their definition only).
    type: bool
    default: false
  force:
    description:
      - Move what fits even when some VMs fit on no destination (by default nothing moves then).
    type: bool
    default: false
  reserve:
    description:
      - MiB of memory to keep free on every destination when placing VMs. When omitted, none.
    type: int
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
      - Runs the CLI with C(--dry-run), the plan and each VM's pre-flight only; nothing moves, no hook runs
        and nothing is written to the journal. C(changed) is V(true) when the plan would move something.
        RV(empty) then tells whether the source is empty now, not after the move.
  diff_mode:
    support: partial
    description: Shows where each moved (or, in check mode, planned) VM runs before and after.
  platform:
    support: full
    description: The CLI runs on the host the task targets and reaches the hypervisors by their URIs.
    platforms: posix
notes:
  - The task waits for every migration; give it a long enough time with C(async) when the host holds
    many large VMs.
seealso:
  - module: vfio.orchestrator.vfio_migrate
"""

EXAMPLES = r"""
- name: Empty hv1 onto hv2 and hv3, three migrations at once
  vfio.orchestrator.vfio_evacuate:
    source_uri: qemu+ssh://hv1.example.com/system
    destinations:
      - qemu+ssh://hv2.example.com/system
      - qemu+ssh://hv3.example.com/system
    concurrency: 3
    policy: rdma-drain
  register: evacuation

- name: Show where every VM went
  ansible.builtin.debug:
    msg: "{{ item.domain }} -> {{ item.destination }}: {{ item.outcome }}"
  loop: "{{ evacuation.results }}"

- name: Only the database VMs, and their shut-off definitions too
  vfio.orchestrator.vfio_evacuate:
    source_uri: qemu+ssh://hv1.example.com/system
    destinations: [qemu+ssh://hv2.example.com/system]
    include: ["db-*"]
    exclude: ["db-scratch-*"]
    inactive: true
    journal: /var/lib/orchestrator/journal.sqlite

- name: Drain before each job starts; 1 GiB/s, 300 ms of downtime and 10 minutes at most per VM
  vfio.orchestrator.vfio_evacuate:
    source_uri: qemu+ssh://hv1.example.com/system
    destinations: [qemu+ssh://hv2.example.com/system]
    policy: rdma-drain
    drain: start
    bandwidth: 1024
    max_downtime: 300
    timeout: 600
"""

RETURN = r"""
evacuation_id:
  description:
    - The evacuation's id; each VM's migration is in the journal under it.
    - In check mode, the dry run's id; nothing is written to the journal.
  returned: when the CLI printed its report
  type: str
  sample: 9d41c07a2b3e4f10
source:
  description: The source URI.
  returned: when the CLI printed its report
  type: str
  sample: qemu+ssh://hv1.example.com/system
destinations:
  description: The destination URIs.
  returned: when the CLI printed its report
  type: list
  elements: str
  sample: [qemu+ssh://hv2.example.com/system, qemu+ssh://hv3.example.com/system]
empty:
  description:
    - Whether no selected VM is left on the source. In check mode, whether it is empty now.
  returned: always
  type: bool
  sample: true
plan:
  description:
    - Which VM goes where, in what order, and why; one object per VM, biggest first.
  returned: always
  type: list
  elements: dict
  contains:
    domain:
      description: The VM's name.
      type: str
    destination:
      description: The destination URI chosen for it.
      type: str
    memory_mib:
      description: The VM's memory in MiB.
      type: int
    order:
      description: Its place in the queue, from 1.
      type: int
    reason:
      description: Why that destination.
      type: str
    running:
      description: V(true) for a live migration, V(false) for a shut-off VM moved by definition (O(inactive)).
      type: bool
  sample: [{domain: vm1, destination: qemu+ssh://hv2/system, memory_mib: 4096, order: 1,
            reason: "most free memory that fits: 60000 MiB free, needs 4096 MiB", running: true}]
results:
  description: How each VM's move went (empty in check mode).
  returned: always
  type: list
  elements: dict
  contains:
    domain:
      description: The VM's name.
      type: str
    destination:
      description: Where it went (or was to go).
      type: str
    outcome:
      description: The migration's outcome (V(succeeded), V(unchanged), V(rolled-back), V(aborted), ...).
      type: str
    changed:
      description: Whether it moved.
      type: bool
    migration_id:
      description: Its migration's id in the journal.
      type: str
    error:
      description: Why it failed, V(null) on success.
      type: str
    attempts:
      description: How many attempts it took.
      type: int
    seconds:
      description: How long it took, in seconds.
      type: float
  sample: [{domain: vm1, destination: qemu+ssh://hv2/system, outcome: succeeded, changed: true,
            migration_id: 3f2a9c1e0b7d4e55, error: null, attempts: 1, seconds: 4.2}]
unplaced:
  description: VMs that fit on no destination, with why.
  returned: always
  type: list
  elements: dict
  contains:
    domain:
      description: The VM's name.
      type: str
    memory_mib:
      description: The VM's memory in MiB.
      type: int
    reason:
      description: Why it fits nowhere.
      type: str
  sample: [{domain: big1, memory_mib: 262144, reason: "needs 262144 MiB; the most free is 60000 MiB"}]
unreachable:
  description: Destinations that could not be reached, with the error.
  returned: always
  type: list
  elements: dict
  contains:
    uri:
      description: The destination's URI.
      type: str
    error:
      description: Why it could not be reached.
      type: str
  sample: [{uri: qemu+ssh://hv3.example.com/system, error: "cannot connect ..."}]
left:
  description: The selected VMs still on the source.
  returned: always
  type: list
  elements: str
  sample: []
message:
  description: The CLI's remark on the run, if any.
  returned: when the CLI printed its report
  type: str
  sample: "dry run: nothing moved"
skipped_reason:
  description: Why nothing was done (no VM matches O(include); the CLI exited 6).
  returned: when nothing matched
  type: str
  sample: "no VM on qemu+ssh://hv1/system matches --include db-*"
rc:
  description: The CLI's exit code (0 empty, 8 not empty; see the orchestrator's README, "Exit codes").
  returned: always
  type: int
  sample: 0
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - Ansible wants the docs first
from ansible_collections.vfio.orchestrator.plugins.module_utils.orchestrator_cli import (  # noqa: E402
    COMMON_ARGUMENT_SPEC,
    EXIT_INTERRUPTED,
    EXIT_NOT_EMPTY,
    EXIT_NOTHING_TO_DO,
    EXIT_OK,
    MIGRATION_ARGUMENT_SPEC,
    MIGRATION_CLI_OPTIONS,
    CliOption,
    cli_args,
    fail_message,
    run,
)

LIST_FIELDS = ("plan", "results", "unplaced", "unreachable", "left")
OTHER_FIELDS = ("evacuation_id", "source", "destinations", "message")
PLAN_KEYS = ("domain", "destination", "memory_mib", "order", "reason", "running")


ARGUMENT_SPEC = {
    "source_uri": {"type": "str", "required": True},
    "destinations": {"type": "list", "elements": "str", "required": True},
    "concurrency": {"type": "int"},
    "per_destination": {"type": "int"},
    "group_by": {"type": "str", "choices": ["metadata", "none"]},
    "include": {"type": "list", "elements": "str"},
    "exclude": {"type": "list", "elements": "str"},
    **MIGRATION_ARGUMENT_SPEC,
    "inactive": {"type": "bool", "default": False},
    "force": {"type": "bool", "default": False},
    "reserve": {"type": "int"},
    "journal": {"type": "path"},
    **COMMON_ARGUMENT_SPEC,
}

# The module's options that are options of `orchestrator evacuate` (check mode is --dry-run; --json is
# always passed). The collection's README has them as a table, and tests/unit/test_ansible_modules.py
# checks both against the CLI's own options.
CLI_OPTIONS = (
    CliOption("source_uri", "-c"),
    CliOption("destinations", "--to"),
    CliOption("concurrency", "--concurrency"),
    CliOption("per_destination", "--per-destination"),
    CliOption("group_by", "--group-by"),
    CliOption("include", "--include"),
    CliOption("exclude", "--exclude"),
    *MIGRATION_CLI_OPTIONS,
    CliOption("inactive", "--inactive"),
    CliOption("reserve", "--reserve"),
    CliOption("force", "--force"),
    CliOption("journal", "--journal"),
)


def build_args(params, check_mode):
    """The CLI's arguments for the module's options."""
    args = ["evacuate", *cli_args(params, CLI_OPTIONS, ARGUMENT_SPEC)]
    if check_mode:
        args.append("--dry-run")
    return args


def plan_entries(document):
    """The plan as documented in RETURN: one object per VM with exactly PLAN_KEYS, in queue order.

    Entries that are not objects (an incompatible CLI) are dropped rather than passed on as prose.
    """
    plan = [entry for entry in (document or {}).get("plan") or [] if isinstance(entry, dict)]
    entries = [{key: entry.get(key) for key in PLAN_KEYS} for entry in plan]
    for entry in entries:
        if entry["running"] is None:
            entry["running"] = True  # a CLI before `running` existed moved running VMs only
    return sorted(entries, key=lambda entry: (entry["order"] is None, entry["order"] or 0))


def not_empty_message(document, check_mode):
    """Why the source is (or would stay) not empty, in one line."""
    source = document.get("source") or "the source"
    left = document.get("left") or []
    reasons = [f"{u.get('domain')} fits nowhere ({u.get('reason')})" for u in document.get("unplaced") or []]
    reasons += [
        f"{r.get('domain')} {r.get('outcome')}: {r.get('error')}"
        for r in document.get("results") or []
        if r.get("error")
    ]
    reasons += [f"{u.get('uri')} unreachable: {u.get('error')}" for u in document.get("unreachable") or []]
    if document.get("message"):
        reasons.append(str(document["message"]))
    state = "would not be empty" if check_mode else "is not empty"
    text = f"{source} {state}: {', '.join(left) or 'VMs'} left"
    return f"{text}; {'; '.join(reasons)}" if reasons else text


def placement_diff(document, check_mode):
    """Before/after of where the moved (or planned) VMs run."""
    source = document.get("source")
    if check_mode:
        moves = [(p.get("domain"), p.get("destination")) for p in document.get("plan") or []]
    else:
        results = document.get("results") or []
        moves = [(r.get("domain"), r.get("destination")) for r in results if r.get("changed")]
    moves.sort()
    return {
        "before_header": "where the VMs run",
        "after_header": "where the VMs run",
        "before": "".join(f"{domain}: {source}\n" for domain, _destination in moves),
        "after": "".join(f"{domain}: {destination}\n" for domain, destination in moves),
    }


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
    )
    check_mode = module.check_mode
    rc, document, error, argv = run(module, build_args(module.params, check_mode))

    if rc == EXIT_NOTHING_TO_DO:
        reason = error or "no VM on the source matches the include globs; nothing to move"
        # failed=False explicitly: Ansible otherwise takes a non-zero rc for a failure.
        module.exit_json(
            changed=False,
            failed=False,
            empty=True,
            msg=reason,
            skipped_reason=reason,
            rc=rc,
            cmd=argv,
            **{key: [] for key in LIST_FIELDS},
        )

    doc = document or {}
    result = {key: doc.get(key) or [] for key in LIST_FIELDS}
    result["plan"] = plan_entries(doc)
    result.update({key: doc.get(key) for key in OTHER_FIELDS if key in doc})
    changed = bool(doc.get("changed"))
    if check_mode:
        changed = changed or bool(result["plan"])
    result.update(changed=changed, empty=bool(doc.get("empty")), rc=rc)
    if module._diff and changed and document is not None:
        result["diff"] = placement_diff(document, check_mode)

    if document is None:
        module.fail_json(msg=fail_message(rc, document, error), cmd=argv, **result)
    if rc == EXIT_NOT_EMPTY:
        module.fail_json(msg=not_empty_message(document, check_mode), cmd=argv, **result)
    if rc == EXIT_INTERRUPTED:
        left = ", ".join(result["left"]) or "nothing"
        message = f"the evacuation was interrupted; left on the source: {left}"
        module.fail_json(msg=message, cmd=argv, **result)
    if rc != EXIT_OK:
        module.fail_json(msg=fail_message(rc, document, error), cmd=argv, **result)

    source = doc.get("source") or module.params["source_uri"]
    if check_mode:
        planned = len(result["plan"])
        result["msg"] = f"would move {planned} VM(s) off {source}" if planned else f"{source} is empty"
    else:
        moved = sum(1 for r in result["results"] if r.get("changed"))
        result["msg"] = f"moved {moved} VM(s) off {source}; it is empty" if moved else f"{source} is empty"
    module.exit_json(**result)


if __name__ == "__main__":
    main()
