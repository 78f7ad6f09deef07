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


def _parse_command(argv: list[str]) -> argparse.Namespace:
    from terdit.cli import build_parser

    return build_parser().parse_args(argv)


def test_commands_take_their_defaults_from_their_settings():
    from terdit.cli.sample import SampleArgs
    from terdit.sampling.npz import MassSampleArgs
    from terdit.training.distill import DistillArgs
    from terdit.training.trainer import TrainArgs

    assert settings_from(TrainArgs, _parse_command(["train"])) == TrainArgs()
    assert settings_from(MassSampleArgs, _parse_command(["sample-npz", "--run", "r"])) == MassSampleArgs(run="r")
    assert settings_from(SampleArgs, _parse_command(["sample", "--run", "r"])) == SampleArgs(run="r")
    distill = _parse_command(["distill", "--teacher", "t", "--out", "o"])
    assert settings_from(DistillArgs, distill) == DistillArgs(teacher="t")
    # distill's own --adaln-norm (DistillArgs) also reaches TrainArgs.adaln_norm, as it always did
    assert settings_from(TrainArgs, distill) == TrainArgs(out="o", adaln_norm=False)


def test_one_linear_vocabulary_and_the_backend_flag():
    from terdit.training.trainer import TrainArgs

    assert _parse_command(["train", "--no-ternary"]).linear == "fp"
    assert _parse_command(["train", "--linear", "bitnet"]).linear == "bitnet"
    assert _parse_command(["train", "--no-adaln-norm"]).adaln_norm is False
    assert _parse_command(["train", "--adaln-norm"]).adaln_norm is True
    assert _parse_command(["train"]).adaln_norm is None
    assert _parse_command(["sample", "--run", "r", "--backend", "eager"]).backend == "eager"
    assert _parse_command(["sample-npz", "--run", "r", "--backend", "cuda-graph"]).backend == "cuda-graph"
    assert TrainArgs.upgrade({"ternary": False, "linear": None})["linear"] == "fp"
    assert TrainArgs.upgrade({"ternary": True, "linear": None}) == {"linear": "ternary"}
    assert TrainArgs.upgrade({"ternary": True, "linear": "bitnet"}) == {"linear": "bitnet"}


def test_no_library_module_imports_the_cli():
    import pathlib
    import re

    import terdit

    root = pathlib.Path(terdit.__file__).parent
    library = [p for p in root.rglob("*.py") if p.relative_to(root).parts[0] != "cli" and p != root / "__init__.py"]
    offenders = [str(p.relative_to(root)) for p in library
                 if re.search(r"^\s*(from|import) terdit\.cli\b", p.read_text(), re.M)]
    assert offenders == []


def test_reproduce_budget_flags_default_to_the_chosen_budget():
    from terdit.cli.reproduce import settings_from_args
    from terdit.experiments.variants import QUICK_BUDGET, Settings

    assert settings_from_args(_parse_command(["reproduce"])) == Settings()
    quick = settings_from_args(_parse_command(["reproduce", "--quick", "--steps", "40", "--variants", "bitnet",
                                               "bitnet", "terdit"]))
    assert quick == Settings(quick=True, **{**QUICK_BUDGET, "steps": 40}, variants=["bitnet", "terdit"])
