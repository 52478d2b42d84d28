"""The systemd service and timer for scheduled evacuations (deploy/systemd).

The unit files are parsed with a tiny parser (systemd allows repeated keys, and an empty
assignment resets a list), the ExecStart line is expanded with the shipped example env file as
systemd would and parsed by the real CLI, and `systemd-analyze verify` checks both units when the
tool is installed (it works offline, without systemd running as PID 1).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer

from orchestrator.cli import app, main

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVICE = SYSTEMD_DIR / "orchestrator-evacuate.service"
RECOVER = SYSTEMD_DIR / "orchestrator-recover.service"
TIMER = SYSTEMD_DIR / "orchestrator-evacuate.timer"
ENV_EXAMPLE = SYSTEMD_DIR / "evacuate.env.example"
README = SYSTEMD_DIR / "README.md"

Unit = dict[str, list[tuple[str, str]]]


# --- a tiny unit-file parser ---------------------------------------------------------------------
def parse_unit(path: Path) -> Unit:
    """Sections to their (key, value) pairs in file order; repeated keys kept, continuations joined."""
    unit: Unit = {}
    section: str | None = None
    pending = ""
    for raw in path.read_text().splitlines():
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


def verify(directory: Path) -> tuple[int, list[str]]:
    """`systemd-analyze verify` on the copies in `directory`; its exit code and the lines about them."""
    tool = systemd_analyze()
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "warning", "LC_ALL": "C", "SYSTEMD_PAGER": ""}
    done = subprocess.run(
        [
            tool,
            "verify",
            "--man=no",
            str(directory / SERVICE.name),
            str(directory / TIMER.name),
            str(directory / RECOVER.name),
        ],
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
    for unit in (SERVICE, RECOVER):
        text = unit.read_text()
        assert text.count("ExecStart=/usr/local/bin/orchestrator ") == 1
        text = text.replace("ExecStart=/usr/local/bin/orchestrator ", f"ExecStart={true} ")
        (directory / unit.name).write_text(
            text.replace("ExecStartPre=/usr/local/bin/orchestrator ", f"ExecStartPre={true} ")
        )
    shutil.copy(TIMER, directory / TIMER.name)


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
    code, ours = verify(tmp_path)
    assert ours == []
    assert code == 0


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a bad time span are reported."""
    copy_units(tmp_path)
    broken = tmp_path / SERVICE.name
    broken.write_text(
        broken.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillModee=x\nTimeoutStopSec=soon")
    )
    _, ours = verify(tmp_path)
    assert any("KillModee" in line for line in ours), ours
    assert any("soon" in line for line in ours), ours


def test_systemd_analyze_calendar(timer: Unit) -> None:
    tool = systemd_analyze()
    for spec in values(timer, "Timer", "OnCalendar"):
        done = subprocess.run(
            [tool, "calendar", spec], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert "Next elapse:" in done.stdout
