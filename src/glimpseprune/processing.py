"""Processor loading, saving and batching, for every supported family.

This module owns everything between raw inputs (PIL images + question strings)
and the ``BatchFeature`` a model consumes:

* :func:`load_processor` / :func:`save_processor` -- offline round trip of a
  processor directory (tokenizer, image processor, chat template); when
  ``AutoProcessor`` cannot build one (no torchvision), the Qwen family's
  image-only processor is assembled from the folder's files.
* :func:`build_inputs` / :func:`load_image` / :func:`to_rgb` -- batch
  construction (left padded, with ``mm_token_type_ids`` for M-RoPE; user text
  checked for control tokens and length; videos, one per sample, through
  :mod:`glimpseprune.video`) and image reading (decompression-bomb
  limit, EXIF orientation, 16-bit and transparent images, animations refused).

What is particular to one family lives beside its adapter:
:mod:`glimpseprune.adapters.qwen2_5_vl_processing` (the image-only processor,
chat format and tiny tokenizer of Qwen2.5-VL),
:mod:`glimpseprune.adapters.qwen3_vl_processing` (Qwen3-VL's video path) and
:mod:`glimpseprune.adapters.llava_processing` (LLaVA's chat format, tiny
tokenizer and box -> token masks).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "MAX_IMAGE_PIXELS",
    "build_inputs",
    "build_messages",
    "load_image",
    "load_processor",
    "save_processor",
    "to_rgb",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Largest image (width x height) :func:`load_image` decodes: PIL's default ``Image.MAX_IMAGE_PIXELS`` (a 24-bit
# image of 0.25 GiB). Read at call time, so it can be changed here; PIL's own limit applies as well.
MAX_IMAGE_PIXELS: int = 89_478_485

CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

# --------------------------------------------------------------------------- loading / saving


def _check_processor_dir(model_dir: Path) -> None:
    """Raise ``FileNotFoundError`` unless ``model_dir`` holds tokenizer and image-processor configs."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"processor directory {model_dir} does not exist or is not a directory")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"processor directory {model_dir} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    if not any((model_dir / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        raise FileNotFoundError(
            f"processor directory {model_dir} has no image processor config "
            f"(expected one of {', '.join(IMAGE_PROCESSOR_FILES)})"
        )


def _is_usable_processor(processor: Any) -> bool:
    """True when ``processor`` is a multimodal processor with an image processor and a tokenizer."""
    return (
        isinstance(processor, ProcessorMixin)
        and getattr(processor, "image_processor", None) is not None
        and getattr(processor, "tokenizer", None) is not None
        and getattr(processor, "image_token", None) is not None
    )


def _read_chat_template(model_dir: Path, tokenizer: Any) -> str | None:
    """Chat template saved next to the processor (``.jinja`` or legacy ``.json``), else the tokenizer's own."""
    template_file = model_dir / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    legacy_file = model_dir / LEGACY_CHAT_TEMPLATE_FILE
    if legacy_file.is_file():
        try:
            template = json.loads(legacy_file.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"cannot parse chat template file {legacy_file}: {err}") from err
        if isinstance(template, str):
            return template
    return getattr(tokenizer, "chat_template", None)


def _json_key(path: Path, key: str) -> Any:
    """``key`` of the JSON object in ``path``; None if the file is missing or not such an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def load_processor(model_dir: str | Path) -> ProcessorMixin:
    """Load the processor saved in ``model_dir`` without touching the network.

    ``AutoProcessor`` is tried first; when it cannot build the processor (on
    machines without torchvision the Qwen2.5-VL video processor is missing),
    a :class:`QwenVLProcessor` is assembled from the PIL image processor, the
    tokenizer and the chat template found in the directory. The returned
    processor's tokenizer pads on the left.
    """
    model_dir = Path(model_dir)
    _check_processor_dir(model_dir)
    processor: Any = None
    try:
        processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # any failure here means "use the fallback"
        reason = " ".join(str(err).split())[:200]
        level = logging.INFO if "torchvision" in reason.lower() else logging.WARNING
        logger.log(level, "AutoProcessor could not load %s (%s); building QwenVLProcessor", model_dir, reason)
    if not _is_usable_processor(processor):
        if processor is not None:
            logger.warning(
                "AutoProcessor returned %s for %s, not an image+text processor; building QwenVLProcessor",
                type(processor).__name__,
                model_dir,
            )
        from .adapters.qwen2_5_vl_processing import build_fallback_processor

        processor = build_fallback_processor(model_dir)
    processor.tokenizer.padding_side = "left"
    return processor


def save_processor(processor: ProcessorMixin, out_dir: str | Path) -> Path:
    """Write everything :func:`load_processor` needs into ``out_dir`` and return it.

    Besides the processor's own files (``processor_config.json``, tokenizer,
    chat template) the image processor is saved on its own as
    ``preprocessor_config.json`` and a stock processor's video processor as
    ``video_preprocessor_config.json``, which is what loaders without the
    processor class (or without torchvision) read.
    """
    if not _is_usable_processor(processor):
        raise ValueError(f"save_processor expects an image+text processor, got {type(processor).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(out_dir))  # processor_config.json, tokenizer files, chat template
    processor.image_processor.save_pretrained(str(out_dir))  # preprocessor_config.json
    video = getattr(processor, "video_processor", None)  # the stock processor's (torchvision installed)
    if video is not None and hasattr(video, "save_pretrained"):  # on its own too, as the fallback reads it
        video.save_pretrained(str(out_dir))  # video_preprocessor_config.json
    template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    template_file = out_dir / CHAT_TEMPLATE_FILE
    if isinstance(template, str) and not template_file.is_file():
        template_file.write_text(template, encoding="utf-8")
    logger.info("saved processor to %s", out_dir)
    return out_dir


# --------------------------------------------------------------------------- inputs


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
MAX_ASPECT = 200  # Qwen2-VL's ``smart_resize`` limit on an image's long side over its short side
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112


class _RefusedImage(ValueError):
    """An image file :func:`load_image` refuses on purpose; its message is final."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB as it shows on screen; an RGB image without transparency is returned as is.

    16-bit greyscale (``I;16*`` modes) keeps its top 8 bits (``value >> 8``) instead of PIL's clipping at 255.
    32-bit integer (``I``) and float (``F``) greyscale declare no range, so their values say it: 0..1 (``F``
    only) is scaled to 0..255, values up to 255 are taken as 8-bit, up to 65535 as 16-bit (top 8 bits); negative,
    larger or non-finite values are refused with a ``ValueError`` (convert such an image yourself). Transparent
    images (an alpha channel, a palette with alpha, or a ``transparency`` key) are composited onto white, so pixels
    hidden by the alpha never reach the model. Other modes go through ``Image.convert("RGB")``. EXIF orientation is
    left alone here (in-memory pixels are taken as given); :func:`load_image` applies it to files.
    """
    hidden = None  # a wide greyscale image's transparent colour key, kept through the 8-bit conversion below
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F") and isinstance(image.info.get("transparency"), (int, float)):
        hidden = np.asarray(image) == image.info["transparency"]
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    elif image.mode in ("I", "F"):
        image = _wide_to_8bit(image)
    if hidden is not None:
        image = Image.merge("LA", (image, Image.fromarray(np.where(hidden, 0, 255).astype(np.uint8))))
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """An ``I`` or ``F`` greyscale image as 8-bit ``L``, its depth read from its value range (see ``to_rgb``)."""
    values = np.asarray(image, dtype=np.float64)
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"a mode {image.mode} image holding NaN or infinite values; convert it to 8-bit yourself")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"a mode {image.mode} image with values from {lo:g} to {hi:g}: neither 8-bit (0..255) nor "
                         "16-bit (0..65535) greyscale; convert it to 8-bit yourself")
    if image.mode == "F" and hi <= 1.0:
        out = np.rint(values * 255.0)
    elif hi <= 255:
        out = np.rint(values)
    else:
        out = np.floor(values / 256.0)  # the top 8 of 16 bits, as for I;16
    return Image.fromarray(out.astype(np.uint8))


def _has_transparency(image: Image.Image) -> bool:
    """True when ``image`` carries alpha: an alpha band, a palette with alpha, or a transparent colour key."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF Orientation tag says; ``image`` itself when there is nothing to turn."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # unreadable metadata must not make a readable picture fail
        logger.debug("ignoring unreadable EXIF of %s: %s", getattr(image, "filename", "image"), err)
        return image
    return image if orientation in (None, 1) else ImageOps.exif_transpose(image)


def _check_image_file(image: Image.Image, path: str | os.PathLike[str], max_pixels: int) -> None:
    """Refuse (from the header, before decoding) an image over ``max_pixels`` pixels or with several frames."""
    width, height = image.size
    if width * height > max_pixels:
        raise _RefusedImage(
            f"image file {path} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "pixels (decompression bomb?); pass max_pixels= or raise glimpseprune.processing.MAX_IMAGE_PIXELS "
            "to read it"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":  # an MPO is a camera JPEG with extra pictures: its first is the photo
        raise _RefusedImage(
            f"image file {path} has {frames} frames (an animation or a multi-page file); only still images are "
            "accepted: extract the frame you mean and pass it as a PIL image"
        )


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> Image.Image:
    """Read an image file as 8-bit RGB, as an image viewer shows it; ``ValueError`` naming ``path`` if it cannot.

    * Decompression bombs: a file whose header claims more than ``max_pixels`` pixels (default
      :data:`MAX_IMAGE_PIXELS`) is refused before its pixels are decoded, the error giving the size. PIL's own
      ``Image.MAX_IMAGE_PIXELS`` applies too (its warning is turned into this error).
    * EXIF orientation is applied: a JPEG stored sideways comes back upright.
    * Pixel formats go through :func:`to_rgb`: 16-bit scaled to 8 bits, transparency composited onto white.
    * Multi-frame files (animated GIF / PNG / WebP, multi-page TIFF) are refused with their frame count rather
      than silently cut to one frame; an MPO (a camera JPEG with extra pictures) gives its primary picture.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_image_file(image, path, limit)
                image.load()
                rgb = to_rgb(_upright(image))
                return rgb.copy() if rgb is image else rgb  # the opened image dies with its file
    except _RefusedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"image file {path} is too large to decode (decompression bomb?): {err}") from err
    except (OSError, EOFError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f"cannot read image file {path}: {err}") from err


def build_messages(num_images: int, question: str, system_prompt: str | None = None,
                   num_videos: int = 0) -> list[dict[str, Any]]:
    """Chat messages for one sample: ``num_images`` image slots, then ``num_videos`` video slots, then ``question``."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.extend({"type": "video"} for _ in range(num_videos))
    content.append({"type": "text", "text": question})
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


_PATH_TYPES = (str, bytes, os.PathLike)


def _check_batch(images: Sequence[Sequence[Image.Image]], questions: Sequence[str]) -> None:
    """Validate the shapes and types of a :func:`build_inputs` batch."""
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not a single string")
    if not isinstance(questions, Sequence) or isinstance(questions, (bytes, bytearray)):
        raise TypeError(f"questions must be a list of strings (one per sample), got {type(questions).__name__}")
    if isinstance(images, (Image.Image, *_PATH_TYPES)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list holding one list of PIL images per sample, got {type(images).__name__}")
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} image lists for {len(questions)} questions; they must match")
    if not questions:
        raise ValueError("build_inputs needs at least one sample")
    for index, question in enumerate(questions):
        if not isinstance(question, str):
            raise TypeError(f"questions[{index}] is a {type(question).__name__}, expected str")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"questions[{index}] is not valid Unicode text ({err.reason} at character {err.start}: "
                             f"{question[err.start]!r}); a lone surrogate, e.g. a JSON \\ud800 escape?") from None
    for index, sample in enumerate(images):
        if isinstance(sample, Image.Image):
            raise TypeError(f"images[{index}] is a single image; wrap it in a list (one list of images per sample)")
        if isinstance(sample, _PATH_TYPES) or not isinstance(sample, Sequence):
            raise TypeError(
                f"images[{index}] is a {type(sample).__name__}, not a list of images; wrap each sample's images in "
                "a list (images=[[image], ...]), loading files with load_image"
            )
        for image in sample:
            if not isinstance(image, Image.Image):
                hint = "; read image files with load_image" if isinstance(image, _PATH_TYPES) else ""
                raise TypeError(f"images[{index}] holds a {type(image).__name__}, expected PIL.Image.Image{hint}")
            if min(image.size) < 1:
                raise ValueError(f"images[{index}] holds a {image.width}x{image.height} image: an image needs at "
                                 "least one pixel in each direction")


def _check_aspect(processor: ProcessorMixin, images: Sequence[Sequence[Image.Image]]) -> None:
    """Qwen-family image processors (a ``merge_size``) refuse images longer than 200 times their width, or the
    reverse, from deep inside their resize: name the image and its size here instead."""
    if getattr(getattr(processor, "image_processor", None), "merge_size", None) is None:
        return
    for index, sample in enumerate(images):
        for image in sample:
            long, short = max(image.size), min(image.size)
            if long > MAX_ASPECT * short:
                raise ValueError(f"images[{index}] is {image.width}x{image.height}, {long / short:.0f} times longer "
                                 f"than wide; {type(processor).__name__} takes at most {MAX_ASPECT}:1 (crop or pad "
                                 "it first)")


def _check_videos(processor: ProcessorMixin, videos: Sequence[Any] | None, n: int) -> list[Any]:
    """One checked ``Video`` or None per sample (``videos`` None: no video anywhere); errors name the index."""
    if videos is None:
        return [None] * n
    from .video import as_video

    if isinstance(videos, (str, bytes, os.PathLike)) or not isinstance(videos, Sequence):
        raise TypeError(f"videos must be a list with one entry per sample (None, a file path, a list of frames or a "
                        f"Video), got {type(videos).__name__}")
    if len(videos) != n:
        raise ValueError(f"got {len(videos)} videos entries for {n} questions; give one per sample (None for none)")
    if any(v is not None for v in videos) and getattr(processor, "video_token", None) is None:
        raise ValueError(f"{type(processor).__name__} has no video token: this model family takes no video input")
    return [None if v is None else as_video(v, where=f"videos[{i}]") for i, v in enumerate(videos)]


def _control_tokens(processor: ProcessorMixin) -> list[str]:
    """The strings the processor's tokenizer reads as special or added tokens, plus its image/video placeholders."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens: set[Any] = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(getattr(token, "content", token) for token in added.values())
    tokens.update(getattr(processor, name, None) for name in ("image_token", "video_token"))
    return sorted(token for token in tokens if isinstance(token, str) and token.strip())


def _check_user_text(processor: ProcessorMixin, questions: Sequence[str], system_prompt: str | None) -> None:
    """Refuse user text holding a control token; ``ValueError`` naming the token and where it is."""
    texts = [(f"questions[{index}]", question) for index, question in enumerate(questions)]
    if system_prompt is not None:
        if not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt is a {type(system_prompt).__name__}, expected str or None")
        texts.append(("system_prompt", system_prompt))
    tokens = _control_tokens(processor)
    for where, text in texts:
        found = [(text.find(token), -len(token), token) for token in tokens if token in text]
        if found:
            token = min(found)[2]
            raise ValueError(
                f"{where} contains the control token {token!r}; text may not hold the tokenizer's special or added "
                "tokens (they would act as chat-template control or image placeholders), so it is refused"
            )


def _check_max_length(max_length: int | None) -> None:
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be a positive int or None, got {type(max_length).__name__}")
    if max_length < 1:
        raise ValueError(f"max_length must be a positive int or None, got {max_length}")


def _check_prompt_lengths(batch: BatchFeature, max_length: int) -> None:
    """``ValueError`` when a sample's tokenised prompt (image tokens included, padding not) exceeds ``max_length``."""
    mask = batch.get("attention_mask")
    rows = batch["input_ids"] if mask is None else mask
    rows = rows.tolist() if hasattr(rows, "tolist") else rows  # tensors, arrays or lists (return_tensors=None)
    lengths = [len(row) if mask is None else int(sum(row)) for row in rows]
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(
                f"questions[{index}]: the prompt is {length} tokens (chat template and image tokens included), "
                f"longer than max_length={max_length} (the model's context, max_position_embeddings, when called "
                "through glimpseprune.load); shorten the question or use fewer / smaller images"
                + (", or fewer video frames (a lower fps / max_frames: --fps / --max-frames)"
                   if "pixel_values_videos" in batch else "")
            )


def build_inputs(
    processor: ProcessorMixin,
    images: Sequence[Sequence[Image.Image]],
    questions: Sequence[str],
    *,
    system_prompt: str | None = None,
    return_tensors: str = "pt",
    max_length: int | None = None,
    videos: Sequence[Any] | None = None,
) -> BatchFeature:
    """Tokenise a batch of (images, question) samples into model inputs.

    ``images[i]`` is the (possibly empty) list of PIL images of sample ``i``;
    they are placed before the question in the user turn and go through
    :func:`to_rgb` (16-bit scaled, transparency composited onto white). The
    batch is left padded and holds ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` (M-RoPE processors only) and, when any sample has an
    image, ``pixel_values`` (and ``image_grid_thw`` for Qwen2.5-VL).
    Images are resized by the processor within its ``min_pixels``/``max_pixels``.

    User text (questions and ``system_prompt``) holding any of the tokenizer's
    special or added tokens (``<|im_start|>``, ``<|image_pad|>``, ``</s>``,
    ``<image>``, ...) is refused with a ``ValueError`` naming the token and the
    question index, not escaped: such text would forge chat turns or image
    slots. With ``max_length`` (the model's context, e.g. its
    ``max_position_embeddings``), a sample whose tokenised prompt, image tokens
    included, is longer raises ``ValueError`` with both lengths, before the
    batch reaches a model. Wrong types raise ``TypeError`` naming the index.

    ``videos`` (optional, one entry per sample): None, or the sample's video
    as a :class:`glimpseprune.video.Video`, a list of PIL frames or a file
    path (both through :func:`glimpseprune.video.as_video`, which refuses
    empty, mixed-size or over-long frame lists and undecodable files). A
    video slot follows the sample's images; the batch then also holds
    ``pixel_values_videos``, ``video_grid_thw`` and (Qwen2.5-VL; Qwen3-VL
    writes per-frame-group timestamps into the prompt instead)
    ``second_per_grid_ts``, and ``mm_token_type_ids`` is 2 at its tokens.
    """
    _check_batch(images, questions)
    _check_aspect(processor, images)
    _check_max_length(max_length)
    _check_user_text(processor, questions, system_prompt)
    clips = _check_videos(processor, videos, len(questions))
    prompts = [
        processor.apply_chat_template(
            build_messages(len(sample), question, system_prompt, num_videos=int(clip is not None)),
            add_generation_prompt=True,
            tokenize=False,
        )
        for sample, question, clip in zip(images, questions, clips, strict=True)
    ]
    flat_images = [to_rgb(image) for sample in images for image in sample]
    present = [clip for clip in clips if clip is not None]
    video_kwargs: dict[str, Any] = {}
    if present and type(processor).__name__.startswith("Qwen3VL"):
        # Qwen3-VL wraps each frame-group in its own <|vision_start|> / <|vision_end|>: the template's pair around the
        # video goes (the trained prompt; transformers' own processor before 5.25 kept it around all the groups)
        from .adapters.qwen3_vl_processing import video_wrapper

        prompts = [prompt.replace(video_wrapper(processor), processor.video_token) for prompt in prompts]
    if present:
        from transformers.video_utils import VideoMetadata

        video_kwargs["videos"] = [list(clip.frames) for clip in present]
        video_kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(c.frames), fps=c.fps,
                                                        frames_indices=list(range(len(c.frames)))) for c in present]
        video_kwargs["do_sample_frames"] = False  # the frames are the sampled ones (a stock video processor too)
    # M-RoPE models (Qwen2.5-VL) need mm_token_type_ids; others (LLaVA) reject them in generate
    needs_types = "mm_token_type_ids" in getattr(processor, "model_input_names", ())
    batch = processor(
        text=prompts,
        images=flat_images or None,
        padding=True,
        padding_side="left",
        return_mm_token_type_ids=needs_types,
        return_tensors=return_tensors,
        **video_kwargs,
    )
    if needs_types and "mm_token_type_ids" not in batch:
        raise RuntimeError(f"{type(processor).__name__} did not return mm_token_type_ids; M-RoPE would be wrong")
    if max_length is not None:
        _check_prompt_lengths(batch, max_length)
    return batch
