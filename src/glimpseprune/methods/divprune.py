"""``divprune``: DivPrune (CVPR'25), a max-min diverse subset of the visual tokens, before the LLM.

Keeps a diverse subset of the visual token embeddings entering the LLM (after the projector / merger), by greedy
farthest-point selection under cosine distance (``ops.diversity.farthest_point_select``). Before the LLM (K = -1);
selection is joint over a sample's images.

Budget: exactly max(1, floor(keep_ratio * n_vis)) per sample (upstream rounds: round(0.111 * 576) = 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.diversity import farthest_point_select
from ..registry import register_method
from .base import MethodConfig
from .common import EmbeddingSubset, check_keep_ratio


@dataclass(frozen=True)
class DivPruneConfig(MethodConfig):
    keep_ratio: float = 0.111

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)


@register_method
class DivPruneMethod(EmbeddingSubset):
    """Example: ``gp.apply(model, "divprune", keep_ratio=0.111)``."""

    name = "divprune"
    config_class = DivPruneConfig

    def pick(self, state, b: int, vis: torch.Tensor, k: int) -> torch.Tensor:
        return farthest_point_select(vis, k)
