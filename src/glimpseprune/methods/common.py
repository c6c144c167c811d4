"""Shared pieces of the training-free methods: config checks, the attention one query pays to the current keys, and
a base class for "top-k of a query's attention" methods (fastv, pdrop, glimpse_attn). Model access goes through the
adapter (``query_logits``) and the runtime's ``PrefillState`` only."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch

from ..contracts import layer_keys
from ..ops.budget import keep_count, topk_keep
from .base import PruningMethod

if TYPE_CHECKING:
    from ..contracts import PrefillState


def check_keep_ratio(value: float) -> None:
    """A number in (0, 1]: Python, numpy or any other ``numbers.Real`` scalar (not a bool, not a tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {value!r}")


def check_layer(name: str, value: int | None, minimum: int = -1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")


def query_attention(state: PrefillState, layer_idx: int, hidden_in: torch.Tensor, q_at: int) -> torch.Tensor:
    """Softmax attention (B, heads, q_at + 1) of the token at sequence index ``q_at`` over its visible (causal,
    unpadded) keys at ``layer_idx``, recomputed from the layer input ``hidden_in`` (B, L, H) and the cached keys.
    Call it from ``after_layer``, when the layer's keys for the current sequence are in the cache."""
    rope = tuple(r[:, q_at:q_at + 1] for r in state.rope)
    keys = layer_keys(state.cache, layer_idx)[:, :, :q_at + 1]  # (B, kv_heads, q_at + 1, head_dim)
    logits = state.adapter.query_logits(state.model, layer_idx, hidden_in[:, q_at:q_at + 1], rope, keys)
    visible = state.key_mask[:, None, :q_at + 1]
    return logits.float().masked_fill(~visible, float("-inf")).softmax(dim=-1)


def visual_scores(state: PrefillState, scores: torch.Tensor) -> list[torch.Tensor]:
    """Per-position scores (B, n) over the first n positions of the current sequence -> per sample (n_vis_b,) over
    its ORIGINAL visual tokens; tokens dropped by an earlier stage get -inf."""
    out = []
    for b, alive in enumerate(state.keep_vis):
        full = torch.full(alive.shape, float("-inf"), device=scores.device)
        full[alive] = scores[b][state.vis_mask[b, :scores.shape[1]]].float()
        out.append(full)
    return out


class AttentionTopK(PruningMethod):
    """Keeps, at each compaction layer, the top ``stage_count`` visual tokens by the head-mean attention that the
    query at ``query_at`` pays them in that layer. Subclasses set the layers, the counts and (optionally) the query."""

    def query_at(self, state: PrefillState) -> int:
        return state.last_prompt_at

    def stage_count(self, n_vis: int, stage: int) -> int:
        raise NotImplementedError

    def after_layer(self, state: PrefillState, layer_idx: int, hidden_in: torch.Tensor) -> None:
        if state.stage >= len(state.prune_layers) or layer_idx != state.prune_layers[state.stage]:
            return
        attn = query_attention(state, layer_idx, hidden_in, self.query_at(state)).mean(dim=1)  # (B, q_at + 1)
        state.scratch.setdefault("attn_scores", []).append(visual_scores(state, attn))

    def select(self, state: PrefillState) -> list[torch.Tensor]:
        scores = state.scratch["attn_scores"][state.stage]
        return [topk_keep(s, self.stage_count(alive.numel(), state.stage), alive)
                for s, alive in zip(scores, state.keep_vis)]


def ratio_count(n_vis: int, keep_ratio: float) -> int:
    """The fixed budget of every ratio-based method: max(1, floor(keep_ratio * n_vis)), 0 without visual tokens."""
    return keep_count(n_vis, keep_ratio, min_keep=1)


class EmbeddingSubset(PruningMethod):
    """Before the LLM (K = -1): per sample, ``pick`` budget(n_vis) of its visual embeddings entering the LLM
    (n_vis, H), all its images together. Needs a config with ``keep_ratio``."""

    def prune_layer(self, n_layers: int) -> int:
        return -1

    def budget(self, n_vis: int) -> int:
        return ratio_count(n_vis, self.config.keep_ratio)

    def pick(self, state: PrefillState, b: int, vis: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (k,) into the sample's visual tokens."""
        raise NotImplementedError

    def select(self, state: PrefillState) -> list[torch.Tensor]:
        enc = state.enc
        out = []
        for b, n in enumerate(enc.n_vis):
            keep = torch.zeros(n, dtype=torch.bool, device=state.device)
            if n:
                keep[self.pick(state, b, enc.embeds[b, enc.vis_mask[b]], self.budget(n))] = True
            out.append(keep)
        return out
