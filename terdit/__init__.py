"""terdit: ternary (1.58-bit) diffusion transformers, trained with QAT and deployed packed."""

from terdit.diffusion import GaussianDiffusion
from terdit.loading import open_model  # also installs TerDiT.from_pretrained's hook: keep it imported here
from terdit.models import TerDiT, TerDiTConfig, get_config
from terdit.quant import TernaryLinear, ternarize

__version__ = "0.1.0"

__all__ = ["GaussianDiffusion", "TerDiT", "TerDiTConfig", "TernaryLinear", "__version__", "get_config", "open_model",
           "ternarize"]
