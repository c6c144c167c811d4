"""GlimpsePrune+ LoRA adapters: targets (every decoder nn.Linear, nothing else), a fresh adapter is the stock model,
gradients reach only LoRA weights through our runtime, the one-folder module + adapter checkpoint (save -> load
reproduces generation; missing / unrecorded / foreign adapters are named errors before anything loads), and the
merged base model folder."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import IMG_A, IMG_B
from safetensors.torch import load_file, save_file
from torch import nn

import glimpseprune as gp
import glimpseprune.api as api
from glimpseprune import lora
from glimpseprune.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_NAME,
    MERGED_ATTR,
    file_sha256,
    load_plus,
)
from glimpseprune.methods.glimpse import GlimpseMethod
from glimpseprune.runtime.train import forward_train
from glimpseprune.testing import build_tiny_qwen2_5_vl


def _fresh(family):
    """A private copy of the family's tiny model (adapters modify a model in place)."""
    return gp.load_base(family.model_dir)[0]


def _perturb(model, seed=1, std=0.05):
    """Non-trivial LoRA B weights (peft initialises B = 0, the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _run(model, family, inputs, module=None):
    pm = gp.apply(model, "glimpse", module=module or family.module)
    return pm.generate(inputs, max_new_tokens=6, return_logits=True)


def _close(a, b, atol):
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.keep_masks, b.keep_masks))
    assert max((x - y).abs().max().item() for x, y in zip(a.step_logits, b.step_logits)) <= atol


def _decoder_linears(model) -> set[str]:
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.language_model.layers.")}


def test_targets_are_exactly_the_decoder_linears(family):
    model = _fresh(family)
    layers = gp.get_adapter(model).layers(model)
    expected = _decoder_linears(model)
    assert len(expected) == 7 * len(layers)  # q, k, v, o, gate, up, down in every layer
    assert set(lora.decoder_linear_names(model)) == expected
    others = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - expected
    assert "lm_head" in others and any("visual" in n or "vision" in n for n in others)
    lora.add_lora(model)
    from peft.tuners.lora import LoraLayer

    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == expected
    assert all(type(model.get_submodule(n)) is nn.Linear for n in others)  # ViT, projector, lm_head untouched
    assert gp.get_adapter(model).layers(model) is layers  # in place: the runtime's view of the model is unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora.lora_parameters(model)) == 2 * len(expected)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (32, 64, 0.05)
    with pytest.raises(ValueError, match="already carries"):
        lora.add_lora(model)
    only_q = lora.decoder_linear_names(_fresh(family), ("q_proj",))
    assert len(only_q) == len(layers) and all(n.endswith("self_attn.q_proj") for n in only_q)
    with pytest.raises(ValueError, match="not linear layers of the decoder"):
        lora.decoder_linear_names(model, ("qkv",))
    last = len(layers) - 1
    late = lora.decoder_linear_names(_fresh(family), None, (last,))
    assert len(late) == 7 and all(f".layers.{last}." in n for n in late)
    with pytest.raises(ValueError, match="outside the LLM's decoder layers"):
        lora.decoder_linear_names(model, None, (last + 1,))
    with pytest.raises(ValueError, match="layers is empty"):
        lora.LoraSettings(layers=())
    with pytest.raises(ValueError, match="decoder layer indices"):
        lora.LoraSettings(layers=(-1,))
    only = lora.add_lora(_fresh(family), lora.LoraSettings(layers=(last,)))
    from peft.tuners.lora import LoraLayer

    assert {n for n, m in only.named_modules() if isinstance(m, LoraLayer)} == set(late)


def test_fresh_adapter_is_the_stock_model(family):
    inputs = family.batch([IMG_A, IMG_B])
    model = _fresh(family)
    stock_logits, stock = family.stock_logits(inputs), _run(family.model, family, inputs)
    lora.add_lora(model)
    with torch.no_grad():
        assert (model(**inputs, **_positions(family, inputs)).logits - stock_logits).abs().max() <= 1e-5
    _close(_run(model, family, inputs), stock, 1e-5)  # our runtime calls the (adapted) decoder layers directly
    _perturb(model)
    changed = _run(model, family, inputs)
    assert max((x - y).abs().max().item() for x, y in zip(changed.step_logits, stock.step_logits)) > 1e-3
    with lora.disabled_adapter(model):  # the reference policy
        _close(_run(model, family, inputs), stock, 1e-5)
    assert all(p.requires_grad for p in lora.lora_parameters(model))  # restored on exit


def _positions(family, inputs):
    if family.name != "llava":
        return {}
    mask = inputs["attention_mask"].bool()
    return {"position_ids": (mask.long().cumsum(1) - 1).masked_fill(~mask, 0)}


def test_gradients_reach_only_lora_weights(family):
    model = _perturb(lora.add_lora(_fresh(family)))  # B != 0, so A gets gradients too
    module = copy.deepcopy(family.module).requires_grad_(False)
    inputs = family.batch([IMG_A, IMG_B])
    suffix = torch.randint(5, 50, (2, 3))
    out = forward_train(model, gp.get_adapter(model), GlimpseMethod(module=module), inputs, suffix,
                        torch.ones_like(suffix, dtype=torch.bool))
    out.suffix_logits.float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    with lora.disabled_adapter(model):
        assert not any(p.requires_grad for p in lora.lora_parameters(model))


def _plus(family, tmp_path, seed=1):
    """A GlimpsePrune+ folder from the family's module and a perturbed adapter; (folder, adapted model)."""
    model = _perturb(lora.add_lora(_fresh(family)), seed)
    return lora.save_plus(family.module, model, tmp_path / f"plus{seed}"), model


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft, loading
def test_plus_folder_roundtrip(family, tmp_path):
    inputs = family.batch([IMG_A, IMG_B])
    plus, adapted = _plus(family, tmp_path)
    for name in (CONFIG_NAME, "glimpse_module.safetensors", ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (plus / name).is_file()
    rec = json.loads((plus / CONFIG_NAME).read_text())["adapter"]
    assert rec["format"] == "peft-lora" and (rec["r"], rec["alpha"]) == (32, 64)
    assert rec["sha256"] == file_sha256(plus / ADAPTER_WEIGHTS) and rec["base_model_type"] == family.name
    cfg = json.loads((plus / ADAPTER_CONFIG).read_text())
    assert set(cfg["target_modules"]) == _decoder_linears(family.model)  # full names, not peft's shortened suffixes
    want = _run(adapted, family, inputs)
    merged = gp.load(family.model_dir, module=plus)  # base + merged adapter + module
    assert not lora.has_lora(merged.model) and getattr(merged.model, MERGED_ATTR) == rec["sha256"]
    _close(merged.generate(inputs, max_new_tokens=6, return_logits=True), want, 1e-4)
    unmerged = gp.load(family.model_dir, module=plus, merge_adapter=False)
    assert lora.has_lora(unmerged.model) and not any(p.requires_grad for p in lora.lora_parameters(unmerged.model))
    _close(unmerged.generate(inputs, max_new_tokens=6, return_logits=True), want, 1e-6)
    from peft import PeftModel  # the folder is a PEFT adapter too (upstream loads it this way)

    peft_model = PeftModel.from_pretrained(_fresh(family), str(plus)).eval()
    kw = _positions(family, inputs)
    with torch.no_grad():
        assert torch.allclose(peft_model(**inputs, **kw).logits, adapted(**inputs, **kw).logits, atol=1e-6)


def test_plus_folder_errors(tmp_path, monkeypatch, family):
    if family.name != "qwen2_5_vl":
        pytest.skip("the folder rules do not depend on the family")
    plus, adapted = _plus(family, tmp_path)
    with pytest.raises(ValueError, match="allow_without_adapter"):
        gp.load_module(plus)  # the module alone is the wrong function
    assert gp.load_module(plus, allow_without_adapter=True).cfg == family.module.cfg

    def refuse(*a, **k):
        raise AssertionError("the base model was loaded before the folder was checked")

    monkeypatch.setattr(api, "load_base", refuse)
    # another adapter in the folder (or an edited one): the hash differs
    other = tmp_path / "other"
    lora.save_adapter(_perturb(adapted, seed=2), other)
    (plus / ADAPTER_WEIGHTS).write_bytes((other / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="not the adapter this module was trained with"):
        gp.load(family.model_dir, module=plus)
    # the adapter missing
    (plus / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"LoRA adapter that is missing from {plus}; loading the module "
                                                "alone loses its accuracy"):
        gp.load(family.model_dir, module=plus)
    with pytest.raises(FileNotFoundError, match="missing from"):
        gp.load_module(plus)
    # adapter files beside a module that records none
    plain = tmp_path / "plain"
    gp.save_module(family.module, plain)
    lora.save_adapter(adapted, plain)
    with pytest.raises(ValueError, match="records none"):
        gp.load_module(plain)
    with pytest.raises(ValueError, match="records none"):
        gp.load(family.model_dir, module=plain)
    with pytest.raises(ValueError, match="holds a LoRA adapter"):
        gp.save_module(family.module, plain)  # would write a folder that cannot load
    monkeypatch.undo()
    # a plain module folder still loads through load_plus, and the model is left alone
    model = _fresh(family)
    model2, mod = load_plus(model, gp.save_module(family.module, tmp_path / "plain_ok"))
    assert model2 is model and not hasattr(model, MERGED_ATTR) and mod.cfg == family.module.cfg


def test_adapter_for_another_base_model(family, tmp_path):
    if family.name != "qwen2_5_vl":
        pytest.skip("one family suffices")
    plus, _ = _plus(family, tmp_path)
    # same family and width (the module fits), another MLP size: the adapter does not
    other_dir = build_tiny_qwen2_5_vl(tmp_path / "wide", seed=3, text_config={"intermediate_size": 96})
    other = gp.load_base(other_dir)[0]
    before = {n: p.clone() for n, p in other.state_dict().items()}
    with pytest.raises(ValueError, match=f"adapter in {plus} was trained for another base model"):
        load_plus(other, plus)
    assert not lora.has_lora(other) and all(torch.equal(p, before[n]) for n, p in other.state_dict().items())
    # modules this model lacks (e.g. another depth)
    ad = tmp_path / "renamed"
    lora.save_adapter(_perturb(lora.add_lora(_fresh(family))), ad)
    state = load_file(str(ad / ADAPTER_WEIGHTS))
    state = {k.replace("layers.3.", "layers.30."): v for k, v in state.items()}
    save_file(state, str(ad / ADAPTER_WEIGHTS))
    model = _fresh(family)
    with pytest.raises(ValueError, match="has no linear layer .*layers.30"):
        lora.load_adapter(model, ad)
    assert not lora.has_lora(model)
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        lora.load_adapter(model, tmp_path / "nowhere")


def test_merge_and_save(family, tmp_path):
    inputs = family.batch([IMG_A, IMG_B])
    plus, adapted = _plus(family, tmp_path)
    out = lora.merge_and_save(family.model_dir, plus, tmp_path / "merged")
    base, _ = gp.load_base(out)
    assert getattr(base, MERGED_ATTR) == file_sha256(plus / ADAPTER_WEIGHTS)
    kw = _positions(family, inputs)
    with torch.no_grad():
        assert (base(**inputs, **kw).logits - adapted(**inputs, **kw).logits).abs().max() <= 1e-4
    pm = gp.load(out, module=plus)  # the adapter is already in the weights: not applied twice
    assert not lora.has_lora(pm.model)
    _close(pm.generate(inputs, max_new_tokens=6, return_logits=True), _run(adapted, family, inputs), 1e-4)
    with pytest.raises(ValueError, match="already hold another LoRA adapter"):
        load_plus(base, _plus(family, tmp_path, seed=2)[0])
    with pytest.raises(FileExistsError):
        lora.merge_and_save(family.model_dir, plus, out)
    broken = tmp_path / "broken_base"
    broken.mkdir()
    (broken / "config.json").write_text('{"dtype": "bfloat16"')  # torn: named before any model loads
    with pytest.raises(ValueError, match=r"config\.json: not JSON"):
        lora.merge_and_save(broken, plus, tmp_path / "merged2")


def test_scaling_fields_and_a_failed_load_leave_the_model_as_it_was(family, tmp_path, monkeypatch):
    """adapter_config.json edits that change the scaling (use_rslora: logits moved by ~20) loaded silently, the sha
    covering only the weights: refused. A load that fails after the LoRA layers went in left the caller's model
    half-adapted (and every later load refused): the layers are taken out again."""
    if family.name != "qwen2_5_vl":
        pytest.skip("one family suffices")
    plus, _ = _plus(family, tmp_path)
    cfg = json.loads((plus / ADAPTER_CONFIG).read_text())
    for key, value in (("use_rslora", True), ("alpha_pattern", {"q_proj": 4}), ("rank_pattern", {"q_proj": 8})):
        edited = tmp_path / f"edited_{key}"
        edited.mkdir()
        for f in plus.iterdir():
            (edited / f.name).write_bytes(f.read_bytes())
        (edited / ADAPTER_CONFIG).write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=f"{key} is set"):
            gp.load(family.model_dir, module=edited)
    import peft.functional

    model = _fresh(family)
    before = {n: p.clone() for n, p in model.state_dict().items()}

    def broken(*a, **k):
        raise RuntimeError("cast failed")

    monkeypatch.setattr(peft.functional, "cast_adapter_dtype", broken)
    with pytest.raises(RuntimeError, match="cast failed"):
        load_plus(model, plus)
    monkeypatch.undo()
    assert not lora.has_lora(model) and not hasattr(model, "peft_config") and not hasattr(model, MERGED_ATTR)
    assert {n: p for n, p in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    load_plus(model, plus)  # and the model still takes the adapter
    assert getattr(model, MERGED_ATTR) == file_sha256(plus / ADAPTER_WEIGHTS)


def test_compare_applies_a_plus_folders_adapter_to_every_method(family, tmp_path, monkeypatch):
    """compare --module GP+_DIR ran full / fastv on the stock base unless glimpse was among --methods (ask and eval
    apply the adapter whatever the method)."""
    if family.name != "qwen2_5_vl":
        pytest.skip("one family suffices")
    import glimpseprune.checkpoint as ck
    from glimpseprune.cli import main
    from glimpseprune.data.records import write_split

    plus, _ = _plus(family, tmp_path)
    split = write_split(tmp_path / "w", n=2, seed=1)
    seen, real = [], ck.load_plus

    def spy(model, path, **kw):
        seen.append(str(path))
        return real(model, path, **kw)

    monkeypatch.setattr(ck, "load_plus", spy)
    assert main(["compare", "--split", str(split), "--model", str(family.model_dir), "--module", str(plus),
                 "--methods", "fastv", "--budgets", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert seen == [str(plus)]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "c" / "runs").glob("*.json")]
    assert runs and all(r.get("module") == str(plus) for r in runs)


# mutation audit: rules a one-line change could break unnoticed

class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 6)
        self.config = SimpleNamespace(_name_or_path=None)


def _lora_folder(path, r=2, bias="none", drop_b=False):
    from peft import LoraConfig

    LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q"], bias=bias).save_pretrained(str(path))
    state = {"base_model.model.q.lora_A.weight": torch.randn(r, 4),
             "base_model.model.q.lora_B.weight": torch.randn(6, r)}
    if drop_b:
        del state["base_model.model.q.lora_B.weight"]
    save_file(state, str(path / "adapter_model.safetensors"))
    return path


def test_read_adapter_refuses_bias_and_half_pairs(tmp_path):
    from glimpseprune.lora import read_adapter

    read_adapter(_lora_folder(tmp_path / "ok"))
    with pytest.raises(ValueError, match="bias"):
        read_adapter(_lora_folder(tmp_path / "bias", bias="all"))
    with pytest.raises(ValueError, match="has no lora_B weight"):
        read_adapter(_lora_folder(tmp_path / "half", drop_b=True))


def test_adapter_with_inconsistent_rank_is_refused_before_the_model_is_touched(tmp_path):
    from peft import LoraConfig

    from glimpseprune.lora import check_adapter_fits

    state = {"q.lora_A.weight": torch.zeros(2, 4), "q.lora_B.weight": torch.zeros(6, 3)}  # A rank 2, B rank 3
    with pytest.raises(ValueError, match="trained for another base model"):
        check_adapter_fits(_Toy(), LoraConfig(r=2), state, tmp_path)


def test_load_adapter_leaves_requires_grad_alone_and_trainable_makes_lora_trainable(tmp_path):
    from glimpseprune.lora import load_adapter, lora_parameters

    folder = _lora_folder(tmp_path / "a")
    toy = _Toy()
    toy.q.bias.requires_grad_(False)
    load_adapter(toy, folder, merge=True)
    assert toy.q.weight.requires_grad and not toy.q.bias.requires_grad  # as they were
    toy2 = load_adapter(_Toy(), folder, merge=False, trainable=True)
    params = lora_parameters(toy2)
    assert params and all(p.requires_grad for p in params)


def test_load_plus_casts_the_module_to_the_dtype_asked(family, tmp_path):
    if family.name != "qwen2_5_vl":
        pytest.skip("one family suffices")
    plus, _ = _plus(family, tmp_path)
    plain = gp.save_module(family.module, tmp_path / "plain")
    for folder in (plus, plain):
        _, module = load_plus(_fresh(family), folder, dtype=torch.float16)
        assert {p.dtype for p in module.parameters()} == {torch.float16}, folder
        assert not module.training  # loaded for inference


def test_load_plus_checks_the_module_against_the_model_before_applying_the_adapter(family, tmp_path):
    if family.name != "qwen2_5_vl":
        pytest.skip("one family suffices")
    from dataclasses import replace

    dims = gp.get_adapter(family.model).dims(family.model)
    alien = gp.GlimpseModule(gp.config_for_model(replace(dims, num_layers=dims.num_layers + 2), vip_width=32,
                                                 cond_width=32, vip_heads=2))
    adapted = _perturb(lora.add_lora(_fresh(family)))
    for folder in (lora.save_plus(alien, adapted, tmp_path / "plus"), gp.save_module(alien, tmp_path / "plain")):
        model = _fresh(family)
        with pytest.raises(ValueError, match="another base model.*layer count: module 6 vs model 4"):
            load_plus(model, folder)
        assert not lora.has_lora(model) and not hasattr(model, MERGED_ATTR)  # the model was not touched


def test_lora_settings_boundaries():
    assert lora.LoraSettings(r=1, dropout=0.0).r == 1
    for kw, match in ((dict(r=0), "rank r must be an integer >= 1"), (dict(alpha=0), "alpha must be a number > 0"),
                      (dict(dropout=1.0), r"dropout must be in \[0, 1\)"), (dict(targets=()), "targets is empty")):
        with pytest.raises(ValueError, match=match):
            lora.LoraSettings(**kw)


def _toy_folder(path, state, **config):
    from peft import LoraConfig

    LoraConfig(r=2, lora_alpha=4, target_modules=["q"], **config).save_pretrained(str(path))
    save_file({"base_model.model." + k: v for k, v in state.items()}, str(path / ADAPTER_WEIGHTS))
    return path


def test_read_adapter_refuses_what_it_cannot_apply_as_plain_lora(tmp_path):
    from glimpseprune.lora import read_adapter

    a, b = torch.randn(2, 4), torch.randn(6, 2)
    read_adapter(_toy_folder(tmp_path / "ok", {"q.lora_A.weight": a, "q.lora_B.weight": b}))
    cases = [
        ("nan", {"q.lora_A.weight": a.clone().fill_(float("nan")), "q.lora_B.weight": b}, {}, "non-finite"),
        ("flat", {"q.lora_A.weight": a.flatten(), "q.lora_B.weight": b}, {}, "must be a 2-D floating-point matrix"),
        ("empty", {}, {}, "holds no LoRA weights"),
        ("dora", {"q.lora_A.weight": a, "q.lora_B.weight": b}, {"use_dora": True}, r"DoRA \(use_dora\)"),
    ]
    for name, state, config, match in cases:
        with pytest.raises(ValueError, match=match):
            read_adapter(_toy_folder(tmp_path / name, state, **config))


def test_an_adapter_of_another_input_width_is_refused():
    from peft import LoraConfig

    from glimpseprune.lora import check_adapter_fits

    state = {"q.lora_A.weight": torch.zeros(2, 5), "q.lora_B.weight": torch.zeros(6, 2)}  # the layer takes 4
    with pytest.raises(ValueError, match=r"q is 4 -> 6 here, the adapter has A \[2, 5\], B \[6, 2\]"):
        check_adapter_fits(_Toy(), LoraConfig(r=2), state, "x")


def test_add_lora_on_a_half_precision_model_in_eval_mode(tiny_dir):
    model = gp.load_base(tiny_dir, dtype=torch.bfloat16)[0].eval()
    lora.add_lora(model, lora.LoraSettings(r=2, dropout=0.5, targets=("q_proj",)))
    assert {p.dtype for p in lora.lora_parameters(model)} == {torch.float32}  # trained in fp32
    assert model.get_submodule("model.language_model.layers.0.self_attn.q_proj").base_layer.weight.dtype == \
        torch.bfloat16
    assert not any(m.training for m in model.modules())  # the new LoRA dropouts are off, as the model's


def test_merge_and_save_dtype_checks_and_cleanup(family, tmp_path, monkeypatch):
    if family.name != "qwen2_5_vl":
        pytest.skip("one family suffices")
    import shutil

    import glimpseprune.processing as processing

    plus, adapted = _plus(family, tmp_path)
    half_base = tmp_path / "half_base"  # the base checkpoint records float16: the merged folder keeps it
    shutil.copytree(family.model_dir, half_base)
    raw = json.loads((half_base / "config.json").read_text())
    (half_base / "config.json").write_text(json.dumps({**raw, "dtype": "float16"}))
    for base, kw in ((half_base, {}), (family.model_dir, {"dtype": torch.float16})):
        out = lora.merge_and_save(base, plus, tmp_path / f"merged_{base.name}", **kw)
        assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
        assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float16}
    ints = tmp_path / "int_base"
    ints.mkdir()
    (ints / "config.json").write_text('{"dtype": "int64"}')
    with pytest.raises(ValueError, match="'int64' is not a torch floating-point dtype"):
        lora.merge_and_save(ints, plus, tmp_path / "m_int")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(processing, "save_processor", broken)
    with pytest.raises(OSError, match="disk full"):
        lora.merge_and_save(family.model_dir, plus, tmp_path / "m_broken")
    assert not (tmp_path / "m_broken").exists()  # no half-written model folder
    monkeypatch.undo()
    lora.save_adapter(_perturb(adapted, seed=2), tmp_path / "other")
    (plus / ADAPTER_WEIGHTS).write_bytes((tmp_path / "other" / ADAPTER_WEIGHTS).read_bytes())
    monkeypatch.setattr(api, "load_base", lambda *a, **k: pytest.fail("the base was loaded before the check"))
    with pytest.raises(ValueError, match="not the adapter this module was trained with"):
        lora.merge_and_save(family.model_dir, plus, tmp_path / "m_other")


def test_disabled_adapter_restores_frozen_lora_weights_as_frozen(tmp_path):
    from glimpseprune.lora import disabled_adapter, load_adapter, lora_named_parameters

    toy = load_adapter(_Toy(), _lora_folder(tmp_path / "a"), merge=False, trainable=True)
    frozen = {n for n in lora_named_parameters(toy) if ".lora_A." in n}
    for n in frozen:
        lora_named_parameters(toy)[n].requires_grad_(False)
    with disabled_adapter(toy):
        pass
    assert {n for n, p in lora_named_parameters(toy).items() if not p.requires_grad} == frozen


class _Toy2(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 6), nn.Linear(4, 6)
        self.config = SimpleNamespace(_name_or_path=None)


def test_merge_lora_refuses_a_merge_that_overflows_the_base_dtype_and_changes_nothing(tmp_path):
    from peft import LoraConfig

    from glimpseprune.lora import has_lora, load_adapter, lora_named_parameters, merge_lora

    LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k"]).save_pretrained(str(tmp_path))
    save_file({f"base_model.model.{m}.lora_{ab}.weight": torch.full(shape, 0.1)
               for m in "qk" for ab, shape in (("A", (2, 4)), ("B", (6, 2)))}, str(tmp_path / ADAPTER_WEIGHTS))
    toy = load_adapter(_Toy2().half(), tmp_path, merge=False)
    with torch.no_grad():
        for name, p in lora_named_parameters(toy).items():
            if name.startswith("k."):  # only the second layer: delta scale 2 x rank 2 x 300 x 300 = 360000 > 65504
                p.fill_(300.0)
    q_before = toy.q.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match=r"the model's LoRA adapter gives non-finite weights in k when merged into "
                                         r"this torch.float16 model"):
        merge_lora(toy)
    assert has_lora(toy) and torch.equal(toy.q.get_base_layer().weight, q_before)  # q was not merged either
