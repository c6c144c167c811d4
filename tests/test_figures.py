"""The report figures (compare.png, k_sweep.png) from synthetic results, and the ``ask --overlay`` image: no model."""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

from glimpseprune.bench.compare import GLIMPSE_COLOR, compare_figure, k_sweep_figure, plot, plot_k_sweep
from glimpseprune.bench.overlay import _dilate, caption_lines, grid_box, kept_pixels, overlay

BUDGETS = (0.056, 0.111, 0.222, 0.333)


def _run(method, setting, budget, kept, score, label=None, score_key="exact_match", **extra):
    return {"version": 1, "label": label or (method if budget is None else f"{method}@{budget:g}"), "method": method,
            "setting": setting, "budget": budget, "n": 40, "n_layers": 4, score_key: score,
            "kept_frac": {"mean": kept, "median": kept, "min": kept, "max": kept},
            "accounting": {"mean_n_vis": 153.8, "visual_tokens_entering_llm": 153.8, "equivalent_visual_tokens": 100.0,
                           "equivalent_frac": 0.6, "kv_entries_at_decode": 60.0, "visual_kv_at_decode": 8.0},
            "per_family": {}, "model": "/models/Qwen2.5-VL-3B-Instruct", "module": "/ckpt/glimpse-3b", **extra}


def results(score_key="exact_match", **extra):
    """A comparison whose glimpse line coincides with two peers (as on the easy world) and lies under the full line."""
    rs = [_run("full", "full", 1.0, 1.0, 1.0, label="full", score_key=score_key, **extra)]
    for m, scores in (("glimpse", (1.0, 1.0, 1.0, 1.0)), ("glimpse_attn", (1.0, 1.0, 1.0, 1.0)),
                      ("fastv", (0.9, 1.0, 1.0, 1.0)), ("random", (0.52, 0.62, 0.72, 0.82)),
                      ("pdrop", (0.45, 0.45, 0.5, 0.6))):
        rs += [_run(m, "fixed", b, b * 0.95, s, score_key=score_key, **extra) for b, s in zip(BUDGETS, scores)]
    rs.append(_run("glimpse", "dynamic", None, 0.032, 1.0, label="glimpse (dynamic)", score_key=score_key, **extra))
    rs.append(_run("glimpse", "dynamic_cap", 0.111, 0.032, 1.0, label="glimpse (dynamic, cap 0.111)",
                   score_key=score_key, **extra))
    rs.append(_run("oracle", "oracle", None, 0.023, 1.0, label="oracle (box tokens)", score_key=score_key, **extra))
    return rs


def _outside(fig, ax, legend) -> bool:
    fig.draw_without_rendering()
    a, g = ax.get_window_extent(), legend.get_window_extent()
    return g.x0 >= a.x1 or g.x1 <= a.x0 or g.y0 >= a.y1 or g.y1 <= a.y0


def test_compare_plot_glimpse_on_top_legend_outside_title_names_model_and_data(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    rs = results(split="/data/world/records.jsonl")
    fig = compare_figure(rs)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    glimpse = lines["glimpse (GlimpsePrune, fixed budget)"]
    rest = [ln for ln in ax.get_lines() if ln is not glimpse]
    assert glimpse.get_zorder() > max(ln.get_zorder() for ln in rest)  # on top of every line, full included
    assert glimpse.get_linewidth() > max(ln.get_linewidth() for ln in rest)
    assert glimpse.get_color() == GLIMPSE_COLOR
    peer_colors = {ln.get_color() for ln in ax.get_lines() if ln.get_label() in ("fastv", "random", "pdrop")}
    point_colors = {tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections}
    assert len(peer_colors) == 3 and len(point_colors) == 3  # each peer and each single point its own colour
    assert not {tuple(np.round(to_rgba(c), 3)) for c in peer_colors | {GLIMPSE_COLOR}} & point_colors
    assert len({ln.get_marker() for ln in ax.get_lines() if ln.get_label() in ("fastv", "random", "pdrop")}) == 3
    assert {t.get_text() for t in ax.texts} >= {"dynamic", "dynamic, capped", "oracle", "full\n1.000"}
    legend = ax.get_legend()
    assert _outside(fig, ax, legend)
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0].startswith("glimpse") and any(x.startswith("full") for x in labels)
    assert any(x.startswith("glimpse (dynamic)") for x in labels) and any(x.startswith("oracle") for x in labels)
    title = fig.get_suptitle()
    assert "Qwen2.5-VL-3B-Instruct" in title and "world/records.jsonl" in title
    assert "40 samples" in ax.get_title(loc="left")
    assert ax.get_xlabel() == "visual tokens kept (% of N, mean per sample)" and ax.get_ylabel() == "exact match"
    assert plot(rs, tmp_path / "compare.png") == tmp_path / "compare.png"
    assert Image.open(tmp_path / "compare.png").size[0] > 800


def test_compare_plot_task_results_and_missing_fields(tmp_path):
    pytest.importorskip("matplotlib")
    fig = compare_figure(results(score_key="score", task="mme", data="/bench/MME"), score_key="score",
                         score_name="mme score")
    assert "mme" in fig.get_suptitle() and "MME" in fig.get_suptitle()
    assert fig.axes[0].get_ylabel() == "mme score"
    bare = [{k: v for k, v in r.items() if k not in ("model", "module", "split")} for r in results()]
    fig = compare_figure(bare, title="my title")
    assert fig.get_suptitle() == "my title"
    assert compare_figure(bare).get_suptitle()  # no model, no data: still a title
    assert plot(bare, tmp_path / "c.png", "exact_match", "exact match") == tmp_path / "c.png"
    only_full = [r for r in results() if r["method"] in ("full", "random")]
    assert plot(only_full, tmp_path / "d.png") == tmp_path / "d.png"


def k_result(**extra):
    rows = [{"K": k, "prefill_ratio_analytic": p, "glimpse_masks": g, "oracle": o, "fastv_topk": f}
            for k, p, g, o, f in ((-1, 0.26, 0.675, 0.7, None), (0, 0.44, 0.975, 1.0, 0.45), (1, 0.63, 1.0, 1.0, 1.0),
                                  (2, 0.81, 1.0, 1.0, 1.0), (3, 1.0, 1.0, 1.0, 1.0))]
    return {"version": 1, "model": "embedded", "module": "embedded", "split": "/tmp/w/records.jsonl", "n": 40,
            "n_layers": 4, "module_prune_layer": 2, "full_exact_match": 1.0, "glimpse_dynamic_exact_match": 1.0,
            "glimpse_kept_frac_mean": 0.032, "mean_n_vis": 153.8, "mean_n_text": 51, "rows": rows, **extra}


def test_k_sweep_plot_title_legend_with_prefill_integer_ticks(tmp_path):
    pytest.importorskip("matplotlib")
    fig = k_sweep_figure(k_result())
    ax = fig.axes[0]
    title = fig.get_suptitle()
    assert "embedded" in title and "w/records.jsonl" in title
    sub = ax.get_title(loc="left")
    assert "40 samples" in sub and "K = 2" in sub
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("prefill" in x for x in labels) and labels[0].startswith("GlimpsePrune")
    assert any(x.startswith("full") for x in labels) and any("K = 2" in x for x in labels)
    assert _outside(fig, ax, legend)
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert plot_k_sweep(k_result(), tmp_path / "k.png") == tmp_path / "k.png"
    assert Image.open(tmp_path / "k.png").size[0] > 800


def test_k_sweep_plot_without_optional_fields(tmp_path):
    pytest.importorskip("matplotlib")
    r = k_result()
    for key in ("model", "module", "split", "module_prune_layer", "glimpse_kept_frac_mean"):
        r.pop(key)
    assert plot_k_sweep(r, tmp_path / "k.png") == tmp_path / "k.png"


# ------------------------------------------------------------------------------------------------------ overlay


def _image(w=200, h=150, seed=0):
    """A test image with saturated patches of several colours (white, yellow, black, red, ...)."""
    rng = np.random.default_rng(seed)
    colours = np.array([(255, 255, 255), (250, 220, 0), (0, 0, 0), (220, 30, 30), (30, 90, 230), (40, 180, 60)])
    arr = colours[rng.integers(0, len(colours), (h // 10 + 1, w // 10 + 1))].repeat(10, 0).repeat(10, 1)[:h, :w]
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def test_overlay_keeps_the_input_size_and_marks_kept_tokens():
    image = _image(203, 157)  # not a multiple of the grid: drawn at its own size all the same
    keep = np.zeros((6, 8), dtype=bool)
    keep[2:4, 3:5] = True
    out = overlay(image, keep)
    assert out.size == image.size
    src, got = np.asarray(image, dtype=int), np.asarray(out, dtype=int)
    mask = kept_pixels(keep, image.size)
    assert mask.sum() > 0 and (~mask).sum() > 0
    assert np.array_equal(got[mask], src[mask])  # kept tokens untouched
    far = ~_dilate(mask, 8)  # dropped pixels away from the outline
    dropped = got[far]
    assert np.abs(dropped - src[far]).mean() > 30  # dropped tokens changed: dimmed ...
    assert np.abs(dropped - dropped.mean(axis=1, keepdims=True)).max() <= 1  # ... and grey
    ring = set(map(tuple, got[~mask].reshape(-1, 3)))
    assert (0, 0, 0) in ring and (255, 255, 255) in ring  # the two-tone outline


def test_overlay_outline_is_visible_on_every_colour():
    for colour in ((255, 255, 255), (0, 0, 0), (250, 220, 0), (255, 0, 255)):
        image = Image.new("RGB", (120, 120), colour)
        keep = np.zeros((4, 4), dtype=bool)
        keep[1, 1] = True
        got = np.asarray(overlay(image, keep), dtype=int)
        row = got[45]  # through the kept cell (pixels 30..59): both outline tones around it, whatever the colour
        assert any((row == (0, 0, 0)).all(axis=1)) and any((row == (255, 255, 255)).all(axis=1))


def test_overlay_caption_band_below_only_when_asked():
    image = _image(240, 180)
    keep = np.eye(6, 8, dtype=bool)
    plain = overlay(image, keep)
    out = overlay(image, keep, question="What colour is the triangle? " * 6, answer="purple", kept=6, total=48)
    assert out.width == image.width and out.height > image.height
    assert np.array_equal(np.asarray(out)[:image.height], np.asarray(plain))  # the band does not cover the image
    band = np.asarray(out)[image.height:]
    assert (band < 100).all(axis=2).any()  # text drawn
    assert caption_lines(kept=6, total=48)[-1][0] == "kept 6/48 (12.5 %)"
    assert [x for x, _ in caption_lines("Q?", "A")] == ["Q: Q?", "A: A"]
    assert overlay(image, keep, kept=3).height > image.height  # any caption field alone makes a band
    narrow = overlay(_image(40, 200), np.ones((5, 1), bool), question="a long question " * 20, answer="x")
    assert narrow.width == 40 and narrow.height > 200


def test_overlay_size_argument_still_resizes():
    assert overlay(_image(100, 80), np.ones((2, 2), bool), (56, 28)).size == (56, 28)


def test_grid_box_whole_image_or_llava_geometry():
    qwen = types.SimpleNamespace(model_types=("qwen2_5_vl",))
    assert grid_box(qwen, None, (517, 401)) == (0.0, 0.0, 517.0, 401.0)
    llava = types.SimpleNamespace(model_types=("llava",))
    pad = types.SimpleNamespace(image_processor=types.SimpleNamespace(
        do_pad=True, do_resize=True, size={"shortest_edge": 336}, do_center_crop=True,
        crop_size={"height": 336, "width": 336}))
    left, top, right, bottom = grid_box(llava, pad, (400, 200))  # padded to a 400 square, the image centred
    assert (left, right) == pytest.approx((0, 400), abs=1.5) and (top, bottom) == pytest.approx((-100, 300), abs=1.5)
    crop = types.SimpleNamespace(image_processor=types.SimpleNamespace(
        do_pad=False, do_resize=True, size={"shortest_edge": 336}, do_center_crop=True,
        crop_size={"height": 336, "width": 336}))
    left, top, right, bottom = grid_box(llava, crop, (400, 200))  # the central 200 x 200 square
    assert (left, right) == pytest.approx((100, 300), abs=1.5) and (top, bottom) == pytest.approx((0, 200), abs=1.5)
    keep = np.zeros((2, 2), dtype=bool)
    keep[0, 0] = True  # top-left cell of the padded square: the image's top-left quarter above y = 100 only
    m = kept_pixels(keep, (400, 200), (0.0, -100.0, 400.0, 300.0))
    assert m[:100, :200].all() and not m[100:].any() and not m[:, 200:].any()


def test_compare_plot_glimpse_line_in_kept_order_and_sample_range():
    """Budgets given out of order still draw glimpse's line left to right; runs over different sample counts name
    the range in the subtitle."""
    pytest.importorskip("matplotlib")
    rs = [_run("full", "full", 1.0, 1.0, 1.0, label="full")]
    rs += [_run("glimpse", "fixed", b, b, s) for b, s in ((0.333, 0.9), (0.056, 0.5), (0.222, 0.8))]
    rs.append({**_run("random", "fixed", 0.111, 0.111, 0.4), "n": 38})
    ax = compare_figure(rs).axes[0]
    glimpse = next(ln for ln in ax.get_lines() if ln.get_label() == "glimpse (GlimpsePrune, fixed budget)")
    assert list(glimpse.get_xdata()) == pytest.approx([5.6, 22.2, 33.3])
    assert list(glimpse.get_ydata()) == [0.5, 0.8, 0.9]
    assert "38-40 samples" in ax.get_title(loc="left")


def test_contact_sheet_layout_and_frame_groups_by_hand(monkeypatch):
    """3 frames of 40x30 px, keep (t=2, 2, 2), temporal patch 2: frames 0 and 1 show group 0 (all kept: their own
    colour), frame 2 group 1 (all dropped: dimmed grey). Columns ceil(sqrt(3)) = 2, rows 2, gap 4: 84 x 64 px."""
    from PIL import ImageDraw

    from glimpseprune.bench.overlay import DIM, contact_sheet

    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    frames = [Image.new("RGB", (40, 30), c) for c in colours]
    keep = np.zeros((2, 2, 2), dtype=bool)
    keep[0] = True
    labels = []
    text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: (labels.append(t),
                                                                                   text(self, xy, t, *a, **k)))
    sheet = contact_sheet(frames, keep, temporal_patch_size=2, fps=2.0)
    assert sheet.size == (2 * 40 + 4, 2 * 30 + 4)
    px = np.asarray(sheet, dtype=int)
    assert tuple(px[20, 30]) == colours[0] and tuple(px[20, 44 + 30]) == colours[1]  # tile (row 0, col 1)
    grey = round(DIM * 0.114 * 200)  # frame 2, dropped: DIM x its luma
    assert tuple(px[34 + 20, 30]) == (grey, grey, grey)
    assert labels == ["#0 0.0s", "#1 0.5s", "#2 1.0s"]  # frame index and time at 2 fps
    assert contact_sheet(frames + frames[:1], keep).size == (84, 64)  # 4 frames fill 2 groups of 2
    with pytest.raises(ValueError, match="5 frames do not fit"):
        contact_sheet(frames + frames[:2], keep)


@pytest.mark.parametrize("name", ["o.png", "o.jpg"])
def test_saved_overlay_is_marked_and_a_failed_save_leaves_the_earlier_file(tmp_path, name):
    from glimpseprune.bench.overlay import is_overlay, save_overlay

    path = tmp_path / name
    save_overlay(_image(40, 30), path)
    assert is_overlay(path) and not is_overlay(tmp_path / "missing.png")
    before = path.read_bytes()

    class Failing:
        def save(self, fp, **kw):
            fp.write_bytes(b"half an image")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_overlay(Failing(), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_kept_pixels_by_pixel_centres_and_box_by_hand():
    # 4 px over 3 cells (edges at 1.33 and 2.67 px): the centres 0.5, 1.5, 2.5, 3.5 fall in cells 0, 1, 1, 2
    assert kept_pixels(np.array([[False, True, False]]), (4, 1)).tolist() == [[False, True, True, False]]
    # one kept cell over the box x in [0, 2), y in [-1, 1) of a 4 x 2 image: pixels outside the box are not kept
    assert kept_pixels(np.ones((1, 1), bool), (4, 2), box=(0.0, -1.0, 2.0, 1.0)).tolist() == [
        [True, True, False, False], [False, False, False, False]]


def test_dilate_grows_both_ways_by_hand():
    dot = np.zeros((5, 5), bool)
    dot[2, 2] = True
    want = np.zeros((5, 5), bool)
    want[1:4, 1:4] = True  # a 3 x 3 square around it
    assert np.array_equal(_dilate(dot, 1), want) and np.array_equal(_dilate(dot, 0), dot)
    assert _dilate(np.array([[True, False, False]]), 5).tolist() == [[True, True, True]]  # r past the edge
    assert _dilate(np.array([[False, False, True]]), 1).tolist() == [[False, True, True]]


def test_dropped_tokens_are_dimmed_grey_by_hand():
    from glimpseprune.bench.overlay import DIM

    got = np.asarray(overlay(Image.new("RGB", (20, 20), (200, 0, 0)), np.zeros((2, 2), bool)), dtype=int)
    v = round(DIM * 0.299 * 200)  # 25: the luma of pure red 200, times DIM; no outline around nothing
    assert DIM < 1 and (got == v).all()
