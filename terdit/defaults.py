"""Defaults every command shares, decided in one place: dtype names, the default device and compute dtype,
and `setting()`, which gives a settings-dataclass field its default and how the command line spells it.

A command's settings are a dataclass whose fields are `setting(...)`s; `terdit.cli.args.add_settings` turns
them into flags, so a default is written once, here in the library, not again in the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from terdit.errors import TerditError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or one of those torch dtypes) -> torch dtype; `what` names the argument."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise TerditError(f"{what}: unsupported dtype {name}; choose from {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise TerditError(f"{what}: unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> its short name ('fp32', 'bf16', 'fp16')."""
    return {v: k for k, v in DTYPES.items()}[parse_dtype(dtype)]


def default_device() -> str:
    """Where work runs when no device is named: the GPU if there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None, what: str = "device") -> torch.device:
    """A usable torch device for `device` (None: `default_device()`), or a TerditError naming `what`."""
    if device is None:
        return torch.device(default_device())
    name = str(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TerditError(f"{what} {name}: CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise TerditError(f"{what} {name}: {e}") from e


def default_dtype(device: torch.device) -> torch.dtype:
    """Compute dtype when none is named: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, what: str = "dtype") -> torch.dtype:
    return default_dtype(device) if dtype is None else parse_dtype(dtype, what)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - argparse's name
    *,
    flags: Sequence[str] | None = None,
    type: Callable[[str], Any] | None = None,  # noqa: A002
    choices: Sequence[Any] | None = None,
    aliases: dict[str, Any] | None = None,
    negative: tuple[str, str] | None = None,
    positional: bool = False,
    cli: bool = True,
    default_factory: Callable[[], Any] | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field with its default and its command-line spelling (read by terdit.cli.args).

    flags: the option strings (default `--field-name`; for a bool defaulting to True, `--no-field-name`);
    type/choices: how the CLI parses and checks the value; aliases: extra flags that store a constant
    (e.g. {"--no-ternary": "fp"} on `linear`); negative: (flag, help) of the "off" flag of a three-state
    bool (default None: `--name` sets True, the negative flag False, never both); positional: an argument
    without dashes; cli=False: not a flag (set by code or config only); argparse_kwargs: anything else
    argparse takes (nargs, metavar, required).
    """
    metadata = {"help": help, "flags": tuple(flags) if flags else None, "type": type,
                "choices": tuple(choices) if choices is not None else None, "aliases": dict(aliases or {}),
                "negative": negative, "positional": positional, "cli": cli, "argparse": argparse_kwargs}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- value parsers of settings fields (argparse `type=`): a bad value is a one-line usage error ----------------
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


# -- fields many settings share, spelled once ----------------------------------------------------------------
def device_setting(help: str = "cpu or cuda (default: cuda if present, else cpu)") -> Any:  # noqa: A002
    """The `--device` field (None: `default_device()` when the command runs)."""
    return setting(None, help)


def dtype_setting(help: str = "compute dtype (default: bf16 on cuda, fp32 on cpu)",  # noqa: A002
                  default: str | None = None) -> Any:
    """A `--dtype` field naming one of DTYPES (None: `default_dtype(device)`)."""
    return setting(default, help, flags=["--dtype"], choices=list(DTYPES))


def overwrite_setting(what: str) -> Any:
    """The `--overwrite` field: replace an existing `what` at --out, never anything else."""
    return setting(False, f"replace an existing {what} at --out (never anything else; the replacement is atomic)")
