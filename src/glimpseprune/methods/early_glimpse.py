"""``early_glimpse``: decide before the LLM which visual tokens to keep, so no LLM layer runs for the decision.

Where the dropped tokens leave is the module's ``prune_layer`` (or the method's ``drop_layer``): -1, before the LLM
(a server can size each request's KV cache for it), or after LLM layer K >= 0, so that layers 0..K still read the
whole image (on the embedded world model, dropping after layer 0 instead of before it is the difference between a
broken and a better-than-full answer: ``results/early_glimpse/README.md``).

An ``EarlyGlimpseModule`` (``kind: early``) scores every visual token from the vision-encoder taps, the visual
tokens' input embeddings and the question's token embeddings (the LLM's embedding table on the prompt's text
tokens); ``select_tokens`` turns the scores into keep masks exactly as ``glimpse`` does (threshold, max_keep_ratio
cap, min_keep; or fixed_keep_ratio for a fixed count, which a server can size its KV cache for before the model runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SelectionConfig
from ..modules.early import EarlyGlimpseModule
from ..ops.budget import keep_count
from ..ops.diversity import farthest_point_fill
from ..ops.select import select_tokens, select_with
from ..registry import register_method
from .base import PruningMethod
from .glimpse import GlimpseMethodConfig, module_method_config

FILLS = ("score", "diverse")


@dataclass(frozen=True)
class EarlyGlimpseConfig(GlimpseMethodConfig):
    """``selection`` and ``video`` as in ``GlimpseMethodConfig``. ``fill`` (with ``fixed_keep_ratio``): "score" keeps
    the top-scored tokens; "diverse" keeps the tokens above the threshold (the top-scored ones if they exceed the
    budget), then fills the budget with a max-min diverse set of the rest (farthest-point picks over the visual
    embeddings entering the LLM, as DivPrune): the module's picks plus coverage of the rest of the image."""

    fill: str = "score"
    # the LLM layer after which the dropped tokens leave (-1: before the LLM); None: the module's prune_layer
    drop_layer: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.drop_layer is not None:
            check_drop_layer(self.drop_layer)
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.fill == "diverse" and self.selection.fixed_keep_ratio is None:
            raise ValueError("fill 'diverse' fills a fixed budget: set fixed_keep_ratio (--fixed-keep-ratio R)")


def check_drop_layer(value) -> None:
    """``drop_layer`` is -1 (before the LLM) or an LLM layer index >= 0 (the depth is checked where it is known)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"drop_layer must be -1 (before the LLM) or an LLM layer index >= 0, got {value!r}")


def early_inputs(enc) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """From an ``Encoded``: the visual tokens' input embeddings (n_vis_total, H), batch then sequence order, and per
    sample its prompt's text-token embeddings (T_b, H) (valid, non-visual positions)."""
    vis = enc.embeds[enc.vis_mask]
    text = [enc.embeds[b][enc.attn_mask[b].bool() & ~enc.vis_mask[b]] for b in range(enc.embeds.shape[0])]
    return vis, text


@register_method
class EarlyGlimpseMethod(PruningMethod):
    """Needs a trained early module (``load_module(DIR)`` of a ``kind: early`` folder). Example::

        method = EarlyGlimpseMethod(module=load_module("runs/stage1-world-early/module"),
                                    selection=SelectionConfig(fixed_keep_ratio=0.111))
    """

    name = "early_glimpse"
    config_class = EarlyGlimpseConfig
    prunes_before_llm = True

    def __init__(self, config: EarlyGlimpseConfig | None = None, module: EarlyGlimpseModule | None = None,
                 selection: SelectionConfig | None = None):
        if module is None:
            raise ValueError("method 'early_glimpse' needs a trained early module: pass module=load_module(DIR)")
        kind = getattr(getattr(module, "cfg", None), "kind", None)
        if not isinstance(module, EarlyGlimpseModule) or kind != "early":
            raise ValueError(f"method 'early_glimpse' needs an early module (kind 'early'), got a "
                             f"{type(module).__name__} of kind {kind!r}; use method 'glimpse' for it, or train an "
                             "early module (stage 1 with module: {kind: early})")
        super().__init__(module_method_config(EarlyGlimpseConfig, config, selection))
        self.module = module
        self._tap_fn = module.project_condition  # one object on every vision_tap_fn() call (encodings cache by it)

    def prune_layer(self, n_layers: int) -> int | None:
        k = self.config.drop_layer
        return self.module.cfg.prune_layer if k is None else k

    def vision_taps(self) -> tuple[int, ...]:
        return self.module.cfg.vision_taps

    def vision_tap_fn(self):
        return self._tap_fn

    def predict_logits(self, state) -> list[torch.Tensor]:
        """Early-module logits per sample, (n_vis_b,) each, from ``state.enc`` alone (no LLM layer)."""
        return self.logits_for(state.enc)

    def logits_for(self, enc) -> list[torch.Tensor]:
        """Per sample (n_vis_b,) logits from an ``Encoded`` made with this method's vision taps and tap function."""
        vis, text = early_inputs(enc)
        groups = enc.grid_groups if self.config.video == "joint" else None
        logits = self.module(vis, text, enc.n_vis, enc.vision_feats, enc.grids, projected=True, groups=groups)
        return list(logits.split(enc.n_vis))

    def select(self, state) -> list[torch.Tensor]:
        logits = self.predict_logits(state)
        state.scratch["vip_logits"] = logits
        sel = self.config.selection
        if self.config.fill == "score" or sel.fixed_keep_ratio is None:
            return [select_with(sel, torch.sigmoid(lg), rank=lg) for lg in logits]
        enc, out = state.enc, []
        for b, lg in enumerate(logits):
            probs, n = torch.sigmoid(lg), lg.numel()
            k = keep_count(n, sel.fixed_keep_ratio, sel.min_keep)
            seed = probs > sel.threshold
            if int(seed.sum()) > k:
                seed = select_tokens(probs, fixed_keep_ratio=sel.fixed_keep_ratio, min_keep=sel.min_keep, rank=lg)
            out.append(farthest_point_fill(enc.embeds[b][enc.vis_mask[b]], seed, k) if n else seed)
        return out
