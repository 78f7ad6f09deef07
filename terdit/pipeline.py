"""`TerDiTPipeline`: class labels -> images, in the shape of a diffusers pipeline.

    pipe = TerDiTPipeline.from_pretrained("runs/imagenet256")          # or a pipeline folder / Hub repo id
    images = pipe(["golden retriever", 207], guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images

Components: `transformer` (a TerDiT, packed or not), `vae` (a diffusers AutoencoderKL, or None for
pixel-space models such as digits) and `scheduler`: None or a `GaussianDiffusionSampler` runs terdit's own
sampler (DiT's respaced DDPM / DDIM, the reference), or any diffusers scheduler; `diffusers_scheduler()` builds
DDPM, DDIM and DPM-Solver with TerDiT's training schedule. Guidance is terdit's `guided_model_fn` (on the eps
channels; the variance channels come from the conditional pass).

What each diffusers scheduler is given: DDPMScheduler with variance_type "learned"/"learned_range" takes the
whole output (eps and the variance interpolation v) and splits it itself; every other scheduler takes eps
alone (DPMSolverMultistepScheduler's learned variance types would cut `model_output[:, :3]`, which only fits
RGB pixel models, so they are refused).

diffusers' DDPMScheduler(variance_type="learned_range", timestep_spacing="linspace") computes the same step
as GaussianDiffusion.ddpm_step: its min_log is log(posterior variance) clamped at 1e-20 where ours is the
clipped log (they differ only at t = 0, where neither adds noise), its schedule is float32 where ours is
float64 (differences ~1e-6 relative), and it draws per-step noise from the generator at every step but the
last, exactly as our sampler consumes it, so both give the same samples for the same generator.
tests/test_pipeline.py checks this.

A pipeline folder (save_pretrained) is diffusers-shaped: model_index.json, transformer/ (TerDiT
save_pretrained: config.json + model.safetensors, or a deploy directory), vae/ (AutoencoderKL) and
scheduler/ (scheduler_config.json).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from terdit.diffusion import GaussianDiffusion, guided_model_fn
from terdit.errors import TerditError
from terdit.io import atomic_write_text, read_json
from terdit.models.terdit import TerDiT

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
NUM_TRAIN_TIMESTEPS = 1000
# TerDiT's training schedule in diffusers' terms (GaussianDiffusion: linear betas 1e-4 .. 0.02, eps prediction).
SCHEDULE = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                prediction_type="epsilon", timestep_spacing="linspace")


@lru_cache(maxsize=1)
def imagenet_classes() -> dict[int, str]:
    """The 1000 ILSVRC-2012 class names, index -> "name, synonym, ..." (WordNet lemmas, the usual order)."""
    text = resources.files("terdit").joinpath("assets/imagenet_classes.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text).items()}


def label_lookup(id2label: dict[int, str]) -> dict[str, list[int]]:
    """Lower-cased name -> class ids; every comma-separated synonym of a class is a name of it."""
    table: dict[str, list[int]] = {}
    for idx, names in id2label.items():
        for name in names.split(","):
            key = name.strip().lower()
            if key and idx not in table.setdefault(key, []):
                table[key].append(idx)
    return table


# -- terdit's own sampler as a pipeline component --------------------------------------------------------------
@dataclass
class GaussianDiffusionSampler:
    """Marks "use terdit's GaussianDiffusion" (DiT's sampler) in a pipeline; saves like a diffusers scheduler."""

    sampler: str = "ddpm"
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise TerditError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")

    def save_pretrained(self, directory: str | Path) -> None:
        config = {"_class_name": type(self).__name__, "_library": "terdit", "sampler": self.sampler, "eta": self.eta}
        atomic_write_text(Path(directory) / SCHEDULER_CONFIG, json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GaussianDiffusionSampler:
        return cls(sampler=config.get("sampler", "ddpm"), eta=float(config.get("eta", 0.0)))


def diffusers_scheduler(name: str = "DDPMScheduler", **overrides: Any):
    """A diffusers scheduler on TerDiT's training schedule: "DDPMScheduler" (learned-range variance),
    "DDIMScheduler" or "DPMSolverMultistepScheduler" (or any diffusers scheduler class name)."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "step"):
        raise TerditError(f"{name!r} is not a diffusers scheduler")
    kwargs: dict[str, Any] = dict(SCHEDULE)
    if name == "DDPMScheduler":
        kwargs.update(variance_type="learned_range", clip_sample=False)
    elif name == "DDIMScheduler":
        # DDIM steps from t to t - 1000 // steps whatever its timestep list says: only "trailing" (999, 899, ..)
        # and "leading" lists are spaced that way; "trailing" starts at t = 999 as DiT's samplers do.
        kwargs.update(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    kwargs.update(overrides)
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def _load_scheduler(directory: Path):
    path = directory / SCHEDULER_CONFIG
    if not path.is_file():
        raise TerditError(f"{directory}: no {SCHEDULER_CONFIG}")
    config = read_json(path)
    name = config.get("_class_name")
    if name == GaussianDiffusionSampler.__name__:
        return GaussianDiffusionSampler.from_config(config)
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise TerditError(f"{path}: unknown scheduler class {name!r}")
    return cls.from_config(config)


@dataclass
class TerDiTPipelineOutput:
    """`images`: a list of PIL images, an (N, H, W, C) float array in [0, 1], an (N, C, H, W) tensor in
    [0, 1] ("pt"), or the model-space latents ("latent")."""

    images: Any

    def __getitem__(self, i: int) -> Any:  # tuple-like, as diffusers' outputs
        return (self.images,)[i]


class TerDiTPipeline:
    """Class-conditional sampling with a TerDiT, a VAE (optional) and a scheduler."""

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module | None = None,
        scheduler: Any = None,
        id2label: dict[int, str] | None = None,
    ) -> None:
        if not hasattr(transformer, "config"):
            raise TerditError("transformer: expected a TerDiT (a module with a .config)")
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler if scheduler is not None else GaussianDiffusionSampler()
        self.custom_id2label = {int(k): str(v) for k, v in id2label.items()} if id2label is not None else None

    # -- labels ---------------------------------------------------------------------------------------------
    @property
    def id2label(self) -> dict[int, str]:
        """Class names: the custom table if given, the ImageNet names for 1000-class models, else none."""
        if self.custom_id2label is not None:
            return self.custom_id2label
        return imagenet_classes() if self.transformer.config.num_classes == 1000 else {}

    @property
    def labels(self) -> dict[str, list[int]]:
        return label_lookup(self.id2label)

    def get_label_ids(self, labels: int | str | Sequence[int | str] | torch.Tensor) -> list[int]:
        """Class ids for ints and class names (any comma-separated synonym, case-insensitive)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.reshape(-1).tolist()
        if isinstance(labels, (int, str)):
            labels = [labels]
        n = self.transformer.config.num_classes
        table: dict[str, list[int]] | None = None
        ids = []
        for label in labels:
            if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
                table = table if table is not None else self.labels
                if not table:
                    raise TerditError(f"class name {label!r}: this model has no class names (pass id2label=...)")
                found = table.get(label.strip().lower())
                if not found:
                    raise TerditError(f"unknown class name {label!r}; see pipe.id2label for the names")
                if len(found) > 1:
                    raise TerditError(f"class name {label!r} is ambiguous: classes {found}; pass the id instead")
                idx = found[0]
            else:
                try:
                    idx = int(label)
                except (TypeError, ValueError):
                    raise TerditError(f"class label {label!r}: expected an int or a class name") from None
            if not 0 <= idx < n:
                raise TerditError(f"class id {idx} is outside [0, {n})")
            ids.append(idx)
        if not ids:
            raise TerditError("no class labels given")
        return ids

    # -- devices ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TerDiTPipeline:
        self.transformer.to(device=device, dtype=dtype)
        if self.vae is not None:
            self.vae.to(device=device, dtype=dtype)
        return self

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float = 4.0,
        num_inference_steps: int = 250,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        guide_channels: int | None = None,
        return_dict: bool = True,
        progress: bool = False,
    ) -> TerDiTPipelineOutput | tuple:
        """Sample one image per label (ids, or names from `id2label`). Initial and per-step noise come from
        `generator` (a CPU generator: terdit's sampler draws on the CPU so results do not depend on the device).
        `guide_channels=3` reproduces the public DiT code's guidance of 3 of 4 latent channels (default: all)."""
        if output_type not in OUTPUT_TYPES:
            raise TerditError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if guidance_scale < 0:
            raise TerditError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if not 1 <= num_inference_steps <= NUM_TRAIN_TIMESTEPS:
            raise TerditError(f"num_inference_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_inference_steps}")
        cfg = self.transformer.config
        if self.vae is None and output_type != "latent" and cfg.in_channels not in (1, 3):
            raise TerditError(f"the model works in a {cfg.in_channels}-channel latent space: pass vae=... to the "
                              "pipeline, or output_type='latent'")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        elif generator.device.type != "cpu":
            raise TerditError("generator must be a CPU torch.Generator")
        ids = self.get_label_ids(class_labels)
        from terdit.deploy.labels import map_labels  # ImageNet ids -> a released model's own class order

        device = self.device
        labels = map_labels(self.transformer, torch.tensor(ids, dtype=torch.long)).to(device)
        shape = (len(ids), cfg.in_channels, cfg.input_size, cfg.input_size)
        null_rows = self.transformer.y_embedder.embedding_table.num_embeddings > cfg.num_classes
        if guidance_scale != 1.0 and not null_rows:
            raise TerditError("this model has no null class (class_dropout_prob = 0): use guidance_scale=1")
        fn = guided_model_fn(self.transformer, labels, guidance_scale, cfg.num_classes, guide_channels)
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            if isinstance(self.scheduler, GaussianDiffusionSampler):
                latents = self._sample_terdit(fn, shape, num_inference_steps, generator, progress)
            else:
                latents = self._sample_diffusers(fn, shape, num_inference_steps, generator, progress)
        finally:
            self.transformer.train(was_training)
        images = self._postprocess(latents, output_type)
        return TerDiTPipelineOutput(images) if return_dict else (images,)

    def _model_dtype(self) -> torch.dtype:
        dtype = next(self.transformer.parameters()).dtype
        return dtype if dtype.is_floating_point else torch.float32

    def _sample_terdit(self, fn, shape, steps: int, generator: torch.Generator, progress: bool) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator).to(self.device, self._model_dtype())
        diffusion = GaussianDiffusion.create(steps, learn_sigma=self.transformer.config.learn_sigma)
        s = self.scheduler
        return diffusion.sample(fn, noise, sampler=s.sampler, eta=s.eta, generator=generator, progress=progress)

    def _sample_diffusers(self, fn, shape, steps: int, generator: torch.Generator, progress: bool) -> torch.Tensor:
        sched = self.scheduler
        channels = shape[1]
        variance = getattr(sched.config, "variance_type", None)
        learned = variance in ("learned", "learned_range")
        full_output = learned and type(sched).__name__ == "DDPMScheduler" and self.transformer.config.learn_sigma
        if learned and not full_output and channels != 3:
            raise TerditError(f"{type(sched).__name__} with variance_type={variance!r} keeps only the first 3 "
                              "output channels; configure it with variance_type=None (it is given eps)")
        step_params = inspect.signature(sched.step).parameters
        sched.set_timesteps(steps, device=self.device)
        dtype = self._model_dtype()
        x = torch.randn(shape, generator=generator).to(self.device, dtype) * sched.init_noise_sigma
        for t in tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False):
            x_in = sched.scale_model_input(x, t)
            tt = torch.full((shape[0],), int(t), device=self.device, dtype=torch.long)
            out = fn(x_in, tt)
            model_output = out if full_output else out[:, :channels]
            kwargs = {"generator": generator} if "generator" in step_params else {}
            x = sched.step(model_output.float(), t, x.float(), **kwargs).prev_sample.to(dtype)
        return x

    def _postprocess(self, latents: torch.Tensor, output_type: str) -> Any:
        latents = latents.float()
        if output_type == "latent":
            return latents
        if self.vae is not None:
            from terdit.data.vae import VAE

            images = VAE(self.vae, spec="pipeline").decode(latents)
        else:
            images = latents.clamp(-1, 1)
        unit = (images + 1) / 2  # [0, 1], diffusers' convention for "np" and "pt"
        if output_type == "pt":
            return unit.cpu()
        if output_type == "np":
            return unit.permute(0, 2, 3, 1).cpu().numpy()
        from terdit.sample import to_uint8

        arr = to_uint8(images)
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]

    # -- folders ---------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """model_index.json + transformer/ + vae/ + scheduler/, diffusers' layout."""
        import diffusers

        from terdit import __version__

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(out / "transformer")
        index: dict[str, Any] = {
            "_class_name": type(self).__name__,
            "_terdit_version": __version__,
            "_diffusers_version": diffusers.__version__,
            "transformer": ["terdit", type(self.transformer).__name__],
            "vae": [None, None],
            "scheduler": [None, None],
            "id2label": {str(k): v for k, v in self.custom_id2label.items()} if self.custom_id2label else None,
        }
        if self.vae is not None:
            self.vae.save_pretrained(out / "vae")
            index["vae"] = [type(self.vae).__module__.split(".")[0], type(self.vae).__name__]
        (out / "scheduler").mkdir(exist_ok=True)
        self.scheduler.save_pretrained(out / "scheduler")
        lib = "terdit" if isinstance(self.scheduler, GaussianDiffusionSampler) else "diffusers"
        index["scheduler"] = [lib, type(self.scheduler).__name__]
        atomic_write_text(out / MODEL_INDEX, json.dumps(index, indent=2) + "\n")
        return out

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload TerDiTPipeline") -> str:
        """save_pretrained into a temporary folder and upload it as one commit."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        transformer: nn.Module | None = None,
        vae: nn.Module | None | str = "auto",
        scheduler: Any = "auto",
        id2label: dict[int, str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        ema: bool = True,
        local_files_only: bool = False,
        **hub_kwargs: Any,
    ) -> TerDiTPipeline:
        """A pipeline folder or Hub repo (model_index.json), or any model TerDiT.from_pretrained opens (a run
        folder brings the VAE it was trained with). Components passed here replace the stored ones."""
        from terdit.hub import _looks_local, hub_snapshot, path_kind

        name = str(path_or_repo_id)
        local = Path(name).expanduser()
        if not local.exists() and not _looks_local(name):
            patterns = [MODEL_INDEX, "transformer/*", "vae/*", "scheduler/*", "config.json", "model.safetensors"]
            local = hub_snapshot(name, patterns, local_files_only=local_files_only, **hub_kwargs)
        elif not local.exists():
            raise TerditError(f"{name}: no such directory (and not a Hub repo id like owner/name)")
        kind = path_kind(local)
        index: dict[str, Any] = {}
        if kind == "pipeline":
            try:
                index = json.loads((local / MODEL_INDEX).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TerditError(f"{local / MODEL_INDEX}: not readable JSON ({e})") from e
        if transformer is None:
            transformer = TerDiT.from_pretrained(local, ema=ema, device=device, dtype=dtype)
        if isinstance(vae, str) and vae == "auto":
            vae = _stored_vae(local, kind, index, device)
        elif isinstance(vae, str):
            from terdit.data.vae import load_vae

            vae = load_vae(vae, device=device).model
        if isinstance(scheduler, str) and scheduler == "auto":
            scheduler = _load_scheduler(local / "scheduler") if (local / "scheduler").is_dir() else None
        elif isinstance(scheduler, str):
            scheduler = GaussianDiffusionSampler(scheduler) if scheduler in ("ddpm", "ddim") \
                else diffusers_scheduler(scheduler)
        if id2label is None and index.get("id2label"):
            id2label = {int(k): v for k, v in index["id2label"].items()}
        return cls(transformer, vae, scheduler, id2label)


def _stored_vae(local: Path, kind: str | None, index: dict[str, Any], device: str | torch.device):
    """The VAE of a pipeline folder (vae/) or the one a training run was trained with; None for pixel models."""
    if kind == "pipeline":
        if not (local / "vae").is_dir() or index.get("vae", [None])[0] is None:
            return None
        import importlib.util

        from diffusers import AutoencoderKL

        # low_cpu_mem_usage needs accelerate; saying so up front avoids diffusers' warning when it is absent
        low_mem = importlib.util.find_spec("accelerate") is not None
        try:
            return AutoencoderKL.from_pretrained(local / "vae", low_cpu_mem_usage=low_mem).to(device)
        except (OSError, ValueError) as e:
            raise TerditError(f"{local / 'vae'}: cannot load the VAE ({e})") from e
    if kind == "run":
        from terdit.run import load_train_args

        spec = load_train_args(local).get("vae")
        if spec:
            from terdit.data.vae import load_vae

            return load_vae(spec, device=device).model
    return None


__all__ = ["GaussianDiffusionSampler", "TerDiTPipeline", "TerDiTPipelineOutput", "diffusers_scheduler",
           "imagenet_classes", "label_lookup"]
