"""Argument checks of the public API, run before a model does any work: named errors instead of a silent wrong
answer or a traceback from deep inside torch / transformers. ``api`` calls them; they hold no state."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def check_batch_args(images, questions, videos=None) -> None:
    """The shapes a user gets wrong first, named before anything is loaded: a list of questions (str each) and, per
    question, a list of images (paths or PIL images) and (optionally) a video entry (None, a path, a list of frames or
    a ``Video``; its content is checked by ``video.as_video``)."""
    if isinstance(questions, (str, bytes)) or not isinstance(questions, (list, tuple)):
        raise TypeError(f"questions must be a list of strings, got {type(questions).__name__}")
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise TypeError(f"questions[{i}] must be a string, got {type(q).__name__} {q!r:.60}")
        if not q.strip():  # as `ask` refuses it: the question is what a query-guided method selects tokens by
            raise ValueError(f"questions[{i}] is blank: give each sample a question")
    if isinstance(images, (str, bytes, Path)) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list with one list of images per question, got {type(images).__name__}")
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} image lists for {len(questions)} questions")
    for i, sample in enumerate(images):
        if isinstance(sample, (str, Path)):
            raise TypeError(f"images[{i}] is a single path ({sample!s:.80}); give each question a list of images: "
                            f"images=[[{str(sample)!r:.80}]]")
        if not isinstance(sample, (list, tuple)):
            raise TypeError(f"images[{i}] must be a list of images (paths or PIL images), got "
                            f"{type(sample).__name__}; wrap it in a list")
    if videos is None:
        return
    if isinstance(videos, (str, bytes, Path)) or not isinstance(videos, (list, tuple)):
        raise TypeError(f"videos must be a list with one entry per question (None, a file path, a list of frames or "
                        f"a Video), got {type(videos).__name__}; e.g. videos=[{str(videos)!r:.80}]")
    if len(videos) != len(questions):
        raise ValueError(f"got {len(videos)} videos entries for {len(questions)} questions (None where a sample has "
                         "no video)")


def check_generate_args(max_new_tokens, do_sample, temperature, seed, keep_masks) -> None:
    """Generation knobs: named errors instead of a silent wrong answer (a float keep mask cast to bool keeps
    everything) or a traceback from deep inside torch. None means "not given" (checked again once resolved)."""
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool)
                                       or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number, got {temperature!r}")
        if temperature < 0 or (do_sample and temperature == 0):
            raise ValueError(f"temperature must be > 0 when sampling (>= 0 otherwise), got {temperature}")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {type(do_sample).__name__} {do_sample!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be a whole number or None, got {type(seed).__name__} {seed!r}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if keep_masks is not None:
        if torch.is_tensor(keep_masks) or not isinstance(keep_masks, (list, tuple)):
            raise TypeError("keep_masks must be a list with one bool tensor per sample")
        for i, m in enumerate(keep_masks):
            dtype = getattr(m, "dtype", None)
            if not (torch.is_tensor(m) or hasattr(m, "__array__")) or dtype not in (torch.bool, bool, "bool"):
                what = f"{type(m).__name__} of {dtype}" if dtype is not None else type(m).__name__
                raise TypeError(f"keep_masks[{i}] must be a bool tensor or array (True = keep), got {what}; "
                                "threshold scores yourself (e.g. scores > 0.5)")


def context_length(model) -> int | None:
    """The LLM's context (``max_position_embeddings``), or None where the config does not say."""
    value = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return int(value) if value else None


def check_prompt_length(inputs, limit: int | None) -> None:
    """A prompt (the glimpse token included) longer than the model's context is refused before the model runs (for
    ``inputs`` a caller built; ``prepare`` refuses while tokenising)."""
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    if limit is None or ids is None:
        return
    n = int(ids.shape[-1]) + 1
    if n > limit:
        raise ValueError(f"the prompt is {n - 1} tokens (+ 1 glimpse token) but the model's context is {limit} "
                         "(max_position_embeddings): shorten the question or use fewer / smaller images")


def check_inputs(inputs) -> dict:
    """Processor ``inputs`` a caller built, checked before the model runs: a mapping of tensors holding 2-D integer
    ``input_ids`` (cast to int64, as processors give them), an ``attention_mask`` of the same shape, and as many
    ``pixel_values`` / ``pixel_values_videos`` rows as their ``*_grid_thw`` say. Returns a new dict."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a processor's output (a dict or BatchFeature of tensors), got "
                        f"{type(inputs).__name__}; or pass questions= and images=")
    out = dict(inputs)
    if "input_ids" not in out:
        raise ValueError(f"inputs has no 'input_ids' (keys: {sorted(out)})")
    for key, value in out.items():
        if not torch.is_tensor(value) and hasattr(value, "__array__"):
            raise TypeError(f"inputs[{key!r}] is a {type(value).__name__}: build inputs with return_tensors='pt'")
    ids = out["input_ids"]
    if not torch.is_tensor(ids) or ids.dim() != 2:
        what = f"a {ids.dim()}-D tensor" if torch.is_tensor(ids) else type(ids).__name__
        raise ValueError(f"inputs['input_ids'] must be a 2-D (batch, length) tensor, got {what}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"inputs['input_ids'] must hold integer token ids, got {ids.dtype}")
    out["input_ids"] = ids.long()
    mask = out.get("attention_mask")
    if mask is not None and (not torch.is_tensor(mask) or tuple(mask.shape) != tuple(ids.shape)):
        got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"inputs['attention_mask'] must have input_ids' shape {tuple(ids.shape)}, got {got}")
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if torch.is_tensor(out.get(pixels)) and torch.is_tensor(out.get(grid)):
            want, have = int(out[grid].prod(dim=-1).sum()), int(out[pixels].shape[0])
            if want != have:
                raise ValueError(f"inputs[{pixels!r}] holds {have} patch rows but {grid} describes {want}")
    return out


def _flat_ids(value) -> list:
    """Token ids in a generation field: one id, a list of them, or (``bad_words_ids``) a list of lists."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _flat_ids(v)]
    return [value.item() if torch.is_tensor(value) and value.numel() == 1 else value]


def check_decoding(model, gc, batch_size: int, prompt_len: int, limit: int | None, streamer=None) -> None:
    """The resolved ``GenerationConfig`` against this model and batch: EOS ids inside the vocabulary (an id that can
    never occur would silently disable stopping), a streamer with one sample, and a warning (as ``model.generate``
    warns) when prompt + ``max_new_tokens`` may run past the model's context."""
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    for key in ("eos_token_id", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                "forced_eos_token_id"):
        for i in _flat_ids(getattr(gc, key, None)):
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 or (vocab and i >= vocab):
                raise ValueError(f"{key}: {i!r} is not a token id of this model (vocabulary of {vocab})")
    stops = gc.stop_strings
    if stops is not None and not (isinstance(stops, str) or (isinstance(stops, (list, tuple))
                                                             and all(isinstance(x, str) and x for x in stops))):
        raise TypeError(f"stop_strings must be a string or a list of non-empty strings, got {stops!r:.80}")
    if streamer is not None and batch_size != 1:
        raise ValueError(f"a streamer takes a batch of one sample, got {batch_size}")
    if limit is not None and prompt_len + 1 + gc.max_new_tokens > limit:
        logger.warning("prompt (%d tokens + 1 glimpse) + max_new_tokens %d may run past the model's context of %d "
                       "(max_position_embeddings)", prompt_len, gc.max_new_tokens, limit)


_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def resolve_dtype(dtype) -> torch.dtype | str:
    """``"auto"`` (or None: the checkpoint's own dtype, from its config), or one of the floating dtypes a model or
    module runs in (``MODEL_DTYPES``) as a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``,
    ``"bf16"``)."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return "auto"
    value = dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        value = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if isinstance(value, torch.dtype) and value in MODEL_DTYPES:
        return value
    names = ", ".join(str(d).removeprefix("torch.") for d in MODEL_DTYPES)
    raise ValueError(f"dtype must be 'auto' or one of {names} (a torch dtype or its name), got {dtype!r}")


def check_device(device) -> torch.device | None:
    """A device this machine has (None: not given), as ``torch.device``; else ``ValueError`` naming what is missing,
    before any weight loads. ``meta`` (no data) is refused: a model or module there cannot run."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here")
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no weights: load onto 'cpu' or a GPU (device_map= spreads a large "
                         "model)")
    return dev


def check_finite_module(module) -> None:
    """A module whose parameters hold NaN or Inf (edited or trained to garbage in memory; ``load_module`` checks
    files) is refused by name: its scores would silently keep arbitrary tokens."""
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            raise ValueError(f"module parameter {name} is on the meta device (no data): load it onto a real device")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"module parameter {name} holds NaN or Inf values: this module cannot score tokens")
