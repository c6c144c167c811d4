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
