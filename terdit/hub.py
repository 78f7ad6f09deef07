"""Hugging Face Hub integration: `TerDiT.save_pretrained` / `from_pretrained` / `push_to_hub`.

TerDiT inherits `TerDiTHubMixin` (huggingface_hub's PyTorchModelHubMixin), so a model saves as the Hub's
usual pair `config.json` (the TerDiTConfig fields) + `model.safetensors` and pushes with `push_to_hub`.
`from_pretrained` takes more than the mixin's two layouts, so every artefact terdit writes opens in one call:

    run folder        config.json + checkpoints/NNNNNNN/   EMA weights of the latest checkpoint (default)
    deploy directory  config.json with a "deploy" section  packed model (terdit.deploy.load_deployed)
    release directory model_args.pth + consolidated*.pth  packed model (the public checkpoints)
    pretrained dir    config.json + model.safetensors     what save_pretrained writes
    pipeline folder   model_index.json + transformer/      its transformer
    Hub repo id       owner/name holding a pretrained dir, a deploy directory or a pipeline folder

A repo id is downloaded once into the Hugging Face cache. Offline (HF_HUB_OFFLINE=1, local_files_only=True,
or the Hub not answering within HUB_TIMEOUT seconds) it is read from the cache only, and a miss is a
TerditError at once, not huggingface_hub's minute of retries. A local path never touches the network.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from terdit.errors import TerditError
from terdit.models.configs import TerDiTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PIPELINE_INDEX = "model_index.json"
RELEASE_ARGS = "model_args.pth"
HUB_TIMEOUT = 3.0  # seconds to reach the Hub (TCP connect, DNS included) before treating it as offline

META_INIT_THRESHOLD = 2**24  # depth * dim^2 above which from_pretrained skips the random init
PAPER_URL = "https://arxiv.org/abs/2405.14854"
_TRUE = {"1", "on", "yes", "true"}


# -- what a local path is -----------------------------------------------------------------------------
def path_kind(path: str | Path) -> str | None:
    """'run' | 'deploy' | 'release' | 'pipeline' | 'pretrained' for a local directory terdit can open, else None."""
    from terdit.deploy.format import is_deploy_dir
    from terdit.run import checkpoint_dirs

    p = Path(path)
    if not p.is_dir():
        return None
    if (p / CONFIG_FILE).is_file() and checkpoint_dirs(p):
        return "run"
    if is_deploy_dir(p):
        return "deploy"
    if (p / RELEASE_ARGS).is_file():
        return "release"
    if (p / PIPELINE_INDEX).is_file() and (p / "transformer").is_dir():
        return "pipeline"
    if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
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
    """A local directory for a path or a Hub repo id (downloading config.json and the weights file)."""
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
    if _download(name, prefix + WEIGHTS_FILE, offline, **hub_kwargs) is None:
        raise TerditError(f"{name}: the Hub repository has no {prefix}{WEIGHTS_FILE}")
    return config.parent


# -- the mixin ----------------------------------------------------------------------------------------------
class TerDiTHubMixin(
    PyTorchModelHubMixin,
    library_name="terdit",
    paper_url=PAPER_URL,
    tags=["terdit", "diffusion", "ternary", "class-conditional-image-generation"],
):
    """save_pretrained / push_to_hub through huggingface_hub; from_pretrained for every terdit layout.

    A model loaded from a deploy directory (packed ternary layers) saves back as a deploy directory.
    """

    config: TerDiTConfig

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        ema: bool = True,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        policy: str = "memory",
        subfolder: str | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ):
        """A TerDiT in eval mode from a run folder, deploy/release/pretrained/pipeline directory or Hub repo id.

        `ema`, `checkpoint`: which weights of a run folder; `dtype`: compute dtype (float tensors of a deploy
        directory default to fp32); `policy`: PackedLinear policy of packed models ("memory" or "speed").
        """
        hub_kwargs = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token)
        path = resolve_model_dir(pretrained_model_name_or_path, subfolder=subfolder,
                                 local_files_only=local_files_only, **hub_kwargs)
        kind = path_kind(path)
        if kind == "pipeline":
            path, kind = path / "transformer", path_kind(path / "transformer")
        if kind == "run":
            from terdit.run import load_run_model

            model = load_run_model(path, ema=ema, checkpoint=checkpoint, device=str(device))
            return model.to(_dtype(dtype)) if dtype is not None else model
        if kind in ("deploy", "release"):
            from terdit.deploy import load_deployed

            return load_deployed(path, device=device, dtype=_dtype(dtype) or torch.float32, policy=policy)
        if kind != "pretrained":
            raise TerditError(
                f"{path}: not a terdit model directory (expected a run folder, a deploy directory, "
                f"a pipeline folder, or {CONFIG_FILE} + {WEIGHTS_FILE})"
            )
        # The mixin reads config.json and hands it to _from_pretrained; the path is local, so no network.
        return super().from_pretrained(path, local_files_only=True, map_location=str(device), dtype=dtype,
                                       **model_kwargs)

    @classmethod
    def _from_pretrained(  # type: ignore[override]
        cls,
        *,
        model_id: str,
        config: dict[str, Any] | TerDiTConfig | None = None,
        map_location: str = "cpu",
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        **_hub: Any,
    ):
        """Build from config.json on the meta device and assign the saved tensors (no random init)."""
        from terdit.io import load_tensors

        if config is None:
            raise TerditError(f"{model_id}: no {CONFIG_FILE}")
        cfg = config if isinstance(config, TerDiTConfig) else TerDiTConfig.from_dict(dict(config))
        # Large models are built on the meta device (no random init, no second copy of the weights); small
        # ones on the CPU, as meta-device init imports torch._dynamo, which takes longer than they do.
        big = cfg.depth * cfg.dim * cfg.dim > META_INIT_THRESHOLD
        with torch.device("meta" if big else "cpu"):
            model = cls(cfg)  # type: ignore[call-arg]
        state = load_tensors(Path(model_id) / WEIGHTS_FILE, device=map_location)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if (strict and (missing or unexpected)) or bad:
            raise TerditError(
                f"{model_id}/{WEIGHTS_FILE}: does not match {CONFIG_FILE} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad[:3]})"
            )
        model.load_state_dict(state, strict=strict, assign=True)
        if dtype is not None:
            model.to(_dtype(dtype))
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        """config.json + model.safetensors; packed models write a deploy directory (same two file names)."""
        from terdit.io import atomic_write_text, save_tensors

        info = getattr(self, "deploy_info", None)
        if info:
            from terdit.deploy.export import deploy_tensors
            from terdit.deploy.format import DeployInfo, parse_dtype

            deploy = DeployInfo(**info)
            tensors, table, int8_keys = deploy_tensors(
                self, deploy.format, parse_dtype(deploy.dtype), int8=bool(deploy.int8_rows)
            )
            deploy.packed, deploy.int8_rows = table, int8_keys
            save_tensors(save_directory / WEIGHTS_FILE, tensors,
                         metadata={"format": deploy.format, "terdit_deploy": str(deploy.version)})
            payload = {**self.config.to_dict(), "deploy": deploy.to_dict()}
        else:
            save_tensors(save_directory / WEIGHTS_FILE, self.state_dict(), metadata={"format": "pt"})
            payload = self.config.to_dict()
        atomic_write_text(save_directory / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from terdit.deploy.format import parse_dtype

    return parse_dtype(dtype)


__all__ = ["TerDiTHubMixin", "hub_file", "hub_reachable", "hub_snapshot", "is_offline", "path_kind",
           "resolve_model_dir"]
