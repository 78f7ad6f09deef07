"""`terdit quantize`: PTQ of a full-precision model into a new run folder.

The output has the training run layout (config.json with linear="fp", checkpoints/NNNNNNN/{model,ema}
.safetensors holding the fake-quantized weights), so sampling and evaluation read it unchanged, plus
quantize.json describing the method and the per-layer relative errors.
"""

from __future__ import annotations

import json
from pathlib import Path

from terdit.errors import TerditError
from terdit.io import atomic_dir, atomic_write_text, check_output, clean_leftovers, save_tensors
from terdit.models.terdit import TerDiT
from terdit.quant.ptq import quantize_model

REPORT_FILE = "quantize.json"


def load_source_model(src: str | Path, ema: bool = True) -> tuple[TerDiT, dict, str]:
    """(full-precision model, source description, checkpoint name) from a run or an fp deploy/release dir."""
    from terdit.loading.open import open_model
    from terdit.models.kinds import PACKED_LAYOUTS, kind_of
    from terdit.models.runs import latest_checkpoint

    src = Path(src)
    kind = kind_of(src)
    if kind not in PACKED_LAYOUTS and src.is_dir():  # a run folder; if not one, latest_checkpoint says why
        ckpt = latest_checkpoint(src)
        model = open_model(src, ema=ema, checkpoint=ckpt)
        return (
            model,
            {"kind": "run", "run": str(src.resolve()), "checkpoint": ckpt.name, "ema": ema},
            ckpt.name,
        )
    if kind in PACKED_LAYOUTS:
        model = open_model(src, policy="memory")
        if model.config.ternary:
            raise TerditError(f"{src}: already ternary; PTQ applies to full-precision models")
        return model, dict(model.deploy.source, deploy_dir=str(src.resolve())), "0000000"
    raise TerditError(f"{src}: not a run folder, deploy directory or release directory")


def is_quantized_run(path: Path) -> bool:
    """What `quantize` writes (and so may replace with --overwrite): a run folder with quantize.json."""
    return (path / REPORT_FILE).is_file() and path.is_dir()


def quantize_run(
    src: str | Path, out: str | Path, method: str, granularity: str = "tensor", ema: bool = True,
    overwrite: bool = False,
) -> Path:
    """Quantize `src` (EMA weights of a run by default) and write run folder `out`; an existing quantized
    run there is replaced only with `overwrite`."""
    from terdit.models.runs import CKPT_DIR, CONFIG_FILE

    out = check_output(out, inputs=[src], own=is_quantized_run, kind="quantized run folder", overwrite=overwrite)
    clean_leftovers(out.parent, (out.name,))
    model, source, step = load_source_model(src, ema)
    if model.config.ternary:
        raise TerditError(f"{src}: the run is ternary (QAT); PTQ applies to full-precision runs")
    reports = quantize_model(model, method, granularity)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    report = {
        "method": method,
        "granularity": granularity,
        "source": source,
        "layers": {r.name: {"shape": list(r.shape), "rel_error": r.rel_error} for r in reports},
        "mean_rel_error": sum(r.rel_error for r in reports) / len(reports),
    }

    def fill(tmp: Path) -> None:
        model.config.save(tmp / CONFIG_FILE)
        ckpt = tmp / CKPT_DIR / step
        ckpt.mkdir(parents=True)
        meta = {"ptq_method": method, "ptq_granularity": granularity}
        save_tensors(ckpt / "model.safetensors", state, metadata=meta)
        save_tensors(ckpt / "ema.safetensors", state, metadata=meta)
        atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")

    return atomic_dir(out, fill)
