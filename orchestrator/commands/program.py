"""The `orchestrator` program: the whole command tree, run with every failure as one line and a
documented exit code, and an exit that waits for nothing left to finish."""

from __future__ import annotations

import copy
import importlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer

from orchestrator.commands.app import app
from orchestrator.commands.render import priority
from orchestrator.core.errors import ExitCode, NothingToDo, OrchestratorError

# Importing a command module registers its command(s) on the app: all of them, the commands in the order
# `--help` lists them (the groups, lab and events, are on the app already, in theirs).
COMMAND_MODULES = ("migrate", "migrate_group", "recover", "evacuate", "watch", "history", "lab", "events")
for _module in COMMAND_MODULES:
    importlib.import_module(f"orchestrator.commands.{_module}")


def package_version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("vfio-migration-orchestrator")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        from orchestrator import __version__

        return __version__


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"orchestrator {package_version()}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_show_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Options of `orchestrator` itself (the help text is the app's)."""


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr and the exit code; never a traceback."""
    sys.stderr.write(f"{priority(3)}orchestrator: error: {message}\n")
    raise SystemExit(code)


def _click_exceptions() -> Any:
    """Click's exception classes: Typer >= 0.22 vendors Click, older Typer depends on it."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - depends on the installed Typer
        from click import exceptions  # type: ignore[no-redef,import-not-found,unused-ignore]
    return exceptions


def _in_our_words(exc: Any) -> None:
    """Typer converts option values with Pydantic, whose wording ("Input should be a valid integer,
    unable to parse string as an integer", "Value error, ...") is not ours: say what was wrong with
    the value given, in the CLI's words. Leaves any other error as it is."""
    cause = exc.__cause__
    if type(cause).__name__ != "ValidationError" or not hasattr(exc, "message"):
        return
    try:
        error = cause.errors()[0]
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - another Pydantic
        return
    kind = str(error.get("type", ""))
    value = error.get("input")
    limits = error.get("ctx") or {}
    given = repr(value) if isinstance(value, str) else str(value)
    bounds = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind.startswith("int_"):
        exc.message = f"{given} is not a whole number"
    elif kind.startswith(("float_", "decimal_")):
        exc.message = f"{given} is not a number"
    elif kind in bounds:
        words, key = bounds[kind]
        exc.message = f"must be {words} {limits.get(key)}, not {given}"
    elif kind == "value_error":
        exc.message = str(error.get("msg", "")).removeprefix("Value error, ").rstrip(".")
    elif kind.startswith("bool_"):
        exc.message = f"{given} is not a yes/no value (true, false, 1, 0, yes, no)"


def _command_for(argv: Sequence[str]) -> Any:
    """The Click command tree, built for the command being run only.

    Typer builds the Click command of every function in the app, a part of each start; when the
    first argument names a command or group, a copy of the app holding just that one is built
    instead (Click's "lazily loading subcommands"): the same command, options, help and errors.
    Anything else (options first, no or an unknown command) gets the whole tree.
    """
    first = argv[0] if argv else ""
    if first and not first.startswith("-"):
        commands = [info for info in app.registered_commands if info.name == first]
        groups = [info for info in app.registered_groups if info.name == first]
        if len(commands) + len(groups) == 1:
            one = copy.copy(app)
            one.registered_commands, one.registered_groups = commands, groups
            return typer.main.get_command(one)
    return typer.main.get_command(app)


def entry() -> NoReturn:
    """The `orchestrator` program: `main`, then leave without the interpreter's teardown.

    Only once nothing is left to finish: stdout and stderr flushed, and no thread but daemon ones
    (libvirt's event loop) still running; otherwise the normal exit, which waits for them.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # output piped into a closed reader: nothing more to say
        pass
    except OSError:
        raise SystemExit(code) from None
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning every failure into one line and a documented exit code."""
    command = _command_for(sys.argv[1:] if argv is None else argv)
    click_exc = _click_exceptions()
    try:
        code = command.main(args=argv, prog_name="orchestrator", standalone_mode=False)
    except NothingToDo as exc:
        # Not an error (exit 6 is a success for the systemd unit and Ansible): a notice.
        sys.stderr.write(f"{priority(5)}orchestrator: nothing to do: {exc.line()}\n")
        raise SystemExit(int(exc.code)) from None
    except OrchestratorError as exc:
        fail(exc.line(), int(exc.code))
    except (KeyboardInterrupt, typer.Abort):
        fail("interrupted", ExitCode.INTERRUPTED)
    except click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            # A bare group: its help on stdout, like `--help`. (Typer's rich help printed it itself
            # while building this error, leaving the message empty.)
            help_text = exc.format_message()
            if help_text:
                sys.stdout.write(help_text.rstrip("\n") + "\n")
            raise SystemExit(ExitCode.OK) from None
        _in_our_words(exc)
        hint = f"; see: {exc.ctx.command_path} --help" if exc.ctx else ""
        fail(f"{exc.format_message().rstrip('.')}{hint}", ExitCode.BAD_INPUT)
    except click_exc.ClickException as exc:
        fail(exc.format_message(), ExitCode.BAD_INPUT)
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): quietly stop.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(ExitCode.OK) from None
    except Exception as exc:
        if os.environ.get("ORCH_DEBUG"):
            raise
        fail(
            f"internal error: {exc!r} (set ORCH_DEBUG=1 for a traceback, and please report it)",
            ExitCode.ERROR,
        )
    if code == ExitCode.INTERRUPTED:
        # Typer turns a KeyboardInterrupt (Ctrl-C, or a signal a command made one) into exit 130, which
        # it returns instead of raising when not standalone: that was an exit 0 without a word.
        fail("interrupted", ExitCode.INTERRUPTED)
