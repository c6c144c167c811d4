"""``cdpruner``: CDPruner (NeurIPS'25), relevant and diverse visual tokens by a conditional DPP, before the LLM.

Greedy MAP inference (``ops.dpp.conditional_dpp_select``) over the visual token embeddings entering the LLM. Kernel L
= diag(r) S diag(r): S is the cosine similarity of the visual embeddings, r the relevance of each visual token to the
instruction, min-max normalized to [0, 1]. Before the LLM (K = -1), joint over a sample's images.

Relevance: the cosine between each visual embedding and the mean input embedding of the sample's text tokens after
its last visual token (the question, plus the chat template's closing tokens; all its text tokens if none follow).
Upstream uses a CLIP text tower on the question; not every family has one, so every family uses the LLM's own input
space, where the projector maps the visual tokens. ``negate_relevance=True`` flips the sign as upstream's code does
(it uses the negative mean cosine). Budget: exactly max(1, floor(keep_ratio * n_vis)) per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.dpp import conditional_dpp_select, minmax_normalize
from ..registry import register_method
from .base import MethodConfig
from .common import EmbeddingSubset, check_keep_ratio


@dataclass(frozen=True)
class CDPrunerConfig(MethodConfig):
    keep_ratio: float = 0.111
    negate_relevance: bool = False

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        if not isinstance(self.negate_relevance, bool):
            raise ValueError(f"negate_relevance must be a bool, got {self.negate_relevance!r}")


def question_embedding(embeds: torch.Tensor, valid: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """One sample: embeds (L, H), valid / vis (L,) bool -> (H,) mean of the text tokens after the last visual one."""
    text = valid & ~vis
    last_vis = int(vis.nonzero().max()) if bool(vis.any()) else -1
    after = text & (torch.arange(text.numel(), device=text.device) > last_vis)
    pick = after if bool(after.any()) else text
    return embeds[pick].float().mean(dim=0)


@register_method
class CDPrunerMethod(EmbeddingSubset):
    """Example: ``gp.apply(model, "cdpruner", keep_ratio=0.111)``."""

    name = "cdpruner"
    config_class = CDPrunerConfig

    def pick(self, state, b: int, vis: torch.Tensor, k: int) -> torch.Tensor:
        enc = state.enc
        q = question_embedding(enc.embeds[b], enc.attn_mask[b], enc.vis_mask[b])  # (H,)
        rel = torch.nn.functional.cosine_similarity(vis.float(), q[None], dim=-1)  # (n,)
        r = minmax_normalize(-rel if self.config.negate_relevance else rel)
        return conditional_dpp_select(vis, r, k)
