"""Fixed-budget helpers shared by the score-based methods: how many tokens a keep ratio buys, and top-k among the
tokens still alive. Pure tensor functions, no model knowledge."""

from __future__ import annotations

import torch

from .select import _floor, _topk_mask


def keep_count(n_vis: int, keep_ratio: float, min_keep: int = 1) -> int:
    """max(min_keep, floor(keep_ratio * n_vis)), never more than n_vis (0 for a sample without visual tokens).

    >>> keep_count(64, 0.111), keep_count(5, 0.1), keep_count(0, 0.5), keep_count(10, 1.0)
    (7, 1, 0, 10)
    """
    if not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return min(n_vis, max(int(min_keep), _floor(keep_ratio * n_vis)))


def topk_keep(scores: torch.Tensor, k: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (n,) of the k highest ``scores`` (n,) among the ``alive`` (n,) bool entries (all when None).

    Ties go to the lower index. NaN scores rank last. k is clipped to the number of alive entries.

    >>> topk_keep(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2, alive=torch.tensor([True, False, True, True])).tolist()
    [False, False, True, True]
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (n,), got shape {tuple(scores.shape)}")
    return _topk_mask(scores, k, alive)
