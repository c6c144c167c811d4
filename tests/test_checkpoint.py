"""Module checkpoints: save -> load and upstream-layout conversion -> load reproduce the outputs exactly, for each
model family (the upstream Qwen2.5-VL and LLaVA-1.5 releases share key names; their configs differ)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG_A, IMG_B
from safetensors.torch import save_file

import glimpseprune as gp
from glimpseprune.checkpoint import CONFIG_NAME, WEIGHTS_NAME, _upstream_config, adapter_record, file_sha256


def _run(family, module):
    inputs = family.batch([IMG_A, IMG_B])
    return gp.apply(family.model, "glimpse", module=module).generate(inputs, max_new_tokens=6, return_logits=True)


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.keep_masks, b.keep_masks))
    assert all(torch.equal(x, y) for x, y in zip(a.step_logits, b.step_logits))


def test_save_load_roundtrip(family, tmp_path):
    model, module = family.model, family.module
    gp.save_module(module, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert {"library_version", "transformers_version", "torch_version"} <= set(meta)
    assert meta["glimpse"]["base_model_type"] == family.name
    loaded = gp.load_module(tmp_path / "m", gp.get_adapter(model).dims(model))
    _assert_same(_run(family, module), _run(family, loaded))


def _upstream_model_config(model, cfg) -> dict:
    """The base-model part of an upstream config.json: Qwen nests text / vision configs; LLaVA-1.5 is a flat Llama
    config (model_type llava_llama_gp) with the CLIP width as mm_hidden_size and no CLIP depth."""
    if model.config.model_type == "llava":
        t = model.config.text_config
        return {"model_type": "llava_llama_gp", "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "mm_hidden_size": model.config.vision_config.hidden_size,
                "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
                "use_attention_logits": cfg.attn_score == "logits"}
    t = model.config.text_config
    return {"model_type": "qwen2_5_vl_gp", "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "vision_config": {"hidden_size": model.config.vision_config.hidden_size,
                              "depth": model.config.vision_config.depth}, "use_attention_logits": True}


def _to_upstream(module, tmp_path, model):
    """Write our module in the upstream release layout (config.json + new_modules_gp.pt), key names as released."""
    cfg = module.cfg
    sd = module.state_dict()
    last = cfg.n_vip_layers - 1
    attn_fuser = {}
    for k, v in sd.items():
        if k.startswith("vip.out_proj."):
            attn_fuser[f"attn_out_projs.{last}." + k.split(".")[-1]] = v.clone()
        elif k.startswith("vip."):
            attn_fuser[k[len("vip."):]] = v.clone()
    blob = {
        "attn_fuser": attn_fuser,
        "learnable_embeddings": sd["glimpse_embeddings"].clone(),
        "le_proj": {"weight": sd["glimpse_proj.weight"].clone(), "bias": sd["glimpse_proj.bias"].clone()},
        "le_norm": {"weight": sd["glimpse_norm.weight"].clone()},
    }
    t = model.config.text_config
    config = {
        **_upstream_model_config(model, cfg),
        "selected_layers": [cfg.prune_layer], "reduce_layer": cfg.prune_layer,
        "attn_fuse_type": "AttnFuserV1", "attn_fuse_size": cfg.vip_width, "attn_fuse_num_heads": cfg.vip_heads,
        "selected_visual_layers": list(cfg.vision_taps), "visual_cond_size": cfg.cond_width,
        "attn_fuse_global": True, "deep_supervision": False, "le_layers": list(range(t.num_hidden_layers)),
        "le_length": 1, "reduce_threshold": 0.5, "min_remain_num": 1,
    }
    up = tmp_path / "upstream"
    up.mkdir()
    (up / "config.json").write_text(json.dumps(config))
    torch.save(blob, up / "new_modules_gp.pt")
    return up


def test_upstream_conversion(family, tmp_path):
    model, module = family.model, family.module
    dims = gp.get_adapter(model).dims(model)
    up = _to_upstream(module, tmp_path, model)
    with pytest.raises(FileNotFoundError, match="convert"):
        gp.load_module(up)  # an unconverted upstream directory gets a hint, not a traceback
    depth = dims.vision_depth if family.name == "llava" else None  # LLaVA configs do not record the CLIP depth
    gp.convert_upstream(up, tmp_path / "converted", vision_depth=depth)
    loaded = gp.load_module(tmp_path / "converted", dims)
    assert loaded.cfg.attn_score == module.cfg.attn_score and loaded.cfg.vision_taps == module.cfg.vision_taps
    assert loaded.vip.attn_in_proj.weight.shape == (module.cfg.vip_width, dims.num_heads)
    assert loaded.vip.cond_in_projs[0].weight.shape == (module.cfg.cond_width, dims.vision_width)
    _assert_same(_run(family, module), _run(family, loaded))


def test_cli_convert(family, tmp_path):
    from glimpseprune.cli import main

    up = _to_upstream(family.module, tmp_path, family.model)
    assert main(["convert", "--upstream", str(up), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / WEIGHTS_NAME).is_file()
    assert main(["convert", "--upstream", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2


# mutation audit: rules a one-line change could break unnoticed

def _plus_folder(tmp_path, r=4, alpha=8, peft_type="LORA"):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": r, "lora_alpha": alpha}))
    save_file({"x.lora_A.weight": torch.zeros(r, 3)}, str(tmp_path / "adapter_model.safetensors"))
    meta = {"adapter": {"format": "peft-lora", "sha256": file_sha256(tmp_path / "adapter_model.safetensors"),
                        "r": 4, "alpha": 8}}
    return meta


def test_adapter_record_checks_rank_alpha_and_type(tmp_path):
    assert adapter_record(tmp_path, _plus_folder(tmp_path)).alpha == 8
    with pytest.raises(ValueError, match="does not match the adapter"):
        adapter_record(tmp_path, _plus_folder(tmp_path, alpha=16))
    with pytest.raises(ValueError, match="does not match the adapter"):
        adapter_record(tmp_path, _plus_folder(tmp_path, r=8))
    with pytest.raises(ValueError, match="is not LORA"):
        adapter_record(tmp_path, _plus_folder(tmp_path, peft_type="IA3"))


def _upstream_raw(reduce_layer):
    return {"model_type": "qwen2_5_vl_gp", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "rms_norm_eps": 1e-6, "vision_config": {"hidden_size": 32, "depth": 4}, "selected_layers": [1],
            "reduce_layer": reduce_layer, "attn_fuse_global": True, "selected_visual_layers": [1],
            "attn_fuse_size": 32, "visual_cond_size": 32, "attn_fuse_num_heads": 2}


def test_upstream_reduce_layer_must_be_a_layer_of_the_llm():
    assert _upstream_config(_upstream_raw(3)).prune_layer == 3
    with pytest.raises(ValueError, match=r"reduce_layer=4 is outside the LLM's layers \[0, 3\]"):
        _upstream_config(_upstream_raw(4))


def test_check_compatible_names_every_field_that_differs():
    from dataclasses import replace

    from glimpseprune.adapters.base import ModelDims
    from glimpseprune.checkpoint import check_compatible, config_for_model

    dims = ModelDims("qwen2_5_vl", hidden_size=64, num_layers=4, num_heads=4, vision_width=32, vision_depth=4)
    cfg = config_for_model(dims)
    check_compatible(cfg, dims)
    for field, label, other in (("model_type", "model type", "llava"), ("hidden_size", "hidden size", 128),
                                ("num_layers", "layer count", 8), ("num_heads", "attention heads", 8),
                                ("vision_width", "vision width", 48), ("vision_depth", "vision depth", 6)):
        want = f"{label}: module {getattr(dims, field)} vs model {other}"
        with pytest.raises(ValueError, match=want) as err:
            check_compatible(cfg, replace(dims, **{field: other}))
        assert str(err.value).count(" vs model ") == 1  # only the field that differs


def test_adapter_record_sha256_is_64_digits_compared_in_lower_case(tmp_path):
    from glimpseprune.checkpoint import AdapterRecord

    digest = "ab" * 32
    rec = AdapterRecord.from_dict({"format": "peft-lora", "sha256": digest.upper(), "r": 4, "alpha": 8}, tmp_path)
    assert rec.sha256 == digest  # file_sha256 gives lower case: an upper-case record is the same file
    for bad in (digest + "0", digest[:-1]):
        with pytest.raises(ValueError, match="64-digit hex string"):
            AdapterRecord.from_dict({"format": "peft-lora", "sha256": bad, "r": 4, "alpha": 8}, tmp_path)
    with pytest.raises(ValueError, match="base_model_name must be a string or null"):
        AdapterRecord.from_dict({"format": "peft-lora", "sha256": digest, "r": 4, "alpha": 8, "base_model_name": 3},
                                tmp_path)
    meta = _plus_folder(tmp_path)
    meta["adapter"]["sha256"] = meta["adapter"]["sha256"].upper()
    assert adapter_record(tmp_path, meta).sha256 == file_sha256(tmp_path / "adapter_model.safetensors")


def test_read_merged_record(tmp_path):
    from glimpseprune.checkpoint import MERGED_NAME, read_merged_record

    assert read_merged_record(tmp_path) is None  # a stock base folder
    digest = "cd" * 32
    (tmp_path / MERGED_NAME).write_text(json.dumps({"adapter_sha256": digest.upper(), "adapter_dir": "x"}))
    assert read_merged_record(tmp_path) == digest
    for bad in ({"adapter_sha256": digest[:-1]}, {"sha256": digest}, [digest]):
        (tmp_path / MERGED_NAME).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="adapter_sha256 must be a 64-digit hex string"):
            read_merged_record(tmp_path)


@pytest.mark.parametrize("held", ["adapter_config.json", "adapter_model.safetensors"])
def test_save_module_refuses_a_folder_with_either_adapter_file(model, tmp_path, held):
    from conftest import random_module

    (tmp_path / held).write_text("{}")
    with pytest.raises(ValueError, match=f"holds a LoRA adapter \\({held}\\)"):
        gp.save_module(random_module(model), tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


def test_upstream_boundary_values_are_accepted_and_the_ones_past_them_refused():
    first = _upstream_config({**_upstream_raw(0), "selected_layers": [0]})
    assert first.prune_layer == 0  # the first LLM layer is a layer
    with pytest.raises(ValueError, match=r"reduce_layer=-1 is outside"):
        _upstream_config(_upstream_raw(-1))
    one_block = {**_upstream_raw(1), "selected_visual_layers": [0]}
    assert _upstream_config(one_block, vision_depth=1).base_vision_depth == 1
    with pytest.raises(ValueError, match="vision depth must be at least 1, got 0"):
        _upstream_config(_upstream_raw(1), vision_depth=0)
    edge = {"reduce_threshold": 0.0, "min_remain_num": 0, "max_remain_ratio": 1.0, "fixed_remain_ratio": 1.0}
    sel = _upstream_config({**_upstream_raw(1), **edge}).extra["upstream_selection"]
    assert sel == {"threshold": 0.0, "min_keep": 0, "max_keep_ratio": 1.0, "fixed_keep_ratio": 1.0}
    for key, value in (("reduce_threshold", -0.1), ("min_remain_num", -1), ("max_remain_ratio", 0.0),
                       ("fixed_remain_ratio", 0.0), ("rms_norm_eps", 0.0)):
        with pytest.raises(ValueError, match=key):
            _upstream_config({**_upstream_raw(1), key: value})


def test_a_module_folder_missing_its_weights_is_named(model, tmp_path):
    from conftest import random_module

    folder = gp.save_module(random_module(model), tmp_path / "m")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"no glimpse module at {folder}: expected {CONFIG_NAME} and "
                                                f"{WEIGHTS_NAME}$"):
        gp.load_module(folder)
    (folder / CONFIG_NAME).unlink()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="only a LoRA adapter is here"):
        gp.load_module(folder)
