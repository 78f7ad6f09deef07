"""Hugging Face Hub integration: `TerDiT.save_pretrained` / `from_pretrained` / `push_to_hub`.

TerDiT is a diffusers model (ModelMixin + ConfigMixin): save_pretrained writes diffusers' pair `config.json` +
`diffusion_pytorch_model[.variant].safetensors` (plus terdit's model card) and from_pretrained takes all of
diffusers' keywords. `TerDiTHubMixin` widens from_pretrained so every artefact terdit writes opens in one call,
in the dtype asked for (`torch_dtype`):

    run folder        config.json + checkpoints/NNNNNNN/   EMA weights of the latest checkpoint (default)
    deploy directory  config.json with a "deploy" section  packed model (terdit.deploy.load_deployed)
    release directory model_args.pth + consolidated*.pth  packed model (the public checkpoints)
    pretrained dir    config.json + diffusion_pytorch_model*.safetensors   what save_pretrained writes (diffusers)
    pipeline folder   model_index.json + transformer/      its transformer
    Hub repo id       owner/name holding a pretrained dir, a deploy directory or a pipeline folder

A repo id is downloaded once into the Hugging Face cache. Offline (HF_HUB_OFFLINE=1, local_files_only=True,
or the Hub not answering within HUB_TIMEOUT seconds) it is read from the cache only, and a miss is a
TerditError at once, not huggingface_hub's minute of retries. A local path never touches the network.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils import (  # huggingface_hub.utils: the errors' home in every supported version
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

from terdit.errors import TerditError
from terdit.io import follow_umask
from terdit.loading.modelcard import model_card

CONFIG_FILE = "config.json"
DEPLOY_WEIGHTS = "model.safetensors"  # a deploy directory's packed weights (terdit.deploy.format)
PIPELINE_INDEX = "model_index.json"
RELEASE_ARGS = "model_args.pth"
META_INIT_THRESHOLD = 2**24  # depth * dim^2 above which terdit builds a model on the meta device (no random init)
HUB_TIMEOUT = 3.0  # seconds to reach the Hub (TCP connect, DNS included) before treating it as offline

_TRUE = {"1", "on", "yes", "true"}


# -- what a local path is -----------------------------------------------------------------------------
def has_weights(path: Path) -> bool:
    """A diffusers weights file (any variant, sharded or not) or terdit's deploy file."""
    return any(path.glob("diffusion_pytorch_model*.safetensors")) or any(path.glob("diffusion_pytorch_model*.bin"))


def path_kind(path: str | Path) -> str | None:
    """'run' | 'deploy' | 'release' | 'legacy' | 'pipeline' | 'pretrained' for a local directory terdit can open,
    else None."""
    from terdit.deploy.format import is_deploy_dir
    from terdit.models.runs import checkpoint_dirs

    p = Path(path)
    if not p.is_dir():
        return None
    if (p / CONFIG_FILE).is_file() and checkpoint_dirs(p):
        return "run"
    if is_deploy_dir(p):
        return "deploy"
    if (p / RELEASE_ARGS).is_file():
        return "release"
    if (p / CONFIG_FILE).is_file() and (p / DEPLOY_WEIGHTS).is_file() and not has_weights(p):
        return "legacy"  # terdit 0.1's save_pretrained: TerDiTConfig json + model.safetensors (full state dict)
    if (p / PIPELINE_INDEX).is_file() and (p / "transformer").is_dir():
        return "pipeline"
    if (p / CONFIG_FILE).is_file() and has_weights(p):
        return "pretrained"
    return None


def _looks_local(name: str) -> bool:
    """Paths that cannot be repo ids: absolute, ./ ../ ~, or more than one slash."""
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


# -- the Hub, with a fast offline answer ------------------------------------------------------------------
def is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within `timeout` seconds.

    huggingface_hub retries a failed request for about 25 s with backoff; asking once, in a thread so that a
    slow DNS lookup is bounded too, lets an unreachable Hub fall back to the cache at once.
    """
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _offline_reason(local_files_only: bool) -> str | None:
    if local_files_only:
        return "local_files_only=True"
    if is_offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return f"the Hub ({constants.ENDPOINT}) did not answer within {HUB_TIMEOUT:g} s"
    return None


def _hub_error(repo_id: str, what: str, e: Exception, offline: str | None) -> TerditError:
    if isinstance(e, LocalEntryNotFoundError) or offline:
        return TerditError(
            f"{repo_id}: no such local directory, and {what} is not in the Hugging Face cache ({offline or e}); "
            f"download it once with network access, or pass a local directory"
        )
    if isinstance(e, RepositoryNotFoundError):
        return TerditError(f"{repo_id}: no such local directory or Hub repository (private? pass token=...)")
    if isinstance(e, RevisionNotFoundError):
        return TerditError(f"{repo_id}: revision not found on the Hub")
    if isinstance(e, EntryNotFoundError):
        return TerditError(f"{repo_id}: the Hub repository has no {what}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TerditError(f"{repo_id}: cannot download {what} from the Hub ({first})")


_HUB_ERRORS = (HfHubHTTPError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, OSError)


def hub_file(repo_id: str, filename: str, *, local_files_only: bool = False, required: bool = True,
             **hub_kwargs: Any) -> Path | None:
    """One file of a Hub repo as a local path; None when the repo lacks it (or, offline, the cache does and the
    file is not `required`)."""
    return _download(repo_id, filename, _offline_reason(local_files_only), required, **hub_kwargs)


def _download(repo_id: str, filename: str, offline: str | None, required: bool = True,
              **hub_kwargs: Any) -> Path | None:
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline is not None,
                                    etag_timeout=HUB_TIMEOUT, **hub_kwargs))
    except LocalEntryNotFoundError as e:
        if not required:
            return None
        raise _hub_error(repo_id, filename, e, offline) from e
    except EntryNotFoundError:
        return None
    except _HUB_ERRORS as e:
        raise _hub_error(repo_id, filename, e, offline) from e


def hub_snapshot(repo_id: str, allow_patterns: list[str], *, local_files_only: bool = False,
                 **hub_kwargs: Any) -> Path:
    """The files of a Hub repo matching `allow_patterns`, as a local snapshot folder."""
    offline = _offline_reason(local_files_only)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=offline is not None,
                                      etag_timeout=HUB_TIMEOUT, **hub_kwargs))
    except _HUB_ERRORS as e:
        raise _hub_error(repo_id, "the repository", e, offline) from e


def resolve_model_dir(name_or_path: str | Path, *, subfolder: str | None = None, local_files_only: bool = False,
                      **hub_kwargs: Any) -> Path:
    """A local directory for a path or a Hub repo id (downloading config.json and the safetensors weights:
    every variant of diffusers' file, or terdit's deploy file)."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise TerditError(f"{name}: expected a directory, got a file")
        return local / subfolder if subfolder else local
    if _looks_local(name):
        raise TerditError(f"{name}: no such directory (and not a Hub repo id like owner/name)")
    offline = _offline_reason(local_files_only)  # asked once: each probe may take HUB_TIMEOUT seconds
    prefix = f"{subfolder}/" if subfolder else ""
    if not subfolder and _download(name, PIPELINE_INDEX, offline, required=False, **hub_kwargs) is not None:
        prefix = "transformer/"  # a pipeline repo: the transformer lives in transformer/
    config = _download(name, prefix + CONFIG_FILE, offline, **hub_kwargs)
    if config is None:
        raise TerditError(f"{name}: the Hub repository has no {prefix}{CONFIG_FILE} (not a terdit model)")
    patterns = [prefix + DEPLOY_WEIGHTS, prefix + "diffusion_pytorch_model*.safetensors", prefix + CONFIG_FILE]
    try:
        root = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=offline is not None,
                                      etag_timeout=HUB_TIMEOUT, **hub_kwargs))
    except _HUB_ERRORS as e:
        raise _hub_error(name, "the weights", e, offline) from e
    directory = root / prefix if prefix else root
    if not (has_weights(directory) or (directory / DEPLOY_WEIGHTS).is_file()):
        raise TerditError(f"{name}: the Hub repository has no weights in {prefix or './'}")
    return directory


# -- the model mixin -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def diffusers_load_kwargs() -> frozenset[str]:
    """The keywords diffusers' ModelMixin.from_pretrained understands (read from its source, so that this stays
    true across diffusers versions): anything else given to from_pretrained is a mistake, not to be dropped."""
    from diffusers import ModelMixin

    return frozenset(re.findall(r'kwargs\.pop\(\s*"(\w+)"', inspect.getsource(ModelMixin.from_pretrained)))


_TERDIT_LAYOUT_KWARGS = frozenset({"torch_dtype", "dtype", "subfolder", "local_files_only", "revision", "cache_dir",
                                   "force_download", "token", "low_cpu_mem_usage", "use_safetensors"})


class TerDiTHubMixin:
    """`from_pretrained` for every terdit layout on top of diffusers' ModelMixin (which TerDiT also inherits),
    and save_pretrained / push_to_hub that keep a packed model packed and write terdit's model card.

    A model loaded from a deploy directory (packed ternary layers) saves back as a deploy directory.
    """

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        ema: bool = True,
        checkpoint: str | Path | None = None,
        device: str | torch.device | None = None,
        policy: str = "memory",
        **kwargs: Any,
    ):
        """A TerDiT in eval mode from a run folder, deploy/release/pretrained/pipeline directory or Hub repo id.

        Every keyword of diffusers' ModelMixin.from_pretrained works for pretrained folders (`torch_dtype`,
        `variant`, `subfolder`, `use_safetensors`, `device_map`, ...); `torch_dtype` (or `dtype`, also "bf16")
        applies to every layout. terdit's own: `ema`, `checkpoint` (which weights of a run folder), `device`,
        `policy` (PackedLinear policy of packed models: "memory" or "speed"). An unknown keyword is a TerditError.
        """
        from diffusers import ModelMixin

        known = diffusers_load_kwargs() | {"torch_dtype", "dtype"}  # dtype: diffusers >= 0.36's name, taken here
        unknown = sorted(set(kwargs) - known - set(cls._get_init_keys(cls)))
        if unknown:
            raise TerditError(f"from_pretrained: unexpected keyword(s) {', '.join(unknown)}")
        dtype = _dtype(kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None))
        subfolder = kwargs.pop("subfolder", None)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "force_download", "token") if k in kwargs}
        path = resolve_model_dir(pretrained_model_name_or_path, subfolder=subfolder,
                                 local_files_only=bool(kwargs.get("local_files_only")), **hub_kwargs)
        kind = path_kind(path)
        if kind == "pipeline":
            path, kind = path / "transformer", path_kind(path / "transformer")
        if kind in ("run", "deploy", "release", "legacy"):
            extra = sorted(set(kwargs) - _TERDIT_LAYOUT_KWARGS)
            if extra:
                raise TerditError(f"{path}: {', '.join(extra)} do(es) not apply to a {kind} folder")
            return _load_terdit_layout(path, kind, ema=ema, checkpoint=checkpoint, device=device or "cpu",
                                       dtype=dtype, policy=policy)
        if kind != "pretrained":
            raise TerditError(
                f"{path}: not a terdit model directory (expected a run folder, a deploy directory, "
                f"a pipeline folder, or {CONFIG_FILE} + diffusion_pytorch_model.safetensors)"
            )
        _check_config_keys(cls, path / CONFIG_FILE)
        kwargs["local_files_only"] = True  # resolved to a local directory above: no network from here on
        # without accelerate diffusers falls back to a full init and warns; choose the fallback up front
        kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
        try:
            model = ModelMixin.from_pretrained.__func__(cls, str(path), torch_dtype=dtype, **kwargs)
        except (RuntimeError, ValueError) as e:  # shapes that do not fit, missing tensors
            raise TerditError(f"{path}: the weights file does not match {CONFIG_FILE} ({_short(e)})") from e
        except OSError as e:  # e.g. a variant or file type the folder lacks
            raise TerditError(f"{path}: {_short(e)}") from e
        return model.to(device) if device is not None else model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' save_pretrained (config.json + diffusion_pytorch_model[.variant].safetensors) plus terdit's
        model card (README.md); a packed model writes a deploy directory instead."""
        from diffusers import ModelMixin

        out = Path(save_directory)
        start = time.time()
        if getattr(self, "deploy", None) is not None:
            if kwargs.get("variant") or kwargs.get("safe_serialization") is False:
                raise TerditError("a packed model saves as a deploy directory: variant and .bin do not apply")
            out.mkdir(parents=True, exist_ok=True)
            _save_deploy(self, out)
        else:
            ModelMixin.save_pretrained(self, out, *args, **kwargs)
        (out / "README.md").write_text(model_card(self), encoding="utf-8")
        follow_umask(out, since=start)


    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None) -> str:
        """save_pretrained into a temporary folder (with terdit's model card) and upload it as one commit."""
        import tempfile

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, create_pr=create_pr,
                                     commit_message=commit_message or f"Upload {type(self).__name__}")


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


def _load_terdit_layout(path: Path, kind: str, *, ema: bool, checkpoint: str | Path | None,
                        device: str | torch.device, dtype: torch.dtype | None, policy: str):
    if kind == "run":
        from terdit.models.runs import load_run_model, load_train_args

        model = load_run_model(path, ema=ema, checkpoint=checkpoint, device=str(device))
        model.training_info = load_train_args(path)
        return model.to(dtype) if dtype is not None else model
    if kind == "legacy":
        from terdit.models.configs import TerDiTConfig
        from terdit.models.runs import load_weights_into
        from terdit.models.terdit import TerDiT

        model = TerDiT(TerDiTConfig.load(path / CONFIG_FILE))
        load_weights_into(model, path / DEPLOY_WEIGHTS)
        model = model.to(device).eval()
        return model.to(dtype) if dtype is not None else model
    from terdit.deploy import load_deployed

    return load_deployed(path, device=device, dtype=dtype or torch.float32, policy=policy)


def _save_deploy(model: Any, directory: Path) -> None:
    """config.json with its "deploy" section + model.safetensors with the packed layers (the one deploy writer)."""
    from terdit.deploy.export import write_deploy_dir

    write_deploy_dir(model, directory, replace=False)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from terdit.defaults import parse_dtype

    return parse_dtype(dtype)


__all__ = ["TerDiTHubMixin", "hub_file", "hub_reachable", "hub_snapshot", "is_offline", "path_kind",
           "resolve_model_dir"]
