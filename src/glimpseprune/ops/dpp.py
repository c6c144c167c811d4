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
    return _greedy_map(torch.diagonal(L).clone(), lambda j: L[j], k, eps)


def conditional_dpp_select(feats: torch.Tensor, relevance: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """``dpp_greedy_map(conditional_kernel(feats, relevance), k)`` without materializing the kernel."""
    _check(feats, relevance)
    x = unit_rows(feats)
    r = relevance.float()
    diag = r.square() * (x * x).sum(dim=-1)
    return _greedy_map(diag, lambda j: r[j] * r * (x @ x[j]), k, eps)


def _greedy_map(diag: torch.Tensor, row: Callable[[torch.Tensor], torch.Tensor], k: int, eps: float) -> torch.Tensor:
    n = diag.shape[0]
    k = max(0, min(int(k), n))
    picks = torch.empty(k, dtype=torch.long, device=diag.device)
    cis = torch.zeros(k, n, dtype=diag.dtype, device=diag.device)  # rows of the incremental Cholesky factor
    gains = diag.clone()  # (n,) marginal gains d_j^2
    floor = eps * float(diag.max()) if n else 0.0
    taken = torch.zeros(n, dtype=torch.bool, device=diag.device)
    for i in range(k):
        j = torch.argmax(gains.masked_fill(taken, float("-inf")))
        if float(gains[j]) <= floor:  # degenerate: fill by quality among the rest
            rest = diag.masked_fill(taken, float("-inf"))
            picks[i:] = torch.sort(rest, descending=True, stable=True).indices[: k - i]
            return picks
        picks[i], taken[j] = j, True
        e = (row(j) - cis[:i, j] @ cis[:i]) / gains[j].sqrt()  # (n,)
        cis[i] = e
        gains = gains - e.square()
    return picks


def _check(feats: torch.Tensor, relevance: torch.Tensor) -> None:
    if feats.dim() != 2 or relevance.shape != feats.shape[:1]:
        raise ValueError(f"need feats (n, d) and relevance (n,), got {tuple(feats.shape)} and "
                         f"{tuple(relevance.shape)}")
