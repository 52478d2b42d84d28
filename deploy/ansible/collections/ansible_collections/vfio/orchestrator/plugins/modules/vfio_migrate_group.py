#!/usr/bin/python
# Copyright: the vfio-migration-orchestrator maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module vfio.orchestrator.vfio_migrate_group: wraps `orchestrator migrate-group`."""

# Ansible's module boilerplate; the module only runs on Python 3, where these are no-ops.
from __future__ import absolute_import, division, print_function  # noqa: UP010 - Ansible boilerplate

__metaclass__ = type  # noqa: UP001 - Ansible boilerplate

DOCUMENTATION = r"""
---
module: vfio_migrate_group
short_description: Live-migrate several VMs with VFIO devices as one switchover group, drained once
version_added: "0.3.0"
description:
  - Runs C(orchestrator migrate-group NAME DOMAIN[=DESTURI]... --json) and returns its report.
  - The VMs of a group usually serve one distributed job, which waits whenever any of them stops
    answering. Every member's job runs held at its gate (its downtime limit at its floor) until every
    member would switch over within its limit at once; then every device of every member is drained
    once, every VM is released at once, and every device is undrained once when all run again.
    Whatever the policy says, a group drains in the gated mode.
  - Before the release, any member failing aborts every member (none has switched over); after it, a
    member that fails rolls back on its source alone and the group is V(partial).
  - C(orchestrator migrate-group) leaves out a member that already runs on its destination; so that the
    task reports it, and never moves a lone remaining member as a group, the module first runs the
    group's dry run
    (C(--dry-run), every member's pre-flight; nothing changes and nothing is written to the journal)
    and leaves out the members the CLI reports V(unchanged), listed in RV(unchanged). When every member
    already runs on its destination the task is success with C(changed=false) and nothing else runs.
    When two or more members are left, the group runs with them only. When one is left the task fails,
    naming the members already moved, since a switchover group needs at least two members to move (move
    the last one with M(vfio.orchestrator.vfio_migrate), its workloads then drained on their own, or add
    members).
  - Whatever else the dry run says is left to the run to judge again (a member with another migration
    running is refused by the dry run but waited for by the run with O(lock_wait)); only an error without
    a report (bad input, an unreachable host) or an exit other than 0 and 2 fails the task at once.
  - Every option of C(orchestrator migrate-group) is an option of the module (C(--dry-run) is check
    mode); an option left out leaves the policy's or the CLI's default, as on the command line.
  - A group that is rolled back, aborted or interrupted fails the task with C(changed=false); one where
    some members moved and others did not (V(partial), exit 8) fails it with C(changed=true); one that
    needs an admin (exit 9, for example a failed undrain hook) fails it with C(changed) telling whether
    members moved. C(msg) gives the group's error and, one line each, every hook that failed (the
    group's own, then each member's with its name; the hook's label, device, error and the end of its
    output).
author:
  - VFIO orchestrator maintainers (@vfio-orchestrator)
requirements:
  - The C(orchestrator) CLI (the vfio-migration-orchestrator package) on the host the task runs on.
options:
  name:
    description:
      - The group's name (C(NAME)), in the journal and the reports; for example the job the VMs serve.
    type: str
    required: true
  members:
    description:
      - The group's VMs (at least two), each either a string C(DOMAIN) or C(DOMAIN=DESTURI), or a
        dictionary with the keys C(domain) (name or UUID of the libvirt domain, required) and C(dest_uri)
        (libvirt connection URI of its destination, optional).
      - A member without a destination URI goes to O(dest_uri) (an empty C(dest_uri) counts as none).
      - A dictionary's C(domain) cannot contain C(=) (the CLI splits C(DOMAIN=DESTURI) at its first C(=)).
    type: list
    elements: raw
    required: true
  dest_uri:
    description:
      - libvirt connection URI of the destination of the members that name none (C(--to)), for example
        C(qemu+ssh://hv2/system).
    type: str
  source_uri:
    description:
      - libvirt connection URI of the source host of every member (C(orchestrator -c)).
      - When omitted, the CLI uses C($LIBVIRT_DEFAULT_URI), else C(qemu:///system).
    type: str
  policy:
    description:
      - Policy name (looked up in C($ORCH_POLICY_DIR), C(/etc/orchestrator/policies), then the shipped
        policies) or path of a policy TOML file, used for every member. When omitted, the default
        observe-only policy.
      - Its C(switchover.drain) does not apply; a group always drains gated.
    type: str
  bandwidth:
    description:
      - Bandwidth limit of every member's migration in MiB/s (C(--bandwidth)). When omitted, the policy's
        C(bandwidth_mib).
    type: int
  max_downtime:
    description:
      - The most downtime QEMU may use for each member, in milliseconds (C(--max-downtime)); caps the
        steps of the policy's convergence schedule.
      - When omitted, the policy's C(max_downtime_ms) (else QEMU's own limit).
    type: int
  timeout:
    description:
      - Abort a member's migration job when it runs longer than this many seconds (C(--timeout)). When
        omitted, the policy's C(completion_timeout_s).
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
      - Send each member's data over several connections (multifd, C(--parallel)); QEMU's default of 2
        unless O(parallel_connections) says how many.
    type: bool
    default: false
  parallel_connections:
    description:
      - How many connections for each member's data, 1 to 255 (C(--parallel-connections); implies
        O(parallel)).
    type: int
  tls:
    description:
      - Encrypt the migration data with TLS (C(--tls)); the hosts need libvirt's migration TLS set up.
    type: bool
    default: false
  hold_timeout:
    description:
      - Abort every member when they have not all been ready to switch over at once within this many
        seconds of their jobs starting (C(--hold-timeout)); more than 0, at most 86400.
      - When omitted, 300.
    type: float
  release_timeout:
    description:
      - After the release, abort a member that has not switched over within this many seconds
        (C(--release-timeout)); more than 0, at most 86400.
      - When omitted, 30.
    type: float
  lock_wait:
    description:
      - When another migration of a member runs, wait up to this many seconds (0 to 86400) for it to end
        instead of failing at once (C(--lock-wait)).
      - When omitted, 0 (fail at once).
      - The module's dry run does not wait; it reports such a member as refused, and the group then runs
        with it.
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
      - Runs the CLI with C(--dry-run) only, every member's pre-flight and plan; nothing migrates, no hook
        runs and nothing is written to the journal. C(changed) is V(true) when members would move, V(false)
        when every one already runs on its destination; the task fails when the run would (a refusal, or
        only one member left to move).
  diff_mode:
    support: partial
    description: Shows where each moved (or, in check mode, planned) member runs before and after.
  platform:
    support: full
    description: The CLI runs on the host the task targets and reaches the hypervisors by their URIs.
    platforms: posix
notes:
  - Outside check mode the CLI runs twice, its dry run first (see the description); a member that reaches
    its destination between the two (moved by another migration meanwhile) is left out by the CLI itself.
  - The task waits for the whole group, up to O(hold_timeout) held and the jobs' own time; give it a long
    enough time with C(async) for large VMs.
seealso:
  - module: vfio.orchestrator.vfio_migrate
  - module: vfio.orchestrator.vfio_evacuate
"""

EXAMPLES = r"""
- name: Move the three workers of job train-42 to hv2, drained once for the whole job
  vfio.orchestrator.vfio_migrate_group:
    name: train-42
    members: [worker1, worker2, worker3]
    source_uri: qemu+ssh://hv1.example.com/system
    dest_uri: qemu+ssh://hv2.example.com/system
    policy: rdma-drain
  register: group

- name: Show the job's stall and each member's downtime
  ansible.builtin.debug:
    msg: >-
      {{ group.report.group_id }}: {{ group.report.outcome }}, stall {{ group.report.stall_ms }} ms,
      {{ group.report.members | map(attribute='domain') | zip(group.report.members
         | map(attribute='timings.downtime_ms')) | list }}

- name: Split the group over two destinations, waiting for a running migration and holding 10 minutes
  vfio.orchestrator.vfio_migrate_group:
    name: db-cluster
    members:
      - domain: db1
        dest_uri: qemu+ssh://hv2.example.com/system
      - domain: db2
        dest_uri: qemu+ssh://hv3.example.com/system
      - db3=qemu+ssh://hv3.example.com/system
    source_uri: qemu+ssh://hv1.example.com/system
    policy: rdma-drain
    max_downtime: 500
    hold_timeout: 600
    release_timeout: 20
    lock_wait: 120
    journal: /var/lib/orchestrator/journal.sqlite
"""

RETURN = r"""
report:
  description:
    - The CLI's report of the group (what C(orchestrator migrate-group --json) prints).
    - In check mode, and when the module stopped after its dry run (every member already on its
      destination, or only one left to move), the dry run's report (RV(report.dry_run) V(true)).
  returned: when the CLI printed its report
  type: dict
  contains:
    group_id:
      description:
        - The group's id in the journal (C(orchestrator history ID) shows it and its members).
        - In a dry run's report, the dry run's id; nothing is written to the journal.
      type: str
    group:
      description: The group's name (O(name)).
      type: str
    policy:
      description: The policy's name.
      type: str
    outcome:
      description:
        - How the group ended; V(succeeded) (every member moved), V(partial) (some did), V(rolled-back),
          V(aborted), V(interrupted), V(failed) (an admin must look), V(refused) (a pre-flight said no),
          or V(planned) in a dry run.
      type: str
    changed:
      description: Whether any member moved.
      type: bool
    exit_code:
      description: The CLI's exit code for the group.
      type: int
    error:
      description: Why the group failed, V(null) on success.
      type: str
    dry_run:
      description: Whether this is a dry run's report.
      type: bool
    undrain_failed:
      description:
        - Whether a hook of the group's undrain (C(group-undrain)) failed; the job's workloads may still be
          drained (exit 9, an admin must look).
      type: bool
    started:
      description: When the group started (epoch seconds).
      type: float
    ended:
      description: When it ended (epoch seconds).
      type: float
    drain_started:
      description: When the group's drain was decided (epoch seconds), V(null) if it never was.
      type: float
    released:
      description: When every member was drained and released (epoch seconds), V(null) if never.
      type: float
    undrained:
      description: When the group's undrain was decided (epoch seconds), V(null) if never.
      type: float
    stall_ms:
      description:
        - What the distributed job saw, in milliseconds - from the first member's device going quiet (or
          the group's drain, if earlier) to the last device whose workloads run again; V(null) when
          nothing was drained or went quiet.
      type: float
    steps:
      description: The group's steps, in order (V(start), V(drain), V(release), V(abort), V(undrain)).
      type: list
      elements: dict
    notes:
      description: Remarks of the group's run.
      type: list
      elements: str
    hooks:
      description:
        - The group's own hook runs (the policy's C(group-drain) and C(group-undrain) hooks, run once for
          the whole group), with the keys of the members' C(hooks) (C(trigger), C(label), C(ok), C(error),
          C(output_tail), ...).
      type: list
      elements: dict
    members:
      description:
        - One migration report per member run, with the keys M(vfio.orchestrator.vfio_migrate) returns
          (C(domain), C(source), C(destination), C(outcome), C(changed), C(error), C(timings), C(devices),
          C(hooks), C(timeline), C(plan), ...), and the group's keys below.
        - The members left out as already on their destination (RV(unchanged)) are not in it, except in
          the dry run's report, where their C(outcome) is V(unchanged).
      type: list
      elements: dict
      contains:
        limit_ms:
          description: The member's downtime limit when it was released, V(null) if it never was.
          type: int
        margin_ms:
          description: Its limit minus its downtime.
          type: int
        release_lag_ms:
          description: From the release to its first device going quiet, in milliseconds.
          type: float
  sample:
    group_id: 5c0e7a91d2f3
    group: train-42
    policy: rdma-drain
    outcome: succeeded
    changed: true
    exit_code: 0
    error: null
    dry_run: false
    stall_ms: 412.5
    steps: [{at: 1767225600.1, step: start, detail: "2 members ready to start: worker1, worker2"}]
    members: [{domain: worker1, outcome: succeeded, changed: true, limit_ms: 300, margin_ms: 112,
               release_lag_ms: 41.2, timings: {total_s: 9.8, job_s: 9.1, downtime_ms: 188}}]
outcome:
  description:
    - The group's outcome (RV(report.outcome)); V(unchanged) when every member already runs on its
      destination, V(refused) when only one member is left to move, V(planned) in check mode.
  returned: when the CLI printed its report
  type: str
  sample: succeeded
unchanged:
  description:
    - The members that already run on their destination, by domain, left out of the group's run.
  returned: when the CLI printed its report
  type: list
  elements: str
  sample: [worker3]
rc:
  description:
    - The exit code of the CLI's last run (see the orchestrator's README, "Exit codes"); that of its dry
      run when the module stopped after it.
  returned: always
  type: int
  sample: 0
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - Ansible wants the docs first
from ansible_collections.vfio.orchestrator.plugins.module_utils.orchestrator_cli import (  # noqa: E402
    COMMON_ARGUMENT_SPEC,
    EXIT_BAD_INPUT,
    EXIT_OK,
    MIGRATION_ARGUMENT_SPEC,
    MIGRATION_CLI_OPTIONS,
    CliOption,
    cli_args,
    fail_message,
    failed_hooks,
    run,
)

MEMBER_KEYS = ("domain", "dest_uri")

ARGUMENT_SPEC = {
    "name": {"type": "str", "required": True},
    "members": {"type": "list", "elements": "raw", "required": True},
    "dest_uri": {"type": "str"},
    "source_uri": {"type": "str"},
    # A group always drains gated: `orchestrator migrate-group` has no --drain.
    **{option: spec for option, spec in MIGRATION_ARGUMENT_SPEC.items() if option != "drain"},
    "hold_timeout": {"type": "float"},
    "release_timeout": {"type": "float"},
    "lock_wait": {"type": "float"},
    "journal": {"type": "path"},
    **COMMON_ARGUMENT_SPEC,
}

# The module's options that are options of `orchestrator migrate-group` (NAME and the members are its
# arguments; check mode is --dry-run; --json is always passed). The collection's README has them as a
# table, and tests/unit/test_ansible_modules.py checks both against the CLI's own options.
CLI_OPTIONS = (
    CliOption("dest_uri", "--to"),
    CliOption("source_uri", "-c"),
    *(entry for entry in MIGRATION_CLI_OPTIONS if entry.option != "drain"),
    CliOption("hold_timeout", "--hold-timeout"),
    CliOption("release_timeout", "--release-timeout"),
    CliOption("lock_wait", "--lock-wait"),
    CliOption("journal", "--journal"),
)


def parse_members(members):
    """The `members` option as (domain, destination URI or None, CLI argument) triples, in order.

    A string is passed as given (`DOMAIN` or `DOMAIN=DESTURI`, split at its first "=", as the CLI does);
    a dictionary becomes one. Raises ValueError for a member the module cannot turn into an argument;
    what the CLI judges (an empty name, a member twice, fewer than two) is left to it.
    """
    parsed = []
    for index, member in enumerate(members or [], 1):
        if isinstance(member, str):
            domain, sep, dest = member.partition("=")
            parsed.append((domain, dest if sep else None, member))
            continue
        if not isinstance(member, dict):
            raise ValueError(
                f"member {index} is neither a string nor a dictionary ({type(member).__name__}): "
                "give DOMAIN, DOMAIN=DESTURI or {domain: DOMAIN, dest_uri: DESTURI}"
            )
        unknown = sorted(str(key) for key in member if key not in MEMBER_KEYS)
        if unknown:
            raise ValueError(
                f"member {index} has unknown key(s) {', '.join(unknown)}; a member takes domain and dest_uri"
            )
        domain, dest = member.get("domain"), member.get("dest_uri")
        if not isinstance(domain, str) or not domain:
            raise ValueError(f"member {index} has no domain: give its domain (name or UUID)")
        if "=" in domain:
            raise ValueError(
                f"member {index}: domain {domain!r} contains '=', which the CLI's DOMAIN=DESTURI cannot carry"
            )
        if dest is not None and not isinstance(dest, str):
            raise ValueError(f"member {index} ({domain}): dest_uri must be a string")
        dest = dest or None  # empty: the member goes to dest_uri, as an empty optional option passes nothing
        parsed.append((domain, dest, f"{domain}={dest}" if dest else domain))
    return parsed


def build_args(params, check_mode, members=None):
    """The CLI's arguments for the module's options; `members` (triples of parse_members), when given,
    instead of the `members` option."""
    if members is None:
        members = parse_members(params["members"])
    args = [
        "migrate-group",
        params["name"],
        *(argument for _domain, _dest, argument in members),
        *cli_args(params, CLI_OPTIONS, ARGUMENT_SPEC),
    ]
    if check_mode:
        args.append("--dry-run")
    return args


def member_reports(document):
    """The members' reports of a group report, by domain."""
    members = (document or {}).get("members") or []
    return {m.get("domain"): m for m in members if isinstance(m, dict)}


def already_there(document, members):
    """The members (triples) a dry run's report says already run on their destination."""
    reports = member_reports(document)
    return [m for m in members if (reports.get(m[0]) or {}).get("outcome") == "unchanged"]


def domains(members):
    return ", ".join(domain for domain, _dest, _argument in members)


def too_few_message(name, left, unchanged):
    """Why the group is not run when one member is left to move."""
    return (
        f"group {name}: a switchover group needs at least two members to move, and only {domains(left)} "
        f"is left to move; already on their destination: {domains(unchanged)}. Move {domains(left)} alone "
        "with vfio.orchestrator.vfio_migrate (its workloads then drained on their own), or add members"
    )


def failure_message(rc, document, error, unchanged=()):
    """The failed task's msg: the group's error, one line per failed hook of each member, and the members
    left out (no repeated line)."""
    group = (document or {}).get("group") or "the group"
    lines = [fail_message(rc, document, error)]
    lines += [f"group {group}: {line}" for line in failed_hooks(document)]  # its own hooks
    for domain, report in member_reports(document).items():
        lines += [f"{domain}: {line}" for line in failed_hooks(report)]
    if unchanged:
        lines.append(f"already on their destination (left out of the group): {domains(unchanged)}")
    return "\n".join(dict.fromkeys(line for line in lines if line))


def placement_diff(document, check_mode):
    """Before/after of where the moved (or planned) members run."""
    wanted = "planned" if check_mode else "succeeded"
    moves = sorted(
        (domain, report.get("source"), report.get("destination"))
        for domain, report in member_reports(document).items()
        if report.get("outcome") == wanted
    )
    return {
        "before_header": "where the members run",
        "after_header": "where the members run",
        "before": "".join(f"{domain}: {source}\n" for domain, source, _dest in moves),
        "after": "".join(f"{domain}: {dest}\n" for domain, _source, dest in moves),
    }


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
    )
    params, check_mode = module.params, module.check_mode
    name = params["name"]
    try:
        members = parse_members(params["members"])
    except ValueError as exc:
        module.fail_json(msg=str(exc), changed=False)

    # The dry run: in check mode the whole task, else where the members run now.
    rc, document, error, argv = run(module, build_args(params, True, members))
    if document is None:
        module.fail_json(msg=fail_message(rc, document, error), changed=False, rc=rc, cmd=argv)
    unchanged = already_there(document, members)
    left = [m for m in members if m not in unchanged]
    result = {
        "changed": False,
        "rc": rc,
        "report": document,
        "outcome": document.get("outcome"),
        "unchanged": [domain for domain, _dest, _argument in unchanged],
    }

    if rc not in (EXIT_OK, EXIT_BAD_INPUT):
        module.fail_json(msg=failure_message(rc, document, error, unchanged), cmd=argv, **result)
    if not left:
        result["outcome"] = "unchanged"
        result["msg"] = f"group {name}: every member already runs on its destination ({domains(unchanged)})"
        module.exit_json(**result)
    if check_mode and rc != EXIT_OK:
        module.fail_json(msg=failure_message(rc, document, error, unchanged), cmd=argv, **result)
    if len(left) < 2:
        lines = [too_few_message(name, left, unchanged)]
        if rc != EXIT_OK:
            lines.append(f"the dry run also said: {fail_message(rc, document, error)}")
        result["outcome"] = "refused"
        module.fail_json(msg="\n".join(lines), cmd=argv, **result)

    if not check_mode:
        # The group without the members already there. A dry run's refusal is the run's to judge again:
        # a member with another migration running is refused by the dry run, waited for (--lock-wait)
        # by the run.
        rc, document, error, argv = run(module, build_args(params, False, left))
        result.update(
            rc=rc,
            report=document,
            outcome=(document or {}).get("outcome"),
            changed=bool((document or {}).get("changed")),
        )
        if rc != EXIT_OK or document is None:
            module.fail_json(msg=failure_message(rc, document, error, unchanged), cmd=argv, **result)
    else:
        result["changed"] = True

    if module._diff and result["changed"]:
        result["diff"] = placement_diff(document, check_mode)
    verb = "would migrate" if check_mode else "migrated"
    moved = [
        domain
        for domain, report in member_reports(document).items()
        if report.get("outcome") == ("planned" if check_mode else "succeeded")
    ]
    msg = f"{verb} group {name}: {', '.join(moved) or domains(left)} ({document.get('outcome')})"
    if unchanged:
        msg += f"; already on their destination: {domains(unchanged)}"
    result["msg"] = msg
    module.exit_json(**result)


if __name__ == "__main__":
    main()
