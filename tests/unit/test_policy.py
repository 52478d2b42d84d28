"""Policy loading and validation: table-driven, on text, temporary files and the shipped policies."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import tomllib
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.core.errors import BadInput, ExitCode
from orchestrator.core.hooks import Hook, OnFailure, Trigger
from orchestrator.core.policy import (
    MAX_BANDWIDTH_MIB,
    MAX_MESSAGE_CHARS,
    DeviceSelector,
    DowntimeStep,
    DrainMode,
    EvacuateSettings,
    EvacuationGroup,
    GroupBy,
    MigrationMode,
    MigrationSettings,
    Policy,
    PolicyError,
    Switchover,
    TimeoutAction,
    WhenEventsOff,
    one_line,
)
from orchestrator.core.policy_toml import parse_policy
from orchestrator.edges.policy_files import (
    DEFAULT_POLICY_DIRS,
    POLICY_DIR_ENV,
    SHIPPED_POLICY_DIR,
    available_policies,
    load_policy,
    resolve_policy,
)

SOURCE = "policies/x.toml"


def assert_one_line(message: str) -> None:
    """A message a terminal shows on one line: no line breaks or other control characters, bounded."""
    assert message.splitlines() == [message]
    assert not [char for char in message if unicodedata.category(char) in ("Cc", "Zl", "Zp")], message
    assert 0 < len(message) <= MAX_MESSAGE_CHARS


SHIPPED = ("default", "rdma-drain")

MAXIMAL = """
description = "everything set"

[devices]
match = ["hostdev*", "ua-rdma?"]
pci = ["0000:3B:00.1", "0000:af:00.0"]

[migration]
mode = "direct"
persist = false
undefine_source = false
bandwidth_mib = 1024
data_uri = "tcp://10.0.0.2:49152"
max_downtime_ms = 300
completion_timeout_s = 90.5
timeout_action = "abort"
compressed = true
auto_converge = true

[switchover]
drain = "gated"
stall_timeout_s = 45

[[switchover.steps]]
downtime_ms = 20

[[switchover.steps]]
downtime_ms = 100
after_s = 10
after_iterations = 5

[[switchover.steps]]
downtime_ms = 300
after_s = 30.5

[events]
when_off = "proceed"

[[hooks.before]]
argv = ["/usr/bin/check", "{domain}", "{source}", "{destination}", "{migration_id}"]
timeout_ms = 600000
on_failure = "continue"
retries = 10
backoff_ms = 0
name = "check"

[[hooks.drain]]
argv = ["drain", "--json={{\\"dev\\": \\"{device_id}\\"}}", "{qom_path}", "{state}"]
timeout_ms = 1

[[hooks.drain]]
argv = ["/opt/second-drain"]

[[hooks.drain]]
argv = ["/opt/armed-drain", "--vm", "{domain}"]
armed = true

[[hooks.undrain]]
argv = ["undrain", "{device_id}"]
on_failure = "continue"
retries = 0

[[hooks.after-success]]
argv = ["report", "ok"]
retries = 3

[[hooks.after-failure]]
argv = ["report", "failed"]

[evacuate]
group_by = "metadata"

[[evacuate.groups]]
name = "job1"
include = ["job1-*", "db?"]

[[evacuate.groups]]
name = "rdma job 2"
include = ["j2-*"]
"""


def test_empty_policy_takes_every_default() -> None:
    policy = parse_policy("", SOURCE)
    assert policy.name == "x"
    assert policy.path is None
    assert policy.description == ""
    assert policy.devices == DeviceSelector(match=("*",), pci=())
    assert policy.migration == MigrationSettings()
    assert policy.migration.mode is MigrationMode.P2P
    assert policy.migration.data_uri is None
    assert policy.migration.max_downtime_ms is None
    assert policy.migration.completion_timeout_s is None
    assert policy.when_events_off is WhenEventsOff.REFUSE
    assert list(policy.hooks) == list(Trigger)
    assert policy.all_hooks() == ()
    assert policy.switchover == Switchover()
    assert policy.switchover == Switchover(drain=DrainMode.PREPARE, steps=(), stall_timeout_s=None)
    assert policy.evacuate == EvacuateSettings(group_by=GroupBy.NONE, groups=())


def test_maximal_policy() -> None:
    policy = parse_policy(MAXIMAL, SOURCE)
    assert policy.description == "everything set"
    assert policy.devices == DeviceSelector(
        match=("hostdev*", "ua-rdma?"), pci=("0000:3b:00.1", "0000:af:00.0")
    )
    assert policy.migration == MigrationSettings(
        mode=MigrationMode.DIRECT,
        persist=False,
        undefine_source=False,
        bandwidth_mib=1024,
        data_uri="tcp://10.0.0.2:49152",
        max_downtime_ms=300,
        completion_timeout_s=90.5,
        timeout_action=TimeoutAction.ABORT,
        compressed=True,
        auto_converge=True,
    )
    assert policy.when_events_off is WhenEventsOff.PROCEED
    assert policy.hooks_for(Trigger.BEFORE) == (
        Hook(
            trigger=Trigger.BEFORE,
            argv=("/usr/bin/check", "{domain}", "{source}", "{destination}", "{migration_id}"),
            timeout_ms=600000,
            on_failure=OnFailure.CONTINUE,
            retries=10,
            backoff_ms=0,
            name="check",
        ),
    )
    assert policy.switchover == Switchover(
        drain=DrainMode.GATED,
        steps=(
            DowntimeStep(downtime_ms=20),
            DowntimeStep(downtime_ms=100, after_s=10.0, after_iterations=5),
            DowntimeStep(downtime_ms=300, after_s=30.5),
        ),
        stall_timeout_s=45.0,
    )
    drains = policy.hooks_for(Trigger.DRAIN)
    assert [hook.label for hook in drains] == ["drain", "second-drain", "armed-drain"]
    assert drains[0].argv[1] == '--json={{"dev": "{device_id}"}}'
    assert drains[0].timeout_ms == 1
    assert drains[1] == Hook(trigger=Trigger.DRAIN, argv=("/opt/second-drain",))
    assert not drains[0].armed
    assert drains[2] == Hook(trigger=Trigger.DRAIN, argv=("/opt/armed-drain", "--vm", "{domain}"), armed=True)
    assert policy.hooks_for(Trigger.UNDRAIN)[0].on_failure is OnFailure.CONTINUE
    assert policy.hooks_for(Trigger.AFTER_SUCCESS)[0].retries == 3
    assert [hook.trigger for hook in policy.all_hooks()] == [
        Trigger.BEFORE,
        Trigger.DRAIN,
        Trigger.DRAIN,
        Trigger.DRAIN,
        Trigger.UNDRAIN,
        Trigger.AFTER_SUCCESS,
        Trigger.AFTER_FAILURE,
    ]
    assert policy.evacuate == EvacuateSettings(
        group_by=GroupBy.METADATA,
        groups=(EvacuationGroup("job1", ("job1-*", "db?")), EvacuationGroup("rdma job 2", ("j2-*",))),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("completion_timeout_s = 30", 30.0),
        ("completion_timeout_s = 0.25", 0.25),
        ("completion_timeout_s = 0", None),
        ("max_downtime_ms = 0", None),
        ('data_uri = "unix:///run/orchestrator/mig.sock"', "unix:///run/orchestrator/mig.sock"),
        ('data_uri = "rdma://192.168.100.2:49152"', "rdma://192.168.100.2:49152"),
        ('data_uri = "tcp://[fd00::2]"', "tcp://[fd00::2]"),
        ('data_uri = ""', None),
    ],
)
def test_migration_values(text: str, expected: object) -> None:
    migration = parse_policy(f"[migration]\n{text}\n", SOURCE).migration
    key = text.split(" ", 1)[0]
    assert getattr(migration, key) == expected


INVALID = [
    # (policy text, key path in the message, expected-text in the message)
    (
        "[migrate]",
        "migrate: unknown key",
        "expected one of description, devices, migration, switchover, events, hooks, evacuate",
    ),
    ("devices = 3", "devices: got 3", "expected a table, written [devices]"),
    ("description = 5", "description: got 5", "expected a string"),
    ("[devices]\nmatch = []", "devices.match: got []", "expected a non-empty list of strings"),
    ('[devices]\nmatch = "*"', 'devices.match: got "*"', "expected a non-empty list of strings"),
    ('[devices]\nmatch = ["a", ""]', 'devices.match[1]: got ""', "expected a non-empty device-id glob"),
    (
        '[devices]\npci = ["3b:00.1"]',
        'devices.pci[0]: got "3b:00.1"',
        'expected a host PCI address such as "0000:3b:00.1"',
    ),
    ('[devices]\npci = ["0000:3b:00.8"]', "devices.pci[0]", "expected a host PCI address"),
    ('[devices]\nname = "x"', "devices.name: unknown key", "expected one of match, pci"),
    ('[migration]\nmode = "tunnelled"', 'migration.mode: got "tunnelled"', 'expected one of "p2p", "direct"'),
    ("[migration]\npersist = 1", "migration.persist: got 1", "expected true or false"),
    (
        "[migration]\nbandwidth_mib = true",
        "migration.bandwidth_mib: got true",
        "expected an integer of MiB/s >= 0",
    ),
    (
        "[migration]\nbandwidth_mib = -1",
        "migration.bandwidth_mib: got -1",
        "expected an integer of MiB/s >= 0",
    ),
    ('[migration]\ndata_uri = "http://x:1"', "migration.data_uri", 'expected "tcp://HOST[:PORT]"'),
    ('[migration]\ndata_uri = "tcp://"', "migration.data_uri", 'expected "tcp://HOST[:PORT]"'),
    ('[migration]\ndata_uri = "tcp://h:port"', "migration.data_uri", 'expected "tcp://HOST[:PORT]"'),
    ('[migration]\ndata_uri = "unix:run/x.sock"', "migration.data_uri", '"unix:///PATH"'),
    (
        "[migration]\nmax_downtime_ms = 1.5",
        "migration.max_downtime_ms: got 1.5",
        "expected an integer of milliseconds >= 0",
    ),
    (
        "[migration]\ncompletion_timeout_s = -1",
        "migration.completion_timeout_s: got -1",
        "expected a number of seconds >= 0",
    ),
    (
        '[migration]\ncompletion_timeout_s = "10s"',
        'migration.completion_timeout_s: got "10s"',
        "expected a number of seconds",
    ),
    (
        "[migration]\ncompletion_timeout_s = inf",
        "migration.completion_timeout_s",
        "expected a number of seconds",
    ),
    (
        '[migration]\ntimeout_action = "postcopy"',
        'migration.timeout_action: got "postcopy"',
        'expected "abort" (post-copy is refused',
    ),
    (
        "[migration]\npostcopy = true",
        "migration.postcopy: unknown key",
        "expected one of mode, persist, undefine_source",
    ),
    ('[events]\nwhen_off = "ignore"', 'events.when_off: got "ignore"', 'expected one of "refuse", "proceed"'),
    (
        '[hooks.drain]\nargv = ["x"]',
        "hooks.drain: got a table",
        "expected an array of tables, one [[hooks.drain]] per hook",
    ),
    (
        '[[hooks.during]]\nargv = ["x"]',
        "hooks.during: unknown key",
        "expected one of before, drain, undrain, after-success, after-failure",
    ),
    (
        "[[hooks.drain]]\ntimeout_ms = 100",
        "hooks.drain[0].argv: missing",
        "expected a non-empty list of strings",
    ),
    ("[[hooks.drain]]\nargv = []", "hooks.drain[0].argv: got []", "expected a non-empty list of strings"),
    (
        '[[hooks.drain]]\nargv = "drain {domain}"',
        "hooks.drain[0].argv",
        "expected a non-empty list of strings",
    ),
    (
        '[[hooks.drain]]\nargv = ["x", ""]',
        'hooks.drain[0].argv[1]: got ""',
        "expected a non-empty string (no shell",
    ),
    ('[[hooks.drain]]\nargv = ["x", 3]', "hooks.drain[0].argv[1]: got 3", "expected a non-empty string"),
    (
        '[[hooks.drain]]\nargv = ["bin/drain"]',
        'hooks.drain[0].argv[0]: got "bin/drain"',
        "expected a program: an absolute path or a name looked up in PATH",
    ),
    ('[[hooks.drain]]\nargv = ["{domain}"]', "hooks.drain[0].argv[0]", "without placeholders"),
    (
        '[[hooks.drain]]\nargv = ["x", "--vm={domian}"]',
        'hooks.drain[0].argv: unknown placeholder {domian} in "--vm={domian}"',
        "expected placeholders among {domain}, {device_id}",
    ),
    (
        '[[hooks.drain]]\nargv = ["x", "a{b"]',
        'hooks.drain[0].argv: unbalanced "{" in "a{b"',
        "{{ or }} for a literal brace",
    ),
    (
        '[[hooks.drain]]\nargv = ["x", "a}"]',
        'hooks.drain[0].argv: unbalanced "}"',
        "expected placeholders among",
    ),
    (
        '[[hooks.drain]]\nargv = ["x"]\ntimeout_ms = "fast"',
        'policies/x.toml: hooks.drain[0].timeout_ms: got "fast"; expected an integer of milliseconds > 0',
        "at most 600000",
    ),
    (
        '[[hooks.drain]]\nargv = ["x"]\ntimeout_ms = 0',
        "hooks.drain[0].timeout_ms: got 0",
        "expected an integer of milliseconds > 0",
    ),
    (
        '[[hooks.drain]]\nargv = ["x"]\ntimeout_ms = 600001',
        "hooks.drain[0].timeout_ms: got 600001",
        "at most 600000",
    ),
    (
        '[[hooks.undrain]]\nargv = ["x"]\non_failure = "ignore"',
        'hooks.undrain[0].on_failure: got "ignore"',
        'expected one of "abort", "continue"',
    ),
    (
        '[[hooks.drain]]\nargv = ["x"]\nretries = 2',
        "hooks.drain[0].retries: got 2",
        "expected 0: drain hooks are never retried",
    ),
    (
        '[[hooks.undrain]]\nargv = ["x"]\nretries = 1',
        "hooks.undrain[0].retries: got 1",
        "expected 0: undrain hooks are never retried",
    ),
    (
        '[[hooks.before]]\nargv = ["x"]\nretries = -1',
        "hooks.before[0].retries: got -1",
        "expected an integer of extra attempts from 0 to 10",
    ),
    (
        '[[hooks.after-failure]]\nargv = ["x"]\nretries = 11',
        "hooks.after-failure[0].retries: got 11",
        "from 0 to 10",
    ),
    (
        '[[hooks.before]]\nargv = ["x"]\nbackoff_ms = -5',
        "hooks.before[0].backoff_ms: got -5",
        "expected an integer of milliseconds >= 0",
    ),
    ('[[hooks.before]]\nargv = ["x"]\nname = 1', "hooks.before[0].name: got 1", "expected a string"),
    (
        '[[hooks.before]]\nargv = ["x"]\nshell = true',
        "hooks.before[0].shell: unknown key",
        "expected one of argv, timeout_ms, on_failure, retries, backoff_ms, name, armed",
    ),
    (
        '[[hooks.before]]\nargv = ["x"]\n[[hooks.before]]\nargv = ["y"]\ntimeout = 1',
        "hooks.before[1].timeout: unknown key",
        "expected one of argv",
    ),
]


STEP = "[[switchover.steps]]\n"

INVALID += [
    # [switchover]
    (
        '[switchover]\ndrain = "late"',
        'switchover.drain: got "late"',
        'expected one of "prepare", "gated", "start"',
    ),
    ("[switchover]\ndrain = 1", "switchover.drain: got 1", 'expected one of "prepare"'),
    (
        "[switchover]\ngate = true",
        "switchover.gate: unknown key",
        "expected one of drain, steps, stall_timeout_s",
    ),
    (
        "[switchover]\nstall_timeout_s = -1",
        "switchover.stall_timeout_s: got -1",
        "expected a number of seconds >= 0 (0 = never), at most 604800",
    ),
    ("[switchover]\nstall_timeout_s = nan", "switchover.stall_timeout_s: got NaN", "a number of seconds"),
    ("[switchover]\nstall_timeout_s = inf", "switchover.stall_timeout_s: got Infinity", "at most 604800"),
    ("[switchover]\nstall_timeout_s = 604801", "switchover.stall_timeout_s: got 604801", "at most 604800"),
    ('[switchover]\nstall_timeout_s = "1m"', 'switchover.stall_timeout_s: got "1m"', "a number of seconds"),
    (
        "[switchover]\nsteps = 50",
        "switchover.steps: got 50",
        "expected an array of tables, one [[switchover.steps]] per step",
    ),
    ("[switchover]\nsteps = [50, 100]", "switchover.steps: got [50, 100]", "an array of tables"),
    ("[switchover.steps]\ndowntime_ms = 50", "switchover.steps: got a table", "an array of tables"),
    (
        STEP + "after_s = 1",
        "switchover.steps[0].downtime_ms: missing",
        "expected an integer of milliseconds from 1 to 2000000: the downtime QEMU may use from this step on",
    ),
    (STEP + "downtime_ms = 0", "switchover.steps[0].downtime_ms: got 0", "from 1 to 2000000"),
    (STEP + "downtime_ms = 2000001", "switchover.steps[0].downtime_ms: got 2000001", "from 1 to 2000000"),
    (STEP + "downtime_ms = 50.5", "switchover.steps[0].downtime_ms: got 50.5", "an integer of milliseconds"),
    (STEP + 'downtime_ms = "50"', 'switchover.steps[0].downtime_ms: got "50"', "an integer of milliseconds"),
    (STEP + "downtime_ms = true", "switchover.steps[0].downtime_ms: got true", "an integer of milliseconds"),
    (
        STEP + "downtime_ms = 50\nafter = 3",
        "switchover.steps[0].after: unknown key",
        "expected one of downtime_ms, after_s, after_iterations",
    ),
    (
        STEP + "downtime_ms = 50\nafter_s = 0",
        "switchover.steps[0].after_s: got 0",
        "expected no after_s or after_iterations on the first step: it applies from the start "
        "(or when the gate opens)",
    ),
    (
        STEP + "downtime_ms = 50\nafter_iterations = 1",
        "switchover.steps[0].after_iterations: got 1",
        "no after_s or after_iterations on the first step",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + "downtime_ms = 100",
        "switchover.steps[1]: neither after_s nor after_iterations",
        "expected at least one of them on every step but the first: when the step applies",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + "downtime_ms = 100\nafter_s = -1",
        "switchover.steps[1].after_s: got -1",
        "expected a number of seconds of the job >= 0",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + "downtime_ms = 100\nafter_s = inf",
        "switchover.steps[1].after_s: got Infinity",
        "at most 604800",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + 'downtime_ms = 100\nafter_s = "5s"',
        'switchover.steps[1].after_s: got "5s"',
        "a number of seconds",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + "downtime_ms = 100\nafter_iterations = 0",
        "switchover.steps[1].after_iterations: got 0",
        "expected an integer of memory passes >= 1",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + "downtime_ms = 100\nafter_iterations = 2.5",
        "switchover.steps[1].after_iterations: got 2.5",
        "an integer of memory passes >= 1",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + "downtime_ms = 50\nafter_s = 1",
        "switchover.steps[1].downtime_ms: got 50",
        "expected more than 50, switchover.steps[0].downtime_ms: the downtime rises step by step",
    ),
    (
        STEP + "downtime_ms = 50\n" + STEP + "downtime_ms = 40\nafter_s = 1",
        "switchover.steps[1].downtime_ms: got 40",
        "expected more than 50, switchover.steps[0].downtime_ms",
    ),
    (
        STEP
        + "downtime_ms = 50\n"
        + STEP
        + "downtime_ms = 60\nafter_s = 10\n"
        + STEP
        + "downtime_ms = 70\nafter_s = 9.5",
        "switchover.steps[2].after_s: got 9.5",
        "expected at least 10.0, switchover.steps[1].after_s: steps come in the order they apply",
    ),
    (  # the comparison is with the last step that gave after_s, not just the one before
        STEP
        + "downtime_ms = 50\n"
        + STEP
        + "downtime_ms = 60\nafter_s = 10\n"
        + STEP
        + "downtime_ms = 70\nafter_iterations = 3\n"
        + STEP
        + "downtime_ms = 80\nafter_s = 5",
        "switchover.steps[3].after_s: got 5",
        "expected at least 10.0, switchover.steps[1].after_s",
    ),
    (
        STEP
        + "downtime_ms = 50\n"
        + STEP
        + "downtime_ms = 60\nafter_iterations = 4\n"
        + STEP
        + "downtime_ms = 70\nafter_s = 1\nafter_iterations = 3",
        "switchover.steps[2].after_iterations: got 3",
        "expected at least 4, switchover.steps[1].after_iterations",
    ),
    (
        "[migration]\nmax_downtime_ms = 300\n" + STEP + "downtime_ms = 301",
        "switchover.steps[0].downtime_ms: got 301",
        "expected at most 300, migration.max_downtime_ms, which caps every step",
    ),
    (
        "[migration]\nmax_downtime_ms = 300\n"
        + STEP
        + "downtime_ms = 50\n"
        + STEP
        + "downtime_ms = 500\nafter_s = 5",
        "switchover.steps[1].downtime_ms: got 500",
        "expected at most 300, migration.max_downtime_ms",
    ),
    # migration ranges libvirt and QEMU would reject only at migration time
    (
        "[migration]\nmax_downtime_ms = 2000001",
        "migration.max_downtime_ms: got 2000001",
        "at most 2000000 (QEMU's maximum)",
    ),
    (
        f"[migration]\nbandwidth_mib = {MAX_BANDWIDTH_MIB + 1}",
        f"migration.bandwidth_mib: got {MAX_BANDWIDTH_MIB + 1}",
        f"at most {MAX_BANDWIDTH_MIB} (libvirt's maximum)",
    ),
    (
        "[migration]\ncompletion_timeout_s = 604801",
        "migration.completion_timeout_s: got 604801",
        "at most 604800 (7 days)",
    ),
    ("[migration]\ncompletion_timeout_s = nan", "migration.completion_timeout_s: got NaN", "at most 604800"),
    (
        "[migration]\ncompletion_timeout_s = 1e300",
        "migration.completion_timeout_s: got 1e+300",
        "a number of seconds",
    ),
    (
        "[migration]\nbandwidth_mib = 99999999999999999999",
        "migration.bandwidth_mib: got an integer beyond 64 bits",
        "expected a TOML integer (64-bit)",
    ),
    # armed hooks
    (
        '[[hooks.drain]]\nargv = ["x"]\narmed = "yes"',
        'hooks.drain[0].armed: got "yes"',
        "expected true or false",
    ),
    (
        '[[hooks.before]]\nargv = ["x"]\narmed = true',
        "hooks.before[0].armed: got true",
        "expected false: before hooks are never armed (only drain and undrain)",
    ),
    (
        '[[hooks.after-success]]\nargv = ["x"]\narmed = true',
        "hooks.after-success[0].armed: got true",
        "after-success hooks are never armed",
    ),
    (
        '[[hooks.after-failure]]\nargv = ["x"]\narmed = true',
        "hooks.after-failure[0].armed: got true",
        "after-failure hooks are never armed",
    ),
    (
        '[[hooks.drain]]\nargv = ["x", "--device={device_id}"]\narmed = true',
        'hooks.drain[0].argv: {device_id} in "--device={device_id}" with armed = true',
        "expected none of {device_id}, {qom_path}, {state}: an armed hook serves every device of the VM "
        "and reads them from its stdin",
    ),
    (
        '[[hooks.undrain]]\nargv = ["x", "{domain}", "{qom_path}"]\narmed = true',
        'hooks.undrain[0].argv: {qom_path} in "{qom_path}" with armed = true',
        "reads them from its stdin",
    ),
    (
        '[[hooks.drain]]\nargv = ["x", "s={state}"]\narmed = true',
        "hooks.drain[0].argv: {state} in",
        "reads them from its stdin",
    ),
    # what would fail only when a hook is started
    (
        '[[hooks.drain]]\nargv = ["x", "a\\u0000b"]',
        'hooks.drain[0].argv[1]: got "a\\u0000b"',
        "expected text without NUL characters (\\u0000)",
    ),
    (
        '[[hooks.drain]]\nargv = ["x\\u0000"]',
        "hooks.drain[0].argv[0]",
        "without NUL characters",
    ),
    ('description = "\\u0000"', "description: got", "without NUL characters"),
    ('[migration]\ndata_uri = "tcp://h\\u0000:1"', "migration.data_uri: got", "without NUL characters"),
    ('[[hooks.drain]]\nargv = ["x"]\nname = "n\\u0000"', "hooks.drain[0].name: got", "without NUL"),
    ('[devices]\nmatch = ["a\\u0000"]', "devices.match[0]: got", "without NUL"),
    ('"a\\u0000b" = 1', 'top level: key "a\\u0000b"', "expected keys without NUL characters"),
    (
        '[[hooks.drain]]\nargv = ["x", "' + "a" * 4097 + '"]',
        "hooks.drain[0].argv[1]: 4097 bytes",
        "expected at most 4096 bytes per argument",
    ),
    (
        '[[hooks.drain]]\nargv = ["x", "' + "é" * 2049 + '"]',  # 2 bytes each in UTF-8
        "hooks.drain[0].argv[1]: 4098 bytes",
        "at most 4096 bytes",
    ),
    (
        '[[hooks.drain]]\nargv = ["/' + "a" * 4096 + '"]',
        "hooks.drain[0].argv[0]: 4097 bytes",
        "at most 4096 bytes",
    ),
    (
        "[[hooks.drain]]\nargv = [" + ", ".join(['"x"'] * 257) + "]",
        "hooks.drain[0].argv: 257 elements",
        "expected at most 256",
    ),
    # nesting
    ("a = " + "[" * 40 + "]" * 40, "a" + "[0]" * 32, "expected at most 32 levels"),
    (
        "a = " + "[" * 500 + "]" * 500,
        "TOML: arrays or tables nested too deeply",
        "expected at most 32 levels",
    ),
    ("a = " + "{b = " * 500 + "1" + "}" * 500, "TOML: arrays or tables nested too deeply", "at most 32"),
    ("a = " + "9" * 5000, "TOML: an integer of thousands of digits", "expected a TOML integer (64-bit)"),
    # [evacuate]
    ("evacuate = 1", "evacuate: got 1", "expected a table, written [evacuate]"),
    ("[evacuate]\ngroupby = 1", "evacuate.groupby: unknown key", "expected one of group_by, groups"),
    (
        '[evacuate]\ngroup_by = "label"',
        'evacuate.group_by: got "label"',
        'expected one of "none", "metadata"',
    ),
    ("[evacuate]\ngroups = 3", "evacuate.groups: got 3", "one [[evacuate.groups]] per group"),
    ('[[evacuate.groups]]\ninclude = ["a*"]', "evacuate.groups[0].name: missing", "the group's name"),
    ('[[evacuate.groups]]\nname = "j"', "evacuate.groups[0].include: missing", "domain-name globs"),
    ('[[evacuate.groups]]\nname = ""\ninclude = ["a"]', 'evacuate.groups[0].name: got ""', "one line"),
    ('[[evacuate.groups]]\nname = "j\\n1"\ninclude = ["a"]', "evacuate.groups[0].name: got", "one line"),
    ('[[evacuate.groups]]\nname = " j"\ninclude = ["a"]', 'evacuate.groups[0].name: got " j"', "leading"),
    ('[[evacuate.groups]]\nname = 7\ninclude = ["a"]', "evacuate.groups[0].name: got 7", "the group's name"),
    ('[[evacuate.groups]]\nname = "j"\ninclude = []', "evacuate.groups[0].include: got []", "non-empty list"),
    ('[[evacuate.groups]]\nname = "j"\ninclude = ["a", ""]', 'evacuate.groups[0].include[1]: got ""', "glob"),
    (
        '[[evacuate.groups]]\nname = "j"\ninclude = ["a"]\nmembers = 2',
        "evacuate.groups[0].members: unknown",
        "name, include",
    ),
    (
        '[[evacuate.groups]]\nname = "j"\ninclude = ["a"]\n[[evacuate.groups]]\nname = "k"\ninclude = ["b"]\n'
        '[[evacuate.groups]]\nname = "j"\ninclude = ["c"]',
        'evacuate.groups[2].name: got "j"',
        "a name of its own: evacuate.groups[0] has it",
    ),
]


@pytest.mark.parametrize(("text", "where", "expected"), INVALID, ids=[case[1][:60] for case in INVALID])
def test_invalid_policy_names_key_and_expectation(text: str, where: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: ")
    assert where in message
    assert expected in message
    assert_one_line(message)
    assert caught.value.code is ExitCode.BAD_INPUT
    assert isinstance(caught.value, BadInput)


def test_message_format_is_exact() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy('[[hooks.drain]]\nargv = ["x"]\ntimeout_ms = "fast"', SOURCE)
    assert caught.value.line() == (
        'policies/x.toml: hooks.drain[0].timeout_ms: got "fast"; '
        "expected an integer of milliseconds > 0 (at most 600000)"
    )
    assert caught.value.where == "hooks.drain[0].timeout_ms"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[devices\nmatch = 1", "line 1, column 9"),
        ("[migration]\nmode = p2p", "line 2, column 8"),
        ("a = 1\na = 2\n", "line 2, column 6"),
        ('description = "open', "end of file"),
    ],
)
def test_toml_syntax_errors_give_the_position(text: str, where: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {where}: ")
    assert message.endswith("; fix the TOML syntax")
    assert "(at " not in message


COVERS = [
    # (match, pci, device id, pci address, covered)
    (("*",), (), "hostdev0", None, True),
    (("*",), (), "hostdev0", "0000:3b:00.1", True),
    (("hostdev*",), (), "hostdev1", None, True),
    (("hostdev*",), (), "ua-rdma0", None, False),
    (("ua-rdma?", "nic*"), (), "nic0", None, True),
    (("ua-rdma?",), (), "ua-rdma10", None, False),
    (("HostDev*",), (), "hostdev0", None, False),  # case-sensitive, like QEMU ids
    (("*",), ("0000:3b:00.1",), "hostdev0", "0000:3b:00.1", True),
    (("*",), ("0000:3b:00.1",), "hostdev0", "0000:3B:00.1", True),
    (("*",), ("0000:3b:00.1",), "hostdev0", "0000:3b:00.2", False),
    (("*",), ("0000:3b:00.1",), "sim0", None, False),  # known only from events: no address
    (("hostdev*",), ("0000:3b:00.1",), "other", "0000:3b:00.1", False),
]


@pytest.mark.parametrize(("match", "pci", "device_id", "address", "covered"), COVERS)
def test_device_selector_covers(
    match: tuple[str, ...], pci: tuple[str, ...], device_id: str, address: str | None, covered: bool
) -> None:
    assert DeviceSelector(match=match, pci=pci).covers(device_id, address) is covered


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policies_load(name: str) -> None:
    policy = load_policy(SHIPPED_POLICY_DIR / f"{name}.toml")
    assert policy.name == name
    assert policy.description
    assert policy.devices.covers("hostdev0")
    assert policy.when_events_off is WhenEventsOff.REFUSE


def test_shipped_default_is_observe_only_and_documents_every_key() -> None:
    policy = load_policy(SHIPPED_POLICY_DIR / "default.toml")
    assert policy.all_hooks() == ()
    assert policy.migration == MigrationSettings()
    document = tomllib.loads((SHIPPED_POLICY_DIR / "default.toml").read_text())
    assert list(document["devices"]) == [field.name for field in fields(DeviceSelector)]
    assert list(document["migration"]) == [field.name for field in fields(MigrationSettings)]
    assert list(document["events"]) == ["when_off"]
    assert list(document["evacuate"]) == [field.name for field in fields(EvacuateSettings)]
    assert load_policy(SHIPPED_POLICY_DIR / "default.toml").evacuate == EvacuateSettings()
    text = (SHIPPED_POLICY_DIR / "default.toml").read_text()
    for key in ("argv", "timeout_ms", "on_failure", "retries", "backoff_ms", "name", *map(str, Trigger)):
        assert f"#   {key} " in text, key


def test_shipped_rdma_drain_hooks() -> None:
    policy = load_policy(SHIPPED_POLICY_DIR / "rdma-drain.toml")
    (drain,) = policy.hooks_for(Trigger.DRAIN)
    (undrain,) = policy.hooks_for(Trigger.UNDRAIN)
    assert drain.argv == undrain.argv == ("orchestrator-rdma-hook", "serve", "--domain", "{domain}")
    assert drain.armed and undrain.armed, "one process per migration, woken through its stdin"
    assert policy.switchover.drain is DrainMode.GATED
    assert (drain.timeout_ms, drain.on_failure, drain.retries) == (250, OnFailure.ABORT, 0)
    assert (undrain.on_failure, undrain.retries) == (OnFailure.CONTINUE, 0)
    assert policy.hooks_for(Trigger.BEFORE) == ()


def write(directory: Path, name: str, text: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_resolve_by_name_first_directory_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "etc", tmp_path / "shipped"
    write(first, "default", 'description = "site default"')
    write(second, "default", 'description = "shipped default"')
    write(second, "rdma-drain")
    assert resolve_policy(None, [first, second]).description == "site default"
    assert resolve_policy("default", [first, second]).path == first / "default.toml"
    assert (
        resolve_policy("rdma-drain", [tmp_path / "missing", first, second]).path == second / "rdma-drain.toml"
    )


def test_resolve_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "mine", "[migration]\nbandwidth_mib = 10")
    assert resolve_policy(str(tmp_path / "mine.toml"), []).migration.bandwidth_mib == 10
    monkeypatch.chdir(tmp_path)
    policy = resolve_policy("mine.toml", [])
    assert policy.name == "mine"
    assert policy.path == tmp_path / "mine.toml"


def test_resolve_unknown_name_lists_directories_and_names(tmp_path: Path) -> None:
    write(tmp_path / "a", "default")
    write(tmp_path / "b", "rdma-drain")
    write(tmp_path / "b", "default")
    with pytest.raises(PolicyError) as caught:
        resolve_policy("rdma", [tmp_path / "a", tmp_path / "b"])
    assert caught.value.line() == (
        f"rdma: policy name: not found in {tmp_path / 'a'}, {tmp_path / 'b'}; "
        "expected one of default, rdma-drain, or the path of a .toml file"
    )


def test_resolve_env_directory_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "rdma-drain", 'description = "from env"')
    monkeypatch.setenv(POLICY_DIR_ENV, str(tmp_path))
    assert resolve_policy("rdma-drain").description == "from env"
    assert available_policies()["rdma-drain"] == tmp_path / "rdma-drain.toml"
    monkeypatch.delenv(POLICY_DIR_ENV)
    assert resolve_policy("rdma-drain").path in {
        directory / "rdma-drain.toml" for directory in DEFAULT_POLICY_DIRS
    }


def test_shipped_directory_is_a_default_directory() -> None:
    assert DEFAULT_POLICY_DIRS[-1] == SHIPPED_POLICY_DIR
    assert set(SHIPPED) <= set(available_policies([SHIPPED_POLICY_DIR]))


@pytest.mark.parametrize(
    ("make", "where"),
    [
        (
            lambda directory: directory / "absent.toml",
            "file: not found; expected the path of an existing policy file",
        ),
        (lambda directory: directory, "file: not a regular file (a directory); expected a policy TOML file"),
        (lambda directory: directory / "latin1.toml" / "x.toml", "file: cannot read it (Not a directory)"),
        (lambda directory: directory / "latin1.toml", "byte 18: not UTF-8 text; expected a UTF-8 TOML file"),
    ],
)
def test_load_unreadable_files(tmp_path: Path, make: Callable[[Path], Path], where: str) -> None:
    (tmp_path / "latin1.toml").write_bytes(b'description = "caf\xe9"')
    path = make(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.line().startswith(f"{path}: {where}")


# --- [switchover] ----------------------------------------------------------------------------------

VALID_SWITCHOVER = [
    # (policy text, the Switchover it gives)
    ("", Switchover()),
    ("[switchover]", Switchover()),
    ('[switchover]\ndrain = "prepare"', Switchover(drain=DrainMode.PREPARE)),
    ('[switchover]\ndrain = "gated"', Switchover(drain=DrainMode.GATED)),
    ('[switchover]\ndrain = "start"', Switchover(drain=DrainMode.START)),
    ("[switchover]\nstall_timeout_s = 0", Switchover(stall_timeout_s=None)),
    ("[switchover]\nstall_timeout_s = 0.0", Switchover(stall_timeout_s=None)),
    ("[switchover]\nstall_timeout_s = 20", Switchover(stall_timeout_s=20.0)),
    ("[switchover]\nstall_timeout_s = 604800", Switchover(stall_timeout_s=604800.0)),
    ("[switchover]\nsteps = []", Switchover()),
    (STEP + "downtime_ms = 1", Switchover(steps=(DowntimeStep(1),))),
    (STEP + "downtime_ms = 2000000", Switchover(steps=(DowntimeStep(2_000_000),))),
    (
        STEP + "downtime_ms = 10\n" + STEP + "downtime_ms = 20\nafter_s = 0",
        Switchover(steps=(DowntimeStep(10), DowntimeStep(20, after_s=0.0))),
    ),
    (
        STEP + "downtime_ms = 10\n" + STEP + "downtime_ms = 20\nafter_iterations = 1",
        Switchover(steps=(DowntimeStep(10), DowntimeStep(20, after_iterations=1))),
    ),
    (  # equal times are allowed: the later step wins at once
        STEP
        + "downtime_ms = 10\n"
        + STEP
        + "downtime_ms = 20\nafter_s = 5\nafter_iterations = 2\n"
        + STEP
        + "downtime_ms = 30\nafter_s = 5\nafter_iterations = 2",
        Switchover(
            steps=(
                DowntimeStep(10),
                DowntimeStep(20, after_s=5.0, after_iterations=2),
                DowntimeStep(30, after_s=5.0, after_iterations=2),
            )
        ),
    ),
    (  # each kind of time is compared only with the steps that give it
        STEP
        + "downtime_ms = 10\n"
        + STEP
        + "downtime_ms = 20\nafter_s = 60\n"
        + STEP
        + "downtime_ms = 30\nafter_iterations = 2\n"
        + STEP
        + "downtime_ms = 40\nafter_s = 90\nafter_iterations = 2",
        Switchover(
            steps=(
                DowntimeStep(10),
                DowntimeStep(20, after_s=60.0),
                DowntimeStep(30, after_iterations=2),
                DowntimeStep(40, after_s=90.0, after_iterations=2),
            )
        ),
    ),
    (
        "[migration]\nmax_downtime_ms = 300\n"
        + STEP
        + "downtime_ms = 100\n"
        + STEP
        + "downtime_ms = 300\nafter_s = 2.5",
        Switchover(steps=(DowntimeStep(100), DowntimeStep(300, after_s=2.5))),
    ),
    (
        '[switchover]\ndrain = "gated"\nstall_timeout_s = 12.5\n' + STEP + "downtime_ms = 5",
        Switchover(drain=DrainMode.GATED, steps=(DowntimeStep(5),), stall_timeout_s=12.5),
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALID_SWITCHOVER)
def test_switchover_values(text: str, expected: Switchover) -> None:
    assert parse_policy(text, SOURCE).switchover == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"[migration]\nbandwidth_mib = {MAX_BANDWIDTH_MIB}", ("bandwidth_mib", MAX_BANDWIDTH_MIB)),
        ("[migration]\nmax_downtime_ms = 2000000", ("max_downtime_ms", 2_000_000)),
        ("[migration]\ncompletion_timeout_s = 604800", ("completion_timeout_s", 604800.0)),
    ],
)
def test_migration_ranges_accept_their_maximum(text: str, expected: tuple[str, object]) -> None:
    key, value = expected
    assert getattr(parse_policy(text, SOURCE).migration, key) == value


def test_bandwidth_maximum_is_libvirts() -> None:
    # libvirt's QEMU_DOMAIN_MIG_BANDWIDTH_MAX on 64-bit hosts: INT64_MAX / (1024 * 1024)
    assert MAX_BANDWIDTH_MIB == 8_796_093_022_207


@pytest.mark.parametrize("trigger", ["drain", "undrain"])
@pytest.mark.parametrize("armed", [True, False])
def test_armed_drain_and_undrain_hooks(trigger: str, armed: bool) -> None:
    text = (
        f'[[hooks.{trigger}]]\nargv = ["x", "{{domain}}", "{{migration_id}}"]\narmed = {str(armed).lower()}'
    )
    (hook,) = parse_policy(text, SOURCE).hooks_for(Trigger(trigger))
    assert hook.armed is armed


@pytest.mark.parametrize("trigger", ["before", "after-success", "after-failure"])
def test_armed_false_is_accepted_on_every_trigger(trigger: str) -> None:
    (hook,) = parse_policy(f'[[hooks.{trigger}]]\nargv = ["x"]\narmed = false', SOURCE).hooks_for(
        Trigger(trigger)
    )
    assert hook.armed is False


def test_an_unarmed_hook_may_use_per_device_placeholders() -> None:
    text = '[[hooks.drain]]\nargv = ["x", "{device_id}", "{qom_path}", "{state}"]\narmed = false'
    assert parse_policy(text, SOURCE).hooks_for(Trigger.DRAIN)[0].argv[1:] == (
        "{device_id}",
        "{qom_path}",
        "{state}",
    )


def test_literal_braces_are_not_per_device_placeholders() -> None:
    text = '[[hooks.drain]]\nargv = ["x", "{{device_id}}"]\narmed = true'
    assert parse_policy(text, SOURCE).hooks_for(Trigger.DRAIN)[0].armed


def test_hook_keys_are_the_hook_fields() -> None:
    keys = [field.name for field in fields(Hook) if field.name != "trigger"]
    text = "[[hooks.drain]]\n" + "\n".join(f"{key} = 1" for key in ["argv", "nope"])
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, SOURCE)
    assert caught.value.line().endswith(f"expected one of {', '.join(keys)}")


def test_argv_limits_accept_their_maximum() -> None:
    argv = ["x", "a" * 4096] + ["y"] * 254
    text = "[[hooks.drain]]\nargv = [" + ", ".join(f'"{arg}"' for arg in argv) + "]"
    assert parse_policy(text, SOURCE).hooks_for(Trigger.DRAIN)[0].argv == tuple(argv)


def test_nesting_within_the_limit_is_only_an_unknown_key() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy("a = " + "[" * 31 + "]" * 31, SOURCE)
    assert caught.value.where == "a"


# --- one-line messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('"a\\nb" = 1', "a\\nb: unknown key"),
        ('"a\\u001b[31mb" = 1', "a\\x1b[31mb: unknown key"),
        ('"a\\u2028b" = 1', "a\\u2028b: unknown key"),
        ('"a\\u0085b" = 1', "a\\x85b: unknown key"),
        ('"tab\\there" = 1', "tab\\there: unknown key"),
    ],
)
def test_control_characters_in_keys_are_escaped(text: str, shown: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, SOURCE)
    assert caught.value.line().startswith(f"{SOURCE}: {shown}; expected one of")
    assert_one_line(caught.value.line())


def test_long_messages_are_cut_in_the_middle_keeping_the_remedy() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(f'"{"k" * 1000}" = 1', SOURCE)
    message = caught.value.line()
    assert_one_line(message)
    assert len(message) == MAX_MESSAGE_CHARS
    assert message.startswith(f"{SOURCE}: kkk")
    assert "..." in message
    assert message.endswith(
        "expected one of description, devices, migration, switchover, events, hooks, evacuate"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("short", "short"),
        ("a\nb\r\nc", "a\\nb\\r\\nc"),
        ("x" * 300, "x" * 300),
        ("x" * 200 + "y" * 101, "x" * 197 + "..." + "y" * 100),
        ("\x00\x7f\x9f\xa0", "\\x00\\x7f\\x9f\xa0"),
    ],
)
def test_one_line(text: str, expected: str) -> None:
    assert one_line(text) == expected


def test_syntax_error_message_is_one_line() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy('description = "a\nb"', SOURCE)
    assert_one_line(caught.value.line())


# --- the shipped default documents the new keys ---------------------------------------------------


def test_shipped_default_documents_switchover_and_armed() -> None:
    text = (SHIPPED_POLICY_DIR / "default.toml").read_text()
    document = tomllib.loads(text)
    # steps last, next to its commented example
    assert set(document["switchover"]) == {field.name for field in fields(Switchover)}
    assert list(document) == ["description", "devices", "migration", "switchover", "events", "evacuate"]
    assert load_policy(SHIPPED_POLICY_DIR / "default.toml").switchover == Switchover()
    for key in ("downtime_ms", "after_s", "after_iterations"):
        assert f"#   {key} " in text, key
    for mode in DrainMode:
        assert f'"{mode}"' in text, mode
    assert "#   armed " in text
    assert "see the README, Armed hooks" in text


def test_shipped_default_switchover_example_is_valid() -> None:
    text = (SHIPPED_POLICY_DIR / "default.toml").read_text()
    section = text[text.index("[switchover]") : text.index("[events]")]
    example = section[section.index("# Example (not active):") :].splitlines()[1:]
    uncommented = "\n".join(line.removeprefix("# ") for line in example if line.startswith("# "))
    policy = parse_policy(uncommented, SOURCE)
    assert policy.switchover.steps == (
        DowntimeStep(50),
        DowntimeStep(200, after_s=30.0, after_iterations=10),
        DowntimeStep(500, after_s=60.0),
    )


def test_shipped_default_documents_evacuate_and_its_example_is_valid() -> None:
    text = (SHIPPED_POLICY_DIR / "default.toml").read_text()
    section = text[text.index("[evacuate]") : text.index("# Hooks:")]
    for key in (field.name for field in fields(EvacuationGroup)):
        assert f"#   {key} " in section, key
    for way in GroupBy:
        assert f'"{way}"' in section, way
    assert "--uri urn:orchestrator:group:1 --key orch" in section
    example = section[section.index("# Example (not active):") :].splitlines()[1:]
    uncommented = "\n".join(line.removeprefix("# ") for line in example if line.startswith("# "))
    assert parse_policy(uncommented, SOURCE).evacuate.groups == (EvacuationGroup("job1", ("job1-*",)),)


@pytest.mark.parametrize(
    ("include", "domain", "matches"),
    [
        (("job1-*",), "job1-a", True),
        (("job1-*",), "job2-a", False),
        (("a", "b?"), "b1", True),
        (("JOB*",), "job1", False),  # case-sensitive, like libvirt names
    ],
)
def test_evacuation_group_matches(include: tuple[str, ...], domain: str, matches: bool) -> None:
    assert EvacuationGroup("g", include).matches(domain) is matches


# --- reading files: bounded, never hanging --------------------------------------------------------


def test_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError) as caught:
        load_policy(fifo)  # opening a FIFO without a writer would block
    assert caught.value.line() == f"{fifo}: file: not a regular file (a FIFO); expected a policy TOML file"


@pytest.mark.parametrize(
    ("path", "kind"), [("/dev/zero", "a character device"), ("/dev/null", "a character device")]
)
def test_devices_are_refused(path: str, kind: str) -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy(path)
    assert caught.value.line() == f"{path}: file: not a regular file ({kind}); expected a policy TOML file"


def test_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "zero.toml"
    link.symlink_to("/dev/zero")
    with pytest.raises(PolicyError) as caught:
        load_policy(link)
    assert "not a regular file (a character device)" in caught.value.line()


def test_directory_given_as_policy_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    with pytest.raises(PolicyError) as caught:
        resolve_policy(str(directory))
    assert (
        caught.value.line()
        == f"{directory}: file: not a regular file (a directory); expected a policy TOML file"
    )


def test_file_over_one_mib_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 * 1024 * 1024))
    with pytest.raises(PolicyError) as caught:
        load_policy(big)
    assert (
        caught.value.line() == f"{big}: file: larger than 1 MiB; expected a policy of at most 1048576 bytes"
    )


def test_file_of_exactly_one_mib_is_read(tmp_path: Path) -> None:
    path = tmp_path / "full.toml"
    head = b'description = "full"\n'
    path.write_bytes(head + b"#" * (1024 * 1024 - len(head) - 1) + b"\n")
    assert path.stat().st_size == 1024 * 1024
    assert load_policy(path).description == "full"


def test_deep_nesting_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "deep", "a = " + "[" * 500 + "]" * 500)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.line() == (
        f"{path}: TOML: arrays or tables nested too deeply; expected at most 32 levels"
    )


def test_nul_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "nul.toml"
    path.write_bytes(b'[[hooks.drain]]\nargv = ["x", "a\\u0000"]\n')
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.where == "hooks.drain[0].argv[1]"
    raw = tmp_path / "raw.toml"
    raw.write_bytes(b'description = "a\x00b"\n')  # a raw NUL is a TOML syntax error
    with pytest.raises(PolicyError) as caught:
        load_policy(raw)
    assert caught.value.line().endswith("fix the TOML syntax")
    assert_one_line(caught.value.line())


def test_nul_in_the_path_is_one_line() -> None:
    with pytest.raises(PolicyError) as caught:
        resolve_policy("/tmp/a\0b.toml")
    assert_one_line(caught.value.line())
    with pytest.raises(PolicyError) as caught:
        resolve_policy("a\0b")
    assert "policy name: not found" in caught.value.line()


def test_symlink_loop_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.toml").symlink_to(tmp_path / "b.toml")
    (tmp_path / "b.toml").symlink_to(tmp_path / "a.toml")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "a.toml")
    assert caught.value.line() == (
        f"{tmp_path / 'a.toml'}: file: cannot read it (Too many levels of symbolic links); "
        "expected a readable file"
    )


def test_relative_path_with_dotdot_and_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "real", "mine", 'description = "found"')
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    policy = resolve_policy("../link/../link/./mine.toml")
    assert policy.description == "found"
    assert policy.name == "mine"


# --- who may have written a policy ----------------------------------------------------------------

OTHER_UID = 12345


def refused(path: Path | str) -> str:
    with pytest.raises(PolicyError) as caught:
        resolve_policy(str(path))
    message = caught.value.line()
    assert_one_line(message)
    return message


def test_group_writable_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "p")
    path.chmod(0o664)
    assert refused(path) == (
        f"{path}: file: writable by group (mode 0664), unsafe for a policy; fix: chmod go-w {path}"
    )


def test_world_writable_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "p")
    path.chmod(0o646)
    assert refused(path).startswith(f"{path}: file: writable by others (mode 0646), ")


def test_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "p")
    os.chown(path, OTHER_UID, -1)
    assert refused(path) == (
        f"{path}: file: owned by uid {OTHER_UID}, not root, unsafe for a policy; fix: chown root {path}"
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path, for messages that name it three times and must not be cut."""
    directory = Path(tempfile.mkdtemp(prefix="pol", dir="/tmp"))
    yield directory
    shutil.rmtree(directory)


def test_file_of_another_user_writable_by_all_gets_both_fixes(short_tmp: Path) -> None:
    path = write(short_tmp, "p")
    os.chown(path, OTHER_UID, -1)
    path.chmod(0o666)
    assert refused(path) == (
        f"{path}: file: owned by uid {OTHER_UID}, not root and writable by group and others (mode 0666), "
        f"unsafe for a policy; fix: chown root {path} && chmod go-w {path}"
    )


def test_long_paths_keep_the_whole_fix(tmp_path: Path) -> None:
    path = write(tmp_path / ("d" * 10), "p")
    os.chown(path, OTHER_UID, -1)
    path.chmod(0o666)
    message = refused(path)
    assert "..." in message
    assert message.endswith(f"; fix: chown root {path} && chmod go-w {path}")


def test_group_writable_parent_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "pol"
    path = write(directory, "p")
    directory.chmod(0o775)
    assert refused(path) == (
        f"{directory}: directory: writable by group (mode 0775), unsafe for a policy; "
        f"fix: chmod go-w {directory}"
    )


def test_any_writable_ancestor_directory_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "top"
    path = write(top / "a" / "b", "p")
    top.chmod(0o777)
    assert refused(path).startswith(f"{top}: directory: writable by group and others (mode 0777), ")


def test_ancestor_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "top"
    path = write(top / "a", "p")
    os.chown(top, OTHER_UID, -1)
    assert refused(path).endswith(f"fix: chown root {top}")


def test_sticky_root_directory_like_tmp_is_accepted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = write(shared, "p", 'description = "in a sticky directory"')
    assert resolve_policy(str(path)).description == "in a sticky directory"
    assert resolve_policy("p", [shared]).description == "in a sticky directory"


def test_sticky_directory_of_another_user_is_refused(short_tmp: Path) -> None:
    shared = short_tmp / "shared"
    path = write(shared, "p")
    shared.chmod(0o1777)
    os.chown(shared, OTHER_UID, -1)
    assert refused(path).startswith(f"{shared}: directory: owned by uid {OTHER_UID}, not root and writable")


def test_file_of_another_user_in_a_sticky_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    path = write(shared, "p")
    shared.chmod(0o1777)
    os.chown(path, OTHER_UID, -1)
    assert refused(path).startswith(f"{path}: file: owned by uid {OTHER_UID}")


def test_symlink_of_another_user_is_refused(tmp_path: Path) -> None:
    target = write(tmp_path / "real", "p")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    os.lchown(link, OTHER_UID, -1)
    assert refused(link) == (
        f"{link}: symlink: owned by uid {OTHER_UID}, not root, unsafe for a policy; fix: chown -h root {link}"
    )


def test_symlink_chain_through_a_writable_directory_is_refused(tmp_path: Path) -> None:
    # link1 (trusted directory) -> open/link2 (a writable directory) -> real/p.toml (trusted):
    # neither the path given nor the file's real path goes through `open`, but the lookup does.
    target = write(tmp_path / "real", "p")
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "link2.toml").symlink_to(target)
    (tmp_path / "safe").mkdir()
    (tmp_path / "safe" / "link1.toml").symlink_to(tmp_path / "open" / "link2.toml")
    assert resolve_policy(str(tmp_path / "safe" / "link1.toml")).name == "link1"
    (tmp_path / "open").chmod(0o777)
    assert refused(tmp_path / "safe" / "link1.toml").startswith(f"{tmp_path / 'open'}: directory: ")


def test_writable_directory_of_the_real_file_is_refused(tmp_path: Path) -> None:
    target = write(tmp_path / "real", "p")
    (tmp_path / "real").chmod(0o770)
    (tmp_path / "link.toml").symlink_to(target)
    assert refused(tmp_path / "link.toml").startswith(f"{tmp_path / 'real'}: directory: writable by group")


def test_fix_command_quotes_the_path(tmp_path: Path) -> None:
    path = write(tmp_path / "with space", "p")
    path.chmod(0o664)
    assert refused(path).endswith(f"fix: chmod go-w '{path}'")


def test_not_root_accepts_own_files_and_root_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = write(tmp_path / "mine", "p", 'description = "mine"')
    os.chown(mine, 1000, -1)
    os.chown(mine.parent, 1000, -1)
    rooted = write(tmp_path / "root", "p", 'description = "root"')
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert load_policy(mine).description == "mine"
    assert load_policy(rooted).description == "root"


def test_not_root_refuses_a_third_users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "p")
    os.chown(path, OTHER_UID, -1)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert refused(path).startswith(f"{path}: file: owned by uid {OTHER_UID}, not root or uid 1000 (you), ")


def test_root_refuses_the_invoking_users_file(tmp_path: Path) -> None:
    path = write(tmp_path, "p")
    os.chown(path, 1000, -1)
    assert "owned by uid 1000, not root, " in refused(path)


def test_name_lookup_refuses_an_untrusted_directory_searched_first(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    write(second, "p", 'description = "second"')
    assert resolve_policy("p", [first, second]).description == "second"
    first.chmod(0o777)
    with pytest.raises(PolicyError) as caught:
        resolve_policy("p", [first, second])  # someone could drop a p.toml into `first`
    assert caught.value.line().startswith(f"{first}: directory: writable by group and others (mode 0777), ")


def test_name_lookup_ignores_directories_after_the_one_that_has_it(tmp_path: Path) -> None:
    first, later = tmp_path / "first", tmp_path / "later"
    write(first, "p", 'description = "first"')
    later.mkdir()
    later.chmod(0o777)
    assert resolve_policy("p", [first, later, tmp_path / "missing"]).description == "first"


def test_name_lookup_refuses_an_untrusted_env_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / "env"
    write(env, "rdma-drain")
    env.chmod(0o775)
    monkeypatch.setenv(POLICY_DIR_ENV, str(env))
    with pytest.raises(PolicyError) as caught:
        resolve_policy("rdma-drain")
    assert caught.value.line().endswith(f"fix: chmod go-w {env}")


def test_name_lookup_checks_the_file_found(tmp_path: Path) -> None:
    path = write(tmp_path / "d", "p")
    os.chown(path, OTHER_UID, -1)
    with pytest.raises(PolicyError) as caught:
        resolve_policy("p", [tmp_path / "d"])
    assert caught.value.line().startswith(f"{path}: file: owned by uid {OTHER_UID}")


def test_shipped_policies_pass_the_checks() -> None:
    for name in SHIPPED:
        assert resolve_policy(name, [SHIPPED_POLICY_DIR]).name == name


# --- anything in, a Policy or one PolicyError line out --------------------------------------------

_KEYS = [
    "description", "devices", "migration", "switchover", "events", "hooks", "match", "pci", "mode",
    "bandwidth_mib", "data_uri", "max_downtime_ms", "completion_timeout_s", "drain", "steps",
    "stall_timeout_s", "downtime_ms", "after_s", "after_iterations", "when_off", "before", "undrain",
    "after-success", "argv", "timeout_ms", "on_failure", "retries", "backoff_ms", "name", "armed",
    "evacuate", "group_by", "groups", "include",
]  # fmt: skip
_SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.sampled_from([0, 1, 2, 50, 300, 2_000_000, 2_000_001, MAX_BANDWIDTH_MIB + 1])
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["prepare", "gated", "start", "abort", "continue", "{device_id}", "x", "/bin/x", "a\0"])
    | st.sampled_from(["none", "metadata", "job1-*", " j"])
    | st.dates()
)
_KEY = st.sampled_from(_KEYS) | st.text(min_size=1, max_size=8)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEY, children, max_size=5),
    max_leaves=25,
)


def _toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else "inf"
            if value == math.inf
            else "-inf"
            if value < -1e308
            else repr(value)
        )
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)  # int, date


def _toml_document(document: dict[str, object]) -> str:
    return "\n".join(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in document.items())


def assert_policy_or_one_line_error(text: str) -> None:
    try:
        result = parse_policy(text, SOURCE)
    except PolicyError as error:
        assert_one_line(error.line())
        assert error.line().startswith(f"{SOURCE}: ")
    else:
        assert isinstance(result, Policy)


_TOML_CHARS = st.sampled_from(list("[]{}=,.\"'\n #\\-_:+0123456789abcdefghijklmnopqrstuvwxyz\tu\x00\x7f"))
_LINES = st.sampled_from(
    [
        "[switchover]",
        "[[switchover.steps]]",
        "[[hooks.drain]]",
        "[[hooks.before]]",
        "[migration]",
        "[devices]",
        "[events]",
        "[evacuate]",
        "[[evacuate.groups]]",
        'group_by = "metadata"',
        'name = "job1"',
        'include = ["job1-*"]',
        'argv = ["x", "{device_id}"]',
        "armed = true",
        "downtime_ms = 50",
        "after_s = 1.5",
        "after_iterations = 2",
        'drain = "gated"',
        "max_downtime_ms = 100",
        "stall_timeout_s = 3",
        "a = [[[[[[[[",
        "x = 1979-05-27T07:32:00Z",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LINES | st.text(_TOML_CHARS, max_size=30) | st.text(max_size=10), max_size=12))
def test_any_text_gives_a_policy_or_one_error_line(lines: list[str]) -> None:
    assert_policy_or_one_line_error("\n".join(lines))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEY, _VALUES, max_size=6))
def test_any_structure_gives_a_policy_or_one_error_line(document: dict[str, object]) -> None:
    assert_policy_or_one_line_error(_toml_document(document))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["downtime_ms", "after_s", "after_iterations"]), _SCALARS), max_size=5
    ),
    st.sampled_from([None, 0, 100, 2_000_000]),
    st.lists(
        st.fixed_dictionaries(
            {
                "argv": st.lists(
                    st.text(max_size=12) | st.sampled_from(["x", "{state}", "{domain}"]), max_size=3
                )
            },
            optional={"armed": st.booleans(), "retries": st.integers(-1, 11)},
        ),
        max_size=3,
    ),
    st.sampled_from(list(Trigger)),
)
def test_any_schedule_and_hooks_give_a_policy_or_one_error_line(
    steps: list[dict[str, object]], cap: int | None, hooks: list[dict[str, object]], trigger: Trigger
) -> None:
    document: dict[str, object] = {"switchover": {"steps": steps}, "hooks": {trigger.value: hooks}}
    if cap is not None:
        document["migration"] = {"max_downtime_ms": cap}
    assert_policy_or_one_line_error(_toml_document(document))
