"""Random models shared by tests (not a test module)."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from terdit.models import TerDiT, get_config


def random_micro(seed: int = 0, std: float = 0.05, **overrides) -> TerDiT:
    """A Micro model with every tensor random, so no path sits at its zero init (adaLN, output layer)."""
    torch.manual_seed(seed)
    model = TerDiT(get_config("TerDiT-Micro", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if name.endswith("alphas") else std)
    return model


def noise_tracking_micro(seed: int = 0, num_classes: int = 1000, offset: float = 20.0, small: float = 1e-3) -> TerDiT:
    """A Micro TerDiT whose eps prediction is close to its input x_t, with small class- and time-dependent parts.

    That is what a trained model predicts on data concentrated near zero, and it keeps DDIM's latents O(1): a
    random model's eps is unrelated to x_t, so x0 = (x_t - sqrt(1 - acp) eps) / sqrt(acp) grows by up to
    1 / sqrt(acp) ~ 156 per step and latents reach the hundreds, where float32 rounding alone exceeds 1e-5.
    Built from the random model: the patch embedding is an orthonormal map Q into the hidden space, plus a fixed
    offset vector orthogonal to Q and to the ones vector, so the final LayerNorm is linear in x up to
    |x|^2 / (2 offset^2); the output linear maps Q back to the eps channels; the blocks' output projections and
    the final adaLN are scaled by `small` (still random, still ternary)."""
    model = random_micro(seed, std=0.02, num_classes=num_classes)
    cfg = model.config
    p, c_in, c_out, dim = cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.dim
    n = c_in * p * p
    basis = torch.randn(dim, n + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis[:, 0] = 1.0
    basis = torch.linalg.qr(basis)[0]  # column 0 spans the ones vector; the rest are orthogonal to it
    q, direction = basis[:, 1:n + 1], basis[:, n + 1]
    back = torch.zeros(p * p * c_out, n, dtype=torch.float64)  # patchify's (C, p, p) -> unpatchify's (p, p, C)
    for ch in range(c_in):
        for i in range(p):
            for j in range(p):
                back[(i * p + j) * c_out + ch, ch * p * p + i * p + j] = 1.0
    with torch.no_grad():
        model.x_embedder.weight.copy_(q)
        model.x_embedder.bias.copy_(offset * direction)
        model.final_layer.linear.weight.copy_(offset / dim**0.5 * back @ q.T)  # undoes LayerNorm's 1 / std
        model.final_layer.linear.bias.zero_()
        for lin in (model.final_layer.adaLN_modulation[1], *(b.attention.wo for b in model.layers),
                    *(b.feed_forward.w2 for b in model.layers)):
            for param in lin.parameters():  # a ternary layer's output scales with its alphas
                param.mul_(small)
    return model


def tiny_dit(seed: int = 0, classes: int = 10) -> DiTTransformer2DModel:
    """A random two-layer diffusers DiT on 4x8x8 latents, every tensor random (no zero-initialised path:
    adaLN-Zero, output layer)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=classes,
                                  norm_num_groups=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def tiny_vae() -> AutoencoderKL:
    """A random two-level AutoencoderKL: 4 latent channels, 2x downsampling (8x8 latents <-> 16x16 images)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def train_micro_run(out: Path, **overrides) -> Path:
    """A real run folder: TerDiT-Micro trained a few steps, quietly (no TensorBoard, no progress bar)."""
    from terdit.training.trainer import TrainArgs, Trainer

    args = dict(config="TerDiT-Micro", steps=2, batch_size=8, sample_steps=2, tensorboard=False, progress=False)
    Trainer(TrainArgs(out=str(out), **{**args, **overrides})).run()
    return out
