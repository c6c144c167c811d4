"""Qwen2.5-VL for vLLM with its visual tokens pruned before the LLM (imported by vLLM through ``vllm_plugin``).

How a request flows:

1. **Processing** (API server): the prompt gets ``spec.count(n)`` placeholders per image instead of n, so vLLM sizes
   the sequence and the KV cache for the kept tokens only. For methods that read the question (``early_glimpse``,
   ``cdpruner``) each image item also carries the prompt's token ids, and its cache identity (``mm_hash``) includes
   them: the same image asked another question is pruned again, not served from the encoder cache.
2. **Encoding** (``embed_multimodal``): the ViT runs on the whole image (the blocks a module reads are caught as
   they run), the method picks the kept tokens with our runtime's own method object (``spec.ImagePruner``), and
   each kept row carries its ORIGINAL M-RoPE (t, h, w) position in 4 extra channels.
3. **Positions**: before encoding, the request's M-RoPE positions lay each image over its kept placeholders and
   give the text the unpruned prompt's positions (``get_mrope_input_positions``); vLLM's runner then calls
   ``recompute_mrope_positions`` (the hook vLLM built for EVS video pruning) with each prefill chunk's image rows,
   which strips the channels and writes each kept token's position where it was in the image; decoding goes on
   from there. Both are this class's own: vLLM's versions lay images over their whole grids (a second image ran
   past the first), start the text after an image at the grid's width (too early after a taller-than-wide image)
   and, with a chunk holding one image's tail and a second image, put the second over the first.

vLLM 0.32 (and 0.33) turns step 3 on only when video pruning is configured. This model turns it on for its own worker
by answering ``True`` from that process's ``MultiModalConfig.is_multimodal_pruning_enabled`` (an instance attribute: no
vLLM code is changed); the equivalence tests check the positions end to end. Videos are not served by this class
(``get_supported_mm_limits`` allows images only): vLLM refuses a request with a video before it runs.

Set ``GLIMPSEPRUNE_VLLM_KEPT_LOG=FILE`` to append one JSON line per pruned image (its grid and kept indices).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from .spec import ARCHITECTURE, SECTION, ImagePruner, ServeSpec, qwen2_5_vl_dims

PROMPT_KEY = "glimpse_prompt_ids"  # per image item: the request's prompt token ids (question-reading methods)
KEPT_LOG_ENV = "GLIMPSEPRUNE_VLLM_KEPT_LOG"
_PROMPT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("glimpseprune_prompt", default=None)
# largest integer each dtype holds exactly: the position channels travel in the embeddings' dtype
_EXACT_INT = {torch.bfloat16: 256, torch.float16: 2048, torch.float32: 1 << 24, torch.float64: 1 << 53}


def spec_from_config(hf_config, model_dir) -> ServeSpec:
    """The checked ``glimpseprune`` section of a model config; errors name the problem."""
    section = getattr(hf_config, SECTION, None)
    if section is None:
        raise ValueError(f"architecture {ARCHITECTURE} needs a {SECTION!r} section in the model's config.json (or "
                         f"--hf-overrides), e.g. {{\"method\": \"divprune\", \"keep_ratio\": 0.111}}; write one "
                         "with `glimpseprune vllm-folder`")
    local = model_dir if model_dir is not None and Path(str(model_dir)).is_dir() else None
    return ServeSpec.from_section(section, local)


class GlimpsePruneProcessingInfo(Qwen2_5_VLProcessingInfo):
    @cached_property
    def spec(self) -> ServeSpec:
        return spec_from_config(self.get_hf_config(), self.ctx.model_config.model)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    # without torchvision, get_hf_processor falls back to our image-only processor (vllm_plugin)


class GlimpsePruneProcessor(Qwen2_5_VLMultiModalProcessor):
    def apply(self, inputs, timing_ctx):
        token = _PROMPT.set(list(inputs.prompt))
        try:
            return super().apply(inputs, timing_ctx)
        finally:
            _PROMPT.reset(token)

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        if not self.info.spec.reads_question:
            return hashes
        digest = hashlib.sha256(np.asarray(list(inputs.prompt), dtype=np.int64).tobytes()).hexdigest()[:32]
        return {modality: [f"{h}-q{digest}" for h in items] for modality, items in hashes.items()}

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if self.info.spec.reads_question:
            fields[PROMPT_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        grids = processed_data.get("image_grid_thw")
        if self.info.spec.reads_question and grids is not None:
            ids = torch.tensor(_PROMPT.get() or [], dtype=torch.long)
            processed_data[PROMPT_KEY] = [ids] * len(grids)
        return processed_data

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        placeholder = self.info.get_tokenizer().get_vocab()[hf_processor.image_token]
        spec = self.info.spec

        def replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [placeholder] * spec.count(int(grid.prod()) // (merge * merge))

        return [PromptReplacement(modality="image", target=[placeholder], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    GlimpsePruneProcessor, info=GlimpsePruneProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class GlimpsePruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose images enter the LLM pruned (``glimpseprune`` section of the config)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        spec = spec_from_config(config, vllm_config.model_config.model)  # bad config: fails before weights load
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.spec = spec
        self.pruner = ImagePruner(spec, dims=qwen2_5_vl_dims(config), device=vllm_config.device_config.device)
        taps = self.pruner.taps()
        if any(not 0 <= t < len(self.visual.blocks) for t in taps):
            raise ValueError(f"{SECTION}.module reads vision blocks {list(taps)} but the ViT has "
                             f"{len(self.visual.blocks)}")
        self.is_multimodal_pruning_enabled = True
        mm_config = vllm_config.model_config.get_multimodal_config()
        if not mm_config.is_multimodal_pruning_enabled():  # see the module docstring, step 3
            object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)
        self._kept_log = os.environ.get(KEPT_LOG_ENV) or None

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """The request's M-RoPE positions (3, N) before its images are encoded, and their delta.

        vLLM's Qwen2.5-VL lays each image over its whole grid (t·h·w tokens), but here an image holds only its kept
        count of placeholders (``mm_position.length``): from the second image on, that layout ran past the image
        and numpy raised (the engine stopped on any request with two images). Here each image spans its own
        placeholders, and the text around it gets the unpruned prompt's positions (after an image, one past its
        largest position, as stock); the image rows get grid positions as stand-ins, which the runner replaces by the
        kept tokens' own (``recompute_mrope_positions``, from the embeddings' position channels) before they are
        used."""
        merge = self.config.vision_config.spatial_merge_size
        parts, st, nxt = [], 0, 0  # st: next prompt index to lay out; nxt: the position id it gets if text
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"{ARCHITECTURE} serves images only; got a {feature.modality} input")
            offset, length = feature.mm_position.offset, feature.mm_position.length
            _, h, w = feature.data["image_grid_thw"].data.tolist()
            h, w = h // merge, w // merge  # the merged token grid
            text = offset - st
            parts.append(torch.arange(text).expand(3, text) + nxt)
            base = nxt + text
            parts.append(torch.from_numpy(np.indices((1, h, w)).reshape(3, -1)[:, :length]) + base)
            nxt, st = base + max(h, w), offset + length  # the unpruned image's positions end at base + max(h, w) - 1
        tail = len(input_tokens) - st
        parts.append(torch.arange(tail).expand(3, tail) + nxt)
        positions = torch.cat(parts, dim=1).long()
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Strip the position channels from this prefill chunk's image rows and write the kept tokens' positions.

        vLLM's version (built for EVS video pruning) re-derives where each row sits from chunk-state heuristics: when
        a chunk held the tail of one image and a second image, it put the second image's rows over the first's
        (the generation changed as soon as a prompt with two images was prefilled in chunks). Here nothing is
        inferred: the chunk's rows are the image placeholders from ``num_computed_tokens`` on, in prompt order; each
        gets its kept token's (t, h, w) plus one past its image's ``<|vision_start|>`` position. Text positions are
        already the unpruned prompt's (``get_mrope_input_positions``) and are left as they are."""
        cleaned = [mm[:, :-4] for mm in multimodal_embeddings]
        positions = mrope_positions.clone()
        cfg = self.config
        ids = torch.as_tensor(input_ids, device=positions.device).long()
        with gpu_sync_allowed():  # nonzero syncs (vLLM's own version allows it the same way)
            if multimodal_embeddings:
                rows = torch.cat([mm[:, -4:-1] for mm in multimodal_embeddings]).to(positions.device).long().T
                media = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
                media[:num_computed_tokens] = False
                at = media.nonzero().squeeze(-1)[:rows.shape[1]]  # the prompt indices of this chunk's rows
                if at.numel() != rows.shape[1]:
                    raise RuntimeError(f"{rows.shape[1]} image rows from prompt index {num_computed_tokens} on, but "
                                       f"the prompt holds {at.numel()} image placeholders there")
                starts = (ids == cfg.vision_start_token_id).nonzero().squeeze(-1)
                owner = starts[torch.searchsorted(starts, at) - 1]  # each row's image: the last vision start before
                positions[:, at] = rows + positions[0, owner] + 1
            return cleaned, positions, int(positions.max()) + 1 - ids.numel()

    def embed_multimodal(self, **kwargs: object):
        prompts = kwargs.pop(PROMPT_KEY, None)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: list[torch.Tensor] = []
        for modality, item in by_modality.items():
            if item is None:
                continue
            if modality != "image":
                raise ValueError(f"{ARCHITECTURE} serves images only; got a {modality} input")
            out.extend(self._pruned_images(item, prompts))
        return tuple(out)

    def _vision(self, pixels: torch.Tensor, grid: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ViT output (n_total, H) and, per tap of the method, the merge-pooled block output through its tap
        function, in raster order (n_total, C')."""
        taps = self.pruner.taps()
        if not taps:
            return self.visual(pixels, grid_thw=grid), []
        meta = self.visual.prepare_encoder_metadata(grid)
        unit = self.visual.spatial_merge_unit
        tap_fn = self.pruner.tap_fn()
        got: dict[int, torch.Tensor] = {}

        # vLLM's vision blocks (support_torch_compile) override __call__ and call self.forward directly, so module
        # hooks never fire: the tapped blocks get an instance-level forward that records the output, for this call
        def tapped(i: int, block):
            forward = block.forward

            def fn(*args, **kwargs):
                out = forward(*args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
                h = h.reshape(-1, h.shape[-1])  # (patches, C), window order; a merge group is contiguous
                pooled = h.view(-1, unit, h.shape[-1]).mean(dim=1)
                got[i] = pooled if tap_fn is None else tap_fn(i, pooled)
                return out
            return fn

        blocks = [self.visual.blocks[t] for t in taps]
        for i, block in enumerate(blocks):
            block.forward = tapped(i, block)
        try:
            embeds = self.visual(pixels, grid_thw=grid, encoder_metadata=meta)
        finally:
            for block in blocks:
                del block.forward  # the class's forward again
        if len(got) != len(taps):
            raise RuntimeError(f"the vision blocks {list(taps)} that method {self.spec.method!r} reads did not run "
                               "through Python (a compiled vision encoder?); serve without compiling the encoder")
        back = meta["reverse_indices"].to(embeds.device)
        return embeds, [got[i][back] for i in range(len(taps))]

    def _question(self, prompt: torch.Tensor | None, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prompt's text embeddings before and after its (last) image, visual placeholders left out."""
        if prompt is None:
            return None, None
        ids = prompt.to(device=device, dtype=torch.long).flatten()
        cfg = self.config
        pad = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
        at = int(pad.nonzero().max()) if bool(pad.any()) else ids.numel()
        before, after = ids[:at][~pad[:at]], ids[at:][~pad[at:]]
        return self.language_model.embed_input_ids(before), self.language_model.embed_input_ids(after)

    def _pruned_images(self, item, prompts) -> list[torch.Tensor]:
        grid = item["image_grid_thw"]
        grid_list = grid.tolist()
        merge = self.visual.spatial_merge_size
        if item["type"] == "image_embeds":
            if self.pruner.taps():
                raise ValueError(f"method {self.spec.method!r} reads vision-encoder features: send pixels, not "
                                 "precomputed image embeddings")
            embeds, feats = item["image_embeds"].type(self.visual.dtype), []
        else:
            embeds, feats = self._vision(item["pixel_values"], grid_list)
        sizes = (grid.prod(-1) // (merge * merge)).tolist()
        per_image = embeds.split(sizes)
        per_feat = [f.split(sizes) for f in feats]
        if prompts is not None and not isinstance(prompts, (list, tuple)):
            prompts = list(prompts)  # a stacked (n_images, T) tensor when all prompts have one length
        out = []
        for i, (rows, (t, h, w)) in enumerate(zip(per_image, grid_list)):
            before, after = self._question(prompts[i] if prompts is not None else None, rows.device)
            idx, kept = self.pruner.prune(rows, (h // merge, w // merge), [f[i] for f in per_feat], before, after)
            pos = compute_mrope_for_media(torch.tensor([t, h, w]), merge)[idx.cpu()].to(kept.device)
            # channel 3: where the text after the image starts, relative to its first position (vLLM's layout of the
            # channels); the unpruned prompt goes on one past the image's largest position, max(h, w) (t = 1), not at
            # the grid width vLLM writes. recompute_mrope_positions above does not read it (the text's positions are
            # laid out before encoding); vLLM's own version would
            pos[:, 3] = max(h, w) // merge
            if int(pos.max()) > _EXACT_INT.get(kept.dtype, 1 << 24):  # (t, h, w, largest side)
                raise ValueError(f"image {i}: a {h // merge}x{w // merge} token grid has positions beyond what "
                                 f"{kept.dtype} holds exactly; serve this model in float32 or use smaller images")
            out.append(torch.cat([kept, pos.to(kept.dtype)], dim=1))
            if self._kept_log:
                with open(self._kept_log, "a") as f:
                    f.write(json.dumps({"method": self.spec.method, "grid": [h // merge, w // merge],
                                        "kept": idx.tolist()}) + "\n")
        return out
