"""The run folder: where training writes, and what every other command reads.

    RUN/config.json                       model config (TerDiTConfig)
    RUN/train_args.json                   resolved training arguments
    RUN/log.jsonl                         one JSON line per logged step
    RUN/checkpoints/0001000/model.safetensors   latent (full-precision) weights
    RUN/checkpoints/0001000/ema.safetensors     EMA of the weights
    RUN/checkpoints/0001000/train_state.pt      optimizer, step, RNG (weights_only-loadable)
    RUN/samples.png                       grid drawn at the end of training
    RUN/.lock                             held (flock) by the process training into RUN
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from terdit.errors import TerditError
from terdit.io import load_tensors, read_json
from terdit.models.configs import TerDiTConfig
from terdit.models.kinds import CHECKPOINTS, Kind, checkpoint_dirs, kind_of
from terdit.models.terdit import TerDiT

CONFIG_FILE = "config.json"
TRAIN_ARGS_FILE = "train_args.json"
LOG_FILE = "log.jsonl"
CKPT_DIR = CHECKPOINTS
LOCK_FILE = ".lock"


def checkpoint_name(step: int) -> str:
    return f"{step:07d}"


def require_run(run: str | Path) -> Path:
    """The run folder, or a TerditError saying why it is not one."""
    path = Path(run)
    if not path.exists():
        raise TerditError(f"run {path} does not exist")
    if kind_of(path) is not Kind.RUN:
        raise TerditError(f"{path} is not a terdit run (no {CONFIG_FILE} or no checkpoints/)")
    return path


def latest_checkpoint(run: str | Path) -> Path:
    return checkpoint_dirs(require_run(run))[-1]


def load_config(run: str | Path) -> TerDiTConfig:
    return TerDiTConfig.load(Path(run) / CONFIG_FILE)


def load_train_args(run: str | Path, required: bool = False) -> dict[str, Any]:
    """The run's resolved training arguments; {} when absent (runs made by `quantize`), unless `required`."""
    path = Path(run) / TRAIN_ARGS_FILE
    if not path.is_file():
        if required:
            raise TerditError(f"{path}: missing; cannot tell how this run was trained")
        return {}
    args = read_json(path)
    if not isinstance(args, dict):
        raise TerditError(f"{path}: not a JSON object of training arguments")
    return args


def load_weights_into(model: torch.nn.Module, path: Path) -> None:
    state = load_tensors(path)
    own = model.state_dict()
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise TerditError(f"{path}: does not match the model config ({k} is {tuple(state[k].shape)}, "
                          f"the config needs {tuple(own[k].shape)})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TerditError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_run_model(
    run: str | Path, ema: bool = True, checkpoint: str | Path | None = None, device: str = "cpu"
) -> TerDiT:
    """The trained model of a run (EMA weights by default), in eval mode."""
    run = require_run(run)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run)
    model = TerDiT(load_config(run))
    load_weights_into(model, ckpt / ("ema.safetensors" if ema else "model.safetensors"))
    return model.to(device).eval()
