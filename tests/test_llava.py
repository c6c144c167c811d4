"""LLaVA-specific checks (the shared engine, error and checkpoint suites also run on LLaVA through ``family``): the
adapter's embeddings / taps / positions against the stock model, presets, box -> token masks through LLaVA's
preprocessing, the upstream LLaVA release layout, the CLI, and stage-1 training on a tiny LLaVA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IMG_A, IMG_B, make_batch
from PIL import Image

import glimpseprune as gp
from glimpseprune.adapters.base import ModelDims
from glimpseprune.adapters.llava import LlavaAdapter
from glimpseprune.adapters.llava_processing import llava_box_to_grid, llava_image_mode
from glimpseprune.config import PRESETS, preset
from glimpseprune.processing import load_processor
from glimpseprune.registry import list_adapters
from glimpseprune.testing import build_tiny_llava, random_image


@pytest.fixture(scope="module")
def tiny(llava):
    return llava  # (model, processor) of the session's tiny LLaVA


# --------------------------------------------------------------------------- adapter


def test_registered_and_dims(tiny):
    model, _ = tiny
    adapter = gp.get_adapter(model)
    assert isinstance(adapter, LlavaAdapter) and "llava" in list_adapters()
    assert adapter.dims(model) == ModelDims("llava", 64, 4, 4, 32, 4)
    assert adapter.grid(model) == (8, 8)


def test_encode_matches_stock(tiny):
    """Embeddings == the stock model's LLM input; tap depth-2 (= hidden_states[-2]) is what the projector projects;
    positions are 1-D and count valid tokens only."""
    model, processor = tiny
    inputs = make_batch(processor, [IMG_A, IMG_B, []])
    adapter = gp.get_adapter(model)
    taps = (3, 2, 1, 0)
    with torch.no_grad():
        enc = adapter.encode(model, inputs, taps=taps)
        stock = model(**inputs, output_hidden_states=True)
        clip = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        projected = model.model.multi_modal_projector(enc.vision_feats[0].view(3, 64, -1))
    assert len(clip) == 5  # embeddings + 4 blocks
    torch.testing.assert_close(enc.embeds, stock.hidden_states[0], atol=0, rtol=0)
    for t, feat in zip(taps, enc.vision_feats):
        torch.testing.assert_close(feat, clip[t][:, 1:].reshape(-1, 32), atol=0, rtol=0)
    torch.testing.assert_close(projected.reshape(-1, 64), enc.embeds[enc.vis_mask], atol=1e-6, rtol=0)
    mask = inputs["attention_mask"].bool()
    assert enc.positions.shape == (1, *mask.shape)
    assert torch.equal(enc.positions[0][mask], torch.cat([torch.arange(int(n)) for n in mask.sum(1)]))
    assert enc.next_pos.tolist() == mask.sum(1).tolist()
    assert enc.grids == [(8, 8)] * 3 and enc.image_owner == [0, 1, 1] and enc.n_vis == [64, 128, 0]
    assert adapter.decode_positions(enc.next_pos).shape == (1, 3, 1)


def test_encode_errors(tiny, monkeypatch):
    model, processor = tiny
    adapter = gp.get_adapter(model)
    inputs = dict(make_batch(processor, [IMG_A]))
    cut = {**inputs, "input_ids": inputs["input_ids"].clone()}
    cut["input_ids"][0, inputs["input_ids"][0] == model.config.image_token_id] = processor.tokenizer.pad_token_id
    cut["input_ids"][0, -1] = model.config.image_token_id  # one stray <image> token
    with pytest.raises(ValueError, match="sample 0 holds 1 <image> tokens, not a multiple of the 64"):
        adapter.encode(model, cut)
    with pytest.raises(ValueError, match="multi-crop"):
        adapter.encode(model, {**inputs, "pixel_values": inputs["pixel_values"][None]})
    with pytest.raises(ValueError, match="vision tap 9 outside CLIP's hidden states"):
        adapter.encode(model, inputs, taps=(9,))
    n = model.config.vision_config.num_hidden_layers + 1  # hidden_states[0 .. depth]: tap n is one past the end
    with pytest.raises(ValueError, match=rf"vision tap {n} outside CLIP's hidden states \[0, {n - 1}\]"):
        adapter.encode(model, inputs, taps=(n,))
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full' is not supported"):
        adapter.encode(model, inputs)


# --------------------------------------------------------------------------- presets and the upstream layout


@pytest.mark.parametrize("name, hidden, layers, heads, K, vip, glimpse", [
    ("llava_1_5_7b", 4096, 32, 32, 21, 8_930_817, 16_916_480),
    ("llava_1_5_13b", 5120, 40, 40, 26, 8_932_865, 26_429_440),
])
def test_llava_presets(name, hidden, layers, heads, K, vip, glimpse):
    """Sizes and parameter counts of the released LLaVA-1.5 modules (reference §3.2, §4)."""
    cfg = preset(name)
    assert (cfg.base_model_type, cfg.base_hidden_size, cfg.base_num_layers, cfg.base_num_heads) == \
        ("llava", hidden, layers, heads)
    assert (cfg.base_vision_width, cfg.base_vision_depth, cfg.prune_layer) == (1024, 24, K)
    assert cfg.vision_taps == (23, 17, 11, 5) and cfg.attn_score == "log_softmax"
    dims = ModelDims("llava", hidden, layers, heads, 1024, 24)
    sized = gp.config_for_model(dims, cond_width=512)
    assert (sized.prune_layer, sized.vision_taps, sized.attn_score) == (K, (23, 17, 11, 5), "log_softmax")
    with torch.device("meta"):
        module = gp.GlimpseModule(cfg)
    assert sum(p.numel() for p in module.vip.parameters()) == vip
    assert sum(p.numel() for n, p in module.named_parameters() if not n.startswith("vip.")) == glimpse
    assert module.vip.attn_in_proj.weight.shape == (256, heads)
    assert module.vip.cond_in_projs[0].weight.shape == (512, 1024)
    assert set(PRESETS) >= {"llava_1_5_7b", "llava_1_5_13b", "qwen2_5_vl_7b"}


def test_upstream_llava_config_layout():
    """A released LLaVA-1.5-7B config.json (flat Llama fields, mm_hidden_size) converts to the 7B preset."""
    from glimpseprune.checkpoint import _upstream_config

    raw = {"model_type": "llava_llama_gp", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "mm_hidden_size": 1024, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "selected_layers": [21],
           "reduce_layer": 21, "use_attention_logits": False, "attn_fuse_size": 256, "visual_cond_size": 512,
           "selected_visual_layers": [23, 17, 11, 5], "attn_fuse_num_heads": 4, "attn_fuse_global": True,
           "le_layers": list(range(32)), "le_length": 1}
    cfg = _upstream_config(raw)
    want = preset("llava_1_5_7b")
    for field in ("base_model_type", "base_hidden_size", "base_num_layers", "base_num_heads", "base_vision_width",
                  "base_vision_depth", "prune_layer", "vision_taps", "attn_layers", "glimpse_layers", "vip_width",
                  "cond_width", "vip_heads", "vip_mlp_width", "attn_score"):
        assert getattr(cfg, field) == getattr(want, field), field
    with pytest.raises(ValueError, match="upstream model_type 'internvl_gp' is not supported"):
        _upstream_config({**raw, "model_type": "internvl_gp"})


def test_converted_without_depth_names_mismatch(llava, llava_module, tmp_path):
    from test_checkpoint import _to_upstream

    model = llava[0]
    up = _to_upstream(llava_module, tmp_path, model)
    gp.convert_upstream(up, tmp_path / "c")  # no vision_depth: CLIP-L's 24 blocks are assumed
    with pytest.raises(ValueError, match="vision depth: module 24 vs model 4"):
        gp.load_module(tmp_path / "c", gp.get_adapter(model).dims(model))


# --------------------------------------------------------------------------- boxes -> token grid


@pytest.mark.parametrize("box, width, height, grid, kw, rows, cols", [
    # 200 x 100 padded to 200 x 200 (50 px bands above and below): y 0..50 -> 50..100 of 200 -> row 1 of 4
    ((0, 0, 100, 50), 200, 100, 4, dict(mode="pad"), [1], [0, 1]),
    # 100 x 300 padded to 300 x 300 (100 px bands left and right): x 0..100 -> 100..200 -> column 1 of 3
    ((0, 0, 100, 300), 100, 300, 3, dict(mode="pad"), [0, 1, 2], [1]),
    # pad with the processor's resize (200 -> 112) and crop: the same normalised geometry
    ((0, 0, 100, 50), 200, 100, 4, dict(mode="pad", size=112, crop=112), [1], [0, 1]),
    # 200 x 100 resized to shortest edge 100 and centre-cropped to 100: x 50..150 survives
    ((50, 0, 100, 25), 200, 100, 4, dict(mode="crop", size=100, crop=100), [0], [0, 1]),
    ((125, 75, 150, 100), 200, 100, 4, dict(mode="crop"), [3], [3]),
    # squash: normalised by the original size
    ((0, 0, 100, 50), 200, 100, 4, dict(mode="resize"), [0, 1], [0, 1]),
    # an edge on a grid line does not spill over; a point marks the cell holding it
    ((25, 25, 50, 50), 100, 100, 4, dict(mode="pad"), [1], [1]),
    ((60, 60, 60, 60), 100, 100, 4, dict(mode="pad"), [2], [2]),
    # an odd surplus: transformers' center_crop drops (5 - 4) // 2 = 0 columns on the left, the extra one on the right
    ((1, 0, 2, 1), 5, 4, 4, dict(mode="crop"), [0], [1]),
    # a point on the far edge marks the last cell; a point on a grid line the cell it starts
    ((100, 100, 100, 100), 100, 100, 4, dict(mode="pad"), [3], [3]),
    ((50, 50, 50, 50), 100, 100, 4, dict(mode="pad"), [2], [2]),
    # 5 x 3 resized to shortest edge 4: 6 x 4 (transformers' int(4 * 5 / 3) = 6, not round's 7), centre-cropped to 4
    # (1 px off the left): x 4..5 -> 4.8..6 -> 3.8..5 -> column 3 of 4
    ((4, 0, 5, 3), 5, 3, 4, dict(mode="crop", size=4, crop=4), [0, 1, 2, 3], [3]),
    # a (height, width) = (4, 8) resize of 100 x 100, centre-cropped to 4 x 4 (2 px off the left): x 50..75 -> 2..4
    ((50, 0, 75, 25), 100, 100, 4, dict(mode="crop", size=(4, 8)), [0], [2, 3]),
])
def test_box_to_grid_hand_cases(box, width, height, grid, kw, rows, cols):
    want = np.zeros((grid, grid), dtype=bool)
    want[np.ix_(rows, cols)] = True
    assert np.array_equal(llava_box_to_grid([box], width, height, grid, **kw), want)


def test_box_to_grid_edges():
    # cropped away entirely: nothing; partly: clipped
    assert not llava_box_to_grid([(0, 0, 40, 100)], 200, 100, 4, "crop", size=100).any()
    assert llava_box_to_grid([(0, 0, 60, 100)], 200, 100, 4, "crop", size=100)[:, 0].all()
    assert not llava_box_to_grid([(0, 0, 50, 100)], 200, 100, 4, "crop", size=100).any()  # ends on the crop edge
    assert llava_box_to_grid([], 10, 10, 3).shape == (3, 3)
    for bad, match in [(dict(mode="squash"), "mode must be one of"), (dict(grid=0), "grid must be positive")]:
        with pytest.raises(ValueError, match=match):
            llava_box_to_grid([(0, 0, 1, 1)], 10, 10, **{"grid": 2, **bad})
    for box in [(5, 0, 1, 1), (0, 5, 1, 1)]:
        with pytest.raises(ValueError, match="x2 < x1"):
            llava_box_to_grid([box], 10, 10, 2)


@pytest.mark.parametrize("image_mode", ["pad", "crop"])
@pytest.mark.parametrize("size, box", [((280, 140), (105, 35, 140, 70)), ((140, 280), (35, 105, 70, 140)),
                                       ((140, 140), (35, 35, 70, 105))])  # edges on token lines in both modes
def test_box_to_grid_follows_processor(tmp_path_factory, image_mode, size, box):
    """A red box drawn on a grey image lands exactly on the token cells the mask names, through the real
    processor's pad-to-square or resize-and-crop (the upstream mapping would be off on non-square images)."""
    proc = load_processor(build_tiny_llava(tmp_path_factory.mktemp(image_mode), image_mode=image_mode))
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((255, 0, 0), box)
    pixels = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]  # (3, 112, 112)
    red = (pixels[0] > 1.0) & (pixels[1] < -1.0)  # normalised red channel high, green low
    cells = red.view(8, 14, 8, 14).float().mean(dim=(1, 3)).numpy()  # red fraction per token
    mask = llava_box_to_grid([box], *size, 8, **llava_image_mode(proc.image_processor))
    assert llava_image_mode(proc.image_processor)["mode"] == image_mode
    assert mask.any() and (cells[mask] > 0.5).all() and (cells[~mask] < 0.05).all()


def test_box_to_grid_follows_unresized_processors_pixel_by_pixel():
    """Without a resize every pixel stays one pixel: a 10 x 7 image padded (an odd 3 px surplus: 1 row on top, as
    LlavaImageProcessor pads) and a 9 x 7 image centre-cropped to a non-square 4 x 6; with a grid of one cell per
    pixel, each painted pixel's mask is exactly where the real processor puts it."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    raw = dict(do_resize=False, do_rescale=False, do_normalize=False)
    pad = LlavaImageProcessorPil(do_pad=True, do_center_crop=False, **raw)
    crop = CLIPImageProcessorPil(do_center_crop=True, crop_size={"height": 4, "width": 6}, **raw)
    assert llava_image_mode(pad) == {"mode": "pad", "size": None, "crop": None}
    assert llava_image_mode(crop) == {"mode": "crop", "size": None, "crop": (4, 6)}
    for processor, (width, height), grid in [(pad, (10, 7), (10, 10)), (crop, (9, 7), (4, 6))]:
        for y in range(height):
            for x in range(width):
                pixels = np.zeros((height, width, 3), dtype=np.uint8)
                pixels[y, x, 0] = 255
                out = processor(images=[Image.fromarray(pixels)], return_tensors="np")["pixel_values"][0]
                mask = llava_box_to_grid([(x, y, x + 1, y + 1)], width, height, grid, **llava_image_mode(processor))
                assert np.array_equal(mask, np.asarray(out[0]) > 200), (processor, x, y)


def test_image_mode_keeps_a_crop_smaller_than_the_resize():
    from types import SimpleNamespace

    clip = SimpleNamespace(size={"shortest_edge": 8}, crop_size={"height": 4, "width": 6}, do_resize=True,
                           do_center_crop=True, do_pad=False)
    assert llava_image_mode(clip) == {"mode": "crop", "size": 8, "crop": (4, 6)}


def test_llava_chat_template_ends_with_the_generation_prompt():
    """The tiny LLaVA tokenizer renders the llava-hf format; the prompt a model answers ends with "ASSISTANT:"."""
    from glimpseprune.adapters.llava_processing import make_tiny_llava_tokenizer

    tokenizer = make_tiny_llava_tokenizer()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "Be brief. USER: <image>\nWhat colour? ASSISTANT:"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "Be brief. USER: <image>\nWhat colour? "


# --------------------------------------------------------------------------- CLI and training


def test_cli_new_module_and_ask(llava_dir, tmp_path, capsys):
    from glimpseprune.cli import main

    random_image(200, 120, seed=3).save(tmp_path / "x.png")
    assert main(["new-module", "--model", str(llava_dir), "--out", str(tmp_path / "mod"), "--small"]) == 0
    meta = json.loads((tmp_path / "mod" / "glimpse_config.json").read_text())["glimpse"]
    assert meta["base_model_type"] == "llava" and meta["attn_score"] == "log_softmax"
    capsys.readouterr()
    assert main(["ask", "--model", str(llava_dir), "--module", str(tmp_path / "mod"), "--image",
                 str(tmp_path / "x.png"), "--question", "What colour is the square?", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_vis"] == 64 and 1 <= out["kept"] <= 64 and out["prune_layer"] == 2


def _llava_collate(processor, items):
    """An independent re-statement of the stage-1 Collator for LLaVA: no image_grid_thw, the answer ends with the
    tokenizer's eos, and box targets follow the processor's geometry (llava_box_to_grid)."""
    from glimpseprune.processing import build_inputs

    inputs = build_inputs(processor, [[it["image"]] for it in items], [it["question"] for it in items])
    tok = processor.tokenizer
    ids = [tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for it in items]
    T = max(len(x) for x in ids)
    suffix = torch.full((len(items), T), tok.pad_token_id, dtype=torch.long)
    smask = torch.zeros(len(items), T, dtype=torch.bool)
    for b, x in enumerate(ids):
        suffix[b, :len(x)], smask[b, :len(x)] = torch.tensor(x), True
    geometry = llava_image_mode(processor.image_processor)
    targets = [torch.from_numpy(llava_box_to_grid(it["boxes"], it["width"], it["height"], 8, **geometry).reshape(-1))
               for it in items]
    return {"inputs": dict(inputs), "suffix_ids": suffix, "suffix_mask": smask, "targets": targets}


@pytest.mark.parametrize("attn_score, steps", [("log_softmax", 5), ("logits", 16)])
def test_stage1_steps_reduce_loss(llava, attn_score, steps):
    """Stage-1 loss (Dice + BCE on box tokens + answer CE) on a tiny LLaVA falls over AdamW steps on one batch.

    With LLaVA's log-softmax scores (upstream) only the answer CE moves here: the random base's glimpse attention is
    nearly uniform, so log p is about -log(L) on every token and the VIP sees one constant; with raw logits the box
    (localisation) loss falls too, which shows the adapter's taps and attention scores carry the signal."""
    from glimpseprune.training.stage1 import Stage1Config, Stage1Model, WorldDataset, build_module

    model, processor = llava
    torch.manual_seed(0)
    small = dict(vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64)
    cfg = Stage1Config(model="tiny-llava", module={**small, "attn_score": attn_score})
    module = build_module(model, cfg)
    stage1 = Stage1Model(model, module, cfg).train()
    batch = _llava_collate(processor, [WorldDataset(4)[i] for i in range(4)])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    total, loc = [], []
    model.requires_grad_(False)  # frozen, as the trainer does
    try:
        for _ in range(steps):
            loss = stage1(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            total.append(loss.item())
            loc.append(stage1.metrics["loc_loss"])
    finally:
        model.requires_grad_(True)
    assert total[-1] < total[0], total
    if attn_score == "logits":
        assert loc[-1] < 0.7 * loc[0], loc


def test_trainer_runs_on_llava(llava_dir, tmp_path):
    from glimpseprune.training.stage1 import Stage1Config
    from glimpseprune.training.trainer import train

    cfg = Stage1Config(model=str(llava_dir), output_dir=str(tmp_path / "run"), train_samples=16, eval_samples=4,
                       batch_size=4, max_steps=4, logging_steps=1, eval_steps=100, save_steps=100, learning_rate=3e-3,
                       module=dict(vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64))
    module_dir = train(cfg)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert (module_dir / "glimpse_module.safetensors").is_file() and losses[-1] < losses[0]


def test_collator_follows_llava_geometry(llava):
    from glimpseprune.training.stage1 import Collator, WorldDataset

    model, processor = llava
    items = [WorldDataset(4)[i] for i in range(4)]
    got, want = Collator(processor, model)(items), _llava_collate(processor, items)
    assert torch.equal(got["suffix_ids"], want["suffix_ids"]) and torch.equal(got["suffix_mask"], want["suffix_mask"])
    assert all(torch.equal(a, b) for a, b in zip(got["targets"], want["targets"], strict=True))
    assert any(bool(t.any()) for t in got["targets"])


def test_token_view_pads_a_wide_image_centred_vertically(tiny):
    """A 20 x 10 red image under do_pad: pasted at (0, 5) on a grey 20 x 20 square, then resized to the CLIP side:
    grey at the top and bottom quarter rows, red across the middle."""
    from types import SimpleNamespace

    model = tiny[0]
    proc = SimpleNamespace(image_processor=SimpleNamespace(do_pad=True, do_resize=True, size={"shortest_edge": 336}))
    view = np.asarray(LlavaAdapter().token_view(model, proc, Image.new("RGB", (20, 10), (255, 0, 0))))
    side = model.config.vision_config.image_size
    assert view.shape == (side, side, 3)
    assert view[1, side // 2].tolist() == [127, 127, 127] and view[-2, side // 2].tolist() == [127, 127, 127]
    assert view[side // 2, 1].tolist() == [255, 0, 0] and view[side // 2, -2].tolist() == [255, 0, 0]
