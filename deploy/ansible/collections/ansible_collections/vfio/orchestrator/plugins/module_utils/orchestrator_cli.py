# Copyright: the vfio-migration-orchestrator maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Shared by the vfio.orchestrator modules: run the `orchestrator` CLI and read what it printed.

The modules never reimplement the orchestrator's logic: they build an argv list, run the CLI with
``--json`` through ``module.run_command`` (no shell) and turn its JSON document, exit code and one-line
error into Ansible's ``changed`` / ``failed`` / ``msg``.
"""

# Ansible's module boilerplate; the modules only run on Python 3, where these are no-ops.
from __future__ import absolute_import, division, print_function  # noqa: UP010 - Ansible boilerplate

__metaclass__ = type  # noqa: UP001 - Ansible boilerplate

import json
import os
from collections import namedtuple

# The CLI's documented exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_CONNECT = 3
EXIT_NOTHING_TO_DO = 6
EXIT_NOT_EMPTY = 8
EXIT_INTERRUPTED = 130

PROGRAM_PREFIX = "orchestrator: "
ERROR_PREFIX = "orchestrator: error: "
NOTHING_TO_DO_PREFIX = "orchestrator: nothing to do: "

# Options every module takes.
COMMON_ARGUMENT_SPEC = {
    "orchestrator": {"type": "str", "default": "orchestrator"},
}

# A module option that becomes a CLI option (see cli_args): `flag` for a value, or for a bool that is
# true; `off` for a bool that is false (None: the CLI has no such flag, false passes nothing); a list
# passes `flag` once per element, or once with its elements comma-separated when `joined`.
CliOption = namedtuple("CliOption", ("option", "flag", "off", "joined"), defaults=(None, False))

# The migration settings `orchestrator migrate` and `orchestrator evacuate` share, in the order of
# their --help. Omitted (parallel and tls: false), each passes nothing: the CLI's default applies,
# which for most of them is the policy's.
MIGRATION_ARGUMENT_SPEC = {
    "policy": {"type": "str"},
    "drain": {"type": "str", "choices": ["prepare", "gated", "start"]},
    "bandwidth": {"type": "int"},
    "max_downtime": {"type": "int"},
    "timeout": {"type": "float"},
    "auto_converge": {"type": "bool"},
    "compressed": {"type": "bool"},
    "comp_methods": {"type": "list", "elements": "str", "choices": ["mt", "xbzrle", "zlib", "zstd"]},
    "parallel": {"type": "bool", "default": False},
    "parallel_connections": {"type": "int"},
    "tls": {"type": "bool", "default": False},
}
MIGRATION_CLI_OPTIONS = (
    CliOption("policy", "--policy"),
    CliOption("drain", "--drain"),
    CliOption("bandwidth", "--bandwidth"),
    CliOption("max_downtime", "--max-downtime"),
    CliOption("timeout", "--timeout"),
    CliOption("auto_converge", "--auto-converge"),
    CliOption("compressed", "--compressed"),
    CliOption("comp_methods", "--comp-methods", joined=True),
    CliOption("parallel", "--parallel"),
    CliOption("parallel_connections", "--parallel-connections"),
    CliOption("tls", "--tls"),
)


def error_line(stderr):
    """The CLI's one error line (without its prefix); else its "nothing to do" line (exit 6, as
    "nothing to do: ..."); else the last line it wrote on stderr that is not a note or a warning."""
    lines = [_strip_priority(line.strip()) for line in (stderr or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX) :]
    for line in reversed(lines):
        if line.startswith(NOTHING_TO_DO_PREFIX):
            return line[len(PROGRAM_PREFIX) :]
    plain = [line for line in lines if not line.startswith(("note:", "orchestrator: warning:"))]
    return (plain or lines or [""])[-1]


def _strip_priority(line):
    """A line without the syslog priority prefix (`<3>`) the CLI adds under journald."""
    if line.startswith("<") and ">" in line[:4] and line[1 : line.index(">")].isdigit():
        return line[line.index(">") + 1 :]
    return line


def executable(module):
    """The orchestrator program to run: a path as given, or a name looked up on PATH."""
    name = module.params["orchestrator"]
    if os.sep in name:
        if not os.access(name, os.X_OK):
            module.fail_json(msg=f"orchestrator executable {name} does not exist or is not executable")
        return name
    found = module.get_bin_path(name, required=False)
    if not found:
        module.fail_json(
            msg=f"{name} not found on PATH; install the orchestrator or set the module option orchestrator"
        )
    return found


def run(module, args):
    """Run `orchestrator ARGS --json`; returns (rc, document or None, error line, argv).

    The document is None when the CLI printed no JSON (errors found before it started, e.g. bad
    input or an unreachable host, are only one line on stderr).
    """
    argv = [executable(module), *args, "--json"]
    rc, out, err = module.run_command(argv, check_rc=False)
    document = None
    text = (out or "").strip()
    if text:
        try:
            document = json.loads(text)
        except ValueError:
            document = None
    if not isinstance(document, dict):
        document = None
    if document is None and rc == EXIT_OK:
        module.fail_json(
            msg="the orchestrator succeeded but printed no JSON document; is it a compatible version?",
            rc=rc,
            cmd=argv,
            stdout=out,
            stderr=err,
        )
    return rc, document, error_line(err), argv


def cli_args(params, options, argument_spec):
    """The CLI's options for the module's `options` (CliOption), in their order.

    An option that is None passes nothing (the CLI's default applies), and so does an optional string
    left empty (`policy: ""`); a required one is passed as given, for the CLI to judge (an empty
    source URI must never fall back to the default host).
    """
    args = []
    for option, flag, off, joined in options:
        value = params.get(option)
        if value is None or (value == "" and not argument_spec[option].get("required")):
            continue
        if isinstance(value, bool):
            chosen = flag if value else off
            if chosen:
                args.append(chosen)
        elif isinstance(value, list):
            if joined:
                if value:
                    args += [flag, ",".join(str(item) for item in value)]
            else:
                for item in value:
                    args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


def fail_message(rc, document, error):
    """What `msg` says for a failed run: the document's error, else the CLI's error line."""
    if document and document.get("error"):
        return str(document["error"])
    if error:
        return error
    return f"the orchestrator exited with {rc}"


def one_line(text, limit=300):
    """Text on one line (newlines become " / "), at most `limit` characters, its end kept."""
    joined = " / ".join(line.strip() for line in str(text or "").splitlines() if line.strip())
    return joined if len(joined) <= limit else "..." + joined[-(limit - 3) :]


def failed_hooks(document):
    """One line per hook whose last run failed: trigger and label, device, error, end of its output.

    Runs of one hook (same trigger, label and device) are retries: only the last one counts.
    """
    last = {}
    for hook in (document or {}).get("hooks") or []:
        last[(hook.get("trigger"), hook.get("label"), hook.get("device_id"))] = hook
    lines = []
    for (trigger, label, device), hook in last.items():
        if hook.get("ok"):
            continue
        line = f"{trigger} hook {label}" + (f" on {device}" if device else "")
        line += f": {hook.get('error') or 'failed'}"
        tail = one_line(hook.get("output_tail"))
        lines.append(f"{line}; output: {tail}" if tail else line)
    return lines
