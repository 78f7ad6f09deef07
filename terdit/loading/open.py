"""`open_model`: the one way to open a model terdit can read, local or on the Hub.

    run folder        config.json + checkpoints/NNNNNNN/   EMA weights of the latest checkpoint (default)
    deploy directory  config.json with a "deploy" section  packed model (terdit.deploy.load_deployed)
    release directory model_args.pth + consolidated*.pth  packed model (the public checkpoints)
    pretrained dir    config.json + diffusion_pytorch_model*.safetensors   what save_pretrained writes (diffusers)
    pipeline folder   model_index.json + transformer/      its transformer
    Hub repo id       owner/name holding a pretrained dir, a deploy directory or a pipeline folder

What a path is, is decided by terdit.models.kinds; this module turns a name into a local folder
(`resolve_dir`, downloading a Hub repo once into the Hugging Face cache) and that folder into a model.
`TerDiT.from_pretrained` is this function (terdit.loading registers it as the model's hook), so every
command and API that opens a model goes through here. A local path never touches the network.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

import torch

import terdit.loading.hub as hub
from terdit.errors import TerditError
from terdit.models.kinds import (
    CONFIG_FILE,
    DEPLOY_WEIGHTS,
    PIPELINE_INDEX,
    TERDIT_LAYOUTS,
    TRANSFORMER,
    Kind,
    has_weights,
    is_hub_id,
    model_dir,
)
from terdit.models.terdit import TerDiT

META_INIT_THRESHOLD = 2**24  # depth * dim^2 above which terdit builds a model on the meta device (no random init)
_HUB_KWARGS = ("revision", "cache_dir", "force_download", "token")
_TERDIT_LAYOUT_KWARGS = frozenset({"torch_dtype", "dtype", "subfolder", "local_files_only", "revision", "cache_dir",
                                   "force_download", "token", "low_cpu_mem_usage", "use_safetensors"})


# -- a name -> a local folder ----------------------------------------------------------------------------------
def _hub_subfolder(name: str, subfolder: str | None, offline: str | None, **hub_kwargs: Any) -> str | None:
    """The folder of a Hub repo that holds the model: `subfolder`, transformer/ of a pipeline repo, or the root."""
    if subfolder:
        return subfolder
    if hub._download(name, PIPELINE_INDEX, offline, required=False, **hub_kwargs) is not None:
        return TRANSFORMER
    return None


def hub_model_subfolder(name: str, subfolder: str | None = None, *, local_files_only: bool = False,
                        **hub_kwargs: Any) -> str | None:
    """Where a Hub repo keeps its model: `subfolder` if given, "transformer" for a pipeline repo, else None."""
    return _hub_subfolder(name, subfolder, hub._offline_reason(local_files_only), **hub_kwargs)


def resolve_dir(name_or_path: str | Path, *, subfolder: str | None = None, local_files_only: bool = False,
                **hub_kwargs: Any) -> Path:
    """A local directory for a path or a Hub repo id (downloading config.json and the safetensors weights:
    every variant of diffusers' file, or terdit's deploy file)."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise TerditError(f"{name}: expected a directory, got a file")
        return local / subfolder if subfolder else local
    if not is_hub_id(name):
        raise TerditError(f"{name}: no such directory (and not a Hub repo id like owner/name)")
    offline = hub._offline_reason(local_files_only)  # asked once: each probe may take HUB_TIMEOUT seconds
    folder = _hub_subfolder(name, subfolder, offline, **hub_kwargs)
    prefix = f"{folder}/" if folder else ""
    config = hub._download(name, prefix + CONFIG_FILE, offline, **hub_kwargs)
    if config is None:
        raise TerditError(f"{name}: the Hub repository has no {prefix}{CONFIG_FILE} (not a terdit model)")
    patterns = [prefix + DEPLOY_WEIGHTS, prefix + "diffusion_pytorch_model*.safetensors", prefix + CONFIG_FILE]
    root = hub.snapshot(name, patterns, offline, "the weights", **hub_kwargs)
    directory = root / prefix if prefix else root
    if not (has_weights(directory) or (directory / DEPLOY_WEIGHTS).is_file()):
        raise TerditError(f"{name}: the Hub repository has no weights in {prefix or './'}")
    return directory


# -- a folder -> a model ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def diffusers_load_kwargs() -> frozenset[str]:
    """The keywords diffusers' ModelMixin.from_pretrained understands (read from its source, so that this stays
    true across diffusers versions): anything else given to from_pretrained is a mistake, not to be dropped."""
    from diffusers import ModelMixin

    return frozenset(re.findall(r'kwargs\.pop\(\s*"(\w+)"', inspect.getsource(ModelMixin.from_pretrained)))


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bf16", "float32", ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from terdit.defaults import parse_dtype

    return parse_dtype(dtype)


def open_model(
    path_or_id: str | Path,
    *,
    ema: bool = True,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    policy: str = "memory",
    cls: type[TerDiT] = TerDiT,
    **kwargs: Any,
) -> TerDiT:
    """A TerDiT in eval mode from a run folder, deploy/release/pretrained/pipeline directory or Hub repo id.

    Every keyword of diffusers' ModelMixin.from_pretrained works for pretrained folders (`torch_dtype`,
    `variant`, `subfolder`, `use_safetensors`, `device_map`, ...); `torch_dtype` (or `dtype`, also "bf16")
    applies to every layout. terdit's own: `ema`, `checkpoint` (which weights of a run folder), `device`,
    `policy` (PackedLinear policy of packed models: memory, speed, int8, int8-packed); `cls`: the model class
    (TerDiT or a subclass: what `cls.from_pretrained` passes). An unknown keyword is a TerditError.
    """
    known = diffusers_load_kwargs() | {"torch_dtype", "dtype"}  # dtype: diffusers >= 0.36's name, taken here
    unknown = sorted(set(kwargs) - known - set(cls._get_init_keys(cls)))
    if unknown:
        raise TerditError(f"from_pretrained: unexpected keyword(s) {', '.join(unknown)}")
    dtype = as_dtype(kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None))
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    folder = resolve_dir(path_or_id, subfolder=kwargs.pop("subfolder", None),
                         local_files_only=bool(kwargs.get("local_files_only")), **hub_kwargs)
    path, kind = model_dir(folder)
    if kind in TERDIT_LAYOUTS:
        extra = sorted(set(kwargs) - _TERDIT_LAYOUT_KWARGS)
        if extra:
            raise TerditError(f"{path}: {', '.join(extra)} do(es) not apply to a {kind} folder")
        return _open_terdit_layout(path, kind, ema=ema, checkpoint=checkpoint, device=device or "cpu",
                                   dtype=dtype, policy=policy)
    if kind is not Kind.PRETRAINED:
        raise TerditError(
            f"{path}: not a terdit model directory (expected a run folder, a deploy directory, "
            f"a pipeline folder, or {CONFIG_FILE} + diffusion_pytorch_model.safetensors)"
        )
    model = _open_pretrained(cls, path, dtype, kwargs)
    return model.to(device) if device is not None else model


def _open_pretrained(cls: type[TerDiT], path: Path, dtype: torch.dtype | None, kwargs: dict[str, Any]) -> TerDiT:
    """diffusers' own loader on a local pretrained folder, its errors as TerditErrors naming the folder."""
    from diffusers import ModelMixin

    _check_config_keys(cls, path / CONFIG_FILE)
    kwargs["local_files_only"] = True  # resolved to a local directory: no network from here on
    # without accelerate diffusers falls back to a full init and warns; choose the fallback up front
    kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
    try:
        return ModelMixin.from_pretrained.__func__(cls, str(path), torch_dtype=dtype, **kwargs)
    except (RuntimeError, ValueError) as e:  # shapes that do not fit, missing tensors; or an option refused
        if not any(w in str(e).lower() for w in ("shape", "size mismatch", "missing", "unexpected key")):
            raise TerditError(f"{path}: {_short(e)}") from e
        raise TerditError(f"{path}: the weights file does not match {CONFIG_FILE} ({_short(e)})") from e
    except OSError as e:  # e.g. a variant or file type the folder lacks
        raise TerditError(f"{path}: {_short(e)}") from e


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _check_config_keys(cls: type, path: Path) -> None:
    """diffusers warns about unknown config.json keys and goes on; for a TerDiT that is a foreign file."""
    from terdit.io import read_json

    config = read_json(path)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in cls._get_init_keys(cls))
    if unknown:
        raise TerditError(f"{path}: unknown keys {unknown} (not a TerDiT config)")


def _open_terdit_layout(path: Path, kind: Kind, *, ema: bool, checkpoint: str | Path | None,
                        device: str | torch.device, dtype: torch.dtype | None, policy: str) -> TerDiT:
    if kind is Kind.RUN:
        from terdit.models.runs import load_run_model, load_train_args

        model = load_run_model(path, ema=ema, checkpoint=checkpoint, device=str(device))
        model.training_info = load_train_args(path)
        return model.to(dtype) if dtype is not None else model
    if kind is Kind.LEGACY:
        from terdit.models.configs import TerDiTConfig
        from terdit.models.runs import load_weights_into

        model = TerDiT(TerDiTConfig.load(path / CONFIG_FILE))
        load_weights_into(model, path / DEPLOY_WEIGHTS)
        model = model.to(device).eval()
        return model.to(dtype) if dtype is not None else model
    from terdit.deploy.loader import load_deployed

    return load_deployed(path, device=device, dtype=dtype or torch.float32, policy=policy)


def from_pretrained_hook(cls: type[TerDiT], pretrained_model_name_or_path: str | Path, **kwargs: Any) -> TerDiT:
    """`TerDiT.from_pretrained` (registered by terdit.loading): `open_model` with the class asked for."""
    return open_model(pretrained_model_name_or_path, cls=cls, **kwargs)


__all__ = ["META_INIT_THRESHOLD", "as_dtype", "diffusers_load_kwargs", "hub_model_subfolder", "open_model",
           "resolve_dir"]
