"""``mask``: prune with keep masks supplied per request (``keep_masks=`` in generate), e.g. ground-truth box tokens
(an oracle) or masks edited by hand. The masks belong to the request, never to the method object."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_method
from .base import MethodConfig, PruningMethod
from .common import check_layer


@dataclass(frozen=True)
class MaskConfig(MethodConfig):
    prune_layer: int | None = None  # None: the model's default K = ceil(2L/3) - 1; -1: before the LLM

    def __post_init__(self):
        check_layer("prune_layer", self.prune_layer, optional=True)


@register_method
class MaskMethod(PruningMethod):
    name = "mask"
    config_class = MaskConfig
    takes_keep_masks = True

    def prune_layer(self, n_layers: int) -> int | None:
        from ..config import default_prune_layer

        k = self.config.prune_layer
        return default_prune_layer(n_layers) if k is None else k

    def select(self, state) -> list[torch.Tensor]:
        masks = state.request.get("keep_masks")
        if masks is None:
            raise ValueError(f"method '{self.name}' needs keep_masks=[bool tensor per sample] in the generate call")
        return check_keep_masks(masks, state.enc.n_vis, state.device)


def check_keep_masks(masks, n_vis: list[int], device) -> list[torch.Tensor]:
    """Per-sample keep masks, flattened to bool (n_vis_b,) on ``device``, with their sizes checked."""
    if len(masks) != len(n_vis):
        raise ValueError(f"keep_masks has {len(masks)} entries for a batch of {len(n_vis)} samples")
    out = []
    for b, (m, n) in enumerate(zip(masks, n_vis)):
        m = torch.as_tensor(m, dtype=torch.bool, device=device)
        if m.dim() != 1:  # flattening an (h, w) grid would pass the size check with the wrong token order
            raise ValueError(f"keep_masks[{b}] has shape {tuple(m.shape)}: give one flat (n_vis,) mask per sample, "
                             "its images' tokens in prompt order (method 'oracle' also takes one (h, w) grid per "
                             "image)")
        if m.numel() != n:
            raise ValueError(f"keep_masks[{b}] has {m.numel()} entries but sample {b} has {n} visual tokens")
        out.append(m)
    return out
