"""Draw which visual tokens were kept, on the input image at its own size: dropped tokens dimmed and greyed, the kept
region in full colour inside a black-and-white outline (legible on any object colour), and an optional caption
band below the image (the question, the answer, ``kept n/N (x %)``); for a video, :func:`contact_sheet` lays its frames
out in a grid, each with the kept tokens of its frame-group."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DIM = 0.42  # dropped tokens: grey level times this (dim + desaturate)
BAND_BG, BAND_FG, BAND_MUTED = (250, 250, 250), (20, 20, 20), (90, 90, 90)


def grid_box(adapter, processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom), in the pixels of a ``size`` = (width, height) input image, of the region the
    adapter's token grid covers: the whole image where the processor only resizes (Qwen2.5-VL, LLaVA "resize"); a
    square reaching past the short sides (LLaVA "pad") or the central square (LLaVA "crop") otherwise."""
    w, h = size
    if "llava" in getattr(adapter, "model_types", ()) and processor is not None:
        from ..adapters.llava_processing import _axes, llava_image_mode

        g = llava_image_mode(processor.image_processor)
        (sx, ox, ex), (sy, oy, ey) = _axes(w, h, g["mode"], g["size"], g["crop"])
        return -ox / sx, -oy / sy, (ex - ox) / sx, (ey - oy) / sy
    return 0.0, 0.0, float(w), float(h)


def kept_pixels(keep: np.ndarray, size: tuple[int, int], box=None) -> np.ndarray:
    """(height, width) bool: the pixels of a ``size`` image whose centre falls in a kept cell of the (h, w) ``keep``
    grid laid over ``box`` (default: the whole image); pixels outside the box are not kept."""
    keep = np.asarray(keep, dtype=bool)
    gh, gw = keep.shape
    W, H = size
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(W), float(H))
    col = np.floor((np.arange(W) + 0.5 - left) / (right - left) * gw).astype(int)
    row = np.floor((np.arange(H) + 0.5 - top) / (bottom - top) * gh).astype(int)
    cin, rin = (col >= 0) & (col < gw), (row >= 0) & (row < gh)
    out = keep[np.clip(row, 0, gh - 1)][:, np.clip(col, 0, gw - 1)]
    return out & rin[:, None] & cin[None, :]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1) square, separable: rows then columns."""
    if r <= 0:
        return mask
    out = mask.copy()
    for axis in (0, 1):
        src, n = out.copy(), out.shape[axis]
        for d in range(1, min(r, n - 1) + 1):
            lo, hi = [slice(None)] * 2, [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - d), slice(d, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: float, max_lines: int = 4) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (at most ``max_lines``, the last one ellipsised)."""
    text = " ".join(str(text).split())
    per = max(4, int(width / max(font.getlength("n"), 1.0)))  # a first guess in characters, then shrunk to fit
    while True:
        lines = textwrap.wrap(text, per, break_long_words=True) or [""]
        if per <= 4 or all(font.getlength(x) <= width for x in lines):
            break
        per -= 1
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def caption_lines(question=None, answer=None, kept=None, total=None) -> list[tuple[str, bool]]:
    """(text, muted) lines of the caption band; empty when there is nothing to say."""
    lines = []
    if question is not None:
        lines.append((f"Q: {question}", False))
    if answer is not None:
        lines.append((f"A: {str(answer).strip()}", False))
    if kept is not None:
        share = f" ({100.0 * kept / total:.1f} %)" if total else ""
        lines.append((f"kept {kept}/{total}{share}" if total is not None else f"kept {kept}", True))
    return lines


def _band(width: int, lines: list[tuple[str, bool]]) -> Image.Image:
    px = int(min(max(width / 32, 13), 24))
    font, pad, gap = _font(px), max(4, px // 2), max(2, px // 4)
    rows = [(x, muted) for text, muted in lines for x in _wrap(text, font, width - 2 * pad)]
    line_h = px + gap
    band = Image.new("RGB", (width, 2 * pad + line_h * len(rows) - gap), BAND_BG)
    draw = ImageDraw.Draw(band)
    draw.line([(0, 0), (width, 0)], fill=(0, 0, 0), width=max(1, px // 10))
    for i, (text, muted) in enumerate(rows):
        draw.text((pad, pad + i * line_h), text, fill=BAND_MUTED if muted else BAND_FG, font=font)
    return band


def overlay(image: Image.Image, keep: np.ndarray, size: tuple[int, int] | None = None, *, box=None,
            question: str | None = None, answer: str | None = None, kept: int | None = None,
            total: int | None = None) -> Image.Image:
    """``image`` at its own size (or resized to ``size``) with the (h, w) ``keep`` grid drawn over ``box``
    (:func:`grid_box`; default the whole image): dropped tokens dimmed and desaturated, the kept region outlined
    black outside white. With any of ``question`` / ``answer`` / ``kept`` (and ``total``, for ``kept n/N (x %)``) a
    caption band is added below the image (the image itself is not covered): the result is then taller by the band's
    height, its width unchanged."""
    img = image.convert("RGB")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.BICUBIC)
    W, H = img.size
    mask = kept_pixels(keep, img.size, box)
    rgb = np.asarray(img, dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.where(mask[..., None], rgb, (DIM * grey)[..., None])
    # the outline lies outside the kept region (over dropped pixels), so the kept content stays untouched
    inner = max(1, round(min(W, H) / 400))
    outer = inner + max(2, round(min(W, H) / 200))
    white = _dilate(mask, inner) & ~mask
    black = _dilate(mask, outer) & ~mask & ~white
    out[black] = 0.0
    out[white] = 255.0
    drawn = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB")
    lines = caption_lines(question, answer, kept, total)
    if not lines:
        return drawn
    band = _band(W, lines)
    canvas = Image.new("RGB", (W, H + band.height), BAND_BG)
    canvas.paste(drawn, (0, 0))
    canvas.paste(band, (0, H))
    return canvas


def contact_sheet(frames: list[Image.Image], keep: np.ndarray, *, temporal_patch_size: int = 2,
                  fps: float | None = None, box=None, columns: int | None = None, tile_width: int = 320,
                  question: str | None = None, answer: str | None = None, kept: int | None = None,
                  total: int | None = None) -> Image.Image:
    """A video's frames in a grid (``columns``, default about square), each drawn by :func:`overlay` with the keep
    grid of its frame-group: ``keep`` is (t, h, w) and frame f shows ``keep[f // temporal_patch_size]``. Tiles are
    at most ``tile_width`` px wide and labelled with the frame index (and its time with ``fps``); the caption band
    (question, answer, ``kept n/N``) goes below the whole sheet."""
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 3 or not frames or len(frames) > keep.shape[0] * temporal_patch_size:
        raise ValueError(f"contact_sheet: {len(frames)} frames do not fit a keep grid of shape {keep.shape} with "
                         f"temporal_patch_size={temporal_patch_size}")
    w, h = frames[0].size
    scale = min(1.0, tile_width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    box = None if box is None else tuple(v * scale for v in box)
    cols = columns or max(1, int(np.ceil(np.sqrt(len(frames)))))
    rows = -(-len(frames) // cols)
    gap = 4
    sheet = Image.new("RGB", (cols * size[0] + (cols - 1) * gap, rows * size[1] + (rows - 1) * gap), BAND_BG)
    font = _font(int(min(max(size[0] / 16, 11), 18)))
    for f, frame in enumerate(frames):
        tile = overlay(frame, keep[f // temporal_patch_size], size, box=box)
        label = f"#{f}" + (f" {f / fps:.1f}s" if fps else "")
        draw = ImageDraw.Draw(tile)
        left, top, right, bottom = draw.textbbox((3, 2), label, font=font)
        draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=BAND_BG)
        draw.text((3, 2), label, fill=BAND_FG, font=font)
        r, c = divmod(f, cols)
        sheet.paste(tile, (c * (size[0] + gap), r * (size[1] + gap)))
    lines = caption_lines(question, answer, kept, total)
    if not lines:
        return sheet
    band = _band(sheet.width, lines)
    canvas = Image.new("RGB", (sheet.width, sheet.height + band.height), BAND_BG)
    canvas.paste(sheet, (0, 0))
    canvas.paste(band, (0, sheet.height))
    return canvas


MARK = "glimpseprune overlay"  # in the saved file: a later `ask --overlay` to the same path may replace it


def save_overlay(image: Image.Image, path) -> None:
    """Save a drawn overlay with :data:`MARK` in it (a PNG text chunk, a JPEG / GIF comment), atomically
    (``outputs.atomic_replace``: an interrupted save leaves the earlier file whole)."""
    from pathlib import Path

    from PIL.PngImagePlugin import PngInfo

    from ..outputs import atomic_replace

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    kwargs = {}
    if fmt == "PNG":
        kwargs["pnginfo"] = PngInfo()
        kwargs["pnginfo"].add_text("Software", MARK)
    elif fmt in ("JPEG", "GIF"):
        kwargs["comment"] = MARK
    atomic_replace(path, lambda tmp: image.save(tmp, format=fmt, **kwargs))


def is_overlay(path) -> bool:
    """Whether the image file at ``path`` is one :func:`save_overlay` wrote (its mark is there); False for anything
    else, including a file that is not an image."""
    try:
        with Image.open(path) as im:
            found = [im.info.get("Software"), im.info.get("comment")]
    except Exception:
        return False
    return any(v in (MARK, MARK.encode()) for v in found)
