"""``early_glimpse`` and its ``EarlyGlimpseModule``: the decision is made before the LLM (K = -1) with no LLM layer
run; it equals ``mask`` at K = -1 given the same keep masks; the module round-trips through save / load; the stage-1
trainer trains it; bad inputs fail clearly."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import (
    IMG_A,
    IMG_B,
    IMG_C,
    QUESTIONS,
    make_batch,
    random_early_module,
    random_module,
    small_glimpse_config,
)

import glimpseprune as gp
from glimpseprune.checkpoint import CONFIG_NAME, build_module, load_module, save_module
from glimpseprune.config import GlimpseConfig, SelectionConfig
from glimpseprune.data.records import write_split
from glimpseprune.methods.early_glimpse import EarlyGlimpseConfig, EarlyGlimpseMethod
from glimpseprune.methods.glimpse import GlimpseMethod
from glimpseprune.methods.mask import MaskMethod
from glimpseprune.modules.early import EarlyGlimpseModule
from glimpseprune.registry import describe_method
from glimpseprune.runtime.engine import prefill
from glimpseprune.testing import build_tiny_qwen2_5_vl
from glimpseprune.training.stage1 import Stage1Config
from glimpseprune.training.trainer import train

SPECS = [IMG_A, IMG_B, IMG_C]


@pytest.fixture(scope="module")
def early(model):
    return random_early_module(model)


@pytest.fixture(scope="module")
def batch(processor):
    return make_batch(processor, SPECS, QUESTIONS)


def test_config_kind(model, early):
    cfg = early.cfg
    assert cfg.kind == "early" and cfg.prune_layer == -1 and cfg.attn_layers == () and cfg.glimpse_layers == ()
    assert GlimpseConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert isinstance(build_module(cfg), EarlyGlimpseModule)
    assert describe_method("early_glimpse")["where"] == "before the LLM (or after drop_layer)"


def test_prunes_before_the_llm_and_equals_mask(model, early, batch):
    adapter = gp.get_adapter(model)
    method = EarlyGlimpseMethod(module=early)
    with torch.no_grad():
        pre = prefill(model, adapter, method, batch)
        assert pre.prune_layer == -1 and pre.prune_layers == (-1,)
        n_kept, n_vis = pre.n_kept, pre.n_vis
        assert all(0 < k < n for k, n in zip(n_kept, n_vis)), (n_kept, n_vis)
        assert pre.kv_len == [int(m) - (n - k) for m, n, k in zip(batch["attention_mask"].sum(1), n_vis, n_kept)]
        ref = prefill(model, adapter, MaskMethod(prune_layer=-1), batch, request={"keep_masks": pre.keep_masks})
    assert [torch.equal(a, b) for a, b in zip(pre.keep_masks, ref.keep_masks)] == [True] * len(SPECS)
    torch.testing.assert_close(pre.logits, ref.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [0, 1])
def test_drop_after_layer_k_equals_mask_there(model, early, batch, K):
    """The decision is the same (made from the encoding alone); its tokens leave after layer K, where the mask
    method (tested against stock transformers) drops the same keep masks. K given by the method or the module."""
    import copy

    adapter = gp.get_adapter(model)
    with torch.no_grad():
        before = prefill(model, adapter, EarlyGlimpseMethod(module=early), batch)
        pre = prefill(model, adapter, EarlyGlimpseMethod(EarlyGlimpseConfig(drop_layer=K), module=early), batch)
        assert pre.prune_layers == (K,)
        assert all(torch.equal(a, b) for a, b in zip(pre.keep_masks, before.keep_masks))
        ref = prefill(model, adapter, MaskMethod(prune_layer=K), batch, request={"keep_masks": pre.keep_masks})
        other = copy.deepcopy(early)
        other.drop_after(K)  # an early module that drops after layer K
        by_module = prefill(model, adapter, EarlyGlimpseMethod(module=other.eval()), batch)
    torch.testing.assert_close(pre.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert by_module.prune_layers == (K,)
    torch.testing.assert_close(by_module.logits, pre.logits, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(pre.logits, before.logits, atol=1e-4)  # layers 0..K read every token: not K = -1


def test_drop_layer_out_of_range(model, early, batch):
    import dataclasses

    n = len(gp.get_adapter(model).layers(model))
    with pytest.raises(ValueError, match=rf"prune_layer -1\) or after an LLM layer in \[0, {n - 1}\]"):
        dataclasses.replace(early.cfg, prune_layer=n)
    with pytest.raises(ValueError, match="drop_layer must be -1"):
        EarlyGlimpseConfig(drop_layer=-2)
    with pytest.raises(ValueError, match="outside the LLM's layer range"):
        prefill(model, gp.get_adapter(model), EarlyGlimpseMethod(EarlyGlimpseConfig(drop_layer=n), module=early),
                batch)


def test_no_llm_layer_runs_before_the_decision(model, early, batch):
    adapter = gp.get_adapter(model)
    events: list[str] = []
    method = EarlyGlimpseMethod(module=early)
    select = method.select

    def recording_select(state):
        events.append("select")
        return select(state)

    method.select = recording_select
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: events.append(f"layer{i}"))
             for i, layer in enumerate(adapter.layers(model))]
    try:
        with torch.no_grad():
            prefill(model, adapter, method, batch)
    finally:
        for h in hooks:
            h.remove()
    n_layers = len(adapter.layers(model))
    assert events == ["select"] + [f"layer{i}" for i in range(n_layers)]


def test_fixed_keep_ratio_gives_a_fixed_count(model, early, batch):
    method = EarlyGlimpseMethod(module=early, selection=SelectionConfig(fixed_keep_ratio=0.25))
    with torch.no_grad():
        pre = prefill(model, gp.get_adapter(model), method, batch)
    assert pre.n_kept == [max(1, int(n * 0.25)) for n in pre.n_vis]


def test_diverse_fill_keeps_the_confident_tokens_then_a_diverse_rest(model, early, batch):
    from glimpseprune.methods.early_glimpse import EarlyGlimpseConfig
    from glimpseprune.ops.diversity import farthest_point_fill

    adapter = gp.get_adapter(model)
    sel = SelectionConfig(fixed_keep_ratio=0.25)
    diverse = EarlyGlimpseMethod(EarlyGlimpseConfig(selection=sel, fill="diverse"), module=early)
    scored = EarlyGlimpseMethod(module=early, selection=sel)
    with torch.no_grad():
        pre = prefill(model, adapter, diverse, batch)
        pre_s = prefill(model, adapter, scored, batch)
    assert pre.n_kept == pre_s.n_kept == [max(1, int(n * 0.25)) for n in pre.n_vis]  # the same fixed count
    enc = adapter.encode(model, dict(batch), diverse.vision_taps(), diverse.vision_tap_fn())
    differs = False
    for b, (keep, logits) in enumerate(zip(pre.keep_masks, diverse.logits_for(enc))):
        confident = torch.sigmoid(logits) > 0.5
        k = int(keep.sum())
        assert int(confident.sum()) <= k and bool(keep[confident].all())  # every confident token is kept
        vis = enc.embeds[b][enc.vis_mask[b]]
        assert torch.equal(keep, farthest_point_fill(vis, confident, k))
        differs |= not torch.equal(keep, pre_s.keep_masks[b])
    assert differs  # the rest is chosen by coverage, not by score
    with pytest.raises(ValueError, match="fill must be one of"):
        EarlyGlimpseConfig(fill="random")
    with pytest.raises(ValueError, match="fill 'diverse' fills a fixed budget"):
        EarlyGlimpseConfig(fill="diverse")  # no fixed_keep_ratio: it would silently fill by score


def test_save_load_round_trip(model, early, batch, tmp_path):
    save_module(early, tmp_path / "m")
    assert json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["glimpse"]["kind"] == "early"
    loaded = load_module(tmp_path / "m", gp.get_adapter(model).dims(model))
    assert isinstance(loaded, EarlyGlimpseModule) and loaded.cfg == early.cfg
    adapter = gp.get_adapter(model)
    with torch.no_grad():
        scores = []
        for mod in (early, loaded):
            method = EarlyGlimpseMethod(module=mod)
            enc = adapter.encode(model, batch, taps=method.vision_taps(), tap_fn=method.vision_tap_fn())
            scores.append(torch.cat(method.logits_for(enc)))
    assert torch.equal(scores[0], scores[1])


def test_old_module_folders_load_as_glimpse(model, module, tmp_path):
    save_module(module, tmp_path / "old")
    f = tmp_path / "old" / CONFIG_NAME
    meta = json.loads(f.read_text())
    del meta["glimpse"]["kind"]  # written before the field existed
    f.write_text(json.dumps(meta))
    loaded = load_module(tmp_path / "old")
    assert type(loaded) is type(module) and loaded.cfg.kind == "glimpse"


def test_api_picks_the_method_of_the_module_kind(model, early, processor, tmp_path):
    pm = gp.apply(model, "early_glimpse", module=early, processor=processor)
    assert isinstance(pm.method, EarlyGlimpseMethod)


def test_stage1_trains_an_early_module(tmp_path):
    base = build_tiny_qwen2_5_vl(tmp_path / "base")
    from glimpseprune.data import world

    small = world.WorldConfig(min_cells=4, max_cells=5, min_objects=2, max_objects=3)
    data = write_split(tmp_path / "data", n=8, seed=11, cfg=small, name="train.jsonl")
    for mode, K in (("boxes", -1), ("kl", -1), ("kl", 0)):  # K: where the picks leave (the KL sees that schedule)
        out = tmp_path / f"run-{mode}{K}"
        cfg = Stage1Config(model=str(base), output_dir=str(out), train_data=str(data), eval_data=str(data),
                           eval_samples=4, batch_size=4, max_steps=2, save_steps=2, eval_steps=2, logging_steps=1,
                           mode=mode, module=dict(kind="early", vip_width=32, cond_width=32, vip_heads=4,
                                                  vip_mlp_width=64, prune_layer=K))
        module_dir = train(cfg)
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["global_step"] == 2
        loaded = load_module(module_dir)
        assert isinstance(loaded, EarlyGlimpseModule) and loaded.cfg.prune_layer == K
        logs = [h for h in summary["log_history"] if "loss" in h]
        assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
        key = "loc_loss" if mode == "boxes" else "kl_loss"
        assert key in logs[0]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_fixed_keep_ratio(ratio):
    with pytest.raises(ValueError, match="fixed_keep_ratio"):
        SelectionConfig(fixed_keep_ratio=ratio)


def test_wrong_module_kind(model, module, early):
    with pytest.raises(ValueError, match="early module"):
        EarlyGlimpseMethod(module=module)
    with pytest.raises(ValueError, match="early_glimpse"):
        GlimpseMethod(module=early)
    with pytest.raises(ValueError, match="needs a trained early module"):
        EarlyGlimpseMethod()
    with pytest.raises(ValueError, match="drops its tokens before the LLM"):
        GlimpseConfig(**{**early.cfg.to_dict(), "prune_layer": early.cfg.base_num_layers})
    with pytest.raises(ValueError, match="reads no LLM layer: attn_layers must be empty"):
        GlimpseConfig(**{**early.cfg.to_dict(), "attn_layers": [0]})
    with pytest.raises(ValueError, match="kind must be one of"):
        GlimpseConfig(**{**module.cfg.to_dict(), "kind": "late"})


@pytest.mark.parametrize("kind", ["early", "glimpse"])
def test_a_confident_module_keeps_its_top_logits(model, processor, kind):
    """A trained module's logits pass 16.6, where fp32 sigmoid is exactly 1.0: a fixed budget keeps the top-k by
    logit (it kept arbitrary tokens among the saturated ones)."""
    module = copy.deepcopy(random_early_module(model) if kind == "early" else random_module(model))
    head = module.out_proj if kind == "early" else module.vip.out_proj
    with torch.no_grad():
        head.weight.mul_(30.0)
        head.bias.fill_(20.0)
    method = gp.make_method("early_glimpse" if kind == "early" else "glimpse", module,
                            SelectionConfig(fixed_keep_ratio=0.1))
    with torch.no_grad():
        pre = prefill(model, gp.get_adapter(model), method, make_batch(processor, [IMG_A]))
    logits, keep = pre.scratch["vip_logits"][0], pre.keep_masks[0]
    assert int((torch.sigmoid(logits) == 1.0).sum()) > int(keep.sum())  # the probabilities alone tie
    want = torch.zeros_like(keep)
    want[torch.topk(logits, int(keep.sum())).indices] = True
    assert torch.equal(keep, want)


@pytest.mark.parametrize("kind", ["early", "glimpse"])
def test_a_config_and_a_selection_together_are_refused(model, kind):
    from glimpseprune.methods.glimpse import GlimpseMethodConfig

    cls, cfg, module = ((EarlyGlimpseMethod, EarlyGlimpseConfig(), random_early_module(model)) if kind == "early"
                        else (GlimpseMethod, GlimpseMethodConfig(), random_module(model)))
    with pytest.raises(TypeError, match="not both"):  # the selection was silently ignored
        cls(cfg, module=module, selection=SelectionConfig(fixed_keep_ratio=0.1))


def test_log_softmax_scores_ignore_left_padding(model, processor):
    """A module with ``attn_score: log_softmax`` (LLaVA's release) normalises the glimpse's attention over the keys
    it can see: a sample's VIP logits in a left-padded batch equal its logits alone (the padding mask there was
    unpinned)."""
    torch.manual_seed(0)
    module = gp.GlimpseModule(small_glimpse_config(model, attn_score="log_softmax")).eval()
    method = gp.make_method("glimpse", module)
    adapter = gp.get_adapter(model)
    batch = make_batch(processor, [IMG_A, IMG_C])  # two lengths: the shorter one is left padded
    assert not bool(batch["attention_mask"].bool().all())
    with torch.no_grad():
        both = prefill(model, adapter, method, batch).scratch["vip_logits"]
        for b, spec in enumerate([IMG_A, IMG_C]):
            one = make_batch(processor, [spec], [QUESTIONS[b]], seed=10 * b)  # the same sample as in the batch
            alone = prefill(model, adapter, method, one).scratch["vip_logits"][0]
            torch.testing.assert_close(both[b], alone, atol=1e-4, rtol=0)


def test_question_attention_by_hand_and_its_learned_token():
    """Explicit softmax attention over [learned token; question]; a sample with an empty question attends to the
    learned token alone, so every visual token gets o_proj(v_proj(learned))."""
    from glimpseprune.modules.early import QuestionAttention

    torch.manual_seed(0)
    qa = QuestionAttention(8, heads=2).eval()
    with torch.no_grad():
        qa.learned.normal_()
        x, text = torch.randn(5, 8), [torch.randn(3, 8), torch.zeros(0, 8)]
        got = qa(x, text, [3, 2])
        kv = torch.cat([qa.learned, text[0]])
        q, k, v = (p(t).view(t.shape[0], 2, 4).transpose(0, 1) for p, t in
                   ((qa.q_proj, x[:3]), (qa.k_proj, kv), (qa.v_proj, kv)))
        w = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)  # (2, 3, 4); sqrt(d) = 2
        want0 = qa.o_proj((w @ v).transpose(0, 1).reshape(3, 8))
        torch.testing.assert_close(got[:3], want0, atol=1e-6, rtol=0)
        torch.testing.assert_close(got[3:], qa.o_proj(qa.v_proj(qa.learned)).expand(2, 8), atol=1e-6, rtol=0)


def test_every_parameter_of_the_early_module_shapes_its_scores(model, early):
    """Perturbing any one parameter tensor changes the logits: no part of the module is silently unused (a skipped
    norm before the question attention passed every other test)."""
    torch.manual_seed(1)
    mod = copy.deepcopy(early)
    cfg = mod.cfg
    grids = [(3, 4)]
    S = 12
    args = (torch.randn(S, cfg.base_hidden_size), [torch.randn(5, cfg.base_hidden_size)], [S],
            [torch.randn(S, cfg.base_vision_width) for _ in mod.layers], grids)
    with torch.no_grad():
        ref = mod(*args)
        for name, p in mod.named_parameters():
            before = p.clone()
            p.add_(0.5 * torch.randn_like(p) + 0.1)
            changed = (mod(*args) - ref).abs().max() > 1e-6
            p.copy_(before)
            assert changed, f"{name} does not affect the early module's scores"


# mutation audit


def test_early_module_scores_a_video_jointly(early):
    """With ``groups`` a video's frame-groups share one attention span in every VIP block (a change in frame 1 moves
    frame 0's scores; without groups it cannot), each frame with the same 2D RoPE (equal frames, equal scores)."""
    cfg = early.cfg
    torch.manual_seed(2)
    grids = [(3, 4)] * 2
    vis = torch.randn(12, cfg.base_hidden_size).repeat(2, 1)
    conds = [torch.randn(12, cfg.base_vision_width).repeat(2, 1) for _ in early.layers]
    text = [torch.randn(5, cfg.base_hidden_size)]
    moved = vis.clone()
    moved[12:] += 1.0
    with torch.no_grad():
        joint = early(vis, text, [24], conds, grids, groups=[0, 0]).view(2, 12)
        joint_moved = early(moved, text, [24], conds, grids, groups=[0, 0]).view(2, 12)
        alone = early(vis, text, [24], conds, grids).view(2, 12)
        alone_moved = early(moved, text, [24], conds, grids).view(2, 12)
    torch.testing.assert_close(joint[0], joint[1], atol=1e-5, rtol=0)
    assert (joint_moved[0] - joint[0]).abs().max() > 1e-3
    torch.testing.assert_close(alone_moved[0], alone[0], atol=1e-6, rtol=0)


def test_early_module_names_each_input_that_misses_the_grids(early):
    cfg = early.cfg
    vis, text = torch.randn(12, cfg.base_hidden_size), [torch.randn(5, cfg.base_hidden_size)]
    conds = [torch.randn(12, cfg.base_vision_width) for _ in early.layers]
    want = f"cover 12 tokens (visual embeddings), 11 (n_vis) and {[12] * len(conds)} (vision features) but the image " \
           "grids hold 12"
    with pytest.raises(ValueError, match=re.escape(want)):
        early(vis, text, [11], conds, [(3, 4)])
    with pytest.raises(ValueError, match="early module got 2 questions for 1 samples"):
        early(vis, text * 2, [12], conds, [(3, 4)])


def test_early_module_needs_an_early_config(model):
    with pytest.raises(ValueError, match="needs a config of kind 'early', got 'glimpse'"):
        EarlyGlimpseModule(small_glimpse_config(model))
