"""Stage-1 training: losses on hand-computed values, the differentiable forward against the stock model (oracle),
gradients, the collator, and Trainer resume."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IMG_A, IMG_C, make_batch, small_glimpse_config
from safetensors.torch import load_file

import glimpseprune as gp
from glimpseprune.data import world
from glimpseprune.data.records import boxes_to_token_mask, write_split
from glimpseprune.methods.base import PruningMethod
from glimpseprune.methods.full import FullMethod
from glimpseprune.runtime.train import forward_train
from glimpseprune.testing import build_tiny_qwen2_5_vl
from glimpseprune.training.losses import bce_loss, dice_loss, kl_loss, lm_loss, mask_loss, mask_metrics
from glimpseprune.training.stage1 import Collator, RecordDataset, Stage1Config, Stage1Model, WorldDataset, build_module
from glimpseprune.training.trainer import train

LN2 = math.log(2.0)
EPS = 1e-6


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


# --------------------------------------------------------------------------- losses


def test_dice_and_bce_hand_values():
    # p = (0.5, 0.5), g = (1, 0): Dice = 1 - (2 * 0.5 + eps) / (1 + 1 + eps), BCE = ln 2
    assert float(dice_loss(t(0, 0), t(1, 0))) == pytest.approx(1 - (1 + EPS) / (2 + EPS), abs=1e-7)
    assert float(bce_loss(t(0, 0), t(1, 0))) == pytest.approx(LN2, abs=1e-6)
    # p = sigmoid(ln 3) = 0.75 on a positive, 0.25 on a negative
    p = (0.75, 0.25)
    assert float(dice_loss(t(math.log(3), -math.log(3)), t(1, 0))) == pytest.approx(
        1 - (2 * 0.75 + EPS) / (sum(p) + 1 + EPS), abs=1e-6)
    assert float(bce_loss(t(math.log(3), -math.log(3)), t(1, 0))) == pytest.approx(-math.log(0.75), abs=1e-6)
    # perfect confident prediction: both ~0; empty target with p ~ 0: Dice ~ 0 thanks to eps
    assert float(dice_loss(t(30, -30), t(1, 0))) == pytest.approx(0.0, abs=1e-6)
    assert float(bce_loss(t(30, -30), t(1, 0))) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(t(-30, -30), t(0, 0))) == pytest.approx(0.0, abs=1e-5)
    # bool / int targets and half logits are accepted (computed in fp32)
    assert float(bce_loss(t(0, 0).half(), torch.tensor([True, False]))) == pytest.approx(LN2, abs=1e-6)


def test_mask_loss_weights_and_batch_mean():
    logits = [t(0, 0), t(0)]
    targets = [t(1, 0), t(0)]
    d1, d2 = 1 - (1 + EPS) / (2 + EPS), 1 - EPS / (0.5 + EPS)  # second: p = 0.5, g = 0 -> Dice ~ 1
    assert float(mask_loss(logits, targets)) == pytest.approx(((d1 + 0.1 * LN2) + (d2 + 0.1 * LN2)) / 2, abs=1e-6)
    assert float(mask_loss(logits, targets, 2.0, 0.5)) == pytest.approx(
        ((2 * d1 + 0.5 * LN2) + (2 * d2 + 0.5 * LN2)) / 2, abs=1e-6)
    assert float(mask_loss(logits, targets, 0.0, 1.0)) == pytest.approx(LN2, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        mask_loss([t(0, 0)], [t(1, 0, 0)])
    with pytest.raises(ValueError, match="logit vectors"):
        mask_loss([t(0)], [t(0), t(1)])


def test_lm_loss_ignores_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    want = F.cross_entropy(logits[mask], ids[mask])  # token mean over the 3 set positions
    assert float(lm_loss(logits, ids, mask)) == pytest.approx(float(want), abs=1e-6)
    changed = logits.clone()
    changed[~mask] = 100 * torch.randn(3, 7, generator=g)
    ids2 = ids.masked_fill(~mask, 6)
    assert float(lm_loss(changed, ids2, mask)) == pytest.approx(float(want), abs=1e-6)
    # uniform over 4 classes: ln 4; an all-masked batch gives 0, not NaN
    assert float(lm_loss(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.bool))) == \
        pytest.approx(math.log(4), abs=1e-6)
    assert float(lm_loss(logits, ids, torch.zeros_like(mask))) == 0.0


def test_kl_loss():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 5, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert float(kl_loss(a, a.clone(), mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_loss(a + 3.0, a, mask)) == pytest.approx(0.0, abs=1e-5)  # shift-invariant
    b = torch.randn(2, 3, 5, generator=g)
    assert float(kl_loss(b, a, mask)) > 1e-3
    # teacher (0.5, 0.5), student (0.25, 0.75): KL(t || s) = 0.5 ln 2 + 0.5 ln(2/3)
    teacher, student = torch.zeros(1, 1, 2), torch.tensor([[[0.0, math.log(3)]]])
    want = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert float(kl_loss(student, teacher, torch.ones(1, 1, dtype=torch.bool))) == pytest.approx(want, abs=1e-6)
    # direction matters: KL(s || t) differs
    assert float(kl_loss(teacher, student, torch.ones(1, 1, dtype=torch.bool))) != pytest.approx(want, abs=1e-3)
    # masked positions do not count: a wildly different student there changes nothing
    part = mask.clone()
    part[1, 2] = False
    s2 = a.clone()
    s2[1, 2] = 50 * torch.randn(5, generator=g)
    assert float(kl_loss(s2, a, part)) == pytest.approx(0.0, abs=1e-6)
    # the token mean runs over the set positions only: teacher (0.5, 0.5) against student (0.25, 0.75) at the one set
    # position of two gives that position's KL, not half of it; an all-masked batch gives 0, not NaN
    two_t, two_s = torch.zeros(1, 2, 2), torch.tensor([[[0.0, math.log(3)], [0.0, 0.0]]])
    one = torch.tensor([[True, False]])
    assert float(kl_loss(two_s, two_t, one)) == pytest.approx(want, abs=1e-6)
    assert float(kl_loss(two_s, two_t, torch.zeros_like(one))) == 0.0


def test_mask_metrics_hand_example():
    logits = [t(1, 1, -1, -1), t(2, -2, -3)]
    targets = [t(1, 0, 1, 0), t(1, 1, 0)]
    # sample 1: tp 1 fp 1 fn 1; sample 2: tp 1 fn 1 -> tp 2, fp 1, fn 2
    m = mask_metrics(logits, targets)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["kept"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    empty = mask_metrics([t(-1, -1)], [t(0, 0)])
    assert empty == {"precision": 0.0, "recall": 0.0, "iou": 0.0, "kept": 0.0}
    # a logit of exactly 0 is sigmoid 0.5, which is not > 0.5: not kept; one sample's kept fraction is its own
    edge = mask_metrics([t(0.0, 1.0, -1.0, 2.0)], [t(1, 1, 0, 0)])
    assert edge == {"precision": 0.5, "recall": 0.5, "iou": pytest.approx(1 / 3), "kept": 0.5}


# --------------------------------------------------------------------------- forward_train against the stock model


def suffix_batch(processor, answers):
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    T = max(len(x) for x in ids)
    suffix = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
    smask = torch.zeros(len(ids), T, dtype=torch.bool)
    for b, x in enumerate(ids):
        suffix[b, :len(x)] = torch.tensor(x)
        smask[b, :len(x)] = True
    return suffix, smask


def stock_suffix_logits(model, inputs, suffix, smask):
    """The stock model on [left-padded prompt | right-padded suffix], read at the positions predicting the suffix."""
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], suffix], dim=1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], smask.to(inputs["attention_mask"].dtype)], dim=1)
    full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(suffix)], dim=1)
    L0, T = inputs["input_ids"].shape[1], suffix.shape[1]
    with torch.no_grad():
        logits = model(**full).logits
    return logits[:, L0 - 1:L0 + T - 1]


CASES = {
    "b1": ([IMG_A], ["red"]),
    "b2-uneven": ([IMG_A, IMG_C], ["The square is blue", "no"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, model, processor):
    specs, answers = CASES[request.param]
    inputs = make_batch(processor, specs)
    suffix, smask = suffix_batch(processor, answers)
    return dict(inputs), suffix, smask, stock_suffix_logits(model, inputs, suffix, smask)


def forced_vip_module(model, bias):
    torch.manual_seed(0)
    mod = gp.GlimpseModule(small_glimpse_config(model)).eval()
    with torch.no_grad():
        mod.vip.out_proj.weight.zero_()
        mod.vip.out_proj.bias.fill_(bias)
    return mod


def test_full_method_equals_stock(model, case):
    inputs, suffix, smask, ref = case
    with torch.no_grad():
        out = forward_train(model, gp.get_adapter(model), FullMethod(), inputs, suffix, smask)
    assert out.suffix_logits.shape == ref.shape
    assert out.vip_logits is None
    torch.testing.assert_close(out.suffix_logits[smask], ref[smask], atol=1e-4, rtol=0)
    # the check can fail: reading one position later gives other logits
    assert (out.suffix_logits[:, 1:] - ref[:, :-1])[smask[:, 1:]].abs().max() > 1e-2


def test_soft_keep_all_equals_stock(model, case):
    """soft_keep=True with every keep-probability ~1: the glimpse is hidden from the answer and from the prompt after
    layer K, every visual token keeps its weight -> exactly the stock model."""
    inputs, suffix, smask, ref = case
    method = gp.make_method("glimpse", forced_vip_module(model, 30.0))
    with torch.no_grad():
        out = forward_train(model, gp.get_adapter(model), method, inputs, suffix, smask, soft_keep=True)
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert [v.shape[0] for v in out.vip_logits] == n_vis
    assert all(torch.allclose(v, torch.full_like(v, 30.0)) for v in out.vip_logits)
    torch.testing.assert_close(out.suffix_logits[smask], ref[smask], atol=1e-4, rtol=0)


def test_soft_drop_all_and_upstream_mode_differ_from_stock(model, case):
    inputs, suffix, smask, ref = case
    adapter = gp.get_adapter(model)
    with torch.no_grad():
        soft = forward_train(model, adapter, gp.make_method("glimpse", forced_vip_module(model, -30.0)), inputs,
                             suffix, smask, soft_keep=True)
        # upstream stage-1 mode: the answer sees the glimpse, so even keep-all differs from stock
        seen = forward_train(model, adapter, gp.make_method("glimpse", forced_vip_module(model, 30.0)), inputs,
                             suffix, smask, soft_keep=False)
    assert (soft.suffix_logits - ref)[smask].abs().max() > 1e-2
    assert (seen.suffix_logits - ref)[smask].abs().max() > 1e-2


# --------------------------------------------------------------------------- collator, gradients


SMALL = world.WorldConfig(min_cells=4, max_cells=5, min_objects=2, max_objects=3)  # 112-140 px: fast on a CPU


def world_item(seed, family, cfg=SMALL):
    s = world.sample(seed, family, cfg)
    w, h = s.scene.size
    return {"image": world.render(s.scene), "question": s.question, "answer": s.answer, "boxes": s.boxes,
            "width": w, "height": h}


@pytest.fixture(scope="module")
def world_items():
    return [WorldDataset(5)[i] for i in range(5)]  # the training set's own items, one of each family


@pytest.fixture(scope="module")
def small_items():
    return [world_item(7, "count"), world_item(8, "relation")]


def test_collator_targets_match_box_masks(model, processor, world_items):
    merge = model.config.vision_config.spatial_merge_size
    batch = Collator(processor, model)(world_items)
    inputs, targets = batch["inputs"], batch["targets"]
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    grids = inputs["image_grid_thw"].tolist()
    assert len(targets) == len(world_items) == len(grids)
    tok = processor.tokenizer
    for b, (it, (_, gh, gw)) in enumerate(zip(world_items, grids)):
        assert targets[b].shape == (n_vis[b],) and targets[b].dtype == torch.bool
        want = boxes_to_token_mask(it["boxes"], it["width"], it["height"], gh // merge, gw // merge).reshape(-1)
        np.testing.assert_array_equal(targets[b].numpy(), want)
        # world canvases are whole 28-px cells within the pixel budget: one token per cell, boxes are whole cells
        W, H = it["width"], it["height"]
        assert (gh // merge, gw // merge) == (H // world.CELL, W // world.CELL)
        assert int(targets[b].sum()) == sum((x2 - x1) * (y2 - y1) // world.CELL ** 2 for x1, y1, x2, y2 in it["boxes"])
        ids = batch["suffix_ids"][b][batch["suffix_mask"][b]].tolist()
        assert tok.decode(ids) == it["answer"] + "<|im_end|>"
        assert not batch["suffix_mask"][b][len(ids):].any()
    assert inputs["attention_mask"][:, -1].all()  # prompts are left padded


def frozen_copy(model):
    base = copy.deepcopy(model)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


@pytest.mark.parametrize("mode", ["boxes", "kl"])
def test_stage1_gradients(model, processor, small_items, mode):
    base = frozen_copy(model)
    cfg = Stage1Config(model="unused", mode=mode, module=dict(vip_width=32, cond_width=32, vip_heads=4,
                                                              vip_mlp_width=64))
    torch.manual_seed(0)
    module = build_module(base, cfg)
    wrapper = Stage1Model(base, module, cfg)
    assert {n.split(".")[0] for n, _ in wrapper.named_parameters()} == {"module"}  # base is not registered
    batch = Collator(processor, base)(small_items)
    loss = wrapper(**batch)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    expected_parts = {"loc_loss", "lm_loss"} if mode == "boxes" else {"kl_loss", "keep_prob"}
    assert expected_parts | {"precision", "recall", "iou", "kept"} == set(wrapper.metrics)
    K = module.cfg.prune_layer
    rows = module.glimpse_embeddings.grad.flatten(1).abs().sum(1)  # one row per glimpse layer
    for name, p in module.vip.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("attn_in_proj.weight", "cond_in_projs.0.weight", "layers.0.attn.q_proj.weight", "out_proj.weight"):
        assert dict(module.vip.named_parameters())[name].grad.abs().sum() > 0, name
    layers = module.cfg.glimpse_layers
    if mode == "boxes":  # the answer sees the glimpse, so every layer's vector gets a gradient
        assert (rows > 0).all(), rows
    else:  # label-free: the glimpse is hidden after layer K; only its vectors up to K (the VIP's input) learn
        assert all(rows[i] > 0 for i, layer in enumerate(layers) if layer <= K), rows
        assert all(rows[i] == 0 for i, layer in enumerate(layers) if layer > K), rows


@pytest.mark.parametrize("mode, weights, parts", [
    ("boxes", dict(loc_weight=2.0, lm_weight=0.25), ("loc_loss", "lm_loss")),
    ("kl", dict(kl_weight=1.5, sparsity_weight=0.7), ("kl_loss", "keep_prob")),
])
def test_stage1_loss_is_the_weighted_sum_of_its_parts(model, processor, small_items, mode, weights, parts):
    """The weights of the config scale their own term (a weight read for another term, or dropped, changes the
    sum): loss = w1 * part1 + w2 * part2, the parts as the run logs them."""
    base = frozen_copy(model)
    cfg = Stage1Config(model="unused", mode=mode, module=dict(vip_width=32, cond_width=32, vip_heads=4,
                                                              vip_mlp_width=64), **weights)
    torch.manual_seed(0)
    wrapper = Stage1Model(base, build_module(base, cfg), cfg)
    with torch.no_grad():
        loss = float(wrapper(**Collator(processor, base)(small_items))["loss"])
    w1, w2 = weights.values()
    a, b = (wrapper.metrics[k] for k in parts)
    assert a > 0 and b > 0
    assert loss == pytest.approx(w1 * a + w2 * b, rel=1e-5)


def test_early_module_loss_is_loc_weight_times_its_mask_loss(model, processor, small_items):
    """An early module in boxes mode has one term (the LLM does not run): loss = loc_weight * loc_loss."""
    base = frozen_copy(model)
    cfg = Stage1Config(model="unused", loc_weight=3.0, module=dict(kind="early", vip_width=32, cond_width=32,
                                                                   vip_heads=4, vip_mlp_width=64))
    torch.manual_seed(0)
    wrapper = Stage1Model(base, build_module(base, cfg), cfg)
    with torch.no_grad():
        loss = float(wrapper(**Collator(processor, base)(small_items))["loss"])
    assert "lm_loss" not in wrapper.metrics and wrapper.metrics["loc_loss"] > 0
    assert loss == pytest.approx(3.0 * wrapper.metrics["loc_loss"], rel=1e-5)


# --------------------------------------------------------------------------- Trainer: resume


def test_resume_continues_and_matches_uninterrupted(tmp_path, monkeypatch):
    base = build_tiny_qwen2_5_vl(tmp_path / "base")
    # small world scenes as JSONL records (the synthetic default's 224-448 px canvases take minutes on 2 busy cores)
    train_data = write_split(tmp_path / "data", n=16, seed=11, cfg=SMALL, name="train.jsonl")
    eval_data = write_split(tmp_path / "data", n=6, seed=12, cfg=SMALL, name="eval.jsonl")

    def cfg(out):
        return Stage1Config(model=str(base), output_dir=str(out), train_data=str(train_data), train_samples=16,
                            eval_data=str(eval_data), eval_samples=4, batch_size=4, max_steps=4, save_steps=2,
                            eval_steps=2, logging_steps=1,
                            module=dict(vip_width=32, cond_width=32, vip_heads=4, vip_mlp_width=64))

    calls = {"train": 0, "eval": 0}
    forward = Stage1Model.forward

    def counting(self, *a, **kw):
        calls["train" if self.training else "eval"] += 1
        return forward(self, *a, **kw)

    monkeypatch.setattr(Stage1Model, "forward", counting)

    A, B = tmp_path / "A", tmp_path / "B"
    train(cfg(A))
    assert calls == {"train": 4, "eval": 3}  # eval at steps 2 and 4 and a final one, 1 batch each (4 of 6 records)
    assert sorted(p.name for p in A.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # B: the same run interrupted after its step-2 checkpoint. Running cfg(B) from scratch would write the same
    # files as A (seeded; the equality asserted below shows it), so a copy of A stands in and saves a Trainer run.
    shutil.copytree(A, B)
    for gone in ("checkpoint-4", "module", "train_summary.json"):
        shutil.rmtree(B / gone) if (B / gone).is_dir() else (B / gone).unlink()
    calls.update(train=0, eval=0)
    train(cfg(B), resume=True)
    assert calls == {"train": 2, "eval": 2}  # steps 3 and 4 only: the run continued from checkpoint-2

    sa = json.loads((A / "train_summary.json").read_text())
    sb = json.loads((B / "train_summary.json").read_text())
    assert sa["resumed"] is False and sb["resumed"] is True
    assert sa["global_step"] == sb["global_step"] == 4
    saved = json.loads((B / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    hist = sb["log_history"]
    assert hist[:len(saved)] == saved  # the checkpoint's history, then what the resumed run logged
    after = hist[len(saved):]
    assert after and all(h["step"] > 2 for h in after)
    train_steps = [h["step"] for h in hist if "loss" in h]
    assert train_steps == [1, 2, 3, 4]

    def losses(h):
        return {x["step"]: x["loss"] for x in h if "loss" in x}

    assert losses(hist) == pytest.approx(losses(sa["log_history"]), abs=1e-4)
    ma, mb = gp.load_module(A / "module"), gp.load_module(B / "module")
    sda, sdb = ma.state_dict(), mb.state_dict()
    assert sda.keys() == sdb.keys()
    mid = {k.removeprefix("module."): v for k, v in load_file(str(B / "checkpoint-2" / "model.safetensors")).items()}
    assert mid.keys() == sda.keys()
    assert any(not torch.allclose(sda[k], mid[k], atol=1e-4) for k in sda)  # steps 3-4 changed the weights
    for k in sda:
        torch.testing.assert_close(sdb[k], sda[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_target_dilation_grows_each_box_mask_by_token_rings(tiny):
    from glimpseprune.training.stage1 import dilate

    m = np.zeros((4, 5), bool)
    m[0, 0] = m[3, 4] = True
    assert dilate(m, 0).tolist() == m.tolist()
    assert dilate(m, 1).astype(int).tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert dilate(m, 3).all()
    from glimpseprune.testing import random_image

    model, processor = tiny
    image = random_image(224, 224)
    items = [{"image": image, "question": "q?", "answer": "a", "boxes": [[40, 40, 80, 80]], "width": 224,
              "height": 224}]
    plain = Collator(processor, model)(items)["targets"][0]
    grown = Collator(processor, model, 1)(items)["targets"][0]
    assert bool(plain.any()) and bool((grown >= plain).all()) and int(grown.sum()) > int(plain.sum())
    with pytest.raises(ValueError, match="target_dilation must be >= 0"):
        Stage1Config(target_dilation=-1)


def test_point_families_target_one_token_per_object(model, processor, tmp_path):
    """A counting question's targets with point_families: exactly one token per object (the cell holding its
    centre), for 1-token and 2 x 2-token objects alike; other families keep their box tokens; ``boxes`` (what a
    reward sees) stay the answer's boxes; a family the data does not have is a named error."""
    from glimpseprune.data.records import box_points, mask_boxes

    assert box_points([[28, 56, 84, 112]]) == [[56.0, 84.0, 56.0, 84.0]]
    assert mask_boxes([[0, 0, 28, 28]], "exist", {"count"}) == [[0, 0, 28, 28]]
    # by hand on the token grid: a 2 x 2-cell box -> the one cell right/below its centre; a 1-cell box -> itself
    grid = boxes_to_token_mask(box_points([[28, 56, 84, 112], [140, 0, 168, 28]]), 224, 224, 8, 8)
    assert np.argwhere(grid).tolist() == [[0, 5], [3, 2]]
    corner = boxes_to_token_mask(box_points([[28, 56, 84, 112], [140, 0, 168, 28]], "top_left"), 224, 224, 8, 8)
    assert np.argwhere(corner).tolist() == [[0, 5], [2, 1]]  # the 2 x 2 object's first cell in raster order
    with pytest.raises(ValueError, match="point_at must be one of"):
        Stage1Config(point_at="middle")
    with pytest.raises(ValueError, match="mode kl is label-free"):
        Stage1Config(mode="kl", point_families=["count"])
    plain, points = WorldDataset(60), WorldDataset(60, point_families=["count"])
    counts = [i for i in range(60) if points[i]["family"] == "count"]
    big = [i for i in counts if any((x2 - x1) > world.CELL for x1, _, x2, _ in points[i]["boxes"])]
    assert counts and big  # some counting question has an object wider than one token
    for i in range(60):
        a, b = plain[i], points[i]
        assert a["boxes"] == b["boxes"] == a["mask_boxes"]
        assert (b["mask_boxes"] == a["boxes"]) == (b["family"] != "count")
    items = [points[i] for i in counts[:4]]
    targets = Collator(processor, model)(items)["targets"]
    for it, t in zip(items, targets):
        assert int(t.sum()) == len(it["boxes"])  # one kept token per object
    full = Collator(processor, model)([plain[i] for i in big[:1]])["targets"][0]
    assert int(full.sum()) > len(plain[big[0]]["boxes"])  # without the option the big object is several tokens
    with pytest.raises(ValueError, match="not families of the synthetic world"):
        WorldDataset(4, point_families=["counts"])
    split = write_split(tmp_path / "w", 10, seed=5)
    with pytest.raises(ValueError, match=r"no record of .* has family \['tally'\]"):
        RecordDataset(split, point_families=["tally"])
    lenient = RecordDataset(split, point_families=["count", "tally"], strict=False)  # an eval split may lack one
    assert any(lenient[i]["mask_boxes"] != lenient[i]["boxes"] for i in range(len(lenient)))
    rec = RecordDataset(split, point_families=["count"])
    for i in range(len(rec)):
        it = rec[i]
        assert (it["mask_boxes"] == it["boxes"]) == (it["family"] != "count")
    first = WorldDataset(60, point_families=["count"], point_at="top_left")
    for i in counts:
        assert first[i]["mask_boxes"] == [[float(x1), float(y1)] * 2 for x1, y1, _, _ in first[i]["boxes"]]


def test_gradient_checkpointing_is_refused_by_name(tiny_dir, processor):
    """transformers calls a checkpointed layer without its KV cache (the backward pass re-runs it), so the runtime's
    later chunks would find no keys and fail with a shape error inside attention; the training forward refuses it
    by name instead, and runs once it is switched off."""
    model, _ = gp.load_base(tiny_dir)
    new = hasattr(model, "activation_checkpointing_enable")  # gradient_checkpointing_* are deprecated aliases there
    (model.activation_checkpointing_enable if new else model.gradient_checkpointing_enable)()
    model.train()
    inputs = make_batch(processor, [IMG_A])
    suffix, smask = suffix_batch(processor, ["red"])
    with pytest.raises(ValueError, match="checkpointing is on.*activation_checkpointing_disable"):
        forward_train(model, gp.get_adapter(model), FullMethod(), dict(inputs), suffix, smask)
    (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    out = forward_train(model, gp.get_adapter(model), FullMethod(), dict(inputs), suffix, smask)
    assert torch.isfinite(out.suffix_logits[smask]).all()


def test_soft_keep_on_fused_kernels_equals_the_dense_mask(model, tiny_dir, processor):
    """Under SDPA the soft-keep biases of chunk 2 ride in extra q/k channels of the fused kernel (no (L, L) mask, no
    score matrix: a (B, H, L, L) one per layer, kept for the backward pass, was GBs at 7B sizes); the same model
    loaded eager takes the dense additive mask. Logits, VIP logits and the module's gradients agree (fp32, 1e-5) on
    a left-padded batch, with keep-probabilities spread over (0, 1)."""
    from transformers import AutoModelForImageTextToText

    from glimpseprune.runtime import train as T

    eager = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    assert eager.config.text_config._attn_implementation == "eager"
    inputs = dict(make_batch(processor, [IMG_A, IMG_C]))
    suffix, smask = suffix_batch(processor, ["The square is blue", "no"])
    torch.manual_seed(0)
    module = gp.GlimpseModule(small_glimpse_config(model))
    grads, outs = [], []
    for m in (model, eager):
        module.zero_grad()
        out = forward_train(m, gp.get_adapter(m), gp.make_method("glimpse", module), inputs, suffix, smask,
                            soft_keep=True)
        out.suffix_logits[smask].float().pow(2).mean().backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    probs = torch.sigmoid(torch.cat(outs[0].vip_logits)).detach()
    assert float(probs.min()) < 0.3 and float(probs.max()) > 0.7  # the biases matter
    torch.testing.assert_close(outs[0].suffix_logits[smask], outs[1].suffix_logits[smask], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)
    assert model.config.text_config._attn_implementation == "sdpa"  # restored after chunk 2
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in gp.get_adapter(model).layers(model))
    assert T.KEY_BIAS_ATTENTION == "glimpseprune_key_bias"


def test_soft_keep_key_bias_by_hand():
    """Per key: text 0, a visual token log sigmoid(its logit) (a sure drop far below 0, never above it), the glimpse
    and padding hidden. The fused and the dense paths are tested equal, so this pins the sign of both."""
    from types import SimpleNamespace

    from glimpseprune.runtime.train import _MASKED, _key_bias

    vis = torch.tensor([[False, True, True, False], [False, False, True, True]])  # prompt of 4, then one glimpse
    state = SimpleNamespace(enc=SimpleNamespace(vis_mask=vis), n_extra=1)
    key_mask = torch.tensor([[True] * 5, [False] + [True] * 4])  # sample 2 left-padded by one
    vip = [torch.tensor([0.0, -30.0]), torch.tensor([30.0, 2.0])]
    got = _key_bias(key_mask, state, vip, torch.float32)
    want = torch.tensor([[0.0, math.log(0.5), F.logsigmoid(torch.tensor(-30.0)).item(), 0.0, _MASKED],
                         [_MASKED, 0.0, F.logsigmoid(torch.tensor(30.0)).item(),
                          F.logsigmoid(torch.tensor(2.0)).item(), _MASKED]])
    torch.testing.assert_close(got, want)
    assert float(got[0, 2]) < -29.0 and float(got[1, 2]) > -1e-6
    # a logit far below -1e4 gets the hiding bias itself, finite in fp16 (its log sigmoid would overflow to -inf)
    vip[0][1] = -1e5
    half = _key_bias(key_mask, state, vip, torch.float16)
    assert half.dtype == torch.float16 and float(half[0, 2]) == float(torch.tensor(_MASKED, dtype=torch.float16))


# --------------------------------------------------------------------------- mutation audit, round 3


class TokenGlimpse(PruningMethod):
    """Prunes after layer 0 (K = 0) with no predictor; its extra token is the embedding of vocabulary token ``token``.
    Records the layers its hooks see."""

    name = "token_glimpse"

    def __init__(self, token: int):
        super().__init__()
        self.token, self.before, self.after = token, [], []

    def prune_layer(self, n_layers):
        return 0

    def extra_tokens(self, state):
        ids = torch.full((state.enc.embeds.shape[0], 1), self.token)
        return state.adapter.embed_tokens(state.model, ids)

    def before_layer(self, state, layer_idx, hidden):
        self.before.append(layer_idx)
        return hidden

    def after_layer(self, state, layer_idx, hidden_in):
        self.after.append(layer_idx)


class ScoredTokenGlimpse(TokenGlimpse):
    """The same, with a predictor that keeps every visual token with probability 1/2 (its logits are leaves)."""

    def predict_logits(self, state):
        self.logits = [torch.zeros(n, requires_grad=True) for n in state.enc.n_vis]
        return self.logits


def test_upstream_mode_reads_the_first_answer_logits_at_the_glimpse(model, processor):
    """soft_keep=False is one causal pass over prompt | glimpse: suffix token 0 is predicted at the glimpse (the
    prompt's next position), i.e. the stock model's logits at token X appended to the prompt, for a glimpse that is
    X's embedding. A method pruning after layer 0 needs no predictor; its before_layer runs on every prefix layer,
    its after_layer on layers <= K only (as at inference)."""
    x = 100
    inputs = dict(make_batch(processor, [IMG_A, IMG_C]))
    suffix, smask = suffix_batch(processor, ["The square is blue", "no"])
    method = TokenGlimpse(x)
    with torch.no_grad():
        out = forward_train(model, gp.get_adapter(model), method, inputs, suffix, smask)
    ref = stock_suffix_logits(model, inputs, torch.full((2, 2), x), torch.ones(2, 2, dtype=torch.bool))[:, 1]
    torch.testing.assert_close(out.suffix_logits[:, 0], ref, atol=1e-4, rtol=0)
    assert out.vip_logits is None
    assert method.before == [0, 1, 2, 3] and method.after == [0]


def test_soft_keep_runs_the_hooks_like_upstream_and_trains_the_scores(model, processor):
    """Under soft_keep (SDPA: the fused chunk 2), before_layer still runs on every prefix layer and after_layer on
    layers <= K; the answer's loss reaches the predictor's logits through the keep biases."""
    inputs = dict(make_batch(processor, [IMG_A, IMG_C]))
    suffix, smask = suffix_batch(processor, ["The square is blue", "no"])
    method = ScoredTokenGlimpse(100)
    out = forward_train(model, gp.get_adapter(model), method, inputs, suffix, smask, soft_keep=True)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert method.before == [0, 1, 2, 3] and method.after == [0]
    loss = out.suffix_logits[smask].float().pow(2).mean()
    grads = torch.autograd.grad(loss, method.logits, allow_unused=True)  # the model's own weights get no .grad
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads)


def test_key_bias_attention_by_hand():
    """The fused per-key-bias attention of chunk 2 equals softmax(q.k x scaling + bias, causal) @ v written out:
    grouped-query heads shared as transformers does (query head h reads key head h // (H / Hkv)), the caller's
    ``scaling`` used, later keys hidden. A key length other than the query length is refused by name."""
    from types import SimpleNamespace

    from glimpseprune.runtime.train import key_bias_attention

    torch.manual_seed(0)
    B, H, Hkv, L, D, scaling = 2, 4, 2, 5, 8, 0.7
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    bias = torch.randn(B, L) * 3
    got, weights = key_bias_attention(SimpleNamespace(training=False), q, k, v, bias, scaling=scaling)
    assert weights is None and got.shape == (B, L, H, D)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                s = torch.stack([q[b, h, i] @ k[b, h // 2, j] * scaling + bias[b, j] for j in range(i + 1)])
                want = torch.softmax(s, dim=0) @ v[b, h // 2, :i + 1]
                torch.testing.assert_close(got[b, i, h], want, atol=1e-5, rtol=1e-5)
    dropped, _ = key_bias_attention(SimpleNamespace(training=True), q, k, v, bias, scaling=scaling, dropout=0.5)
    assert (dropped - got).abs().max() > 1e-2  # attention dropout while training, none in eval
    same, _ = key_bias_attention(SimpleNamespace(training=False), q, k, v, bias, scaling=scaling, dropout=0.5)
    torch.testing.assert_close(same, got)
    with pytest.raises(ValueError, match="whole prompt: 5 queries but 4 keys"):
        key_bias_attention(SimpleNamespace(training=False), q, k[:, :, :4], v[:, :, :4], bias[:, :4])
