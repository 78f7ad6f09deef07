"""The paper's Table II on this machine: full precision vs packed ternary, 600M and 4.2B at 256x256.

    python benchmarks/deploy_efficiency.py                 # 600M (fp32, 2bit, base3), 4.2B (packed)
    python benchmarks/deploy_efficiency.py --with-fp-4.2b        # also the 4.2B fp32 baseline (~17 GB RAM)
    python benchmarks/deploy_efficiency.py --only TerDiT-600M --json out.json

Random weights, 32x32x4 latents, batch 2 with classifier-free guidance (4 forward rows), one sampling
step = one guided model call. Every variant runs in a fresh process (see terdit.deploy.bench).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from terdit.deploy.bench import format_table, run_bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["TerDiT-600M", "TerDiT-4.2B"], default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--repeats", type=int, default=9,
                   help="timed rounds after a warm-up (default 9: single steps on a shared 2-core VM vary by 30%%)")
    p.add_argument(
        "--time-4.2b",
        dest="time_big",
        action="store_true",
        help="interleaved timing for 4.2B too (slow on CPU); default: one unpaired step per variant",
    )
    p.add_argument("--with-fp-4.2b", dest="fp_big", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    a = p.parse_args()
    plans = [
        ("TerDiT-600M", ["2bit", "base3"], ["memory", "speed"], False, True),
        ("TerDiT-4.2B", ["2bit", "base3"], ["memory"], not a.fp_big, a.time_big),
    ]
    results = []
    for name, formats, policies, skip_fp, timing in plans:
        if a.only and name != a.only:
            continue
        r = run_bench(
            name,
            formats,
            policies,
            a.device,
            a.dtype,
            repeats=a.repeats,
            skip_fp=skip_fp,
            timing=timing,
            extra_sizes=name == "TerDiT-600M",  # the size targets are stated for 600M
        )
        print(format_table(r), flush=True)
        print(flush=True)
        results.append(r)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
