"""Pure selection functions: per-token probabilities -> boolean keep masks. No model knowledge."""

from __future__ import annotations

import math

import torch

from ..config import SelectionConfig


def _topk_mask(scores: torch.Tensor, k: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the k highest ``scores`` (n,) among the ``alive`` (n,) bool entries (all when None); k is clipped
    to the number of alive entries. A NaN score ranks below every number (``topk`` alone would rank it first), as it
    never passes a threshold either; ties go to the lower index (a stable sort; ``topk``'s tie order is unspecified
    and differs between devices). Shared by the selection rules here and ``ops.budget.topk_keep``."""
    s = scores.detach().float().nan_to_num(nan=float("-inf"))
    if alive is not None:
        alive = alive.to(s.device).bool()
        s = s.masked_fill(~alive, float("-inf"))
    k = max(0, min(int(k), s.numel() if alive is None else int(alive.sum())))
    keep = torch.zeros_like(s, dtype=torch.bool)
    if k:
        order = torch.sort(s, descending=True, stable=True).indices  # stable: ties keep index order
        if alive is not None:  # the alive entries first: an alive NaN / -inf score ties with the dead ones' -inf
            order = order[torch.sort((~alive[order]).to(torch.uint8), stable=True).indices]
        keep[order[:k]] = True
    return keep


def select_tokens(
    probs: torch.Tensor,
    threshold: float = 0.5,
    max_keep_ratio: float | None = None,
    min_keep: int = 1,
    fixed_keep_ratio: float | None = None,
    rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep mask for one sample's visual tokens.

    probs: (n_vis,) importance in [0, 1], all images of the sample concatenated (the budget is joint).
    rank: optional (n_vis,) scores that order the tokens for the top-k steps (cap, floor, fixed count), e.g. the
    logits whose sigmoid ``probs`` is: fp32 sigmoid saturates (every logit above ~16.6 gives exactly 1.0, every one
    below ~-103 exactly 0.0), so ranking by ``probs`` loses the order among confident tokens. Default: ``probs``.
    Returns a bool tensor (n_vis,).

    >>> select_tokens(torch.tensor([0.9, 0.2, 0.6, 0.1]), threshold=0.5).tolist()
    [True, False, True, False]
    >>> select_tokens(torch.tensor([0.9, 0.2, 0.6, 0.1]), fixed_keep_ratio=0.25).tolist()
    [True, False, False, False]
    """
    SelectionConfig(threshold, max_keep_ratio, min_keep, fixed_keep_ratio)  # validates the knobs
    if not torch.is_tensor(probs):
        raise TypeError(f"probs must be a 1-D torch tensor, got {type(probs).__name__} (torch.as_tensor(...) first)")
    if probs.dim() != 1:
        raise ValueError(f"probs must be 1-D (n_vis,), got shape {tuple(probs.shape)}")
    n_vis = probs.numel()
    if rank is None:
        rank = probs
    elif rank.shape != probs.shape:
        raise ValueError(f"rank must have the shape of probs {tuple(probs.shape)}, got {tuple(rank.shape)}")
    if fixed_keep_ratio is not None:
        return _topk_mask(rank, max(min_keep, _floor(fixed_keep_ratio * n_vis)))
    keep = probs > threshold
    if max_keep_ratio is not None:
        cap = _floor(max_keep_ratio * n_vis)
        if int(keep.sum()) > cap:
            keep = _topk_mask(rank, cap)
    if int(keep.sum()) < min_keep:
        keep = keep | _topk_mask(rank, min_keep)
    return keep


def select_with(cfg: SelectionConfig, probs: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
    """``select_tokens`` with the knobs of a ``SelectionConfig``."""
    return select_tokens(probs, cfg.threshold, cfg.max_keep_ratio, cfg.min_keep, cfg.fixed_keep_ratio, rank)


def _floor(x: float) -> int:
    """floor(x), tolerant of float error: 0.29 * 100 = 28.999... counts as 29."""
    return int(math.floor(x + 1e-9))
