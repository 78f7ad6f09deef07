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
