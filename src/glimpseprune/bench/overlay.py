"""Draw which visual tokens were kept: dropped cells are dimmed, kept cells outlined."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def overlay(image: Image.Image, keep: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """``image`` resized to ``size`` (the processor's resized size, default: as is) with a (h, w) keep grid drawn."""
    img = image.convert("RGB")
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    keep = np.asarray(keep, dtype=bool)
    h, w = keep.shape
    W, H = img.size
    cw, ch = W / w, H / h
    dim = Image.new("RGB", img.size, (0, 0, 0))
    mask = Image.new("L", img.size, 150)  # dropped: 60 % towards black
    draw = ImageDraw.Draw(mask)
    for r, c in zip(*np.nonzero(keep)):
        draw.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], fill=0)
    out = Image.composite(dim, img, mask)
    pen = ImageDraw.Draw(out)
    for r, c in zip(*np.nonzero(keep)):
        pen.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=(255, 0, 255), width=2)
    return out
