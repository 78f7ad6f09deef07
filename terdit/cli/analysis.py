"""`terdit analyze`: the paper's activation analyses (terdit.experiments.analysis)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from terdit.cli.args import add_command, settings_from
from terdit.defaults import setting
from terdit.errors import TerditError


@dataclass
class AnalyzeArgs:
    """Everything `terdit analyze` takes."""

    out: str = setting("analysis", "folder for PNG plots and JSON numbers")
    seed: int = setting(0, type=int)
    alpha_init: str = setting("randn", "alpha of the Fig. 4 ternary layer (randn: the public code)",
                              choices=["randn", "absmean", "ones"])
    runs: list[str] = setting(help="trained runs for Fig. 9, e.g. with-norm=runs/a without-norm=runs/b",
                              nargs="*", metavar="NAME=RUN", default_factory=list)
    block: int = setting(1, "block for Fig. 9 (0-based; the paper's second = 1)", type=int)

    def named_runs(self) -> dict[str, str]:
        """--runs NAME=RUN ... as {name: run}."""
        named = {}
        for item in self.runs:
            name, sep, run = item.partition("=")
            if not sep:
                raise TerditError(f"--runs {item!r}: expected NAME=RUN")
            named[name] = run
        return named


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "analyze", "the paper's activation analyses (Fig. 4; Fig. 9 with --runs)",
                AnalyzeArgs, cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from terdit.experiments.analysis import analyze

    a = settings_from(AnalyzeArgs, args)
    report = analyze(a.out, seed=a.seed, alpha_init=a.alpha_init, runs=a.named_runs(), block=a.block)
    f4 = report["fig4"]
    print(f"Fig. 4 |activation| max: ternary {f4['ternary']['abs_max']:.3g}, ternary+RMSNorm "
          f"{f4['ternary_rmsnorm']['abs_max']:.3g}, full precision {f4['full_precision']['abs_max']:.3g}")
    for name, s in report.get("fig9", {}).items():
        print(f"Fig. 9 {name}: scale_mlp in [{s['min']:.3g}, {s['max']:.3g}], std {s['std']:.3g}")
    print(f"wrote {a.out}/analysis.json and plots")
    return 0
