"""The vfio.orchestrator Ansible modules' own logic, without libvirt: the CLI is faked at
AnsibleModule.run_command, the modules run as Ansible runs them (arguments in, one JSON result out)."""

from __future__ import annotations

import enum
import importlib
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path, PurePath
from types import ModuleType
from typing import Any

import pytest
import typer.main

from orchestrator.commands import program  # noqa: F401 - it registers every command on the app
from orchestrator.commands.app import app
from orchestrator.core.policy import DrainMode
from orchestrator.core.request import COMPRESSION_METHODS, Request

COLLECTIONS = Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "collections"
PREFIX = "ansible_collections.vfio.orchestrator.plugins"

basic = pytest.importorskip("ansible.module_utils.basic", reason="ansible-core is not installed")


@pytest.fixture(scope="module")
def plugins() -> Iterator[dict[str, ModuleType]]:
    """The collection's modules, imported from the repository (as ansible-test's import test does)."""
    sys.path.insert(0, str(COLLECTIONS))
    try:
        yield {
            name: importlib.import_module(f"{PREFIX}.{kind}.{name}")
            for kind, name in (
                ("module_utils", "orchestrator_cli"),
                ("modules", "vfio_migrate"),
                ("modules", "vfio_evacuate"),
                ("modules", "vfio_events"),
                ("modules", "vfio_migrate_group"),
            )
        }
    finally:
        sys.path.remove(str(COLLECTIONS))


def hook(trigger: str, label: str, device: str | None, ok: bool, **fields: Any) -> dict[str, Any]:
    return {
        "trigger": trigger,
        "label": label,
        "device_id": device,
        "ok": ok,
        "error": None,
        "output_tail": "",
        **fields,
    }


ROLLED_BACK = {
    "migration_id": "3f2a9c1e0b7d4e55",
    "domain": "vm1",
    "source": "qemu+ssh://a/system",
    "destination": "qemu+ssh://b/system",
    "policy": "rdma-drain",
    "outcome": "rolled-back",
    "changed": False,
    "error": "drain hook rdma-drain failed on nic0: exit status 1",
    "notes": ["aborting: drain hook rdma-drain failed on nic0: exit status 1"],
    "hooks": [
        hook("before", "check", None, False, error="exit status 2", output_tail="busy\n"),
        hook("before", "check", None, True),  # its retry succeeded: not a failure
        hook(
            "drain",
            "rdma-drain",
            "nic0",
            False,
            error="exit status 1",
            output_tail="disarming peers\npeer 10.0.0.7: connection refused\n",
        ),
        hook("drain", "rdma-drain", "nic1", True),
        hook("undrain", "rdma-drain", "nic0", False, error="timed out after 5000 ms", output_tail=""),
    ],
    "timings": {"total_s": 2.5, "job_s": None, "downtime_ms": None},
    "devices": {},
    "timeline": [],
    "plan": [],
}


# --- pure helpers ---------------------------------------------------------------------------------


def test_failed_hooks_one_line_each_last_attempt_only(plugins: dict[str, ModuleType]) -> None:
    lines = plugins["vfio_migrate"].failed_hooks(ROLLED_BACK)
    assert lines == [
        "drain hook rdma-drain on nic0: exit status 1; "
        "output: disarming peers / peer 10.0.0.7: connection refused",
        "undrain hook rdma-drain on nic0: timed out after 5000 ms",
    ]


def test_a_long_output_tail_keeps_its_end(plugins: dict[str, ModuleType]) -> None:
    doc = {
        "hooks": [
            hook("drain", "x", "nic0", False, error="exit status 1", output_tail="a" * 1000 + "\nTHE END")
        ]
    }
    (line,) = plugins["vfio_migrate"].failed_hooks(doc)
    assert line.endswith("THE END") and "..." in line and len(line) < 400


def test_failure_message_is_the_error_then_the_hooks_and_no_notes(plugins: dict[str, ModuleType]) -> None:
    message = plugins["vfio_migrate"].failure_message(4, ROLLED_BACK, "")
    lines = message.splitlines()
    assert lines[0] == ROLLED_BACK["error"]
    assert lines[1:] == plugins["vfio_migrate"].failed_hooks(ROLLED_BACK)
    assert "aborting" not in message and "note:" not in message
    assert len(lines) == len(set(lines))


@pytest.mark.parametrize(
    ("outcome", "changed", "check_mode", "expected"),
    [
        ("succeeded", True, False, True),
        ("unchanged", False, False, False),
        ("rolled-back", False, False, False),
        ("aborted", False, False, False),
        ("interrupted", False, False, False),
        ("planned", False, True, True),
        ("unchanged", False, True, False),
    ],
)
def test_changed_is_the_cli_changed_field(
    plugins: dict[str, ModuleType], outcome: str, changed: bool, check_mode: bool, expected: bool
) -> None:
    assert (
        plugins["vfio_migrate"].is_changed({"outcome": outcome, "changed": changed}, check_mode) is expected
    )
    assert plugins["vfio_migrate"].is_changed(None, check_mode) is False


def test_plan_entries_are_objects_with_the_documented_keys(plugins: dict[str, ModuleType]) -> None:
    doc = {
        "plan": [
            {
                "domain": "b",
                "destination": "qemu+ssh://c/system",
                "memory_mib": 2048,
                "order": 2,
                "reason": "r2",
                "running": False,
                "extra": "dropped",
            },
            {
                "domain": "a",
                "destination": "qemu+ssh://b/system",
                "memory_mib": 4096,
                "order": 1,
                "reason": "r1",
            },
            "move c somewhere",  # prose from an incompatible CLI: never passed on
        ]
    }
    assert plugins["vfio_evacuate"].plan_entries(doc) == [
        {
            "domain": "a",
            "destination": "qemu+ssh://b/system",
            "memory_mib": 4096,
            "order": 1,
            "reason": "r1",
            "running": True,
        },
        {
            "domain": "b",
            "destination": "qemu+ssh://c/system",
            "memory_mib": 2048,
            "order": 2,
            "reason": "r2",
            "running": False,
        },
    ]
    assert plugins["vfio_evacuate"].plan_entries(None) == []


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        (
            "orchestrator: watching\norchestrator: error: no domain 'x'; list them\n",
            "no domain 'x'; list them",
        ),
        ("<3>orchestrator: error: bad\n", "bad"),
        (
            "orchestrator: nothing to do: vm1 has no VFIO device; only ...\n",
            "nothing to do: vm1 has no VFIO device; only ...",
        ),
        ("something broke\nnote: aborting: x\norchestrator: warning: y\n", "something broke"),
        ("", ""),
    ],
)
def test_error_line(plugins: dict[str, ModuleType], stderr: str, line: str) -> None:
    assert plugins["orchestrator_cli"].error_line(stderr) == line


# --- the modules as Ansible runs them ---------------------------------------------------------------


def run_module(
    module: ModuleType,
    args: dict[str, Any],
    rc: int,
    out: str,
    err: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[dict[str, Any], list[str]]:
    """Run `module.main()` with `args`, the CLI answering (rc, out, err); its result and the argv run."""
    result, calls = run_module_answers(module, args, [(rc, out, err)], monkeypatch, capsys)
    (argv,) = calls
    return result, argv


def run_module_answers(
    module: ModuleType,
    args: dict[str, Any],
    answers: list[tuple[int, str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[dict[str, Any], list[list[str]]]:
    """Run `module.main()` with `args`, the CLI's runs answering `answers` (rc, out, err) in turn; its
    result and every argv run (never more runs than answers)."""
    calls: list[list[str]] = []
    pending = list(answers)

    def run_command(self: Any, argv: list[str], check_rc: bool = False, **_kw: Any) -> tuple[int, str, str]:
        calls.append(list(argv))
        assert pending, f"the CLI ran more often than expected: {argv}"
        return pending.pop(0)

    monkeypatch.setattr(basic, "_ANSIBLE_ARGS", json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode())
    # ansible-core >= 2.19 serializes results by profile (absent before)
    monkeypatch.setattr(basic, "_ANSIBLE_PROFILE", "legacy", raising=False)
    monkeypatch.setattr(basic.AnsibleModule, "run_command", run_command)
    monkeypatch.setattr(
        basic.AnsibleModule, "get_bin_path", lambda self, name, required=False: f"/usr/bin/{name}"
    )
    with pytest.raises(SystemExit):
        module.main()
    result = json.loads(capsys.readouterr().out)
    return result, calls


def test_vfio_migrate_failure(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    args = {"domain": "vm1", "dest_uri": "qemu+ssh://b/system", "source_uri": "qemu+ssh://a/system"}
    result, argv = run_module(
        plugins["vfio_migrate"], args, 4, json.dumps(ROLLED_BACK), "", monkeypatch, capsys
    )
    assert argv[-1] == "--json" and argv[1:4] == ["migrate", "vm1", "qemu+ssh://b/system"]
    assert result["failed"] is True and result["changed"] is False and result["rc"] == 4
    assert result["msg"].splitlines()[0] == ROLLED_BACK["error"]
    assert "drain hook rdma-drain on nic0: exit status 1; output:" in result["msg"]
    assert result["outcome"] == "rolled-back" and result["hooks"] == ROLLED_BACK["hooks"]


def test_vfio_migrate_success_is_changed(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    doc = {**ROLLED_BACK, "outcome": "succeeded", "changed": True, "error": None, "hooks": [], "notes": []}
    args = {"domain": "vm1", "dest_uri": "qemu+ssh://b/system"}
    result, _ = run_module(plugins["vfio_migrate"], args, 0, json.dumps(doc), "", monkeypatch, capsys)
    assert result["changed"] is True and not result.get("failed")
    assert result["msg"] == "migrated vm1 to qemu+ssh://b/system (succeeded)"


def test_vfio_evacuate_returns_the_structured_plan(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    placement = {
        "domain": "vm1",
        "destination": "qemu+ssh://b/system",
        "memory_mib": 64,
        "order": 1,
        "reason": "most free memory that fits",
        "running": True,
    }
    doc = {
        "evacuation_id": "9d41",
        "source": "qemu+ssh://a/system",
        "destinations": ["qemu+ssh://b/system"],
        "changed": False,
        "dry_run": True,
        "empty": False,
        "plan": [placement],
        "unplaced": [],
        "unreachable": [],
        "results": [],
        "left": ["vm1"],
        "message": "dry run: nothing moved",
    }
    args = {
        "source_uri": "qemu+ssh://a/system",
        "destinations": ["qemu+ssh://b/system"],
        "_ansible_check_mode": True,
    }
    result, argv = run_module(plugins["vfio_evacuate"], args, 0, json.dumps(doc), "", monkeypatch, capsys)
    assert "--dry-run" in argv
    assert result["plan"] == [placement]
    assert result["changed"] is True and result["msg"] == "would move 1 VM(s) off qemu+ssh://a/system"


def test_vfio_events_nothing_to_do_is_ok_with_the_cli_line(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    err = "orchestrator: nothing to do: vm1 has no VFIO device; only VFIO PCI or mdev hostdevs ...\n"
    result, _ = run_module(plugins["vfio_events"], {"domain": "vm1"}, 6, "", err, monkeypatch, capsys)
    assert result["changed"] is False and result["failed"] is False and result["rc"] == 6
    assert (
        result["msg"]
        == result["skipped_reason"]
        == "nothing to do: vm1 has no VFIO device; only VFIO PCI or mdev hostdevs ..."
    )


# --- every option of the CLI is a module option -----------------------------------------------------

COMMANDS = {"migrate": "vfio_migrate", "evacuate": "vfio_evacuate", "migrate-group": "vfio_migrate_group"}

# The CLI options no module option stands for, each with why. Every other option (and argument) of
# `orchestrator migrate` and `orchestrator evacuate` must be an option of its module.
NOT_MODULE_OPTIONS = {
    # Always passed (orchestrator_cli.run): the module reads the CLI's JSON document, never its tables.
    "--json": "always passed",
    # Ansible's own check mode: build_args passes --dry-run when the task runs with --check.
    "--dry-run": "check mode",
}

# Module options whose type is not the CLI's, each with why.
OTHER_TYPES: dict[tuple[str, str], tuple[dict[str, Any], str]] = {
    ("vfio_migrate_group", "members"): (
        {"type": "list", "elements": "raw"},
        "strings DOMAIN[=DESTURI] or dicts {domain, dest_uri}; build_args joins a dict into DOMAIN=DESTURI",
    ),
}

# The CLI options that take one comma-separated string where the module takes a list, and the values
# the CLI accepts in it (the module option's `choices`; None: any).
JOINED_CHOICES: dict[str, tuple[str, ...] | None] = {
    "--comp-methods": COMPRESSION_METHODS,
    "--migrate-disks": None,
}

REQUIRED = {
    "domain": "vm1",
    "dest_uri": "qemu+ssh://b/system",
    "source_uri": "qemu+ssh://a/system",
    "destinations": ["qemu+ssh://b/system", "qemu+ssh://c/system"],
    "name": "train-42",
    "members": ["vm1", "vm2=qemu+ssh://c/system"],
}
README = COLLECTIONS / "ansible_collections" / "vfio" / "orchestrator" / "README.md"


@pytest.fixture(scope="module")
def cli() -> dict[str, Any]:
    """The Click commands of COMMANDS (`orchestrator migrate`, ...), as the CLI builds them."""
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in COMMANDS}


@pytest.fixture(scope="module")
def callbacks() -> dict[str, Any]:
    """The Python functions behind the commands (their annotations carry the options' types)."""
    return {info.name: info.callback for info in app.registered_commands if info.name in COMMANDS}


@pytest.fixture
def no_cli_env(cli: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """No option of the commands takes its value from the environment ($LIBVIRT_DEFAULT_URI, ...)."""
    for command in cli.values():
        for param in command.params:
            for name in [param.envvar] if isinstance(param.envvar, str) else param.envvar or ():
                monkeypatch.delenv(name, raising=False)


def mapping(module: ModuleType, param: Any) -> list[Any]:
    """The module's CliOption entries that pass this CLI option."""
    return [entry for entry in module.CLI_OPTIONS if entry.flag in param.opts]


def base_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The module's parameters as Ansible hands them over: defaults, and the required ones given."""
    params = {key: entry.get("default") for key, entry in spec.items()}
    params.update({key: value for key, value in REQUIRED.items() if spec.get(key, {}).get("required")})
    return params


def parse(command: Any, args: list[str]) -> dict[str, Any]:
    """The CLI's parameters for `args` (the subcommand's name first), parsed by its own Click command."""
    assert args[0] == command.name
    return {key: plain(value) for key, value in command.make_context(args[0], args[1:]).params.items()}


def plain(value: Any) -> Any:
    """A parsed value as the module gives it: an enum's value, a path's text, a list for a tuple."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def python_type(hint: Any) -> Any:
    """The type in `Annotated[T | None, typer.Option(...)]`: T."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def ansible_type(hint: Any, joined: bool) -> dict[str, Any]:
    """The argument_spec fields (type, elements, choices) an option of this Python type needs."""
    kind = python_type(hint)
    if joined:
        assert kind is str, f"a comma-separated option is a str, not {kind}"
        return {"type": "list", "elements": "str"}
    if typing.get_origin(kind) is list:
        return {"type": "list", "elements": {str: "str"}[typing.get_args(kind)[0]]}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return {"type": "str", "choices": [member.value for member in kind]}
    return {"type": {bool: "bool", int: "int", float: "float", str: "str", Path: "path"}[kind]}


def samples(entry: dict[str, Any]) -> list[Any]:
    """Values of a module option to pass through the CLI: both bools, every choice, ..."""
    kind, choices = entry["type"], entry.get("choices")
    if kind == "list":
        return [list(choices[:2]) if choices else ["vm-a*", "vm-b*"]]
    return {
        "bool": [True, False],
        "int": [7],
        "float": [2.5],
        "path": ["/srv/vm1.xml"],
        "str": list(choices) if choices else ["qemu+ssh://x/system"],
    }[kind]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_cli_option_is_a_module_option(
    plugins: dict[str, ModuleType], cli: dict[str, Any], name: str
) -> None:
    module = plugins[COMMANDS[name]]
    spec = module.ARGUMENT_SPEC
    missing, wrong = [], []
    for param in cli[name].params:
        if param.param_type_name == "argument":  # DOMAIN, DESTURI, ...: build_args passes them first
            if not spec.get(param.name, {}).get("required"):
                missing.append(f"{param.metavar} (a required option {param.name})")
            continue
        if set(param.opts) & NOT_MODULE_OPTIONS.keys():
            continue
        entries = mapping(module, param)
        if not entries:
            missing.append("/".join(param.opts + param.secondary_opts))
            continue
        if len(entries) > 1:
            wrong.append(f"{param.opts[0]}: passed by {[entry.option for entry in entries]}")
        (entry, *_) = entries
        off = param.secondary_opts[0] if param.secondary_opts else None
        if entry.off != off:
            wrong.append(f"{entry.option}=false must pass {off}, not {entry.off}")
        # Required when the CLI requires it; vfio_evacuate also requires source_uri (-c): emptying a
        # host is never left to $LIBVIRT_DEFAULT_URI.
        if param.required and not spec[entry.option].get("required"):
            wrong.append(f"{entry.option} must be required, as {param.opts[0]} is")
    assert not missing, (
        f"`orchestrator {name}` options that {COMMANDS[name]} lacks: {', '.join(missing)} (add each to the "
        "module's ARGUMENT_SPEC, CLI_OPTIONS and DOCUMENTATION and to the README's table, or to "
        "NOT_MODULE_OPTIONS here with why)"
    )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_module_option_is_a_cli_option(
    plugins: dict[str, ModuleType], cli: dict[str, Any], name: str
) -> None:
    module = plugins[COMMANDS[name]]
    flags = {flag for param in cli[name].params for flag in param.opts + param.secondary_opts}
    arguments = {param.name for param in cli[name].params if param.param_type_name == "argument"}
    stale = [entry.flag for entry in module.CLI_OPTIONS if entry.flag not in flags]
    stale += [entry.off for entry in module.CLI_OPTIONS if entry.off and entry.off not in flags]
    assert not stale, f"not options of `orchestrator {name}`: {stale}"
    passed = {entry.option for entry in module.CLI_OPTIONS}
    common = plugins["orchestrator_cli"].COMMON_ARGUMENT_SPEC.keys()
    assert set(module.ARGUMENT_SPEC) == passed | arguments | common
    assert len(passed) == len(module.CLI_OPTIONS), "a module option is passed twice"


@pytest.mark.parametrize("name", COMMANDS)
def test_module_options_have_the_types_of_the_cli_options(
    plugins: dict[str, ModuleType], cli: dict[str, Any], callbacks: dict[str, Any], name: str
) -> None:
    module = plugins[COMMANDS[name]]
    hints = typing.get_type_hints(callbacks[name], include_extras=True)
    for param in cli[name].params:
        entries = mapping(module, param) if param.param_type_name == "option" else []
        option = entries[0].option if entries else param.name
        if option not in module.ARGUMENT_SPEC:
            continue  # --json, --dry-run
        joined = param.opts[0] in JOINED_CHOICES
        expected = ansible_type(hints[param.name], joined)
        if joined and JOINED_CHOICES[param.opts[0]]:
            expected["choices"] = list(JOINED_CHOICES[param.opts[0]])
        if (COMMANDS[name], option) in OTHER_TYPES:
            expected = OTHER_TYPES[(COMMANDS[name], option)][0]
        spec = module.ARGUMENT_SPEC[option]
        got = {key: spec[key] for key in ("type", "elements", "choices") if key in spec}
        assert got == expected, f"{option} ({param.opts[0]})"
        assert bool(entries and entries[0].joined) == joined, f"{option}: comma-separated or not"
        # No default of its own: omitted, the CLI's (or the policy's) applies. A flag that can only
        # turn something on may default to false, which passes nothing.
        default = spec.get("default")
        assert default is None or (default is False and param.default is False), f"{option}: {default!r}"


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.usefixtures("no_cli_env")
def test_module_options_reach_the_cli_as_its_options(
    plugins: dict[str, ModuleType], cli: dict[str, Any], name: str
) -> None:
    """Each module option, built into argv by the module and parsed by the CLI's own Click command,
    sets that CLI option to its value and nothing else; the module's defaults pass nothing."""
    module, command = plugins[COMMANDS[name]], cli[name]
    spec = module.ARGUMENT_SPEC
    base = base_params(spec)
    minimal = module.build_args(base, False)
    if name == "migrate":
        assert minimal == ["migrate", REQUIRED["domain"], REQUIRED["dest_uri"]]
    elif name == "migrate-group":
        assert minimal == ["migrate-group", REQUIRED["name"], *REQUIRED["members"]]
    else:
        to = [arg for uri in REQUIRED["destinations"] for arg in ("--to", uri)]
        assert minimal == ["evacuate", "-c", REQUIRED["source_uri"], *to]
    assert module.build_args(base, True) == [*minimal, "--dry-run"]
    defaults = parse(command, minimal)
    assert parse(command, [*minimal, "--dry-run"]) == {**defaults, "dry_run": True}

    by_flag = {flag: param for param in command.params for flag in param.opts}
    for entry in module.CLI_OPTIONS:
        param = by_flag[entry.flag]
        for value in samples(spec[entry.option]):
            parsed = parse(command, module.build_args({**base, entry.option: value}, False))
            if isinstance(value, bool):
                expected = value if value or entry.off else defaults[param.name]
            elif entry.joined:
                expected = ",".join(value)
            else:
                expected = value
            assert parsed[param.name] == expected, f"{entry.option}={value!r}"
            rest = {key: item for key, item in parsed.items() if key != param.name}
            assert rest == {key: item for key, item in defaults.items() if key != param.name}, entry.option


def test_an_empty_optional_string_passes_nothing_an_empty_required_one_is_passed(
    plugins: dict[str, ModuleType],
) -> None:
    migrate, evacuate = plugins["vfio_migrate"], plugins["vfio_evacuate"]
    params = {**base_params(migrate.ARGUMENT_SPEC), "source_uri": "", "policy": "", "drain": None}
    assert migrate.build_args(params, False) == ["migrate", REQUIRED["domain"], REQUIRED["dest_uri"]]
    # An empty source URI of an evacuation goes to the CLI, which refuses it: never the default host.
    params = {**base_params(evacuate.ARGUMENT_SPEC), "source_uri": ""}
    assert evacuate.build_args(params, False)[:3] == ["evacuate", "-c", ""]


@pytest.mark.parametrize("name", COMMANDS)
def test_the_documentation_has_the_argument_spec(plugins: dict[str, ModuleType], name: str) -> None:
    yaml = pytest.importorskip("yaml")
    module = plugins[COMMANDS[name]]
    documented = yaml.safe_load(module.DOCUMENTATION)["options"]
    assert documented.keys() == module.ARGUMENT_SPEC.keys()
    for option, spec in module.ARGUMENT_SPEC.items():
        doc = documented[option]
        for key in ("type", "elements", "choices", "default"):
            assert doc.get(key) == spec.get(key), f"{option}: {key}"
        assert bool(doc.get("required")) == bool(spec.get("required")), option
    check_mode = yaml.safe_load(module.DOCUMENTATION)["attributes"]["check_mode"]["description"]
    assert "nothing is written to the journal" in " ".join(check_mode)


def readme_table() -> dict[str, list[str]]:
    """The collection README's table of options: first cell -> the other cells."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| module option | CLI option |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        first, *cells = (cell.strip() for cell in line.strip().strip("|").split("|"))
        assert first not in rows, f"README: {first} twice"
        rows[first] = cells
    return rows


def test_the_readme_table_is_the_modules_and_the_cli(
    plugins: dict[str, ModuleType], cli: dict[str, Any]
) -> None:
    rows = readme_table()
    options = {option for name in COMMANDS for option in plugins[COMMANDS[name]].ARGUMENT_SPEC}
    assert {first for first in rows if first.startswith("`")} == {f"`{option}`" for option in options}
    for name, module_name in COMMANDS.items():
        module, column = plugins[module_name], 1 + list(COMMANDS).index(name)
        arguments = {p.name: p for p in cli[name].params if p.param_type_name == "argument"}
        for option in options:
            cells = rows[f"`{option}`"]
            spec = module.ARGUMENT_SPEC.get(option)
            mark = "-" if spec is None else "required" if spec.get("required") else "yes"
            assert cells[column] == mark, f"README: {option} in {module_name}"
            if spec is None:
                continue
            entries = [entry for entry in module.CLI_OPTIONS if entry.option == option]
            if option in arguments:  # its metavar: `DOMAIN`, `DOMAIN[=DESTURI]...`
                metavars = re.findall(r"`([A-Z][A-Z_\[\]=.]*)`", cells[0])
                assert metavars == [arguments[option].metavar], option
            else:
                flags = {flag for entry in entries for flag in (entry.flag, entry.off) if flag}
                assert set(re.findall(r"`(-[-\w]*)`", cells[0])) == flags, f"README: {option}"
            joined = bool(entries and entries[0].joined)
            assert ("comma-separated" in cells[0]) == joined, f"README: {option}"
        # every option of the command is in the table, --json and --dry-run too
        written = {flag for cells in rows.values() for flag in re.findall(r"`(-[-\w]*)`", cells[0])}
        for param in cli[name].params:
            if param.param_type_name == "option":
                assert set(param.opts) & written, f"README: {param.opts[0]} is not in the table"


def test_vfio_migrate_passes_the_new_options_as_ansible_validates_them(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    doc = {**ROLLED_BACK, "outcome": "planned", "changed": False, "error": None, "hooks": [], "notes": []}
    args = {
        "domain": "vm1",
        "dest_uri": "qemu+ssh://b/system",
        "drain": "gated",
        "max_downtime": "500",  # Ansible converts it
        "lock_wait": 30,
        "auto_converge": "yes",
        "compressed": False,  # the CLI has no off option: passes nothing
        "comp_methods": "zstd,xbzrle",  # Ansible splits a comma-separated string
        "tls": True,
        "migrate_disks": ["vda", "vdb"],
        "_ansible_check_mode": True,
    }
    result, argv = run_module(plugins["vfio_migrate"], args, 0, json.dumps(doc), "", monkeypatch, capsys)
    assert not result.get("failed"), result
    options = argv[4:]
    for expected in (
        ["--drain", "gated"],
        ["--max-downtime", "500"],
        ["--lock-wait", "30.0"],
        ["--comp-methods", "zstd,xbzrle"],
        ["--migrate-disks", "vda,vdb"],
    ):
        assert any(options[i : i + 2] == expected for i in range(len(options))), (expected, argv)
    assert {"--auto-converge", "--tls", "--dry-run", "--json"} <= set(options)
    assert "--compressed" not in options and "--parallel" not in options


def test_vfio_evacuate_passes_the_new_options(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    doc = {"source": "qemu+ssh://a/system", "changed": False, "empty": True, "plan": [], "results": []}
    args = {
        "source_uri": "qemu+ssh://a/system",
        "destinations": ["qemu+ssh://b/system"],
        "drain": "start",
        "bandwidth": 1024,
        "max_downtime": 300,
        "timeout": 600,
    }
    result, argv = run_module(plugins["vfio_evacuate"], args, 0, json.dumps(doc), "", monkeypatch, capsys)
    assert not result.get("failed"), result
    assert argv[1:] == [
        "evacuate",
        "-c",
        "qemu+ssh://a/system",
        "--to",
        "qemu+ssh://b/system",
        "--drain",
        "start",
        "--bandwidth",
        "1024",
        "--max-downtime",
        "300",
        "--timeout",
        "600.0",
        "--json",
    ]


def test_a_drain_the_cli_does_not_know_fails_before_the_cli_runs(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    args = {"domain": "vm1", "dest_uri": "qemu+ssh://b/system", "drain": "later"}
    monkeypatch.setattr(basic, "_ANSIBLE_ARGS", json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode())
    monkeypatch.setattr(basic, "_ANSIBLE_PROFILE", "legacy", raising=False)
    with pytest.raises(SystemExit):
        plugins["vfio_migrate"].main()
    result = json.loads(capsys.readouterr().out)
    assert result["failed"] is True
    assert "drain" in result["msg"] and "prepare, gated, start" in result["msg"]


# --- vfio_migrate_group: members, its dry run first, and what is left to move ----------------------

SRC, HV2, HV3 = "qemu+ssh://a/system", "qemu+ssh://b/system", "qemu+ssh://c/system"


def member(domain: str, outcome: str, destination: str = HV2, **fields: Any) -> dict[str, Any]:
    """One member's line in a group report (a migration report and the group's keys)."""
    return {
        "migration_id": f"id-{domain}",
        "domain": domain,
        "source": SRC,
        "destination": destination,
        "policy": "rdma-drain",
        "drain_mode": "gated",
        "outcome": outcome,
        "changed": outcome == "succeeded",
        "error": None,
        "hooks": [],
        "notes": [],
        "plan": [],
        "limit_ms": None,
        "margin_ms": None,
        "release_lag_ms": None,
        **fields,
    }


EXIT_CODES = {"planned": 0, "succeeded": 0, "refused": 2, "rolled-back": 4, "partial": 8, "interrupted": 130}


def group_report(outcome: str, *members: dict[str, Any], error: str | None = None) -> str:
    """A group report as `orchestrator migrate-group --json` prints it (a dry run's when `planned`, or
    `refused` with no member past its pre-flight)."""
    past_preflight = any(m["outcome"] not in ("planned", "unchanged", "refused") for m in members)
    return json.dumps(
        {
            "group_id": "5c0e7a91d2f3",
            "group": "train-42",
            "policy": "rdma-drain",
            "outcome": outcome,
            "changed": any(m["changed"] for m in members),
            "exit_code": EXIT_CODES[outcome],
            "error": error,
            "dry_run": outcome == "planned" or (outcome == "refused" and not past_preflight),
            "stall_ms": None,
            "steps": [],
            "notes": [],
            "members": list(members),
        }
    )


GROUP_ARGS = {"name": "train-42", "members": ["vm1", "vm2", "vm3"], "source_uri": SRC, "dest_uri": HV2}


def run_group(
    plugins: dict[str, ModuleType],
    args: dict[str, Any],
    answers: list[tuple[int, str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> tuple[dict[str, Any], list[list[str]]]:
    result, calls = run_module_answers(plugins["vfio_migrate_group"], args, answers, monkeypatch, capsys)
    assert len(calls) == len(answers), calls
    return result, calls


def test_group_members_as_strings_and_dicts(plugins: dict[str, ModuleType]) -> None:
    group = plugins["vfio_migrate_group"]
    members = [
        "vm1",
        f"vm2={HV3}",
        {"domain": "vm3"},
        {"domain": "vm4", "dest_uri": HV3},
        {"domain": "vm5", "dest_uri": ""},
    ]
    assert group.parse_members(members) == [
        ("vm1", None, "vm1"),
        ("vm2", HV3, f"vm2={HV3}"),
        ("vm3", None, "vm3"),
        ("vm4", HV3, f"vm4={HV3}"),
        ("vm5", None, "vm5"),  # an empty dest_uri is none: the member goes to --to
    ]
    params = {**base_params(group.ARGUMENT_SPEC), "members": members, "dest_uri": HV2, "hold_timeout": 600}
    assert group.build_args(params, False) == [
        "migrate-group",
        "train-42",
        "vm1",
        f"vm2={HV3}",
        "vm3",
        f"vm4={HV3}",
        "vm5",
        "--to",
        HV2,
        "--hold-timeout",
        "600",
    ]
    assert group.build_args(params, True)[-1] == "--dry-run"


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ([{"domain": "vm1", "dest": HV2}], "unknown key(s) dest"),
        ([{"dest_uri": HV2}], "member 1 has no domain"),
        (["vm1", {"domain": "a=b"}], "member 2: domain 'a=b' contains '='"),
        (["vm1", 7], "member 2 is neither a string nor a dictionary (int)"),
        ([{"domain": "vm1", "dest_uri": ["x"]}], "dest_uri must be a string"),
    ],
)
def test_a_member_the_module_cannot_pass_fails_before_the_cli_runs(
    plugins: dict[str, ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    members: list[Any],
    words: str,
) -> None:
    result, calls = run_group(plugins, {**GROUP_ARGS, "members": members}, [], monkeypatch, capsys)
    assert calls == [] and result["failed"] is True and result["changed"] is False
    assert words in result["msg"]


def test_group_moves_every_member_after_its_dry_run(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = group_report(
        "planned", member("vm1", "planned"), member("vm2", "planned"), member("vm3", "planned")
    )
    done = group_report(
        "succeeded", member("vm1", "succeeded"), member("vm2", "succeeded"), member("vm3", "succeeded")
    )
    result, (probe, migration) = run_group(
        plugins, {**GROUP_ARGS, "_ansible_diff": True}, [(0, dry, ""), (0, done, "")], monkeypatch, capsys
    )
    members = ["vm1", "vm2", "vm3"]
    options = ["--to", HV2, "-c", SRC]
    assert probe[1:] == ["migrate-group", "train-42", *members, *options, "--dry-run", "--json"]
    assert migration[1:] == ["migrate-group", "train-42", *members, *options, "--json"]
    assert result["changed"] is True and not result.get("failed") and result["rc"] == 0
    assert result["outcome"] == "succeeded" and result["unchanged"] == []
    assert result["report"] == json.loads(done)
    assert result["msg"] == "migrated group train-42: vm1, vm2, vm3 (succeeded)"
    assert result["diff"]["before"] == f"vm1: {SRC}\nvm2: {SRC}\nvm3: {SRC}\n"
    assert result["diff"]["after"] == f"vm1: {HV2}\nvm2: {HV2}\nvm3: {HV2}\n"


def test_group_every_member_there_is_unchanged_and_nothing_runs(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = group_report(
        "planned", member("vm1", "unchanged"), member("vm2", "unchanged"), member("vm3", "unchanged")
    )
    for check_mode in (False, True):
        args = {**GROUP_ARGS, "_ansible_check_mode": check_mode}
        result, (probe,) = run_group(plugins, args, [(0, dry, "")], monkeypatch, capsys)
        assert "--dry-run" in probe
        assert result["changed"] is False and not result.get("failed")
        assert result["outcome"] == "unchanged" and result["unchanged"] == ["vm1", "vm2", "vm3"]
        assert result["msg"] == "group train-42: every member already runs on its destination (vm1, vm2, vm3)"
        assert result["report"]["dry_run"] is True


def test_group_runs_without_the_members_already_there(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    args = {**GROUP_ARGS, "members": ["vm1", f"vm2={HV3}", "vm3"]}
    dry = group_report(
        "planned", member("vm1", "planned"), member("vm2", "unchanged", HV3), member("vm3", "planned")
    )
    done = group_report("succeeded", member("vm1", "succeeded"), member("vm3", "succeeded"))
    result, (probe, migration) = run_group(plugins, args, [(0, dry, ""), (0, done, "")], monkeypatch, capsys)
    assert probe[1:6] == ["migrate-group", "train-42", "vm1", f"vm2={HV3}", "vm3"]
    assert migration[1:5] == ["migrate-group", "train-42", "vm1", "vm3"] and migration[5] == "--to"
    assert "--dry-run" not in migration
    assert result["changed"] is True and not result.get("failed") and result["unchanged"] == ["vm2"]
    assert result["msg"] == (
        "migrated group train-42: vm1, vm3 (succeeded); already on their destination: vm2"
    )


def test_group_with_one_member_left_fails_naming_the_moved_ones(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = group_report(
        "planned", member("vm1", "unchanged"), member("vm2", "planned"), member("vm3", "unchanged")
    )
    for check_mode in (False, True):
        args = {**GROUP_ARGS, "_ansible_check_mode": check_mode}
        result, _ = run_group(plugins, args, [(0, dry, "")], monkeypatch, capsys)
        assert result["failed"] is True and result["changed"] is False
        assert result["outcome"] == "refused" and result["unchanged"] == ["vm1", "vm3"]
        assert "needs at least two members to move, and only vm2 is left" in result["msg"]
        assert "already on their destination: vm1, vm3" in result["msg"]
        assert "vfio.orchestrator.vfio_migrate" in result["msg"]


def test_group_check_mode_is_the_dry_run_alone(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = group_report(
        "planned", member("vm1", "planned"), member("vm2", "unchanged"), member("vm3", "planned")
    )
    args = {**GROUP_ARGS, "lock_wait": 60, "_ansible_check_mode": True, "_ansible_diff": True}
    result, (argv,) = run_group(plugins, args, [(0, dry, "")], monkeypatch, capsys)
    assert argv[-3:] == ["60.0", "--dry-run", "--json"]
    assert result["changed"] is True and not result.get("failed") and result["outcome"] == "planned"
    assert (
        result["msg"] == "would migrate group train-42: vm1, vm3 (planned); already on their destination: vm2"
    )
    assert result["diff"]["after"] == f"vm1: {HV2}\nvm3: {HV2}\n"


def test_group_check_mode_fails_on_a_refusal(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    refused = member("vm3", "refused", error="no domain 'vm3' on qemu+ssh://a/system")
    dry = group_report(
        "refused",
        member("vm1", "planned"),
        member("vm2", "unchanged"),
        refused,
        error=f"vm3: {refused['error']}",
    )
    args = {**GROUP_ARGS, "_ansible_check_mode": True}
    result, _ = run_group(
        plugins, args, [(2, dry, "orchestrator: error: group train-42 refused\n")], monkeypatch, capsys
    )
    assert result["failed"] is True and result["changed"] is False and result["rc"] == 2
    assert result["msg"].splitlines() == [
        "vm3: no domain 'vm3' on qemu+ssh://a/system",
        "already on their destination (left out of the group): vm2",
    ]


def test_a_refused_dry_run_is_the_runs_to_judge_again(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """A member with another migration running: the dry run refuses it, the run waits (--lock-wait)."""
    busy = member("vm2", "refused", error="domain 'vm2' already has a libvirt job running")
    dry = group_report("refused", member("vm1", "planned"), busy, member("vm3", "planned"), error="vm2: busy")
    done = group_report(
        "succeeded", member("vm1", "succeeded"), member("vm2", "succeeded"), member("vm3", "succeeded")
    )
    args = {**GROUP_ARGS, "lock_wait": 300}
    result, (_, migration) = run_group(plugins, args, [(2, dry, ""), (0, done, "")], monkeypatch, capsys)
    assert migration[3:6] == ["vm1", "vm2", "vm3"] and "--lock-wait" in migration
    assert result["changed"] is True and not result.get("failed") and result["rc"] == 0


def test_group_partial_fails_changed_with_each_members_failed_hooks(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = group_report(
        "planned", member("vm1", "unchanged"), member("vm2", "planned"), member("vm3", "planned")
    )
    failed = member(
        "vm3",
        "rolled-back",
        error="operation failed: migration failed",
        hooks=[
            hook("undrain", "rdma-drain", "nic0", False, error="exit status 1", output_tail="peer gone\n")
        ],
    )
    error = "vm2 moved, the others did not (vm3: rolled-back)"
    done = json.loads(group_report("partial", member("vm2", "succeeded"), failed, error=error))
    done["hooks"] = [hook("group-drain", "notify", "@group", False, error="exit status 3")]
    done = json.dumps(done)
    err = f"orchestrator: error: group train-42 partial: {error}\n"
    result, _ = run_group(plugins, GROUP_ARGS, [(0, dry, ""), (8, done, err)], monkeypatch, capsys)
    assert result["failed"] is True and result["changed"] is True and result["rc"] == 8
    assert result["outcome"] == "partial" and result["report"]["members"][1]["domain"] == "vm3"
    assert result["msg"].splitlines() == [
        error,
        "group train-42: group-drain hook notify on @group: exit status 3",
        "vm3: undrain hook rdma-drain on nic0: exit status 1; output: peer gone",
        "already on their destination (left out of the group): vm1",
    ]


def test_group_rolled_back_fails_unchanged(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = group_report("planned", member("vm1", "planned"), member("vm2", "planned"))
    error = "the group's hold timeout of 300 s passed: vm2 would not switch over within its limit"
    done = group_report(
        "rolled-back", member("vm1", "rolled-back"), member("vm2", "rolled-back"), error=error
    )
    args = {**GROUP_ARGS, "members": ["vm1", "vm2"]}
    result, _ = run_group(plugins, args, [(0, dry, ""), (4, done, "")], monkeypatch, capsys)
    assert result["failed"] is True and result["changed"] is False and result["rc"] == 4
    assert result["msg"] == error and result["outcome"] == "rolled-back"


@pytest.mark.parametrize(
    ("rc", "out", "err", "msg"),
    [
        (
            2,
            "",
            "orchestrator: error: member vm1 has no destination; give --to DESTURI\n",
            "member vm1 has no destination; give --to DESTURI",
        ),
        (
            3,
            "",
            "orchestrator: error: cannot connect to qemu+ssh://b/system\n",
            "cannot connect to qemu+ssh://b/system",
        ),
    ],
)
def test_group_dry_run_without_a_report_fails_at_once(
    plugins: dict[str, ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    rc: int,
    out: str,
    err: str,
    msg: str,
) -> None:
    result, _ = run_group(plugins, GROUP_ARGS, [(rc, out, err)], monkeypatch, capsys)
    assert result["failed"] is True and result["changed"] is False and result["rc"] == rc
    assert result["msg"] == msg


def test_group_an_interrupted_dry_run_runs_nothing_more(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = group_report(
        "interrupted", member("vm1", "planned"), member("vm2", "planned"), error="SIGTERM received"
    )
    result, _ = run_group(plugins, GROUP_ARGS, [(130, dry, "")], monkeypatch, capsys)
    assert result["failed"] is True and result["rc"] == 130 and result["msg"] == "SIGTERM received"


# --- vfio_migrate_group's contract with the group flow: what its dry run says, and why it runs first --

FLOW_SRC, FLOW_DST = "qemu+unix:///system?socket=/src", "qemu+unix:///system?socket=/dst"


def flow_dry_run(there: set[str], here: set[str]) -> str:
    """The report `orchestrator migrate-group --dry-run --json` prints, made by the group flow itself on
    the scripted libvirt: the VMs `there` already run on the destination, those `here` on the source."""
    from unit.scripted import FakeClock, FakeHost

    from orchestrator.core.policy_toml import parse_policy
    from orchestrator.flows.group import GroupMigration, GroupOptions

    clock = FakeClock()
    hosts = {uri: FakeHost(uri, clock) for uri in (FLOW_SRC, FLOW_DST)}
    xml = (
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>{}</name>"
        "<devices/><qemu:commandline><qemu:arg value='-device'/>"
        "<qemu:arg value='vfio-pci,id=nic0,host=0000:5e:00.0'/><qemu:arg value='-global'/>"
        "<qemu:arg value='vfio-pci.migration-events=on'/></qemu:commandline></domain>"
    )
    for names, uri in ((there, FLOW_DST), (here, FLOW_SRC)):
        for name in names:
            hosts[uri].add(name, xml.format(name))
    policy = parse_policy("", "group.toml")
    requests = [
        Request(name, FLOW_SRC, FLOW_DST, policy, drain=DrainMode.GATED, dry_run=True)
        for name in sorted(there | here)
    ]
    group = GroupMigration(
        "train-42", requests, hosts.__getitem__, GroupOptions(300.0, 30.0), clock=clock, dry_run=True
    )
    return json.dumps(group.run().to_json())


def test_group_leaves_out_what_the_flows_dry_run_says_is_there(
    plugins: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    dry = flow_dry_run(there={"vm1"}, here={"vm2", "vm3"})
    assert [m["outcome"] for m in json.loads(dry)["members"]] == ["unchanged", "planned", "planned"]
    done = group_report("succeeded", member("vm2", "succeeded"), member("vm3", "succeeded"))
    args = {**GROUP_ARGS, "source_uri": FLOW_SRC, "dest_uri": FLOW_DST}
    result, (_, migration) = run_group(plugins, args, [(0, dry, ""), (0, done, "")], monkeypatch, capsys)
    assert migration[1:5] == ["migrate-group", "train-42", "vm2", "vm3"]
    assert result["unchanged"] == ["vm1"] and result["changed"] is True

    dry = flow_dry_run(there={"vm1", "vm2", "vm3"}, here=set())
    result, _ = run_group(plugins, args, [(0, dry, "")], monkeypatch, capsys)
    assert result["changed"] is False and result["outcome"] == "unchanged"


def test_the_cli_moves_the_rest_of_a_group_with_a_member_already_there() -> None:
    """The group's machine takes a member that ended `unchanged` (already on its destination) out of
    the group: the others start without it, and a group whose members are all there is unchanged. (The
    module's dry run first also keeps a lone remaining member from moving as a "group".)"""
    from unit.scripted import FakeClock

    from orchestrator.core.group import AbortMembers, GroupMachine, StartJobs
    from orchestrator.core.report import Outcome

    machine = GroupMachine(["vm1", "vm2", "vm3"], FakeClock())
    assert machine.ended("vm1", Outcome.UNCHANGED, None) == []
    machine.arrived("vm2")
    actions = machine.arrived("vm3")
    assert not [a for a in actions if isinstance(a, AbortMembers)]
    assert [a for a in actions if isinstance(a, StartJobs)] == [StartJobs(("vm2", "vm3"))]

    all_there = GroupMachine(["vm1", "vm2"], FakeClock())
    all_there.ended("vm1", Outcome.UNCHANGED, None)
    all_there.ended("vm2", Outcome.UNCHANGED, None)
    assert all_there.done and all_there.outcome() == (Outcome.UNCHANGED, None)
