"""Flags generated from a settings dataclass: the default lives in the dataclass, the CLI reads it from there."""

import argparse
import dataclasses

import pytest

from terdit.cli.args import add_settings, positive_int, settings_from
from terdit.defaults import setting


@dataclasses.dataclass
class Demo:
    run: str = setting(help="run folder")
    steps: int = setting(250, "sampling steps", type=positive_int)
    linear: str = setting("ternary", "block linears", choices=["fp", "ternary", "bitnet"],
                          aliases={"--no-ternary": "fp"})
    ema: bool = setting(True, "use the EMA weights")
    overwrite: bool = setting(False, "replace an existing output")
    classes: list[int] | None = setting(None, "class ids", type=int, nargs="+")
    internal: int = setting(7, cli=False)


def parse(argv: list[str]) -> Demo:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_settings(p, Demo)
    return settings_from(Demo, p.parse_args(argv))


def test_defaults_come_from_the_dataclass():
    got = parse(["--run", "r"])
    assert got == Demo(run="r")  # every other field: the dataclass default (an independent construction)


def test_flags_types_bools_and_aliases():
    got = parse(["--run", "r", "--steps", "3", "--no-ema", "--overwrite", "--classes", "1", "2", "--no-ternary"])
    assert (got.steps, got.ema, got.overwrite, got.classes, got.linear) == (3, False, True, [1, 2], "fp")
    assert parse(["--run", "r", "--linear", "bitnet"]).linear == "bitnet"


@pytest.mark.parametrize("argv", [[], ["--run", "r", "--steps", "0"], ["--run", "r", "--linear", "int4"],
                                  ["--run", "r", "--internal", "3"]])
def test_bad_or_missing_values_are_usage_errors(argv):
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parse(argv)


def test_help_shows_the_dataclass_default():
    p = argparse.ArgumentParser()
    add_settings(p, Demo)
    text = " ".join(p.format_help().split())
    assert "sampling steps (default: 250)" in text and "same as --linear fp" in text
