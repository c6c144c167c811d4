"""Max-min diversity selection (DivPrune, CVPR'25): greedy farthest-point sampling under cosine distance. Pure.

Memory is O(n * chunk + n * d): distance rows are computed as needed, never the full (n, n) matrix (n reaches 16k
visual tokens on high-resolution inputs).
"""

from __future__ import annotations

import torch

CHUNK = 2048  # rows of the distance matrix held at once when finding nearest neighbours


def unit_rows(feats: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(n, d) -> (n, d) float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = feats.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_distance(feats: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(n, d) -> (n, n) pairwise 1 - cosine similarity, in float32."""
    x = unit_rows(feats, eps)
    return 1.0 - x @ x.T


def nearest_neighbour_distance(x: torch.Tensor) -> torch.Tensor:
    """Unit rows x (n, d) -> (n,) cosine distance of each row to its nearest OTHER row (inf when n == 1)."""
    n = x.shape[0]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, CHUNK):
        d = 1.0 - x[s:s + CHUNK] @ x.T  # (c, n)
        rows = torch.arange(d.shape[0], device=x.device)
        d[rows, rows + s] = float("inf")
        out[s:s + CHUNK] = d.amin(dim=1)
    return out


def farthest_point_select(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) of a max-min diverse subset of the rows of ``feats`` (n, d), in pick order.

    As DivPrune: the first pick is the row with the largest distance to its nearest neighbour; every later pick is
    the row whose minimum distance to the picks so far is largest (distance = 1 - cosine). Picks are distinct even
    for duplicate rows; ties go to the lower index. k is clipped to n.

    >>> pts = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.05]])
    >>> farthest_point_select(pts, 2).tolist()
    [3, 0]
    """
    if feats.dim() != 2:
        raise ValueError(f"feats must be 2-D (n, d), got shape {tuple(feats.shape)}")
    n = feats.shape[0]
    k = max(0, min(int(k), n))
    picks = torch.empty(k, dtype=torch.long, device=feats.device)
    if k == 0:
        return picks
    x = unit_rows(feats)
    taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
    j = torch.argmax(nearest_neighbour_distance(x))
    min_dist = torch.full((n,), float("inf"), device=feats.device)  # distance of every row to the picked set
    for i in range(k):  # indices stay tensors: no value is read back to the host inside the loop
        if i:
            j = torch.argmax(min_dist.masked_fill(taken, float("-inf")))
        j1 = j.view(1)
        picks[i:i + 1] = j1
        taken.index_fill_(0, j1, True)
        min_dist = torch.minimum(min_dist, 1.0 - x @ x.index_select(0, j1)[0])
    return picks


def farthest_point_fill(feats: torch.Tensor, seed: torch.Tensor, k: int) -> torch.Tensor:
    """Bool keep mask (n,) of exactly min(k, n) rows: the ``seed`` rows (bool (n,), at most k of them), then greedy
    farthest-point picks among the others -- each the row whose minimum cosine distance to the rows kept so far is
    largest (ties to the lower index); with no seed the first pick is ``farthest_point_select``'s.

    >>> pts = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.05]])
    >>> farthest_point_fill(pts, torch.tensor([True, False, False, False]), 2).tolist()
    [True, False, False, True]
    """
    n = feats.shape[0]
    k = max(0, min(int(k), n))
    seed = seed.to(device=feats.device, dtype=torch.bool)
    if int(seed.sum()) > k:
        raise ValueError(f"the seed holds {int(seed.sum())} rows, more than the {k} to keep")
    keep = seed.clone()
    if int(keep.sum()) == k:
        return keep
    x = unit_rows(feats)
    if not bool(keep.any()):
        keep[farthest_point_select(feats, 1)] = True
    seeds = x[keep]  # (s, d); the distances to them CHUNK rows at a time, never (n, s) (s grows with k, so with n)
    min_dist = torch.cat([(1.0 - x[i:i + CHUNK] @ seeds.T).amin(dim=1) for i in range(0, n, CHUNK)])
    for _ in range(k - int(keep.sum())):
        j1 = torch.argmax(min_dist.masked_fill(keep, float("-inf"))).view(1)
        keep.index_fill_(0, j1, True)
        min_dist = torch.minimum(min_dist, 1.0 - x @ x.index_select(0, j1)[0])
    return keep
