"""Random models shared by tests (not a test module)."""

import torch
from diffusers import AutoencoderKL

from terdit.models import TerDiT, get_config


def random_micro(seed: int = 0, std: float = 0.05, **overrides) -> TerDiT:
    """A Micro model with every tensor random, so no path sits at its zero init (adaLN, output layer)."""
    torch.manual_seed(seed)
    model = TerDiT(get_config("TerDiT-Micro", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if name.endswith("alphas") else std)
    return model


def tiny_vae() -> AutoencoderKL:
    """A random two-level AutoencoderKL: 4 latent channels, 2x downsampling (8x8 latents <-> 16x16 images)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()
