"""Video input: a clip as frames sampled at a known rate, read from a file (PyAV, the ``video`` extra) or given as
PIL frames, checked before any model runs, and turned into the temporal patches of a Qwen2.5-VL-style vision tower.

* :class:`Video` -- frames (8-bit RGB, one size) sampled at ``fps`` frames per second.
* :func:`load_video` -- decode a file, sampling ``fps`` frames per second (default :data:`DEFAULT_FPS` = 2), at most
  ``max_frames`` (default :data:`MAX_FRAMES`; a longer clip is sampled evenly over its whole length instead).
* :func:`as_video` -- what a caller may pass per sample (a path, a list of frames, a :class:`Video`) as a checked
  :class:`Video`: an empty list, frames of mixed sizes, or more than ``max_frames`` frames raise ``ValueError``.
* :func:`video_patches` -- the model inputs of a batch of videos from the (PIL) image processor alone: each frame is
  resized, normalised and patchified exactly as an image, then ``temporal_patch_size`` consecutive frames are stacked
  into each patch (the layout of transformers' ``Qwen2VLVideoProcessor.patchify``, which needs torchvision); a clip
  whose frame count is not a multiple of it repeats its last frame, as that processor does. Positions follow the
  clock: ``second_per_grid_ts`` = temporal_patch_size / fps (Qwen2.5-VL; Qwen3-VL writes timestamps into the prompt
  instead, see :mod:`glimpseprune.adapters.qwen3_vl_processing`, and sizes each clip as a whole: ``sizes``).

Example::

    clip = load_video("clip.mp4", fps=1.0, max_frames=16)
    pm.generate(videos=[clip], questions=["What happens?"])
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_FPS", "MAX_FRAMES", "VIDEO_MAX_PIXELS", "Video", "as_video", "load_video", "sample_times",
           "stack_temporal", "video_patches"]

# Frames per second sampled from a file, and the rate a list of frames is taken to have been sampled at.
DEFAULT_FPS: float = 2.0
# Most frames one video may hold (a file is sampled down to it). Read at call time, so it can be changed here.
MAX_FRAMES: int = 64
# Per-frame pixel cap (after the image processor's own): that of transformers' Qwen2-VL video processor.
VIDEO_MAX_PIXELS: int = 768 * 28 * 28

_PATH_TYPES = (str, os.PathLike)


@dataclass(frozen=True)
class Video:
    """A clip: ``frames`` (PIL images of one size) sampled at ``fps`` frames per second; ``source`` names it in
    errors (the file path, or "frames")."""

    frames: tuple[Image.Image, ...]
    fps: float = DEFAULT_FPS
    source: str = "frames"

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(self.frames))
        _check_fps(self.fps)
        _check_frames(self.frames, self.source)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return self.frames[0].size

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each frame from the first."""
        return [i / self.fps for i in range(len(self.frames))]


def _check_fps(fps: Any) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")


def _check_max_frames(max_frames: Any) -> int:
    limit = MAX_FRAMES if max_frames is None else max_frames
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_frames must be a whole number >= 1, got {limit!r}")
    return limit


def _check_frames(frames: Sequence[Any], where: str) -> None:
    """Frames must be PIL images of one size; ``ValueError`` / ``TypeError`` naming ``where`` otherwise."""
    if not frames:
        raise ValueError(f"{where}: the video has no frames (an empty frame list)")
    for i, frame in enumerate(frames):
        if not isinstance(frame, Image.Image):
            raise TypeError(f"{where}: frame {i} is a {type(frame).__name__}, expected a PIL image")
    sizes = sorted({f.size for f in frames})
    if len(sizes) > 1:
        first = frames[0].size
        odd = next(i for i, f in enumerate(frames) if f.size != first)
        raise ValueError(f"{where}: frames have mixed sizes ({', '.join(f'{w}x{h}' for w, h in sizes)}; frame 0 is "
                         f"{first[0]}x{first[1]}, frame {odd} is {frames[odd].size[0]}x{frames[odd].size[1]}); "
                         "resize them to one size first")


def as_video(item: Any, *, fps: float | None = None, max_frames: int | None = None, where: str = "video") -> Video:
    """A checked :class:`Video` from a file path (decoded with :func:`load_video`), a list of frames (PIL images or
    image files, taken as sampled at ``fps``, default :data:`DEFAULT_FPS`) or a :class:`Video` (kept as it is).
    Raises ``ValueError`` naming ``where`` for an empty list, frames of mixed sizes, more than ``max_frames``
    (default :data:`MAX_FRAMES`) frames, or a file that does not decode."""
    limit = _check_max_frames(max_frames)
    if isinstance(item, _PATH_TYPES):
        return load_video(item, fps=DEFAULT_FPS if fps is None else fps, max_frames=limit)
    if isinstance(item, Video):
        video = item
    elif isinstance(item, (list, tuple)):
        from .processing import load_image, to_rgb

        frames = [load_image(f) if isinstance(f, _PATH_TYPES) else f for f in item]
        _check_frames(frames, where)
        video = Video(tuple(to_rgb(f) for f in frames), DEFAULT_FPS if fps is None else fps, where)
    else:
        raise TypeError(f"{where} is a {type(item).__name__}: give a video file path, a list of PIL frames or a "
                        "glimpseprune.Video")
    if len(video.frames) > limit:
        raise ValueError(f"{where}: the video has {len(video.frames)} frames, over the limit of max_frames={limit}; "
                         "pass fewer frames (a file is sampled down: load_video(path, fps=..., max_frames=...)) or "
                         "raise glimpseprune.video.MAX_FRAMES")
    return video


# --------------------------------------------------------------------------- decoding


def sample_times(duration: float | None, fps: float, max_frames: int) -> tuple[list[float], float]:
    """(times in seconds from the start, the rate they are sampled at) for a clip of ``duration`` seconds: every
    1 / fps s (at least one frame); over ``max_frames`` frames, ``max_frames`` evenly spread over the whole clip.
    Unknown duration (None): the first ``max_frames`` at ``fps``.

    >>> sample_times(2.0, 2.0, 64)
    ([0.0, 0.5, 1.0, 1.5], 2.0)
    >>> sample_times(10.0, 2.0, 4)
    ([0.0, 2.5, 5.0, 7.5], 0.4)
    """
    if duration is None:
        return [k / fps for k in range(max_frames)], fps
    n = max(1, math.floor(duration * fps + 1e-9))
    if n <= max_frames:
        return [k / fps for k in range(n)], fps
    step = duration / max_frames
    return [k * step for k in range(max_frames)], max_frames / duration


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install 'glimpseprune[video]' (or pip install av); "
                          "or pass the frames as a list of PIL images") from None
    return av


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    if stream.frames and stream.average_rate:
        return stream.frames / float(stream.average_rate)
    return None


def _decode(container, stream, times: list[float]) -> list[Image.Image]:
    """For each target time, the first decoded frame at (or within half a frame before) it, in one pass."""
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    eps = 0.5 / rate
    out: list[Image.Image] = []
    start = None
    for i, frame in enumerate(container.decode(stream)):
        t = frame.time if frame.time is not None else i / rate
        start = t if start is None else start
        picked = None
        while len(out) < len(times) and times[len(out)] <= t - start + eps:
            if picked is None:
                picked = frame.to_image().convert("RGB")
            out.append(picked)
        if len(out) == len(times):
            break
    return out


def load_video(path: str | os.PathLike[str], *, fps: float = DEFAULT_FPS, max_frames: int | None = None) -> Video:
    """Decode a video file with PyAV, sampling ``fps`` frames per second (see :func:`sample_times`; at most
    ``max_frames``, default :data:`MAX_FRAMES`). ``ValueError`` naming ``path`` if it is missing, has no video
    stream, frames over ``processing.MAX_IMAGE_PIXELS`` pixels, or does not decode."""
    from .processing import MAX_IMAGE_PIXELS

    _check_fps(fps)
    limit = _check_max_frames(max_frames)
    if not Path(path).is_file():
        raise ValueError(f"video file {path} does not exist or is not a file")
    av = _import_av()
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video file {path} has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"video file {path} has {w}x{h} frames, over the limit of {MAX_IMAGE_PIXELS} "
                                 "pixels (glimpseprune.processing.MAX_IMAGE_PIXELS)")
            times, rate = sample_times(_duration(container, stream), fps, limit)
            frames = _decode(container, stream, times)
    except (av.FFmpegError, OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot decode video file {path}: {err}") from err
    if not frames:
        raise ValueError(f"cannot decode video file {path}: it holds no decodable frames")
    logger.info("decoded %d frames at %.3g fps from %s", len(frames), rate, path)
    return Video(tuple(frames), rate, os.fspath(path))


# --------------------------------------------------------------------------- patches


def stack_temporal(pixel_values: np.ndarray, n_frames: int, temporal_patch_size: int, patch_size: int) -> np.ndarray:
    """Per-frame patches (n_frames * n, C * tp * p * p), each frame repeated over the tp axis as the image processor
    makes them, -> video patches (ceil(n_frames / tp) * n, C * tp * p * p) whose tp axis holds tp consecutive frames
    (the last frame repeated to fill the last group)."""
    tp, pp = temporal_patch_size, patch_size * patch_size
    n = pixel_values.shape[0] // n_frames
    x = pixel_values.reshape(n_frames, n, -1, tp, pp)  # (F, n, C, tp, p*p)
    if pad := -n_frames % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    x = x.reshape(-1, tp, *x.shape[1:])  # (T, tp frames, n, C, tp, p*p)
    out = np.stack([x[:, j, :, :, j] for j in range(tp)], axis=3)  # frame j of each group at tp index j
    return out.reshape(-1, pixel_values.shape[1])


def video_patches(image_processor, videos: Sequence[Any], fps: Sequence[float],
                  sizes: Sequence[tuple[int, int] | None] | None = None) -> dict[str, Any]:
    """``pixel_values_videos`` (sum of t * h * w patches, D), ``video_grid_thw`` (n_videos, 3) and
    ``second_per_grid_ts`` (temporal_patch_size / fps per video) from frames alone: each video is a list of PIL
    frames of one size (or a (F, H, W, 3) uint8 array), resized within the image processor's pixel bounds (the
    upper one capped at :data:`VIDEO_MAX_PIXELS`) -- or, where ``sizes`` gives the video a (height, width), resized
    to exactly that (bicubic, as the image processor resizes) -- then :func:`stack_temporal`."""
    size = image_processor.size
    bounds = {"shortest_edge": size["shortest_edge"], "longest_edge": min(size["longest_edge"], VIDEO_MAX_PIXELS)}
    tp, patch = image_processor.temporal_patch_size, image_processor.patch_size
    pixels, grids = [], []
    for video, hw in zip(videos, sizes or [None] * len(videos), strict=True):
        frames = [Image.fromarray(np.asarray(f, dtype=np.uint8)) if not isinstance(f, Image.Image) else f
                  for f in video]
        if hw is None:
            px = image_processor(frames, size=bounds, return_tensors="np")
        else:
            wh = (hw[1], hw[0])
            frames = [f if f.size == wh else f.resize(wh, Image.Resampling.BICUBIC) for f in frames]
            px = image_processor(frames, do_resize=False, return_tensors="np")
        _, gh, gw = (int(v) for v in px["image_grid_thw"][0])
        pixels.append(stack_temporal(px["pixel_values"], len(frames), tp, patch))
        grids.append([-(-len(frames) // tp), gh, gw])
    return {"pixel_values_videos": np.concatenate(pixels, axis=0), "video_grid_thw": np.array(grids, dtype=np.int64),
            "second_per_grid_ts": [float(tp / f) for f in fps]}
