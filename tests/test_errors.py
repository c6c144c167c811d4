"""Bad input gets a clear error that names the problem (on each model family where a model is involved)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG_A, IMG_B, small_glimpse_config

import glimpseprune as gp
from glimpseprune.adapters.base import ModelDims
from glimpseprune.checkpoint import CONFIG_NAME


def test_unreadable_image(family, tmp_path):
    pm = gp.apply(family.model, "full", processor=family.processor)
    with pytest.raises(ValueError, match="cannot read image file .*missing.png"):
        pm.generate(images=[[tmp_path / "missing.png"]], questions=["What?"])
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file .*notes.png"):
        pm.generate(images=[[bad]], questions=["What?"])


def _image_keys(batch) -> dict:
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}


def test_images_vs_placeholders(family):
    model = family.model
    two = family.batch([IMG_B])
    one = family.batch([IMG_A])
    bad = {**two, **_image_keys(one)}
    with pytest.raises(ValueError, match=r"number of images \(1\) does not match .* placeholders .*\(2\)"):
        gp.apply(model, "full").generate(bad, max_new_tokens=1)
    text_only = {**family.batch([[]]), **_image_keys(one)}
    with pytest.raises(ValueError, match="number of images"):
        gp.apply(model, "full").generate(text_only, max_new_tokens=1)
    missing = {k: v for k, v in two.items() if k not in _image_keys(two)}
    with pytest.raises(ValueError, match=r"number of images \(0\)|pixel_values and image_grid_thw"):
        gp.apply(model, "full").generate(missing, max_new_tokens=1)


def test_module_for_another_base(family, tmp_path):
    model, module = family.model, family.module
    dims = gp.get_adapter(model).dims(model)
    other = ModelDims(dims.model_type, dims.hidden_size * 2, dims.num_layers + 2, dims.num_heads,
                      dims.vision_width, dims.vision_depth)
    alien = gp.GlimpseModule(gp.config_for_model(other, vip_width=32, cond_width=32, vip_heads=2))
    with pytest.raises(ValueError, match="another base model.*hidden size: module 128 vs model 64.*layer count"):
        gp.apply(model, "glimpse", module=alien)
    gp.save_module(alien, tmp_path / "alien")
    with pytest.raises(ValueError, match="hidden size"):
        gp.load_module(tmp_path / "alien", dims)
    with pytest.raises(FileNotFoundError, match="no glimpse module"):
        gp.load_module(tmp_path / "nothing")
    gp.save_module(module, tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    meta["glimpse"]["base_num_layers"] = 7
    (tmp_path / "ok" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layer count: module 7 vs model 4"):
        gp.load_module(tmp_path / "ok", dims)


@pytest.mark.parametrize("kw, match", [
    (dict(threshold=1.5), "threshold must be in"), (dict(threshold=-0.1), "threshold must be in"),
    (dict(max_keep_ratio=0.0), "max_keep_ratio"), (dict(max_keep_ratio=1.2), "max_keep_ratio"),
    (dict(fixed_keep_ratio=0.0), "fixed_keep_ratio"),
    (dict(fixed_keep_ratio=0.5, max_keep_ratio=0.1), "max_keep_ratio 0.1 would be ignored"),
])
def test_bad_selection(kw, match):
    with pytest.raises(ValueError, match=match):
        gp.SelectionConfig(**kw)


def test_prune_layer_out_of_range(family):
    model = family.model
    inputs = family.batch([IMG_A])
    with pytest.raises(ValueError, match=r"prune layer 9 is outside the LLM's layer range \[-1, 3\]"):
        keep = [torch.ones(family.n_vis(IMG_A), dtype=torch.bool)]
        gp.apply(model, "mask", prune_layer=9).generate(inputs, keep_masks=keep)
    with pytest.raises(ValueError, match=r"prune_layer must be in \[0, 3\]"):
        small_glimpse_config(model, prune_layer=4)


def test_right_padding_rejected(family):
    inputs = dict(family.batch([IMG_A, []]))
    assert not bool(inputs["attention_mask"].all())
    for k in [k for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs]:
        # move each row's padding to the right
        rows = []
        for row, m in zip(inputs[k], inputs["attention_mask"]):
            rows.append(torch.cat([row[m.bool()], row[~m.bool()]]))
        inputs[k] = torch.stack(rows)
    inputs["attention_mask"] = torch.stack(
        [torch.cat([torch.ones(int(m.sum())), torch.zeros(int((1 - m).sum()))]) for m in
         family.batch([IMG_A, []])["attention_mask"]]).long()
    with pytest.raises(ValueError, match="right-padded"):
        gp.apply(family.model, "full").generate(inputs, max_new_tokens=1)


def test_mask_method_needs_masks(family):
    model = family.model
    inputs = family.batch([IMG_A])
    with pytest.raises(ValueError, match="needs keep_masks"):
        gp.apply(model, "mask").generate(inputs)
    with pytest.raises(ValueError, match=rf"keep_masks\[0\] has 3 entries but sample 0 has {family.n_vis(IMG_A)}"):
        gp.apply(model, "mask").generate(inputs, keep_masks=[torch.ones(3, dtype=torch.bool)])


def test_glimpse_needs_module(family):
    model = family.model
    with pytest.raises(ValueError, match="needs a trained module"):
        gp.apply(model, "glimpse")
    with pytest.raises(KeyError, match="unknown pruning method 'nope'"):
        gp.apply(model, "nope")
