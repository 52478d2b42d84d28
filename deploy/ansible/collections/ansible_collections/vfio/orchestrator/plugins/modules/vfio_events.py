#!/usr/bin/python
# Copyright: the vfio-migration-orchestrator maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module vfio.orchestrator.vfio_events: wraps `orchestrator events enable|disable`."""

# Ansible's module boilerplate; the module only runs on Python 3, where these are no-ops.
from __future__ import absolute_import, division, print_function  # noqa: UP010 - Ansible boilerplate

__metaclass__ = type  # noqa: UP001 - Ansible boilerplate

DOCUMENTATION = r"""
---
module: vfio_events
short_description: Turn QEMU's VFIO migration events on or off in a libvirt domain's definition
version_added: "0.1.0"
description:
  - Runs C(orchestrator events enable|disable DOMAIN --json) and reports what it did.
  - QEMU emits C(VFIO_MIGRATION) events only for devices whose C(migration-events) property was on when
    QEMU started. C(enabled) adds a C(<qemu:override>) per VFIO hostdev (C(mode=override)) or
    C(-global vfio-pci.migration-events=on) (C(mode=global)); C(disabled) removes exactly what enabling
    added. Nothing else in the definition changes.
  - The change is idempotent (C(changed=false) when the events already are as requested) and never
    restarts the VM; on a running VM it applies at its next cold boot (shut down and start).
  - A domain without any VFIO device is not an error; the task reports C(changed=false) and says why in
    C(msg) and RV(skipped_reason).
author:
  - VFIO orchestrator maintainers (@vfio-orchestrator)
requirements:
  - The C(orchestrator) CLI (the vfio-migration-orchestrator package) on the host the task runs on.
options:
  domain:
    description:
      - Name or UUID of the libvirt domain.
    type: str
    required: true
  uri:
    description:
      - libvirt connection URI of the host that holds the domain (C(orchestrator -c)).
      - When omitted, the CLI uses C($LIBVIRT_DEFAULT_URI), else C(qemu:///system).
    type: str
  state:
    description:
      - V(enabled) turns the events on for every VFIO device of the domain, V(disabled) removes what
        enabling added.
    type: str
    choices: [enabled, disabled]
    default: enabled
  mode:
    description:
      - How to turn the events on (only with O(state=enabled); ignored with O(state=disabled)).
      - V(override) adds a C(<qemu:override>) per hostdev (needs libvirt >= 8.2).
      - V(global) adds C(-global vfio-pci.migration-events=on) to C(<qemu:commandline>), which also reaches
        devices given on the QEMU command line.
      - When omitted, the CLI picks V(override) where libvirt supports it, V(global) otherwise or when
        the domain has command-line devices.
    type: str
    choices: [override, global]
  orchestrator:
    description:
      - Path of the C(orchestrator) executable, or a name looked up on C(PATH).
    type: str
    default: orchestrator
attributes:
  check_mode:
    support: full
    description: Runs the CLI with C(--dry-run); C(changed) says whether the definition would change.
  diff_mode:
    support: full
    description: Returns the unified diff of the domain's XML definition.
  platform:
    support: full
    description: The CLI runs on the host the task targets and reaches the hypervisors by their URIs.
    platforms: posix
notes:
  - The definition is edited through libvirt; the module does not restart the domain.
seealso:
  - module: vfio.orchestrator.vfio_migrate
"""

EXAMPLES = r"""
- name: Turn the VFIO migration events on for vm1
  vfio.orchestrator.vfio_events:
    domain: vm1
    uri: qemu+ssh://hv1.example.com/system

- name: Turn them on with -global (reaches command-line devices too)
  vfio.orchestrator.vfio_events:
    domain: vm1
    mode: global

- name: Turn them off again
  vfio.orchestrator.vfio_events:
    domain: vm1
    state: disabled
    orchestrator: /opt/orchestrator/.venv/bin/orchestrator
"""

RETURN = r"""
domain:
  description: The domain's name.
  returned: when the domain has a VFIO device
  type: str
  sample: vm1
action:
  description: What the CLI did, V(enable) or V(disable).
  returned: when the domain has a VFIO device
  type: str
  sample: enable
mode:
  description: The mode used to enable the events; V(null) for O(state=disabled).
  returned: when the domain has a VFIO device
  type: str
  sample: override
domain_state:
  description: The domain's libvirt state (C(running), C(shut off), ...).
  returned: when the domain has a VFIO device
  type: str
  sample: running
dry_run:
  description: Whether the CLI ran with C(--dry-run) (check mode).
  returned: when the domain has a VFIO device
  type: bool
  sample: false
message:
  description: The CLI's own sentence about the change (also in C(msg)).
  returned: when the domain has a VFIO device
  type: str
  sample: "migration events enabled in the definition of vm1; they apply when it starts"
diff:
  description: The unified diff of the definition, as C(prepared).
  returned: in diff mode, when the definition changes (or would change)
  type: dict
  sample: {prepared: "--- vm1.xml\n+++ vm1.xml\n@@ ..."}
skipped_reason:
  description: Why nothing was done (the domain has no VFIO device; the CLI exited 6).
  returned: when the domain has no VFIO device
  type: str
  sample: "vm2 has no VFIO device; nothing to do"
rc:
  description: The CLI's exit code.
  returned: always
  type: int
  sample: 0
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - Ansible wants the docs first
from ansible_collections.vfio.orchestrator.plugins.module_utils.orchestrator_cli import (  # noqa: E402
    COMMON_ARGUMENT_SPEC,
    EXIT_NOTHING_TO_DO,
    EXIT_OK,
    fail_message,
    run,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "domain": {"type": "str", "required": True},
            "uri": {"type": "str"},
            "state": {"type": "str", "default": "enabled", "choices": ["enabled", "disabled"]},
            "mode": {"type": "str", "choices": ["override", "global"]},
            **COMMON_ARGUMENT_SPEC,
        },
        supports_check_mode=True,
    )
    params = module.params
    enable = params["state"] == "enabled"
    args = ["events", "enable" if enable else "disable", params["domain"]]
    if params["uri"]:
        args += ["-c", params["uri"]]
    if enable and params["mode"]:
        args += ["--mode", params["mode"]]
    if module.check_mode:
        args.append("--dry-run")
    rc, document, error, argv = run(module, args)

    if rc == EXIT_NOTHING_TO_DO:
        reason = error or f"{params['domain']} has no VFIO device; nothing to do"
        # failed=False explicitly: Ansible otherwise takes a non-zero rc for a failure.
        module.exit_json(changed=False, failed=False, msg=reason, skipped_reason=reason, rc=rc, cmd=argv)
    if rc != EXIT_OK or document is None:
        module.fail_json(msg=fail_message(rc, document, error), rc=rc, cmd=argv)

    result = {
        "changed": bool(document.get("changed")),
        "msg": document.get("message", ""),
        "message": document.get("message", ""),
        "domain": document.get("domain"),
        "action": document.get("action"),
        "mode": document.get("mode"),
        "domain_state": document.get("state"),
        "dry_run": bool(document.get("dry_run")),
        "rc": rc,
    }
    if module._diff and result["changed"] and document.get("diff"):
        result["diff"] = {"prepared": document["diff"]}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
