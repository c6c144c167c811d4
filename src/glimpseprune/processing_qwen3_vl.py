"""Qwen3-VL input processing beside :mod:`glimpseprune.processing`: an image-only processor that works without
torchvision.

For images, transformers' ``Qwen3VLProcessor`` does what ``Qwen2_5_VLProcessor`` does (one ``<|image_pad|>`` per
merged token, ``mm_token_type_ids`` for M-RoPE; a ``Qwen2VLImageProcessor`` with 16 px patches); only its video
path (timestamps between frames) differs, and it always builds a torchvision video processor. So the image-only
:class:`~glimpseprune.processing.QwenVLProcessor` serves Qwen3-VL too; this subclass only records the stock class
name, so a saved folder loads with ``AutoProcessor`` as a regular Qwen3-VL checkpoint where torchvision exists, and
:func:`~glimpseprune.processing.load_processor` rebuilds this class where it does not.
"""

from __future__ import annotations

from typing import Any

from .processing import QwenVLProcessor

STOCK_CLASS = "Qwen3VLProcessor"


class Qwen3VLImageProcessorOnly(QwenVLProcessor):
    """Image-only Qwen3-VL processor (no video processor, hence no torchvision); saved as ``Qwen3VLProcessor``.

    Example: ``Qwen3VLImageProcessorOnly(image_processor=Qwen2VLImageProcessorPil(patch_size=16), tokenizer=tok)``.
    """

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = STOCK_CLASS
        return output
