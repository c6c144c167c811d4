"""Video input on the tiny random Qwen2.5-VL: our frame-stack inputs == hand-built stock inputs (transformers' video
patch layout, M-RoPE with fps-based time), keep-all == the stock model, pruning == the stock model with the dropped
keys masked (every registered method), mixed batches == one by one, the VIP scoring a video jointly, a video file
round trip through PyAV, bad input refused before the model runs, and ``ask --video``."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from conftest import IMG_A, IMG_C, make_images
from oracle import masking_stages, oracle_model, stage_drop_layers, stock_generate, visual_positions
from PIL import Image
from test_methods import input_rows_replaced

import glimpseprune as gp
from glimpseprune.adapters.base import grid_groups
from glimpseprune.cli import main
from glimpseprune.modules.vip import VIP
from glimpseprune.processing import DEFAULT_SYSTEM_PROMPT, build_inputs
from glimpseprune.runtime.engine import prefill
from glimpseprune.testing import random_image
from glimpseprune.video import Video, as_video, load_video, sample_times, stack_temporal, video_patches

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV (the video extra) is missing")

N_NEW = 6
W, H = 112, 84  # multiples of 28: the processor keeps the size, 6 x 8 patches -> 3 x 4 merged tokens per frame-group
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128),
          (255, 255, 255)]


def frames(n, seed=0, size=(W, H)):
    return [random_image(*size, seed=seed + i) for i in range(n)]


def write_mp4(path, images, fps=4, start=0):
    """``images`` as an mp4 at ``fps``; ``start`` > 0: its first frame at ``start / fps`` s (a clip cut from a
    longer one)."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = images[0].size[0], images[0].size[1], "yuv420p"
        for i, im in enumerate(images):
            frame = av.VideoFrame.from_image(im)
            if start:
                frame.pts, frame.time_base = start + i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def vis_of(inputs, cfg) -> torch.Tensor:
    return visual_positions(inputs, [cfg.image_token_id, cfg.video_token_id])


# --------------------------------------------------------------------------- stock inputs, built by hand


def stock_patches(clip, processor, tp=2, patch=14, merge=2) -> torch.Tensor:
    """transformers' ``Qwen2VLVideoProcessor.patchify`` (which needs torchvision), on frames normalised by hand."""
    ip = processor.image_processor
    mean, std = np.array(ip.image_mean, dtype=np.float32), np.array(ip.image_std, dtype=np.float32)
    x = np.stack([(np.asarray(f, dtype=np.float32) / 255.0 - mean) / std for f in clip]).transpose(0, 3, 1, 2)
    videos = torch.from_numpy(np.ascontiguousarray(x))[None]  # (1, F, C, H, W)
    if pad := -videos.shape[1] % tp:
        videos = torch.cat([videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    _, F, C, Hp, Wp = videos.shape
    gt, gh, gw = F // tp, Hp // patch, Wp // patch
    p = videos.view(1, gt, tp, C, gh // merge, merge, patch, gw // merge, merge, patch)
    return p.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(gt * gh * gw, C * tp * patch * patch)


def stock_inputs(processor, model, clip, question, fps=2.0) -> dict:
    tok, tp = processor.tokenizer, 2
    t, gh, gw = -(-len(clip) // tp), clip[0].size[1] // 14, clip[0].size[0] // 14
    pads = "<|video_pad|>" * (t * gh * gw // 4)
    text = (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>{pads}"
            f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([tok(text)["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == model.config.video_token_id).long() * 2,
            "pixel_values_videos": stock_patches(clip, processor), "video_grid_thw": torch.tensor([[t, gh, gw]]),
            "second_per_grid_ts": torch.tensor([tp / fps])}


@pytest.mark.parametrize("n_frames", [4, 5], ids=["4-frames", "5-frames-padded"])
def test_inputs_equal_hand_built_stock_inputs(processor, model, n_frames):
    clip = frames(n_frames)
    ours = build_inputs(processor, [[]], ["What happens?"], videos=[clip])
    ref = stock_inputs(processor, model, clip, "What happens?")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["second_per_grid_ts"], ref["second_per_grid_ts"])


def test_stack_temporal_takes_frame_j_at_tp_index_j():
    per_frame = np.repeat(np.arange(3, dtype=np.float32)[:, None, None, None], 2, axis=2)  # 3 frames, 1 patch, tp 2
    out = stack_temporal(np.broadcast_to(per_frame, (3, 1, 2, 4)).reshape(3, 8), 3, 2, 2).reshape(2, 1, 2, 4)
    assert out[:, 0, :, 0].tolist() == [[0, 1], [2, 2]]  # groups (0, 1) and (2, 2: the last frame repeated)


@pytest.mark.parametrize("fps", [2.0, 1.0])
def test_positions_follow_the_clock(processor, model, fps):
    """M-RoPE time of frame-group g is start + tokens_per_second * (tp / fps) * g; rows and columns restart."""
    inputs = build_inputs(processor, [[]], ["Q?"], videos=[Video(tuple(frames(6)), fps=fps)])
    enc = gp.get_adapter(model).encode(model, inputs)
    pos = enc.positions[:, 0, inputs["input_ids"][0] == model.config.video_token_id].view(3, 3, 3, 4)  # (P, t, h, w)
    step = model.config.vision_config.tokens_per_second * 2 / fps
    start = int(pos[0, 0, 0, 0])
    assert pos[0, :, 0, 0].tolist() == [start + int(step * g) for g in range(3)]
    assert pos[1, 1, :, 0].tolist() == [start + r for r in range(3)] and pos[2, 2, 0].tolist() == [start + c
                                                                                               for c in range(4)]


# --------------------------------------------------------------------------- the grids contract


def test_encoded_grids_contract(processor, model):
    """An image then a video in one sample, a video alone, a text-only sample: one (h, w) per image and per
    frame-group, in token order; grid_video marks the frame-groups; grid_groups joins each video's."""
    imgs = make_images(IMG_C)
    inputs = build_inputs(processor, [imgs, [], []], ["a?", "b?", "c?"], videos=[frames(4), frames(6, seed=9), None])
    enc = gp.get_adapter(model).encode(model, inputs)
    assert enc.grids == [(6, 6)] + [(3, 4)] * 2 + [(3, 4)] * 3
    assert enc.image_owner == [0, 0, 0, 1, 1, 1] and enc.grid_video == [-1, 0, 0, 1, 1, 1]
    assert enc.grid_groups == [0, 1, 1, 2, 2, 2] == grid_groups(enc.grid_video, 6)
    assert enc.n_vis == [36 + 24, 36, 0]


# --------------------------------------------------------------------------- equivalence with the stock model


@pytest.mark.parametrize("n_frames", [4, 5])
def test_keep_all_equals_stock(processor, model, module, n_frames):
    clip = frames(n_frames, seed=3)
    ref_inputs = stock_inputs(processor, model, clip, "What colour is the square?")
    ours = build_inputs(processor, [[]], ["What colour is the square?"], videos=[clip])
    with torch.no_grad():
        ref = model(**ref_inputs).logits
        for method in (gp.get_method("full")(), gp.make_method("glimpse", module, gp.SelectionConfig(threshold=0.0))):
            pre = prefill(model, gp.get_adapter(model), method, ours, all_logits=True)
            assert pre.n_kept == pre.n_vis == [(-(-n_frames // 2)) * 12]
            torch.testing.assert_close(pre.logits, ref, atol=1e-5, rtol=0)
    stock_tokens, _ = stock_generate(model, ref_inputs, N_NEW, pad_token_id=processor.tokenizer.pad_token_id)
    out = gp.apply(model, "full", processor=processor).generate(videos=[clip], questions=["What colour is the square?"],
                                                                max_new_tokens=N_NEW)
    assert torch.equal(out.sequences, stock_tokens)


def _method(name, module, model=None):
    import dataclasses

    if name == "glimpse":
        return gp.make_method("glimpse", module, gp.SelectionConfig(max_keep_ratio=0.4))
    if name == "early_glimpse":
        from conftest import random_early_module

        return gp.make_method("early_glimpse", random_early_module(model), gp.SelectionConfig(max_keep_ratio=0.4))
    fields = {f.name for f in dataclasses.fields(gp.get_method(name).config_class)}
    return gp.make_method(name, **({"keep_ratio": 0.3} if "keep_ratio" in fields else {}))


def _random_keep(n_vis, seed=1, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(n, generator=g) < frac for n in n_vis]
    for m in masks:
        if m.numel():
            m[0] = True
    return masks


@pytest.fixture(scope="module")
def video_batch(processor):
    """A video sample and an image + video sample (the oracle's batch)."""
    return build_inputs(processor, [[], make_images(IMG_C, seed=5)], ["What happens?", "Which one moves?"],
                        videos=[frames(4, seed=1), frames(5, seed=20)])


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    return oracle_model(tiny_dir)


def check_every_method_on_video(model, processor, method, inputs, oracle, ids, n_vis, keep=None):
    """``method`` on ``inputs`` (video samples): keeps its budget over each sample's visuals (video + images
    jointly), and the compacted run == the stock ``oracle`` hiding the same dropped keys from the same layers
    (tokens and every step's logits). Returns our output for family-specific checks. Shared with Qwen3-VL's
    video tests."""
    out = gp.apply(model, method, processor=processor).generate(inputs, max_new_tokens=N_NEW, return_logits=True,
                                                                keep_masks=keep)
    assert out.n_vis == n_vis
    for b, n in enumerate(n_vis):
        budget = method.budget(n)
        assert out.n_kept[b] == budget if budget is not None else 0 <= out.n_kept[b] <= n
    pre = out.prefill
    drop = stage_drop_layers(inputs, ids, pre.prune_layers, pre.stage_keep_masks)
    with masking_stages(drop), input_rows_replaced(oracle, inputs, ids, pre.scratch.get("merged_embeds")), \
            torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle, inputs, N_NEW, pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(out.sequences, ref_tokens)
    for ours, ref in zip(out.step_logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    return out


def check_mixed_batch_equals_single(pm, images, videos, questions, n_vis, keep=None) -> None:
    """Image, video, image + video and text-only samples in one batch == each alone (same keep masks, same
    tokens). Shared with Qwen3-VL's video tests."""
    out = pm.generate(images=images, videos=videos, questions=questions, max_new_tokens=N_NEW, keep_masks=keep)
    assert out.n_vis == n_vis and out.n_kept[3] == 0 and 0 < out.n_kept[1] < n_vis[1]
    for b in range(len(questions)):
        one = pm.generate(images=[images[b]], videos=[videos[b]], questions=[questions[b]], max_new_tokens=N_NEW,
                          keep_masks=None if keep is None else [keep[b]])
        assert torch.equal(one.keep_masks[0], out.keep_masks[b])
        n = one.sequences.shape[1]
        assert torch.equal(one.sequences[0], out.sequences[b, :n])


@pytest.mark.parametrize("name", gp.list_methods())
def test_every_method_on_video_equals_masked_stock(model, processor, module, video_batch, oracle, name):
    """Every registered method runs on video samples, keeps its budget over the whole video (joint with the
    sample's image), and its compacted run == the stock model hiding the same dropped keys from the same layers."""
    cfg, inputs = model.config, video_batch
    n_vis = vis_of(inputs, cfg).sum(1).tolist()
    assert n_vis == [24, 36 + 36]
    keep = _random_keep(n_vis) if name in ("mask", "oracle") else None
    out = check_every_method_on_video(model, processor, _method(name, module, model), inputs, oracle,
                                      [cfg.image_token_id, cfg.video_token_id], n_vis, keep)
    assert [tuple(m.shape) for m in out.video_keep_masks] == [(2, 3, 4), (3, 3, 4)]
    assert [tuple(m.shape) for m in out.image_keep_masks] == [(6, 6)]
    if name == "glimpse":
        assert all(k <= int(0.4 * n) for k, n in zip(out.n_kept, n_vis))


@pytest.mark.parametrize("method_name", ["glimpse", "mask", "downsample"])
def test_mixed_batch_equals_single(model, processor, module, method_name):
    """Image, video, image + video and text-only samples in one batch == each alone."""
    n_vis = [64, 24, 36 + 36, 0]
    check_mixed_batch_equals_single(
        gp.apply(model, _method(method_name, module), processor=processor),
        images=[make_images(IMG_A, seed=1), [], make_images(IMG_C, seed=2), []],
        videos=[None, frames(4, seed=3), frames(5, seed=4), None],
        questions=["What colour is it?", "What happens?", "Which one moves?", "Is it sunny?"], n_vis=n_vis,
        keep=_random_keep(n_vis, seed=2) if method_name == "mask" else None)


# --------------------------------------------------------------------------- the VIP on video


def test_vip_scores_a_video_jointly(module):
    """With groups, every token attends over all frames (a change in frame 1 moves frame 0's scores; without groups
    it cannot); frames with the same inputs get the same scores (the same 2D RoPE per frame, no time term); an
    image-only call is unchanged by groups."""
    vip: VIP = module.vip.eval()
    cfg = module.cfg
    torch.manual_seed(0)
    grids = [(3, 4)] * 3
    n_attn = len(cfg.attn_layers) * cfg.base_num_heads
    one = torch.randn(12, n_attn), [torch.randn(12, cfg.base_vision_width) for _ in range(cfg.n_vip_layers)]
    attn, conds = one[0].repeat(3, 1), [c.repeat(3, 1) for c in one[1]]
    with torch.no_grad():
        joint = vip(attn, conds, grids, groups=[0, 0, 0]).view(3, 12)
        torch.testing.assert_close(joint[0], joint[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(joint[0], joint[2], atol=1e-5, rtol=0)
        attn2 = attn.clone()
        attn2[12:24] += 1.0
        moved = vip(attn2, conds, grids, groups=[0, 0, 0]).view(3, 12)
        alone = vip(attn, conds, grids).view(3, 12), vip(attn2, conds, grids).view(3, 12)
        assert not torch.allclose(moved[0], joint[0], atol=1e-4)
        torch.testing.assert_close(alone[0][0], alone[1][0])
        assert torch.equal(vip(attn, conds, grids), vip(attn, conds, grids, groups=[0, 1, 2]))


def test_glimpse_keeps_within_ratio_over_the_whole_video(model, processor, module):
    pm = gp.apply(model, "glimpse", module=module, processor=processor,
                  selection=gp.SelectionConfig(fixed_keep_ratio=0.25))
    out = pm.generate(videos=[frames(6)], questions=["What happens?"], max_new_tokens=2)
    assert out.n_vis == [36] and out.n_kept == [9]  # floor(0.25 * 36) over all frames, not per frame
    assert int(out.video_keep_masks[0].sum()) == 9
    d = out.to_dict()
    assert d["video_grids"] == [[3, 3, 4]] and len(d["video_kept_idx"][0]) == 9 and d["image_grids"] == []


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """2 s at 4 fps, one solid colour per frame."""
    pytest.importorskip("av")
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4", [Image.new("RGB", (W, H), c) for c in COLORS])


def _colour(im):
    """The palette colour nearest the frame's mean colour (the codec is lossy)."""
    mean = np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0)
    return min(COLORS, key=lambda c: float(np.abs(mean - np.array(c)).sum()))


def test_video_file_round_trip(clip_path, model, processor):
    clip = load_video(clip_path)  # 2 fps: the frames at 0, 0.5, 1, 1.5 s
    assert clip.fps == 2.0 and clip.size == (W, H) and len(clip.frames) == 4
    assert [_colour(f) for f in clip.frames] == [COLORS[i] for i in (0, 2, 4, 6)]
    capped = load_video(clip_path, fps=4.0, max_frames=3)  # over the cap: 3 frames spread over the 2 s
    assert len(capped.frames) == 3 and capped.fps == pytest.approx(1.5)
    assert [_colour(f) for f in capped.frames] == [COLORS[i] for i in (0, 3, 5)]
    out = gp.apply(model, "full", processor=processor).generate(videos=[str(clip_path)], questions=["Q?"],
                                                                max_new_tokens=2)
    assert out.n_vis == [24]


def test_sample_times():
    assert sample_times(2.0, 2.0, 64) == ([0.0, 0.5, 1.0, 1.5], 2.0)
    assert sample_times(2.2, 2.0, 4) == ([0.0, 0.5, 1.0, 1.5], 2.0)  # exactly max_frames at fps: not respread
    assert sample_times(0.2, 2.0, 64) == ([0.0], 2.0)  # a very short clip still gives one frame
    times, fps = sample_times(10.0, 2.0, 4)
    assert times == [0.0, 2.5, 5.0, 7.5] and fps == 0.4
    assert sample_times(None, 2.0, 3) == ([0.0, 0.5, 1.0], 2.0)


def test_file_sampling_follows_fps_the_clock_and_the_pixel_limit(clip_path, tmp_path, monkeypatch):
    """as_video passes its fps to the decoder; a clip whose first frame is not at 0 s is sampled from that frame;
    frames over processing.MAX_IMAGE_PIXELS (width x height) are refused by name."""
    import glimpseprune.processing

    slow = as_video(str(clip_path), fps=1.0)  # 1 fps over 2 s: the frames at 0 and 1 s
    assert slow.fps == 1.0 and [_colour(f) for f in slow.frames] == [COLORS[0], COLORS[4]]
    late = write_mp4(tmp_path / "late.mp4", [Image.new("RGB", (W, H), c) for c in COLORS], start=12)  # at 3 s
    assert [_colour(f) for f in load_video(late).frames] == [COLORS[i] for i in (0, 2, 4, 6)]
    monkeypatch.setattr(glimpseprune.processing, "MAX_IMAGE_PIXELS", W * H - 1)
    with pytest.raises(ValueError, match=f"has {W}x{H} frames, over the limit of {W * H - 1} pixels"):
        load_video(clip_path)


def test_video_timestamps_and_max_frames_bounds():
    assert Video(tuple(frames(3)), fps=4.0).timestamps == [0.0, 0.25, 0.5]
    assert len(as_video(frames(3), max_frames=3).frames) == 3  # exactly the limit is fine
    with pytest.raises(ValueError, match="max_frames must be a whole number >= 1, got 0"):
        as_video(frames(1), max_frames=0)


def test_stack_temporal_pads_to_any_temporal_patch_size():
    per_frame = np.repeat(np.arange(4, dtype=np.float32)[:, None, None, None], 3, axis=2)  # 4 frames, 1 patch, tp 3
    out = stack_temporal(np.broadcast_to(per_frame, (4, 1, 3, 4)).reshape(4, 12), 4, 3, 2).reshape(2, 1, 3, 4)
    assert out[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 3, 3]]  # the last frame repeated twice


def test_video_frames_are_capped_at_video_max_pixels(processor, monkeypatch):
    import glimpseprune.video

    clip = frames(2, size=(224, 224))
    assert video_patches(processor.image_processor, [clip], [2.0])["video_grid_thw"].tolist() == [[1, 16, 16]]
    monkeypatch.setattr(glimpseprune.video, "VIDEO_MAX_PIXELS", 112 * 112)  # below the image processor's own cap
    out = video_patches(processor.image_processor, [clip], [2.0])
    assert out["video_grid_thw"].tolist() == [[1, 8, 8]] and out["pixel_values_videos"].shape[0] == 64


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_run(model, processor, monkeypatch):
    pm = gp.apply(model, "full", processor=processor)

    def boom(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(pm.adapter, "encode", boom)
    return pm


@needs_av
def test_bad_videos_are_refused_before_the_model_runs(no_model_run, tmp_path):
    pm = no_model_run
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 64)
    cases = [
        ([str(bad)], "cannot decode video file"),
        ([str(tmp_path / "missing.mp4")], "does not exist"),
        ([[random_image(W, H), random_image(56, 56)]], "mixed sizes (56x56, 112x84"),
        ([[]], "videos[0]: the video has no frames"),
        ([frames(1) * 65], "65 frames, over the limit of max_frames=64"),
    ]
    for videos, message in cases:
        with pytest.raises(ValueError, match=None) as err:
            pm.generate(videos=videos, questions=["Q?"], max_new_tokens=2)
        assert message in str(err.value), (message, str(err.value))
    with pytest.raises(TypeError, match="videos\\[0\\] is a int"):
        pm.generate(videos=[3], questions=["Q?"])
    with pytest.raises(ValueError, match="got 2 videos entries for 1 questions"):
        pm.generate(videos=[None, None], questions=["Q?"])
    with pytest.raises(TypeError, match="videos must be a list"):
        pm.generate(videos="clip.mp4", questions=["Q?"])
    with pytest.raises(ValueError, match="over the limit of max_frames=3"):
        as_video(frames(4), max_frames=3)
    with pytest.raises(ValueError, match="fps must be a finite number"):
        as_video(frames(2), fps=0.0)


def test_missing_pyav_names_the_extra(monkeypatch, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(ImportError, match=r"glimpseprune\[video\]"):
        load_video(tmp_path / "clip.mp4")


def test_llava_takes_no_video(llava):
    model, processor = llava
    with pytest.raises(ValueError, match="takes no video input"):
        gp.apply(model, "full", processor=processor).generate(videos=[frames(2)], questions=["Q?"])


# --------------------------------------------------------------------------- command line


def test_ask_video(tiny_dir, module, clip_path, tmp_path, capsys):
    gp.save_module(module, tmp_path / "mod")
    base = ["ask", "--model", str(tiny_dir), "--module", str(tmp_path / "mod"), "--max-new-tokens", "2"]
    sheet = tmp_path / "sheet.png"
    assert main([*base, "--video", str(clip_path), "What happens?", "--overlay", str(sheet)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    n, rest = last.removeprefix("kept ").split("/")
    assert last.startswith("kept ") and rest.startswith("24 (") and 1 <= int(n) <= 24
    with Image.open(sheet) as im:  # 4 frames in a 2 x 2 grid of 112 x 84 tiles (4 px apart) + the caption band
        assert im.width == 2 * W + 4 and im.height > 2 * H + 4
    frame_files = []
    for i in range(3):
        frame_files += ["--image", str(tmp_path / f"f{i}.png")]
        random_image(W, H, seed=i).save(tmp_path / f"f{i}.png")
    assert main([*base, *frame_files, "--question", "Q?"]) == 0  # frames as separate images: 3 x 12 tokens
    assert capsys.readouterr().out.strip().splitlines()[-1].split("/")[1].startswith("36 (")
    assert main([*base, "--video", str(tmp_path / "nope.mp4"), "Q?"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # the video options without --video were ignored silently (--fps -3 too)
    assert main([*base, *frame_files, "--question", "Q?", "--fps", "-3", "--max-frames", "2"]) == 2
    assert "--fps and --max-frames apply to --video, which was not given" in capsys.readouterr().err


def test_glimpse_module_hands_the_groups_to_its_vip(module):
    """``GlimpseModule.__call__`` (what the glimpse method runs) scores a video jointly, as ``module.vip`` does."""
    cfg = module.cfg
    torch.manual_seed(1)
    grids = [(3, 4)] * 2
    attn = torch.randn(24, len(cfg.attn_layers) * cfg.base_num_heads)
    conds = [torch.randn(24, cfg.base_vision_width) for _ in range(cfg.n_vip_layers)]
    with torch.no_grad():
        joint = module.vip(attn, conds, grids, groups=[0, 0])
        assert not torch.allclose(joint, module.vip(attn, conds, grids), atol=1e-4)
        torch.testing.assert_close(module(attn, conds, grids, groups=[0, 0]), joint, atol=0, rtol=0)
