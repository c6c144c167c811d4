"""The data contracts of one request: what an adapter fills (``Encoded``), what the runtime carries through a prefill
(``PrefillState``) and what a method may read of a layer's cache (``layer_keys``). Below adapters, runtime and methods
alike, so none of them imports another for its types (methods -> contracts <- runtime, adapters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .adapters.base import Adapter


@dataclass
class Encoded:
    """One batch, embedded and ready for the LLM. Shapes: B samples, L positions, H hidden, P position rows.

    Grids contract: ``grids`` has one (h, w) entry per image and one per temporal frame-group of a video (a video
    of grid (t, h, w) -- t groups of ``temporal_patch_size`` frames -- gives t consecutive (h, w) entries), in the
    order their tokens appear (batch order, then sequence order within a sample); each entry's h * w tokens are
    consecutive among the sample's visual tokens, in raster order. ``image_owner`` is the sample of every entry
    (videos included), ``grid_video`` says which entries are video frame-groups: -1 for an image, else the index of
    the video (batch order); an empty ``grid_video`` means every entry is an image (families without video). Code
    that treats each entry as a picture (pooling, windows, per-entry masks) thus works per frame unchanged; code that
    must see a video as one input (the VIP's joint attention) groups entries with ``grid_groups``."""

    embeds: torch.Tensor  # (B, L, H)
    attn_mask: torch.Tensor  # (B, L) bool, left padded
    positions: torch.Tensor  # (P, B, L) long; P = 3 for M-RoPE (t, h, w), 1 for 1-D RoPE
    vis_mask: torch.Tensor  # (B, L) bool, True at visual tokens (image and video)
    grids: list[tuple[int, int]]  # (h, w) merged-token grid per image / per video frame-group, batch order
    image_owner: list[int]  # sample index of each grids entry
    next_pos: torch.Tensor  # (B,) first position id after the prompt
    vision_feats: list[torch.Tensor] = field(default_factory=list)  # per tap: (n_vis_total, C), raster order
    grid_video: list[int] = field(default_factory=list)  # per grids entry: -1 image, else its video's index
    # per LLM layer i < len(visual_adds): (n_vis_total, H), rows in vis_mask order (batch, then sequence), added by
    # the runtime to the visual tokens' hidden states right after layer i (Qwen3-VL DeepStack); rows of tokens
    # already pruned are dropped with the same keep masks. Empty for families without such additions.
    visual_adds: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_vis(self) -> list[int]:
        return self.vis_mask.sum(dim=1).tolist()

    @property
    def grid_groups(self) -> list[int]:
        return grid_groups(self.grid_video, len(self.grids))


def grid_groups(grid_video: list[int], n_grids: int) -> list[int]:
    """Per grids entry, the id of the visual input it belongs to (0, 1, ...): each image alone, all frame-groups of
    one video together. ``grid_video`` empty: every entry is an image.

    >>> grid_groups([-1, 0, 0, -1, 1, 1, 1], 7)
    [0, 1, 1, 2, 3, 3, 3]
    """
    if not grid_video:
        return list(range(n_grids))
    if len(grid_video) != n_grids:
        raise ValueError(f"grid_video has {len(grid_video)} entries for {n_grids} grids")
    out: list[int] = []
    for i, v in enumerate(grid_video):
        same = i > 0 and v >= 0 and v == grid_video[i - 1]  # the next frame-group of the same video
        out.append(out[-1] if same else (out[-1] + 1 if out else 0))
    return out


@dataclass
class PrefillState:
    """Everything a method may read during one prefill. ``scratch`` is the method's per-request workspace."""

    model: Any
    adapter: Adapter
    enc: Encoded
    cache: Any
    request: dict
    n_layers: int
    prune_layer: int | None  # the first (for most methods the only) compaction layer
    n_extra: int = 0
    extra_at: int = -1  # sequence index of the first extra token (the end of the prompt); -1 once dropped
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), (B, L, head_dim) of the current sequence
    key_mask: torch.Tensor | None = None  # (B, L) bool of the current sequence (with extra tokens)
    scratch: dict = field(default_factory=dict)
    prune_layers: tuple[int, ...] = ()  # every compaction layer, ascending
    stage: int = 0  # index into prune_layers of the next compaction
    vis_mask: torch.Tensor | None = None  # (B, L) bool, the visual tokens still in the current sequence
    keep_vis: list[torch.Tensor] = field(default_factory=list)  # per sample (n_vis_b,) bool, kept so far

    @property
    def device(self) -> torch.device:
        return self.enc.embeds.device

    @property
    def last_prompt_at(self) -> int:
        """Sequence index of the last prompt token (the one before any extra tokens) in the current sequence."""
        return (self.extra_at if self.n_extra else self.key_mask.shape[1]) - 1


def layer_keys(cache, layer_idx: int) -> torch.Tensor:
    """Keys of one layer, (B, kv_heads, L, head_dim), after RoPE."""
    return cache.layers[layer_idx].keys
