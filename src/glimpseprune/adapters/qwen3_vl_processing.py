"""Qwen3-VL's input processing, beside its adapter: images and videos without torchvision.

For images, transformers' ``Qwen3VLProcessor`` does what ``Qwen2_5_VLProcessor`` does (one ``<|image_pad|>`` per
merged token, ``mm_token_type_ids`` for M-RoPE; a ``Qwen2VLImageProcessor`` with 16 px patches), so the image path
of :class:`~.qwen2_5_vl_processing.QwenVLProcessor` serves Qwen3-VL too. Its video path differs in three ways, all
reproduced here from the installed transformers (``models/qwen3_vl/processing_qwen3_vl.py`` and
``video_processing_qwen3_vl.py``), while the stock processor always builds a torchvision video processor:

* **Prompt.** Time is written into the text, not into M-RoPE: each frame-group of ``temporal_patch_size`` frames
  becomes ``<{t:.1f} seconds><|vision_start|>`` + one ``<|video_pad|>`` per merged token + ``<|vision_end|>``,
  where t is the mean time of the group's first and last frame (``Qwen3VLProcessor._calculate_timestamps``: frame
  i of a clip sampled at fps is at i / fps; a last group short of frames repeats the last frame). The expansion
  replaces the chat template's whole ``<|vision_start|><|video_pad|><|vision_end|>`` (each group carries its own
  pair), as Qwen3-VL's own processor did at release (transformers 4.57) and does again from transformers 5.25;
  transformers 5.0 - 5.24 replaced only the ``<|video_pad|>`` and left one extra pair around all the groups, a prompt
  the model was not trained on: here it is the trained form on every transformers (and ``build_inputs`` gives
  transformers' own processor, used where torchvision exists, the template's video as a bare ``<|video_pad|>``, from
  which every version writes that form). A bare ``<|video_pad|>`` (no template) is replaced alone.
  ``get_rope_index`` then treats each group as a one-frame image.
* **Size.** A clip is resized as a whole (``smart_resize`` of ``video_processing_qwen3_vl``): t * h * w pixels within
  the video processor's ``size`` bounds (``shortest_edge`` / ``longest_edge`` are pixel counts over the clip's
  frames, optionally capped per frame: ``cap_pixels_per_frame``), h and w multiples of 32 px. The bounds come from the
  checkpoint's ``video_preprocessor_config.json`` or the ``video_processor`` entry of its ``processor_config.json``
  (kept whole in ``video_config`` and written back on save), else the stock class defaults. A one-frame clip is
  sized as the two frames it is padded to (the stock resize refuses it). Frames are resized with PIL (bicubic) and
  normalised by the image processor (its mean / std).
* **Patches.** The temporal stacking of :func:`glimpseprune.video.video_patches` (the layout of the stock
  ``patchify``), without ``second_per_grid_ts`` (Qwen3-VL does not take it).

:class:`Qwen3VLImageProcessorOnly` records the stock class name, so a saved folder loads with ``AutoProcessor`` as a
regular Qwen3-VL checkpoint where torchvision exists, and :func:`~glimpseprune.processing.load_processor` rebuilds
this class where it does not.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..outputs import read_json
from .qwen2_5_vl_processing import QwenVLProcessor

STOCK_CLASS = "Qwen3VLProcessor"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"  # transformers' VIDEO_PROCESSOR_NAME


def _stock_video_defaults() -> dict[str, Any]:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Stock

    return {"size": dict(Stock.size), "cap_pixels_per_frame": False, "max_video_tokens": Stock.max_video_tokens}


def video_sizing(video_config: dict[str, Any]) -> dict[str, Any]:
    """``size`` ({"shortest_edge", "longest_edge"}: pixel counts over a clip), ``cap_pixels_per_frame`` and
    ``max_video_tokens`` from a video processor config, the stock defaults where absent; ``ValueError`` if malformed."""
    out = _stock_video_defaults()
    out.update({k: video_config[k] for k in out if video_config.get(k) is not None})
    size = out["size"]
    if not isinstance(size, dict) or not all(isinstance(size.get(k), int) and size[k] > 0
                                             for k in ("shortest_edge", "longest_edge")):
        raise ValueError(f"video config size must hold positive integer shortest_edge and longest_edge, got {size!r}")
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"video config size: shortest_edge {size['shortest_edge']} > longest_edge "
                         f"{size['longest_edge']}")
    return out


def read_video_config(model_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's video processor config as a dict, checked: ``video_preprocessor_config.json``, else the
    ``video_processor`` entry of ``processor_config.json`` (where transformers 5's ``save_pretrained`` nests it),
    else {}."""
    path = Path(model_dir) / VIDEO_CONFIG_FILE
    nested = not path.is_file()
    if nested:
        path = Path(model_dir) / "processor_config.json"
        if not path.is_file():
            return {}
    config = read_json(path, "video processor config")
    if nested and isinstance(config, dict):
        config = config.get("video_processor", {})
    if not isinstance(config, dict):
        raise ValueError(f"video processor config in {path} is not a JSON object")
    video_sizing(config)
    return config


def frame_size(n_frames: int, height: int, width: int, video_config: dict[str, Any], patch_size: int,
               merge_size: int, temporal_patch_size: int) -> tuple[int, int]:
    """(height, width) every frame of a clip of ``n_frames`` (height x width) frames is resized to, by the stock
    Qwen3-VL video processor's rule (module docstring); ``ValueError`` for an aspect ratio over 200."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    sizing, factor = video_sizing(video_config), patch_size * merge_size
    n = max(n_frames, temporal_patch_size)
    lo, hi = sizing["size"]["shortest_edge"], sizing["size"]["longest_edge"]
    if sizing["cap_pixels_per_frame"]:
        per_frame = max(min(sizing["max_video_tokens"] * factor * factor, hi // n), int(lo * 1.05))
        hi = per_frame * n
    return smart_resize(n, height, width, temporal_factor=temporal_patch_size, factor=factor, min_pixels=lo,
                        max_pixels=hi)


def group_times(frames_indices: Sequence[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each frame-group: the mean of its first and last frame's time (index / fps), the last index
    repeated to fill the last group -- ``Qwen3VLProcessor._calculate_timestamps``, in its order of operations.

    >>> group_times(range(5), 2.0, 2)
    [0.25, 1.25, 2.0]
    """
    idx = list(frames_indices)
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def video_placeholder(times: Sequence[float], group_tokens: int, video_token: str = "<|video_pad|>",
                      start: str = "<|vision_start|>", end: str = "<|vision_end|>") -> str:
    """What one video's ``<|video_pad|>`` becomes: per frame-group its time, then its tokens wrapped in start / end.

    >>> video_placeholder([0.25, 1.25], 2, "P", "[", "]")
    '<0.2 seconds>[PP]<1.2 seconds>[PP]'
    """
    return "".join(f"<{t:.1f} seconds>{start}{video_token * group_tokens}{end}" for t in times)


def video_wrapper(processor: Any) -> str:
    """The chat template's video, ``<|vision_start|><|video_pad|><|vision_end|>``, in ``processor``'s tokens: what the
    trained prompt replaces whole (see the module docstring)."""
    start = getattr(processor, "vision_start_token", None) or "<|vision_start|>"
    end = getattr(processor, "vision_end_token", None) or "<|vision_end|>"
    return start + processor.video_token + end


def _unmarked() -> str:
    """transformers' look-behind that skips a placeholder ``mark_control_tokens`` marked in user text (none before
    the transformers that added it)."""
    try:
        from transformers.processing_utils import _UNMARKED
    except ImportError:
        return ""
    return _UNMARKED


def _meta(metadata: Any, key: str) -> Any:
    return None if metadata is None else metadata.get(key)  # a dict or a transformers VideoMetadata (a Mapping)


def _frame_hw(frame: Any) -> tuple[int, int]:
    return frame.size[::-1] if isinstance(frame, Image.Image) else tuple(np.asarray(frame).shape[:2])


class Qwen3VLImageProcessorOnly(QwenVLProcessor):
    """Qwen3-VL processor without torchvision (no video processor: video frames go through the image processor, see
    the module docstring); saved as ``Qwen3VLProcessor``, with ``video_config`` as ``video_preprocessor_config.json``.

    Example: ``Qwen3VLImageProcessorOnly(image_processor=Qwen2VLImageProcessorPil(patch_size=16), tokenizer=tok)``.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        if kwargs.get("video_processor") is not None:
            raise TypeError("Qwen3VLImageProcessorOnly makes video inputs from frames; for a torchvision video "
                            "processor use transformers' Qwen3VLProcessor")
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, chat_template, **kwargs)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.video_config: dict[str, Any] = {}  # the checkpoint's video processor config (sizing: video_sizing)

    def _process_videos(self, videos: Any, **kwargs: Any) -> Any:
        from ..video import DEFAULT_FPS, video_patches

        ip = self.image_processor
        tp, merge = ip.temporal_patch_size, ip.merge_size
        videos = list(videos)
        metadata = kwargs.get("video_metadata") or [None] * len(videos)
        fps = [_meta(m, "fps") or DEFAULT_FPS for m in metadata]
        sizes = [frame_size(len(v), *_frame_hw(v[0]), self.video_config, ip.patch_size, merge, tp) for v in videos]
        data = video_patches(ip, videos, fps, sizes)
        del data["second_per_grid_ts"]  # Qwen3-VL's time is in the prompt
        placeholders = []
        for video, meta, rate, (_, gh, gw) in zip(videos, metadata, fps, data["video_grid_thw"].tolist()):
            times = group_times(_meta(meta, "frames_indices") or range(len(video)), rate, tp)
            placeholders.append(video_placeholder(times, gh * gw // merge**2, self.video_token,
                                                  self.vision_start_token, self.vision_end_token))
        return data, placeholders

    def get_text_with_replacements(self, text: list[str], images_replacements: Sequence[str] = (),
                                   videos_replacements: Sequence[str] = (),
                                   audio_replacements: Sequence[str] = ()) -> tuple[list[str], list[dict[str, Any]]]:
        """The base expansion, with each video's template wrapper ``<|vision_start|><|video_pad|><|vision_end|>``
        replaced whole (see the module docstring); returned spans refer to ``text`` as given."""
        if not videos_replacements:
            return super().get_text_with_replacements(text, images_replacements, videos_replacements,
                                                      audio_replacements)
        wrapper = video_wrapper(self)
        pattern = re.compile(_unmarked() + re.escape(wrapper))
        found = [[m.start() for m in pattern.finditer(sample)] for sample in text]
        shrink = len(wrapper) - len(self.video_token)
        out, offsets = super().get_text_with_replacements([pattern.sub(self.video_token, t) for t in text],
                                                          images_replacements, videos_replacements,
                                                          audio_replacements)
        for starts, sample_offsets in zip(found, offsets, strict=False):  # (no offsets: nothing to map)
            at = [a - k * shrink for k, a in enumerate(starts)]  # where each wrapper begins in the collapsed text
            for entry in sample_offsets:
                if "span" not in entry:
                    continue
                a, b = entry["span"]
                before = sum(c < a for c in at)
                if a in at:  # a collapsed wrapper: its span and text as given
                    entry["span"], entry["text"] = (a + before * shrink, a + before * shrink + len(wrapper)), wrapper
                else:
                    entry["span"] = (a + before * shrink, b + before * shrink)
        return out, offsets

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = STOCK_CLASS
        return output

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        out = super().save_pretrained(save_directory, *args, **kwargs)
        ip = self.image_processor
        config = {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": ip.patch_size,
                  "temporal_patch_size": ip.temporal_patch_size, "merge_size": ip.merge_size,
                  "image_mean": list(ip.image_mean), "image_std": list(ip.image_std), **self.video_config}
        (Path(save_directory) / VIDEO_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out
