"""Shared machinery of the methods that MERGE visual tokens before the LLM (downsample, visionzip, vscan).

A method gives, per sample, a merge plan ``into`` (n_vis,) long: the visual token (index into the sample's visual
tokens, all its images concatenated) that each token folds into, or -1 to drop it unmerged. Every token that some
token folds into is kept, at its own position (so its position ids / RoPE stay those of a real token), and its LLM
input embedding becomes the mean of its group's embeddings. A kept token that absorbs nothing is left bit for bit
as it was, so a plan that keeps everything is the unpruned model.

The rewrite happens in the ``after_compact`` hook, right after the runtime's K = -1 compaction. What was written is
recorded in ``PrefillResult.scratch["merged_embeds"]``: per sample, None without visual tokens, else ``(idx, rows)``
with idx (m,) long the kept visual tokens whose embedding was replaced and rows (m, H) float32 the new embeddings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..ops.merge import group_mean
from .common import EmbeddingSubset

if TYPE_CHECKING:
    from ..contracts import Encoded, PrefillState


def sample_grids(enc: Encoded, b: int) -> list[tuple[int, int]]:
    """(h, w) token grid of each image of sample b, in order (their tokens are consecutive among its visual ones)."""
    grids = [g for g, owner in zip(enc.grids, enc.image_owner) if owner == b]
    n = sum(h * w for h, w in grids)
    if n != enc.n_vis[b]:
        raise ValueError(f"sample {b}: its image grids {grids} hold {n} tokens but it has {enc.n_vis[b]} visual ones")
    return grids


def image_ids(grids: list[tuple[int, int]], device=None) -> torch.Tensor:
    """(n,) long: the image (0, 1, ...) of each of a sample's visual tokens."""
    sizes = torch.tensor([h * w for h, w in grids], dtype=torch.long)
    return torch.arange(len(grids)).repeat_interleave(sizes).to(device)


def merge_select(state: PrefillState, plan) -> list[torch.Tensor]:
    """Keep masks from ``plan(b, vis) -> into`` per sample (vis: (n_vis_b, H) LLM-input embeddings); stores the
    rows to write in ``state.scratch`` for ``write_merged``."""
    enc = state.enc
    keeps, merged = [], []
    for b, n in enumerate(enc.n_vis):
        keep = torch.zeros(n, dtype=torch.bool, device=state.device)
        record = None
        if n:
            vis = enc.embeds[b, enc.vis_mask[b]]  # (n, H)
            into = plan(b, vis).to(state.device)
            folds = into >= 0
            keep[into[folds]] = True
            rank = keep.long().cumsum(0) - 1  # (n,) rank of each kept token among the kept ones
            means, sizes = group_mean(vis[folds], rank[into[folds]], int(keep.sum()))
            changed = sizes > 1
            record = (keep.nonzero().squeeze(-1)[changed], means[changed])
        keeps.append(keep)
        merged.append(record)
    state.scratch["merged_embeds"] = merged
    state.scratch["merge_pending"] = True
    return keeps


def write_merged(state: PrefillState, hidden: torch.Tensor) -> torch.Tensor:
    """Overwrite, in the just-compacted hidden (B, L', H), the rows ``merge_select`` planned (once)."""
    if not state.scratch.pop("merge_pending", False):
        return hidden
    hidden = hidden.clone()
    for b, record in enumerate(state.scratch["merged_embeds"]):
        if record is None or not record[0].numel():
            continue
        idx, rows = record
        pos = state.vis_mask[b].nonzero().squeeze(-1)  # kept visual tokens, in order
        rank = state.keep_vis[b].long().cumsum(0)[idx] - 1
        hidden[b, pos[rank]] = rows.to(hidden.dtype)
    return hidden


class TokenMerge(EmbeddingSubset):
    """Before the LLM (K = -1): keep budget(n_vis) tokens per sample by the subclass's ``plan`` (instead of
    ``pick``) and merge into them. Needs a config with ``keep_ratio``."""

    def plan(self, state: PrefillState, b: int, vis: torch.Tensor, k: int) -> torch.Tensor:
        """``into`` (n,) long for sample b's visual embeddings vis (n, H), with exactly k distinct targets."""
        raise NotImplementedError

    def select(self, state: PrefillState) -> list[torch.Tensor]:
        return merge_select(state, lambda b, vis: self.plan(state, b, vis, self.budget(vis.shape[0])))

    def after_compact(self, state: PrefillState, hidden: torch.Tensor) -> torch.Tensor:
        return write_merged(state, hidden)
