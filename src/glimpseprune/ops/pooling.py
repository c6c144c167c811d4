"""Token-grid geometry for pooling and windowed selection: splitting a budget over images, partitioning an (h, w)
grid into exactly c near-uniform cells, and window ids. Pure functions on ints and tensors, no model knowledge."""

from __future__ import annotations

import math

import torch


def split_budget(counts: list[int], k: int) -> list[int]:
    """Share k tokens over images with ``counts`` tokens each, proportionally (largest remainder, ties to the lower
    index). Sums to exactly k, never exceeds a count, and gives every image at least 1 when k >= len(counts).
    k == sum(counts) gives back ``counts``.

    >>> split_budget([64, 24, 32], 36), split_budget([64, 24, 32], 120), split_budget([100, 1], 2)
    ([19, 7, 10], [64, 24, 32], [1, 1])
    """
    total = sum(counts)
    if not 0 <= k <= total or any(c < 0 for c in counts):
        raise ValueError(f"cannot share {k} tokens over images of {counts} tokens")
    if not total:
        return [0] * len(counts)
    shares = [k * c / total for c in counts]
    out = [math.floor(s + 1e-9) for s in shares]
    order = sorted(range(len(counts)), key=lambda i: (-(shares[i] - out[i]), i))
    for i in order[: k - sum(out)]:
        out[i] += 1
    if k >= len(counts):  # no image vanishes: take one token from the largest share for each empty image
        for i in range(len(counts)):
            if out[i] == 0 and counts[i]:
                j = max(range(len(counts)), key=lambda t: (out[t], -t))
                out[i], out[j] = 1, out[j] - 1
    return out


def even_bounds(n: int, parts: int) -> list[int]:
    """parts + 1 boundaries floor(i * n / parts) splitting range(n) into parts near-equal runs.

    >>> even_bounds(8, 3)
    [0, 2, 5, 8]
    """
    return [i * n // parts for i in range(parts + 1)]


def pooled_cells(h: int, w: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition an (h, w) raster grid into exactly c (1 <= c <= h * w) near-uniform rectangular cells.

    The grid is cut into r horizontal bands of near-equal height, r close to sqrt(c * h / w) (the cells come out
    about square) and at least ceil(c / w); band i gets floor or ceil of c / r cells, split into near-equal column
    runs. This is what resizing the image to about c tokens does, but exact for every c (a plain rows x cols grid is
    not: a prime c would force a 1 x c grid). c == h * w gives the identity (one token per cell).

    Returns ``cell`` (h * w,) long, the cell of each token (cells numbered in raster order), and ``rep`` (c,) long,
    the token at the centre of each cell (the upper / left one of the two middles for even sizes).

    >>> cell, rep = pooled_cells(4, 4, 5)
    >>> cell.view(4, 4).tolist(), rep.tolist()
    ([[0, 0, 1, 1], [0, 0, 1, 1], [2, 3, 4, 4], [2, 3, 4, 4]], [0, 2, 8, 9, 10])
    """
    if not 1 <= c <= h * w:
        raise ValueError(f"a {h} x {w} grid cannot be pooled into {c} cells")
    rows = min(h, c, max(-(-c // w), round(math.sqrt(c * h / w))))
    row_b, per_band = even_bounds(h, rows), even_bounds(c, rows)
    cell = torch.empty(h, w, dtype=torch.long)
    rep = torch.empty(c, dtype=torch.long)
    for i in range(rows):
        r0, r1 = row_b[i], row_b[i + 1]
        n_cols = per_band[i + 1] - per_band[i]
        col_b = even_bounds(w, n_cols)
        for j in range(n_cols):
            c0, c1, cid = col_b[j], col_b[j + 1], per_band[i] + j
            cell[r0:r1, c0:c1] = cid
            rep[cid] = ((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2
    return cell.flatten(), rep


def window_ids(h: int, w: int, size: int) -> torch.Tensor:
    """(h * w,) long: the id of the size x size window (raster order, partial windows at the edges) of each token.

    >>> window_ids(3, 5, 2).view(3, 5).tolist()
    [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    """
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    rows = torch.arange(h).repeat_interleave(w) // size
    cols = torch.arange(w).repeat(h) // size
    return rows * (-(-w // size)) + cols


def window_quota_keep(scores: torch.Tensor, window: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (n,) of up to k tokens picked greedily by descending ``scores`` (n,), each window (``window`` (n,)
    long ids) contributing at most ceil(k / number of windows) of them: spatially spread picks. Fewer than k come
    back only when small windows cannot hold the quota. Ties go to the lower index.

    >>> s = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    >>> window_quota_keep(s, torch.tensor([0, 0, 0, 1, 1, 1]), 4).tolist()
    [True, True, False, False, True, True]
    """
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    k = max(0, min(int(k), n))
    if not k:
        return keep
    quota = -(-k // int(torch.unique(window).numel()))
    order = torch.sort(scores.detach().float().nan_to_num(nan=float("-inf")), descending=True, stable=True).indices
    by_window = order[torch.sort(window[order], stable=True).indices]  # grouped by window, best first inside
    starts = torch.searchsorted(window[by_window], window[by_window], right=False)
    rank = torch.empty(n, dtype=torch.long, device=scores.device)
    rank[by_window] = torch.arange(n, device=scores.device) - starts  # rank of each token inside its window
    eligible = order[rank[order] < quota]
    keep[eligible[:k]] = True
    return keep
