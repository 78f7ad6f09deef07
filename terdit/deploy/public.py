"""Read the publicly released checkpoints without running their pickles.

A release directory holds `model_args.pth` (the training argparse.Namespace, pickled by torch.save) and
one consolidated state dict:
- TerDiT (lucky-lance/TerDiT): `consolidated_ema_ternary.00-of-01.pth`, ternary layers packed as uint8
  [out/4, in] in the 2bit quarter layout plus `alphas` [1]; labels in lexicographic folder order.
- Large-DiT (Alpha-VLLM/Large-DiT): `consolidated_ema.00-of-01.pth`, full precision, no RMSNorm after
  adaLN; standard ImageNet ids.
Both files are read with torch.load(weights_only=True): only tensors, plain containers and
argparse.Namespace are accepted, so a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from terdit.deploy.format import DeployInfo
from terdit.errors import TerditError
from terdit.models.configs import TerDiTConfig, get_config
from terdit.models.kinds import RELEASE_ARGS, Kind, kind_of

ARGS_FILE = RELEASE_ARGS
# Checked in this order: EMA before raw weights, as the public sample scripts default to EMA.
RELEASE_FILES: tuple[str, ...] = (
    "consolidated_ema_ternary.00-of-01.pth",
    "consolidated_ternary.00-of-01.pth",
    "consolidated_ema.00-of-01.pth",
    "consolidated.00-of-01.pth",
)
# Public model names -> our configs (the paper's "4.2B" is the code's "3B").
PUBLIC_MODELS: dict[str, str] = {
    "DiT_Llama_600M_patch2": "TerDiT-600M",
    "DiT_Llama_3B_patch2": "TerDiT-4.2B",
    "DiT_Llama_7B_patch2": "TerDiT-7B",
}
PROBE_KEY = "layers.0.attention.wq.weight"


def is_release_dir(path: str | Path) -> bool:
    """A public release directory, as terdit.models.kinds (the one place that tells layouts apart) sees it."""
    return kind_of(path) is Kind.RELEASE


def _safe_load(path: Path, allow: list[type] | None = None, mmap: bool = False) -> Any:
    """torch.load restricted to tensors and plain data (plus `allow`); TerditError on anything else."""
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TerditError(
            f"{path}: refused to unpickle: it contains objects other than tensors and plain data ({first})"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        if mmap and "mmap" in str(e):
            return _safe_load(path, allow, mmap=False)  # legacy (non-zip) file: read it whole
        raise TerditError(f"{path}: not a readable torch checkpoint ({e})") from e


def read_model_args(directory: str | Path) -> dict[str, Any]:
    """The training arguments of a release, as a dict (from the pickled argparse.Namespace)."""
    path = Path(directory) / ARGS_FILE
    if not path.is_file():
        raise TerditError(f"{directory}: not a release directory (no {ARGS_FILE})")
    args = _safe_load(path, allow=[argparse.Namespace])
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise TerditError(f"{path}: expected an argparse.Namespace, got {type(args).__name__}")
    return args


def release_checkpoint(directory: str | Path) -> Path:
    for name in RELEASE_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise TerditError(f"{directory}: no checkpoint file (expected one of {', '.join(RELEASE_FILES)})")


def release_config(args: dict[str, Any], ternary: bool, adaln_norm: bool, where: Path) -> TerDiTConfig:
    """Our config for a public model name and its training arguments."""
    name = args.get("model")
    if name not in PUBLIC_MODELS:
        raise TerditError(f"{where}: unknown model {name!r}; known: {', '.join(PUBLIC_MODELS)}")
    image_size = int(args.get("image_size", 256))
    if image_size % 8:
        raise TerditError(f"{where}: image_size {image_size} is not a multiple of 8")
    return get_config(
        PUBLIC_MODELS[name],
        input_size=image_size // 8,
        num_classes=int(args.get("num_classes", 1000)),
        qk_norm=bool(args.get("qk_norm", False)),
        linear="ternary" if ternary else "fp",
        adaln_norm=adaln_norm,
    )


class DictSource:
    """Tensors of a loaded state dict behind the TensorFile interface the loader uses."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        self.path, self._t = path, tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._t:
            raise TerditError(f"{self.path}: tensor {name!r} is missing")
        return self._t[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def read(self, name: str) -> torch.Tensor:
        return self._get(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self._get(name))


def read_release(directory: str | Path) -> tuple[TerDiTConfig, DeployInfo, DictSource]:
    """Config, deploy description and tensors of a TerDiT or Large-DiT release directory."""
    directory = Path(directory)
    args = read_model_args(directory)
    ckpt = release_checkpoint(directory)
    state = _safe_load(ckpt, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TerditError(f"{ckpt}: expected a state dict of tensors")
    if PROBE_KEY not in state:
        raise TerditError(f"{ckpt}: tensor {PROBE_KEY!r} is missing (not a DiT_Llama checkpoint?)")
    ternary = state[PROBE_KEY].dtype == torch.uint8
    adaln_norm = "layers.0.adaLN_modulation.2.weight" in state
    config = release_config(args, ternary, adaln_norm, directory / ARGS_FILE)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    info = DeployInfo(
        format="2bit" if ternary else "fp",
        dtype="bf16"
        if float_dtypes == {torch.bfloat16}
        else "fp16"
        if float_dtypes == {torch.float16}
        else "fp32",
        label_permutation="lexicographic" if "ternary" in ckpt.name else None,
        source={
            "kind": "release",
            "dir": str(directory.resolve()),
            "file": ckpt.name,
            "model": args.get("model"),
            "image_size": args.get("image_size"),
        },
    )
    return config, info, DictSource(state, ckpt)
