"""Diffusion against direct float64 formulas written out here, not taken from the implementation."""

import math

import numpy as np
import pytest
import torch

from terdit.diffusion import GaussianDiffusion, guided_model_fn, spaced_timesteps
from terdit.models import TerDiT, get_config


def _schedule64(steps: int):
    """Linear betas respaced to `steps`, in float64, from first principles."""
    betas = np.linspace(1e-4, 0.02, 1000)
    acp_full = np.cumprod(1 - betas)
    keep = sorted({round(i * 999 / (steps - 1)) for i in range(steps)})
    acp = acp_full[keep]
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    b = 1 - acp / acp_prev
    return keep, b, acp, acp_prev


def test_respacing_is_dits_evenly_spaced_rule():
    keep = spaced_timesteps(1000, 250)
    assert len(keep) == 250 and keep[0] == 0 and keep[-1] == 999
    assert keep[:5] == [0, 4, 8, 12, 16]
    assert spaced_timesteps(1000, 1000) == list(range(1000))
    d = GaussianDiffusion.create(250)
    _, b, acp, _ = _schedule64(250)
    assert np.allclose(d.betas, b) and np.allclose(d.alphas_cumprod, acp)
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 0)


def test_q_sample_closed_form():
    d = GaussianDiffusion.create()
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 10, 999])
    acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    ref = torch.stack([math.sqrt(acp[k]) * x0[i] + math.sqrt(1 - acp[k]) * noise[i] for i, k in enumerate(t.tolist())])
    assert torch.allclose(d.q_sample(x0, t, noise), ref, atol=1e-6)


def _trained_like_micro(seed=0):
    torch.manual_seed(seed)
    model = TerDiT(get_config("TerDiT-Micro"))
    with torch.no_grad():  # move off adaLN-Zero so the network's output depends on its input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("i", [0, 1, 120, 249])
def test_ddpm_step_matches_float64_posterior(i):
    model = _trained_like_micro()
    d = GaussianDiffusion.create(250)
    keep, b, acp, acp_prev = _schedule64(250)
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 7])
    z = torch.randn(2, 4, 8, 8)
    out = model(x, torch.full((2,), keep[i]), y).sample.double()
    eps, v = out[:, :4].numpy(), out[:, 4:].numpy()
    xt = x.double().numpy()
    # the DDPM posterior q(x_{t-1} | x_t, x0) with x0 predicted from eps
    x0 = np.sqrt(1 / acp[i]) * xt - np.sqrt(1 / acp[i] - 1) * eps
    mean = b[i] * np.sqrt(acp_prev[i]) / (1 - acp[i]) * x0 + (1 - acp_prev[i]) * np.sqrt(1 - b[i]) / (1 - acp[i]) * xt
    post_var = b * (1 - acp_prev) / (1 - acp)
    min_log = np.log(post_var[1]) if i == 0 else np.log(post_var[i])
    frac = (v + 1) / 2
    log_var = frac * np.log(b[i]) + (1 - frac) * min_log
    ref = mean if i == 0 else mean + np.exp(0.5 * log_var) * z.double().numpy()
    got = d.ddpm_step(lambda a, t: model(a, t, y).sample, x, i, z)
    assert np.allclose(got.double().numpy(), ref, atol=2e-5)


def test_ddim_step_matches_formula():
    model = _trained_like_micro(1)
    d = GaussianDiffusion.create(50)
    keep, _, acp, acp_prev = _schedule64(50)
    x, y, z, i, eta = torch.randn(2, 4, 8, 8), torch.tensor([0, 3]), torch.randn(2, 4, 8, 8), 30, 0.5
    eps = model(x, torch.full((2,), keep[i]), y).sample[:, :4].double().numpy()
    xt = x.double().numpy()
    x0 = (xt - np.sqrt(1 - acp[i]) * eps) / np.sqrt(acp[i])
    sigma = eta * np.sqrt((1 - acp_prev[i]) / (1 - acp[i])) * np.sqrt(1 - acp[i] / acp_prev[i])
    ref = np.sqrt(acp_prev[i]) * x0 + np.sqrt(1 - acp_prev[i] - sigma**2) * eps + sigma * z.double().numpy()
    got = d.ddim_step(lambda a, t: model(a, t, y).sample, x, i, z, eta=eta)
    assert np.allclose(got.double().numpy(), ref, atol=2e-5)


def test_training_loss_terms():
    model = _trained_like_micro(2)
    d = GaussianDiffusion.create()
    x0, noise = torch.randn(3, 4, 8, 8).clamp(-1, 1), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 5, 900])
    y = torch.tensor([1, 2, 3])
    terms = d.training_losses(lambda a, tt: model(a, tt, y).sample, x0, t, noise)
    eps = model(d.q_sample(x0, t, noise), t, y).sample[:, :4]
    assert torch.allclose(terms["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"] >= -1e-6).all()
    # the VB term trains only the variance channels: no gradient reaches eps through it
    out = model(d.q_sample(x0, t, noise), t, y).sample.detach().requires_grad_(True)
    d.vb_bits(torch.cat([out[:, :4].detach(), out[:, 4:]], 1), x0, d.q_sample(x0, t, noise), t).sum().backward()
    assert out.grad is None or out.grad[:, :4].abs().sum() == 0


def test_classifier_free_guidance():
    model = _trained_like_micro(3)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([2, 5])
    cond, uncond = model(x, t, y).sample, model(x, t, torch.tensor([10, 10])).sample
    guided = guided_model_fn(model, y, 4.0, 10)(x, t)
    assert torch.allclose(guided[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)
    assert torch.allclose(guided[:, 4:], cond[:, 4:], atol=1e-6)
    quirk = guided_model_fn(model, y, 4.0, 10, guide_channels=3)(x, t)
    assert torch.allclose(quirk[:, 3:], cond[:, 3:], atol=1e-6)
    assert torch.allclose(guided_model_fn(model, y, 1.0, 10)(x, t), cond)


def test_sampling_is_deterministic_for_a_seed():
    from terdit.sampling.generate import sample_latents

    model = _trained_like_micro(4)
    a = sample_latents(model, [1, 2], cfg_scale=2.0, steps=5, seed=7)
    b = sample_latents(model, [1, 2], cfg_scale=2.0, steps=5, seed=7)
    c = sample_latents(model, [1, 2], cfg_scale=2.0, steps=5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = sample_latents(model, [1, 2], cfg_scale=2.0, steps=5, seed=7, sampler="ddim")
    assert d.shape == a.shape and torch.isfinite(d).all()


def test_single_step_sampling_with_fixed_variance():
    model = TerDiT(get_config("TerDiT-Micro", learn_sigma=False)).eval().requires_grad_(False)
    d = GaussianDiffusion.create(1, learn_sigma=False)
    assert d.timestep_map.tolist() == [999]
    out = d.sample(lambda x, t: model(x, t, torch.tensor([1])).sample, torch.randn(1, 4, 8, 8))
    assert torch.isfinite(out).all()
