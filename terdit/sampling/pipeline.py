"""`TerDiTPipeline`: class labels -> images, a diffusers DiffusionPipeline.

    pipe = TerDiTPipeline.from_pretrained("runs/imagenet256")          # or a pipeline folder / Hub repo id
    images = pipe(["golden retriever", 207], guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images

diffusers' own DiTPipeline also runs a 1000-class TerDiT (it reads sample_size / in_channels / out_channels and
uses class 1000 as the null class); this pipeline is for what DiTPipeline cannot do: the learned variance,
pixel-space models without a VAE, other class counts, class names, guidance of 3 channels (`guide_channels`).

Components: `transformer` (a TerDiT, packed or not), `vae` (a diffusers AutoencoderKL, or None for pixel-space
models such as digits) and `scheduler`: a `GaussianDiffusionSampler` (the default) runs terdit's own sampler
(DiT's respaced DDPM / DDIM, the reference), or any DDPM-family diffusers scheduler; `diffusers_scheduler()`
builds DDPM, DDIM and DPM-Solver with TerDiT's training schedule. Schedulers the pipeline cannot drive (flow
matching, non-eps prediction) are refused when the pipeline is built. Guidance is terdit's `guided_model_fn`
(on the eps channels; the variance channels come from the conditional pass).

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

A pipeline folder (save_pretrained, diffusers' writer): model_index.json, transformer/ (TerDiT: config.json +
diffusion_pytorch_model.safetensors, or a deploy directory), vae/ (AutoencoderKL), scheduler/
(scheduler_config.json). Importing this module registers TerDiTPipeline with diffusers, so
`DiffusionPipeline.from_pretrained(folder)` opens it.
"""

# No `from __future__ import annotations`: diffusers (0.33) reads TerDiTPipeline.__init__'s annotations as objects.
import importlib.util
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import ConfigMixin, DiffusionPipeline, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from terdit.diffusion import GaussianDiffusion, guided_model_fn
from terdit.diffusion.sampler import resolve_backend
from terdit.errors import TerditError
from terdit.models.kinds import PIPELINE_INDEX
from terdit.models.terdit import TerDiT

MODEL_INDEX = PIPELINE_INDEX  # model_index.json
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
class GaussianDiffusionSampler(SchedulerMixin, ConfigMixin):
    """Marks "use terdit's GaussianDiffusion" (DiT's respaced DDPM / DDIM, the reference) as a pipeline's scheduler.

    A diffusers scheduler class only so that pipelines save, load and swap it like one: its config carries
    TerDiT's training schedule, so `DDIMScheduler.from_config(pipe.scheduler.config)` gets the right betas.
    The sampling itself is GaussianDiffusion.sample, terdit's one sampling loop (with its backends)."""

    config_name = SCHEDULER_CONFIG
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "ddpm", eta: float = 0.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace",
                 clip_sample: bool = False) -> None:
        if sampler not in ("ddpm", "ddim"):
            raise TerditError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        # timestep_spacing is recorded for schedulers built from this config; GaussianDiffusion respaces as DiT does
        schedule = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                        beta_end=beta_end, prediction_type=prediction_type)
        expected = {k: v for k, v in SCHEDULE.items() if k in schedule}
        if schedule != expected:
            raise TerditError(f"GaussianDiffusionSampler runs TerDiT's training schedule {expected}, got {schedule}")

    @property
    def sampler(self) -> str:
        return self.config.sampler

    @property
    def eta(self) -> float:
        return float(self.config.eta)


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


def check_scheduler(scheduler: Any) -> None:
    """Refuse what the pipeline cannot drive: it needs a discrete-time, eps-predicting noise scheduler
    (one with alphas_cumprod); flow matching and v/x0 prediction would fail, or sample wrongly, later."""
    if isinstance(scheduler, GaussianDiffusionSampler):
        return
    name = type(scheduler).__name__
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
        raise TerditError(f"scheduler: expected a diffusers scheduler or GaussianDiffusionSampler, got {name}")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TerditError(f"scheduler: {name} is not a DDPM-family noise scheduler (flow matching?); TerDiT is a "
                          "discrete-time eps model: use DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, ...")
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise TerditError(f"scheduler: {name} has prediction_type={prediction!r}; TerDiT predicts 'epsilon'")


@dataclass
class TerDiTPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, an (N, H, W, C) float array in [0, 1] ("np"), an (N, C, H, W) tensor
    in [0, 1] ("pt"), or the model-space latents ("latent")."""

    images: Any


class TerDiTPipeline(DiffusionPipeline):
    """Class-conditional sampling with a TerDiT, a VAE (optional: pixel-space models have none) and a scheduler.

    A diffusers DiffusionPipeline: `to(dtype / device)`, `components`, `set_progress_bar_config`,
    `enable_model_cpu_offload`, `save_pretrained`, `push_to_hub`, `DiffusionPipeline.from_pretrained` all work.
    What it adds over diffusers' DiTPipeline: the learned variance (DDPMScheduler with "learned_range", or
    terdit's own sampler), any class count, class names, `guide_channels`, models without a VAE.
    """

    model_cpu_offload_seq = "transformer->vae"
    # both may be left out: no VAE for pixel-space models; the scheduler defaults to GaussianDiffusionSampler
    _optional_components = ["vae", "scheduler"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: TerDiT,
        vae: Optional[nn.Module] = None,  # noqa: UP045 - diffusers < 0.36 reads typing.Union, not X | None
        scheduler: Optional[SchedulerMixin] = None,  # noqa: UP045
        id2label: Optional[dict] = None,  # noqa: UP045
    ) -> None:
        super().__init__()
        if not hasattr(transformer, "config") or not hasattr(transformer.config, "num_classes"):
            raise TerditError("transformer: expected a TerDiT")
        scheduler = scheduler if scheduler is not None else GaussianDiffusionSampler()
        check_scheduler(scheduler)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        table = {int(k): str(v) for k, v in id2label.items()} if id2label else None
        self.register_to_config(id2label=table)
        self.custom_id2label = table


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

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        guide_channels: int | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        backend: str = "auto",
    ) -> TerDiTPipelineOutput | tuple:
        """Sample `num_images_per_prompt` images per label (ImageNet-style ids, or names from `id2label`).

        Arguments and defaults as diffusers' DiTPipeline; guidance applies when guidance_scale != 1 (DiT: > 1).
        `generator`: one generator, or one per image; initial noise is drawn on the generator's device
        (CPU generators give device-independent results). `latents`: the initial noise instead.
        `guide_channels=3` reproduces the public DiT code's guidance of 3 of 4 latent channels (default: all).
        `callback_on_step_end(pipe, i, t, {"latents": ...})` may return replaced latents.
        `backend` ("auto" | "eager" | "cuda-graph"): how terdit's own sampler runs its loop (terdit.diffusion.
        sampler; "auto": a CUDA graph on CUDA); diffusers schedulers always step eagerly."""
        self._check_call(output_type, guidance_scale, num_inference_steps, num_images_per_prompt,
                         callback_on_step_end_tensor_inputs, backend)
        ids = [i for i in self.get_label_ids(class_labels) for _ in range(num_images_per_prompt)]
        self._check_batch(ids, guidance_scale, generator, output_type)
        generator = _or_fresh(generator)
        cfg = self.transformer.config
        device, dtype = self._execution_device, self.transformer.dtype
        shape = (len(ids), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise TerditError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(device, dtype)
        # ImageNet-style ids: a released model maps them to its own class order itself (TerDiT.model_labels)
        labels = torch.tensor(ids, dtype=torch.long, device=device)
        fn = guided_model_fn(self.transformer, labels, guidance_scale, cfg.num_classes, guide_channels)
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            if isinstance(self.scheduler, GaussianDiffusionSampler):
                x = self._sample_terdit(fn, x, num_inference_steps, generator, backend, callback_on_step_end)
            else:
                x = self._sample_diffusers(fn, x, num_inference_steps, generator, device, callback_on_step_end)
        finally:
            self.transformer.train(was_training)
        images = self._postprocess(x, output_type)
        self.maybe_free_model_hooks()
        return TerDiTPipelineOutput(images=images) if return_dict else (images,)

    def _check_call(self, output_type: str, guidance_scale: float, num_inference_steps: int,
                    num_images_per_prompt: int, tensor_inputs: Sequence[str], backend: str) -> None:
        """The call's arguments that do not depend on the labels."""
        if output_type not in OUTPUT_TYPES:
            raise TerditError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if guidance_scale < 0:
            raise TerditError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if not 1 <= num_inference_steps <= NUM_TRAIN_TIMESTEPS:
            raise TerditError(f"num_inference_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise TerditError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        bad = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise TerditError(f"callback_on_step_end_tensor_inputs: only {self._callback_tensor_inputs}, got {bad}")
        check_scheduler(self.scheduler)
        resolve_backend(backend, self._execution_device)
        if backend == "cuda-graph" and not isinstance(self.scheduler, GaussianDiffusionSampler):
            raise TerditError(f"backend='cuda-graph' runs terdit's own sampler (GaussianDiffusionSampler); "
                              f"{type(self.scheduler).__name__} steps eagerly: use backend='eager' or 'auto'")

    def _check_batch(self, ids: list[int], guidance_scale: float, generator: Any, output_type: str) -> None:
        """What the model and the labels allow: a VAE for latent models, a null class for guidance."""
        cfg = self.transformer.config
        if self.vae is None and output_type != "latent" and cfg.in_channels not in (1, 3):
            raise TerditError(f"the model works in a {cfg.in_channels}-channel latent space: pass vae=... to the "
                              "pipeline, or output_type='latent'")
        null_rows = self.transformer.y_embedder.embedding_table.num_embeddings > cfg.num_classes
        if guidance_scale != 1.0 and not null_rows:
            raise TerditError("this model has no null class (class_dropout_prob = 0): use guidance_scale=1")
        if isinstance(generator, list) and len(generator) != len(ids):
            raise TerditError(f"got {len(generator)} generators for {len(ids)} images")

    def _sample_terdit(self, fn: Callable, x: torch.Tensor, num_inference_steps: int, generator: Any,
                       backend: str, callback: Callable | None) -> torch.Tensor:
        """terdit's one sampling loop (GaussianDiffusion.sample), per-step noise from the pipeline's generator(s)."""
        sched = self.scheduler
        diffusion = GaussianDiffusion.create(num_inference_steps, learn_sigma=self.transformer.config.learn_sigma)
        self._num_timesteps = diffusion.num_timesteps
        gen_device = (generator[0] if isinstance(generator, list) else generator).device
        shape = tuple(x.shape)

        def draw() -> torch.Tensor:  # on the generator's device: CPU draws stay on the host (pinned for graphs)
            return randn_tensor(shape, generator=generator, device=gen_device, dtype=torch.float32)

        on_step = None
        if callback is not None:
            def on_step(k: int, i: int, latents: torch.Tensor) -> torch.Tensor | None:
                out = callback(self, k, int(diffusion.timestep_map[i]), {"latents": latents}) or {}
                return out.get("latents")

        return diffusion.sample(fn, x, sampler=sched.sampler, eta=sched.eta, progress=self.progress_bar,
                                backend=backend, draw=draw, on_step=on_step)

    def _sample_diffusers(self, fn: Callable, x: torch.Tensor, num_inference_steps: int, generator: Any,
                          device: torch.device, callback: Callable | None) -> torch.Tensor:
        """diffusers' scheduler.step over the same guided model function (eager)."""
        steps = self._steps(num_inference_steps, x, device)
        x = x * self.scheduler.init_noise_sigma  # the initial noise in the scheduler's scale
        self._num_timesteps = len(steps)
        for i, (t, step) in enumerate(self.progress_bar(steps)):
            x = step(fn, x, generator)
            if callback is not None:
                out = callback(self, i, t, {"latents": x}) or {}
                x = out.get("latents", x)
        return x

    def _steps(self, num_inference_steps: int, x: torch.Tensor, device: torch.device) -> list[tuple[Any, Callable]]:
        """(timestep, step function) pairs for a diffusers scheduler."""
        sched = self.scheduler
        channels = x.shape[1]
        # a config may carry keys of the scheduler it was made from (DDIM from DDPM's): ask only what __init__ takes
        own = "variance_type" in inspect.signature(type(sched).__init__).parameters
        variance = getattr(sched.config, "variance_type", None) if own else None
        learned = variance in ("learned", "learned_range")
        full_output = learned and type(sched).__name__ == "DDPMScheduler" and self.transformer.config.learn_sigma
        if learned and not full_output and channels != 3:
            raise TerditError(f"{type(sched).__name__} with variance_type={variance!r} keeps only the first 3 "
                              "output channels; configure it with variance_type=None (it is given eps)")
        takes_generator = "generator" in inspect.signature(sched.step).parameters
        sched.set_timesteps(num_inference_steps, device=device)

        def diffusers_step(t):
            def step(fn, x, generator):
                x_in = sched.scale_model_input(x, t)
                out = fn(x_in, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long))
                model_output = out if full_output else out[:, :channels]
                kwargs = {"generator": generator} if takes_generator else {}
                return sched.step(model_output.float(), t, x.float(), **kwargs).prev_sample.to(x.dtype)
            return step

        return [(t, diffusers_step(t)) for t in sched.timesteps]

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
        from terdit.sampling.generate import to_uint8

        arr = to_uint8(images)
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]

    # -- folders ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' save_pretrained (model_index.json + one folder per component), files given the umask's mode."""
        import time

        from terdit.io import follow_umask

        start = time.time()
        super().save_pretrained(save_directory, *args, **kwargs)
        follow_umask(Path(save_directory), since=start)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        vae: nn.Module | None | str = "auto",
        scheduler: Any = "auto",
        id2label: dict[int, str] | None = None,
        device: str | torch.device | None = None,
        ema: bool = True,
        **kwargs: Any,
    ) -> "TerDiTPipeline":
        """A pipeline folder or Hub repo (model_index.json, read by diffusers' DiffusionPipeline.from_pretrained
        with all its keywords: torch_dtype, variant, ...), or any model TerDiT.from_pretrained opens (a run
        folder brings the VAE it was trained with). Components passed here replace the stored ones; `vae` and
        `scheduler` may also be names ("stabilityai/sd-vae-ft-ema"; "ddpm" / "ddim" / a diffusers class name)."""
        from terdit.loading.hub import hub_snapshot
        from terdit.loading.open import as_dtype
        from terdit.models.kinds import Kind, is_hub_id, kind_of

        dtype = as_dtype(kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None))  # also "bf16"
        if dtype is not None:  # diffusers >= 0.36 names it dtype (torch_dtype is deprecated), older ones torch_dtype
            kwargs[_pipeline_dtype_keyword()] = dtype
        name = str(pretrained_model_name_or_path)
        local = Path(name).expanduser()
        if not local.exists() and is_hub_id(name):
            hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "force_download", "token") if k in kwargs}
            patterns = [MODEL_INDEX, "transformer/*", "vae/*", "scheduler/*", "config.json", "*.safetensors"]
            local = hub_snapshot(name, patterns, local_files_only=bool(kwargs.pop("local_files_only", False)),
                                 **hub_kwargs)
        elif not local.exists():
            raise TerditError(f"{name}: no such directory (and not a Hub repo id like owner/name)")
        overrides: dict[str, Any] = {}
        if not (isinstance(vae, str) and vae == "auto"):
            overrides["vae"] = _named_vae(vae)
        if not (isinstance(scheduler, str) and scheduler == "auto"):
            overrides["scheduler"] = _named_scheduler(scheduler)
        if id2label is not None:
            overrides["id2label"] = id2label
        # without accelerate diffusers falls back to a full init and warns; choose the fallback up front
        kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
        kind = kind_of(local)
        if kind is Kind.PIPELINE:
            kwargs.pop("local_files_only", None)
            pipe = DiffusionPipeline.from_pretrained.__func__(cls, str(local), local_files_only=True,
                                                              **overrides, **kwargs)
            return pipe.to(device) if device is not None else pipe
        transformer = kwargs.pop("transformer", None) or TerDiT.from_pretrained(local, ema=ema, device=device,
                                                                                **kwargs)
        if "vae" not in overrides:
            overrides["vae"] = _stored_vae(local, kind, device or "cpu")
        return cls(transformer, overrides.get("vae"), overrides.get("scheduler"), overrides.get("id2label"))


@lru_cache(maxsize=1)
def _pipeline_dtype_keyword() -> str:
    source = inspect.getsource(DiffusionPipeline.from_pretrained)
    return "dtype" if 'kwargs.pop("dtype"' in source else "torch_dtype"


def _named_vae(vae: nn.Module | None | str) -> nn.Module | None:
    if not isinstance(vae, str):
        return vae
    from terdit.data.vae import load_vae

    return load_vae(vae).model


def _named_scheduler(scheduler: Any) -> Any:
    if not isinstance(scheduler, str):
        return scheduler
    return GaussianDiffusionSampler(scheduler) if scheduler in ("ddpm", "ddim") else diffusers_scheduler(scheduler)


def _or_fresh(generator: torch.Generator | list[torch.Generator] | None) -> torch.Generator | list[torch.Generator]:
    """A generator as given, or a freshly seeded CPU one (so that one run's noise is all from one stream)."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))


def _stored_vae(local: Path, kind: str | None, device: str | torch.device):
    """The VAE a training run was trained with; None for pixel models and bare model folders."""
    if kind == "run":
        from terdit.models.runs import load_train_args

        spec = load_train_args(local).get("vae")
        if spec:
            from terdit.data.vae import load_vae

            return load_vae(spec, device=device).model
    return None


def _register_with_diffusers() -> None:
    """DiffusionPipeline.from_pretrained finds a folder's pipeline class by its name in the diffusers package;
    make TerDiTPipeline findable there once terdit is imported."""
    import diffusers

    if getattr(diffusers, TerDiTPipeline.__name__, None) is not TerDiTPipeline:
        setattr(diffusers, TerDiTPipeline.__name__, TerDiTPipeline)


_register_with_diffusers()


__all__ = ["GaussianDiffusionSampler", "TerDiTPipeline", "TerDiTPipelineOutput", "diffusers_scheduler",
           "imagenet_classes", "label_lookup"]
