"""Model configurations: the paper's sizes and small ones for CPU work."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers.configuration_utils import FrozenDict

from terdit.errors import TerditError

MODEL_ONLY_KEYS = ("label_permutation",)  # model config keys that are not TerDiTConfig fields


@dataclass
class TerDiTConfig:
    """Everything that fixes a TerDiT / Large-DiT network's shape and behaviour.

    `linear` picks the block linears: "ternary" (TerDiT), "fp" (the Large-DiT baseline);
    `adaln_norm` is the RMSNorm after the adaLN linear (TerDiT's change, off for the ablation).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 1536
    depth: int = 16
    n_heads: int = 32
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    qk_norm: bool = False
    linear: str = "ternary"
    adaln_norm: bool = True
    alpha_init: str = "absmean"
    granularity: str = "tensor"
    rope_theta: float = 10000.0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.linear not in ("fp", "ternary", "bitnet"):
            raise TerditError(f"config: linear must be fp, ternary or bitnet, got {self.linear!r}")
        if self.dim % self.n_heads:
            raise TerditError(f"config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise TerditError("config: head_dim must be even for RoPE")
        if self.input_size % self.patch_size:
            raise TerditError(
                f"config: input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )

    @property
    def ternary(self) -> bool:
        return self.linear != "fp"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def cond_dim(self) -> int:
        return min(self.dim, 1024)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        m = self.multiple_of
        return m * ((hidden + m - 1) // m)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_kwargs(self) -> dict[str, Any]:
        """The TerDiT (diffusers) config: `sample_size` for input_size, `out_channels` for learn_sigma."""
        d = self.to_dict()
        d["sample_size"] = d.pop("input_size")
        del d["learn_sigma"]
        d["out_channels"] = self.out_channels
        return d

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> TerDiTConfig:
        """The inverse of model_kwargs (private `_...` keys and `label_permutation`, which is not architecture,
        are skipped); out_channels must be in_channels or 2 * in_channels (learned variance)."""
        d = {k: v for k, v in config.items() if not k.startswith("_") and k not in MODEL_ONLY_KEYS}
        d["input_size"] = d.pop("sample_size", cls.input_size)
        in_ch = d.get("in_channels", cls.in_channels)
        out_ch = d.pop("out_channels", None)
        if out_ch not in (None, in_ch, 2 * in_ch):
            raise TerditError(f"config: out_channels must be in_channels ({in_ch}) or twice it, got {out_ch}")
        d["learn_sigma"] = out_ch is None or out_ch == 2 * in_ch
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TerDiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TerditError(f"config: unknown keys {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from terdit.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TerDiTConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise TerditError(f"{path}: not a readable terdit config ({e})") from e


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


class TerDiTFrozenConfig(FrozenDict):
    """A TerDiT's diffusers config (`model.config`) that also answers what its TerDiTConfig does:
    `head_dim`, `cond_dim`, `input_size`, `learn_sigma`, `to_dict()` (the TerDiTConfig form, as run folders
    store it), `save(path)`; equal to the TerDiTConfig it describes."""

    @property
    def arch(self) -> TerDiTConfig:
        return TerDiTConfig.from_model_config(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "arch":
            raise AttributeError(name)
        return getattr(self.arch, name)

    def __eq__(self, other: object) -> bool:
        """Same model: diffusers' private bookkeeping (`_name_or_path`, `_use_default_values`) is ignored."""
        if isinstance(other, TerDiTConfig):
            return self.arch == other
        if isinstance(other, Mapping):
            return _public(self) == _public(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


_IMAGENET = dict(input_size=32, patch_size=2, in_channels=4, num_classes=1000)

CONFIGS: dict[str, dict[str, Any]] = {
    # The paper's models (reference: Large-DiT's DiT_Llama_*_patch2).
    "TerDiT-600M": dict(_IMAGENET, dim=1536, depth=16, n_heads=32),
    "TerDiT-4.2B": dict(_IMAGENET, dim=3072, depth=32, n_heads=32),  # "3B" in the public code
    "TerDiT-7B": dict(_IMAGENET, dim=4096, depth=32, n_heads=32),
    # CPU configs. Digits: 8x8 one-channel pixels, 10 classes.
    "TerDiT-Digits": dict(
        input_size=8, patch_size=2, in_channels=1, num_classes=10, dim=128, depth=4, n_heads=4, multiple_of=64
    ),
    # The smallest useful model, for tests: 8x8 four-channel latents.
    "TerDiT-Micro": dict(
        input_size=8, patch_size=2, in_channels=4, num_classes=10, dim=32, depth=2, n_heads=2, multiple_of=32
    ),
}
ALIASES = {"TerDiT-3B": "TerDiT-4.2B"}


def config_names() -> list[str]:
    return list(CONFIGS)


def get_config(name: str, **overrides: Any) -> TerDiTConfig:
    """A named config; other keys override fields (None = keep the default).

    `ternary=False` (or `linear="fp"`) selects the full-precision Large-DiT twin, which has no RMSNorm
    after adaLN unless `adaln_norm=True` is asked for; TerDiT and BitNet keep the norm switch as given.
    """
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise TerditError(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    fields = dict(CONFIGS[key], name=key)
    ternary = overrides.pop("ternary", None)
    if ternary is not None:
        fields["linear"] = "ternary" if ternary else "fp"
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if fields.get("linear") == "fp" and overrides.get("adaln_norm") is None:
        fields["adaln_norm"] = False  # Large-DiT
    return TerDiTConfig.from_dict(fields)
