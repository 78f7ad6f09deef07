"""TerDiTPipeline: terdit's sampler and diffusers' schedulers agree, VAE decoding, labels, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from random_models import random_micro, tiny_vae, train_micro_run

from terdit.diffusion import GaussianDiffusion, guided_model_fn, linear_betas, spaced_timesteps
from terdit.errors import TerditError
from terdit.models import TerDiT
from terdit.sampling.generate import sample_latents
from terdit.sampling.pipeline import (
    GaussianDiffusionSampler,
    TerDiTPipeline,
    diffusers_scheduler,
    imagenet_classes,
)

SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"]


def random_model(seed: int = 0, **overrides) -> TerDiT:
    return random_micro(seed, std=0.02, **overrides)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal up to float32-vs-float64 schedules: relative to the samples' scale (random models blow up)."""
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)


# -- samplers -------------------------------------------------------------------------------------------------
def test_default_scheduler_is_terdits_sampler_and_matches_sample_latents():
    model = random_model()
    pipe = TerDiTPipeline(model)
    assert isinstance(pipe.scheduler, GaussianDiffusionSampler)
    got = pipe([1, 2, 3], guidance_scale=3.0, num_inference_steps=12, generator=gen(5), output_type="latent").images
    assert torch.equal(got, sample_latents(model, [1, 2, 3], cfg_scale=3.0, steps=12, seed=5))


@pytest.mark.parametrize("steps", [2, 5, 10, 25, 50, 100, 250, 1000])
def test_linspace_spacing_is_dits_respacing(steps):
    sched = diffusers_scheduler("DDPMScheduler")
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == spaced_timesteps(1000, steps)[::-1]


def test_diffusers_ddpm_schedule_is_ours():
    sched = diffusers_scheduler("DDPMScheduler")
    torch.testing.assert_close(sched.betas.double(), torch.from_numpy(linear_betas()), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("steps", [1000, 10])
def test_one_ddpm_step_with_given_noise_matches(steps):
    """One reverse step at every sampling index: diffusers' learned_range step vs GaussianDiffusion.ddpm_step."""
    diffusion = GaussianDiffusion.create(steps)
    sched = diffusers_scheduler("DDPMScheduler")
    sched.set_timesteps(steps)
    g = gen(0)
    for i in [diffusion.num_timesteps - 1, diffusion.num_timesteps // 2, 1, 0]:
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.cat([torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g) * 2 - 1], 1)
        t = int(diffusion.timestep_map[i])
        noise = torch.randn(2, 4, 8, 8, generator=gen(i))
        ours = diffusion.ddpm_step(lambda x_, t_, out=out: out, x, i, noise)
        theirs = sched.step(out, t, x, generator=gen(i)).prev_sample  # draws the same noise from the same seed
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        if i > 0:  # the learned-range log-variance itself
            tt = torch.full((2,), i)
            log_var = diffusion.p_mean_variance(out, x, tt)["log_variance"]
            torch.testing.assert_close(sched._get_variance(t, predicted_variance=out[:, 4:]), log_var,
                                       rtol=1e-4, atol=1e-4)


def test_variance_difference_at_t0_is_documented():
    """At t = 0 diffusers' min_log is log(1e-20) (clamped zero posterior variance), ours the clipped log of
    the next step's variance; neither adds noise at t = 0, so the samples agree."""
    diffusion = GaussianDiffusion.create(None)
    sched = diffusers_scheduler("DDPMScheduler")
    sched.set_timesteps(1000)
    v = -torch.ones(1, 4, 1, 1)  # frac = 0: the min_log end
    assert float(sched._get_variance(0, predicted_variance=v).max()) == pytest.approx(np.log(1e-20), rel=1e-5)
    assert diffusion.posterior_log_variance_clipped[0] == pytest.approx(np.log(diffusion.posterior_variance[1]))


def test_whole_ddpm_chain_matches_for_the_same_generator():
    """Same initial noise and per-step noise: diffusers draws at every step but the last, as we consume it."""
    model = random_model()
    ours = TerDiTPipeline(model)([1, 7], num_inference_steps=20, generator=gen(3), output_type="latent").images
    pipe = TerDiTPipeline(model, scheduler=diffusers_scheduler("DDPMScheduler"))
    theirs = pipe([1, 7], num_inference_steps=20, generator=gen(3), output_type="latent").images
    close(theirs, ours)


def test_diffusers_ddim_matches_our_ddim_on_the_same_timesteps():
    """diffusers' DDIM on trailing timesteps (99, 199, .., 999) vs GaussianDiffusion respaced to the same ones."""
    model = random_model()
    labels = torch.tensor([2, 4])
    pipe = TerDiTPipeline(model, scheduler=diffusers_scheduler("DDIMScheduler"))
    theirs = pipe(labels, num_inference_steps=10, generator=gen(1), output_type="latent").images
    keep = list(range(99, 1000, 100))
    acp = np.cumprod(1 - linear_betas())
    betas = 1 - acp[keep] / np.concatenate([[1.0], acp[keep][:-1]])
    diffusion = GaussianDiffusion(betas, timestep_map=keep)
    g = gen(1)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    ours = diffusion.sample(guided_model_fn(model, labels, 4.0, 10), noise, sampler="ddim", generator=g)
    close(theirs, ours)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_vae_pipeline_with_each_diffusers_scheduler(name):
    model, vae = random_model(), tiny_vae()
    pipe = TerDiTPipeline(model, vae, diffusers_scheduler(name))
    images = pipe([0, 3], num_inference_steps=4, generator=gen(2)).images
    assert [im.size for im in images] == [(16, 16)] * 2 and images[0].mode == "RGB"
    latents = pipe([0, 3], num_inference_steps=4, generator=gen(2), output_type="latent").images
    arr = pipe([0, 3], num_inference_steps=4, generator=gen(2), output_type="np").images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
    with torch.no_grad():  # independent decode: undo the scaling, decode, clamp, map to [0, 1]
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    np.testing.assert_allclose(arr, ((decoded + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert np.array_equal(np.asarray(images[1]), np.clip(np.asarray(decoded[1].permute(1, 2, 0)) * 127.5 + 128,
                                                         0, 255).astype(np.uint8))


def test_dpm_solver_with_learned_variance_is_refused():
    pipe = TerDiTPipeline(random_model(), scheduler=diffusers_scheduler("DPMSolverMultistepScheduler",
                                                                        variance_type="learned_range"))
    with pytest.raises(TerditError, match="first 3"):
        pipe([0], num_inference_steps=2, output_type="latent")


def test_ddpm_without_learned_variance_gets_eps_only():
    sched = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    out = TerDiTPipeline(random_model(), scheduler=sched)([0], num_inference_steps=3, generator=gen(),
                                                          output_type="latent").images
    assert out.shape == (1, 4, 8, 8)


# -- labels ---------------------------------------------------------------------------------------------------
def test_imagenet_class_table():
    names = imagenet_classes()
    assert sorted(names) == list(range(1000))
    assert names[0].startswith("tench") and names[1].startswith("goldfish")
    assert names[207] == "golden retriever" and names[281].startswith("tabby") and names[291].startswith("lion")
    assert names[388].startswith("giant panda") and names[417] == "balloon" and names[980] == "volcano"
    assert names[999].startswith("toilet tissue")


def test_class_names_map_to_ids():
    pipe = TerDiTPipeline(random_model(num_classes=1000))
    assert pipe.get_label_ids(["golden retriever", "Tinca tinca", "TENCH", 5, "12"]) == [207, 0, 0, 5, 12]
    with pytest.raises(TerditError, match="ambiguous"):
        pipe.get_label_ids("crane")  # the bird (134) and the machine (517)
    with pytest.raises(TerditError, match="unknown class name"):
        pipe.get_label_ids("hippogriff")
    with pytest.raises(TerditError, match="outside"):
        pipe.get_label_ids(1000)
    custom = TerDiTPipeline(random_model(), id2label={i: f"digit {i}, d{i}" for i in range(10)})
    assert custom.get_label_ids(["d3", "digit 9"]) == [3, 9]
    with pytest.raises(TerditError, match="no class names"):
        TerDiTPipeline(random_model()).get_label_ids("tench")  # a 10-class model is not ImageNet


def test_user_errors():
    pipe = TerDiTPipeline(random_model())
    with pytest.raises(TerditError, match="latent space"):
        pipe([0], num_inference_steps=2)  # 4-channel latents and no VAE
    with pytest.raises(TerditError, match="output_type"):
        pipe([0], output_type="jpeg")
    with pytest.raises(TerditError, match="num_inference_steps"):
        pipe([0], num_inference_steps=0)
    with pytest.raises(TerditError, match="null class"):
        TerDiTPipeline(random_model(class_dropout_prob=0.0))([0], num_inference_steps=2, output_type="latent")


# -- folders ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", None])
def test_pipeline_save_and_load_gives_identical_outputs(tmp_path, scheduler):
    sched = diffusers_scheduler(scheduler) if scheduler else GaussianDiffusionSampler("ddim")
    pipe = TerDiTPipeline(random_model(), tiny_vae(), sched, id2label={i: f"c{i}" for i in range(10)})
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["terdit.models.terdit", "TerDiT"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"][1] == type(sched).__name__
    for sub, name in [("transformer", "diffusion_pytorch_model.safetensors"), ("vae", "config.json"),
                      ("scheduler", "scheduler_config.json")]:
        assert (tmp_path / "pipe" / sub / name).is_file()

    loaded = TerDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded.scheduler) is type(sched) and loaded.id2label[3] == "c3"
    a = pipe(["c1", 2], num_inference_steps=3, generator=gen(4), output_type="np").images
    b = loaded(["c1", 2], num_inference_steps=3, generator=gen(4), output_type="np").images
    assert np.array_equal(a, b)


def test_pixel_space_run_folder_opens_as_a_pipeline(tmp_path):
    run = tmp_path / "digits"
    train_micro_run(run)
    pipe = TerDiTPipeline.from_pretrained(run)
    assert pipe.vae is None and pipe.transformer.config.in_channels == 1
    images = pipe([0, 9], num_inference_steps=3, generator=gen()).images
    assert [im.mode for im in images] == ["L", "L"] and images[0].size == (8, 8)
    latents = pipe([0, 9], num_inference_steps=3, generator=gen(), output_type="latent").images
    assert torch.equal(latents, sample_latents(pipe.transformer, [0, 9], steps=3, seed=0))
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["vae"] == [None, None]
    again = TerDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert again.vae is None
    assert torch.equal(again([0, 9], num_inference_steps=3, generator=gen(), output_type="latent").images, latents)


def test_pipeline_hub_id_offline_cached_and_uncached(tmp_path, monkeypatch):
    import time

    import terdit.loading.hub as hub

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--terdit-pipe"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    pipe = TerDiTPipeline(random_model(), tiny_vae(), diffusers_scheduler("DDIMScheduler"))
    pipe.save_pretrained(repo / "snapshots" / commit)
    loaded = TerDiTPipeline.from_pretrained("someone/terdit-pipe", cache_dir=tmp_path / "cache")
    a = pipe([1], num_inference_steps=2, generator=gen(), output_type="np").images
    assert np.array_equal(loaded([1], num_inference_steps=2, generator=gen(), output_type="np").images, a)
    start = time.perf_counter()
    with pytest.raises(TerditError, match="not in the Hugging Face cache"):
        TerDiTPipeline.from_pretrained("someone/not-cached", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 10
