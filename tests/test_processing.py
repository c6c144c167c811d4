"""Tests for glimpseprune.processing and the tiny-model fixtures in glimpseprune.testing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TORCHVISION
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from glimpseprune.adapters.qwen2_5_vl_processing import (
    QWEN_EXTRA_TOKENS,
    QWEN_SPECIAL_TOKENS,
    QwenVLProcessor,
    make_tiny_qwen_tokenizer,
)
from glimpseprune.processing import build_inputs, load_image, load_processor
from glimpseprune.testing import build_tiny_qwen2_5_vl, random_image, tiny_qwen2_5_vl_config

QUESTIONS = ["What colour is the ball?", "How many dogs are there?", "Describe the weather."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> ProcessorMixin:
    return load_processor(tiny_dir)


@pytest.fixture(scope="module")
def batch_images() -> list[list]:
    return [
        [random_image(224, 224, seed=1)],
        [random_image(112, 168, seed=2), random_image(224, 112, seed=3)],
        [],
    ]


@pytest.fixture(scope="module")
def batch(processor: ProcessorMixin, batch_images: list[list]):
    return build_inputs(processor, batch_images, QUESTIONS)


def test_tiny_tokenizer_special_tokens() -> None:
    tokenizer = make_tiny_qwen_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert len(tokenizer) == ids[-1] + 1
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    encoded = tokenizer("<|im_start|>user\nplain ASCII ~`{}| and é<|im_end|>").input_ids
    assert encoded[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert encoded[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\nplain ASCII ~`{}| and é"
    assert make_tiny_qwen_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_chat_template(processor: ProcessorMixin) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    rendered = processor.apply_chat_template(conversation, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_round_trip(tiny_dir: Path, model, processor) -> None:
    assert isinstance(processor, Qwen2_5_VLProcessor if TORCHVISION else QwenVLProcessor)
    assert processor.tokenizer.padding_side == "left"
    assert processor.image_processor.size.shortest_edge == 56 * 56
    assert processor.image_processor.size.longest_edge == 448 * 448
    tokenizer = processor.tokenizer
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32
    assert (tiny_dir / "model.safetensors").is_file()
    assert all(p.abs().sum() > 0 for p in model.parameters() if p.ndim >= 2)


def test_config_shape() -> None:
    config = tiny_qwen2_5_vl_config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64,
        4,
        4,
        2,
    )
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert vision.out_hidden_size == text.hidden_size
    assert list(vision.fullatt_block_indexes) == [1, 3]
    assert text._attn_implementation == "sdpa" and vision._attn_implementation == "sdpa"
    assert tiny_qwen2_5_vl_config(text_config={"num_hidden_layers": 2}).text_config.num_hidden_layers == 2


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = load_file(build_tiny_qwen2_5_vl(tmp_path / "again", seed=0) / "model.safetensors")
    first = load_file(tiny_dir / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[name], first[name]) for name in first)


def test_build_inputs_left_padding_and_image_tokens(processor, batch, batch_images) -> None:
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert key in batch, key
    input_ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    assert input_ids.shape == mask.shape == types.shape and input_ids.shape[0] == 3

    # Left padding: each mask row is zeros then ones, and the last column is all ones.
    assert torch.all(mask[:, 1:] >= mask[:, :-1])
    assert torch.all(mask[:, -1] == 1)
    assert torch.all(input_ids[mask == 0] == processor.tokenizer.pad_token_id)
    assert (mask == 0).any(), "samples have different lengths, so some padding is expected"

    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size
    grids = batch["image_grid_thw"]
    assert grids.shape == (3, 3)
    per_image = (grids.prod(dim=-1) // merge**2).tolist()
    assert all(4 <= n <= 256 for n in per_image)
    offset = 0
    for row, sample in enumerate(batch_images):
        expected = sum(per_image[offset : offset + len(sample)])
        offset += len(sample)
        assert int((input_ids[row] == image_id).sum()) == expected
    assert torch.equal(types, (input_ids == image_id).long().to(types.dtype))
    assert batch["pixel_values"].shape[0] == int(grids.prod(dim=-1).sum())


def test_build_inputs_text_only(processor) -> None:
    batch = build_inputs(processor, [[], []], ["Hello there", "What is the weather like today?"])
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    assert int(batch["mm_token_type_ids"].sum()) == 0


def test_build_inputs_rejects_mismatched_batch(processor) -> None:
    with pytest.raises(ValueError, match="2 image lists for 1 questions"):
        build_inputs(processor, [[], []], ["one question"])


def test_generate_runs(model, processor, batch) -> None:
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    assert output.shape[0] == 3
    assert prompt_len < output.shape[1] <= prompt_len + 4
    assert torch.equal(output[:, :prompt_len], batch["input_ids"])
    texts = processor.batch_decode(output[:, prompt_len:], skip_special_tokens=True)
    assert len(texts) == 3
    # The random-init model is not degenerate: different prompts start differently.
    assert len(set(output[:, prompt_len].tolist())) > 1


def test_load_image(tmp_path: Path) -> None:
    path = tmp_path / "picture.png"
    random_image(40, 30, seed=5).convert("L").save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_load_image_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.jpg"
    with pytest.raises(ValueError, match="does_not_exist.jpg") as info:
        load_image(missing)
    assert str(missing) in str(info.value)


def test_load_image_not_an_image(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not a picture")
    with pytest.raises(ValueError, match="cannot read image file") as info:
        load_image(bogus)
    assert str(bogus) in str(info.value)


def test_qwen_processor_refuses_a_tokenizer_without_its_tokens(processor) -> None:
    # a tokenizer with an unk token maps an unknown token to unk rather than None: still refused
    from glimpseprune.adapters.llava_processing import make_tiny_llava_tokenizer

    with pytest.raises(ValueError, match="tokenizer has no token '<\\|image_pad\\|>'"):
        QwenVLProcessor(image_processor=processor.image_processor, tokenizer=make_tiny_llava_tokenizer())


def test_qwen_processor_refuses_unknown_keywords(processor) -> None:
    with pytest.raises(TypeError, match="unexpected keyword arguments: \\['feature_extractor'\\]"):
        QwenVLProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, feature_extractor=1)


def test_fallback_processor_recognises_every_qwen3_vl_folder(tiny_dir: Path, tmp_path: Path) -> None:
    """A Qwen3-VL-MoE model config (model_type "qwen3_vl_moe") or a processor config naming Qwen3VLProcessor makes the
    fallback the Qwen3-VL processor; the Qwen2.5-VL folder itself keeps the Qwen2.5-VL one."""
    import json
    import shutil

    from glimpseprune.adapters.qwen2_5_vl_processing import build_fallback_processor
    from glimpseprune.adapters.qwen3_vl_processing import Qwen3VLImageProcessorOnly

    assert not isinstance(build_fallback_processor(tiny_dir), Qwen3VLImageProcessorOnly)
    for name, key, value in [("config.json", "model_type", "qwen3_vl_moe"),
                             ("processor_config.json", "processor_class", "Qwen3VLProcessor")]:
        folder = tmp_path / key
        shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, key: value}))
        assert isinstance(build_fallback_processor(folder), Qwen3VLImageProcessorOnly), name


def test_load_processor_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_processor(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_processor(empty)


def test_random_image_is_deterministic() -> None:
    first, second = random_image(64, 48, seed=7), random_image(64, 48, seed=7)
    assert first.mode == "RGB" and first.size == (64, 48)
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != random_image(64, 48, seed=8).tobytes()


def test_left_padded_batch_matches_single_samples(model, processor, batch, batch_images) -> None:
    # Correct M-RoPE positions under left padding: each row's next-token logits equal the unbatched ones.
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row, (images, question) in enumerate(zip(batch_images, QUESTIONS, strict=True)):
            single = model(**build_inputs(processor, [images], [question])).logits[:, -1]
            torch.testing.assert_close(batched[row], single[0], atol=1e-4, rtol=1e-4)
