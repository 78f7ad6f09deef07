"""The Hugging Face Hub, and writing a model: `TerDiT.save_pretrained` / `push_to_hub` (terdit.loading registers
these as the model's hooks).

save_pretrained writes diffusers' pair `config.json` + `diffusion_pytorch_model[.variant].safetensors` plus
terdit's model card; a packed model writes a deploy directory instead. Reading is terdit.loading.open's.

A repo id is downloaded once into the Hugging Face cache. Offline (HF_HUB_OFFLINE=1, local_files_only=True,
or the Hub not answering within HUB_TIMEOUT seconds) it is read from the cache only, and a miss is a
TerditError at once, not huggingface_hub's minute of retries.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils import (  # huggingface_hub.utils: the errors' home in every supported version
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from terdit.errors import TerditError
from terdit.io import follow_umask
from terdit.loading.modelcard import model_card

HUB_TIMEOUT = 3.0  # seconds to reach the Hub (TCP connect, DNS included) before treating it as offline

_TRUE = {"1", "on", "yes", "true"}


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
    return snapshot(repo_id, allow_patterns, _offline_reason(local_files_only), "the repository", **hub_kwargs)


def snapshot(repo_id: str, allow_patterns: list[str], offline: str | None, what: str, **hub_kwargs: Any) -> Path:
    """hub_snapshot with the offline answer already asked (`offline`: why the cache alone is read, or None)."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=offline is not None,
                                      etag_timeout=HUB_TIMEOUT, **hub_kwargs))
    except _HUB_ERRORS as e:
        raise _hub_error(repo_id, what, e, offline) from e


# -- writing a model -------------------------------------------------------------------------------------------
class TerDiTHubMixin:
    """TerDiT's save_pretrained / push_to_hub, which keep a packed model packed and write terdit's model card.

    A model loaded from a deploy directory (packed ternary layers) saves back as a deploy directory. Not a base
    class of TerDiT (the model layer imports nothing above it): terdit.loading installs these two methods as the
    model's hooks (terdit.models.terdit.set_loading_hooks).
    """

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


def _save_deploy(model: Any, directory: Path) -> None:
    """config.json with its "deploy" section + model.safetensors with the packed layers (the one deploy writer)."""
    from terdit.deploy.export import write_deploy_dir

    write_deploy_dir(model, directory, replace=False)


__all__ = ["HUB_TIMEOUT", "TerDiTHubMixin", "hub_file", "hub_reachable", "hub_snapshot", "is_offline"]
