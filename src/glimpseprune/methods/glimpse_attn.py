"""``glimpse_attn``: training-free glimpse, top-k by an appended query token's attention at the glimpse layer.

GlimpsePrune's glimpse token WITHOUT the trained module: one extra token is appended after the prompt, its input
embedding the mean of the sample's text-token embeddings (no learned vectors are added in later layers), and at layer
K the visual tokens it attends to most (head-mean softmax over its visible keys) are kept. Like the glimpse, it is
dropped at K and never influences the answer.

Why the text mean: it is a question-conditioned query that exists in every model and sits where the trained glimpse
sits (position next_pos, causally last). ``query="last_token"`` uses the last prompt token's query instead (no extra
token; FastV's score at the glimpse layer). Budget: exactly max(1, floor(keep_ratio * n_vis)) per sample. Layer: K =
ceil(2L/3) - 1 by default, the trained glimpse's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import default_prune_layer
from ..registry import register_method
from .base import MethodConfig
from .common import AttentionTopK, check_keep_ratio, check_layer, ratio_count

QUERIES = ("text_mean", "last_token")


@dataclass(frozen=True)
class GlimpseAttnConfig(MethodConfig):
    keep_ratio: float = 0.111
    prune_layer: int | None = None  # None: K = ceil(2L/3) - 1
    query: str = "text_mean"  # "text_mean": appended mean-of-text token; "last_token": the last prompt token

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        check_layer("prune_layer", self.prune_layer, minimum=0, optional=True)
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}")


@register_method
class GlimpseAttnMethod(AttentionTopK):
    """Example: ``gp.apply(model, "glimpse_attn", keep_ratio=0.111)``."""

    name = "glimpse_attn"
    config_class = GlimpseAttnConfig

    def prune_layer(self, n_layers: int) -> int:
        k = self.config.prune_layer
        return default_prune_layer(n_layers) if k is None else k

    def budget(self, n_vis: int) -> int:
        return ratio_count(n_vis, self.config.keep_ratio)

    def stage_count(self, n_vis: int, stage: int) -> int:
        return self.budget(n_vis)

    def extra_tokens(self, state) -> torch.Tensor | None:
        if self.config.query != "text_mean":
            return None
        enc = state.enc
        text = (enc.attn_mask & ~enc.vis_mask).to(enc.embeds.dtype)[..., None]  # (B, L, 1)
        return (enc.embeds * text).sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp_min(1.0)

    def query_at(self, state) -> int:
        return state.extra_at if self.config.query == "text_mean" else state.last_prompt_at
