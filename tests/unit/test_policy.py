"""Policy loading and validation: table-driven, on text, temporary files and the shipped policies."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from orchestrator.errors import BadInput, ExitCode
from orchestrator.hooks import Hook, OnFailure, Trigger
from orchestrator.policy import (
    DEFAULT_POLICY_DIRS,
    POLICY_DIR_ENV,
    SHIPPED_POLICY_DIR,
    DeviceSelector,
    MigrationMode,
    MigrationSettings,
    PolicyError,
    TimeoutAction,
    WhenEventsOff,
    available_policies,
    load_policy,
    parse_policy,
    resolve_policy,
)

SOURCE = "policies/x.toml"
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

[[hooks.undrain]]
argv = ["undrain", "{device_id}"]
on_failure = "continue"
retries = 0

[[hooks.after-success]]
argv = ["report", "ok"]
retries = 3

[[hooks.after-failure]]
argv = ["report", "failed"]
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
    drains = policy.hooks_for(Trigger.DRAIN)
    assert [hook.label for hook in drains] == ["drain", "second-drain"]
    assert drains[0].argv[1] == '--json={{"dev": "{device_id}"}}'
    assert drains[0].timeout_ms == 1
    assert drains[1] == Hook(trigger=Trigger.DRAIN, argv=("/opt/second-drain",))
    assert policy.hooks_for(Trigger.UNDRAIN)[0].on_failure is OnFailure.CONTINUE
    assert policy.hooks_for(Trigger.AFTER_SUCCESS)[0].retries == 3
    assert [hook.trigger for hook in policy.all_hooks()] == [
        Trigger.BEFORE,
        Trigger.DRAIN,
        Trigger.DRAIN,
        Trigger.UNDRAIN,
        Trigger.AFTER_SUCCESS,
        Trigger.AFTER_FAILURE,
    ]


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
    ("[migrate]", "migrate: unknown key", "expected one of description, devices, migration, events, hooks"),
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
        "expected one of argv, timeout_ms, on_failure, retries, backoff_ms, name",
    ),
    (
        '[[hooks.before]]\nargv = ["x"]\n[[hooks.before]]\nargv = ["y"]\ntimeout = 1',
        "hooks.before[1].timeout: unknown key",
        "expected one of argv",
    ),
]


@pytest.mark.parametrize(("text", "where", "expected"), INVALID, ids=[case[1] for case in INVALID])
def test_invalid_policy_names_key_and_expectation(text: str, where: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: ")
    assert where in message
    assert expected in message
    assert "\n" not in message
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
    text = (SHIPPED_POLICY_DIR / "default.toml").read_text()
    for key in ("argv", "timeout_ms", "on_failure", "retries", "backoff_ms", "name", *map(str, Trigger)):
        assert f"#   {key} " in text, key


def test_shipped_rdma_drain_hooks() -> None:
    policy = load_policy(SHIPPED_POLICY_DIR / "rdma-drain.toml")
    (drain,) = policy.hooks_for(Trigger.DRAIN)
    (undrain,) = policy.hooks_for(Trigger.UNDRAIN)
    assert drain.argv[:2] == ("orchestrator-rdma-hook", "drain")
    assert undrain.argv[:2] == ("orchestrator-rdma-hook", "undrain")
    assert (
        drain.argv[2:]
        == undrain.argv[2:]
        == ("--domain", "{domain}", "--device", "{device_id}", "--state", "{state}")
    )
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
        (lambda directory: directory, "file: cannot read it (Is a directory)"),
        (lambda directory: directory / "latin1.toml", "byte 18: not UTF-8 text; expected a UTF-8 TOML file"),
    ],
)
def test_load_unreadable_files(tmp_path: Path, make: Callable[[Path], Path], where: str) -> None:
    (tmp_path / "latin1.toml").write_bytes(b'description = "caf\xe9"')
    path = make(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.line().startswith(f"{path}: {where}")
