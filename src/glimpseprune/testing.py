"""Tiny random-init Qwen2.5-VL and LLaVA fixtures for tests and examples.

This module owns the construction of deliberately small models (a few hundred
thousand parameters) that run on a CPU in milliseconds and are built entirely
offline: :func:`tiny_qwen2_5_vl_config` / :func:`tiny_llava_config` describe
them, :func:`build_tiny_qwen2_5_vl` / :func:`build_tiny_llava` write loadable
checkpoint directories (weights, generation config and processor) and
:func:`random_image` makes deterministic test images; :func:`make_tiny` writes a model, an untrained module
and an image in one go (``glimpseprune make-tiny``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from glimpseprune.adapters.llava_processing import LLAVA_CHAT_TEMPLATE, make_tiny_llava_tokenizer
from glimpseprune.adapters.qwen2_5_vl_processing import QwenVLProcessor, make_tiny_qwen_tokenizer
from glimpseprune.processing import save_processor

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_LLAVA_IMAGE_SIZE",
    "TINY_MAX_PIXELS",
    "TINY_MIN_PIXELS",
    "build_tiny_llava",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_5_vl_serving",
    "build_tiny_qwen3_vl",
    "make_tiny",
    "random_image",
    "tiny_llava_config",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen3_vl_config",
]

# Image-processor pixel budget of the tiny checkpoint: 56*56 px is 2x2 patches
# of 28 px (4 patches -> 1 merged token), 448*448 px is 16x16 merged tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 448 * 448

_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    # head_dim = 64 / 4 = 16; the M-RoPE sections (t, h, w) must sum to head_dim / 2.
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
}

_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1, 3],
    "tokens_per_second": 2,
    "initializer_range": 0.02,
}


def _special_token_ids(tokenizer: Any = None) -> dict[str, int]:
    """Ids of the control tokens in ``tokenizer`` (default: the tiny tokenizer); the config has to agree."""
    tokenizer = tokenizer if tokenizer is not None else make_tiny_qwen_tokenizer()
    names = {
        "pad": "<|endoftext|>",
        "eos": "<|im_end|>",
        "image": "<|image_pad|>",
        "video": "<|video_pad|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
    }
    ids = {key: int(tokenizer.convert_tokens_to_ids(token)) for key, token in names.items()}
    ids["vocab_size"] = len(tokenizer)
    return ids


def _merged(defaults: dict[str, Any], override: Any, name: str) -> dict[str, Any]:
    """``defaults`` updated with the dict ``override`` (``None`` keeps the defaults)."""
    if override is None:
        return dict(defaults)
    if not isinstance(override, dict):
        raise TypeError(f"{name} override must be a dict of config fields, got {type(override).__name__}")
    return {**defaults, **override}


def tiny_qwen2_5_vl_config(**overrides: Any) -> Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL config matching :func:`~glimpseprune.adapters.qwen2_5_vl_processing.make_tiny_qwen_tokenizer`.

    Text: hidden 64, 4 layers, 4 query / 2 key-value heads, M-RoPE sections
    ``[2, 3, 3]``. Vision: hidden 32, depth 4 with full attention in blocks 1
    and 3 (window attention elsewhere, window 112 px), patch 14, merge 2,
    projected to the text width. Attention is SDPA everywhere.

    ``text_config=`` / ``vision_config=`` dicts are merged into those defaults;
    ``tokenizer=`` takes the special-token ids and vocabulary size from another tokenizer; any other keyword
    is passed to :class:`Qwen2_5_VLConfig` unchanged.
    """
    ids = _special_token_ids(overrides.pop("tokenizer", None))
    text = _merged(_TEXT_DEFAULTS, overrides.pop("text_config", None), "text_config")
    text.setdefault("vocab_size", ids["vocab_size"])
    text.setdefault("bos_token_id", ids["pad"])
    text.setdefault("eos_token_id", ids["eos"])
    text.setdefault("pad_token_id", ids["pad"])
    vision = _merged(_VISION_DEFAULTS, overrides.pop("vision_config", None), "vision_config")
    vision.setdefault("out_hidden_size", text["hidden_size"])
    attn_implementation = overrides.pop("attn_implementation", "sdpa")
    kwargs: dict[str, Any] = {
        "image_token_id": ids["image"],
        "video_token_id": ids["video"],
        "vision_start_token_id": ids["vision_start"],
        "vision_end_token_id": ids["vision_end"],
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    kwargs.update(overrides)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **kwargs)
    config._attn_implementation = attn_implementation  # propagates to text and vision sub-configs
    _check_rope_sections(config)
    return config


def _check_rope_sections(config: Qwen2_5_VLConfig) -> None:
    """Fail early when the M-RoPE sections do not cover half the attention head dimension."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sections = (text.rope_parameters or {}).get("mrope_section")
    if sections is None or sum(sections) != head_dim // 2:
        raise ValueError(f"mrope_section {sections} must sum to head_dim/2 = {head_dim // 2}")


def _tiny_processor() -> QwenVLProcessor:
    """Processor for the tiny checkpoint: tiny tokenizer plus a small-budget PIL image processor."""
    tokenizer = make_tiny_qwen_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
        patch_size=_VISION_DEFAULTS["patch_size"],
        temporal_patch_size=_VISION_DEFAULTS["temporal_patch_size"],
        merge_size=_VISION_DEFAULTS["spatial_merge_size"],
    )
    return QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _generation_config(config: Qwen2_5_VLConfig | LlavaConfig) -> GenerationConfig:
    """Greedy generation config that stops on the text config's eos or pad token."""
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.pad_token_id],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build, randomly initialise (seeded) and save a tiny Qwen2.5-VL checkpoint to ``out_dir``.

    The directory holds fp32 safetensors weights, ``config.json``,
    ``generation_config.json`` and the processor files, and loads back offline
    with ``Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)`` and
    :func:`~glimpseprune.processing.load_processor`. ``overrides`` go to
    :func:`tiny_qwen2_5_vl_config`. Returns ``out_dir`` as a ``Path``.
    """
    config = tiny_qwen2_5_vl_config(**overrides)
    return _build_and_save(Qwen2_5_VLForConditionalGeneration, config, _tiny_processor(), out_dir, seed)


def _build_and_save(model_class: type, config: Any, processor: Any, out_dir: str | Path, seed: int) -> Path:
    """Seeded random init of ``model_class(config)`` in fp32, saved with a greedy generation config and
    ``processor`` to ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    model.generation_config = _generation_config(config)
    _check_not_degenerate(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_processor(processor, out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built tiny %s (%d parameters, seed %d) in %s", model_class.__name__, n_params, seed, out_dir)
    return out_dir


def _check_not_degenerate(model: torch.nn.Module) -> None:
    """Guard against an initialisation that leaves weight matrices all zero."""
    for name, param in model.named_parameters():
        if param.ndim >= 2 and not torch.count_nonzero(param):
            raise RuntimeError(f"tiny model weight {name} is all zeros after initialisation")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: smooth random colour blobs plus fine noise."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(1, height // 28), max(1, width // 28), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    noise = rng.integers(-16, 17, size=(height, width, 3))
    pixels = np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------- tiny LLaVA

# Every image becomes a TINY_LLAVA_IMAGE_SIZE square: 112 / 14 = 8 x 8 = 64 visual tokens.
TINY_LLAVA_IMAGE_SIZE = 112

# The Qwen test LLM's shape (hidden 64, 4 layers, 4 / 2 heads) as a Llama with plain 1-D RoPE.
_LLAVA_TEXT_DEFAULTS: dict[str, Any] = {
    **_TEXT_DEFAULTS, "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
}

_LLAVA_VISION_DEFAULTS: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "image_size": TINY_LLAVA_IMAGE_SIZE,
    "patch_size": 14,
    "projection_dim": 32,
    "initializer_range": 0.02,
}


def tiny_llava_config(**overrides: Any) -> LlavaConfig:
    """A tiny LLaVA-1.5-style config matching :func:`~glimpseprune.adapters.llava_processing.make_tiny_llava_tokenizer`.

    Text (Llama): hidden 64, 4 layers, 4 query / 2 key-value heads. Vision (CLIP): hidden 32, 4 blocks, 112 px
    images in 14 px patches (8 x 8 tokens). ``vision_feature_layer=-2`` and the "default" strategy (CLS dropped),
    as LLaVA-1.5. ``text_config=`` / ``vision_config=`` dicts are merged into the defaults; ``tokenizer=`` takes the
    special-token ids from another tokenizer; other keywords go to :class:`LlavaConfig`. SDPA everywhere.
    """
    tokenizer = overrides.pop("tokenizer", None) or make_tiny_llava_tokenizer()
    text = _merged(_LLAVA_TEXT_DEFAULTS, overrides.pop("text_config", None), "text_config")
    text.setdefault("vocab_size", len(tokenizer))
    for key, token in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")):
        text.setdefault(key, int(tokenizer.convert_tokens_to_ids(token)))
    vision = _merged(_LLAVA_VISION_DEFAULTS, overrides.pop("vision_config", None), "vision_config")
    attn_implementation = overrides.pop("attn_implementation", "sdpa")
    n_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    kwargs: dict[str, Any] = {
        "image_token_index": int(tokenizer.convert_tokens_to_ids("<image>")),
        "image_seq_length": n_tokens,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    kwargs.update(overrides)
    config = LlavaConfig(text_config=text, vision_config=vision, **kwargs)
    config._attn_implementation = attn_implementation
    return config


def _tiny_llava_processor(config: LlavaConfig, image_mode: str) -> LlavaProcessor:
    """LlavaProcessor with a PIL image processor: ``"pad"`` (expand to square, LLaVA-1.5's own preprocessing) or
    ``"crop"`` (shortest-edge resize + centre crop, as the llava-hf checkpoints)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    v = config.vision_config
    geometry = {"size": {"shortest_edge": v.image_size}, "crop_size": {"height": v.image_size, "width": v.image_size}}
    if image_mode == "pad":
        image_processor = LlavaImageProcessorPil(do_pad=True, **geometry)
    elif image_mode == "crop":
        image_processor = CLIPImageProcessorPil(**geometry)
    else:
        raise ValueError(f"image_mode must be 'pad' or 'crop', got {image_mode!r}")
    return LlavaProcessor(image_processor=image_processor, tokenizer=make_tiny_llava_tokenizer(),
                          patch_size=v.patch_size, vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)


def build_tiny_llava(out_dir: str | Path, seed: int = 0, image_mode: str = "pad", **overrides: Any) -> Path:
    """Build, randomly initialise (seeded) and save a tiny ``LlavaForConditionalGeneration`` to ``out_dir``.

    The directory (fp32 safetensors, ``config.json``, ``generation_config.json``, processor files) loads back
    offline with ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
    :func:`~glimpseprune.processing.load_processor`. ``image_mode`` picks the image preprocessing ("pad" or
    "crop"); ``overrides`` go to :func:`tiny_llava_config`. Returns ``out_dir`` as a ``Path``.
    """
    config = tiny_llava_config(**overrides)
    processor = _tiny_llava_processor(config, image_mode)
    return _build_and_save(LlavaForConditionalGeneration, config, processor, out_dir, seed)


# --------------------------------------------------------------------------- tiny Qwen3-VL

# Qwen3-VL's layout at the tiny test size: q_norm / k_norm attention, interleaved M-RoPE (sections t/h/w = 4/2/2 of
# head_dim / 2 = 8), a 6-layer LLM so that the default K = 3 falls after the DeepStack layers 0..2; a 4-block ViT
# of 16 px patches (32 px per merged token) without windows, DeepStack from blocks 0, 1, 2.
_QWEN3_TEXT_DEFAULTS: dict[str, Any] = {
    **_TEXT_DEFAULTS, "num_hidden_layers": 6, "head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2],
                        "mrope_interleaved": True},
}
_QWEN3_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
    "deepstack_visual_indexes": [0, 1, 2], "hidden_act": "gelu_pytorch_tanh", "initializer_range": 0.02,
}


def tiny_qwen3_vl_config(**overrides: Any) -> Qwen3VLConfig:
    """A tiny Qwen3-VL config (``model_type`` "qwen3_vl") matching the tiny Qwen tokenizer: text hidden 64,
    6 layers, 4 / 2 heads of 16; ViT hidden 32, 4 blocks, DeepStack from blocks 0-2. ``text_config=`` /
    ``vision_config=`` dicts are merged into the defaults; other keywords go to :class:`Qwen3VLConfig`. SDPA."""
    ids = _special_token_ids(overrides.pop("tokenizer", None))
    text = _merged(_QWEN3_TEXT_DEFAULTS, overrides.pop("text_config", None), "text_config")
    text.setdefault("vocab_size", ids["vocab_size"])
    for key, name in (("bos_token_id", "pad"), ("eos_token_id", "eos"), ("pad_token_id", "pad")):
        text.setdefault(key, ids[name])
    vision = _merged(_QWEN3_VISION_DEFAULTS, overrides.pop("vision_config", None), "vision_config")
    vision.setdefault("out_hidden_size", text["hidden_size"])
    attn_implementation = overrides.pop("attn_implementation", "sdpa")
    kwargs: dict[str, Any] = {"image_token_id": ids["image"], "video_token_id": ids["video"],
                              "vision_start_token_id": ids["vision_start"], "vision_end_token_id": ids["vision_end"],
                              "tie_word_embeddings": False, "dtype": "float32", **overrides}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **kwargs)
    config._attn_implementation = attn_implementation
    _check_rope_sections(config)
    return config


def build_tiny_qwen3_vl(out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build, randomly initialise (seeded) and save a tiny Qwen3-VL checkpoint (weights, configs, a torchvision-free
    processor with 16 px patches and a small video pixel budget) to ``out_dir``; it loads back offline with
    :func:`glimpseprune.load_base`."""
    from .adapters.qwen3_vl_processing import Qwen3VLImageProcessorOnly

    config = tiny_qwen3_vl_config(**overrides)
    v, tokenizer = config.vision_config, make_tiny_qwen_tokenizer()
    side = 2 * v.patch_size * v.spatial_merge_size  # pixel budget: 2x2 to 16x16 merged tokens
    image_processor = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=(8 * side) ** 2,
                                               patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                               merge_size=v.spatial_merge_size, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    processor = Qwen3VLImageProcessorOnly(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=tokenizer.chat_template)
    # video pixel budget over a whole clip (t * h * w): two 64 px frames to eight 256 px frames
    processor.video_config = {"size": {"shortest_edge": 2 * side * side, "longest_edge": 8 * (4 * side) ** 2}}
    return _build_and_save(Qwen3VLForConditionalGeneration, config, processor, out_dir, seed)


# ------------------------------------------------------------------- a whole tiny kit (`glimpseprune make-tiny`)

def build_tiny_qwen2_5_vl_serving(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL that vLLM's CPU attention accepts (text head_dim 64: hidden 128, 2 query / 1 key-value
    heads; ViT head_dim 32), initialised with std 0.1 so that greedy tokens vary and depend on what the model sees
    (at std 0.02 it repeats one token whatever the image)."""
    text = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
            "initializer_range": 0.1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]}}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "initializer_range": 0.1}
    return build_tiny_qwen2_5_vl(out_dir, seed=seed, text_config=text, vision_config=vision, initializer_range=0.1)


TINY_FAMILIES = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "llava": build_tiny_llava, "qwen3_vl": build_tiny_qwen3_vl}


def make_tiny(out_dir: str | Path, family: str = "qwen2_5_vl", seed: int = 0) -> dict[str, Path]:
    """A tiny RANDOM model of ``family`` (``out_dir/model``), an UNTRAINED glimpse module sized for it
    (``out_dir/module``) and a test image (``out_dir/example.png``): everything a smoke run needs, offline.

    Example: ``kit = make_tiny("tiny", "llava"); gp.load(kit["model"], module=kit["module"])``. Returns the three
    paths under the keys ``model``, ``module`` and ``image``.
    """
    from .api import load_base
    from .checkpoint import config_for_model, save_module
    from .modules.glimpse import GlimpseModule
    from .registry import get_adapter

    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny model of family {family!r}; known: {sorted(TINY_FAMILIES)}")
    out = Path(out_dir)
    model_dir = TINY_FAMILIES[family](out / "model", seed=seed)
    model, _ = load_base(model_dir)
    torch.manual_seed(seed)
    cfg = config_for_model(get_adapter(model).dims(model), base_model_name=str(model_dir),
                           vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64)
    module_dir = save_module(GlimpseModule(cfg), out / "module")
    image = out / "example.png"
    random_image(448, 336, seed=seed).save(image)
    return {"model": model_dir, "module": module_dir, "image": image}
