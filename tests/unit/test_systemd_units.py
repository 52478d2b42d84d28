"""The systemd service and timer for scheduled evacuations (deploy/systemd), their template for several
hosts, and the README's examples.

The unit files are parsed with a tiny parser (systemd allows repeated keys, and an empty
assignment resets a list; a template is read as systemd loads one of its instances), the ExecStart
line is expanded with the shipped example env files as systemd would and parsed by the real CLI, run
(the libvirt edge faked) for the exit codes the units count as success, and `systemd-analyze verify`
checks the units when the tool is installed (it works offline, without systemd running as PID 1).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer

from orchestrator.commands.app import app
from orchestrator.commands.program import main

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVICE = SYSTEMD_DIR / "orchestrator-evacuate.service"
RECOVER = SYSTEMD_DIR / "orchestrator-recover.service"
TIMER = SYSTEMD_DIR / "orchestrator-evacuate.timer"
ENV_EXAMPLE = SYSTEMD_DIR / "evacuate.env.example"
TEMPLATE = SYSTEMD_DIR / "orchestrator-evacuate@.service"
TEMPLATE_TIMER = SYSTEMD_DIR / "orchestrator-evacuate@.timer"
INSTANCE_ENV_EXAMPLE = SYSTEMD_DIR / "evacuate-instance.env.example"
README = SYSTEMD_DIR / "README.md"
ORCHESTRATOR = "/usr/local/bin/orchestrator"

Unit = dict[str, list[tuple[str, str]]]


# --- a tiny unit-file parser ---------------------------------------------------------------------
def with_instance(text: str, instance: str) -> str:
    """A template's text as systemd loads its instance `instance`: %i and %I are the instance name (a
    plain name such as hv1 needs no unescaping), %% is a %; no other specifier is expected here."""

    def specifier(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        assert letter in "iI", f"unexpected specifier %{letter}"
        return instance

    return re.sub(r"%(.)", specifier, text)


def parse_unit(path: Path, instance: str | None = None) -> Unit:
    """Sections to their (key, value) pairs in file order; repeated keys kept, continuations joined.
    With `instance`, the template `path` as that instance of it."""
    text = path.read_text()
    assert ("@." in path.name) == (instance is not None), f"{path.name}: a template needs an instance"
    if instance is not None:
        text = with_instance(text, instance)
    unit: Unit = {}
    section: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert section is not None, f"{path.name}: assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {line!r}"
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """All values of a key; an empty assignment resets the list, as systemd does for list settings."""
    found: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            found = [] if v == "" else [*found, v]
    return found


def value(unit: Unit, section: str, key: str) -> str | None:
    """The effective value of a single-valued key (the last assignment wins)."""
    found = values(unit, section, key)
    return found[-1] if found else None


def words(unit: Unit, section: str, key: str) -> list[str]:
    """Whitespace-separated list settings (After=, Wants=, SuccessExitStatus=...), all lines merged."""
    return [word for v in values(unit, section, key) for word in v.split()]


def seconds(span: str) -> float:
    """A systemd time span such as `8h`, `20min`, `1h 30min`, `90` (seconds)."""
    units = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[suffix or "s"]
    return total


def env_file(path: Path) -> dict[str, str]:
    """The subset of systemd's EnvironmentFile syntax the example uses: VAR=value, # comments."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, val = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {line!r}"
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
            val = val[1:-1]
        env[key.strip()] = val
    return env


def expand(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart expansion: `$VAR` alone as a word is split at whitespace (zero or more arguments,
    quotes grouping); `${VAR}` is replaced in place and stays one argument, even when empty."""
    argv: list[str] = []
    for word in shlex.split(command):
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare:
            argv.extend(shlex.split(env.get(bare.group(1), "")))
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


def unit_environment(unit: Unit) -> dict[str, str]:
    """The unit's Environment= assignments (defaults the EnvironmentFile overrides)."""
    env: dict[str, str] = {}
    for assignment in values(unit, "Service", "Environment"):
        for item in shlex.split(assignment):
            key, _, val = item.partition("=")
            env[key] = val
    return env


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE)


@pytest.fixture(scope="module")
def timer() -> Unit:
    return parse_unit(TIMER)


# --- the service -------------------------------------------------------------------------------
def test_service_is_oneshot_with_the_env_file_and_state(service: Unit) -> None:
    assert value(service, "Service", "Type") == "oneshot"
    # No "-" prefix: a missing env file must fail the unit, not evacuate with defaults.
    assert values(service, "Service", "EnvironmentFile") == ["/etc/orchestrator/evacuate.env"]
    env = unit_environment(service)
    assert env["ORCH_JOURNAL"] == "/var/lib/orchestrator/journal.sqlite"
    assert value(service, "Service", "StateDirectory") == "orchestrator"


def test_execstart_keeps_single_values_whole_and_splits_the_option_lists(service: Unit) -> None:
    (command,) = values(service, "Service", "ExecStart")
    argv = shlex.split(command)
    assert argv[:2] == ["/usr/local/bin/orchestrator", "evacuate"]
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)}
    # ${VAR}: one argument each, directly after its option.
    assert pairs["-c"] == "${SOURCE_URI}"
    assert pairs["--concurrency"] == "${CONCURRENCY}"
    assert pairs["--policy"] == "${POLICY}"
    # $VAR standing alone: split at whitespace into several options.
    assert "$TO_ARGS" in argv
    assert "$EXTRA_ARGS" in argv
    assert "${TO_ARGS}" not in command
    assert "${EXTRA_ARGS}" not in command


def test_exit_statuses(service: Unit) -> None:
    success = words(service, "Service", "SuccessExitStatus")
    assert "6" in success  # nothing to move is fine
    assert "8" not in success  # host not empty must show as failed
    assert "130" not in success


def test_stop_lets_the_orchestrator_clean_up(service: Unit) -> None:
    assert value(service, "Service", "KillMode") == "mixed"
    assert value(service, "Service", "KillSignal") == "SIGTERM"
    start = value(service, "Service", "TimeoutStartSec")
    assert start is not None
    assert start == "infinity" or seconds(start) >= 2 * 3600
    stop = value(service, "Service", "TimeoutStopSec")
    assert stop is not None
    assert seconds(stop) >= 5 * 60  # running migrations finish after the first SIGTERM
    # After TimeoutStopSec a second SIGTERM (abort running migrations, undrain), not SIGKILL.
    assert value(service, "Service", "TimeoutStopFailureMode") == "abort"
    assert value(service, "Service", "WatchdogSignal") == "SIGTERM"
    assert value(service, "Service", "TimeoutAbortSec") is not None


def test_ordering_after_libvirt_and_network(service: Unit) -> None:
    for unit in ("libvirtd.service", "virtqemud.service", "network-online.target"):
        assert unit in words(service, "Unit", "After")
        assert unit in words(service, "Unit", "Wants")


def test_journald_logging(service: Unit) -> None:
    assert value(service, "Service", "StandardOutput") == "journal"
    assert value(service, "Service", "StandardError") in (None, "journal", "inherit")
    assert value(service, "Service", "SyslogIdentifier") == "orchestrator-evacuate"


def test_hardening_keeps_libvirt_state_ssh_and_devices_usable(service: Unit) -> None:
    protect = value(service, "Service", "ProtectSystem")
    assert protect in ("yes", "full", "strict")
    if protect == "strict":
        assert "/var/lib/orchestrator" in words(service, "Service", "ReadWritePaths")
    assert value(service, "Service", "User") in (None, "root")  # libvirt's system socket
    assert value(service, "Service", "ProtectHome") in (None, "no", "false")  # /root/.ssh for qemu+ssh
    assert value(service, "Service", "PrivateDevices") in (None, "no", "false")  # /dev/infiniband
    assert value(service, "Service", "PrivateNetwork") in (None, "no", "false")
    assert value(service, "Service", "RestrictAddressFamilies") is None
    assert value(service, "Service", "NoNewPrivileges") == "yes"


# --- the timer ---------------------------------------------------------------------------------
def test_timer_schedule_and_name(timer: Unit) -> None:
    assert TIMER.stem == SERVICE.stem
    assert value(timer, "Timer", "Unit") in (None, SERVICE.name)
    assert values(timer, "Timer", "OnCalendar") == ["Sun *-*-* 02:00:00"]
    assert value(timer, "Timer", "Persistent") == "true"
    delay = value(timer, "Timer", "RandomizedDelaySec")
    assert delay is not None
    assert 0 < seconds(delay) <= 3600
    assert words(timer, "Install", "WantedBy") == ["timers.target"]
    assert "systemctl edit orchestrator-evacuate.timer" in TIMER.read_text()


# --- the env file through systemd's expansion into the real CLI ---------------------------------
def evacuate_command() -> Any:
    """The Click command behind `orchestrator evacuate` (Typer may vendor Click: no import of it)."""
    return typer.main.get_command(app).commands["evacuate"]  # type: ignore[attr-defined]


def test_example_env_file_expands_to_a_command_line_the_cli_accepts(service: Unit) -> None:
    env = unit_environment(service) | env_file(ENV_EXAMPLE)
    for key in ("SOURCE_URI", "TO_ARGS", "CONCURRENCY", "POLICY", "EXTRA_ARGS"):
        assert key in env_file(ENV_EXAMPLE), f"{ENV_EXAMPLE.name} does not set {key}"
    (command,) = values(service, "Service", "ExecStart")
    argv = expand(command, env)
    assert argv == [
        "/usr/local/bin/orchestrator",
        "evacuate",
        "-c",
        "qemu:///system",
        "--to",
        "qemu+ssh://b.example.org/system",
        "--to",
        "qemu+ssh://c.example.org/system",
        "--concurrency",
        "2",
        "--policy",
        "rdma-drain",
        "--per-destination",
        "1",
    ]
    # Parsed (not run) by the real `orchestrator evacuate`: every option exists and takes its value.
    ctx = evacuate_command().make_context("evacuate", argv[2:])
    assert ctx.params["to"] == ["qemu+ssh://b.example.org/system", "qemu+ssh://c.example.org/system"]
    assert ctx.params["connect"] == "qemu:///system"
    assert ctx.params["concurrency"] == 2
    assert ctx.params["per_destination"] == 1
    assert ctx.params["policy"] == "rdma-drain"


def test_missing_destinations_are_bad_input(service: Unit, capsys: pytest.CaptureFixture[str]) -> None:
    """An env file without TO_ARGS: the unit's defaults leave no --to, and the CLI exits 2."""
    (command,) = values(service, "Service", "ExecStart")
    argv = expand(command, unit_environment(service))
    assert "--to" not in argv
    with pytest.raises(SystemExit) as exc:
        main(argv[1:])
    assert exc.value.code == 2
    assert "--to" in capsys.readouterr().err


def systemd_unescape(command: str) -> list[str]:
    """An Exec line as systemd hands it over when it holds no variable: `$$` is a literal `$`."""
    assert re.search(r"(?<!\$)\$(?!\$)", command.replace("$$", "")) is None, "a variable systemd would expand"
    return shlex.split(command.replace("$$", "$"))


@pytest.mark.parametrize("empty", ["SOURCE_URI", "CONCURRENCY", "POLICY"])
def test_an_empty_single_word_setting_is_named_before_the_orchestrator_runs(
    service: Unit, empty: str
) -> None:
    """`SOURCE_URI=` in the env file: ExecStartPre says which setting, in one line, and exits 2."""
    check, _recover = values(service, "Service", "ExecStartPre")
    argv = systemd_unescape(check)
    assert argv[0] == "/bin/sh"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **unit_environment(service),
        **env_file(ENV_EXAMPLE),
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), "the shipped example passes"
    done = subprocess.run(
        argv, env={**env, empty: ""}, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"<3>orchestrator: error: {empty} is empty in /etc/orchestrator/evacuate.env; "
        "set it, or delete the line to use the default\n"
    )


def test_an_empty_source_uri_reaching_the_cli_is_bad_input(
    service: Unit, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the unit's check (a drop-in replacing it, or by hand): `-c ''` is not qemu:///system."""
    (command,) = values(service, "Service", "ExecStart")
    argv = expand(command, unit_environment(service) | env_file(ENV_EXAMPLE) | {"SOURCE_URI": ""})
    assert argv[2:4] == ["-c", ""]
    with pytest.raises(SystemExit) as exc:
        main(argv[1:])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: error: the source URI (-c/--connect) is empty; ")
    assert len(err.splitlines()) == 1


def test_an_empty_destination_is_bad_input_naming_to(
    service: Unit, capsys: pytest.CaptureFixture[str]
) -> None:
    """TO_ARGS=--to '' (or a --to whose value went missing) reaches the CLI as an empty --to."""
    (command,) = values(service, "Service", "ExecStart")
    env = unit_environment(service) | env_file(ENV_EXAMPLE) | {"TO_ARGS": "--to qemu+ssh://b/system --to ''"}
    argv = expand(command, env)
    with pytest.raises(SystemExit) as exc:
        main(argv[1:])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: error: --to is empty (destination 2 of 2); ")
    assert len(err.splitlines()) == 1


# --- the template: one instance per host -------------------------------------------------------
# What only the single unit may differ in from an instance of the template; all the rest (ordering,
# ExecStart, SuccessExitStatus, timeouts, stop behaviour, logging, state, hardening) is the same.
PER_INSTANCE = {
    ("Unit", "Description"),
    ("Service", "Environment"),
    ("Service", "EnvironmentFile"),
    ("Service", "ExecStartPre"),
    ("Service", "SyslogIdentifier"),
}


def settings_but(unit: Unit, skipped: set[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The unit's assignments, section by section, without the `skipped` (section, key) pairs."""
    return {
        section: sorted((k, v) for k, v in pairs if (section, k) not in skipped)
        for section, pairs in unit.items()
    }


def test_an_instance_is_the_single_unit_for_the_host_its_file_names(service: Unit) -> None:
    hv1 = parse_unit(TEMPLATE, "hv1")
    assert settings_but(hv1, PER_INSTANCE) == settings_but(service, PER_INSTANCE)
    assert values(hv1, "Service", "ExecStart") == values(service, "Service", "ExecStart")
    assert words(hv1, "Service", "SuccessExitStatus") == words(service, "Service", "SuccessExitStatus")
    # Its own file, required ("-" would evacuate with defaults when it is missing), and no default
    # source: an instance whose file forgets SOURCE_URI must not evacuate this machine.
    assert values(hv1, "Service", "EnvironmentFile") == ["/etc/orchestrator/evacuate-hv1.env"]
    assert unit_environment(hv1) == unit_environment(service) | {"SOURCE_URI": ""}
    assert unit_environment(service)["SOURCE_URI"] == "qemu:///system"
    check, recover = values(hv1, "Service", "ExecStartPre")
    assert recover == values(service, "Service", "ExecStartPre")[-1] == f"{ORCHESTRATOR} recover"
    assert "/etc/orchestrator/evacuate-hv1.env" in check
    # Each instance's runs on their own in the journal: journalctl -u orchestrator-evacuate@hv1, or -t.
    assert value(hv1, "Service", "SyslogIdentifier") == "orchestrator-evacuate@hv1"
    assert "hv1" in (value(hv1, "Unit", "Description") or "")
    assert (
        value(parse_unit(TEMPLATE, "hv2"), "Service", "EnvironmentFile")
        == "/etc/orchestrator/evacuate-hv2.env"
    )


def test_each_instance_has_a_timer_of_its_own(timer: Unit) -> None:
    hv1 = parse_unit(TEMPLATE_TIMER, "hv1")
    assert TEMPLATE_TIMER.stem == TEMPLATE.stem
    assert value(hv1, "Timer", "Unit") == "orchestrator-evacuate@hv1.service"
    # The weekly timer's schedule and behaviour by default; a drop-in per instance changes it.
    skipped = {("Unit", "Description"), ("Timer", "Unit")}
    assert settings_but(hv1, skipped) == settings_but(timer, skipped)
    assert "hv1" in (value(hv1, "Unit", "Description") or "")
    # Enabling the bare template must fail: a timer evacuates a host the admin named.
    assert value(hv1, "Install", "DefaultInstance") is None
    assert "systemctl edit orchestrator-evacuate@hv1.timer" in TEMPLATE_TIMER.read_text()


def test_the_instance_example_expands_to_a_command_line_the_cli_accepts() -> None:
    hv1 = parse_unit(TEMPLATE, "hv1")
    example = env_file(INSTANCE_ENV_EXAMPLE)
    assert set(example) == set(env_file(ENV_EXAMPLE)), "the single unit's variables, no more, no fewer"
    (command,) = values(hv1, "Service", "ExecStart")
    argv = expand(command, unit_environment(hv1) | example)
    assert argv[:2] == [ORCHESTRATOR, "evacuate"]
    ctx = evacuate_command().make_context("evacuate", argv[2:])
    assert ctx.params["connect"] == example["SOURCE_URI"]
    assert urlsplit(ctx.params["connect"]).hostname, "an instance evacuates a host it names"
    assert ctx.params["to"] == shlex.split(example["TO_ARGS"])[1::2]
    assert len(ctx.params["to"]) == 2
    assert ctx.params["policy"] == example["POLICY"]
    assert ctx.params["per_destination"] == 1


def run_check(check: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """An ExecStartPre shell check, run as systemd would with `env` (the unit's and the file's)."""
    argv = systemd_unescape(check)
    assert argv[0] == "/bin/sh"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(
    ("setting", "given"),
    [("SOURCE_URI", None), ("SOURCE_URI", ""), ("CONCURRENCY", ""), ("POLICY", "")],
    ids=["no-source-line", "empty-source", "empty-concurrency", "empty-policy"],
)
def test_an_instance_names_its_own_file_and_needs_a_source(setting: str, given: str | None) -> None:
    """A missing SOURCE_URI line: the single unit evacuates this machine (qemu:///system), an instance
    stops with one line naming its file, exit 2, as for an empty setting."""
    hv1 = parse_unit(TEMPLATE, "hv1")
    check, _recover = values(hv1, "Service", "ExecStartPre")
    example = env_file(INSTANCE_ENV_EXAMPLE)
    done = run_check(check, unit_environment(hv1) | example)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), "the shipped example passes"
    settings = dict(example)
    if given is None:
        del settings[setting]
        single, _ = values(parse_unit(SERVICE), "Service", "ExecStartPre")
        without = {k: v for k, v in env_file(ENV_EXAMPLE).items() if k != setting}
        assert run_check(single, unit_environment(parse_unit(SERVICE)) | without).returncode == 0
    else:
        settings[setting] = given
    done = run_check(check, unit_environment(hv1) | settings)
    assert done.returncode == 2
    fix = (
        "set it to the URI of the host to evacuate, e.g. qemu+ssh://hv1/system (an instance has no default)"
        if setting == "SOURCE_URI"
        else "set it, or delete the line to use the default"
    )
    assert (
        done.stderr
        == f"<3>orchestrator: error: {setting} is empty in /etc/orchestrator/evacuate-hv1.env; {fix}\n"
    )


# --- exit codes: what `orchestrator evacuate` does, what the units count as success, the README --
# `orchestrator evacuate` as the units run it, with only the libvirt edge (orchestrator.edges.virt) faked:
# hosts by name, their node memory and running VMs. Planning, the exit code and the output are real.
FAKE_LIBVIRT_EDGE = r"""
import sys, types
from urllib.parse import urlsplit

HOSTS = {
    "empty.example.org": (65536, []),
    "db.example.org": (65536, [("db1", 4096)]),
    "big.example.org": (65536, [("huge", 1 << 20)]),
    "dest.example.org": (32768, []),
}


class Host:
    def __init__(self, uri):
        self.memory_mib, vms = HOSTS[urlsplit(uri).hostname]
        self.vms = [
            types.SimpleNamespace(
                name=n, uuid=f"uuid-{n}", state="running", active=True, persistent=True, memory_kib=m * 1024
            )
            for n, m in vms
        ]

    @classmethod
    def open(cls, uri, *, keepalive=True):
        return cls(uri)

    def identity(self):
        return frozenset((d.uuid, i) for i, d in enumerate(self.vms, 1))

    def domains(self):
        return list(self.vms)

    def node_memory_mib(self):
        return self.memory_mib

    def close(self):
        pass


virt = types.ModuleType("orchestrator.edges.virt")
virt.Host = Host
sys.modules["orchestrator.edges.virt"] = virt
sys.argv[0] = "orchestrator"
from orchestrator.commands.program import entry

entry()
"""


def run_evacuation(tmp_path: Path, settings: dict[str, str]) -> tuple[int, str]:
    """An instance's ExecStart, expanded with the shipped instance example and `settings`, run; its exit
    code and its stdout and stderr together (as the journal has them)."""
    hv1 = parse_unit(TEMPLATE, "hv1")
    (command,) = values(hv1, "Service", "ExecStart")
    argv = expand(command, unit_environment(hv1) | env_file(INSTANCE_ENV_EXAMPLE) | settings)
    assert argv[0] == ORCHESTRATOR
    env = {
        **os.environ,
        "ORCH_JOURNAL": str(tmp_path / "journal.sqlite"),
        "ORCH_RUNTIME_DIR": str(tmp_path / "run"),
        "PYTHONUNBUFFERED": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", FAKE_LIBVIRT_EDGE, *argv[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def readme_exit_codes() -> dict[int, tuple[str, str]]:
    """The README's exit-code table: code -> (meaning, what the unit makes of it)."""
    rows: dict[int, tuple[str, str]] = {}
    for line in README.read_text().splitlines():
        row = re.fullmatch(r"\| ([\d, ]+) \| (.+) \| (.+) \|", line)
        if row:
            for code in row.group(1).split(","):
                rows[int(code)] = (row.group(2), row.group(3))
    return rows


def counted_as_success(unit: Unit, code: int) -> bool:
    """Whether systemd counts the main process's exit `code` as success (Type=oneshot: 0 and these)."""
    return code == 0 or str(code) in words(unit, "Service", "SuccessExitStatus")


@pytest.mark.parametrize(
    ("source", "extra", "code", "success"),
    [
        ("empty.example.org", "", 0, True),  # already empty: nothing to move, and it is empty
        ("db.example.org", "--include web-*", 6, True),  # no VM matches at all: nothing to do
        ("big.example.org", "", 8, False),  # a VM fits nowhere: the host is not empty
    ],
    ids=["already-empty", "include-matches-nothing", "not-empty"],
)
def test_the_exit_code_of_an_evacuation_is_what_the_readme_and_the_units_say(
    tmp_path: Path, service: Unit, source: str, extra: str, code: int, success: bool
) -> None:
    settings = {
        "SOURCE_URI": f"qemu+ssh://{source}/system",
        "TO_ARGS": "--to qemu+ssh://dest.example.org/system",
        "EXTRA_ARGS": extra,
    }
    exit_code, output = run_evacuation(tmp_path, settings)
    assert exit_code == code, output
    for unit in (service, parse_unit(TEMPLATE, "hv1")):
        assert counted_as_success(unit, exit_code) is success
    meaning, verdict = readme_exit_codes()[exit_code]
    assert verdict.startswith("success" if success else "failed"), verdict
    # What the README quotes for this code is what the program printed.
    for quote in re.findall(r"`([^`]*…[^`]*)`", meaning):
        for fragment in filter(None, (part.strip() for part in quote.split("…"))):
            assert fragment in output, (fragment, output)


def test_the_readme_exit_code_table_is_what_the_units_count_as_success(service: Unit) -> None:
    rows = readme_exit_codes()
    assert {0, 1, 2, 3, 6, 8, 9, 130} <= set(rows)
    documented = {code for code, (_meaning, verdict) in rows.items() if verdict.startswith("success")}
    for unit in (service, parse_unit(TEMPLATE, "hv1")):
        assert documented == {code for code in rows if counted_as_success(unit, code)}
    assert "already" in rows[0][0], "an already empty host is exit 0"
    assert "--include" in rows[6][0], "6 is an --include matching no VM, not an empty host"
    for unit_file in (SERVICE, TEMPLATE):
        comment = unit_file.read_text().split("\n[Unit]")[0]
        assert re.search(r"^#   0 .*already", comment, re.MULTILINE), unit_file.name
        assert re.search(r"^#   6 .*--include", comment, re.MULTILINE), unit_file.name


# --- the README's examples against the files shipped here ----------------------------------------
SHIPPED = sorted(path.name for path in SYSTEMD_DIR.iterdir() if path.name != README.name)


def unit_file_for(name: str) -> Path | None:
    """The file shipped here that systemd would load unit `name` from: its own, or its template's."""
    if name in SHIPPED:
        return SYSTEMD_DIR / name
    template = re.fullmatch(r"([\w.-]+@)[^@/]+(\.service|\.timer)", name)
    if template and template.group(1) + template.group(2) in SHIPPED:
        return SYSTEMD_DIR / (template.group(1) + template.group(2))
    return None


def instance_of(name: str) -> str | None:
    """The instance name of unit `name`, None if it has none."""
    return name.partition("@")[2].rpartition(".")[0] if "@" in name else None


def systemd_run_examples() -> list[tuple[dict[str, list[str]], list[str]]]:
    """The README's `systemd-run` commands, continuation lines joined, split as a shell would: each as
    its options (`--name=value`) and the command it runs."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith("systemd-run "):
                continue
            argv = shlex.split(line, comments=True)
            options: dict[str, list[str]] = {}
            while len(argv) > 1 and argv[1].startswith("--"):
                name, _, given = argv.pop(1)[2:].partition("=")
                options.setdefault(name, []).append(given)
            found.append((options, argv[1:]))
    return found


def test_the_readme_installs_every_file_shipped_here_and_names_no_other() -> None:
    text = README.read_text()
    named = set(re.findall(r"deploy/systemd/([\w@.-]*\w)", text))
    assert named == set(SHIPPED)
    for name in SHIPPED:
        assert f"`{name}`" in text, f"{name} not in the README's table"


def test_every_unit_and_env_file_the_readme_names_is_shipped_an_instance_or_the_one_off() -> None:
    text = README.read_text()
    transient = {options["unit"][0] for options, _command in systemd_run_examples()}
    names = set(re.findall(r"\b(orchestrator-[\w@.*…-]+?\.(?:service|timer))\b", text))
    assert {"orchestrator-evacuate@hv1.service", "orchestrator-evacuate@hv1.timer"} <= names
    for name in names:
        stem = name.rpartition(".")[0]
        assert unit_file_for(name) or stem in transient, f"the README names {name}: no such unit here"
    single = value(parse_unit(SERVICE), "Service", "EnvironmentFile")
    (per_instance,) = values(parse_unit(TEMPLATE, "INSTANCE"), "Service", "EnvironmentFile")
    pattern = re.escape(per_instance).replace("INSTANCE", r"[\w.$-]+")
    env_files = set(re.findall(r"/etc/orchestrator/[\w.$-]+\.env", text))
    assert single in env_files
    assert "/etc/orchestrator/evacuate-hv1.env" in env_files
    for path in env_files:
        assert path == single or re.fullmatch(pattern, path), f"no unit reads {path}"


def test_the_readme_schedules_one_window_once_through_the_installed_unit() -> None:
    text = README.read_text()
    examples = systemd_run_examples()
    assert examples, "no systemd-run example in the README"
    for options, command in examples:
        (name,) = options["unit"]
        (spec,) = options["on-calendar"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?", spec), f"{spec!r} is not one date: not once"
        # systemd refuses a transient unit whose name has a unit file (its own or a template's).
        for suffix in (".timer", ".service"):
            assert unit_file_for(name + suffix) is None, f"{name}{suffix} has a unit file here"
        # It starts the installed service: its env file, its checks, `orchestrator recover` first.
        assert command[:2] == ["systemctl", "start"] and len(command) == 3, command
        path = unit_file_for(command[2])
        assert path is not None and path.suffix == ".service", command[2]
        unit = parse_unit(path, instance_of(command[2]))
        assert values(unit, "Service", "ExecStartPre")[-1] == f"{ORCHESTRATOR} recover"
        assert len(values(unit, "Service", "EnvironmentFile")) == 1
        assert value(unit, "Service", "Type") == "oneshot", "systemctl start returns when it has ended"
        # Gone once it fired: the name can be used again; listed and cancelled by its timer.
        assert "RemainAfterElapse=no" in options.get("timer-property", [])
        assert "collect" in options
        assert f"systemctl list-timers {name}.timer" in text
        assert f"systemctl stop {name}.timer" in text
        assert f"systemd-analyze calendar '{spec}'" in text, "check the date first"


def test_the_readme_shows_the_template_for_several_hosts() -> None:
    text = README.read_text()
    for needle in (
        "install -D -m 0640 deploy/systemd/evacuate-instance.env.example "
        "/etc/orchestrator/evacuate-$host.env",
        "systemctl enable --now orchestrator-evacuate@hv1.timer",
        "systemctl edit orchestrator-evacuate@hv1.timer",
        "systemctl list-timers 'orchestrator-evacuate@*'",
        "systemctl start orchestrator-evacuate@hv1.service",
        "systemctl status 'orchestrator-evacuate@*.service'",
        "journalctl -u orchestrator-evacuate@hv1",
        "journalctl -u 'orchestrator-evacuate@*'",
    ):
        assert needle in text, needle


def test_readme_documents_install_logs_and_exit_codes() -> None:
    text = README.read_text()
    for needle in (
        "/etc/systemd/system",
        "/etc/orchestrator/evacuate.env",
        "/usr/local/bin/orchestrator",
        "systemctl enable --now orchestrator-evacuate.timer",
        "systemctl start orchestrator-evacuate.service",
        "journalctl -u orchestrator-evacuate",
        "systemctl edit orchestrator-evacuate",
    ):
        assert needle in text, needle
    for code in ("0", "2", "3", "6", "8", "130"):
        assert re.search(rf"^\| {code} \|", text, re.MULTILINE), f"exit code {code} not in the table"


# --- systemd-analyze ---------------------------------------------------------------------------
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "systemd-analyze is not installed (Debian: apt-get install systemd)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return tool


# Verified: the units, the templates, one instance of them (loaded from the template in the same
# directory, as systemd does), and the README's one-off as the unit files systemd-run would create.
VERIFIED = [
    SERVICE.name,
    TIMER.name,
    RECOVER.name,
    TEMPLATE.name,
    TEMPLATE_TIMER.name,
    "orchestrator-evacuate@hv1.service",
    "orchestrator-evacuate@hv1.timer",
]


def verify(directory: Path, extra: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """`systemd-analyze verify` on the copies in `directory`; its exit code and the lines about them."""
    tool = systemd_analyze()
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "LC_ALL": "C", "SYSTEMD_PAGER": ""}
    done = subprocess.run(
        [tool, "verify", "--man=no", *(str(directory / name) for name in [*VERIFIED, *extra])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    output = (done.stdout + done.stderr).splitlines()
    # Keep what concerns our units; warnings about unrelated system units are not ours to fix.
    ours = [line for line in output if str(directory) in line or "orchestrator-" in line]
    return done.returncode, ours


def copy_units(directory: Path) -> None:
    """The units with ExecStart's program replaced by an existing binary (verify checks it exists)."""
    true = shutil.which("true") or "/bin/true"
    for unit in (SERVICE, RECOVER, TEMPLATE):
        text = unit.read_text()
        assert text.count("ExecStart=/usr/local/bin/orchestrator ") == 1
        text = text.replace("ExecStart=/usr/local/bin/orchestrator ", f"ExecStart={true} ")
        (directory / unit.name).write_text(
            text.replace("ExecStartPre=/usr/local/bin/orchestrator ", f"ExecStartPre={true} ")
        )
    shutil.copy(TIMER, directory / TIMER.name)
    shutil.copy(TEMPLATE_TIMER, directory / TEMPLATE_TIMER.name)


def one_off_units(directory: Path) -> tuple[str, ...]:
    """The README's systemd-run examples as the transient units they create: NAME.timer with the
    calendar and timer properties, NAME.service running the command; their names."""
    written: list[str] = []
    for options, command in systemd_run_examples():
        (name,) = options["unit"]
        common = [f"Description={d}" for d in options.get("description", [])]
        common += ["CollectMode=inactive-or-failed"] if "collect" in options else []
        timer = ["[Unit]", *common, "[Timer]", *(f"OnCalendar={spec}" for spec in options["on-calendar"])]
        timer += options.get("timer-property", [])
        program = shutil.which(command[0]) or shutil.which("true") or "/bin/true"  # systemd-run resolves it
        service = ["[Unit]", *common, "[Service]", f"ExecStart={shlex.join([program, *command[1:]])}"]
        service += options.get("property", [])
        (directory / f"{name}.timer").write_text("\n".join(timer) + "\n")
        (directory / f"{name}.service").write_text("\n".join(service) + "\n")
        written += [f"{name}.timer", f"{name}.service"]
    assert written, "no systemd-run example in the README"
    return tuple(written)


def test_evacuations_and_boots_recover_first() -> None:
    """A scheduled evacuation finishes what a dead orchestrator left undone before moving anything, and
    so does every boot; both run the real CLI command, which accepts the arguments."""
    service = parse_unit(SERVICE)
    pre = values(service, "Service", "ExecStartPre")
    assert pre[-1] == "/usr/local/bin/orchestrator recover", pre
    recover = parse_unit(RECOVER)
    assert value(recover, "Service", "Type") == "oneshot"
    assert value(recover, "Install", "WantedBy") == "multi-user.target"
    command = value(recover, "Service", "ExecStart")
    assert command is not None and command.split()[:2] == ["/usr/local/bin/orchestrator", "recover"]
    assert "libvirtd.service" in words(recover, "Unit", "After")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    copy_units(tmp_path)
    code, ours = verify(tmp_path, one_off_units(tmp_path))
    assert ours == []
    assert code == 0


@pytest.mark.parametrize("unit", [SERVICE, TEMPLATE], ids=lambda path: path.name)
def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path, unit: Path) -> None:
    """The check above is not vacuous: a misspelt key and a bad time span are reported."""
    copy_units(tmp_path)
    broken = tmp_path / unit.name
    broken.write_text(
        broken.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillModee=x\nTimeoutStopSec=soon")
    )
    _, ours = verify(tmp_path)
    assert any("KillModee" in line for line in ours), ours
    assert any("soon" in line for line in ours), ours


def test_systemd_analyze_verify_reports_a_bad_one_off_timer_property(tmp_path: Path) -> None:
    """The one-off's timer properties are checked as a timer's settings: a wrong one is reported."""
    copy_units(tmp_path)
    names = one_off_units(tmp_path)
    timer = tmp_path / names[0]
    assert timer.suffix == ".timer"
    timer.write_text(timer.read_text().replace("RemainAfterElapse=", "RemainAfterExit="))
    _, ours = verify(tmp_path, names)
    assert any("RemainAfterExit" in line for line in ours), ours


def test_systemd_analyze_calendar(timer: Unit) -> None:
    """Every schedule shipped, and the README's one-off date, parse (whether that date is still to come
    is the admin's to check: not asserted)."""
    tool = systemd_analyze()
    specs = [
        *values(timer, "Timer", "OnCalendar"),
        *values(parse_unit(TEMPLATE_TIMER, "hv1"), "Timer", "OnCalendar"),
    ]
    specs += [spec for options, _command in systemd_run_examples() for spec in options["on-calendar"]]
    assert len(specs) >= 3
    for spec in specs:
        done = subprocess.run(
            [tool, "calendar", spec], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "Next elapse:" in done.stdout
