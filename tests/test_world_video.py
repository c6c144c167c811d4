"""The video world: the evidence of a clip's question is visible in one moment (frame pair) only, distractors never
change the answer, splits round-trip and are deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_data import _apart  # at least one free cell between two objects

from glimpseprune.data.world import FAMILIES, sample
from glimpseprune.data.world_video import (
    TEMPORAL_PATCH,
    VideoConfig,
    clip_sample,
    has_video_split,
    read_video_records,
    write_video_split,
)


@pytest.mark.parametrize("seed", range(15))
def test_evidence_lives_in_one_moment_and_distractors_change_nothing(seed):
    fam = FAMILIES[seed % len(FAMILIES)]
    clip = clip_sample(1000 + seed, fam)
    frames = [np.asarray(clip.frame(i), dtype=np.int16) for i in range(len(clip.visible))]
    assert len(frames) == 4 and all(f.shape == frames[0].shape for f in frames)
    for i, boxes in enumerate(clip.frame_boxes):
        shown = i // TEMPORAL_PATCH == clip.moment
        absent_no = clip.family == "exist" and clip.answer == "no"
        assert bool(boxes) == (shown or absent_no)
    # frames of one moment are identical (one visual token per frame pair); the moments differ
    assert (frames[0] == frames[1]).all() and (frames[2] == frames[3]).all() and (frames[1] != frames[2]).any()
    if clip.frame_boxes[2 * clip.moment] and not (clip.family == "exist" and clip.answer == "no"):
        other = 2 * (1 - clip.moment)
        x1, y1, x2, y2 = clip.frame_boxes[2 * clip.moment][0]
        assert (frames[2 * clip.moment][y1:y2, x1:x2] != frames[other][y1:y2, x1:x2]).any()  # it appears
    # distractors (objects of the other moments only) name none of the question's colours or shapes: the answer
    # over the whole clip is the image world's answer
    words = set(clip.question.lower().rstrip("?").split())
    on_moment = set(clip.visible[TEMPORAL_PATCH * clip.moment])
    distractors = {o for objs in clip.visible for o in objs} - on_moment
    assert not any(o.shape in words or o.colour in words for o in distractors)


def test_split_round_trip_and_determinism(tmp_path):
    a = write_video_split(tmp_path / "a", n=5, seed=2)
    b = write_video_split(tmp_path / "b", n=5, seed=2)
    assert a.read_text().replace("/a/", "/b/") == b.read_text().replace("/a/", "/b/")
    recs = read_video_records(a)
    assert [r.family for r in recs] == list(FAMILIES) and all(len(r.frames) == 4 for r in recs)
    assert all(p.is_file() for r in recs for p in r.frame_paths(a.parent))
    with pytest.raises(ValueError, match="already holds"):
        write_video_split(tmp_path / "a", n=5, seed=2)
    assert write_video_split(tmp_path / "a", n=3, seed=2, overwrite=True) == a and len(read_video_records(a)) == 3
    row = json.loads(a.read_text().splitlines()[0])
    row["frame_boxes"] = row["frame_boxes"][:1]
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="frame_boxes"):
        read_video_records(tmp_path / "bad.jsonl")


def test_config_is_checked():
    with pytest.raises(ValueError, match="multiple"):
        VideoConfig(frames=3)
    with pytest.raises(ValueError, match="fps"):
        VideoConfig(fps=0)
    assert VideoConfig(frames=6).moments == 3


def test_video_world_through_eval_and_compare(tmp_path, capsys):
    """`make-world --video` then `eval --task world_video` and `compare --task world_video` on the embedded
    default: every clip is answered through the video path (all its frames' tokens), pruned over the whole clip."""
    from glimpseprune.cli import main

    assert main(["make-world", "--video", "--out", str(tmp_path / "vw"), "--n", "5", "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["make-world", "--video", "--out", str(tmp_path / "vw"), "--n", "5", "--seed", "3"]) == 0
    assert "already holds this video split" in capsys.readouterr().out  # the same split: kept, as for images
    assert main(["make-world", "--video", "--out", str(tmp_path / "vw"), "--n", "4", "--seed", "3"]) == 2
    assert "already holds results of an earlier run" in capsys.readouterr().err  # another one: refused
    assert main(["eval", "--task", "world_video", "--data", str(tmp_path / "vw"), "--out", str(tmp_path / "e"),
                 "--compare-full"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (tmp_path / "e" / "full" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["meta"]["category"] for r in rows} == set(FAMILIES)
    by_id = {r["id"]: r for r in full}
    for r in rows:  # a clip's visual tokens: 2 moments x its frame grid; pruned over the whole clip
        assert r["n_vis"] == by_id[r["id"]]["n_vis"] == by_id[r["id"]]["n_kept"]
        assert 1 <= r["n_kept"] < 0.2 * r["n_vis"]
    assert main(["compare", "--task", "world_video", "--data", str(tmp_path / "vw"), "--out", str(tmp_path / "c"),
                 "--methods", "fastv", "random", "--budgets", "0.1", "--max-new-tokens", "8"]) == 0
    runs = {json.loads(p.read_text())["label"]: json.loads(p.read_text()) for p in (tmp_path / "c" / "runs").glob(
        "*.json")}
    assert set(runs) == {"full", "fastv@0.1", "random@0.1"}
    assert all(abs(runs[k]["kept_frac"]["mean"] - 0.1) < 0.03 for k in ("fastv@0.1", "random@0.1"))


def test_glimpse_video_scoring_variants():
    """`video="joint"` (default: the VIP attends across the clip's frames) vs `"per_frame"` (each frame-group alone):
    both run on a clip; on an image they are the same function; a bad value is refused."""
    import torch

    import glimpseprune as gp
    from glimpseprune.api import make_method
    from glimpseprune.methods.glimpse import GlimpseMethodConfig
    from glimpseprune.video import Video

    with pytest.raises(ValueError, match="joint"):
        GlimpseMethodConfig(video="both")
    base = gp.load("embedded", module="embedded")
    module = base.method.module
    clip = clip_sample(77, "lookup")
    frames = Video([clip.frame(i) for i in range(4)], fps=2.0)
    outs = {}
    for variant in ("joint", "per_frame"):
        pm = gp.apply(base.model, make_method("glimpse", module, video=variant), processor=base.processor)
        outs[variant] = pm.generate(videos=[frames], images=[[]], questions=[clip.question], max_new_tokens=4,
                                    return_logits=True)
        img = pm.generate(images=[[clip.frame(0)]], questions=[clip.question], max_new_tokens=4, return_logits=True)
        outs[variant + "_image"] = img
    assert outs["joint"].n_vis == outs["per_frame"].n_vis and outs["joint"].n_kept[0] >= 1
    # on the clip the two differ (the setting was unpinned: ignoring it passed): joint lets each frame-group's tokens
    # attend to the other's inside the VIP
    joint, alone = (outs[v].prefill.scratch["vip_logits"][0] for v in ("joint", "per_frame"))
    assert joint.shape == alone.shape and (joint - alone).abs().max() > 1e-4
    assert torch.equal(outs["joint_image"].keep_masks[0], outs["per_frame_image"].keep_masks[0])
    assert torch.equal(outs["joint_image"].sequences, outs["per_frame_image"].sequences)


def test_config_refuses_one_moment_and_negative_distractors():
    with pytest.raises(ValueError, match="at least two moments"):
        VideoConfig(frames=2)  # one moment: the evidence would be in every frame
    with pytest.raises(ValueError, match="distractors must be >= 0"):
        VideoConfig(distractors=-1)


def test_each_moment_shows_the_scene_or_the_others_and_distractors():
    """The evidence moment shows exactly the image world's scene; every other moment shows the scene's other objects
    plus the distractors, never the evidence; the evidence moment varies over clips; no two objects shown together
    touch (distractors keep the one-cell gap too)."""
    cfg = VideoConfig(frames=6, distractors=4)
    moments, n_distractors = set(), 0
    for seed in range(30):
        family = FAMILIES[seed % len(FAMILIES)]
        clip, s = clip_sample(seed, family, cfg), sample(seed, family, cfg.world)
        scene = set(s.scene.objects)
        absent_no = family == "exist" and s.answer == "no"
        evidence = set() if absent_no else {o for o in scene if o.box in s.boxes}
        moments.add(clip.moment)
        for f, objs in enumerate(clip.visible):
            shown = set(objs)
            assert len(shown) == len(objs)
            if f // TEMPORAL_PATCH == clip.moment:
                assert shown == scene, (seed, f)
            else:
                assert shown & scene == scene - evidence, (seed, f)
                n_distractors += len(shown - scene)
            for i, a in enumerate(objs):
                for b in objs[i + 1:]:
                    assert _apart(a, b), (seed, f, a, b)
    assert moments == {0, 1, 2} and n_distractors > 0


def test_split_records_match_their_clips(tmp_path):
    """Record i of a split is clip ``seed * 10^6 + i`` (families in turn): its question, answer, moment and boxes,
    the frame size as width x height, the config's fps, its frames as PNGs; ``limit``; ``has_video_split`` knows the
    config it was made with."""
    cfg = VideoConfig(frames=6, fps=1.0)
    out = tmp_path / "v"
    path = write_video_split(out, n=3, seed=4, cfg=cfg)
    recs = read_video_records(path)
    assert len(recs) == 3 and len(read_video_records(path, limit=2)) == 2
    for i, r in enumerate(recs):
        clip = clip_sample(4 * 1_000_000 + i, FAMILIES[i], cfg)
        assert (r.question, r.answer, r.family, r.moment) == (clip.question, clip.answer, clip.family, clip.moment)
        assert r.frame_boxes == clip.frame_boxes and r.fps == 1.0 and len(r.frames) == 6
        for f, p in enumerate(r.frame_paths(out)):
            with Image.open(p) as im:
                assert im.size == (r.width, r.height) == (clip.cols * 28, clip.rows * 28)
                assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(clip.frame(f)))
    assert any(r.width != r.height for r in recs)
    assert has_video_split(out, 3, 4, cfg)
    assert not has_video_split(out, 3, 4) and not has_video_split(out, 3, 4, VideoConfig(frames=6))
    assert not has_video_split(out, 2, 4, cfg) and not has_video_split(out, 3, 5, cfg)


def test_overwrite_removes_the_earlier_splits_clips(tmp_path):
    """As for images: --overwrite with another seed leaves none of the earlier split's clips behind."""
    out = tmp_path / "v"
    write_video_split(out, n=2, seed=2)
    write_video_split(out, n=1, seed=5, overwrite=True)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["5-000000"]


def test_clips_honour_the_clutter_setting():
    from glimpseprune.data.world import WorldConfig

    clip = clip_sample(5, "lookup", VideoConfig(world=WorldConfig(clutter=0)))
    for f in range(len(clip.visible)):
        px = np.asarray(clip.frame(f)).copy()
        for o in clip.visible[f]:
            x1, y1, x2, y2 = o.box
            px[y1:y2, x1:x2] = 255
        assert (px >= 225).all(), f  # no grey stroke (90-199) anywhere outside the objects
