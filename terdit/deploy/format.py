"""The deploy directory: what `terdit export` / `terdit convert` write and `load_deployed` reads.

DIR/config.json        the model config (TerDiTConfig fields) plus a "deploy" section:
                       {"version", "format" (2bit | base3 | fp), "dtype" (of the float tensors),
                        "label_permutation" (null | "lexicographic"), "source",
                        "packed": {layer: {"shape": [out, in], "pad": zero codes added}},
                        "int8_rows": [names of float matrices stored as int8 rows]}
DIR/model.safetensors  per packed layer: "<layer>.weight" uint8 in the on-disk layout of the format,
                       "<layer>.alphas" float32 [1] and "<layer>.bias" when present; every other
                       tensor of the model in full precision, under its state-dict name; those in
                       "int8_rows" as int8 plus float32 "<name>_scale" [rows] (terdit.quant.int8).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from terdit.defaults import parse_dtype
from terdit.errors import TerditError
from terdit.io import atomic_write_text, read_json
from terdit.models.configs import TerDiTConfig
from terdit.models.kinds import Kind, kind_of
from terdit.quant.packing import FORMATS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VERSION = 1
DEPLOY_FORMATS: tuple[str, ...] = (*FORMATS, "fp")
LABEL_PERMUTATIONS: tuple[str, ...] = ("lexicographic",)

@dataclass
class DeployInfo:
    format: str
    dtype: str = "fp32"
    packed: dict[str, dict[str, Any]] = field(default_factory=dict)
    label_permutation: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    int8_rows: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        shapes_ok = isinstance(self.packed, dict) and all(
            isinstance(v, dict) and isinstance(v.get("shape"), list) for v in self.packed.values())
        if not shapes_ok or not isinstance(self.source, dict) or not isinstance(self.int8_rows, list) \
                or not isinstance(self.version, int):
            raise TerditError("deploy section: 'packed' must map layers to {shape, pad}, 'source' be an object, "
                              "'int8_rows' a list and 'version' an integer")
        if self.format not in DEPLOY_FORMATS:
            raise TerditError(f"deploy format must be one of {DEPLOY_FORMATS}, got {self.format!r}")
        parse_dtype(self.dtype)
        if self.label_permutation not in (None, *LABEL_PERMUTATIONS):
            raise TerditError(f"unknown label_permutation {self.label_permutation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_config(directory: Path, config: TerDiTConfig, info: DeployInfo) -> None:
    payload = {**config.to_dict(), "deploy": info.to_dict()}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")


def is_deploy_dir(path: str | Path) -> bool:
    """A deploy directory, as terdit.models.kinds (the one place that tells layouts apart) sees it."""
    return kind_of(path) is Kind.DEPLOY


def read_config(directory: str | Path) -> tuple[TerDiTConfig, DeployInfo]:
    """Model config and deploy section of a deploy directory, with errors naming the file."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise TerditError(f"{directory}: not a deploy directory (no {CONFIG_FILE})")
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("deploy"), dict):
        raise TerditError(f"{path}: no 'deploy' section (a run folder? use `terdit export` first)")
    deploy = raw.pop("deploy")
    try:
        info = DeployInfo(**deploy)
    except (TypeError, TerditError) as e:
        raise TerditError(f"{path}: bad deploy section ({e})") from e
    if info.version > VERSION:
        raise TerditError(f"{path}: deploy version {info.version} is newer than this terdit ({VERSION})")
    try:
        config = TerDiTConfig.from_dict(raw)
    except TypeError as e:
        raise TerditError(f"{path}: bad model config ({e})") from e
    return config, info
