"""`terdit convert`: a public release directory -> a deploy directory.

A TerDiT release converted to "2bit" keeps its packed bytes unchanged (bit-exact); "base3" repacks the
same codes. A Large-DiT (full-precision) release becomes a deploy directory of format "fp".
"""

from __future__ import annotations

from pathlib import Path

from terdit.deploy.export import check_deploy_out, write_deploy_dir
from terdit.deploy.loader import load_deployed
from terdit.errors import TerditError
from terdit.models.kinds import Kind, kind_of


def convert_release(
    src: str | Path, out: str | Path, fmt: str | None = None, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Convert release `src`. `fmt` defaults to "2bit" for TerDiT releases and must be "fp" for Large-DiT;
    `dtype` (of the float tensors) defaults to the release's own. An existing deploy directory at `out` is
    replaced only with `overwrite`."""
    if kind_of(src) is not Kind.RELEASE:
        raise TerditError(f"{src}: not a release directory (no model_args.pth)")
    check_deploy_out(out, src, overwrite)
    model = load_deployed(src, device="cpu", dtype="fp32", policy="memory")
    ternary = model.config.ternary
    fmt = fmt or ("2bit" if ternary else "fp")
    if not ternary and fmt != "fp":
        raise TerditError(
            f"{src}: a full-precision release converts to format 'fp' (use `terdit quantize` for PTQ)"
        )
    if ternary and fmt == "fp":
        raise TerditError(f"{src}: a ternary release converts to '2bit' or 'base3'")
    # the release's own storage dtype, source and class order carry over (from model.deploy)
    return write_deploy_dir(model, out, fmt, dtype)
