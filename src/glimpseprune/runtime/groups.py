"""Grouped execution of the layers after the last compaction, for batches whose kept counts differ.

After pruning, every sample is left re-padded to the largest kept count: a batch with kept counts 8 ... 256 spends
about half of its slots in layers K+1.. on padding, and any padding forces SDPA off its causal kernel onto a masked
one. ``plan_groups`` splits such a batch into a few groups of similar length (an exact dynamic programme over the
sorted lengths) when that saves enough slots; each group runs the remaining layers on its own short, often
padding-free sequence with its own cache, and ``cache.merge_group_caches`` writes the groups' keys and values back
into one left-padded cache, so decoding is unchanged (one batch: splitting decode steps would re-read the weights
once per group, which costs more than the padding it saves).
"""

from __future__ import annotations

import torch

from .cache import merge_group_caches, new_cache, run_layer
from .masks import attention_mask

MIN_SAVING = 0.2  # group only when at least this share of the slots after K would be padding otherwise
MAX_GROUPS = 4
GROUP_SLACK = 0.05  # take the fewest groups whose cost is within this share of the best plan's


def _best_partition(lengths: list[int], n_groups: int) -> tuple[int, list[int]]:
    """Minimum slot cost sum(n_g * max_g) of splitting lengths (sorted descending) into n_groups contiguous runs, and
    the run starts. O(B^2 * n_groups)."""
    B = len(lengths)
    inf = float("inf")
    cost = [[inf] * (B + 1) for _ in range(n_groups + 1)]  # cost[g][i]: first i lengths in g runs
    start = [[0] * (B + 1) for _ in range(n_groups + 1)]
    cost[0][0] = 0
    for g in range(1, n_groups + 1):
        for i in range(1, B + 1):
            for j in range(g - 1, i):  # the last run is lengths[j:i], its max is lengths[j]
                c = cost[g - 1][j] + (i - j) * lengths[j]
                if c < cost[g][i]:
                    cost[g][i], start[g][i] = c, j
    starts, i = [], B
    for g in range(n_groups, 0, -1):
        starts.append(start[g][i])
        i = start[g][i]
    return int(cost[n_groups][B]), starts[::-1]


def plan_groups(lengths: list[int], min_saving: float = MIN_SAVING, max_groups: int = MAX_GROUPS
                ) -> list[list[int]] | None:
    """Sample indices per group, or None when one padded batch is as good (saving < ``min_saving``).

    >>> plan_groups([8, 250, 16, 256])
    [[3, 1], [2, 0]]
    """
    B = len(lengths)
    if B < 2 or max(lengths) == min(lengths):
        return None
    order = sorted(range(B), key=lambda b: -lengths[b])
    sorted_len = [lengths[b] for b in order]
    padded = B * sorted_len[0]
    plans = [_best_partition(sorted_len, g) for g in range(1, min(max_groups, B) + 1)]
    best = min(c for c, _ in plans)
    n = next(g for g, (c, _) in enumerate(plans, 1) if c <= best * (1 + GROUP_SLACK))
    cost, starts = plans[n - 1]
    if n == 1 or 1 - cost / padded < min_saving:
        return None
    bounds = starts + [B]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def run_grouped(layers, start: int, hidden: torch.Tensor, key_mask: torch.Tensor, rope, cache, text_config,
                groups: list[list[int]]) -> torch.Tensor:
    """Layers ``start``.. of a left-padded batch, one group at a time on its own trimmed sequence; returns the hidden
    states (B, L, H) left padded as before (zeros at padding) and fills layers start.. of ``cache`` (B, L)."""
    B, L, H = hidden.shape
    out = hidden.new_zeros(B, L, H)
    parts = []
    for idx in groups:
        ix = torch.tensor(idx, device=hidden.device)
        Lg = int(key_mask[ix].sum(dim=1).max())
        h, km = hidden[ix, L - Lg:], key_mask[ix, L - Lg:]  # left padding: the last Lg columns hold every token
        rp = tuple(r[ix, L - Lg:] for r in rope)
        gcache = new_cache(text_config)
        mask = attention_mask(text_config, h, km)  # None when the group has no padding: the causal kernel
        for j in range(start, len(layers)):
            h = run_layer(layers[j], h, mask, rp, gcache)
        out[ix, L - Lg:] = h
        parts.append((ix, gcache))
    merge_group_caches(cache, parts, start, len(layers), L)
    return out
