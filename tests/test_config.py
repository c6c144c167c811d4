"""config.py: SelectionConfig / GlimpseConfig validation, JSON round trip, defaults and the released presets."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from glimpseprune.config import (
    CONFIG_VERSION,
    PRESETS,
    GlimpseConfig,
    SelectionConfig,
    default_prune_layer,
    default_vision_taps,
    preset,
)

# --------------------------------------------------------------------------------------------------- SelectionConfig


def test_selection_defaults():
    cfg = SelectionConfig()
    assert (cfg.threshold, cfg.max_keep_ratio, cfg.min_keep, cfg.fixed_keep_ratio) == (0.5, None, 1, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(threshold=0.0), dict(threshold=1.0), dict(max_keep_ratio=1.0), dict(max_keep_ratio=1e-6),
        dict(fixed_keep_ratio=1.0), dict(fixed_keep_ratio=0.01), dict(min_keep=0), dict(min_keep=1000),
    ],
)
def test_selection_accepts_boundary_values(kwargs):
    SelectionConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=-0.01), "threshold must be in [0, 1], got -0.01"),
        (dict(threshold=1.5), "threshold must be in [0, 1], got 1.5"),
        (dict(threshold=float("nan")), "threshold must be in [0, 1], got nan"),
        (dict(max_keep_ratio=0.0), "max_keep_ratio must be in (0, 1], got 0.0"),
        (dict(max_keep_ratio=-0.5), "max_keep_ratio must be in (0, 1], got -0.5"),
        (dict(max_keep_ratio=1.01), "max_keep_ratio must be in (0, 1], got 1.01"),
        (dict(fixed_keep_ratio=0.0), "fixed_keep_ratio must be in (0, 1], got 0.0"),
        (dict(fixed_keep_ratio=2.0), "fixed_keep_ratio must be in (0, 1], got 2.0"),
        (dict(min_keep=-1), "min_keep must be >= 0, got -1"),
    ],
)
def test_selection_rejects_bad_knobs(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SelectionConfig(**kwargs)


@pytest.mark.parametrize("field", ["threshold", "max_keep_ratio", "fixed_keep_ratio"])
def test_selection_refuses_a_bool_for_a_number(field):
    with pytest.raises(TypeError, match=f"{field} must be a number, got bool True"):
        SelectionConfig(**{field: True})


def test_selection_is_frozen():
    cfg = SelectionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 0.9  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------ defaults


@pytest.mark.parametrize("n_layers, expected", [(28, 18), (36, 23), (32, 21), (40, 26), (3, 1), (1, 0)])
def test_default_prune_layer(n_layers, expected):
    assert default_prune_layer(n_layers) == expected


@pytest.mark.parametrize("depth, expected", [(32, (31, 23, 15, 7)), (24, (23, 17, 11, 5)), (2, (1, 0))])
def test_default_vision_taps(depth, expected):
    assert default_vision_taps(depth) == expected


# ------------------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name, layers, hidden", [("qwen2_5_vl_7b", 28, 3584), ("qwen2_5_vl_3b", 36, 2048)])
def test_presets_match_release(name, layers, hidden):
    cfg = preset(name)
    assert cfg.base_model_type == "qwen2_5_vl"
    assert cfg.base_num_layers == layers and cfg.base_hidden_size == hidden
    assert cfg.vision_taps == (31, 23, 15, 7) == default_vision_taps(cfg.base_vision_depth)
    assert cfg.n_vip_layers == 4
    assert (cfg.vip_width, cfg.cond_width, cfg.vip_heads, cfg.vip_mlp_width) == (256, 512, 4, 512)
    assert cfg.prune_layer == default_prune_layer(layers)
    assert cfg.attn_layers == (cfg.prune_layer,)
    assert cfg.glimpse_layers == tuple(range(layers))
    assert cfg.attn_score == "logits"
    assert cfg.version == CONFIG_VERSION


def test_preset_names_and_overrides():
    assert {"qwen2_5_vl_7b", "qwen2_5_vl_3b"} <= set(PRESETS)
    cfg = preset("qwen2_5_vl_7b", prune_layer=10, vip_heads=8)
    assert (cfg.prune_layer, cfg.vip_heads, cfg.attn_layers) == (10, 8, (10,))
    assert preset("qwen2_5_vl_7b").prune_layer == 18  # overrides do not leak into the preset table
    with pytest.raises(KeyError, match="unknown preset 'nope'"):
        preset("nope")


# ------------------------------------------------------------------------------------------------- round trip


def test_to_dict_from_dict_round_trip_through_json():
    cfg = preset(
        "qwen2_5_vl_3b", attn_layers=(5, 23), glimpse_layers=(0, 3, 7), attn_score="log_softmax",
        extra={"converted_from": "x", "nested": {"a": [1, 2]}},
    )
    d = cfg.to_dict()
    assert d["vision_taps"] == [31, 23, 15, 7] and d["attn_layers"] == [5, 23] and d["glimpse_layers"] == [0, 3, 7]
    back = GlimpseConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert isinstance(back.vision_taps, tuple) and isinstance(back.glimpse_layers, tuple)
    assert back.to_dict() == d


def test_from_dict_without_version_defaults_to_current():
    d = preset("qwen2_5_vl_7b").to_dict()
    del d["version"]
    assert GlimpseConfig.from_dict(d).version == CONFIG_VERSION


def test_from_dict_fills_fields_older_files_lack_and_names_a_missing_one():
    d = preset("qwen2_5_vl_7b").to_dict()
    for name in ("extra", "glimpse_norm_eps", "vip_act", "kind"):
        del d[name]
    back = GlimpseConfig.from_dict(d)
    assert (back.extra, back.glimpse_norm_eps, back.vip_act, back.kind) == ({}, None, "silu", "glimpse")
    del d["prune_layer"]
    with pytest.raises(ValueError, match=re.escape("missing GlimpseConfig fields: ['prune_layer']")):
        GlimpseConfig.from_dict(d)


def test_from_dict_rejects_unknown_fields_and_newer_versions():
    d = preset("qwen2_5_vl_7b").to_dict()
    with pytest.raises(ValueError, match=re.escape("unknown GlimpseConfig fields: ['bogus']")):
        GlimpseConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match=f"version {CONFIG_VERSION + 1} is newer than this library"):
        GlimpseConfig.from_dict({**d, "version": CONFIG_VERSION + 1})


# ----------------------------------------------------------------------------------------------- invalid configs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prune_layer=28), "prune_layer must be in [0, 27] for a 28-layer LLM, got 28"),
        (dict(prune_layer=-1), "prune_layer must be in [0, 27]"),
        (dict(attn_layers=(18, 19)), "attention layer 19 must be in [0, prune_layer=18]"),
        (dict(glimpse_layers=(1, 2, 3)), "glimpse_layers must include layer 0"),
        (dict(glimpse_layers=(0, 28)), "glimpse layer 28 outside the LLM's layers [0, 27]"),
        (dict(glimpse_layers=(0, -1)), "glimpse layer -1 outside the LLM's layers [0, 27]"),
        (dict(attn_layers=(-1, 18)), "attention layer -1 must be in [0, prune_layer=18]"),
        (dict(attn_score="softmax"), "attn_score must be 'logits' or 'log_softmax', got 'softmax'"),
        (dict(vision_taps=()), "vision_taps must name at least one vision-encoder block"),
        (dict(vision_taps=(32, 7)), "vision tap 32 outside the encoder's blocks [0, 31]"),
        (dict(vip_heads=5), "must split into 5 heads"),
        (dict(vip_width=16, cond_width=8, vip_heads=4), "query head size divisible by 4"),  # 24/4 = 6
        (dict(vip_width=18, cond_width=14, vip_heads=4), "vip_width (18) must split into 4 heads"),  # 32/4 = 8
        (dict(vip_heads=0), "vip_heads must be a positive integer, got 0"),
        (dict(vip_width=-256), "vip_width must be a positive integer, got -256"),
        (dict(glimpse_layers=(0, 0, 5)), "glimpse_layers lists a layer twice: [0, 0, 5]"),
        (dict(vision_taps=(31, 31)), "vision_taps lists a layer twice: [31, 31]"),
    ],
)
def test_invalid_glimpse_config(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        preset("qwen2_5_vl_7b", **overrides)


def test_invalid_config_from_dict_is_validated_too():
    d = preset("qwen2_5_vl_7b").to_dict()
    with pytest.raises(ValueError, match="must include layer 0"):
        GlimpseConfig.from_dict({**d, "glimpse_layers": [5, 6]})


def test_glimpse_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("qwen2_5_vl_7b").prune_layer = 3  # type: ignore[misc]
