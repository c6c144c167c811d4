"""The synthetic world (scenes, questions, answers, boxes), the JSONL record format, and box -> token masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glimpseprune.data import world
from glimpseprune.data.records import Record, boxes_to_token_mask, read_records, write_split

SEEDS = range(12)  # per family


def cells(grid_h, grid_w, *rc):
    m = np.zeros((grid_h, grid_w), dtype=bool)
    for r, c in rc:
        m[r, c] = True
    return m


# --------------------------------------------------------------------------- boxes_to_token_mask


def test_box_on_grid_lines_covers_exactly_its_cells():
    # 112 px wide, 4 columns of 28 px: x 28..56 is column 1 only. Upstream's inclusive floor(56 / 28) = 2 would
    # also mark column 2.
    m = boxes_to_token_mask([[28, 0, 56, 28]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (0, 1)))
    assert not m[:, 2].any()
    # a 2 x 2 block on the lines
    m = boxes_to_token_mask([[28, 56, 84, 112]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (2, 1), (2, 2), (3, 1), (3, 2)))
    # the whole image
    assert boxes_to_token_mask([[0, 0, 112, 112]], 112, 112, 4, 4).all()


def test_grid_aligned_boxes_exact_where_float_division_is_inexact():
    # One 28-px cell k of a g-cell canvas: (28 k / 28 g) * g is not always exactly k in floats (g = 22, k = 15 gives
    # 14.999...; g = 25, k = 7 gives 7.000...1). The mask must still be exactly that cell, on every grid size.
    for g in range(2, 65):
        for k in range(g):
            box = [28 * k, 28 * (g - 1 - k), 28 * (k + 1), 28 * (g - k)]
            m = boxes_to_token_mask([box], 28 * g, 28 * g, g, g)
            assert m.sum() == 1 and m[g - 1 - k, k], (g, k, np.argwhere(m).tolist())
    # and a multi-cell block on a non-square 13 x 11 grid
    m = boxes_to_token_mask([[2 * 28, 3 * 28, 9 * 28, 7 * 28]], 13 * 28, 11 * 28, 11, 13)
    want = np.zeros((11, 13), dtype=bool)
    want[3:7, 2:9] = True
    np.testing.assert_array_equal(m, want)


def test_fractional_box_covers_every_overlapped_cell():
    # x 30..60 overlaps columns 1 (28..56) and 2 (56..84); y 27.5..28.5 overlaps rows 0 and 1
    m = boxes_to_token_mask([[30, 27.5, 60, 28.5]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (0, 1), (0, 2), (1, 1), (1, 2)))
    # a sliver just past a grid line still counts
    m = boxes_to_token_mask([[55.9, 0, 56.1, 1]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (0, 1), (0, 2)))


def test_box_is_clipped_to_the_image():
    m = boxes_to_token_mask([[-50, -10, 20, 30]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (0, 0), (1, 0)))
    m = boxes_to_token_mask([[100, 90, 500, 400]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (3, 3)))
    m = boxes_to_token_mask([[-1e6, 30, 1e6, 40]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (1, 0), (1, 1), (1, 2), (1, 3)))


def test_zero_area_box_marks_its_containing_cell():
    np.testing.assert_array_equal(boxes_to_token_mask([[40, 70, 40, 70]], 112, 112, 4, 4), cells(4, 4, (2, 1)))
    # a vertical segment inside column 3 spanning rows 0..1
    np.testing.assert_array_equal(boxes_to_token_mask([[90, 10, 90, 40]], 112, 112, 4, 4),
                                  cells(4, 4, (0, 3), (1, 3)))
    # a point on the image's far corner marks the last cell (no index past the grid)
    np.testing.assert_array_equal(boxes_to_token_mask([[112, 112, 112, 112]], 112, 112, 4, 4), cells(4, 4, (3, 3)))


def test_several_boxes_union_and_no_boxes():
    m = boxes_to_token_mask([[0, 0, 28, 28], [84, 84, 112, 112], [0, 0, 56, 28]], 112, 112, 4, 4)
    np.testing.assert_array_equal(m, cells(4, 4, (0, 0), (0, 1), (3, 3)))
    m = boxes_to_token_mask([], 112, 112, 4, 4)
    assert m.shape == (4, 4) and m.dtype == bool and not m.any()


def test_non_square_image_and_grid():
    # 300 x 100 px on a 4 (rows) x 6 (cols) grid: cells are 50 px wide and 25 px tall
    m = boxes_to_token_mask([[50, 25, 150, 50]], 300, 100, 4, 6)
    np.testing.assert_array_equal(m, cells(4, 6, (1, 1), (1, 2)))
    m = boxes_to_token_mask([[160, 60, 170, 100]], 300, 100, 4, 6)
    np.testing.assert_array_equal(m, cells(4, 6, (2, 3), (3, 3)))
    # the grid is the model's (resized) grid, not the pixel size: 336 x 224 px shown on a 3 x 2 grid
    m = boxes_to_token_mask([[0, 0, 112, 112]], 336, 224, 2, 3)
    np.testing.assert_array_equal(m, cells(2, 3, (0, 0)))
    assert boxes_to_token_mask([[0, 0, 112, 112]], 336, 224, 3, 2).shape == (3, 2)


# --------------------------------------------------------------------------- world


def obj_at(scene, box):
    found = [o for o in scene.objects if o.box == list(box)]
    assert len(found) == 1, f"box {box} is not exactly one object of the scene"
    return found[0]


def test_sample_is_deterministic_by_seed():
    for family in (None, *world.FAMILIES):
        a, b = world.sample(5, family), world.sample(5, family)
        assert a == b
        assert np.array_equal(np.asarray(world.render(a.scene)), np.asarray(world.render(b.scene)))
    others = [world.sample(s) for s in range(6, 12)]
    assert all(o.scene != world.sample(5).scene for o in others)
    assert len({(o.question, o.answer) for o in others}) > 1


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown question family"):
        world.sample(0, "colour")


@pytest.mark.parametrize("family", world.FAMILIES)
def test_sample_is_valid(family):
    vocab = set(world.answer_vocabulary())
    answers = set()
    for seed in SEEDS:
        s = world.sample(seed, family)
        sc = s.scene
        W, H = sc.size
        assert s.family == family
        assert s.answer in vocab
        answers.add(s.answer)
        assert world.WorldConfig().min_cells <= sc.cols <= world.WorldConfig().max_cells
        for box in s.boxes:
            assert all(v % world.CELL == 0 for v in box), box
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, (box, sc.size)
            obj_at(sc, box)
        # objects do not overlap (one free cell between them, so their cell masks are disjoint)
        masks = [boxes_to_token_mask([o.box], W, H, sc.rows, sc.cols) for o in sc.objects]
        assert int(sum(m.sum() for m in masks)) == int(np.logical_or.reduce(masks).sum())
        if family == "lookup":
            (o,) = [obj_at(sc, b) for b in s.boxes]
            if s.question.startswith("What colour"):
                assert s.question == f"What colour is the {o.shape}?" and s.answer == o.colour
                assert [x.shape for x in sc.objects].count(o.shape) == 1
            else:
                assert s.question == f"What shape is the {o.colour} object?" and s.answer == o.shape
                assert [x.colour for x in sc.objects].count(o.colour) == 1
        elif family == "glyph":
            (o,) = [obj_at(sc, b) for b in s.boxes]
            assert s.question == f"What letter is on the {o.colour} {o.shape}?" and s.answer == o.glyph
            assert [(x.colour, x.shape) for x in sc.objects].count((o.colour, o.shape)) == 1
        elif family == "count":
            colour = s.question.split()[2]
            want = sorted(o.box for o in sc.objects if o.colour == colour)
            assert sorted(s.boxes) == want
            assert s.answer == world.NUMBERS[len(s.boxes)] and 1 <= len(s.boxes) <= 4
        elif family == "relation":
            assert len(s.boxes) == 2
            a, b = (obj_at(sc, bx) for bx in s.boxes)
            assert s.question == f"Do the {a.shape} and the {b.shape} have the same colour?"
            assert [x.shape for x in sc.objects].count(a.shape) == 1
            assert [x.shape for x in sc.objects].count(b.shape) == 1
            assert s.answer == ("yes" if a.colour == b.colour else "no")
        else:
            colour, shape = s.question.removeprefix("Is there a ").removesuffix("?").split()
            present = any(o.colour == colour and o.shape == shape for o in sc.objects)
            assert s.answer == ("yes" if present else "no")
            if s.answer == "no":  # the evidence of an absence: every object had to be checked
                assert sorted(s.boxes) == sorted(o.box for o in sc.objects)
            else:
                (o,) = [obj_at(sc, b) for b in s.boxes]
                assert (o.colour, o.shape) == (colour, shape)
    if family in ("relation", "exist"):  # both answers occur: the families are balanced by construction
        assert answers == {"yes", "no"}
    else:
        assert len(answers) > 1


def test_cell_labels_mark_exactly_the_object_cells():
    for seed in range(8):
        sc = world.sample(seed).scene
        W, H = sc.size
        lab = world.cell_labels(sc)
        assert set(lab) == {"colour", "shape", "glyph", "part"}
        union = boxes_to_token_mask([o.box for o in sc.objects], W, H, sc.rows, sc.cols)
        for k, v in lab.items():
            assert v.shape == (sc.rows, sc.cols)
            np.testing.assert_array_equal(v > 0, union, err_msg=k)
        for o in sc.objects:
            block = (slice(o.row, o.row + o.size), slice(o.col, o.col + o.size))
            assert (lab["colour"][block] == list(world.COLOURS).index(o.colour) + 1).all()
            assert (lab["shape"][block] == world.SHAPES.index(o.shape) + 1).all()
            assert (lab["glyph"][block] == list(world.GLYPHS).index(o.glyph) + 1).all()
            expected = [[1]] if o.size == 1 else [[2, 3], [4, 5]]
            np.testing.assert_array_equal(lab["part"][block], expected)


def test_render_draws_each_object_in_its_box_only():
    for seed in range(6):
        sc = world.sample(seed).scene
        img = world.render(sc)
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == sc.size
        px = np.asarray(img)
        union = np.zeros(px.shape[:2], dtype=bool)
        for o in sc.objects:
            x1, y1, x2, y2 = o.box
            union[y1:y2, x1:x2] = True
            fill = np.all(px[y1:y2, x1:x2] == world.COLOURS[o.colour], axis=-1)
            assert fill.sum() > 40 * o.size ** 2, (o, int(fill.sum()))
        coloured = np.zeros_like(union)
        for rgb in world.COLOURS.values():
            coloured |= np.all(px == rgb, axis=-1)
        assert not (coloured & ~union).any()  # background and clutter are grey


def _apart(a, b):
    """True when objects a and b have at least one free cell between them (their blocks grown by one cell do not
    overlap)."""
    return (a.col + a.size < b.col or b.col + b.size < a.col or a.row + a.size < b.row
            or b.row + b.size < a.row)


def test_objects_keep_a_one_cell_gap():
    # "a one-cell gap between objects": no two objects touch, not even at a corner (big objects included)
    for seed in range(60):
        objs = world.sample(seed).scene.objects
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert _apart(a, b), (seed, a, b)
    crowded = world.WorldConfig(big_prob=0.6)
    specs = [(s, "red") for s in world.SHAPES] * 2
    for seed in range(60):
        objs = world.place_objects(7, 7, specs, crowded, np.random.default_rng(seed)) or []
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert _apart(a, b), (seed, a, b)


def test_place_objects_uses_every_spot_and_big_prob():
    # one 1 x 1 object on a 2 x 2 canvas lands on each of its 4 cells (the last row and column included); one 2 x 2
    # object on a 3 x 3 canvas at each of its 4 top-left cells; big_prob 0 / 1 gives 1 x 1 / 2 x 2 objects
    rng = np.random.default_rng(0)
    small = {(o.col, o.row, o.size) for _ in range(200)
             for o in world.place_objects(2, 2, [("circle", "red")], world.WorldConfig(big_prob=0.0), rng)}
    assert small == {(0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)}
    big = {(o.col, o.row, o.size) for _ in range(200)
           for o in world.place_objects(3, 3, [("square", "blue")], world.WorldConfig(big_prob=1.0), rng)}
    assert big == {(0, 0, 2), (1, 0, 2), (0, 1, 2), (1, 1, 2)}


@pytest.mark.parametrize("shape, colour, glyph, size, ink", [
    ("square", "cyan", "A", 2, (0, 0, 0)), ("square", "yellow", "T", 1, (0, 0, 0)),
    ("circle", "red", "E", 1, (255, 255, 255)), ("diamond", "blue", "X", 2, (255, 255, 255)),
    ("triangle", "green", "A", 2, (255, 255, 255)), ("triangle", "purple", "E", 1, (255, 255, 255)),
])
def test_glyph_is_drawn_as_its_bitmap(shape, colour, glyph, size, ink):
    """The glyph family's answer is readable: the ink pixels (black on yellow / cyan, white otherwise) form the
    letter's 5 x 5 bitmap, each bit a (3 * size)-px block, inside the object's box and on its own colour."""
    o = world.Obj(shape, colour, glyph, 2, 1, size)
    px = np.asarray(world.render(world.Scene(6, 5, [o], clutter_seed=0)))
    x1, y1, x2, y2 = o.box
    inked = np.all(px == ink, axis=-1)
    assert not inked[:, :x1].any() and not inked[:, x2:].any() and not inked[:y1].any() and not inked[y2:].any()
    ys, xs = np.nonzero(inked)
    step = 3 * size
    assert ys.max() - ys.min() + 1 == xs.max() - xs.min() + 1 == 5 * step  # every letter spans its 5 x 5 grid
    for r, line in enumerate(world.GLYPHS[glyph]):
        for c, bit in enumerate(line):
            block = px[ys.min() + r * step:ys.min() + (r + 1) * step, xs.min() + c * step:xs.min() + (c + 1) * step]
            if bit == "1":
                assert (block == ink).all(), (r, c, bit)
            elif shape == "triangle":  # the letter's top corners may lie outside the triangle's slopes
                assert not np.all(block == ink, axis=-1).any(), (r, c, bit)
            else:
                assert (block == world.COLOURS[colour]).all(), (r, c, bit)


def test_default_family_covers_every_family_and_answers_are_balanced():
    assert {world.sample(s).family for s in range(60)} == set(world.FAMILIES)
    for family in ("relation", "exist"):  # yes / no balanced by construction, not by chance
        answers = [world.sample(s, family) for s in range(200)]
        assert 50 <= sum(a.answer == "yes" for a in answers) <= 150, family
    for s in range(300):  # "no" only when no object has the asked colour and shape
        a = world.sample(s, "exist")
        colour, shape = a.question.removeprefix("Is there a ").removesuffix("?").split()
        assert (a.answer == "yes") == any((o.colour, o.shape) == (colour, shape) for o in a.scene.objects), s


def test_world_config_bounds_are_used_and_checked():
    with pytest.raises(ValueError, match="min_objects"):
        world.WorldConfig(min_objects=0)
    with pytest.raises(ValueError, match="min_cells"):
        world.WorldConfig(min_cells=9, max_cells=8)
    exact = world.WorldConfig(min_cells=6, max_cells=6, min_objects=3, max_objects=3)
    for family in world.FAMILIES:
        for seed in range(4):
            sc = world.sample(seed, family, exact).scene
            assert (sc.cols, sc.rows, len(sc.objects)) == (6, 6, 3), (family, seed)


def _background(px, objects):
    """The pixels of ``px`` outside every object's box."""
    out = np.ones(px.shape[:2], dtype=bool)
    for o in objects:
        x1, y1, x2, y2 = o.box
        out[y1:y2, x1:x2] = False
    return px[out]


def test_clutter_setting_reaches_the_image():
    """WorldConfig.clutter (grey strokes per 64 cells, grey 90-199) is drawn: 0 leaves the light background noise
    (225-245) alone outside the objects; the scene is the same either way."""
    with pytest.raises(ValueError, match="clutter must be >= 0"):
        world.WorldConfig(clutter=-1)
    for seed in range(4):
        plain, busy = world.sample(seed, cfg=world.WorldConfig(clutter=0)), world.sample(seed)
        assert (plain.question, plain.scene.objects) == (busy.question, busy.scene.objects)
        assert (_background(np.asarray(world.render(plain.scene)), plain.scene.objects) >= 225).all()
        assert (_background(np.asarray(world.render(busy.scene)), busy.scene.objects) < 200).any()


def test_corpus_uses_its_seed():
    a = world.corpus(10, seed=1)
    assert a == world.corpus(10, seed=1) and a != world.corpus(10, seed=0)
    assert set(world.answer_vocabulary()) <= set(a)


# --------------------------------------------------------------------------- records


def test_write_split_round_trip(tmp_path):
    path = write_split(tmp_path / "split", n=10, seed=3)
    assert path == tmp_path / "split" / "records.jsonl"
    recs = read_records(path)
    assert len(recs) == 10
    assert len(read_records(path, limit=4)) == 4
    for i, r in enumerate(recs):
        s = world.sample(3 * 1_000_000 + i, world.FAMILIES[i % len(world.FAMILIES)])
        assert isinstance(r, Record)
        assert (r.question, r.answer, r.family) == (s.question, s.answer, s.family)
        assert (r.width, r.height) == s.scene.size
        assert r.bboxs == [[float(v) for v in b] for b in s.boxes]
        img_path = r.image_path(path.parent)
        assert img_path.is_file() and not r.image.startswith("/")
        with Image.open(img_path) as im:
            assert im.size == (r.width, r.height)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(world.render(s.scene)))
    assert len({r.id for r in recs}) == 10


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_visual_cot_row(tmp_path):
    row = {"question": "What is written on the sign?", "answer": "stop", "image": "/data/cot/gqa/1.jpg",
           "width": 640, "height": 480, "bboxs": [[10, 20, 110.5, 220]], "dataset": "gqa", "split": "train"}
    path = write_lines(tmp_path / "cot.jsonl", [json.dumps(row), "", json.dumps({**row, "bboxs": []})])
    a, b = read_records(path)
    assert a.family == "gqa" and b.family == "gqa"
    assert (a.question, a.answer, a.width, a.height) == ("What is written on the sign?", "stop", 640, 480)
    assert a.bboxs == [[10.0, 20.0, 110.5, 220.0]] and b.bboxs == []
    assert a.image_path(tmp_path) == Path(row["image"])  # absolute paths are kept
    assert a.id != b.id  # no id in the row: the file:line stands in


GOOD = {"question": "q?", "answer": "a", "image": "x.png", "width": 10, "height": 10, "bboxs": [[0, 0, 5, 5]]}


@pytest.mark.parametrize("bad, match", [
    ('{"question": "q?", "answer": "a", "image": "x.png", "width": 10}', r"lacks \['height'\]"),
    ("{not json", "not JSON"),
    (json.dumps({**GOOD, "bboxs": [[5, 0, 4, 5]]}), "x1 <= x2"),
    (json.dumps({**GOOD, "bboxs": [[0, 6, 5, 5]]}), "x1 <= x2"),
    (json.dumps({**GOOD, "bboxs": [[0, 0, 5]]}), r"\[x1, y1, x2, y2\]"),
    (json.dumps({**GOOD, "bboxs": "oops"}), "bboxs must be a list"),
    (json.dumps({**GOOD, "question": None}), "question must be a non-empty string, got None"),
    (json.dumps({**GOOD, "question": "  "}), "question must be a non-empty string"),
    (json.dumps({**GOOD, "answer": None}), "answer must be a string"),
    (json.dumps({**GOOD, "image": 3}), "image must be a non-empty string"),
    (json.dumps({**GOOD, "width": None}), "width must be a whole number of pixels > 0, got None"),
    (json.dumps({**GOOD, "height": "abc"}), "height must be a whole number"),
    (json.dumps({**GOOD, "width": 0}), "width must be a whole number of pixels > 0"),
    (json.dumps({**GOOD, "width": 10.5}), "width must be a whole number"),
    (json.dumps({**GOOD, "bboxs": [[0, None, 5, 5]]}), r"\(numbers\)"),
    (json.dumps({**GOOD, "bboxs": [[0, "1", 5, 5]]}), r"\(numbers\)"),
    (json.dumps({**GOOD, "bboxs": [[0, 0, 5, 5], [11, 2, 20, 8]]}), "wholly outside the 10x10 image"),
    (json.dumps({**GOOD, "bboxs": [[2, 10.5, 8, 30]]}), "wholly outside the 10x10 image"),
    (json.dumps({**GOOD, "bboxs": [[-9, 2, -1, 8]]}), "wholly outside"),
    (json.dumps({**GOOD, "bboxs": [[2, -4, 8, -0.5]]}), "wholly outside"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, match):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(ValueError, match=match) as err:
        read_records(path)
    assert f"{path}:3:" in str(err.value)


def test_boxes_partly_outside_or_on_the_edge_are_read(tmp_path):
    """Annotations that overhang the image (they are clipped to it) or touch its edge are not errors."""
    rows = [{**GOOD, "bboxs": box} for box in ([[-3, 8, 4, 14]], [[10, 10, 10, 10]], [[0, 0, 0, 0]])]
    recs = read_records(write_lines(tmp_path / "ok.jsonl", [json.dumps(r) for r in rows]))
    assert [r.bboxs for r in recs] == [[[-3.0, 8.0, 4.0, 14.0]], [[10.0] * 4], [[0.0] * 4]]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no record file"):
        read_records(tmp_path / "nope.jsonl")


def test_numeric_string_sizes_and_repeated_ids(tmp_path, caplog):
    rows = [{**GOOD, "id": "a", "width": "10"}, {**GOOD, "id": "a"}, {**GOOD, "id": "a#2"}, {**GOOD, "id": "a"}]
    path = write_lines(tmp_path / "ids.jsonl", [json.dumps(r) for r in rows])
    with caplog.at_level("WARNING"):
        recs = read_records(path)
    assert recs[0].width == 10
    assert [r.id for r in recs] == ["a", "a#3", "a#2", "a#4"]  # unique, in file order; the file's own a#2 kept
    assert "2 records repeat" in caplog.text


def test_boxes_follow_the_image_as_loaded(tmp_path):
    """A record's boxes are pixels of its declared size: a resized copy gets them scaled; an EXIF-rotated file
    (another aspect once loaded) is refused by name instead of marking the wrong tokens (training used the declared
    size, compare the loaded one)."""
    from PIL import Image

    from glimpseprune.data.records import boxes_on_image
    from glimpseprune.training.stage1 import RecordDataset

    rec = Record("r1", "a.jpg", "q?", "a", 224, 112, [[70, 40, 100, 70]])
    assert boxes_on_image(rec, (224, 112)) == [[70, 40, 100, 70]]
    assert boxes_on_image(rec, (112, 56)) == [[35.0, 20.0, 50.0, 35.0]]
    with pytest.raises(ValueError, match=r"record r1: .*224x112 but its image a.jpg loads as 112x224"):
        boxes_on_image(rec, (112, 224))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: PIL's exif_transpose turns the 224 x 112 file into 112 x 224
    Image.new("RGB", (224, 112), (200, 30, 30)).save(tmp_path / "a.jpg", exif=exif)
    write_lines(tmp_path / "r.jsonl", [json.dumps({**GOOD, "image": "a.jpg", "width": 224, "height": 112,
                                                   "bboxs": [[70, 40, 100, 70]]})])
    with pytest.raises(ValueError, match="EXIF orientation applied"):
        RecordDataset(tmp_path / "r.jsonl")[0]


def test_visual_cot_keys_ids_and_answer_types(tmp_path):
    """Visual-CoT rows name their id ``question_id`` and may spell the boxes ``bboxes``; a numeric answer reads as
    text, a boolean one is refused (``str(True)`` would be a wrong answer)."""
    row = {"question_id": 7, "question": "q?", "answer": 3, "image": "1.jpg", "width": 10, "height": 10,
           "bboxes": [[1, 2, 3, 4]], "dataset": "gqa"}
    (r,) = read_records(write_lines(tmp_path / "cot.jsonl", [json.dumps(row)]))
    assert (r.id, r.answer, r.bboxs, r.family) == ("7", "3", [[1.0, 2.0, 3.0, 4.0]], "gqa")
    path = write_lines(tmp_path / "bool.jsonl", [json.dumps({**row, "answer": True})])
    with pytest.raises(ValueError, match=f"{path}:1: answer must be a string"):
        read_records(path)


def test_image_path_falls_back_to_the_dataset_folder(tmp_path):
    """A Visual-CoT training row's image lives under ``<root>/<dataset>/``; ``root/image`` wins when it exists."""
    rec = Record("r", "1.jpg", "q?", "a", 10, 10, family="gqa")
    assert rec.image_path(tmp_path) == tmp_path / "1.jpg"  # neither exists: the plain path, for the error message
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "1.jpg").write_bytes(b"x")
    assert rec.image_path(tmp_path) == tmp_path / "gqa" / "1.jpg"
    (tmp_path / "1.jpg").write_bytes(b"y")
    assert rec.image_path(tmp_path) == tmp_path / "1.jpg"


def test_boxes_on_an_image_of_another_aspect_are_refused():
    from glimpseprune.data.records import boxes_on_image

    rec = Record("r2", "a.png", "q?", "a", 224, 112, [[70, 40, 100, 70]])
    with pytest.raises(ValueError, match="record r2"):  # 224 x 124: the aspect is 10 % off, the boxes would be too
        boxes_on_image(rec, (224, 124))
    assert boxes_on_image(rec, (448, 224)) == [[140.0, 80.0, 200.0, 140.0]]


def test_split_checks_n_and_cfg_and_keeps_files_outside_its_folder(tmp_path):
    from glimpseprune.data.records import has_split

    with pytest.raises(ValueError, match="at least one sample"):
        write_split(tmp_path / "none", n=0, seed=0)
    out, small = tmp_path / "w", world.WorldConfig(max_cells=8)
    path = write_split(out, n=1, seed=1, cfg=small)
    assert has_split(out, 1, 1, small)
    assert not has_split(out, 1, 1) and not has_split(out, 2, 1, small) and not has_split(out, 1, 2, small)
    # a records file naming images outside its folder: --overwrite removes the split's own files only (and does
    # not trip over an absolute path)
    (tmp_path / "up.png").write_bytes(b"keep")
    (tmp_path / "abs.png").write_bytes(b"keep")
    with path.open("a") as f:
        f.write(json.dumps({**GOOD, "image": "../up.png"}) + "\n")
        f.write(json.dumps({**GOOD, "image": str(tmp_path / "abs.png")}) + "\n")
    write_split(out, n=1, seed=2, overwrite=True)
    assert (tmp_path / "up.png").read_bytes() == (tmp_path / "abs.png").read_bytes() == b"keep"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["2-000000.png"]
