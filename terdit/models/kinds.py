"""What a path or a name is: the one place that tells terdit's layouts apart.

    run          config.json + checkpoints/NNNNNNN/              a training run (terdit.models.runs)
    deploy       config.json with a "deploy" section            packed model (terdit.deploy.format)
    release      model_args.pth + consolidated*.pth             a public TerDiT checkpoint (terdit.deploy.public)
    legacy       config.json + model.safetensors                 terdit 0.1's save_pretrained
    pipeline     model_index.json + transformer/                 a diffusers pipeline folder
    pretrained   config.json + diffusion_pytorch_model*.safetensors   diffusers' save_pretrained

A name that is not an existing path may be a Hugging Face Hub repo id (`is_hub_id`); terdit.loading.open
resolves one into a local folder, which `kind_of` then reads like any other.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

CONFIG_FILE = "config.json"
DEPLOY_WEIGHTS = "model.safetensors"  # a deploy directory's packed weights (terdit.deploy.format)
PIPELINE_INDEX = "model_index.json"
RELEASE_ARGS = "model_args.pth"  # a public release's model arguments (terdit.deploy.public)
CHECKPOINTS = "checkpoints"  # a run's checkpoints/NNNNNNN/ folders (terdit.models.runs)
TRANSFORMER = "transformer"  # a pipeline folder's model


class Kind(str, enum.Enum):
    """A layout terdit opens; compares equal to its name ("run", "deploy", ...)."""

    RUN = "run"
    DEPLOY = "deploy"
    RELEASE = "release"
    LEGACY = "legacy"
    PIPELINE = "pipeline"
    PRETRAINED = "pretrained"

    def __str__(self) -> str:
        return self.value


TERDIT_LAYOUTS = (Kind.RUN, Kind.DEPLOY, Kind.RELEASE, Kind.LEGACY)  # opened by terdit itself, not by diffusers
PACKED_LAYOUTS = (Kind.DEPLOY, Kind.RELEASE)  # opened by terdit.deploy.load_deployed


def has_weights(path: Path) -> bool:
    """A diffusers weights file (any variant, sharded or not)."""
    return any(path.glob("diffusion_pytorch_model*.safetensors")) or any(path.glob("diffusion_pytorch_model*.bin"))


def checkpoint_dirs(run: str | Path) -> list[Path]:
    """A run folder's checkpoints/NNNNNNN/ folders, oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def has_deploy_section(path: Path) -> bool:
    """config.json with a "deploy" section: what terdit export / convert write."""
    try:
        return "deploy" in json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False


def kind_of(path: str | Path) -> Kind | None:
    """The layout of a local directory terdit can open, else None (a file, a missing path, anything else)."""
    p = Path(path)
    if not p.is_dir():
        return None
    config = (p / CONFIG_FILE).is_file()
    if config and checkpoint_dirs(p):
        return Kind.RUN
    if config and has_deploy_section(p):
        return Kind.DEPLOY
    if (p / RELEASE_ARGS).is_file():
        return Kind.RELEASE
    if config and (p / DEPLOY_WEIGHTS).is_file() and not has_weights(p):
        return Kind.LEGACY  # terdit 0.1's save_pretrained: TerDiTConfig json + model.safetensors (full state dict)
    if (p / PIPELINE_INDEX).is_file() and (p / TRANSFORMER).is_dir():
        return Kind.PIPELINE
    if config and has_weights(p):
        return Kind.PRETRAINED
    return None


def model_dir(path: str | Path) -> tuple[Path, Kind | None]:
    """(folder holding the model, its kind): a pipeline folder's transformer/, any other folder itself."""
    p = Path(path)
    kind = kind_of(p)
    if kind is Kind.PIPELINE:
        return p / TRANSFORMER, kind_of(p / TRANSFORMER)
    return p, kind


def is_hub_id(name: str | os.PathLike[str], *, owner: bool = False) -> bool:
    """Whether `name` can be a Hub repo id: not absolute, not ./ ../ ~, at most one slash (exactly one with
    `owner`, as "owner/name"), and valid for huggingface_hub. Says nothing of whether a local path exists."""
    text = os.fspath(name)
    if text.startswith((".", "/", "~")) or os.sep in text.replace("/", ""):
        return False
    slashes = text.count("/")
    if slashes > 1 or (owner and slashes != 1):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


__all__ = ["CONFIG_FILE", "DEPLOY_WEIGHTS", "PACKED_LAYOUTS", "PIPELINE_INDEX", "TERDIT_LAYOUTS",
           "TRANSFORMER", "Kind", "checkpoint_dirs", "has_weights", "is_hub_id", "kind_of", "model_dir"]
