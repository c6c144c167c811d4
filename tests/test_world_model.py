"""The world-model trainer's batch building and attention supervision, on hand-built attention maps."""

import math

import pytest
import torch

from glimpseprune.data import world
from glimpseprune.training import world_model as wm


@pytest.fixture(scope="module")
def built():
    return wm.build(0)


def _samples():
    # one lookup, one exist-"no" (no object to ground), found by scanning seeds
    look = world.sample(11, "lookup", world.WorldConfig(max_cells=8))
    no = next(s for s in (world.sample(i, "exist", world.WorldConfig(max_cells=8)) for i in range(50))
              if s.answer == "no")
    return [look, no]


def test_qa_batch_labels_the_answer_and_its_end_only(built):
    _, proc = built
    samples = _samples()
    batch = wm._qa_batch(proc, samples)
    tok = proc.tokenizer
    for b, s in enumerate(samples):
        labelled = (batch["labels"][b] != -100).nonzero().flatten().tolist()
        assert len(labelled) == 2 and labelled[1] == labelled[0] + 1
        assert tok.convert_ids_to_tokens(int(batch["input_ids"][b, labelled[0]])).lstrip("\u0120") == s.answer
        assert int(batch["input_ids"][b, labelled[1]]) == tok.convert_tokens_to_ids("<|im_end|>")
        assert int(wm._first_answer(batch)[b]) == labelled[0] - 1


def _attention(batch, rows_to_cols, n_layers=4, heads=4):
    """Attention maps (layers, B, heads, L, L): uniform over the causal past, except the given (layer, b, cols[,
    head slice]) rows of the answer-predicting position, which put all their mass on ``cols``."""
    ids = batch["input_ids"]
    B, L = ids.shape
    causal = torch.tril(torch.ones(L, L))
    base = (causal / causal.sum(-1, keepdim=True)).expand(B, heads, L, L).clone()
    maps = [base.clone() for _ in range(n_layers)]
    first = wm._first_answer(batch)
    for layer, b, cols, *hs in rows_to_cols:
        h = hs[0] if hs else slice(None)
        maps[layer][b, h, first[b]] = 0.0
        maps[layer][b, h, first[b], cols] = 1.0 / len(cols)
    return maps


def test_attention_supervision_is_low_only_when_both_hops_attend_right(built):
    model, proc = built
    samples = _samples()
    batch = wm._qa_batch(proc, samples)
    ids = batch["input_ids"]
    image = model.config.image_token_id
    tok = proc.tokenizer
    words = {tok.convert_tokens_to_ids("\u0120" + w) for w in list(world.COLOURS) + list(world.SHAPES)}

    end = tok.convert_tokens_to_ids("<|im_end|>")

    def question(b):  # the question's tokens: after <|vision_end|>, up to its <|im_end|>
        start = int((ids[b] == image).nonzero().max()) + 2
        stop = next(i for i in range(start, ids.shape[1]) if int(ids[b, i]) == end)
        return list(range(start, stop))

    def question_words(b):
        return [i for i in question(b) if int(ids[b, i]) in words]

    def hint(b):  # head 0 on the object words, heads 1.. on the whole question
        return [(0, b, question_words(b), slice(0, 1)), (0, b, question(b), slice(1, None))]

    look = samples[0]
    obj = next(o for o in look.scene.objects if o.box == look.boxes[0])
    img_pos = (ids[0] == image).nonzero().flatten()
    box_pos = img_pos[torch.tensor([obj.row * look.scene.cols + obj.col])].tolist() if obj.size == 1 else None
    if box_pos is None:  # a 2 x 2 object: its four cells in raster order
        box_pos = [int(img_pos[(obj.row + r) * look.scene.cols + obj.col + c]) for r in (0, 1) for c in (0, 1)]
    assert question_words(0) and set(question_words(0)) < set(question(0))
    right = _attention(batch, [*hint(0), (1, 0, box_pos), *hint(1)])
    loss_right = float(wm.attention_supervision(model, proc, batch, samples, right, 0, 1, 2))
    assert loss_right == pytest.approx(0.0, abs=1e-4)

    uniform = _attention(batch, [])
    loss_uniform = float(wm.attention_supervision(model, proc, batch, samples, uniform, 0, 1, 2))
    assert loss_uniform > 2.0  # -log of a few tokens' share of ~100

    # the hint hop right but the grounding hop elsewhere (on a visual token outside the box)
    outside = next(int(p) for p in img_pos if int(p) not in box_pos)
    wrong = _attention(batch, [*hint(0), (1, 0, [outside]), *hint(1)])
    # one of five terms at -log(1e-6) = 13.8
    assert float(wm.attention_supervision(model, proc, batch, samples, wrong, 0, 1, 2)) > 2.0

    # head 0 spread over the whole question (instead of its object words) costs -log(share of object words)
    swapped = _attention(batch, [(0, 0, question(0)), (1, 0, box_pos), *hint(1)])
    share = len(question_words(0)) / len(question(0))
    n_terms = 5  # row 0: object words, question, box; row 1 (exist "no"): object words, question
    assert float(wm.attention_supervision(model, proc, batch, samples, swapped, 0, 1, 2)) == pytest.approx(
        -math.log(share) / n_terms, rel=1e-3)

    # the exist-"no" row has no grounding term: moving its layer-1 attention changes nothing
    moved = _attention(batch, [*hint(0), (1, 0, box_pos), *hint(1), (1, 1, [int((ids[1] == image).nonzero()[0])])])
    assert float(wm.attention_supervision(model, proc, batch, samples, moved, 0, 1, 2)) == pytest.approx(loss_right,
                                                                                                         abs=1e-6)


def test_dense_heads_cover_every_cell_label():
    scene = world.sample(3).scene
    assert set(world.cell_labels(scene)) == set(wm.HEADS)
    labels = wm._dense_labels([world.sample(3)])
    assert all(int(labels[k].max()) < n for k, n in wm.HEADS.items())


def test_count_head_is_taught_one_token_per_object_plus_a_sink(built):
    model, proc = built
    cfg = world.WorldConfig(max_cells=8, big_prob=1.0)  # 2 x 2 objects: four tokens each, one anchor
    s = next(x for x in (world.sample(i, "count", cfg) for i in range(100)) if x.answer in ("two", "three"))
    batch = wm._qa_batch(proc, [s])
    img_pos = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    cols = s.scene.cols
    box_tokens = [int(img_pos[(y // 28) * cols + x // 28]) for x1, y1, x2, y2 in s.boxes
                  for y in range(y1, y2, 28) for x in range(x1, x2, 28)]
    anchors = [int(img_pos[(y1 // 28) * cols + x1 // 28]) for x1, y1, _, _ in s.boxes]
    sink = int(img_pos.min()) - 1
    m = len(anchors) + 1
    right = _attention(batch, [(1, 0, box_tokens, slice(0, 2)), (1, 0, [sink, *anchors], slice(2, 3))])
    loss = float(wm.attention_supervision(model, proc, batch, [s], right, -1, 1, 2))
    assert loss == pytest.approx(math.log(m) / 2, rel=1e-4)  # ground term 0, count term log(m) at its minimum
    # the counting head spread over every token of the objects instead: no sink, 4 tokens per object -> larger
    spread = _attention(batch, [(1, 0, box_tokens, slice(0, 2)), (1, 0, box_tokens, slice(2, 3))])
    assert float(wm.attention_supervision(model, proc, batch, [s], spread, -1, 1, 2)) > loss + 1.0


def test_count_head_probe_agrees_with_greedy_generation(tmp_path):
    """benchmarks/world_model_probe/count_head.py (the README's reading of the shipped base's counting head): its
    per-question prediction (teacher-forced first answer token, argmax over the number words) equals the full-token
    model's greedy answer from the library's own generate, its attention shares are a partition of at most 1, and a
    second run into the same --out is refused."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import glimpseprune as gp
    from glimpseprune.assets import resolve_model

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "count_head.json"
    cmd = [sys.executable, str(root / "benchmarks/world_model_probe/count_head.py"), "--seed", "3", "--n", "40",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1])["per_n"] == res["per_n"]
    rows = res["rows"]
    assert len(rows) == 8  # every 5th of 40 is a counting question
    model, processor = gp.load_base(resolve_model("embedded"))
    pm = gp.apply(model, "full", processor=processor)
    samples = [world.sample(3_000_000 + i, "count") for i in range(40) if world.FAMILIES[i % 5] == "count"]
    gen = pm.generate(images=[[world.render(s.scene)] for s in samples], questions=[s.question for s in samples],
                      max_new_tokens=4)
    assert [t.strip() for t in gen.texts] == [r["prediction"] for r in rows]
    assert [s.answer for s in samples] == [r["answer"] for r in rows]
    for r in rows:
        parts = (r["sink"], r["anchors"], r["other_cells"], r["other_visual"])
        assert all(p >= -1e-6 for p in parts) and sum(parts) <= 1 + 1e-5
    assert res["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr
