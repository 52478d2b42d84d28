"""Option values converted without Pydantic.

Typer >= 0.22 converts every option value (bool flags excepted) with a Pydantic TypeAdapter: the first
one imports Pydantic, a large part of every command's start (and of what `orchestrator migrate` costs
over `virsh migrate`). Our options are plain: str, int, float, bool, Path, Enum choices, list[str],
with no parser, range or file checks of Typer's own. `install()` has those converted here, in the
CLI's own words ("'x' is not a whole number"), and leaves any other annotation, and any Typer that
does not work this way, to Typer. It reaches into Typer's internals, so every step is guarded: if they
move, Typer converts as before (slower, same results).
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any, get_args, get_origin

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def _leaf(annotation: Any, value: Any) -> Any:
    """`value` (a string from the command line or the environment) as `annotation`; ValueError with
    the CLI's wording when it is not one."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if annotation is str:
        return str(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{value!r} is not a yes/no value (true, false, 1, 0, yes, no)")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        try:
            if "_" in text:  # Python's own syntax ('1_000'), not a number's
                raise ValueError
            whole, dot, zeros = text.partition(".")
            if dot and zeros.strip("0") == "" and whole.lstrip("+-").isdigit():
                return int(whole)  # '3.0', as Typer's Pydantic took it
            return int(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        text = str(value).strip()
        try:
            if "_" in text:
                raise ValueError
            return float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    if annotation is Path:
        return value if isinstance(value, Path) else Path(value)
    raise TypeError(annotation)  # pragma: no cover - filtered by _simple


def _simple(annotation: Any) -> bool:
    if annotation in (str, bool, int, float, Path):
        return True
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return True
    if get_origin(annotation) is list:
        (item,) = get_args(annotation) or (None,)
        return item in (str, int, float, Path)
    return False


def install() -> bool:
    """Convert our options' values here instead of through Pydantic; whether it took."""
    try:
        from typer import _coercion, core
        from typer._click.exceptions import BadParameter
        from typer._param_types import coerce_cli_choice, coerce_cli_path
    except ImportError:  # an older Typer (no Pydantic there) or a newer layout: Typer's own way
        return False
    original = getattr(core, "build_runtime_param", None)
    base = getattr(_coercion, "RuntimeParam", None)
    if getattr(original, "_orchestrator", False):
        return True  # installed already
    if original is None or base is None:
        return False

    class PlainRuntimeParam(base):  # type: ignore[misc,valid-type]
        """Conversion of a plain annotation, as Typer's adapters would, without Pydantic."""

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            annotation: Any = self.annotation
            info = self.parameter_info
            try:
                if get_origin(annotation) is list:
                    (item,) = get_args(annotation)
                    values = value if isinstance(value, (list, tuple)) else [value]
                    return [self._one(item, v, info, param, ctx) for v in values]
                return self._one(annotation, value, info, param, ctx)
            except ValueError as exc:
                raise BadParameter(str(exc).rstrip("."), ctx=ctx, param=param) from None

        @staticmethod
        def _one(annotation: Any, value: Any, info: Any, param: Any, ctx: Any) -> Any:
            if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
                return coerce_cli_choice(
                    value, choices=tuple(annotation), case_sensitive=info.case_sensitive, ctx=ctx
                )
            result = _leaf(annotation, value)
            if annotation is Path:  # Typer's own checks (exists=, dir_okay=, ...), given a Path
                return coerce_cli_path(result, info, path_type=Path, param=param, ctx=ctx)
            return result

    def build_runtime_param(descriptor: Any) -> Any:
        info = descriptor.parameter_info
        plain = (
            descriptor.file_annotation is None
            and getattr(info, "parser", None) is None
            and getattr(info, "click_type", None) is None
            and getattr(info, "min", None) is None
            and getattr(info, "max", None) is None
            and _simple(descriptor.annotation)
        )
        if not plain:
            return original(descriptor)
        return PlainRuntimeParam(annotation=descriptor.annotation, parameter_info=info)

    build_runtime_param._orchestrator = True  # type: ignore[attr-defined]
    setattr(core, "build_runtime_param", build_runtime_param)  # noqa: B010 - not exported: mypy
    return True
