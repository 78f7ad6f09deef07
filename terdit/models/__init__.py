"""TerDiT / Large-DiT models and their named configurations."""

from terdit.models.configs import CONFIGS, TerDiTConfig, config_names, get_config
from terdit.models.terdit import TerDiT

__all__ = ["CONFIGS", "TerDiT", "TerDiTConfig", "config_names", "get_config"]
