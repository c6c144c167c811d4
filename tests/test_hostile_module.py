"""Hostile and unusual module checkpoints: converter fidelity for upstream fields that change the function
(attention-layer order, the glimpse norm's epsilon, the VIP activation, missing fields read with upstream's defaults),
and validation on load / convert (non-finite weights, bad numbers, corrupt or truncated files, wrong shapes)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG_A, make_batch
from safetensors.torch import save_file

import glimpseprune as gp
from glimpseprune.adapters.base import ModelDims
from glimpseprune.checkpoint import CONFIG_NAME, UPSTREAM_WEIGHTS, WEIGHTS_NAME
from glimpseprune.config import GlimpseConfig

# A tiny module that needs no base model: 16 hidden, 3 LLM layers, 2 heads; a 2-block encoder of width 8.
SMALL = dict(base_model_type="qwen2_5_vl", base_hidden_size=16, base_num_layers=3, base_num_heads=2,
             base_vision_width=8, base_vision_depth=2, prune_layer=2, vision_taps=(1, 0), vip_width=8, cond_width=8,
             vip_heads=2, vip_mlp_width=16)


def small_module(**kw) -> gp.GlimpseModule:
    torch.manual_seed(0)
    return gp.GlimpseModule(GlimpseConfig(**{**SMALL, **kw})).eval()


def write_upstream(tmp_path, module: gp.GlimpseModule, name="up", blob=None, **fields):
    """``module`` in the upstream release layout (config.json + new_modules_gp.pt); ``fields`` override the config,
    a value of None deletes the field."""
    cfg, sd = module.cfg, module.state_dict()
    last = cfg.n_vip_layers - 1
    fuser = {(f"attn_out_projs.{last}." + k.split(".")[-1] if k.startswith("vip.out_proj.") else k[4:]): v.clone()
             for k, v in sd.items() if k.startswith("vip.")}
    if blob is None:
        blob = {"attn_fuser": fuser, "learnable_embeddings": sd["glimpse_embeddings"].clone(),
                "le_proj": {"weight": sd["glimpse_proj.weight"].clone(), "bias": sd["glimpse_proj.bias"].clone()},
                "le_norm": {"weight": sd["glimpse_norm.weight"].clone()}}
    config = {
        "model_type": "qwen2_5_vl_gp", "hidden_size": cfg.base_hidden_size,
        "num_hidden_layers": cfg.base_num_layers, "num_attention_heads": cfg.base_num_heads,
        "rms_norm_eps": 1e-6, "vision_config": {"hidden_size": cfg.base_vision_width, "depth": cfg.base_vision_depth},
        "selected_layers": list(cfg.attn_layers), "reduce_layer": cfg.prune_layer, "use_attention_logits": True,
        "attn_fuse_type": "AttnFuserV1", "attn_fuse_size": cfg.vip_width, "attn_fuse_num_heads": cfg.vip_heads,
        "selected_visual_layers": list(cfg.vision_taps), "visual_cond_size": cfg.cond_width,
        "attn_fuse_hidden_act": "silu", "attn_fuse_global": True, "deep_supervision": False,
        "le_layers": list(cfg.glimpse_layers), "le_length": 1, "le_norm_type": "rmsnorm",
    }
    for k, v in fields.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    up = tmp_path / name
    up.mkdir()
    (up / "config.json").write_text(json.dumps(config))
    if isinstance(blob, bytes):
        (up / UPSTREAM_WEIGHTS).write_bytes(blob)
    else:
        torch.save(blob, up / UPSTREAM_WEIGHTS)
    return up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# ------------------------------------------------------------------------------- 1. attention-layer order


def _vip_attn_input(model, module, inputs) -> torch.Tensor:
    """The glimpse-attention features (n_vis, n_attn_layers * heads) the VIP receives at inference."""
    seen = []
    handle = module.vip.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        gp.apply(model, "glimpse", module=module).generate(inputs, max_new_tokens=1)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_attn_layers_feed_the_vip_in_list_order(model, processor):
    """Upstream stacks the selected layers' features in the order of ``selected_layers``: with (2, 1) the VIP's
    first columns are layer 2's heads. Each layer's features come independently from a one-layer module with the same
    glimpse weights."""
    from glimpseprune.runtime.train import forward_train

    dims = gp.get_adapter(model).dims(model)
    kw = dict(vip_width=32, cond_width=32, vip_heads=2, vip_mlp_width=64, prune_layer=2)
    torch.manual_seed(0)
    two = gp.GlimpseModule(gp.config_for_model(dims, attn_layers=(2, 1), **kw)).eval()
    glimpse = {k: v for k, v in two.state_dict().items() if not k.startswith("vip.")}
    inputs = make_batch(processor, [IMG_A])
    single = {}
    for layer in (1, 2):
        one = gp.GlimpseModule(gp.config_for_model(dims, attn_layers=(layer,), **kw)).eval()
        one.load_state_dict(glimpse, strict=False)
        single[layer] = _vip_attn_input(model, one, inputs)
    h = dims.num_heads
    assert not torch.equal(single[1], single[2])
    got = _vip_attn_input(model, two, inputs)
    assert torch.equal(got[:, :h], single[2]) and torch.equal(got[:, h:], single[1])
    # training's forward goes through the same predict_logits: same columns, same order
    seen = []
    handle = two.vip.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            method = gp.get_method("glimpse")(module=two)
            forward_train(model, gp.get_adapter(model), method, inputs, torch.ones(1, 2, dtype=torch.long),
                          torch.ones(1, 2, dtype=torch.long))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], got)


# ------------------------------------------------------------------------------- 2. glimpse norm epsilon


def test_glimpse_norm_eps_field():
    m = small_module(glimpse_norm_eps=1e-2)
    assert m.glimpse_norm.eps == 1e-2
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in m.vip.layers)  # the VIP keeps rms_eps
    e = m.glimpse_embeddings[1, 0]
    want = rms_norm(m.glimpse_proj(e), m.glimpse_norm.weight, 1e-2)
    torch.testing.assert_close(m.glimpse_vector(1), want)
    assert small_module().glimpse_norm.eps == 1e-6  # None: rms_eps, as before
    d = small_module().cfg.to_dict()
    del d["glimpse_norm_eps"]  # module JSONs written before the field load unchanged
    assert GlimpseConfig.from_dict(d).glimpse_norm_eps is None


@pytest.mark.parametrize("nested", [False, True])
def test_convert_reads_rms_norm_eps(tmp_path, nested):
    src = small_module()
    extra = {}
    if nested:  # newer Qwen configs nest the text model
        extra = {"text_config": {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                                 "rms_norm_eps": 1e-2}, "rms_norm_eps": None}
    up = write_upstream(tmp_path, src, **{"rms_norm_eps": 1e-2, **extra})
    gp.convert_upstream(up, tmp_path / "c")
    m = gp.load_module(tmp_path / "c")
    assert m.cfg.glimpse_norm_eps == 1e-2 and m.glimpse_norm.eps == 1e-2 and m.cfg.rms_eps == 1e-6
    e = src.glimpse_embeddings[0, 0]
    torch.testing.assert_close(m.glimpse_vector(0), rms_norm(src.glimpse_proj(e), src.glimpse_norm.weight, 1e-2))


def test_convert_llava_reads_top_level_rms_norm_eps(tmp_path):
    src = small_module(base_model_type="llava")
    up = write_upstream(tmp_path, src, model_type="llava_llama_gp", vision_config=None, mm_hidden_size=8,
                        rms_norm_eps=1e-5, use_attention_logits=False)
    gp.convert_upstream(up, tmp_path / "c", vision_depth=2)
    cfg = gp.load_module(tmp_path / "c").cfg
    assert (cfg.base_model_type, cfg.glimpse_norm_eps, cfg.attn_score) == ("llava", 1e-5, "log_softmax")


def test_config_for_model_takes_the_models_eps():
    dims = ModelDims("qwen2_5_vl", 16, 3, 2, 8, 2, rms_norm_eps=1e-5)
    assert dims == ModelDims("qwen2_5_vl", 16, 3, 2, 8, 2)  # the eps does not identify a base model
    cfg = gp.config_for_model(dims, vip_width=8, cond_width=8, vip_heads=2)
    assert cfg.glimpse_norm_eps == 1e-5 and cfg.rms_eps == 1e-6
    assert gp.config_for_model(ModelDims("qwen2_5_vl", 16, 3, 2, 8, 2), vip_width=8, cond_width=8,
                               vip_heads=2).glimpse_norm_eps is None


# ------------------------------------------------------------------------------- 3. function-changing fields


def test_convert_vip_activation(tmp_path):
    src = small_module()
    gp.convert_upstream(write_upstream(tmp_path, src, attn_fuse_hidden_act="gelu"), tmp_path / "c")
    m = gp.load_module(tmp_path / "c")
    assert m.cfg.vip_act == "gelu"
    mlp = src.vip.layers[0].mlp
    x = torch.randn(5, 8)
    want = mlp.down_proj(F.gelu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(m.vip.layers[0].mlp(x), want)
    assert not torch.allclose(want, mlp(x))  # silu would differ
    with pytest.raises(ValueError, match="attn_fuse_hidden_act"):
        gp.convert_upstream(write_upstream(tmp_path, src, "bad", attn_fuse_hidden_act="mish"), tmp_path / "d")
    with pytest.raises(ValueError, match="vip_act"):
        small_module(vip_act="mish")


@pytest.mark.parametrize("fields, message", [
    (dict(attn_fuse_global=None), "attn_fuse_global"),  # upstream's default is false: windowed attention
    (dict(attn_fuse_global=False), "attn_fuse_global"),
    (dict(attn_fuse_global="yes"), "attn_fuse_global"),
    (dict(le_norm_type="layernorm"), "le_norm_type"),
    (dict(use_ref_masks=True), "use_ref_masks"),
    (dict(use_zero_masks=True), "use_zero_masks"),
    (dict(anchor_positions=["tl"]), "anchor_positions"),
    (dict(attn_fuse_type="AttnFuserV2"), "attn_fuse_type"),
    (dict(le_length=2), "le_length"),
    (dict(reduce_layer=None), "reduce_layer"),
    (dict(reduce_layer="x"), "reduce_layer"),
    (dict(selected_layers=None), "selected_layers"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(rms_norm_eps="nan"), "rms_norm_eps"),
    (dict(use_attention_logits="true"), "use_attention_logits"),
    (dict(reduce_threshold=2.0), "reduce_threshold"),
])
def test_convert_refuses_unsupported_upstream_fields(tmp_path, fields, message):
    up = write_upstream(tmp_path, small_module(), **fields)
    with pytest.raises(ValueError, match=message) as err:
        gp.convert_upstream(up, tmp_path / "c")
    assert "config.json" in str(err.value)
    assert not (tmp_path / "c").exists()


def test_convert_reads_missing_fields_with_upstream_defaults(tmp_path):
    """Fields absent from config.json take upstream's defaults: silu, rmsnorm, deep supervision (extra heads are
    dropped), le_layers (0,)."""
    src = small_module(glimpse_layers=(0,))
    up = write_upstream(tmp_path, src, attn_fuse_hidden_act=None, le_norm_type=None, deep_supervision=None,
                        le_layers=None)
    gp.convert_upstream(up, tmp_path / "c")
    cfg = gp.load_module(tmp_path / "c").cfg
    assert (cfg.vip_act, cfg.glimpse_layers) == ("silu", (0,))


# ------------------------------------------------------------------------------- 4. validation


@pytest.mark.parametrize("field, value", [
    ("rms_eps", 0.0), ("rms_eps", -1e-6), ("rms_eps", math.nan), ("rms_eps", math.inf), ("rope_theta", 0.0),
    ("rope_theta", -10.0), ("rope_theta", math.inf), ("glimpse_norm_eps", 0.0), ("glimpse_norm_eps", math.nan),
    ("prune_layer", "abc"), ("prune_layer", True), ("prune_layer", 1.5), ("rms_eps", "abc"), ("rms_eps", [1]),
    ("vision_taps", "10"), ("vision_taps", [1, "x"]), ("base_num_heads", 0), ("base_vision_width", -1),
    ("base_vision_depth", "two"), ("base_model_name", 5), ("extra", []), ("base_model_type", ""),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(field)):
        GlimpseConfig(**{**SMALL, field: value})


def test_config_accepts_numeric_strings():
    """Numbers written as strings (hand-edited JSON, YAML's ``1e-6``) convert cleanly."""
    cfg = GlimpseConfig(**{**SMALL, "prune_layer": "2", "rms_eps": "1e-6", "vision_taps": ["1", 0],
                           "base_hidden_size": " 16 ", "rope_theta": 10000, "glimpse_norm_eps": "1e-5"})
    assert cfg == GlimpseConfig(**{**SMALL, "glimpse_norm_eps": 1e-5})
    assert isinstance(cfg.prune_layer, int) and isinstance(cfg.rms_eps, float) and isinstance(cfg.rope_theta, float)


def _save(tmp_path, module=None, name="m"):
    return gp.save_module(module if module is not None else small_module(), tmp_path / name)


def _edit_json(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def test_load_module_numeric_strings_and_named_errors(tmp_path):
    ref = small_module()
    p = _save(tmp_path, ref)

    def stringify(meta):
        meta["glimpse"].update(prune_layer="2", rms_eps="1e-6")
    _edit_json(p, stringify)
    m = gp.load_module(p)
    assert m.cfg == ref.cfg
    x = torch.randn(m.cfg.base_hidden_size)
    assert torch.equal(m.glimpse_norm(x), ref.glimpse_norm(x))

    _edit_json(p, lambda meta: meta["glimpse"].update(prune_layer="abc"))
    with pytest.raises(ValueError, match="prune_layer") as err:
        gp.load_module(p)
    assert CONFIG_NAME in str(err.value)
    _edit_json(p, lambda meta: meta["glimpse"].update(prune_layer=2, rms_eps=-1))
    with pytest.raises(ValueError, match="rms_eps"):
        gp.load_module(p)
    _edit_json(p, lambda meta: (meta["glimpse"].update(rms_eps=1e-6), meta["glimpse"].pop("prune_layer")))
    with pytest.raises(ValueError, match="prune_layer"):
        gp.load_module(p)
    _edit_json(p, lambda meta: meta.pop("glimpse"))
    with pytest.raises(ValueError, match=CONFIG_NAME):
        gp.load_module(p)


def test_load_module_invalid_json(tmp_path):
    p = _save(tmp_path)
    (p / CONFIG_NAME).write_text('{"glimpse": {"prune_layer": 2,')
    with pytest.raises(ValueError, match=re.escape(str(p / CONFIG_NAME))):
        gp.load_module(p)
    (p / CONFIG_NAME).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=CONFIG_NAME):
        gp.load_module(p)
    (p / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=CONFIG_NAME):
        gp.load_module(p)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_load_module_rejects_non_finite_weights(tmp_path, bad):
    p = _save(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(p / WEIGHTS_NAME))
    state["vip.layers.1.mlp.up_proj.bias"][3] = bad
    save_file(state, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"glimpse_module\.safetensors.*vip\.layers\.1\.mlp\.up_proj\.bias"):
        gp.load_module(p)


def test_load_module_rejects_overflow_on_cast(tmp_path):
    m = small_module()
    with torch.no_grad():
        m.glimpse_proj.weight[0, 0] = 1e6  # finite in fp32, inf in fp16
    p = _save(tmp_path, m)
    gp.load_module(p)
    with pytest.raises(ValueError, match="glimpse_proj.weight.*float16"):
        gp.load_module(p, dtype=torch.float16)


def test_load_module_rejects_wrong_shapes_and_dtypes(tmp_path):
    p = _save(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(p / WEIGHTS_NAME))
    good = dict(state)
    state["vip.attn_in_proj.weight"] = torch.zeros(8, 5)
    save_file(state, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"safetensors.*vip\.attn_in_proj\.weight.*shape"):
        gp.load_module(p)
    state = {**good, "glimpse_norm.weight": torch.ones(16, dtype=torch.int64)}
    save_file(state, str(p / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"safetensors.*glimpse_norm\.weight.*int64"):
        gp.load_module(p)


def test_load_module_truncated_or_garbage_safetensors(tmp_path):
    p = _save(tmp_path)
    data = (p / WEIGHTS_NAME).read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"", b"not a safetensors file at all" * 10):
        (p / WEIGHTS_NAME).write_bytes(broken)
        with pytest.raises(ValueError, match=re.escape(str(p / WEIGHTS_NAME))):
            gp.load_module(p)


def test_convert_invalid_upstream_json(tmp_path):
    up = write_upstream(tmp_path, small_module())
    (up / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(up / "config.json"))):
        gp.convert_upstream(up, tmp_path / "c")
    (up / "config.json").write_text('"a string"')
    with pytest.raises(ValueError, match="config.json"):
        gp.convert_upstream(up, tmp_path / "c")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("kind", ["tensor", "list", "garbage", "truncated", "evil", "empty"])
def test_convert_unreadable_upstream_weights(tmp_path, kind):
    src = small_module()
    ok = write_upstream(tmp_path, src, "ok")
    data = (ok / UPSTREAM_WEIGHTS).read_bytes()
    blob = {"tensor": torch.zeros(3), "list": [1, 2], "garbage": b"\x80\x04garbage" * 20,
            "truncated": data[: len(data) // 2], "evil": {"attn_fuser": _Evil()}, "empty": b""}[kind]
    up = write_upstream(tmp_path, src, blob=blob)
    with pytest.raises(ValueError, match=re.escape(str(up / UPSTREAM_WEIGHTS))):
        gp.convert_upstream(up, tmp_path / "c")


@pytest.mark.parametrize("edit, key", [
    (lambda b: b["attn_fuser"].__setitem__("attn_in_proj.weight", torch.zeros(8, 3)), "attn_fuser.attn_in_proj.weight"),
    (lambda b: b["le_proj"].__setitem__("weight", torch.zeros(16, 16, dtype=torch.int32)), "le_proj.weight"),
    (lambda b: b["le_proj"].__setitem__("bias", [0.0] * 16), "le_proj.bias"),
    (lambda b: b.__setitem__("learnable_embeddings", torch.full((3, 1, 16), math.nan)), "learnable_embeddings"),
    (lambda b: b["attn_fuser"]["layers.0.norm1.weight"].__setitem__(0, math.inf), "attn_fuser.layers.0.norm1.weight"),
    (lambda b: b.__setitem__("le_norm", torch.ones(16)), "le_norm"),
    (lambda b: b.__setitem__("learnable_embeddings", torch.zeros(2, 1, 16)), "learnable_embeddings"),
    (lambda b: b.pop("le_proj"), "le_proj"),
    (lambda b: b.__setitem__("le_extra_proj", {"weight": torch.zeros(2, 2)}), "le_extra_proj"),  # would be dropped
    (lambda b: b["attn_fuser"].__setitem__("out_proj.weight", next(  # beside the last head's: two of one key
        v for k, v in b["attn_fuser"].items() if k.startswith("attn_out_projs.") and k.endswith(".weight"))),
     "vip.out_proj.weight"),
])
def test_convert_rejects_bad_upstream_tensors(tmp_path, edit, key):
    src = small_module()
    ok = write_upstream(tmp_path, src, "ok")
    blob = torch.load(ok / UPSTREAM_WEIGHTS, weights_only=True)
    edit(blob)
    up = write_upstream(tmp_path, src, blob=blob)
    with pytest.raises(ValueError, match=re.escape(str(up / UPSTREAM_WEIGHTS))) as err:
        gp.convert_upstream(up, tmp_path / "c")
    assert key in str(err.value)
    assert not (tmp_path / "c").exists()


def test_convert_roundtrip_is_exact(tmp_path):
    """A well-formed release still converts to the same function (attention order (2, 1), gelu, eps 1e-5)."""
    src = small_module(attn_layers=(2, 1), vip_act="gelu", glimpse_norm_eps=1e-5)
    gp.convert_upstream(write_upstream(tmp_path, src, attn_fuse_hidden_act="gelu", rms_norm_eps=1e-5),
                        tmp_path / "c")
    m = gp.load_module(tmp_path / "c")
    assert m.cfg.attn_layers == (2, 1)
    attn, conds = torch.randn(12, 4), [torch.randn(12, 8) for _ in range(2)]
    assert torch.equal(m(attn, conds, [(3, 4)]), src(attn, conds, [(3, 4)]))
    assert torch.equal(m.glimpse_vector(2), src.glimpse_vector(2))
