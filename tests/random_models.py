"""Random models shared by tests (not a test module)."""

import torch

from terdit.models import TerDiT, get_config


def random_micro(seed: int = 0, std: float = 0.05, **overrides) -> TerDiT:
    """A Micro model with every tensor random, so no path sits at its zero init (adaLN, output layer)."""
    torch.manual_seed(seed)
    model = TerDiT(get_config("TerDiT-Micro", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if name.endswith("alphas") else std)
    return model
