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
