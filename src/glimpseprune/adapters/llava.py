"""Adapter for transformers' LLaVA (``model_type == "llava"``, ``LlavaForConditionalGeneration``; LLaVA-1.5): CLIP
vision tower at ``model.model.vision_tower``, projector ``model.model.multi_modal_projector``, Llama decoder at
``model.model.language_model``. Every image becomes a fixed (image_size / patch)^2 grid of visual tokens (24 x 24 =
576 for CLIP-L/14-336); positions are 1-D (P = 1), counted over the valid tokens of each left-padded row, as
``generate`` does.

The image embeddings are those of the stock model: ``get_image_features`` with the config's
``vision_feature_layer`` (-2 for LLaVA-1.5) and ``vision_feature_select_strategy`` ("default": CLS dropped).

Vision taps index CLIP's ``hidden_states`` as the upstream GlimpsePrune LLaVA release does: tap t is
``hidden_states[t][:, 1:]`` (CLS dropped), where ``hidden_states[0]`` is the embedding output, so tap t is the
output of encoder block t - 1. With a 24-block CLIP-L the preset taps (23, 17, 11, 5) start with
``hidden_states[23] == hidden_states[-2]``, exactly the feature LLaVA-1.5 projects.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, Encoded, ModelDims


class LlavaAdapter(Adapter):
    model_types = ("llava",)

    def dims(self, model: nn.Module) -> ModelDims:
        t, v = model.config.text_config, model.config.vision_config
        return ModelDims("llava", t.hidden_size, t.num_hidden_layers, t.num_attention_heads, v.hidden_size,
                         v.num_hidden_layers, rms_norm_eps=getattr(t, "rms_norm_eps", None))

    def text_config(self, model: nn.Module):
        return model.config.text_config

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.language_model.layers

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
        return model.model.language_model.rotary_emb(hidden, positions[0])

    def decode_positions(self, next_pos: torch.Tensor) -> torch.Tensor:
        return next_pos.view(1, -1, 1)

    def box_masks(self, model: nn.Module, processor, inputs: dict, boxes: list, sizes: list) -> list:
        from .llava_processing import llava_box_to_grid, llava_image_mode

        grid = self.grid(model, inputs.get("pixel_values"))
        geometry = llava_image_mode(processor.image_processor)
        return [llava_box_to_grid(b, w, h, grid, **geometry) for b, (w, h) in zip(boxes, sizes, strict=True)]

    def token_view(self, model: nn.Module, processor, image):
        from PIL import Image

        from .llava_processing import llava_image_mode

        mode = llava_image_mode(processor.image_processor)["mode"]
        side = model.config.vision_config.image_size
        w, h = image.size
        if mode == "pad":  # centred on a square, as the processor pads
            square = Image.new("RGB", (max(w, h), max(w, h)), (127, 127, 127))
            square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            image = square
        elif mode == "crop":  # the central square
            s = min(w, h)
            image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return image.resize((side, side))

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.language_model.norm(hidden))

    @staticmethod
    def grid(model: nn.Module, pixel_values: torch.Tensor | None = None) -> tuple[int, int]:
        """(h, w) token grid of one image: the pixel size (or the config's image_size) over the patch size."""
        v = model.config.vision_config
        if pixel_values is None:
            return v.image_size // v.patch_size, v.image_size // v.patch_size
        return pixel_values.shape[-2] // v.patch_size, pixel_values.shape[-1] // v.patch_size

    def _images_per_sample(self, ids: torch.Tensor, image_token_id: int, n_images: int, per_image: int) -> list[int]:
        counts = (ids == image_token_id).sum(dim=1).tolist()
        for b, n in enumerate(counts):
            if n % per_image:
                raise ValueError(f"sample {b} holds {n} <image> tokens, not a multiple of the {per_image} tokens of "
                                 "one image; build the prompt with the model's processor")
        per_sample = [n // per_image for n in counts]
        if sum(per_sample) != n_images:
            raise ValueError(
                f"number of images ({n_images}) does not match the number of image placeholders in the prompts "
                f"({sum(per_sample)}); each image needs exactly one <image> placeholder ({per_image} tokens)"
            )
        return per_sample

    def encode(self, model: nn.Module, inputs: dict, taps: tuple[int, ...] = (), tap_fn=None) -> Encoded:
        cfg = model.config
        ids = inputs["input_ids"]
        attn_mask = inputs.get("attention_mask")
        attn_mask = torch.ones_like(ids, dtype=torch.bool) if attn_mask is None else attn_mask.bool()
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not "
                             "supported: the CLS token would be a visual token outside the image grid; use 'default'")
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (n_images, 3, H, W), got shape {tuple(pixel_values.shape)}; "
                             "multi-crop (anyres) inputs are not supported")
        gh, gw = self.grid(model, pixel_values)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        per_sample = self._images_per_sample(ids, cfg.image_token_id, n_images, gh * gw)

        embeds = model.get_input_embeddings()(ids)
        vis_mask = ids == cfg.image_token_id
        feats: list[torch.Tensor] = []
        if pixel_values is not None:
            out = model.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                image_sizes=inputs.get("image_sizes"), return_dict=True, **({"output_hidden_states": True} if taps
                                                                          else {}))
            image_embeds = torch.cat(list(out.pooler_output), dim=0).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(vis_mask[..., None], image_embeds)
            for i, t in enumerate(taps):
                if not 0 <= t < len(out.hidden_states):
                    raise ValueError(f"vision tap {t} outside CLIP's hidden states [0, {len(out.hidden_states) - 1}]")
                h = out.hidden_states[t][:, 1:]  # (n_images, gh * gw, C), CLS dropped, raster order
                h = h.reshape(-1, h.shape[-1])
                feats.append(h if tap_fn is None else tap_fn(i, h))
        pos = (attn_mask.long().cumsum(dim=1) - 1).masked_fill(~attn_mask, 0)  # (B, L), as generate counts
        owner = [b for b, n in enumerate(per_sample) for _ in range(n)]
        next_pos = attn_mask.sum(dim=1)
        return Encoded(embeds, attn_mask, pos[None], vis_mask, [(gh, gw)] * n_images, owner, next_pos, feats)
