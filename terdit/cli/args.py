"""Argument types and flag groups shared by every sub-command (one vocabulary, one validator)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable
from typing import Any, TypeVar

from terdit.defaults import DTYPES

T = TypeVar("T")


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonneg_int(text: str) -> int:
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    """A float that is a number: nan and inf would silently poison sampling or training."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing {what} at --out (never anything else; the replacement is atomic)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="compute dtype (default: bf16 on cuda, fp32 on cpu)")


# -- flags generated from a settings dataclass (fields made with terdit.defaults.setting) -------------------
def add_settings(parser: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = (),
                 group: str | None = None) -> None:
    """One flag per `setting()` field of dataclass `cls` (defaults and help text from the field, so a default
    lives in one place); `exclude`: fields a command sets itself."""
    target: Any = parser.add_argument_group(group) if group else parser
    skip = set(exclude)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if f.name in skip or not f.init or not md or not md.get("cli", True):
            continue
        default: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        required = default is dataclasses.MISSING
        flags, kwargs = _flag_spec(f.name, default, md)
        if md["aliases"]:
            for alias, const in md["aliases"].items():
                target.add_argument(alias, dest=f.name, action="store_const", const=const,
                                    default=argparse.SUPPRESS, help=f"same as {flags[0]} {const}")
        kwargs.setdefault("default", default)
        if required:
            kwargs.pop("default")
            kwargs.setdefault("required", True)
        target.add_argument(*flags, dest=f.name, **kwargs)


def _flag_spec(name: str, default: Any, md: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    dashed = "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = dict(md["argparse"])
    help_text = md["help"]
    if isinstance(default, bool) and md["type"] is None:
        if default:
            return list(md["flags"] or ["--no-" + name.replace("_", "-")]), {
                "action": "store_false", "help": help_text, **kwargs}
        return list(md["flags"] or [dashed]), {"action": "store_true", "help": help_text, **kwargs}
    if md["type"] is not None:
        kwargs["type"] = md["type"]
    if md["choices"] is not None:
        kwargs["choices"] = list(md["choices"])
    shown = "" if default in (None, dataclasses.MISSING) or "%(default)" in help_text else f" (default: {default})"
    kwargs["help"] = (help_text + shown).strip() or None
    return list(md["flags"] or [dashed]), kwargs


def settings_from(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The settings dataclass `cls` from parsed flags (fields without a flag keep their default)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **overrides})
