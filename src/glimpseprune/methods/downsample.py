"""``downsample``: the token-space equivalent of giving the model a smaller image, before the LLM.

Per image, its (h, w) grid of visual tokens is pooled into a coarser grid of about keep_ratio * h * w cells
(``ops.pooling.pooled_cells``: near-equal bands of near-equal cells, about square); each cell keeps ONE token, its
centre one, whose LLM input embedding becomes the mean of the cell's embeddings (average pooling). Keeping a real
token per cell keeps its position ids (M-RoPE rows / columns, or its 1-D index), so the pooled grid sits where the
image was.

Budget: exactly max(1, floor(keep_ratio * n_vis)) per sample, shared over its images in proportion to their token
counts (``ops.pooling.split_budget``, at least one cell per image when the budget allows). Exactness is by
construction: ``pooled_cells`` partitions a grid into ANY number of cells, not only rows x cols products.

Why pool features rather than re-encode a smaller image: re-encoding changes the processor's output and the prompt
(fewer placeholder tokens, new position ids) and needs a second vision-encoder pass, so it cannot run as a method on
a fixed request or compare with the other methods at equal budget; pooling the embeddings entering the LLM costs
nothing, works for every family through the adapter, and is what a strided average-pooling projector (e.g. 2 x 2
pooling of the visual tokens) does. It is the "uniform, content-blind" baseline; ``random`` is the other one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.pooling import pooled_cells, split_budget
from ..registry import register_method
from .base import MethodConfig
from .common import check_keep_ratio
from .merging import TokenMerge, sample_grids


@dataclass(frozen=True)
class DownsampleConfig(MethodConfig):
    keep_ratio: float = 0.25  # 0.25: each side of the image halved

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)


def pooling_plan(grids: list[tuple[int, int]], k: int) -> torch.Tensor:
    """``into`` (n,) long for a sample with image grids ``grids`` pooled to k cells in total: each token folds into
    its cell's centre token (-1 for the tokens of an image that gets no cell, when k < number of images)."""
    shares = split_budget([h * w for h, w in grids], k)
    out, offset = [], 0
    for (h, w), c in zip(grids, shares):
        if c:
            cell, rep = pooled_cells(h, w, c)
            out.append(rep[cell] + offset)
        else:
            out.append(torch.full((h * w,), -1, dtype=torch.long))
        offset += h * w
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@register_method
class DownsampleMethod(TokenMerge):
    """Example: ``gp.apply(model, "downsample", keep_ratio=0.25)``."""

    name = "downsample"
    config_class = DownsampleConfig

    def plan(self, state, b: int, vis: torch.Tensor, k: int) -> torch.Tensor:
        return pooling_plan(sample_grids(state.enc, b), k)
