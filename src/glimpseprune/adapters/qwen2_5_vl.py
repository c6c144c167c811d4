"""Adapter for transformers' Qwen2.5-VL (``model_type == "qwen2_5_vl"``): ViT at ``model.model.visual`` (2x2 merge,
window attention), decoder at ``model.model.language_model``, M-RoPE positions (t, h, w) from ``get_rope_index``."""

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


class Qwen2_5_VLAdapter(Adapter):
    model_types = ("qwen2_5_vl",)

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

    def _check_images(self, ids: torch.Tensor, grid: torch.Tensor | None, merge: int, token_id: int) -> None:
        runs = image_runs(ids, token_id)
        n_runs = sum(len(r) for r in runs)
        n_imgs = 0 if grid is None else grid.shape[0]
        if n_runs != n_imgs:
            raise ValueError(
                f"number of images ({n_imgs}) does not match the number of image placeholders in the prompts "
                f"({n_runs}); each image needs exactly one <|image_pad|> run"
            )
        if grid is None:
            return
        expected = (grid.prod(-1) // (merge * merge)).tolist()
        got = [n for r in runs for n in r]
        for i, (e, g) in enumerate(zip(expected, got)):
            if e != g:
                raise ValueError(f"image {i}: its grid gives {e} visual tokens but the prompt holds {g} placeholders")

    def encode(self, model: nn.Module, inputs: dict, taps: tuple[int, ...] = (), tap_fn=None) -> Encoded:
        cfg = model.config
        ids = inputs["input_ids"]
        B, L = ids.shape
        attn_mask = inputs.get("attention_mask")
        attn_mask = torch.ones_like(ids, dtype=torch.bool) if attn_mask is None else attn_mask.bool()
        if inputs.get("pixel_values_videos") is not None or bool((ids == cfg.video_token_id).any()):
            raise ValueError("video input is not supported yet; pass images only")
        grid = inputs.get("image_grid_thw")
        pixel_values = inputs.get("pixel_values")
        if (pixel_values is None) != (grid is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        merge = cfg.vision_config.spatial_merge_size
        self._check_images(ids, grid, merge, cfg.image_token_id)

        embeds = model.get_input_embeddings()(ids)
        vis_mask = ids == cfg.image_token_id
        feats: list[torch.Tensor] = []
        if pixel_values is not None:
            visual = model.model.visual
            for t in taps:
                if not 0 <= t < len(visual.blocks):
                    raise ValueError(f"vision tap {t} outside the ViT's blocks [0, {len(visual.blocks) - 1}]")
            pos = {t: i for i, t in enumerate(taps)}

            def pool(t, h):  # (n_patch, C), window order -> (n_patch / merge^2, C'): merge groups are contiguous
                pooled = h.view(h.shape[0] // (merge * merge), merge * merge, -1).mean(dim=1)
                return pooled if tap_fn is None else tap_fn(pos[t], pooled)  # row-wise: commutes with unwindowing

            with capture_outputs({t: visual.blocks[t] for t in taps}, pool) as tapped:  # only pooled taps are kept
                out = visual(pixel_values.to(visual.dtype), grid_thw=grid, return_dict=True)
            embeds = embeds.masked_scatter(vis_mask[..., None], out.pooler_output.to(embeds.dtype))
            if taps:
                win, _ = get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
                unwin = torch.argsort(win.to(ids.device))
                feats.extend(tapped[t][unwin] for t in taps)  # output of block t, merge-pooled, raster order
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = vis_mask.int()
        positions, _ = model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=attn_mask.long())
        grids = [] if grid is None else [(int(h) // merge, int(w) // merge) for _, h, w in grid.tolist()]
        owner = [b for b, r in enumerate(image_runs(ids, cfg.image_token_id)) for _ in r]
        next_pos = positions.masked_fill(~attn_mask[None], -1).amax(dim=(0, 2)) + 1
        return Encoded(embeds, attn_mask, positions, vis_mask, grids, owner, next_pos, feats)

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
