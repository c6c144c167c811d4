"""Video input on the tiny random Qwen3-VL (the Qwen2.5-VL counterpart is tests/test_video.py).

* Inputs: ours == stock inputs built by hand (the prompt with per-frame-group ``<t seconds>`` text, written out; the
  stock ``patchify`` layout at 16 px) and == what the installed ``Qwen3VLProcessor``'s own code builds from the same
  frames; frame sizes by hand from the stock video ``smart_resize`` rule; the video config round trip.
* Model: encode == what the stock forward feeds its text model (embeddings, DeepStack rows of images and videos
  merged, visual mask, positions from ``get_rope_index``); keep-all == stock (logits 1e-5, greedy tokens); every
  registered method == the stock model with the dropped keys masked; K inside the DeepStack layers == masking;
  mixed image / video / text-only batches == one by one.
* Bad input refused before the model runs, as for Qwen2.5-VL; a video file through PyAV.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TORCHVISION, make_images, random_module
from oracle import (
    dropped_positions,
    masking,
    oracle_model,
    stock_generate,
    visual_positions,
)
from test_video import (
    _method,
    _random_keep,
    check_every_method_on_video,
    check_mixed_batch_equals_single,
    needs_av,
    stock_patches,
    write_mp4,
)
from transformers import BatchFeature, Qwen3VLProcessor

import glimpseprune as gp
from glimpseprune.adapters.qwen3_vl_processing import VIDEO_CONFIG_FILE, frame_size, video_sizing
from glimpseprune.processing import DEFAULT_SYSTEM_PROMPT, build_inputs, build_messages, load_processor, save_processor
from glimpseprune.runtime.engine import prefill
from glimpseprune.testing import random_image
from glimpseprune.video import Video

N_NEW = 6
W, H = 128, 96  # multiples of 32 px: kept as they are; 8 x 6 patches -> 4 x 3 merged tokens per frame-group
IMG = [(128, 128)]  # 4 x 4 merged tokens
TINY_SIZE = {"shortest_edge": 2 * 64 * 64, "longest_edge": 8 * 256 * 256}  # testing.build_tiny_qwen3_vl's budget


def frames(n, seed=0, size=(W, H)):
    return [random_image(*size, seed=seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def q3(q3_dir):
    return gp.load_base(q3_dir)


@pytest.fixture(scope="module")
def model(q3):
    return q3[0]


@pytest.fixture(scope="module")
def processor(q3):
    return q3[1]


@pytest.fixture(scope="module")
def module(model):
    return random_module(model)


def vis_ids(model):
    return [model.config.image_token_id, model.config.video_token_id]


# --------------------------------------------------------------------------- stock inputs, built by hand


def stock_inputs(processor, model, clip, question, times) -> dict:
    """The stock Qwen3-VL inputs of one video sample, written out as Qwen3-VL was trained (its processor in
    transformers 4.57 and again from 5.25): the chat template's <|vision_start|><|video_pad|><|vision_end|> replaced
    whole by, per frame-group, its time ``times[g]`` (text), <|vision_start|>, its 4 x 3 <|video_pad|> and
    <|vision_end|> (no pair around all the groups); 16 px patches in the stock patchify layout; no
    second_per_grid_ts."""
    tok = processor.tokenizer
    t, gh, gw = -(-len(clip) // 2), clip[0].size[1] // 16, clip[0].size[0] // 16
    assert len(times) == t
    groups = "".join(f"<{s} seconds><|vision_start|>{'<|video_pad|>' * (gh * gw // 4)}<|vision_end|>" for s in times)
    text = (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{groups}"
            f"{question}<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([tok(text)["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == model.config.video_token_id).long() * 2,
            "pixel_values_videos": stock_patches(clip, processor, patch=16),
            "video_grid_thw": torch.tensor([[t, gh, gw]])}


# (frames, fps, the frame-group times as the stock processor writes them: mean of first and last frame, 1 decimal)
CLIPS = [(4, 2.0, ["0.2", "1.2"]), (5, 2.0, ["0.2", "1.2", "2.0"]), (4, 1.0, ["0.5", "2.5"]),
         (6, 0.5, ["1.0", "5.0", "9.0"])]


@pytest.mark.parametrize(("n_frames", "fps", "times"), CLIPS, ids=["4f-2fps", "5f-padded", "4f-1fps", "6f-0.5fps"])
def test_inputs_equal_hand_built_stock_inputs(processor, model, n_frames, fps, times):
    clip = frames(n_frames)
    ours = build_inputs(processor, [[]], ["What happens?"], videos=[Video(tuple(clip), fps=fps)])
    ref = stock_inputs(processor, model, clip, "What happens?", times)
    assert set(ours) == set(ref)  # no second_per_grid_ts: Qwen3-VL's time is in the text
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-5, rtol=0)


class _StandInVideoProcessor:
    """Stands in for the torchvision Qwen3VLVideoProcessor: returns given patches and grids, and the metadata as the
    stock one returns it with do_sample_frames=False (frames_indices 0..n-1)."""

    merge_size, temporal_patch_size = 2, 2

    def __init__(self, data):
        self.data = data

    def __call__(self, videos, video_metadata=None, **kwargs):
        for m, v in zip(video_metadata, videos, strict=True):
            m.frames_indices = list(range(len(v)))
        return BatchFeature({**self.data, "video_metadata": video_metadata})


def stock_processor(processor, video_data) -> Qwen3VLProcessor:
    """The installed ``Qwen3VLProcessor`` (its placeholder expansion, timestamps, tokenisation and token types),
    around our tokenizer, image processor and chat template and a stand-in video processor (no torchvision here)."""
    stock = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    stock.tokenizer, stock.image_processor, stock.chat_template = (processor.tokenizer, processor.image_processor,
                                                                   processor.chat_template)
    stock.video_processor = _StandInVideoProcessor(video_data)
    for name in ("image_token", "video_token", "image_token_id", "video_token_id"):
        setattr(stock, name, getattr(processor, name))
    stock.vision_start_token, stock.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    return stock


def test_prompt_equals_the_stock_processor(processor):
    """An image + video sample, a video at 1 fps and a text-only sample: our input_ids and token types == the stock
    Qwen3VLProcessor's on the same chat-template text (its videos' patches and grids given to it)."""
    from transformers.video_utils import VideoMetadata

    images, clips = make_images(IMG, seed=1), [Video(tuple(frames(5, seed=2)), 2.0), Video(tuple(frames(4)), 1.0)]
    ours = build_inputs(processor, [images, [], []], ["a?", "b?", "c?"], videos=[clips[0], clips[1], None])
    prompts = [processor.apply_chat_template(build_messages(n, q, num_videos=v),
                                             add_generation_prompt=True, tokenize=False)
               for n, q, v in ((1, "a?", 1), (0, "b?", 1), (0, "c?", 0))]
    stock = stock_processor(processor, {k: ours[k] for k in ("pixel_values_videos", "video_grid_thw")})
    if "get_text_with_replacements" not in Qwen3VLProcessor.__dict__:
        # transformers 5.0 - 5.24 expand only the <|video_pad|> and keep the template's pair around all the groups,
        # a prompt Qwen3-VL was not trained on (4.57 and 5.25+ replace the pair too): give those the bare token,
        # which they (like 4.57) expand into the trained form
        prompts = [p.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>") for p in prompts]
    ref = stock(text=prompts, images=images, videos=[list(c.frames) for c in clips],
                video_metadata=[VideoMetadata(total_num_frames=len(c.frames), fps=c.fps) for c in clips],
                padding=True, padding_side="left", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    text = processor.tokenizer.decode(ours["input_ids"][1][ours["attention_mask"][1].bool()])
    assert "user\n<0.5 seconds><|vision_start|><|video_pad|>" in text and text.count("seconds>") == 2
    assert text.count("<|vision_start|>") == text.count("<|vision_end|>") == 2  # one pair per frame-group, no more


def test_build_inputs_gives_the_stock_processor_the_trained_prompt_on_every_transformers(processor):
    """Where torchvision exists, load_processor returns transformers' own Qwen3VLProcessor, which before 5.25 kept
    the template's pair around all the frame-groups: build_inputs hands it the prompt from which every version
    writes the trained form, equal to ours."""
    images, clips = make_images(IMG, seed=1), [Video(tuple(frames(5, seed=2)), 2.0), Video(tuple(frames(4)), 1.0)]
    args = ([images, [], []], ["a?", "b?", "c?"])
    ours = build_inputs(processor, *args, videos=[clips[0], clips[1], None])
    stock = stock_processor(processor, {k: ours[k] for k in ("pixel_values_videos", "video_grid_thw")})
    theirs = build_inputs(stock, *args, videos=[clips[0], clips[1], None])  # (this stand-in asks no token types)
    for key in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    text = processor.tokenizer.decode(theirs["input_ids"][1][theirs["attention_mask"][1].bool()])
    assert text.count("<|vision_start|>") == text.count("seconds>") == 2


def test_replacement_offsets_point_into_the_text_as_given(processor):
    """With the template wrapper replaced whole, the offsets transformers returns for each placeholder still name
    the text given: the video's span covers its whole wrapper, and an image after it is where it was."""
    wrapper, image = "<|vision_start|><|video_pad|><|vision_end|>", "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"a {wrapper} b {image} c {wrapper} d", f"{image} only"]
    out = processor(text=texts, images=make_images(IMG, seed=1) * 2, videos=[frames(4), frames(2, seed=3)],
                    video_metadata=[{"fps": 2.0}, {"fps": 1.0}], return_text_replacement_offsets=True)
    # pairs: the image's own, then one per frame-group (4 frames: 2 groups; 2 frames: 1), none around a video
    for given, offsets, ids, pairs in zip(texts, out["text_replacement_offsets"], out["input_ids"], (4, 1),
                                          strict=True):
        for entry in offsets:
            a, b = entry["span"]
            assert given[a:b] == entry["text"], (given, entry)
        decoded = processor.tokenizer.decode(ids)
        assert decoded.count("<|vision_start|>") == decoded.count("<|vision_end|>") == pairs
    assert [e["type"] for e in out["text_replacement_offsets"][0]] == ["video", "image", "video"]
    assert [e["text"] for e in out["text_replacement_offsets"][0]] == [wrapper, "<|image_pad|>", wrapper]


def test_timestamps_hand_computed():
    """Frame i of a clip sampled at fps is at i / fps; a group's time is the mean of its first and last frame."""
    import doctest

    import glimpseprune.adapters.qwen3_vl_processing as q3p

    assert q3p.group_times(range(4), 2.0, 2) == [0.25, 1.25]
    assert q3p.group_times([0, 3, 6, 9, 12], 3.0, 2) == [0.5, 2.5, 4.0]  # sampled indices of a 3 fps file
    assert q3p.video_placeholder([0.25, 10.0], 1, "P") == "<0.2 seconds><|vision_start|>P<|vision_end|><10.0 seconds>" \
        "<|vision_start|>P<|vision_end|>"
    assert doctest.testmod(q3p, verbose=False).failed == 0


def test_frame_sizes_follow_the_stock_video_resize(processor):
    """smart_resize over the whole clip, by hand, on the tiny budget (8192 .. 524288 pixels over t_bar * h * w)."""
    cfg, args = {"size": TINY_SIZE}, (16, 2, 2)
    assert frame_size(4, 200, 300, cfg, *args) == (192, 288)  # round to 32 px: 6.25 -> 6, 9.375 -> 9
    # 16 x 480 x 640 = 4915200 > 524288: beta = sqrt(9.375) = 3.06; floor(480 / beta / 32) = 4, floor(6.53) = 6
    assert frame_size(16, 480, 640, cfg, *args) == (128, 192)
    # 2 x 32 x 64 = 4096 < 8192: beta = sqrt(8192 / 3840) = 1.46; ceil(40 * beta / 32) = 2, ceil(48 * beta / 32) = 3
    assert frame_size(2, 40, 48, cfg, *args) == (64, 96)
    assert frame_size(1, 64, 64, cfg, *args) == (64, 64)  # one frame: sized as the two it is padded to
    # per-frame cap: min(4 tokens * 32^2, 524288 // 16) = 4096, floored at 1.05 * 8192 = 8601 px per frame; 16 frames:
    # beta = sqrt(4915200 / 137616) = 5.98; floor(480 / beta / 32) = 2, floor(640 / beta / 32) = 3
    capped = {"size": TINY_SIZE, "cap_pixels_per_frame": True, "max_video_tokens": 4}
    assert frame_size(16, 480, 640, capped, *args) == (64, 96)
    # the cap binding: 16 tokens * 32^2 = 16384 px per frame (not 16 * 32), 16 frames: smart_resize to 262144 px
    assert frame_size(16, 480, 640, {**capped, "max_video_tokens": 16}, *args) == (96, 128)
    # the floor binding: 2 x 84 x 92 = 15456 px fits 2 * 8601 = 17202 (not 2 * 8192 = 16384): the 96 x 96 rounding is
    # over budget, so beta = sqrt(15456 / 17202) = 0.948; floor(84 / 0.948 / 32) = 2, floor(92 / 0.948 / 32) = 3
    assert frame_size(2, 84, 92, {**capped, "max_video_tokens": 1}, *args) == (64, 96)
    inputs = build_inputs(processor, [[]], ["Q?"], videos=[frames(4, size=(300, 200))])
    assert inputs["video_grid_thw"].tolist() == [[2, 12, 18]]  # resized to 288 x 192 px
    for bad in [{"longest_edge": 10}, {"shortest_edge": 0, "longest_edge": 10},
                {"shortest_edge": 11, "longest_edge": 10}]:
        with pytest.raises(ValueError, match="shortest_edge"):
            video_sizing({"size": bad})
    assert video_sizing({"size": {"shortest_edge": 10, "longest_edge": 10}})["size"]["longest_edge"] == 10


def _video_size(processor) -> dict:
    """The clip pixel bounds a loaded processor will use: ours keeps the config (``video_config``), transformers'
    own (torchvision installed) its video processor's ``size``."""
    if hasattr(processor, "video_config"):
        return video_sizing(processor.video_config)["size"]
    size = processor.video_processor.size
    return {"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge}


def test_video_config_round_trip(q3_dir, processor, tmp_path):
    """The tiny checkpoint holds its video budget as a stock video_preprocessor_config.json; loading keeps it, saving
    writes it back as that file, so a folder saved where torchvision is installed keeps its budget where it is not
    (the fallback reads only that file or processor_config.json's ``video_processor``)."""
    from glimpseprune.adapters.qwen2_5_vl_processing import build_fallback_processor

    saved = json.loads((q3_dir / VIDEO_CONFIG_FILE).read_text())
    assert saved["video_processor_type"] == "Qwen3VLVideoProcessor" and saved["size"] == TINY_SIZE
    assert saved["patch_size"] == 16 and saved["temporal_patch_size"] == 2 and saved["merge_size"] == 2
    assert _video_size(processor) == TINY_SIZE
    save_processor(processor, tmp_path)
    again = json.loads((tmp_path / VIDEO_CONFIG_FILE).read_text())
    assert again["size"] == TINY_SIZE and (TORCHVISION or again == saved)
    assert _video_size(load_processor(tmp_path)) == TINY_SIZE
    assert video_sizing(build_fallback_processor(tmp_path).video_config)["size"] == TINY_SIZE  # the other machine
    (tmp_path / VIDEO_CONFIG_FILE).unlink()
    assert video_sizing(build_fallback_processor(tmp_path).video_config)["size"] == (
        TINY_SIZE if "video_processor" in json.loads((tmp_path / "processor_config.json").read_text())
        else {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32})


def test_video_config_nested_in_processor_config(tmp_path):
    """transformers 5's save_pretrained nests the video processor's config in processor_config.json; without a
    video_preprocessor_config.json the fallback reads it from there (and checks it)."""
    from glimpseprune.adapters.qwen3_vl_processing import read_video_config

    assert read_video_config(tmp_path) == {}
    size = {"shortest_edge": 4096, "longest_edge": 65536}
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Qwen3VLProcessor", "video_processor": {"size": size, "merge_size": 2}}))
    assert read_video_config(tmp_path)["size"] == size
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"size": {"longest_edge": 9}}}))
    with pytest.raises(ValueError, match="shortest_edge"):
        read_video_config(tmp_path)
    (tmp_path / VIDEO_CONFIG_FILE).write_text(json.dumps({"size": size}))  # the file on its own wins
    assert read_video_config(tmp_path)["size"] == size


# --------------------------------------------------------------------------- encode == the stock forward


def _capture_llm_inputs(model):
    seen = {}

    def hook(_mod, _args, kwargs):
        seen.update(kwargs)

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_encode_matches_stock(model, processor):
    """Image + video, video, text-only: embeddings, merged DeepStack rows, visual mask and positions == what the stock
    forward feeds its text model; the grids contract (one (h, w) per image and per frame-group)."""
    inputs = build_inputs(processor, [make_images(IMG), [], []], ["a?", "b?", "c?"],
                          videos=[frames(4, seed=1), frames(5, seed=7), None])
    seen, h = _capture_llm_inputs(model)
    try:
        with torch.no_grad():
            model(**inputs)
            enc = gp.get_adapter(model).encode(model, inputs)
    finally:
        h.remove()
    torch.testing.assert_close(enc.embeds, seen["inputs_embeds"], atol=0, rtol=0)
    assert torch.equal(enc.vis_mask, seen["visual_pos_masks"])
    assert len(enc.visual_adds) == len(seen["deepstack_visual_embeds"]) == 3
    for ours, ref in zip(enc.visual_adds, seen["deepstack_visual_embeds"], strict=True):
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(enc.positions[:, valid], seen["position_ids"][:, valid])
    assert enc.grids == [(4, 4)] + [(3, 4)] * 2 + [(3, 4)] * 3
    assert enc.image_owner == [0, 0, 0, 1, 1, 1] and enc.grid_video == [-1, 0, 0, 1, 1, 1]
    assert enc.grid_groups == [0, 1, 1, 2, 2, 2] and enc.n_vis == [16 + 24, 36, 0]


def test_video_taps_and_group_positions(model, processor):
    """Taps of a video are the tapped blocks' outputs, 2x2-merge means, frame-group after frame-group; each group
    sits like a one-frame image after its timestamp text: one t, rows and columns from the same start."""
    inputs = build_inputs(processor, [[]], ["Q?"], videos=[frames(6, seed=3)])
    blocks = {}
    hook = model.model.visual.blocks[2].register_forward_hook(lambda _m, _a, out: blocks.__setitem__(2, out))
    try:
        with torch.no_grad():
            enc = gp.get_adapter(model).encode(model, inputs, taps=(2,))
    finally:
        hook.remove()
    torch.testing.assert_close(enc.vision_feats[0], blocks[2].view(-1, 4, 32).mean(dim=1), atol=0, rtol=0)
    pos = enc.positions[:, 0, enc.vis_mask[0]].view(3, 3, 3, 4)  # (P, group, h, w)
    starts = pos[0, :, 0, 0]
    assert bool((starts[1:] > starts[:-1] + 4).all())  # later groups start after the earlier ones and their text
    for g, s in enumerate(starts.tolist()):
        assert bool((pos[0, g] == s).all())
        assert torch.equal(pos[1, g], s + torch.arange(3)[:, None].expand(3, 4))
        assert torch.equal(pos[2, g], s + torch.arange(4)[None].expand(3, 4))


# --------------------------------------------------------------------------- equivalence with the stock model


@pytest.mark.parametrize(("n_frames", "times"), [(4, ["0.2", "1.2"]), (5, ["0.2", "1.2", "2.0"])])
def test_keep_all_equals_stock(processor, model, module, n_frames, times):
    clip = frames(n_frames, seed=3)
    ref_inputs = stock_inputs(processor, model, clip, "What colour is the square?", times)
    ours = build_inputs(processor, [[]], ["What colour is the square?"], videos=[clip])
    with torch.no_grad():
        ref = model(**ref_inputs).logits
        for method in (gp.get_method("full")(), gp.make_method("glimpse", module, gp.SelectionConfig(threshold=0.0))):
            pre = prefill(model, gp.get_adapter(model), method, ours, all_logits=True)
            assert pre.n_kept == pre.n_vis == [len(times) * 12]
            torch.testing.assert_close(pre.logits, ref, atol=1e-5, rtol=0)
    stock_tokens, _ = stock_generate(model, ref_inputs, N_NEW, pad_token_id=processor.tokenizer.pad_token_id)
    out = gp.apply(model, "full", processor=processor).generate(videos=[clip], questions=["What colour is the square?"],
                                                                max_new_tokens=N_NEW)
    assert torch.equal(out.sequences, stock_tokens)


@pytest.fixture(scope="module")
def video_batch(processor):
    """A video sample and an image + video sample (the oracle's batch)."""
    return build_inputs(processor, [[], make_images(IMG, seed=5)], ["What happens?", "Which one moves?"],
                        videos=[frames(4, seed=1), frames(5, seed=20)])


@pytest.fixture(scope="module")
def oracle(q3_dir):
    return oracle_model(q3_dir)


@pytest.mark.parametrize("name", gp.list_methods())
def test_every_method_on_video_equals_masked_stock(model, processor, module, video_batch, oracle, name):
    """Every registered method runs on Qwen3-VL video samples within its budget, and its compacted run == the stock
    model hiding the same dropped keys from the same layers (DeepStack rows leave with their tokens)."""
    n_vis = visual_positions(video_batch, vis_ids(model)).sum(1).tolist()
    assert n_vis == [24, 16 + 36]
    keep = _random_keep(n_vis) if name in ("mask", "oracle") else None
    out = check_every_method_on_video(model, processor, _method(name, module, model), video_batch, oracle,
                                      vis_ids(model), n_vis, keep)
    assert [tuple(m.shape) for m in out.video_keep_masks] == [(2, 3, 4), (3, 3, 4)]
    assert [tuple(m.shape) for m in out.image_keep_masks] == [(4, 4)]


@pytest.mark.parametrize("K", [-1, 0, 1, 2])
def test_pruning_inside_deepstack_equals_masking(model, processor, video_batch, oracle, K):
    """K = -1 and K inside the DeepStack layers 0..2 on video: the kept tokens keep their DeepStack rows, the
    dropped ones lose them == the stock model with the dropped keys masked from layer K + 1 on."""
    n_vis = visual_positions(video_batch, vis_ids(model)).sum(1).tolist()
    keep = _random_keep(n_vis, seed=30 + K, frac=0.4)
    out = gp.apply(model, "mask", prune_layer=K).generate(video_batch, max_new_tokens=N_NEW, keep_masks=keep,
                                                          return_logits=True)
    assert out.prune_layer == K and out.n_kept == [int(k.sum()) for k in keep]
    with masking(dropped_positions(video_batch, vis_ids(model), keep), K), torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle, video_batch, N_NEW,
                                                pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(out.sequences, ref_tokens)
    for ours, ref in zip(out.step_logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method_name", ["glimpse", "mask", "downsample"])
def test_mixed_batch_equals_single(model, processor, module, method_name):
    """Image, video, image + video and text-only samples in one batch == each alone."""
    n_vis = [20, 24, 16 + 36, 0]
    check_mixed_batch_equals_single(
        gp.apply(model, _method(method_name, module, model), processor=processor),
        images=[make_images([(160, 128)], seed=1), [], make_images(IMG, seed=2), []],
        videos=[None, frames(4, seed=3), frames(5, seed=4), None],
        questions=["What colour is it?", "What happens?", "Which one moves?", "Is it sunny?"], n_vis=n_vis,
        keep=_random_keep(n_vis, seed=2) if method_name == "mask" else None)


# --------------------------------------------------------------------------- bad input, files


@needs_av
def test_bad_videos_are_refused_before_the_model_runs(model, processor, monkeypatch, tmp_path):
    pm = gp.apply(model, "full", processor=processor)

    def boom(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(pm.adapter, "encode", boom)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 64)
    cases = [
        ([str(bad)], "cannot decode video file"),
        ([str(tmp_path / "missing.mp4")], "does not exist"),
        ([[random_image(W, H), random_image(64, 64)]], "mixed sizes (64x64, 128x96"),
        ([[]], "videos[0]: the video has no frames"),
        ([frames(1) * 65], "65 frames, over the limit of max_frames=64"),
    ]
    for videos, message in cases:
        with pytest.raises(ValueError) as err:
            pm.generate(videos=videos, questions=["Q?"], max_new_tokens=2)
        assert message in str(err.value), (message, str(err.value))


@needs_av
def test_video_file(model, processor, tmp_path):
    """2 s at 4 fps, decoded at 2 fps: 4 frames, 2 frame-groups of 4 x 3 tokens, timestamps 0.2 and 1.2 s."""
    from PIL import Image

    path = write_mp4(tmp_path / "clip.mp4", [Image.new("RGB", (W, H), (30 * i, 0, 255 - 30 * i)) for i in range(8)])
    inputs = build_inputs(processor, [[]], ["Q?"], videos=[str(path)])
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert "<0.2 seconds>" in text and "<1.2 seconds>" in text and "<2.2 seconds>" not in text
    out = gp.apply(model, "full", processor=processor).generate(videos=[str(path)], questions=["Q?"],
                                                                max_new_tokens=2)
    assert out.n_vis == [24] and [tuple(m.shape) for m in out.video_keep_masks] == [(2, 3, 4)]


@needs_av
def test_ask_video(q3_dir, module, tmp_path, capsys):
    """`glimpseprune ask --video` on Qwen3-VL: 4 frames decoded at 2 fps -> 2 frame-groups of 12 tokens."""
    from PIL import Image

    from glimpseprune.cli import main

    path = write_mp4(tmp_path / "clip.mp4", [Image.new("RGB", (W, H), (0, 30 * i, 0)) for i in range(8)])
    gp.save_module(module, tmp_path / "mod")
    assert main(["ask", "--model", str(q3_dir), "--module", str(tmp_path / "mod"), "--max-new-tokens", "2",
                 "--video", str(path), "What happens?"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("kept ") and last.split("/")[1].startswith("24 (")
