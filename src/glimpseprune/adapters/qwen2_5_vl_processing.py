"""Qwen2.5-VL's input processing (beside its adapter): the image-only processor, the chat format, the tiny
tokenizer and the processor assembled from a folder's files when ``AutoProcessor`` cannot build one.

* :class:`QwenVLProcessor` -- an image-only ``Qwen2_5_VLProcessor`` that works without a video processor (the stock
  video processor needs torchvision); Qwen3-VL's subclass is in :mod:`.qwen3_vl_processing`.
* :func:`make_tiny_qwen_tokenizer` -- a small byte-level BPE tokenizer trained in-process, carrying the Qwen2.5-VL
  special tokens and chat template (the LLaVA one in :mod:`.llava_processing` reuses its BPE trainer).
* :func:`build_fallback_processor` -- what :func:`glimpseprune.processing.load_processor` falls back to.

Family-agnostic loading, saving and batching (``load_processor``, ``build_inputs``, ``load_image``) stay in
:mod:`glimpseprune.processing`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from ..processing import DEFAULT_SYSTEM_PROMPT, _json_key, _read_chat_template

__all__ = [
    "CHAT_TEMPLATE",
    "QWEN_EXTRA_TOKENS",
    "QWEN_SPECIAL_TOKENS",
    "QwenVLProcessor",
    "build_fallback_processor",
    "make_tiny_qwen_tokenizer",
]

# Control tokens of Qwen2.5-VL, in the order the released vocabulary lists them.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added (never split) but not special: they survive ``skip_special_tokens``.
QWEN_EXTRA_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen2.5-VL chat format. Written with explicit whitespace control so that it
# renders identically whatever trim/lstrip settings the Jinja environment uses.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{{- render_content(message['content']) -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# Small original English corpus the tiny BPE tokenizer is trained on. It leans
# on the vocabulary of visual question answering (colours, shapes, counting).
_TINY_CORPUS = """
You are a helpful assistant. Look at the picture and answer the question in one word or a short sentence.
What colour is the ball? The ball is red. What colour is the car? The car is blue. Is the sky grey or blue?
The sky is bright blue with a few white clouds. How many dogs are there in the image? There are two dogs.
How many cats can you see? I can see three cats sitting on a wooden table near the window.
Describe the image in detail. A young woman is riding a bicycle along a quiet street in the morning.
Where is the cup? The cup is on the left side of the table, next to a green plate and a silver spoon.
What is the man holding? He is holding an umbrella because it is raining. Is it day or night? It is night.
What shape is the sign? The sign is a red octagon with white letters. What does the text on the sign say?
It says stop. Which animal is bigger, the horse or the sheep? The horse is bigger than the sheep.
Count the apples in the basket. There are five apples: three yellow apples and two green apples.
What is in the top right corner of the picture? A small orange kite is flying above the trees.
Is there a person in the photo? Yes, there is one person standing near the door of a brown house.
What kind of food is on the plate? There is a slice of pizza, some rice and a bowl of soup.
What time does the clock show? The clock shows ten past four. What number is written on the shirt?
The number is seven. Answer with yes or no. Is the water calm? No, the water has large waves.
What is the weather like? It is sunny and warm, and the grass in the park is very green.
Which object is closest to the camera? The black chair is closest, the lamp is far behind it.
What are the children doing? The children are playing football on a field of short grass.
Please read the label on the bottle. The label says fresh orange juice, one litre.
What material is the bridge made of? The bridge is made of old grey stone and dark metal.
Where was this photo taken? It looks like a kitchen, with a white fridge, an oven and a sink.
How many people are wearing hats? Four people are wearing hats, and one of them also wears glasses.
Is the train moving or stopped? The train is stopped at the station while passengers get on board.
What colour are the flowers in the vase? The flowers are pink, purple and yellow.
Explain what is happening in this scene. A chef is cutting vegetables on a board in a busy restaurant.
Find the square, the circle and the triangle. The square is black, the circle is white, the triangle is red.
Numbers and symbols also matter: 0 1 2 3 4 5 6 7 8 9 10 20 100, plus signs like + - * / = ( ) [ ] , . ? ! : ;
"""


class QwenVLProcessor(Qwen2_5_VLProcessor):
    """Image-only Qwen2.5-VL processor that does not require a video processor.

    The stock ``Qwen2_5_VLProcessor`` always builds a ``Qwen2VLVideoProcessor``,
    which needs torchvision. This subclass drops the video processor from the
    processor's attributes, so it can be built and saved with images and text
    only. ``videos=`` (lists of PIL frames or (F, H, W, 3) uint8 arrays, with
    ``video_metadata=`` giving each video's sampled ``fps``) still work: their
    frames go through the image processor and are stacked into temporal patches
    (:func:`glimpseprune.video.video_patches`), unless a video processor was
    supplied explicitly (it is then used but never saved).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs):
        # ``video_processor`` must stay out of the signature: ProcessorMixin derives
        # the list of saved sub-processors from the parameter names of ``__init__``.
        video_processor = kwargs.pop("video_processor", None)
        if kwargs:
            raise TypeError(f"QwenVLProcessor got unexpected keyword arguments: {sorted(kwargs)}")
        if tokenizer is None:
            raise ValueError("QwenVLProcessor needs a tokenizer")
        if image_processor is None:
            raise ValueError("QwenVLProcessor needs an image processor")
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = _token_id(tokenizer, self.image_token)
        self.video_token_id = _token_id(tokenizer, self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = video_processor

    def _process_videos(self, videos: Any, **kwargs: Any) -> Any:
        if self.video_processor is not None:
            return super()._process_videos(videos, **kwargs)
        from ..video import DEFAULT_FPS, video_patches

        videos = list(videos)
        metadata = kwargs.get("video_metadata") or [None] * len(videos)
        fps = [(m.get("fps") if m is not None else None) or DEFAULT_FPS for m in metadata]  # dict or VideoMetadata
        data = video_patches(self.image_processor, videos, fps)
        merge = self.image_processor.merge_size**2
        return data, [self.video_token * (int(np.prod(g)) // merge) for g in data["video_grid_thw"]]

    def to_dict(self) -> dict[str, Any]:
        # Record the stock class so environments with torchvision load the saved
        # directory with ``AutoProcessor`` as a regular Qwen2.5-VL checkpoint.
        output = super().to_dict()
        output["processor_class"] = Qwen2_5_VLProcessor.__name__
        return output


def _token_id(tokenizer: Any, token: str) -> int:
    """Return the id of ``token`` in ``tokenizer``, failing loudly if it is unknown."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", object()):
        raise ValueError(f"tokenizer has no token {token!r}; is it a Qwen2.5-VL tokenizer?")
    return int(token_id)


def _is_qwen3_vl(model_dir: Path) -> bool:
    """A Qwen3-VL folder: its model config says so, or (a processor saved alone) its processor config does."""
    return (str(_json_key(model_dir / "config.json", "model_type")).startswith("qwen3_vl")
            or _json_key(model_dir / "processor_config.json", "processor_class") == "Qwen3VLProcessor")


def build_fallback_processor(model_dir: Path) -> QwenVLProcessor:
    """Assemble a :class:`QwenVLProcessor` from the PIL image processor and the tokenizer in ``model_dir``."""
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a Qwen2.5-VL processor from {model_dir}: {err}") from err
    template = _read_chat_template(model_dir, tokenizer)
    if _is_qwen3_vl(model_dir):  # same image path; its own video path, saved as Qwen3-VL's
        from .qwen3_vl_processing import Qwen3VLImageProcessorOnly, read_video_config

        processor = Qwen3VLImageProcessorOnly(image_processor=image_processor, tokenizer=tokenizer,
                                              chat_template=template)
        processor.video_config = read_video_config(model_dir)
        return processor
    return QwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


# --------------------------------------------------------------------------- tiny tokenizer


def _byte_level_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Attach the Qwen2 normaliser and pre-tokeniser to ``tokenizer`` (in place) and return it."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer


def _train_byte_bpe(lines: Sequence[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on ``lines``; every byte is in the alphabet, so any text encodes."""
    tokenizer = _byte_level_pipeline(Tokenizer(BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = {token: int(idx) for token, idx in model["vocab"].items()}
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ", 1)) for pair in model["merges"]]
    return vocab, merges


def make_tiny_qwen_tokenizer(words: list[str] | None = None, *, bpe_vocab_size: int = 640) -> Qwen2Tokenizer:
    """Build a small offline Qwen2.5-VL-style tokenizer.

    A byte-level BPE (the Qwen2 pre-tokenisation, all 256 bytes in the base
    alphabet, so any text is tokenisable) is trained in-process on a built-in
    English corpus, plus ``words`` when given. The Qwen2.5-VL control tokens
    follow the BPE vocabulary as special added tokens; ``pad`` is
    ``<|endoftext|>``, ``eos`` is ``<|im_end|>`` and the chat template renders
    the Qwen2.5-VL chat format. Training is deterministic for a given input.
    """
    lines = [line for line in _TINY_CORPUS.strip().splitlines() if line]
    if words:
        lines.extend(str(word) for word in words)
    vocab, merges = _train_byte_bpe(lines, bpe_vocab_size)
    first_added = len(vocab)
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS):
        vocab[token] = first_added + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )
    control = [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]
    tokenizer.add_special_tokens({"extra_special_tokens": control})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_EXTRA_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    _check_added_ids(tokenizer, first_added)
    return tokenizer


def _check_added_ids(tokenizer: Qwen2Tokenizer, first_added: int) -> None:
    """Assert the control tokens kept the ids reserved for them right after the BPE vocabulary."""
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != first_added + offset:
            raise RuntimeError(f"tiny tokenizer: {token!r} got id {token_id}, expected {first_added + offset}")
