"""``visionzip``: VisionZip (CVPR'25), dominant tokens plus merged contextual tokens, before the LLM.

Per sample, of its budget k = max(1, floor(keep_ratio * n_vis)) tokens (joint over its images):

- **dominant**: the k - floor((1 - dominant_frac) * k) tokens receiving the most attention (upstream: the CLS
  token's attention in a CLS encoder, else the last ViT block's attention summed over queries), kept as they are;
- **contextual**: floor((1 - dominant_frac) * k) targets taken at an even stride from the remaining tokens (in
  order); every other remaining token folds into its most cosine-similar target, and each target's embedding becomes
  the mean of itself and the tokens it absorbed.

Saliency proxy (documented deviation): no adapter exposes the vision encoder's attention maps, and the families have
no common CLS token, so the attention received is that of a parameter-free self-attention over the visual embeddings
entering the LLM, softmax(x x^T / sqrt(d)) within each image, summed over queries (``ops.merge.attention_received``;
summed, as upstream does without a CLS token, so images of different sizes compare). Like a ViT's attention sinks,
it favours high-norm tokens aligned with many others. Similarity for merging is the cosine of the same embeddings
(upstream: the ViT keys).

Other deviations: a contextual token is the plain mean of its group (upstream adds the target to the mean of the
tokens assigned to it, which doubles its scale); nothing is materialized as (n, n), so high-resolution inputs
that make upstream run out of memory are fine. Kept tokens keep their position ids. keep_ratio = 1 changes nothing.
The default ``dominant_frac`` 0.85 splits 64 / 128 / 192 tokens as 55+9 / 109+19 / 164+28; upstream's fixed
settings (54+10 / 108+20 / 162+30) are ``dominant_frac=27/32``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..ops.budget import topk_keep
from ..ops.merge import attention_received, nearest_target
from ..ops.pooling import even_bounds
from ..ops.select import _floor
from ..registry import register_method
from .base import MethodConfig
from .common import check_keep_ratio
from .merging import TokenMerge, image_ids, sample_grids


@dataclass(frozen=True)
class VisionZipConfig(MethodConfig):
    keep_ratio: float = 0.111
    dominant_frac: float = 0.85  # share of the budget kept as dominant tokens; the rest are merged contextual ones

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        f = self.dominant_frac
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 <= float(f) <= 1.0:
            raise ValueError(f"dominant_frac must be in [0, 1], got {f!r}")


def contextual_plan(vis: torch.Tensor, dominant: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """``into`` (n,) long: dominant tokens (bool (n,)) keep themselves; n_ctx targets at an even stride over the
    others absorb the rest by cosine similarity (all others dropped when n_ctx == 0)."""
    n = vis.shape[0]
    into = torch.arange(n, device=vis.device)
    rest = (~dominant).nonzero().squeeze(-1)
    if not n_ctx:
        into[rest] = -1
    elif rest.numel():
        at = torch.tensor(even_bounds(rest.numel(), n_ctx)[:-1], device=vis.device)  # (n_ctx,) into rest
        into[rest] = rest[at[nearest_target(vis[rest], at)]]
    return into


@register_method
class VisionZipMethod(TokenMerge):
    """Example: ``gp.apply(model, "visionzip", keep_ratio=0.111, dominant_frac=0.85)``."""

    name = "visionzip"
    config_class = VisionZipConfig

    def split(self, k: int) -> tuple[int, int]:
        """(dominant, contextual) counts of a budget k."""
        n_ctx = _floor((1.0 - self.config.dominant_frac) * k)
        return k - n_ctx, n_ctx

    def plan(self, state, b: int, vis: torch.Tensor, k: int) -> torch.Tensor:
        n_dom, n_ctx = self.split(k)
        image = image_ids(sample_grids(state.enc, b), vis.device)
        dominant = topk_keep(attention_received(vis, image), n_dom)
        return contextual_plan(vis, dominant, n_ctx)
