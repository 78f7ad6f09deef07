"""TerDiT as a diffusers model: diffusers' own DiTPipeline drives it, TerDiTPipeline is a DiffusionPipeline."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from random_models import noise_tracking_micro, random_micro, tiny_vae

from terdit.deploy import export_model, lexicographic_permutation
from terdit.diffusion import GaussianDiffusion, guided_model_fn
from terdit.errors import TerditError
from terdit.models import TerDiT
from terdit.sampling.pipeline import GaussianDiffusionSampler, TerDiTPipeline, diffusers_scheduler


def imagenet_model(seed: int = 0, **overrides) -> TerDiT:
    """A Micro TerDiT with DiT's 1000 ImageNet classes (+ null class 1000), every tensor random."""
    return random_micro(seed, std=0.02, num_classes=1000, **overrides)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dit_latents(pipe: DiTPipeline, labels: list[int], **kwargs) -> torch.Tensor:
    """Run diffusers' DiTPipeline and return the latents it hands the VAE (it only outputs decoded images)."""
    seen: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def spy(z, *args, **kw):
        seen.append(z.clone())
        return decode(z, *args, **kw)

    pipe.vae.decode = spy
    scaling = pipe.vae.config.scaling_factor
    pipe.vae.register_to_config(scaling_factor=1.0)  # so the latents reach decode unchanged, not rounded
    try:
        pipe(labels, output_type="np", **kwargs)
    finally:
        pipe.vae.decode = decode
        pipe.vae.register_to_config(scaling_factor=scaling)
    return seen[0]


# -- the model ---------------------------------------------------------------------------------------------------
def test_model_is_a_diffusers_model_with_dits_forward_contract():
    model = imagenet_model()
    assert model.config.sample_size == 8 and model.config.in_channels == 4 and model.config.out_channels == 8
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 1000])
    with torch.no_grad():
        out = model(hidden_states=x, timestep=t, class_labels=y)
        assert out.sample.shape == (2, 8, 8, 8)
        assert torch.equal(model(x, t, y, return_dict=False)[0], out.sample)  # the old positional order
        scalar = model(x, 10, y).sample  # a scalar timestep, broadcast as DiT does
        assert torch.equal(scalar[0], out.sample[0])
    again = TerDiT.from_config(model.config)
    assert again.config == model.config
    model.enable_gradient_checkpointing()
    assert model.grad_checkpointing


def test_unknown_keywords_are_errors(tmp_path):
    random_micro().save_pretrained(tmp_path / "m")
    with pytest.raises(TerditError, match="unexpected keyword.*torch_dtpye"):
        TerDiT.from_pretrained(tmp_path / "m", torch_dtpye=torch.bfloat16)


def test_variant_round_trip_is_exact(tmp_path):
    model = random_micro().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m", variant="bf16")
    files = ["README.md", "config.json", "diffusion_pytorch_model.bf16.safetensors"]
    assert sorted(os.listdir(tmp_path / "m")) == files
    with pytest.raises(TerditError):  # no fp32 file was written: asking for it is an error, not a silent fallback
        TerDiT.from_pretrained(tmp_path / "m")
    loaded = TerDiT.from_pretrained(tmp_path / "m", variant="bf16", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_unsafe_serialization_and_subfolder(tmp_path):
    model = random_micro()
    model.save_pretrained(tmp_path / "repo" / "transformer", safe_serialization=False)
    assert (tmp_path / "repo" / "transformer" / "diffusion_pytorch_model.bin").is_file()
    loaded = TerDiT.from_pretrained(tmp_path / "repo", subfolder="transformer", use_safetensors=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_device_map_places_the_model_through_accelerate(tmp_path):
    """device_map / max_memory / offload_folder / low_cpu_mem_usage go to diffusers and accelerate: a map that
    keeps part of the model on the CPU and offloads the rest to disk gives the same outputs as the model saved."""
    pytest.importorskip("accelerate")
    model = random_micro()
    model.save_pretrained(tmp_path / "m")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 1])
    with torch.no_grad():
        want = model(x, t, y).sample
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for kwargs in ({"device_map": "cpu"}, {"device_map": "auto"}, {"low_cpu_mem_usage": True},
                   {"device_map": "auto", "max_memory": {"cpu": size // 2}, "offload_folder": str(tmp_path / "off")}):
        loaded = TerDiT.from_pretrained(tmp_path / "m", **kwargs)
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y).sample, want), kwargs
        if "max_memory" in kwargs:  # split: the small embedders on the CPU, the blocks on disk
            assert {str(d) for d in loaded.hf_device_map.values()} == {"cpu", "disk"}
            assert loaded.hf_device_map["layers"] == "disk"
    bf16 = TerDiT.from_pretrained(tmp_path / "m", device_map={"": "cpu"}, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.hf_device_map == {"": "cpu"}
    export_model(model, tmp_path / "dep", "2bit")  # a packed terdit layout: placement is terdit's own (`device`)
    with pytest.raises(TerditError, match="device_map do.*not apply"):
        TerDiT.from_pretrained(tmp_path / "dep", device_map="cpu")


def test_packed_deploy_folder_opens_in_the_requested_dtype(tmp_path):
    export_model(random_micro(), tmp_path / "dep", "2bit")
    packed = TerDiT.from_pretrained(tmp_path / "dep", torch_dtype=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert {p.dtype for p in packed.parameters() if p.is_floating_point()} == {torch.bfloat16}


def test_save_pretrained_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        random_micro().save_pretrained(tmp_path / "m")
        TerDiTPipeline(random_micro(), tiny_vae(), diffusers_scheduler("DDIMScheduler")).save_pretrained(tmp_path / "p")
    finally:
        os.umask(old)
    for root in (tmp_path / "m", tmp_path / "p"):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


# -- diffusers' DiTPipeline ----------------------------------------------------------------------------------------
DDIM_TIMESTEPS = list(range(99, 1000, 100))  # DDIMScheduler's trailing spacing, 10 steps


def terdit_ddim(model: TerDiT, labels: list[int], scale: float, noise: torch.Tensor) -> torch.Tensor:
    """terdit's DDIM (eta = 0) from `noise`: GaussianDiffusion respaced to DDIMScheduler's trailing timesteps
    99, 199, .., 999 on the schedule values diffusers uses (its float32 cumprod), guiding all latent channels."""
    acp = diffusers_scheduler("DDIMScheduler").alphas_cumprod.double().numpy()[DDIM_TIMESTEPS]
    betas = 1 - acp / np.concatenate([[1.0], acp[:-1]])
    with torch.no_grad():
        return GaussianDiffusion(betas, timestep_map=DDIM_TIMESTEPS).sample(
            guided_model_fn(model, torch.tensor(labels), scale, 1000), noise, sampler="ddim")


def ddim_both(model: TerDiT, labels: list[int], scale: float, seed: int = 1,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(diffusers' DiTPipeline latents, terdit's DDIM latents, the initial noise both started from), DDIM
    eta = 0 in the model's dtype."""
    dtype = model.dtype
    pipe = DiTPipeline(transformer=model, vae=tiny_vae().to(dtype), scheduler=diffusers_scheduler("DDIMScheduler"))
    pipe.set_progress_bar_config(disable=True)
    theirs = dit_latents(pipe, labels, guidance_scale=scale, num_inference_steps=len(DDIM_TIMESTEPS),
                         generator=gen(seed))
    noise = torch.randn(len(labels), 4, 8, 8, generator=gen(seed), dtype=dtype)  # as DiTPipeline draws it
    return theirs, terdit_ddim(model, labels, scale, noise), noise


def test_dit_pipeline_ddim_matches_terdits_ddim_sampler():
    """A trained model's scale of latents: within 1e-5 in float32 (guidance 1.5, the paper's FID setting).

    The model predicts eps close to x_t (as a model trained on data near zero does), so latents stay O(1); in
    float64 the two agree to the float32 rounding of diffusers' scalar schedule arithmetic (~1e-6 relative): the
    algorithms are the same. At guidance 4 the float32 gap is 0.6-1.4e-5 over six noise seeds (measured; guidance
    amplifies the rounding of both model calls), so the absolute bound is asserted at 1.5 and the random-model
    test below bounds guidance 4 by the float32 floor."""
    model, labels, report = noise_tracking_micro(small=0.05), [207, 3], []
    for dtype in (torch.float64, torch.float32):
        theirs, ours, noise = ddim_both(model.to(dtype), labels, 1.5)
        diff, size = float((theirs - ours).abs().max()), float(ours.abs().max())
        report.append(f"{str(dtype)[6:]}: max |latent diff| {diff:.2e} (latents up to {size:.1f})")
        assert 0.5 < size < 10  # the scale of a trained model's latents, not a random model's hundreds
        assert diff <= (1e-6 * size if dtype == torch.float64 else 1e-5)
    unguided = terdit_ddim(model, labels, 1.0, noise)
    moved = float((unguided - ours).abs().max())  # guidance must matter far beyond the bound, or it is untested
    assert moved > 100 * 1e-5, moved
    print("DiTPipeline vs terdit DDIM (eta=0, 10 steps, guidance 1.5): " + "; ".join(report)
          + f"; guidance 1.5 vs 1 moves latents by {moved:.1e}")
    model.float()


def test_dit_pipeline_ddim_matches_terdits_ddim_sampler_on_a_random_model():
    """A random model (guidance 4): its wrong eps drives latents to ~100s (x0 = (x_t - sqrt(1 - acp) eps) /
    sqrt(acp) with 1 / sqrt(acp) ~ 156 at t = 999), where the float32 gap is float32 rounding: bounded by 1e-5
    relative to the latents' scale and by the gap of terdit's own sampler in float32 vs float64 (the floor)."""
    model, labels, scale = imagenet_model(), [207, 3], 4.0
    report = []
    for dtype in (torch.float64, torch.float32):
        theirs, ours, noise = ddim_both(model.to(dtype), labels, scale)
        diff, size = float((theirs - ours).abs().max()), float(ours.abs().max())
        report.append(f"{str(dtype)[6:]}: max |latent diff| {diff:.2e} (latents up to {size:.0f})")
        if dtype == torch.float64:
            assert diff <= 1e-6 * size  # diffusers takes sqrt(alphas_cumprod) in float32 even here
            continue
        ours64 = terdit_ddim(model.double(), labels, scale, noise.double())  # the floor: float32 vs float64
        floor = float((ours.double() - ours64).abs().max())
        report.append(f"terdit float32 vs float64: {floor:.2e}")
        assert diff <= 1e-5 * max(1.0, size)
        assert diff <= 2 * floor + 1e-6  # no worse than float32 rounding of terdit's own sampler
    model.float()
    print("DiTPipeline vs terdit DDIM (eta=0, 10 steps, guidance 4): " + "; ".join(report))


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_dit_pipeline_samples_a_packed_deploy_model(tmp_path, scheduler):
    export_model(imagenet_model(), tmp_path / "dep", "base3")
    packed = TerDiT.from_pretrained(tmp_path / "dep")
    cls = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
           "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler}[scheduler]
    # DiTPipeline gives schedulers eps alone, so they are configured with TerDiT's schedule and a fixed variance
    sched = cls.from_config(diffusers_scheduler("DDIMScheduler").config)
    pipe = DiTPipeline(transformer=packed, vae=tiny_vae(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([1, 999], num_inference_steps=4, generator=gen(), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_released_class_order_holds_through_dit_pipeline():
    """A model whose classes are in a release's lexicographic order, given ImageNet id i, computes what the same
    weights in ImageNet order compute for the release index of i: the permutation lives in the model."""
    plain = imagenet_model()
    public = {k: v for k, v in plain.config.items() if not k.startswith("_")}  # _use_default_values would drop it
    released = TerDiT.from_config({**public, "label_permutation": "lexicographic"})
    released.load_state_dict(plain.state_dict())
    released.eval()
    assert released.config.label_permutation == "lexicographic"
    perm = lexicographic_permutation(1000)
    assert perm[207] != 207
    runs = []
    for model, label in ((released, 207), (plain, int(perm[207]))):
        pipe = DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=diffusers_scheduler("DDIMScheduler"))
        pipe.set_progress_bar_config(disable=True)
        runs.append(dit_latents(pipe, [label], num_inference_steps=3, generator=gen(5)))
    assert torch.equal(runs[0], runs[1])


# -- TerDiTPipeline as a DiffusionPipeline ----------------------------------------------------------------------
def test_terdit_pipeline_is_a_diffusion_pipeline(tmp_path):
    pipe = TerDiTPipeline(random_micro(), tiny_vae())
    assert isinstance(pipe, DiffusionPipeline) and set(pipe.components) == {"transformer", "vae", "scheduler"}
    pipe.set_progress_bar_config(disable=True)
    out = pipe([1, 2], num_inference_steps=3, generator=gen(), output_type="latent")
    assert out.images.shape == (2, 4, 8, 8)
    pipe.to(torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert len(pipe([1], num_inference_steps=2, generator=gen()).images) == 1


def test_diffusion_pipeline_from_pretrained_round_trip_and_scheduler_swap(tmp_path):
    pipe = TerDiTPipeline(random_micro(), tiny_vae(), diffusers_scheduler("DDPMScheduler"),
                          id2label={i: f"c{i}" for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", low_cpu_mem_usage=False)
    assert type(loaded) is TerDiTPipeline and loaded.id2label[3] == "c3"
    loaded.set_progress_bar_config(disable=True)
    a = pipe(["c1", 2], num_inference_steps=3, generator=gen(4), output_type="np").images
    assert np.array_equal(loaded(["c1", 2], num_inference_steps=3, generator=gen(4), output_type="np").images, a)

    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config, timestep_spacing="trailing")
    assert loaded.scheduler.config.beta_end == 0.02 and loaded.config.scheduler[1] == "DDIMScheduler"
    b = loaded([1], num_inference_steps=3, generator=gen(), output_type="latent").images
    c = TerDiTPipeline(pipe.transformer, scheduler=diffusers_scheduler("DDIMScheduler"))(
        [1], num_inference_steps=3, generator=gen(), output_type="latent").images
    assert torch.equal(b, c)
    swapped = GaussianDiffusionSampler.from_config(loaded.scheduler.config)  # and back to terdit's sampler
    assert swapped.sampler == "ddpm"


def test_flow_matching_is_refused_at_construction():
    with pytest.raises(TerditError, match="flow matching"):
        TerDiTPipeline(random_micro(), scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TerditError, match="prediction_type"):
        TerDiTPipeline(random_micro(), scheduler=DDIMScheduler(prediction_type="v_prediction"))


def test_generator_lists_repeats_latents_and_step_callback():
    pipe = TerDiTPipeline(random_micro())
    pipe.set_progress_bar_config(disable=True)
    one = pipe([1, 2], num_inference_steps=3, generator=[gen(1), gen(2)], output_type="latent").images
    alone = pipe([2], num_inference_steps=3, generator=[gen(2)], output_type="latent").images
    torch.testing.assert_close(one[1], alone[0], rtol=1e-5, atol=1e-4)  # image i: its own generator only
    rep = pipe([1, 2], num_images_per_prompt=2, num_inference_steps=2, generator=gen(), output_type="latent")
    assert rep.images.shape[0] == 4
    seen: list[int] = []

    def callback(p, i, t, kwargs):
        seen.append(int(t))
        return {"latents": kwargs["latents"]}

    start = torch.randn(1, 4, 8, 8, generator=gen(3))
    a = pipe([1], num_inference_steps=3, latents=start, generator=gen(), output_type="latent",
             callback_on_step_end=callback).images
    b = pipe([1], num_inference_steps=3, latents=start, generator=gen(), output_type="latent").images
    assert torch.equal(a, b) and seen == sorted(seen, reverse=True) and len(seen) == 3
    with pytest.raises(TerditError, match="generators"):
        pipe([1, 2], generator=[gen()], output_type="latent")
