"""Qwen3-VL on tiny random models (dense ``qwen3_vl``; MoE ``qwen3_vl_moe`` for the core oracles).

* The shared engine suite of ``tests/test_engine.py`` runs here once more with ``family`` = the tiny Qwen3-VL:
  keep-all == stock transformers (1e-5, same greedy tokens), pruning == the stock model with the dropped keys masked
  (cached and uncached), K = -1 == masking, mixed batch == one by one, every registered method runs.
* What is new in this family: DeepStack (pruning at K = -1 and inside the DeepStack layers == the masked stock model,
  i.e. the dropped tokens' DeepStack rows leave with them; grouped == ungrouped; the additions are material),
  interleaved M-RoPE coordinates kept by kept tokens, q_norm in the glimpse query's logits, the adapter's encode
  against the stock forward, presets / shapes / FLOPs, stage-1 training and ``make-tiny --family qwen3_vl``.
"""

from __future__ import annotations

import json

import pytest
import test_engine as engine_suite
import torch
from conftest import IMG_A, IMG_B, IMG_C, TORCHVISION, Family, make_batch, random_early_module, random_module
from oracle import dropped_positions, masking, oracle_model, stock_generate

import glimpseprune as gp
from glimpseprune.adapters.base import ModelDims
from glimpseprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from glimpseprune.adapters.qwen3_vl import Qwen3VLAdapter
from glimpseprune.methods.mask import MaskMethod
from glimpseprune.runtime.engine import prefill
from glimpseprune.runtime.groups import plan_groups
from glimpseprune.testing import build_tiny_qwen3_vl, random_image

N_NEW = 8


class Qwen3Family(Family):
    """Qwen3-VL tokens are 32 px (16 px patches, 2x2 merge): grids come from the processor's own resize."""

    def grids(self, spec) -> list[tuple[int, int]]:
        if not spec:
            return []
        ip = self.processor.image_processor
        thw = ip([random_image(w, h) for w, h in spec], return_tensors="pt")["image_grid_thw"]
        return [(h // ip.merge_size, w // ip.merge_size) for _, h, w in thw.tolist()]


@pytest.fixture(scope="module")
def family(q3_dir):
    """Overrides conftest's ``family`` in this module: the engine suite below runs on the tiny Qwen3-VL."""
    model, processor = gp.load_base(q3_dir)
    return Qwen3Family("qwen3_vl", q3_dir, model, processor, random_module(model), random_early_module(model))


# --------------------------------------------------------------------------- the shared engine suite, on Qwen3-VL

test_keep_all_equals_stock = engine_suite.test_keep_all_equals_stock
test_pruning_equals_masking = engine_suite.test_pruning_equals_masking
test_prune_before_llm_equals_masking = engine_suite.test_prune_before_llm_equals_masking
test_mixed_batch_equals_single = engine_suite.test_mixed_batch_equals_single
test_glimpse_never_influences_answer = engine_suite.test_glimpse_never_influences_answer
test_image_keep_masks_follow_grids = engine_suite.test_image_keep_masks_follow_grids
test_sampling_is_seeded = engine_suite.test_sampling_is_seeded
test_every_method_runs = engine_suite.test_every_method_runs


# --------------------------------------------------------------------------- adapter


def test_registered_and_dims(family):
    model = family.model
    adapter = gp.get_adapter(model)
    assert isinstance(adapter, Qwen3VLAdapter) and gp.get_adapter("qwen3_vl_moe") is adapter
    assert adapter.dims(model) == ModelDims("qwen3_vl", 64, 6, 4, 32, 4)
    assert family.grids(IMG_A) == [(7, 7)]  # 224 px / 32 px per token


def _capture_llm_inputs(model):
    """Forward pre-hook on the text model: the keyword inputs the stock forward gives it."""
    seen = {}

    def hook(_mod, _args, kwargs):
        seen.update(kwargs)

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_encode_matches_stock(family):
    """Embeddings, DeepStack rows, visual mask and positions == what the stock forward feeds its text model; taps ==
    the tapped ViT blocks' outputs, 2x2-merge means, raster order."""
    model = family.model
    inputs = family.batch([IMG_A, IMG_B, []])
    taps = (3, 1)
    blocks = {}
    hooks = [model.model.visual.blocks[t].register_forward_hook(
        lambda _m, _a, out, t=t: blocks.__setitem__(t, out)) for t in taps]
    seen, h = _capture_llm_inputs(model)
    try:
        with torch.no_grad():
            model(**inputs)
            enc = gp.get_adapter(model).encode(model, inputs, taps=taps)
    finally:
        for x in hooks + [h]:
            x.remove()
    torch.testing.assert_close(enc.embeds, seen["inputs_embeds"], atol=0, rtol=0)
    assert torch.equal(enc.vis_mask, seen["visual_pos_masks"])
    assert len(enc.visual_adds) == len(seen["deepstack_visual_embeds"]) == 3
    for ours, ref in zip(enc.visual_adds, seen["deepstack_visual_embeds"], strict=True):
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(enc.positions[:, valid], seen["position_ids"][:, valid])
    for t, feat in zip(taps, enc.vision_feats, strict=True):
        torch.testing.assert_close(feat, blocks[t].view(-1, 4, 32).mean(dim=1), atol=0, rtol=0)
    grids = family.grids(IMG_A) + family.grids(IMG_B)
    assert enc.grids == grids and enc.image_owner == [0, 1, 1]
    assert enc.n_vis == [family.n_vis(IMG_A), family.n_vis(IMG_B), 0]


def test_encode_refuses_bad_placeholders(family):
    """A video placeholder without a video and a tap outside the ViT are refused (video: test_video_qwen3_vl.py)."""
    inputs = dict(family.batch([IMG_C]))
    ids = inputs["input_ids"].clone()
    ids[0, -1] = family.model.config.video_token_id
    with pytest.raises(ValueError, match=r"number of video frame-groups \(0\) does not match .* \(1\)"):
        gp.get_adapter(family.model).encode(family.model, {**inputs, "input_ids": ids})
    with pytest.raises(ValueError, match="vision tap 4 outside the ViT's blocks"):
        gp.get_adapter(family.model).encode(family.model, inputs, taps=(4,))


def test_glimpse_query_logits_use_q_norm(family):
    """softmax(query_logits) of the last prompt token == the stock eager attention row, at a layer inside and one
    after the DeepStack range; the Qwen2-style query (no q_norm) does not match."""
    from transformers import AutoModelForImageTextToText

    eager = AutoModelForImageTextToText.from_pretrained(family.model_dir, attn_implementation="eager").eval()
    adapter = gp.get_adapter(eager)
    inputs = family.batch([IMG_C])
    layer_in = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, i=i: layer_in.__setitem__(i, args[0]))
             for i, layer in enumerate(adapter.layers(eager))]
    try:
        with torch.no_grad():
            out = eager(**inputs, output_attentions=True, use_cache=True)
            enc = adapter.encode(eager, inputs)
            cos, sin = adapter.rotary(eager, enc.embeds, enc.positions)
            kv = out.cache if "cache" in out else out.past_key_values  # transformers >= 5.24 names it ``cache``
            for i in (1, 4):
                args = (eager, i, layer_in[i][:, -1:], (cos[:, -1:], sin[:, -1:]), kv.layers[i].keys)
                ours = adapter.query_logits(*args).softmax(-1)
                plain = Qwen2_5_VLAdapter().query_logits(*args).softmax(-1)
                torch.testing.assert_close(ours, out.attentions[i][:, :, -1], atol=1e-5, rtol=0)
                assert (plain - out.attentions[i][:, :, -1]).abs().max() > 1e-3
    finally:
        for x in hooks:
            x.remove()


# --------------------------------------------------------------------------- DeepStack


@pytest.mark.parametrize("K", [-1, 0, 1, 2])
def test_pruning_inside_deepstack_equals_masking(family, K):
    """K = -1 (before the LLM) and K inside the DeepStack layers 0..2: only the kept tokens keep their DeepStack
    rows (of a two-sample batch, so rows must follow the batch) == the stock model with the dropped keys masked."""
    model, processor = family.model, family.processor
    assert len(model.config.vision_config.deepstack_visual_indexes) == 3
    inputs = family.batch([IMG_A, IMG_B])
    n_vis = [family.n_vis(IMG_A), family.n_vis(IMG_B)]
    keep = engine_suite._random_keep(n_vis, seed=20 + K, frac=0.4)
    out = gp.apply(model, "mask", prune_layer=K).generate(inputs, max_new_tokens=N_NEW, keep_masks=keep,
                                                          return_logits=True)
    assert out.prune_layer == K and out.n_kept == [int(k.sum()) for k in keep]
    oracle = oracle_model(family.model_dir)
    with masking(dropped_positions(inputs, model.config.image_token_id, keep), K), torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle, inputs, N_NEW, pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(out.sequences, ref_tokens)
    for ours, ref in zip(out.step_logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


class _NoDeepStack(Qwen3VLAdapter):
    def encode(self, *args, **kwargs):
        enc = super().encode(*args, **kwargs)
        enc.visual_adds = []
        return enc


def test_deepstack_additions_are_material(family):
    """Without the DeepStack rows the prefill leaves the stock model: the equalities above are not vacuous."""
    inputs = family.batch([IMG_A])
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = family.stock_logits(inputs)
        pre = prefill(family.model, _NoDeepStack(), gp.get_method("full")(), inputs, all_logits=True)
    assert (pre.logits[valid] - ref[valid]).abs().max() > 1e-3


def test_grouped_layers_wait_for_deepstack(family):
    """K = -1 with very different kept counts: the grouped run of the later layers starts only after the last
    DeepStack layer, and equals the ungrouped run."""
    inputs = family.batch([IMG_A, IMG_A], seed=3)
    n = family.n_vis(IMG_A)
    keep = [torch.arange(n) < 1, torch.ones(n, dtype=torch.bool)]
    lengths = [int(inputs["attention_mask"][b].sum()) - n + int(k.sum()) for b, k in enumerate(keep)]
    assert plan_groups(lengths) is not None  # this batch does run grouped
    method = gp.make_method("mask", prune_layer=-1)
    with torch.no_grad():
        grouped = prefill(family.model, gp.get_adapter(family.model), method, inputs, {"keep_masks": keep})
        plain = prefill(family.model, gp.get_adapter(family.model), method, inputs, {"keep_masks": keep}, group=False)
    torch.testing.assert_close(grouped.logits, plain.logits, atol=1e-5, rtol=0)


class _RecordRope(MaskMethod):
    """The mask method, recording the rotary tables and key mask right after compaction."""

    def after_compact(self, state, hidden):
        state.scratch.update(rope=tuple(r.clone() for r in state.rope), key_mask=state.key_mask.clone())
        return hidden


def test_kept_tokens_keep_mrope_coordinates(family):
    """After compaction every kept token's rotary table is the one of its ORIGINAL (t, h, w) position (from the
    model's get_rope_index, interleaved sections), and decoding starts at the stock model's next position."""
    model = family.model
    adapter = gp.get_adapter(model)
    inputs = family.batch([IMG_A, IMG_C])
    keep = engine_suite._random_keep([family.n_vis(IMG_A), family.n_vis(IMG_C)], seed=9, frac=0.3)
    with torch.no_grad():
        pre = prefill(model, adapter, _RecordRope(prune_layer=1), inputs, {"keep_masks": keep})
        enc = adapter.encode(model, inputs)
        cos, sin = adapter.rotary(model, enc.embeds, enc.positions)
        ids, mm = inputs["input_ids"], inputs["mm_token_type_ids"]
        stock_pos, deltas = model.model.get_rope_index(ids, mm, image_grid_thw=inputs["image_grid_thw"],
                                                       attention_mask=inputs["attention_mask"])
    valid = inputs["attention_mask"].bool()
    assert torch.equal(enc.positions[:, valid], stock_pos[:, valid])
    kept = valid & ~dropped_positions(inputs, model.config.image_token_id, keep)
    got_cos, got_sin = pre.scratch["rope"]
    km = pre.scratch["key_mask"]
    for b in range(2):
        torch.testing.assert_close(got_cos[b][km[b]], cos[b][kept[b]], atol=0, rtol=0)
        torch.testing.assert_close(got_sin[b][km[b]], sin[b][kept[b]], atol=0, rtol=0)
    # the visual tokens of IMG_A sit on a 7 x 7 grid: t constant, h / w = start + row / col (3-D, not 1-D ids)
    vis = enc.positions[:, 0, enc.vis_mask[0]]
    start = int(vis[0, 0])
    rows, cols = torch.arange(49) // 7, torch.arange(49) % 7
    assert torch.equal(vis, torch.stack([torch.full((49,), start), start + rows, start + cols]))
    assert torch.equal(pre.next_pos, valid.sum(1) + deltas.view(-1))  # the stock model's first decode position


# --------------------------------------------------------------------------- MoE


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen3-VL-MoE (4 experts, top-2 in every layer) beside the tiny processor."""
    from transformers import GenerationConfig, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from glimpseprune.testing import tiny_qwen3_vl_config

    out = build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl_moe") / "model", seed=1)
    dense = tiny_qwen3_vl_config()
    sub = {}
    for name in ("text_config", "vision_config"):
        d = getattr(dense, name).to_dict()
        for key in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype"):
            d.pop(key, None)
        sub[name] = d
    sub["text_config"].update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    ids = {k: getattr(dense, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id")}
    config = Qwen3VLMoeConfig(**sub, **ids, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig.from_pretrained(out)
    model.save_pretrained(out)
    return out


def test_moe_keep_all_and_pruning_equal_stock(moe_dir):
    model, processor = gp.load_base(moe_dir)
    adapter = gp.get_adapter(model)
    assert isinstance(adapter, Qwen3VLAdapter) and adapter.dims(model).model_type == "qwen3_vl_moe"
    inputs = make_batch(processor, [IMG_A])
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        pre = prefill(model, adapter, gp.get_method("full")(), inputs, all_logits=True)
    torch.testing.assert_close(pre.logits[valid], ref[valid], atol=1e-5, rtol=0)
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    keep = engine_suite._random_keep([n_vis], seed=6)
    out = gp.apply(model, "mask", prune_layer=1).generate(inputs, max_new_tokens=N_NEW, keep_masks=keep,
                                                          return_logits=True)
    oracle = oracle_model(moe_dir)
    with masking(dropped_positions(inputs, model.config.image_token_id, keep), 1), torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle, inputs, N_NEW, pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(out.sequences, ref_tokens)
    for ours, r in zip(out.step_logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, r, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- presets, shapes, FLOPs


def test_presets_match_the_shape_file():
    from glimpseprune.bench.shapes import load_shape
    from glimpseprune.config import PRESETS, default_prune_layer, default_vision_taps

    shape = load_shape("qwen3_vl_8b")
    assert shape.model_type == "qwen3_vl" and shape.vision.deepstack_blocks == (8, 16, 24)
    assert gp.preset("qwen3_vl_8b", base_model_name=None) == shape.glimpse_config()  # sizes, K, taps, VIP agree
    for name in ("qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b"):
        cfg = gp.preset(name)
        assert cfg.base_model_type == "qwen3_vl"
        assert cfg.prune_layer == default_prune_layer(cfg.base_num_layers)
        assert cfg.vision_taps == default_vision_taps(cfg.base_vision_depth)
        assert (cfg.vip_width, cfg.cond_width, cfg.vip_heads, cfg.n_vip_layers) == (256, 512, 4, 4)
        assert PRESETS[name]["base_model_name"] == f"Qwen/Qwen3-VL-{name.rsplit('_', 1)[1].upper()}-Instruct"


def test_shape_round_trip_and_hf_config(family):
    from glimpseprune.bench.shapes import ModelShape

    shape = ModelShape.from_hf(family.model.config, name="tiny-q3")
    assert shape.model_type == "qwen3_vl" and not shape.vision.gated_mlp
    assert shape.vision.fullatt_blocks == (0, 1, 2, 3) and shape.vision.deepstack_blocks == (0, 1, 2)
    assert ModelShape.from_dict(json.loads(json.dumps(shape.to_dict()))) == shape
    again = ModelShape.from_hf(shape.to_hf_config(), name="tiny-q3")
    assert again.text == shape.text and again.vision == shape.vision
    assert shape.model_class().__name__ == "Qwen3VLForConditionalGeneration"
    # a random-init timing model of the shape, on synthetic inputs: the runtime's keep-all prefill == its stock forward
    from glimpseprune.bench.efficiency import build_model, synth_inputs

    model, inputs = build_model(shape), synth_inputs(shape, (3, 4), 6, 2)
    with torch.no_grad():
        pre = prefill(model, gp.get_adapter(model), gp.get_method("full")(), inputs)
        torch.testing.assert_close(pre.logits, model(**inputs).logits[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no window attention"):
        ModelShape.from_dict({**shape.to_dict(), "vision": {**shape.to_dict()["vision"], "fullatt_blocks": [1]}})


def test_vit_flops_hand_computed_and_counted(family):
    """Qwen3-VL ViT: no windows, a 2-matrix MLP and one merger per DeepStack block, written out by hand on the tiny
    shape, then checked against FlopCounterMode on the tiny model's ViT (eager attention: visible matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText

    from glimpseprune.bench import flops as F
    from glimpseprune.bench.shapes import ModelShape

    v = ModelShape.from_hf(family.model.config).vision  # D 32, I 64, 4 blocks, patch 16, merge 2, DeepStack x3
    f = F.vit_flops(v, [(1, 10, 8)])  # 80 patches -> 20 merged tokens
    P, D, I = 80, 32, 64
    assert f["patch_embed"] == 2 * P * (3 * 2 * 16 * 16) * D
    assert f["linear"] == 4 * (2 * P * D * 3 * D + 2 * P * D * D + 2 * (2 * P * D * I))
    assert f["window_attn"] == 0 and f["full_attn"] == 4 * 2 * 2 * D * P * P
    merger = 2 * 20 * (4 * D) * (4 * D) + 2 * 20 * (4 * D) * 64
    assert f["merger"] == merger and f["deepstack_mergers"] == 3 * merger
    eager = AutoModelForImageTextToText.from_pretrained(family.model_dir, attn_implementation="eager").eval()
    inputs = family.batch([[(128, 160)]])  # 160 x 128 px = 10 x 8 patches
    assert inputs["image_grid_thw"].tolist() == [[1, 10, 8]]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        eager.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert fc.get_total_flops() == f["total"]


# --------------------------------------------------------------------------- training, make-tiny


def test_stage1_forward_matches_stock_and_trains(family):
    """forward_train with nothing pruned == the stock model on prompt + answer (DeepStack in the training path);
    then two stage-1 AdamW steps on the world collator run with finite losses and VIP gradients."""
    from glimpseprune.methods.full import FullMethod
    from glimpseprune.runtime.train import forward_train
    from glimpseprune.training.stage1 import Collator, Stage1Config, Stage1Model, WorldDataset, build_module

    model, processor = family.model, family.processor
    batch = Collator(processor, model)([WorldDataset(2)[i] for i in range(2)])
    inputs, suffix, smask = batch["inputs"], batch["suffix_ids"], batch["suffix_mask"]
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], suffix], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], smask.long()], 1),
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(suffix)], 1)}
    L0, T = inputs["input_ids"].shape[1], suffix.shape[1]
    with torch.no_grad():
        ref = model(**full).logits[:, L0 - 1:L0 + T - 1]
        out = forward_train(model, gp.get_adapter(model), FullMethod(), inputs, suffix, smask)
    torch.testing.assert_close(out.suffix_logits[smask], ref[smask], atol=1e-4, rtol=0)

    torch.manual_seed(0)
    cfg = Stage1Config(model="tiny-qwen3-vl", module=dict(vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64))
    module = build_module(model, cfg)
    assert module.cfg.base_model_type == "qwen3_vl"
    stage1 = Stage1Model(model, module, cfg).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    model.requires_grad_(False)  # frozen, as the trainer does
    try:
        for _ in range(2):
            loss = stage1(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(loss) and module.vip.out_proj.weight.grad.abs().sum() > 0
            opt.step()
    finally:
        model.requires_grad_(True)


def test_make_tiny_qwen3_vl(tmp_path, capsys):
    from glimpseprune.cli import main

    assert main(["make-tiny", "--family", "qwen3_vl", "--out", str(tmp_path / "kit")]) == 0
    assert "Qwen3-VL" in capsys.readouterr().out
    model_dir = tmp_path / "kit" / "model"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3_vl"
    assert json.loads((model_dir / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    pm = gp.load(model_dir, module=tmp_path / "kit" / "module")
    assert type(pm.processor).__name__ == ("Qwen3VLProcessor" if TORCHVISION else "Qwen3VLImageProcessorOnly")
    out = pm.generate(make_batch(pm.processor, [IMG_A]), max_new_tokens=2)
    assert out.n_vis == [49] and out.sequences.shape == (1, 2)
