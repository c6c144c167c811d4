"""Adapter for transformers' Qwen3-VL: dense ``model_type == "qwen3_vl"`` and MoE ``"qwen3_vl_moe"`` (the same
module layout; only the decoder MLP differs, which the runtime never looks inside). Images and videos.

What differs from Qwen2.5-VL (whose adapter this one extends for the shared pieces: ``encode`` -- one ViT run per
modality, taps and DeepStack rows merged into visual-token order, positions from the model's ``get_rope_index`` --,
decoder access, rotary, LM head, decode positions, box masks):

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
  For a batch with images and videos, each modality's rows (the ViT runs once per modality, as in the stock forward)
  are merged into the order of the visual tokens, as the stock forward merges them.
* **Video**: the prompt holds one ``<|video_pad|>`` run per frame-group, each after its timestamp text
  (:mod:`.qwen3_vl_processing`); ``get_rope_index`` places each group as a one-frame image after that
  text (time lives in the text, not in the t coordinate). ``Encoded.grids`` lists the t groups of a video of grid
  (t, h, w) as t (h, w) entries, as for Qwen2.5-VL.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelDims
from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """``encode`` is Qwen2.5-VL's: ViT once per modality, its DeepStack rows (``_vision``) merged into visual-token
    order like the taps, positions from the model's own ``get_rope_index``; what differs is below."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    split_video = True  # one <|video_pad|> run per frame-group, its timestamp text in between

    def dims(self, model: nn.Module) -> ModelDims:
        t, v = model.config.text_config, model.config.vision_config
        return ModelDims(model.config.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
                         v.hidden_size, v.depth, rms_norm_eps=getattr(t, "rms_norm_eps", None))

    def query_heads(self, attn: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        q = attn.q_proj(x).view(x.shape[0], x.shape[1], -1, head_dim)  # (B, 1, h, hd)
        return attn.q_norm(q).transpose(1, 2)  # Qwen3: RMSNorm over each head, before RoPE

    def _check_images(self, ids: torch.Tensor, grid: torch.Tensor | None, merge: int, token_id: int,
                      kind: str = "image") -> None:
        """Images as in Qwen2.5-VL; a video of grid (t, h, w) is t runs (one per frame-group) of h * w / merge^2."""
        if kind == "video":
            kind = "video frame-group"
            if grid is not None:
                grid = torch.repeat_interleave(grid, grid[:, 0], dim=0)
                grid[:, 0] = 1
        super()._check_images(ids, grid, merge, token_id, kind)

    def _unwindow(self, model: nn.Module, grid: torch.Tensor, device) -> None:
        return None  # no windows: the ViT rows are in raster order of the merged tokens
