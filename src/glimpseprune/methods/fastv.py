"""``fastv``: FastV (ECCV'24), top-k visual tokens by the last prompt token's attention in an early layer.

The score is the attention the LAST prompt token pays each visual token, softmax over the keys it can see, averaged
over heads.

Layers: FastV's "K = 2" means layers 0 and 1 see every token and the scores come from layer 1's attention; here that
is ``prune_layer = 1`` (prune after layer 1, scores from layer 1). Budget: exactly max(1, floor(keep_ratio * n_vis))
per sample (FastV's R = 50% drop is keep_ratio = 0.5, the default).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_method
from .base import MethodConfig
from .common import AttentionTopK, check_keep_ratio, check_layer, ratio_count


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    keep_ratio: float = 0.5
    prune_layer: int = 1  # FastV's K = prune_layer + 1 = 2

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        check_layer("prune_layer", self.prune_layer, minimum=0)


@register_method
class FastVMethod(AttentionTopK):
    """Example: ``gp.apply(model, "fastv", keep_ratio=0.25, prune_layer=1)``."""

    name = "fastv"
    config_class = FastVConfig

    def prune_layer(self, n_layers: int) -> int:
        return self.config.prune_layer

    def budget(self, n_vis: int) -> int:
        return ratio_count(n_vis, self.config.keep_ratio)

    def stage_count(self, n_vis: int, stage: int) -> int:
        return self.budget(n_vis)
