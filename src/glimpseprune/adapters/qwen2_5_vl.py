"""Adapter for transformers' Qwen2.5-VL (``model_type == "qwen2_5_vl"``): ViT at ``model.model.visual`` (2x2 merge,
window attention), decoder at ``model.model.language_model``, M-RoPE positions (t, h, w) from ``get_rope_index``.

Images and videos: the ViT runs once per modality (as transformers does); a video of grid (t, h, w) -- t groups of
``temporal_patch_size`` frames -- is t * h * w / merge^2 tokens, its positions spaced in time by ``second_per_grid_ts``
(``tokens_per_second`` * seconds per group), and appears in ``Encoded.grids`` as t (h, w) frame-groups (see
``Encoded``). ``encode`` also serves Qwen3-VL (``adapters/qwen3_vl.py``) through ``_vision`` (DeepStack rows),
``_unwindow``, ``_check_images`` and ``split_video``."""

from __future__ import annotations

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from .base import Adapter, Encoded, ModelDims, capture_outputs


def image_runs(ids: torch.Tensor, token_id: int) -> list[list[int]]:
    """Per sample, the lengths of the contiguous runs of ``token_id`` (one run per image placeholder)."""
    runs = []
    for row in (ids == token_id).tolist():
        lengths, n = [], 0
        for flag in row + [False]:
            if flag:
                n += 1
            elif n:
                lengths.append(n)
                n = 0
        runs.append(lengths)
    return runs


# (name, config attribute of its placeholder id, pixel key, grid key); images are embedded first, like transformers
_MODALITIES = (("image", "image_token_id", "pixel_values", "image_grid_thw"),
               ("video", "video_token_id", "pixel_values_videos", "video_grid_thw"))


def _interleave(tapped: dict, masks: dict, vis_mask: torch.Tensor, n_taps: int) -> list[torch.Tensor]:
    """Per tap, the image and video features (each in its own token order) merged into the order of the visual
    tokens of the whole batch (row-major over (B, L)): (n_vis_total, C) each."""
    if not tapped:
        return []
    if len(tapped) == 1:
        return next(iter(tapped.values()))
    is_video = masks["video"][vis_mask]  # (n_vis_total,) bool
    out = []
    for i in range(n_taps):
        image, video = tapped["image"][i], tapped["video"][i]
        merged = image.new_empty(is_video.numel(), image.shape[-1])
        merged[~is_video], merged[is_video] = image, video
        out.append(merged)
    return out


def _layout(ids: torch.Tensor, cfg, grids_thw: dict, merge: int, split_video: bool = False
            ) -> tuple[list, list[int], list[int]]:
    """(grids, image_owner, grid_video) of ``Encoded``: one (h, w) per image and per video frame-group, in the order
    their tokens appear (sample by sample). A video's tokens are one placeholder run, or with ``split_video`` one run
    per frame-group (Qwen3-VL, whose timestamps stand between them)."""
    thw = {k: iter([] if g is None else g.tolist()) for k, g in grids_thw.items()}
    kind_of = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
    grids, owner, grid_video, n_videos, later_groups = [], [], [], 0, 0
    for b, row in enumerate(ids.tolist()):
        starts = [i for i, tok in enumerate(row) if tok in kind_of and (i == 0 or row[i - 1] != tok)]
        for i in starts:
            video = kind_of[row[i]] == "video"
            if video and later_groups:  # split_video: a later frame-group of the video listed at its first run
                later_groups -= 1
                continue
            t, h, w = next(thw[kind_of[row[i]]])
            for _ in range(t if video else 1):
                grids.append((int(h) // merge, int(w) // merge))
                owner.append(b)
                grid_video.append(n_videos if video else -1)
            if video and split_video:
                later_groups = t - 1
            n_videos += video
    return grids, owner, grid_video


class Qwen2_5_VLAdapter(Adapter):
    model_types = ("qwen2_5_vl",)
    split_video = False  # True: one placeholder run per video frame-group (Qwen3-VL), see ``_layout``

    def dims(self, model: nn.Module) -> ModelDims:
        t, v = model.config.text_config, model.config.vision_config
        return ModelDims("qwen2_5_vl", t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                         v.hidden_size, v.depth, rms_norm_eps=getattr(t, "rms_norm_eps", None))

    def text_config(self, model: nn.Module):
        return model.config.text_config

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.language_model.layers

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
        return model.model.language_model.rotary_emb(hidden, positions)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.language_model.norm(hidden))

    def _check_images(self, ids: torch.Tensor, grid: torch.Tensor | None, merge: int, token_id: int,
                      kind: str = "image") -> None:
        """One ``token_id`` run per ``kind`` (image or video) of ``grid``, each as long as its grid's merged tokens."""
        runs = image_runs(ids, token_id)
        n_runs = sum(len(r) for r in runs)
        n_items = 0 if grid is None else grid.shape[0]
        token = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        if n_runs != n_items:
            raise ValueError(
                f"number of {kind}s ({n_items}) does not match the number of {kind} placeholders in the prompts "
                f"({n_runs}); each {kind} needs exactly one {token} run"
            )
        if grid is None:
            return
        expected = (grid.prod(-1) // (merge * merge)).tolist()
        got = [n for r in runs for n in r]
        for i, (e, g) in enumerate(zip(expected, got)):
            if e != g:
                raise ValueError(f"{kind} {i}: its grid gives {e} visual tokens but the prompt holds {g} placeholders")

    def _unwindow(self, model: nn.Module, grid: torch.Tensor, device) -> torch.Tensor | None:
        """Permutation from the ViT's row order (window order) to raster order of the merged tokens; None where the
        rows are in raster order already (a ViT without windows)."""
        visual, merge = model.model.visual, model.config.vision_config.spatial_merge_size
        win, _ = get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
        return torch.argsort(win.to(device))

    def _vision(self, model: nn.Module, pixels: torch.Tensor, grid: torch.Tensor, taps, tap_fn):
        """ViT over one modality's pixels: (merged embeddings (n, H), per tap the merge-pooled block output (n, C'),
        raster order, per DeepStack layer its rows (n, H): Qwen3-VL; none here)."""
        visual, merge = model.model.visual, model.config.vision_config.spatial_merge_size
        pos = {t: i for i, t in enumerate(taps)}

        def pool(t, h):  # (n_patch, C), ViT row order -> (n_patch / merge^2, C'): merge groups are contiguous
            pooled = h.view(h.shape[0] // (merge * merge), merge * merge, -1).mean(dim=1)
            return pooled if tap_fn is None else tap_fn(pos[t], pooled)  # row-wise: commutes with unwindowing

        # the pixels go in as given: the patch embedding casts them to its weight's dtype for its one product and
        # frees the copy; a copy made here would stay alive through every ViT block (in bf16, scaled CPU shape: 18 MiB
        # of a 2,025-token image's 92 MiB ViT peak)
        with capture_outputs({t: visual.blocks[t] for t in taps}, pool) as tapped:  # only pooled taps are kept
            out = visual(pixels, grid_thw=grid, return_dict=True)
        feats = [tapped[t] for t in taps]  # output of block t, merge-pooled
        if taps and (unwin := self._unwindow(model, grid, pixels.device)) is not None:
            feats = [f[unwin] for f in feats]  # raster order
        return out.pooler_output, feats, list(getattr(out, "deepstack_features", None) or [])

    def encode(self, model: nn.Module, inputs: dict, taps: tuple[int, ...] = (), tap_fn=None) -> Encoded:
        cfg = model.config
        ids = inputs["input_ids"]
        attn_mask = inputs.get("attention_mask")
        attn_mask = torch.ones_like(ids, dtype=torch.bool) if attn_mask is None else attn_mask.bool()
        merge = cfg.vision_config.spatial_merge_size
        for t in taps:
            if not 0 <= t < len(model.model.visual.blocks):
                raise ValueError(f"vision tap {t} outside the ViT's blocks [0, {len(model.model.visual.blocks) - 1}]")
        embeds = model.get_input_embeddings()(ids)
        masks, grids_thw, tapped, adds = {}, {}, {}, {}
        for kind, token_id, px_key, grid_key in _MODALITIES:
            grid, pixels = inputs.get(grid_key), inputs.get(px_key)
            if (pixels is None) != (grid is None):
                raise ValueError(f"{px_key} and {grid_key} must be given together")
            self._check_images(ids, grid, merge, getattr(cfg, token_id), kind)
            masks[kind], grids_thw[kind] = ids == getattr(cfg, token_id), grid
            if pixels is not None:
                out, tapped[kind], adds[kind] = self._vision(model, pixels, grid, taps, tap_fn)
                embeds = embeds.masked_scatter(masks[kind][..., None], out.to(embeds.dtype))
        vis_mask = masks["image"] | masks["video"]
        feats = _interleave(tapped, masks, vis_mask, len(taps))
        n_adds = max((len(a) for a in adds.values()), default=0)
        visual_adds = [d.to(embeds.dtype) for d in _interleave(adds, masks, vis_mask, n_adds)]  # per LLM layer
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = masks["image"].int() + 2 * masks["video"].int()
        positions, _ = model.model.get_rope_index(  # Qwen3-VL's takes no second_per_grid_ts (time is in the text)
            ids, mm, image_grid_thw=grids_thw["image"], video_grid_thw=grids_thw["video"],
            second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=attn_mask.long())
        grids, owner, grid_video = _layout(ids, cfg, grids_thw, merge, self.split_video)
        next_pos = positions.masked_fill(~attn_mask[None], -1).amax(dim=(0, 2)) + 1
        return Encoded(embeds, attn_mask, positions, vis_mask, grids, owner, next_pos, feats, grid_video,
                       visual_adds=visual_adds)

    def box_masks(self, model: nn.Module, processor, inputs: dict, boxes: list, sizes: list) -> list:
        from ..data.records import boxes_to_token_mask

        merge = model.config.vision_config.spatial_merge_size
        grids = inputs["image_grid_thw"].tolist()
        return [boxes_to_token_mask(b, w, h, gh // merge, gw // merge)
                for b, (w, h), (_, gh, gw) in zip(boxes, sizes, grids, strict=True)]

    def token_view(self, model: nn.Module, processor, image):
        px = processor.image_processor([image], return_tensors="pt")
        _, gh, gw = px["image_grid_thw"][0].tolist()
        patch = model.config.vision_config.patch_size
        return image.resize((gw * patch, gh * patch))

    def decode_positions(self, next_pos: torch.Tensor) -> torch.Tensor:
        return next_pos.view(1, -1, 1).expand(3, -1, 1)
