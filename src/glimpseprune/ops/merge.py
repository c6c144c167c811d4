"""Token saliency and merging without model weights: attention received under a parameter-free self-attention,
assignment of tokens to their most similar target, and group means. Pure tensor functions.

Memory is O(chunk * n): score rows are computed CHUNK at a time, never the full (n, n) matrix (n reaches 16k visual
tokens on high-resolution inputs, where upstream VisionZip / VScan materialize it and run out of memory).
"""

from __future__ import annotations

import torch

from .diversity import unit_rows

CHUNK = 2048  # query rows held at once


def attention_received(feats: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) float32: the attention each row of ``feats`` (n, d) receives, summed over all queries, in the
    parameter-free self-attention softmax(x x^T / sqrt(d)) (queries = keys = the features themselves).

    ``groups`` (n,) long restricts every query to the keys of its own group (e.g. its image, or its window), as an
    encoder with per-image or windowed attention would. Each query hands out exactly 1, so a group of g tokens
    receives g in total, and the scores of differently sized groups are comparable.

    >>> x = torch.tensor([[3.0, 0.0], [2.9, 0.1], [0.0, 1.0]])
    >>> [round(v, 2) for v in attention_received(x).tolist()]
    [1.34, 1.16, 0.5]
    """
    if feats.dim() != 2:
        raise ValueError(f"feats must be 2-D (n, d), got shape {tuple(feats.shape)}")
    x = feats.float()
    n, d = x.shape
    out = torch.zeros(n, dtype=torch.float32, device=x.device)
    for s in range(0, n, CHUNK):
        logits = (x[s:s + CHUNK] @ x.T) / d**0.5  # (c, n)
        if groups is not None:
            logits = logits.masked_fill(groups[s:s + CHUNK, None] != groups[None, :], float("-inf"))
        out += logits.softmax(dim=-1).sum(dim=0)
    return out


def nearest_target(feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) long: for every row of ``feats`` (n, d), the position in ``targets`` (m,) (row indices, m >= 1) of its
    most cosine-similar target row; every target maps to itself. Ties go to the lower position.

    >>> pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8]])
    >>> nearest_target(pts, torch.tensor([1, 0])).tolist()
    [1, 0, 1, 0]
    """
    if targets.numel() == 0:
        raise ValueError("nearest_target needs at least one target")
    x = unit_rows(feats)
    t = x[targets]  # (m, d)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], CHUNK):
        out[s:s + CHUNK] = (x[s:s + CHUNK] @ t.T).argmax(dim=-1)
    out[targets] = torch.arange(targets.numel(), device=x.device)
    return out


def group_mean(feats: torch.Tensor, group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``feats`` (n, d) averaged by ``group`` (n,) long in [0, n_groups): (means (n_groups, d) float32,
    sizes (n_groups,) long). Empty groups get zero rows.

    >>> means, sizes = group_mean(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([1, 1, 0]), 2)
    >>> means.flatten().tolist(), sizes.tolist()
    ([5.0, 2.0], [1, 2])
    """
    x = feats.float()
    sums = torch.zeros(n_groups, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, group, x)
    sizes = torch.bincount(group, minlength=n_groups)
    return sums / sizes.clamp_min(1)[:, None].to(sums.dtype), sizes
