"""Adapter for transformers' Qwen3-VL: dense ``model_type == "qwen3_vl"`` and MoE ``"qwen3_vl_moe"`` (the same
module layout; only the decoder MLP differs, which the runtime never looks inside). Images only; video is refused.

What differs from Qwen2.5-VL (whose adapter this one extends for the shared pieces: decoder access, rotary, LM head,
decode positions, box masks):

* ViT at ``model.model.visual``: 16 px patches, learned + 2D-rotary positions, **no window attention**, so the ViT
  rows are already in raster order of the merged tokens (each 2x2 merge group is 4 contiguous rows).
* **Vision taps** (the VIP's conditions): tap t is the output of ViT block t, mean-pooled over its 2x2 merge group,
  exactly as the Qwen2.5-VL adapter does; width = the ViT width. The presets pick 4 evenly spaced blocks counted back
  from the last (``config.default_vision_taps``: 26/20/14/8 for the 27-block ViT of Qwen3-VL-8B, 23/17/11/5 for the
  24-block ViT of 2B/4B), the analogue of the released 31/23/15/7 on Qwen2.5-VL's 32 blocks (Qwen3-VL has no
  full-attention blocks to single out: every block attends over the whole image).
* **M-RoPE** is interleaved (t/h/w frequencies alternate) and positions come from the model's own
  ``get_rope_index``; the runtime gathers kept tokens' position ids, so they keep their original coordinates, and
  decoding continues at the original next position (max over the prompt + 1).
* **q_norm / k_norm** (Qwen3 attention): the glimpse query is RMS-normed per head before RoPE
  (``query_heads``); cached keys are already normed.
* **DeepStack**: the ViT's ``deepstack_merger_list`` turns blocks ``deepstack_visual_indexes`` into per-visual-token
  features of the LLM width that the stock text model adds to the visual tokens' hidden states after LLM layers
  0, 1, 2. They go into ``Encoded.visual_adds``; the runtime adds them after each of those layers to the visual
  tokens still in the sequence, so a token pruned before (or inside) those layers loses its DeepStack features too.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Encoded, ModelDims, capture_outputs
from .qwen2_5_vl import Qwen2_5_VLAdapter, image_runs


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def dims(self, model: nn.Module) -> ModelDims:
        t, v = model.config.text_config, model.config.vision_config
        return ModelDims(model.config.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                         v.hidden_size, v.depth, rms_norm_eps=getattr(t, "rms_norm_eps", None))

    def query_heads(self, attn: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        q = attn.q_proj(x).view(x.shape[0], x.shape[1], -1, head_dim)  # (B, 1, h, hd)
        return attn.q_norm(q).transpose(1, 2)  # Qwen3: RMSNorm over each head, before RoPE

    def encode(self, model: nn.Module, inputs: dict, taps: tuple[int, ...] = (), tap_fn=None) -> Encoded:
        cfg = model.config
        ids = inputs["input_ids"]
        attn_mask = inputs.get("attention_mask")
        attn_mask = torch.ones_like(ids, dtype=torch.bool) if attn_mask is None else attn_mask.bool()
        if inputs.get("pixel_values_videos") is not None or bool((ids == cfg.video_token_id).any()):
            raise ValueError("video input is not supported for Qwen3-VL yet; pass images only")
        grid = inputs.get("image_grid_thw")
        pixel_values = inputs.get("pixel_values")
        if (pixel_values is None) != (grid is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        merge = cfg.vision_config.spatial_merge_size
        self._check_images(ids, grid, merge, cfg.image_token_id)

        embeds = model.get_input_embeddings()(ids)
        vis_mask = ids == cfg.image_token_id
        feats: list[torch.Tensor] = []
        adds: list[torch.Tensor] = []
        if pixel_values is not None:
            visual = model.model.visual
            for t in taps:
                if not 0 <= t < len(visual.blocks):
                    raise ValueError(f"vision tap {t} outside the ViT's blocks [0, {len(visual.blocks) - 1}]")
            pos = {t: i for i, t in enumerate(taps)}

            def pool(t, h):  # (n_patch, C) -> (n_patch / merge^2, C): merge groups are contiguous, raster order
                pooled = h.view(h.shape[0] // (merge * merge), merge * merge, -1).mean(dim=1)
                return pooled if tap_fn is None else tap_fn(pos[t], pooled)

            with capture_outputs({t: visual.blocks[t] for t in taps}, pool) as tapped:  # only pooled taps are kept
                out = visual(pixel_values.to(visual.dtype), grid_thw=grid, return_dict=True)
            embeds = embeds.masked_scatter(vis_mask[..., None], out.pooler_output.to(embeds.dtype))
            feats.extend(tapped[t] for t in taps)
            adds = [d.to(embeds.dtype) for d in out.deepstack_features]  # per LLM layer 0, 1, ..: (n_vis_total, H)
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = vis_mask.int()
        positions, _ = model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=attn_mask.long())
        grids = [] if grid is None else [(int(h) // merge, int(w) // merge) for _, h, w in grid.tolist()]
        owner = [b for b, r in enumerate(image_runs(ids, cfg.image_token_id)) for _ in r]
        next_pos = positions.masked_fill(~attn_mask[None], -1).amax(dim=(0, 2)) + 1
        return Encoded(embeds, attn_mask, positions, vis_mask, grids, owner, next_pos, feats, visual_adds=adds)
