"""Determinantal point processes for token selection (CDPruner, NeurIPS'25): the conditional kernel
L = diag(r) S diag(r) and greedy MAP inference with incremental Cholesky updates (Chen et al., NeurIPS'18). Pure.

``conditional_dpp_select`` never builds the (n, n) kernel: it computes the rows it needs, so memory is O(n * k).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .diversity import unit_rows


def conditional_kernel(feats: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """feats (n, d), relevance (n,) >= 0 -> L (n, n) = diag(r) . cosine-similarity(feats) . diag(r), float32."""
    _check(feats, relevance)
    x = unit_rows(feats)
    r = relevance.float()
    return r[:, None] * (x @ x.T) * r[None, :]


def minmax_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(n,) -> (n,) scaled to [0, 1] as CDPruner does: (x - min) / (max - min + eps)."""
    x = x.float()
    return (x - x.min()) / (x.max() - x.min() + eps) if x.numel() else x


def dpp_greedy_map(kernel: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """Indices (k,) of a greedy MAP subset of the DPP with PSD kernel (n, n), in pick order.

    Each step adds the item with the largest marginal gain d_j^2 = det(L_{S+j}) / det(L_S), updated incrementally in
    O(n k) per step. When every remaining gain is <= eps * max(diag) (the chosen set already spans the kernel's
    rank, up to float error), the rest are filled by the kernel's diagonal (quality), so exactly min(k, n) distinct
    items come back. Runs in float32, or float64 for a float64 kernel.

    >>> L = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]])
    >>> dpp_greedy_map(L, 2).tolist()
    [0, 2]
    """
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square (n, n), got shape {tuple(kernel.shape)}")
    L = kernel.to(torch.promote_types(kernel.dtype, torch.float32))
    return _greedy_map(torch.diagonal(L).clone(), lambda j1: L.index_select(0, j1)[0], k, eps)


def conditional_dpp_select(feats: torch.Tensor, relevance: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """``dpp_greedy_map(conditional_kernel(feats, relevance), k)`` without materializing the kernel."""
    _check(feats, relevance)
    x = unit_rows(feats)
    r = relevance.float()
    diag = r.square() * (x * x).sum(dim=-1)
    return _greedy_map(diag, lambda j1: r.index_select(0, j1) * r * (x @ x.index_select(0, j1)[0]), k, eps)


def _greedy_map(diag: torch.Tensor, row: Callable[[torch.Tensor], torch.Tensor], k: int, eps: float) -> torch.Tensor:
    # row(j1): the kernel row (n,) of the item in the one-element index tensor j1. Nothing is read back to the host
    # inside the loop (on a GPU each read would stall the queue once per pick): indices stay tensors, a picked item's
    # gain becomes -inf, and the first degenerate step (gain <= floor) is found after the loop, from the gains at
    # the picks -- the picks before it are the step-by-step ones, the rest are filled by quality as there.
    n = diag.shape[0]
    k = max(0, min(int(k), n))
    picks = torch.empty(k, dtype=torch.long, device=diag.device)
    picked_gain = torch.empty(k, dtype=diag.dtype, device=diag.device)
    cis = torch.zeros(k, n, dtype=diag.dtype, device=diag.device)  # rows of the incremental Cholesky factor
    gains = diag.clone()  # (n,) marginal gains d_j^2; -inf once picked
    for i in range(k):
        j1 = torch.argmax(gains).view(1)
        g = gains.index_select(0, j1)  # (1,)
        picks[i:i + 1], picked_gain[i:i + 1] = j1, g
        e = (row(j1) - cis[:i].index_select(1, j1)[:, 0] @ cis[:i]) / g.sqrt()  # (n,)
        cis[i] = e
        gains = (gains - e.square()).index_fill_(0, j1, float("-inf"))
    if k:  # one read: the first degenerate step (gain <= floor, compared as Python floats would be), or k
        degenerate = picked_gain.double() <= eps * diag.max().double()
        i = int(torch.where(degenerate.any(), degenerate.int().argmax(), k))
        if i < k:  # fill by quality among the rest from there on
            rest = diag.clone()
            rest[picks[:i]] = float("-inf")
            picks[i:] = torch.sort(rest, descending=True, stable=True).indices[: k - i]
    return picks


def _check(feats: torch.Tensor, relevance: torch.Tensor) -> None:
    if feats.dim() != 2 or relevance.shape != feats.shape[:1]:
        raise ValueError(f"need feats (n, d) and relevance (n,), got {tuple(feats.shape)} and "
                         f"{tuple(relevance.shape)}")
