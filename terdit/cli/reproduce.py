"""`terdit reproduce`: the paper's comparisons at small scale. Flags come from `Settings`
(terdit.experiments.reproduce); the budget fields default to `--quick`'s or the full budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from terdit.cli.args import add_settings
from terdit.experiments.variants import FULL_BUDGET, QUICK_BUDGET, Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="the paper's comparisons at small scale: train, evaluate, report")
    fields = Settings.__dataclass_fields__
    add_settings(p, Settings, helps={k: "; ".join(filter(None, [fields[k].metadata["help"], f"--quick: {v}"]))
                                     for k, v in QUICK_BUDGET.items()})
    # a budget flag not given is None, then the --quick or the full budget's value (help shows the full one)
    p.set_defaults(func=cmd_reproduce, **dict.fromkeys(FULL_BUDGET))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags; budget fields not given come from QUICK_BUDGET (--quick) or FULL_BUDGET."""
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    given = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    pick = {k: given[k] if given.get(k) is not None else v for k, v in budget.items()}
    if given.get("curve_samples") is None:  # a smaller --num-samples alone also caps the curves' sample count
        pick["curve_samples"] = min(pick["curve_samples"], pick["num_samples"])
    return Settings(**{**given, **pick, "variants": list(dict.fromkeys(args.variants)), "cfg": list(args.cfg),
                       "seeds": list(pick["seeds"])})


def cmd_reproduce(args: argparse.Namespace) -> int:
    from terdit.experiments.reproduce import reproduce

    results = reproduce(settings_from_args(args))
    for c in results["claims"]:
        print(f"({c['id']}) {c['verdict']}: {c['claim']}")
    print(f"wrote {Path(args.out) / 'report.md'} and results.json in {results['wall_s']:.0f} s")
    return 0
