"""Flags generated from settings dataclasses (fields made with `terdit.defaults.setting`): the default and the
help text live in the dataclass, the CLI reads them from there, so a default is written once."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from terdit.defaults import finite_float, nonneg_float, nonneg_int, positive_int

__all__ = ["add_command", "add_settings", "finite_float", "nonneg_float", "nonneg_int", "positive_int", "settings_from"]

T = TypeVar("T")


def add_settings(parser: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = (),
                 only: Iterable[str] | None = None, group: str | None = None,
                 helps: dict[str, str] | None = None, required: Iterable[str] = ()) -> None:
    """One flag per `setting()` field of dataclass `cls` (defaults and help text from the field, so a default
    lives in one place). exclude / only: which fields get a flag; helps: help text that differs for this
    command; required: fields this command makes required."""
    target: Any = parser.add_argument_group(group) if group else parser
    skip, keep, must = set(exclude), set(only) if only is not None else None, set(required)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if f.name in skip or (keep is not None and f.name not in keep) or not f.init or not md.get("cli"):
            continue  # excluded, or not a setting() field, or cli=False
        default: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if f.name in must:
            default = dataclasses.MISSING
        md = {**md, "help": (helps or {}).get(f.name, md["help"])}
        _add_field(target, f.name, default, md)


def _add_field(target: Any, name: str, default: Any, md: dict[str, Any]) -> None:
    flags, kwargs = _flag_spec(name, default, md)
    if md["positional"]:
        kwargs.pop("default", None)
        target.add_argument(name, **kwargs)
        return
    if md["negative"]:  # three-state bool: --name (True), the negative flag (False), neither (None)
        both = target.add_mutually_exclusive_group()
        off, off_help = md["negative"]
        both.add_argument(off, dest=name, action="store_false", default=default, help=off_help)
        both.add_argument(*flags, dest=name, action="store_true", default=default, help=md["help"])
        return
    for alias, const in md["aliases"].items():
        target.add_argument(alias, dest=name, action="store_const", const=const, default=argparse.SUPPRESS,
                            help=f"same as {flags[0]} {const}")
    if default is dataclasses.MISSING:
        kwargs.setdefault("required", True)
    else:
        kwargs.setdefault("default", default)
    target.add_argument(*flags, dest=name, **kwargs)


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


def add_command(sub: argparse._SubParsersAction, name: str, help: str, settings: type,  # noqa: A002
                func: Callable[[argparse.Namespace], int], description: str | None = None,
                **add_kwargs: Any) -> argparse.ArgumentParser:
    """One sub-command: its flags generated from the `settings` dataclass, `func(args)` run when it is chosen
    (the one way cli/ modules register a command whose flags are one dataclass)."""
    p = sub.add_parser(name, help=help, description=description)
    add_settings(p, settings, **add_kwargs)
    p.set_defaults(func=func)
    return p
