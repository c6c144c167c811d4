"""LLaVA-1.5's input processing, beside its adapter (the family-agnostic part is :mod:`glimpseprune.processing`):
the LLaVA chat format, a tiny offline tokenizer for test models, and box -> token-grid masks that follow the image
through LLaVA's preprocessing.

LLaVA feeds the vision tower one fixed-size square per image, reached in one of three ways:

* ``"pad"`` -- expand to a square (the short side centred, ``(long - short) // 2`` on the top / left), then resize
  (the original LLaVA-1.5 ``image_aspect_ratio="pad"``; transformers' ``LlavaImageProcessor(do_pad=True)``);
* ``"crop"`` -- resize the shortest edge, then centre-crop (``CLIPImageProcessor``, the llava-hf checkpoints);
* ``"resize"`` -- squash to the square (no aspect ratio kept).

The upstream GlimpsePrune LLaVA code normalised boxes by the ORIGINAL width and height whatever the mode, so its
targets were misaligned with the visual tokens on non-square images. :func:`llava_box_to_grid` maps boxes through
the same geometry as the pixels; :func:`llava_image_mode` reads that geometry off an image processor::

    mask = llava_box_to_grid([(120, 20, 160, 60)], 200, 100, 24, **llava_image_mode(processor.image_processor))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken

from .qwen2_5_vl_processing import _TINY_CORPUS, _train_byte_bpe

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_SPECIAL_TOKENS",
    "llava_box_to_grid",
    "llava_image_mode",
    "make_tiny_llava_tokenizer",
]

MODES = ("pad", "crop", "resize")
# Control tokens of a LLaVA-1.5 (Llama) vocabulary: unk, bos, eos, pad and the image placeholder.
LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# The llava-hf LLaVA-1.5 chat format ("USER: <image>\nQuestion ASSISTANT:"); a system message is written first,
# without a role name. Whitespace control is explicit so that it renders the same under any Jinja settings.
LLAVA_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}{{- '<image>\\n' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{- message['role'].upper() + ': ' -}}{%- endif -%}"
    "{{- render_content(message['content']) + ' ' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def make_tiny_llava_tokenizer(words: list[str] | None = None, *, bpe_vocab_size: int = 640):
    """A small offline LLaVA-style tokenizer: the byte-level BPE of
    :func:`~.qwen2_5_vl_processing.make_tiny_qwen_tokenizer` (trained in-process, any text encodes) with the
    LLaVA-1.5 control tokens ``<unk> <s> </s> <pad> <image>`` right after it (``eos`` is ``</s>``, ``pad`` is
    ``<pad>``), left padding and :data:`LLAVA_CHAT_TEMPLATE`. Deterministic for a given input."""
    from transformers import Qwen2Tokenizer  # the byte-level BPE tokenizer class of transformers

    lines = [line for line in _TINY_CORPUS.strip().splitlines() if line] + [str(w) for w in words or []]
    vocab, merges = _train_byte_bpe(lines, bpe_vocab_size)
    first = len(vocab)
    vocab.update({token: first + i for i, token in enumerate(LLAVA_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", padding_side="left", model_max_length=4096)
    tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken("<image>", special=True, normalized=False)]})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    got = [tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS]
    if got != list(range(first, first + len(LLAVA_SPECIAL_TOKENS))):
        raise RuntimeError(f"tiny LLaVA tokenizer: control tokens got ids {got}, expected them from {first}")
    return tokenizer


# --------------------------------------------------------------------------- boxes -> token grid


def _size_pair(value: Any) -> tuple[int, int] | None:
    """(height, width) from an int, a (h, w) pair or a size dict / SizeDict with height and width."""
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, Sequence):
        return int(value[0]), int(value[1])
    h, w = _field(value, "height"), _field(value, "width")
    return None if h is None or w is None else (int(h), int(w))


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def llava_image_mode(image_processor: Any) -> dict[str, Any]:
    """``{"mode", "size", "crop"}`` of a LLaVA image processor, to pass on to :func:`llava_box_to_grid`."""
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    resize = bool(getattr(image_processor, "do_resize", True))
    crop_hw = _size_pair(crop) if getattr(image_processor, "do_center_crop", False) else None
    shortest = _field(size, "shortest_edge") if size is not None else None
    if getattr(image_processor, "do_pad", False):
        return {"mode": "pad", "size": (int(shortest) if shortest else _size_pair(size)) if resize else None,
                "crop": crop_hw}
    if shortest and resize:
        return {"mode": "crop", "size": int(shortest), "crop": crop_hw}
    if crop_hw is not None and not resize:
        return {"mode": "crop", "size": None, "crop": crop_hw}
    return {"mode": "resize", "size": None, "crop": None}


def _axes(width: int, height: int, mode: str, size, crop) -> list[tuple[float, float, float]]:
    """Per axis (x, y): (scale, offset, extent): original pixel u lands at (u * scale + offset) / extent in [0, 1]."""
    if mode == "resize":
        return [(1.0, 0.0, float(width)), (1.0, 0.0, float(height))]
    dims, offs = [width, height], [0, 0]
    if mode == "pad":  # expand to a square, the image centred on the short side
        side = max(width, height)
        offs = [(side - width) // 2, (side - height) // 2]
        dims = [side, side]
    if isinstance(size, int):  # transformers' shortest-edge resize: short -> size, long -> int(size * long / short)
        w, h = dims
        new = [size, int(size * h / w)] if w <= h else [int(size * w / h), size]
    elif size is not None:
        h, w = _size_pair(size)
        new = [w, h]
    else:
        new = list(dims)
    scale = [n / d for n, d in zip(new, dims)]
    crop_hw = _size_pair(crop)
    if crop_hw is None and mode == "crop":  # default: the central square of the resized image
        crop_hw = (min(new), min(new))
    if crop_hw is None:
        return [(scale[i], offs[i] * scale[i], float(new[i])) for i in range(2)]
    extent = [crop_hw[1], crop_hw[0]]
    shift = [-((n - c) // 2) for n, c in zip(new, extent)]  # transformers' center_crop (pads when too small)
    return [(scale[i], offs[i] * scale[i] + shift[i], float(extent[i])) for i in range(2)]


def _span(a: float, b: float, n: int) -> tuple[int, int] | None:
    """Cells [lo, hi) of n covered by [a, b) (normalised); None when the span lies outside [0, 1]."""
    visible = (0.0 <= a <= 1.0) if a == b else (b > 0.0 and a < 1.0)
    if not visible:
        return None
    a, b = min(max(a, 0.0), 1.0), min(max(b, 0.0), 1.0)
    lo = min(int(math.floor(a * n + 1e-9)), n - 1)
    hi = max(int(math.ceil(b * n - 1e-9)), lo + 1)
    return lo, min(hi, n)


def llava_box_to_grid(boxes, width: int, height: int, grid: int | tuple[int, int], mode: str = "pad", *,
                      size: int | tuple[int, int] | None = None,
                      crop: int | tuple[int, int] | None = None) -> np.ndarray:
    """(grid_h, grid_w) bool mask of the visual tokens covered by pixel xyxy ``boxes`` of a ``width x height`` image.

    The boxes go through the processor's geometry (see the module docstring): ``mode`` "pad", "crop" or "resize";
    ``size`` the resize target (shortest edge as an int, or (h, w)); ``crop`` the centre-crop size (int or (h, w)).
    With ``size=None`` the image is not rescaled, and "crop" keeps the central square of side min(width, height);
    pass the processor's own values (:func:`llava_image_mode`) to reproduce its integer rounding exactly. A box
    [x1, x2) covers cells floor(x1 g) .. ceil(x2 g) - 1 (an edge on a grid line does not spill over), boxes are
    clipped to the visible square, and a box the crop removes entirely marks nothing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if gh <= 0 or gw <= 0:
        raise ValueError(f"grid must be positive, got {grid}")
    (sx, ox, ex), (sy, oy, ey) = _axes(width, height, mode, size, crop)
    mask = np.zeros((gh, gw), dtype=bool)
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"a box must be pixel xyxy (4 numbers), got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box {box!r} has x2 < x1 or y2 < y1; boxes are xyxy")
        cols = _span((x1 * sx + ox) / ex, (x2 * sx + ox) / ex, gw)
        rows = _span((y1 * sy + oy) / ey, (y2 * sy + oy) / ey, gh)
        if cols is not None and rows is not None:
            mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask
