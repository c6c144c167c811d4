"""Processor loading, saving and batching for Qwen2.5-VL models.

This module owns everything between raw inputs (PIL images + question strings)
and the ``BatchFeature`` a Qwen2.5-VL model consumes:

* :class:`QwenVLProcessor` -- an image-only ``Qwen2_5_VLProcessor`` that works
  without a video processor (the stock video processor needs torchvision).
* :func:`load_processor` / :func:`save_processor` -- offline round trip of a
  processor directory (tokenizer, image processor, chat template).
* :func:`make_tiny_qwen_tokenizer` -- a small byte-level BPE tokenizer trained
  in-process, carrying the Qwen2.5-VL special tokens and chat template.
* :func:`build_inputs` / :func:`load_image` -- batch construction (left padded,
  with ``mm_token_type_ids`` for M-RoPE) and image file reading.

LLaVA processors load and batch through the same functions; the LLaVA chat
format, tiny tokenizer and box -> token masks live in
:mod:`glimpseprune.processing_llava`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, Qwen2_5_VLProcessor, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_EXTRA_TOKENS",
    "QwenVLProcessor",
    "build_inputs",
    "build_messages",
    "load_image",
    "load_processor",
    "make_tiny_qwen_tokenizer",
    "save_processor",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

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

CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

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
    processor's attributes, so it can be built, saved and called with images
    and text only. Passing ``videos=`` raises a clear error unless a video
    processor was supplied explicitly (it is then used but never saved).
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
        if self.video_processor is None:
            raise ValueError(
                "QwenVLProcessor has no video processor (the stock one needs torchvision); "
                "pass video_processor=... when building it to process videos"
            )
        return super()._process_videos(videos, **kwargs)

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


def _build_fallback_processor(model_dir: Path) -> QwenVLProcessor:
    """Assemble a :class:`QwenVLProcessor` from the PIL image processor and the tokenizer in ``model_dir``."""
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a Qwen2.5-VL processor from {model_dir}: {err}") from err
    return QwenVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_read_chat_template(model_dir, tokenizer),
    )


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
        processor = _build_fallback_processor(model_dir)
    processor.tokenizer.padding_side = "left"
    return processor


def save_processor(processor: ProcessorMixin, out_dir: str | Path) -> Path:
    """Write everything :func:`load_processor` needs into ``out_dir`` and return it.

    Besides the processor's own files (``processor_config.json``, tokenizer,
    chat template) the image processor is saved on its own as
    ``preprocessor_config.json``, which is what loaders without the processor
    class read.
    """
    if not _is_usable_processor(processor):
        raise ValueError(f"save_processor expects an image+text processor, got {type(processor).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(out_dir))  # processor_config.json, tokenizer files, chat template
    processor.image_processor.save_pretrained(str(out_dir))  # preprocessor_config.json
    template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    template_file = out_dir / CHAT_TEMPLATE_FILE
    if isinstance(template, str) and not template_file.is_file():
        template_file.write_text(template, encoding="utf-8")
    logger.info("saved processor to %s", out_dir)
    return out_dir


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


# --------------------------------------------------------------------------- inputs


def load_image(path: str | Path) -> Image.Image:
    """Open an image file with PIL and return it as RGB; ``ValueError`` naming ``path`` if unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f"cannot read image file {path}: {err}") from err


def build_messages(num_images: int, question: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for one sample: ``num_images`` image slots followed by ``question``."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def _check_batch(images: Sequence[Sequence[Image.Image]], questions: Sequence[str]) -> None:
    """Validate the shapes and types of a :func:`build_inputs` batch."""
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not a single string")
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} image lists for {len(questions)} questions; they must match")
    if not questions:
        raise ValueError("build_inputs needs at least one sample")
    for index, sample in enumerate(images):
        if isinstance(sample, Image.Image):
            raise TypeError(f"images[{index}] is a single image; wrap it in a list (one list of images per sample)")
        for image in sample:
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{index}] holds a {type(image).__name__}, expected PIL.Image.Image")


def build_inputs(
    processor: ProcessorMixin,
    images: Sequence[Sequence[Image.Image]],
    questions: Sequence[str],
    *,
    system_prompt: str | None = None,
    return_tensors: str = "pt",
) -> BatchFeature:
    """Tokenise a batch of (images, question) samples into model inputs.

    ``images[i]`` is the (possibly empty) list of PIL images of sample ``i``;
    they are placed before the question in the user turn. The batch is left
    padded and holds ``input_ids``, ``attention_mask``, ``mm_token_type_ids``
    (M-RoPE processors only) and, when any sample has an image,
    ``pixel_values`` (and ``image_grid_thw`` for Qwen2.5-VL).
    Images are resized by the processor within its ``min_pixels``/``max_pixels``.
    """
    _check_batch(images, questions)
    prompts = [
        processor.apply_chat_template(
            build_messages(len(sample), question, system_prompt), add_generation_prompt=True, tokenize=False
        )
        for sample, question in zip(images, questions, strict=True)
    ]
    flat_images = [image if image.mode == "RGB" else image.convert("RGB") for sample in images for image in sample]
    # M-RoPE models (Qwen2.5-VL) need mm_token_type_ids; others (LLaVA) reject them in generate
    needs_types = "mm_token_type_ids" in getattr(processor, "model_input_names", ())
    batch = processor(
        text=prompts,
        images=flat_images or None,
        padding=True,
        padding_side="left",
        return_mm_token_type_ids=needs_types,
        return_tensors=return_tensors,
    )
    if needs_types and "mm_token_type_ids" not in batch:
        raise RuntimeError(f"{type(processor).__name__} did not return mm_token_type_ids; M-RoPE would be wrong")
    return batch
