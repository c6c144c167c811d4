"""``oracle``: keep the ground-truth tokens given per request (e.g. the question's box tokens).

As upstream's ``use_ref_masks``: no glimpse token, the LLM runs to layer K on every token and prunes there. The upper
bound a learned selector chases.

Budget-free: it keeps exactly what the masks say (none of a sample's visual tokens if its mask is empty). Masks come
per request as ``keep_masks=``, either per sample (n_vis_b,) like ``mask``, or per image as (h, w) grids (what
``adapter.box_masks`` returns), concatenated here per sample in image order. K defaults to the glimpse's, ceil(2L/3)
- 1; ``prune_layer=-1`` prunes before the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_method
from .base import MethodConfig
from .common import check_layer
from .mask import MaskMethod, check_keep_masks


@dataclass(frozen=True)
class OracleConfig(MethodConfig):
    prune_layer: int | None = None  # None: the model's default K = ceil(2L/3) - 1; -1: before the LLM

    def __post_init__(self) -> None:
        check_layer("prune_layer", self.prune_layer, optional=True)


def per_sample_masks(masks: list, grids: list[tuple[int, int]], owner: list[int], n_samples: int) -> list:
    """Per-image (h, w) masks -> per-sample flat masks (all of a sample's images concatenated, batch order)."""
    if len(masks) != len(grids):
        raise ValueError(f"got {len(masks)} per-image (h, w) keep masks for {len(grids)} images")
    out: list[list[torch.Tensor]] = [[] for _ in range(n_samples)]
    for i, (m, (h, w), b) in enumerate(zip(masks, grids, owner)):
        m = torch.as_tensor(m, dtype=torch.bool)
        if tuple(m.shape) != (h, w):
            raise ValueError(f"keep mask of image {i} has shape {tuple(m.shape)}, its token grid is {(h, w)}")
        out[b].append(m.flatten())
    return [torch.cat(ms) if ms else torch.zeros(0, dtype=torch.bool) for ms in out]


@register_method
class OracleMethod(MaskMethod):
    """Example: ``pm = gp.apply(model, "oracle"); pm.generate(inputs, keep_masks=adapter.box_masks(...))``."""

    name = "oracle"
    config_class = OracleConfig

    def select(self, state) -> list[torch.Tensor]:
        masks = state.request.get("keep_masks")
        if masks is None:
            raise ValueError("method 'oracle' needs keep_masks= in the generate call: a bool tensor per sample, "
                             "or a (h, w) grid per image")
        enc = state.enc
        if len(masks) and all(torch.as_tensor(m).dim() == 2 for m in masks):
            masks = per_sample_masks(masks, enc.grids, enc.image_owner, len(enc.n_vis))
        return check_keep_masks(masks, enc.n_vis, state.device)
