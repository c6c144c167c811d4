"""``random``: keep a seeded random subset of each sample's visual tokens (the floor every method must beat).

Budget: exactly max(1, floor(keep_ratio * n_vis)) per sample, joint over its images. Each sample draws from its own
generator seeded with ``seed``, so a sample's mask does not depend on the rest of the batch. Default: before the LLM
(K = -1); any K >= 0 prunes after that layer instead.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..registry import register_method
from .base import MethodConfig, PruningMethod
from .common import check_keep_ratio, check_layer, ratio_count


@dataclass(frozen=True)
class RandomConfig(MethodConfig):
    keep_ratio: float = 0.111
    seed: int = 0
    prune_layer: int = -1  # -1: before the LLM; K >= 0: after layer K

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        check_layer("prune_layer", self.prune_layer)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@register_method
class RandomMethod(PruningMethod):
    """Example: ``gp.apply(model, "random", keep_ratio=0.25, seed=1)``."""

    name = "random"
    config_class = RandomConfig

    def prune_layer(self, n_layers: int) -> int:
        return self.config.prune_layer

    def budget(self, n_vis: int) -> int:
        return ratio_count(n_vis, self.config.keep_ratio)

    def select(self, state) -> list[torch.Tensor]:
        out = []
        for n in state.enc.n_vis:
            g = torch.Generator().manual_seed(int(self.config.seed))
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=g)[: self.budget(n)]] = True
            out.append(keep.to(state.device))
        return out
