"""Token compaction: from a per-position keep mask to a left re-padded index, and gathers along the sequence."""

from __future__ import annotations

import torch


def left_repad_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, L) bool -> (index (B, L') long, new_mask (B, L') bool), L' = max kept count.

    Kept positions keep their order and are right-aligned (left padding); pad slots point at position 0 and are
    False in new_mask.
    """
    B, L = keep.shape
    counts = keep.sum(dim=1)
    L_new = max(int(counts.max()), 1)
    index = torch.zeros(B, L_new, dtype=torch.long, device=keep.device)
    new_mask = torch.zeros(B, L_new, dtype=torch.bool, device=keep.device)
    for b in range(B):
        pos = keep[b].nonzero().squeeze(-1)
        n = pos.numel()
        if n:
            index[b, L_new - n :] = pos
            new_mask[b, L_new - n :] = True
    return index, new_mask


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather x along its sequence dim with index (B, L'); the batch dim is the one just before ``dim``."""
    shape = list(x.shape)
    view = [1] * x.dim()
    view[dim - 1], view[dim] = index.shape
    idx = index.view(view)
    shape[dim] = index.shape[1]
    return torch.gather(x, dim, idx.expand(shape))
