"""``vscan``: VScan (TMLR'26), a global + local scan with merging before the LLM, then last-token attention mid-LLM.

Two compaction stages: the scan keeps an intermediate count before the LLM, then the top-k by the last prompt
token's attention at a middle LLM layer keeps the final budget.

Schedule, per sample (joint over its images), with n = n_vis and final = max(1, floor(keep_ratio * n)):

1. **Before the LLM (K = -1)** keep m = max(final, max(1, floor(min(1, keep_ratio / mid_keep) * n))) tokens:
   - *local scan*: floor(local_frac * m) tokens picked greedily by local saliency, at most ceil(that / number of
     windows) per window x window block of each image's token grid (spatially spread picks);
   - *global scan*: the rest of the m by global saliency among the tokens not yet picked;
   - with ``merge=True`` (upstream) every other token folds into its most cosine-similar kept token, whose input
     embedding becomes the mean of its group.
2. **After LLM layer mid_layer** (default L/2 - 1: upstream's "layer 16" of 32 and "layer 14" of 28) keep
   the top ``final`` of the m by the head-mean attention the last prompt token pays them in that layer
   (``common.AttentionTopK``, as fastv / pdrop).

Defaults keep 1/3 of the tokens through layers 0..mid_layer and 11.1 % after it; upstream's 28-layer setting (16.7 %
then 1/3 of those at layer 14, 11.1 % average over the layers) is ``keep_ratio=0.0556, mid_keep=1/3``. ``budget`` is
the final count; ``PrefillResult.stage_kept`` holds both.

Saliency proxy (documented deviation): no adapter exposes the vision encoder's attention maps, so saliency is the
attention received in a parameter-free self-attention over the visual embeddings entering the LLM
(``ops.merge.attention_received``, as ``visionzip``): local saliency attends within each window (upstream: an early,
windowed ViT block), global saliency within each image (upstream: the last ViT block). The LLM-stage scores come
from the attention of layer mid_layer itself, with RoPE (upstream recomputes q / k with the next layer's projections,
without RoPE). Nothing is materialized as (n, n), and several images per sample are supported.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..ops.budget import topk_keep
from ..ops.merge import attention_received, nearest_target
from ..ops.pooling import window_ids, window_quota_keep
from ..ops.select import _floor
from ..registry import register_method
from .base import MethodConfig
from .common import AttentionTopK, check_keep_ratio, check_layer, ratio_count
from .merging import image_ids, merge_select, sample_grids, write_merged


def _check_fraction(name: str, value, low_open: bool = True) -> None:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real)
    if bad or not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value!r}")


@dataclass(frozen=True)
class VScanConfig(MethodConfig):
    keep_ratio: float = 0.111  # kept after the mid-LLM stage (the budget)
    mid_keep: float = 1 / 3  # share of the before-LLM survivors the mid-LLM stage keeps
    mid_layer: int | None = None  # None: L/2 - 1
    local_frac: float = 0.5  # share of the before-LLM survivors picked by the windowed local scan
    window: int = 4  # local-scan window side, in visual tokens
    merge: bool = True  # fold the tokens dropped before the LLM into their most similar kept token

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        _check_fraction("mid_keep", self.mid_keep)
        _check_fraction("local_frac", self.local_frac, low_open=False)
        check_layer("mid_layer", self.mid_layer, minimum=0, optional=True)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.merge, bool):
            raise ValueError(f"merge must be a bool, got {self.merge!r}")


def scan_keep(vis: torch.Tensor, grids: list[tuple[int, int]], m: int, local_frac: float, window: int):
    """Bool (n,) keep mask of the before-LLM stage: local (windowed quota) picks, then global top-k to m."""
    wins, offset = [], 0
    for h, w in grids:  # windows numbered apart per image
        ids = window_ids(h, w, window)
        wins.append(ids + offset)
        offset += int(ids.max()) + 1
    win = torch.cat(wins).to(vis.device)
    keep = window_quota_keep(attention_received(vis, win), win, _floor(local_frac * m))
    image = image_ids(grids, vis.device)
    return keep | topk_keep(attention_received(vis, image), m - int(keep.sum()), alive=~keep)


@register_method
class VScanMethod(AttentionTopK):
    """Example: ``gp.apply(model, "vscan", keep_ratio=0.0556, mid_keep=1 / 3, mid_layer=13)``."""

    name = "vscan"
    config_class = VScanConfig

    def prune_layers(self, n_layers: int) -> tuple[int, ...]:
        k = self.config.mid_layer
        return (-1, max(0, n_layers // 2 - 1) if k is None else k)

    def prune_layer(self, n_layers: int) -> int:
        return -1

    def budget(self, n_vis: int) -> int:
        return ratio_count(n_vis, self.config.keep_ratio)

    def scan_count(self, n_vis: int) -> int:
        """Tokens kept before the LLM (the first stage)."""
        ratio = min(1.0, self.config.keep_ratio / self.config.mid_keep)
        return max(self.budget(n_vis), ratio_count(n_vis, ratio))

    def stage_count(self, n_vis: int, stage: int) -> int:
        return self.scan_count(n_vis) if stage == 0 else self.budget(n_vis)

    def plan(self, state, b: int, vis: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        keep = scan_keep(vis, sample_grids(state.enc, b), self.scan_count(vis.shape[0]), cfg.local_frac, cfg.window)
        kept = keep.nonzero().squeeze(-1)
        if not cfg.merge:
            return torch.where(keep, torch.arange(keep.numel(), device=keep.device), -1)
        return kept[nearest_target(vis, kept)]

    def select(self, state) -> list[torch.Tensor]:
        if state.stage == 0:
            return merge_select(state, lambda b, vis: self.plan(state, b, vis))
        scores = state.scratch["attn_scores"][-1]
        return [topk_keep(s, self.budget(alive.numel()), alive) for s, alive in zip(scores, state.keep_vis)]

    def after_compact(self, state, hidden: torch.Tensor) -> torch.Tensor:
        return write_merged(state, hidden)
