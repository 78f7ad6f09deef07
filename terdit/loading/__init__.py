"""Opening models: what a path or Hub id is (kinds), opening it (open_model), the Hub, model cards.

Importing this package installs `open_model` and hub's writers as TerDiT's from_pretrained / save_pretrained /
push_to_hub hooks; the root package imports it, so the hooks are set before any terdit module runs.
"""

from terdit.loading.hub import TerDiTHubMixin
from terdit.loading.open import from_pretrained_hook, open_model, resolve_dir
from terdit.models.kinds import Kind, is_hub_id, kind_of
from terdit.models.terdit import set_loading_hooks

set_loading_hooks(from_pretrained=from_pretrained_hook, save_pretrained=TerDiTHubMixin.save_pretrained,
                  push_to_hub=TerDiTHubMixin.push_to_hub)

__all__ = ["Kind", "is_hub_id", "kind_of", "open_model", "resolve_dir"]
