"""``glimpse``: GlimpsePrune (arXiv 2508.01548).

A glimpse token is appended after the prompt; a learned vector is added to its hidden state before every glimpse
layer. At the attention layer(s) its query's per-head logits over the image keys, plus vision-encoder features, feed
the VIP, which scores every visual token; ``select_tokens`` turns scores into keep masks. The glimpse token is removed
with the dropped tokens after layer K, so it never influences the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import SelectionConfig
from ..contracts import layer_keys
from ..modules.glimpse import GlimpseModule
from ..ops.select import select_with
from ..registry import register_method
from .base import MethodConfig, PruningMethod


@dataclass(frozen=True)
class GlimpseMethodConfig(MethodConfig):
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # how the VIP reads a video: "joint" (every frame's tokens attend to every frame's, each frame with its 2D RoPE)
    # or "per_frame" (each frame-group scored alone, as separate images); the budget is over the clip either way
    video: str = "joint"

    def __post_init__(self):
        if self.video not in ("joint", "per_frame"):
            raise ValueError(f"video must be 'joint' or 'per_frame', got {self.video!r}")


def module_method_config(config_class, config, selection: SelectionConfig | None):
    """The config of a module method (``glimpse``, ``early_glimpse``): ``config`` as given, else one holding
    ``selection`` (default selection when None); both at once is refused (the selection would be ignored)."""
    if config is not None and selection is not None:
        raise TypeError("pass either a config (with its selection) or selection=, not both: the selection "
                        "was ignored")
    return config if config is not None else config_class(selection or SelectionConfig())


@register_method
class GlimpseMethod(PruningMethod):
    """Needs a trained ``GlimpseModule`` (``glimpseprune.load_module``). Example::

        method = GlimpseMethod(module=load_module("ckpt/"), selection=SelectionConfig(max_keep_ratio=0.111))
    """

    name = "glimpse"
    config_class = GlimpseMethodConfig

    def __init__(self, config: GlimpseMethodConfig | None = None, module: GlimpseModule | None = None,
                 selection: SelectionConfig | None = None):
        if module is None:
            raise ValueError("method 'glimpse' needs a trained module: pass module=load_module(DIR)")
        kind = getattr(getattr(module, "cfg", None), "kind", "glimpse")
        if kind != "glimpse":
            raise ValueError(f"method 'glimpse' needs a glimpse module, got one of kind {kind!r}: use method "
                             f"'early_glimpse' for an early module")
        super().__init__(module_method_config(GlimpseMethodConfig, config, selection))
        self.module = module
        self._tap_fn = self._project_tap  # one bound method: the same object on every vision_tap_fn() call

    def prune_layer(self, n_layers: int) -> int | None:
        return self.module.cfg.prune_layer

    def vision_taps(self) -> tuple[int, ...]:
        return self.module.cfg.vision_taps

    def vision_tap_fn(self):
        return self._tap_fn

    def _project_tap(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """Tap i (n, vision_width) -> the VIP's condition (n, cond_width), computed inside the vision tower."""
        return self.module.vip.project_condition(i, feats)

    def extra_tokens(self, state) -> torch.Tensor:
        B, _, H = state.enc.embeds.shape
        # once per prefill, the layers up to K (where the glimpse lives at inference) in one projection
        vectors = self.module.glimpse_vectors(upto=state.prune_layer)
        state.scratch["glimpse_vectors"] = vectors
        return vectors[0].view(1, 1, H).expand(B, 1, H)

    def before_layer(self, state, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer_idx == 0:
            return hidden
        vectors = state.scratch.get("glimpse_vectors") or {}
        # training runs the glimpse past K too (those vectors train): one layer at a time, as they are needed
        g = vectors[layer_idx] if layer_idx in vectors else self.module.glimpse_vector(layer_idx)
        if g is None:
            return hidden
        i = state.extra_at
        if not torch.is_grad_enabled():  # inference: the layer output is ours alone, add in place (no copy of L x H)
            hidden[:, i].add_(g.to(hidden.dtype))  # one kernel; ``hidden[:, i] += g`` also copies the row onto itself
            return hidden
        return torch.cat([hidden[:, :i], hidden[:, i:i + 1] + g.to(hidden.dtype), hidden[:, i + 1:]], dim=1)

    def after_layer(self, state, layer_idx: int, hidden_in: torch.Tensor) -> None:
        if layer_idx not in self.module.cfg.attn_layers:
            return
        i = state.extra_at
        rope = tuple(r[:, i:i + 1] for r in state.rope)
        keys = layer_keys(state.cache, layer_idx)[:, :, :i + 1]  # the glimpse's causal past (training appends more)
        scores = state.adapter.query_logits(state.model, layer_idx, hidden_in[:, i:i + 1], rope, keys)  # (B, h, i+1)
        if self.module.cfg.attn_score == "log_softmax":
            visible = state.key_mask[:, None, :i + 1]
            scores = scores.float().masked_fill(~visible, float("-inf")).log_softmax(dim=-1)
        L0 = state.enc.vis_mask.shape[1]
        per_sample = [scores[b, :, :L0][:, state.enc.vis_mask[b]].T for b in range(scores.shape[0])]  # (n_b, h)
        state.scratch.setdefault("glimpse_attn", {})[layer_idx] = torch.cat(per_sample, dim=0)

    def predict_logits(self, state) -> list[torch.Tensor]:
        """VIP logits per sample, (n_vis_b,) each. The attention features are stacked in the order of
        ``cfg.attn_layers`` (as upstream's ``selected_layers``), not in the order the layers ran."""
        feats = state.scratch.pop("glimpse_attn")
        attn = torch.cat([feats[i] for i in self.module.cfg.attn_layers], dim=-1)  # (n_vis_total, n_layers * h)
        groups = state.enc.grid_groups if self.config.video == "joint" else None  # None: each grid alone
        logits = self.module(attn, state.enc.vision_feats, state.enc.grids, projected=True, groups=groups)
        return list(logits.split(state.enc.n_vis))

    def select(self, state) -> list[torch.Tensor]:
        state.scratch.pop("glimpse_vectors", None)  # the glimpse leaves the sequence here
        logits = self.predict_logits(state)
        state.scratch["vip_logits"] = logits
        return [select_with(self.config.selection, torch.sigmoid(lg), rank=lg) for lg in logits]
