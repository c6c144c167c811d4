"""The runtime's efficient paths (issue 12): masks as transformers builds them (none where none is needed), the VIP on
fused attention (no S x S tensor) and in the base dtype, ViT taps by hooks, no O(L^2) tensor on the prefill or decode
path, the equivalence with stock transformers under the eager and flex attention implementations, the overhead bench
and a bounded, logging Table-7 script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import IMG_A, IMG_C, small_glimpse_config
from oracle import dropped_positions, masking, oracle_model, stock_generate
from torch.utils._python_dispatch import TorchDispatchMode

import glimpseprune as gp
from glimpseprune.bench import overhead as O
from glimpseprune.bench.efficiency import _stats
from glimpseprune.modules.vip import VIP
from glimpseprune.ops.rope2d import apply_rope, grid_positions, rope2d_angles
from glimpseprune.runtime.engine import prefill
from glimpseprune.runtime.masks import attention_mask

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- masks


def test_mask_none_without_padding_bool_with_padding(model):
    cfg = model.config.text_config
    assert cfg._attn_implementation == "sdpa"
    h = torch.zeros(2, 7, cfg.hidden_size)
    assert attention_mask(cfg, h, torch.ones(2, 7, dtype=torch.bool)) is None  # SDPA's causal kernel
    km = torch.ones(2, 7, dtype=torch.bool)
    km[0, :2] = False
    m = attention_mask(cfg, h, km)
    assert m.dtype == torch.bool and m.shape == (2, 1, 7, 7)
    assert not bool(m[0, 0, 3, 1]) and bool(m[0, 0, 3, 2]) and not bool(m[0, 0, 3, 4])  # padding, causal
    with pytest.raises(ValueError, match="covers 6 keys"):
        attention_mask(cfg, h, km[:, :6])


def test_decode_mask_sized_by_cache(model, processor):
    pre = prefill(model, gp.get_adapter(model), gp.make_method("full"), processor_batch(processor, [IMG_A]))
    cfg = model.config.text_config
    n = pre.cache.get_seq_length(0)
    h = torch.zeros(1, 1, cfg.hidden_size)
    assert attention_mask(cfg, h, torch.ones(1, n + 1, dtype=torch.bool), pre.cache) is None
    with pytest.raises(ValueError, match="cache holds"):
        attention_mask(cfg, h, torch.ones(1, n, dtype=torch.bool), pre.cache)


def processor_batch(processor, specs, seed=0):
    from conftest import make_batch

    return make_batch(processor, specs, seed=seed)


# --------------------------------------------------------------------------- VIP


def _reference_attention(attn_mod, x, cond, grids):
    """The VIP attention written the plain way: per image, explicit softmax(q k^T / sqrt(d)) v."""
    u = torch.cat([x, cond], dim=-1)
    S, H = x.shape[0], attn_mod.heads
    q = attn_mod.q_proj(u).view(S, H, -1).transpose(0, 1)
    k = attn_mod.k_proj(u).view(S, H, -1).transpose(0, 1)
    v = attn_mod.v_proj(x).view(S, H, -1).transpose(0, 1)
    outs, start = [], 0
    for h, w in grids:
        sl = slice(start, start + h * w)
        ang = rope2d_angles(grid_positions(h, w), q.shape[-1], attn_mod.theta)
        qq, kk = apply_rope(q[:, sl], ang), apply_rope(k[:, sl], ang)
        p = torch.softmax(qq @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        outs.append(p @ v[:, sl])
        start += h * w
    return attn_mod.o_proj(torch.cat(outs, dim=1).transpose(0, 1).reshape(S, -1))


def test_vip_fused_attention_equals_reference(model):
    torch.manual_seed(0)
    vip = VIP(small_glimpse_config(model)).eval()
    grids = [(5, 7), (3, 3)]
    S = sum(h * w for h, w in grids)
    attn = vip.layers[0].attn
    x, cond = torch.randn(S, attn.v_proj.in_features), torch.randn(S, attn.q_proj.in_features - attn.v_proj.in_features)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cond, grids), _reference_attention(attn, x, cond, grids), atol=1e-5,
                                   rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (numel), and which op made it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def test_vip_never_builds_a_score_matrix(model):
    """One 40x40 image (1,600 tokens): a per-head S x S score matrix would hold 2.56 M entries per head."""
    torch.manual_seed(0)
    vip = VIP(small_glimpse_config(model)).eval()
    S = 1600
    n_attn = vip.attn_in_proj.in_features
    feats = [torch.randn(S, vip.cond_in_projs[0].in_features) for _ in vip.layers]
    with torch.no_grad(), LargestTensor() as big:
        vip(torch.randn(S, n_attn), feats, [(40, 40)])
    assert big.numel < S * S // 4, f"{big.op} made a tensor of {big.numel} elements (S*S = {S * S})"


def test_vip_in_bfloat16_within_tolerance_of_fp32():
    """The embedded module on embedded-world inputs: bf16 VIP logits stay close to fp32 and almost every keep
    decision (p > 0.5) is the same, so the module may follow a bf16 base model's dtype."""
    from glimpseprune.assets import resolve_model, resolve_module
    from glimpseprune.data import world
    from glimpseprune.processing import build_inputs

    pm = gp.load(resolve_model("embedded"), module=resolve_module("embedded"))
    samples = [world.sample(seed) for seed in range(6)]
    inputs = build_inputs(pm.processor, [[world.render(s.scene)] for s in samples], [s.question for s in samples])
    with torch.no_grad():
        fp32 = torch.cat(prefill(pm.model, pm.adapter, pm.method, inputs).scratch["vip_logits"])
        pm.method.module.to(torch.bfloat16)
        try:
            lo = torch.cat(prefill(pm.model, pm.adapter, pm.method, inputs).scratch["vip_logits"])
        finally:
            pm.method.module.to(torch.float32)
    err = (lo - fp32).abs()
    assert float(err.max()) < 0.25 * float(fp32.std()), (float(err.max()), float(fp32.std()))
    assert float(((lo > 0) == (fp32 > 0)).float().mean()) >= 0.99


# --------------------------------------------------------------------------- ViT taps by hooks


def test_vit_taps_by_hooks_equal_hidden_states(model, processor):
    adapter = gp.get_adapter(model)
    inputs = processor_batch(processor, [[(336, 224)]])  # 12 x 8 tokens: six 4 x 4 windows, not one
    visual = model.model.visual
    taps = (0, len(visual.blocks) - 1)
    hooks_before = [len(b._forward_hooks) for b in visual.blocks]
    with torch.no_grad():
        enc = adapter.encode(model, inputs, taps=taps)
        hooks_after = [len(b._forward_hooks) for b in visual.blocks]
        out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True,
                     return_dict=True)
    from transformers.vision_utils import get_vision_window_index

    m = model.config.vision_config.spatial_merge_size
    win, _ = get_vision_window_index(inputs["image_grid_thw"], m, visual.window_size, visual.patch_size)
    unwin = torch.argsort(win)
    assert not torch.equal(unwin, torch.arange(unwin.numel()))  # the ViT's window order is not raster order here
    for t, got in zip(taps, enc.vision_feats):
        h = out.hidden_states[t + 1]
        ref = h.view(h.shape[0] // (m * m), m * m, -1).mean(dim=1)[unwin]
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert hooks_after == hooks_before  # ours removed: nothing left behind
    with pytest.raises(ValueError, match="vision tap 99"):
        adapter.encode(model, inputs, taps=(99,))


def test_encode_holds_no_cast_copy_of_the_pixels(tiny_dir, processor):
    """In bf16 the ViT gets the pixels as given (its patch embedding casts them for its one product): the same
    embeddings, bit for bit, as from pixels cast beforehand, without a bf16 copy of every pixel alive through all
    the blocks (stock transformers' ``get_image_features`` casts first and holds it)."""
    from glimpseprune.bench.efficiency import tensor_peak_bytes

    model, _ = gp.load_base(tiny_dir)
    model.to(torch.bfloat16)
    inputs = processor_batch(processor, [[(560, 560)]])
    px, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    assert px.dtype == torch.float32
    adapter, visual = gp.get_adapter(model), model.model.visual
    with torch.no_grad():
        enc = adapter.encode(model, inputs, ())
        pre_cast = visual(px.to(torch.bfloat16), grid_thw=grid, return_dict=True).pooler_output
        assert torch.equal(enc.embeds[enc.vis_mask], pre_cast)
        ours, _ = tensor_peak_bytes(lambda: adapter.encode(model, inputs, ()))
        theirs, _ = tensor_peak_bytes(lambda: visual(px.to(torch.bfloat16), grid_thw=grid, return_dict=True))
    copy = px.numel() * 2
    assert ours < theirs - copy // 4, (ours, theirs, copy)  # before: ours = theirs + the text embeddings


# --------------------------------------------------------------------------- no O(L^2) tensor anywhere


@pytest.mark.parametrize("method_name", ["full", "glimpse"])
def test_no_quadratic_tensor_in_prefill_or_decode(model, processor, module, method_name):
    """A 560x560 image (L ~ 300 tokens; the widest activation, L x 128 in the MLP, is below L*L/2): nothing the LLM
    prefill or decoding makes reaches L*L/2 entries
    (the old dense mask was B*L*L; a math-kernel VIP score matrix h*S*S)."""
    adapter = gp.get_adapter(model)
    inputs = processor_batch(processor, [[(560, 560)]])
    L = inputs["input_ids"].shape[1]
    from glimpseprune.bench.efficiency import FrozenEncodeAdapter

    frozen = FrozenEncodeAdapter(adapter)
    method = gp.make_method(method_name, module if method_name == "glimpse" else None)
    with torch.no_grad():
        frozen.prime(model, inputs, method)  # the ViT is outside this check
        with LargestTensor() as big:
            pre = prefill(model, frozen, method, inputs)
            from glimpseprune.runtime.engine import decode_step

            decode_step(model, frozen, pre, pre.logits.argmax(-1), 0)
    vocab = model.config.text_config.vocab_size
    assert big.numel < max(L * L // 2, vocab), f"{big.op} made {big.numel} elements (L = {L})"


@pytest.mark.parametrize("soft_keep", [False, True], ids=["boxes", "soft_keep"])
def test_no_quadratic_tensor_in_stage1_forward_train(model, processor, module, soft_keep):
    """Stage 1's training forward built a dense (B, 1, L, L) float mask for every prompt (1.6 GB at 20k tokens);
    without padding SDPA needs none, as at inference. The soft-keep (kl) mode's per-key biases ride in the fused
    kernel's extra q/k channels (they were a dense additive mask, which sent SDPA to its math kernel: (B, H, L, L)
    scores per layer after K). With autograd on, as in training."""
    from glimpseprune.bench.efficiency import FrozenEncodeAdapter
    from glimpseprune.runtime.train import forward_train

    adapter = gp.get_adapter(model)
    inputs = processor_batch(processor, [[(560, 560)]])
    L = inputs["input_ids"].shape[1]
    frozen = FrozenEncodeAdapter(adapter)
    method = gp.make_method("glimpse", module)
    suffix = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        frozen.prime(model, inputs, method)
    with LargestTensor() as big:
        out = forward_train(model, frozen, method, inputs, suffix, torch.ones_like(suffix, dtype=torch.bool),
                            soft_keep=soft_keep)
    assert out.vip_logits[0].requires_grad
    vocab = model.config.text_config.vocab_size
    assert big.numel < max(L * L // 2, vocab), f"{big.op} made {big.numel} elements (L = {L})"


def test_lm_head_gets_dense_rows_not_strided_views(family):
    """Every LM-head call of a prefill (last position and all positions), a decode step and a generate gets a tensor
    laid out as a fresh one. transformers' forward applies the head to ``hidden[:, -1:]``, a view whose batch stride is
    the whole sequence: on a CPU in bf16 F.linear runs such a view as a batched product over a copy of the head's
    weight (2.9 s instead of 49 ms per prefill at the 7B head, README "The 7B shape, measured on a CPU")."""
    from glimpseprune.runtime.engine import decode_step

    model = family.model
    seen: list[tuple] = []

    def record(_mod, args):
        x = args[0]
        seen.append((tuple(x.shape), x.stride(), torch.empty(x.shape).stride()))

    handle = model.lm_head.register_forward_pre_hook(record)
    try:
        inputs = family.batch([IMG_A, IMG_C])  # left-padded batch of two
        adapter = gp.get_adapter(model)
        with torch.no_grad():
            pre = prefill(model, adapter, gp.make_method("full"), inputs)
            prefill(model, adapter, gp.make_method("full"), inputs, all_logits=True)
            decode_step(model, adapter, pre, pre.logits.argmax(-1), 0)
            gp.apply(model, "full", processor=family.processor).generate(inputs, max_new_tokens=2)
    finally:
        handle.remove()
    assert len(seen) >= 5
    for shape, got, dense in seen:
        assert got == dense, f"LM head got a {shape} tensor with strides {got} (dense: {dense})"


# --------------------------------------------------------------------------- other attention implementations


def _family_with_attn(family, impl):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(family.model_dir, local_files_only=True).eval()
    m.set_attn_implementation({"text_config": impl, "vision_config": "sdpa"})
    return m


@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_equivalence_under_other_attention_implementations(family, impl):
    """Keep-everything equals the stock model loaded with the same implementation (left-padded batch, decoding),
    and pruning equals the stock (sdpa) model with the dropped keys masked, to 1e-5 in fp32."""
    if impl == "flex_attention" and family.name == "qwen2_5_vl":
        pytest.skip("transformers' Qwen2.5-VL text model does not support flex_attention")
    model = _family_with_attn(family, impl)
    assert model.config.text_config._attn_implementation == impl
    pad = family.processor.tokenizer.pad_token_id
    specs = [IMG_A, IMG_C] if impl == "eager" else [IMG_A]  # flex compiles per shape: keep it to one batch
    inputs = family.batch(specs)
    valid = inputs["attention_mask"].bool()
    n_new = 4 if impl == "eager" else 2
    with torch.no_grad():
        ref = _stock_logits(family, model, inputs)
        pre = prefill(model, gp.get_adapter(model), gp.make_method("full"), inputs, all_logits=True)
    torch.testing.assert_close(pre.logits[valid], ref[valid], atol=1e-5, rtol=0)
    stock_tokens, _ = stock_generate(model, inputs, n_new, pad_token_id=pad)
    out = gp.apply(model, "full", processor=family.processor).generate(inputs, max_new_tokens=n_new)
    assert torch.equal(out.sequences, stock_tokens)
    # pruning: ours under `impl` vs the stock model with the dropped keys masked
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    g = torch.Generator().manual_seed(1)
    keep = [(torch.rand(n, generator=g) < 0.3) | (torch.arange(n) == 0) for n in n_vis]
    pm = gp.apply(model, "mask", processor=family.processor)
    got = pm.generate(inputs, max_new_tokens=n_new, keep_masks=keep, return_logits=True)
    oracle = oracle_model(family.model_dir)
    with masking(dropped_positions(inputs, model.config.image_token_id, keep), got.prune_layer), torch.no_grad():
        ref_tokens, ref_logits = stock_generate(oracle, inputs, n_new, pad_token_id=pad)
    assert torch.equal(got.sequences, ref_tokens)
    for ours, theirs in zip(got.step_logits, ref_logits):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _stock_logits(family, model, inputs):
    kw = {}
    if family.name == "llava":
        mask = inputs["attention_mask"].bool()
        kw["position_ids"] = (mask.long().cumsum(1) - 1).masked_fill(~mask, 0)
    return model(**inputs, **kw).logits


# --------------------------------------------------------------------------- benches


def _tiny_shape_file(tmp_path) -> Path:
    """test_bench's tiny shape written as a shape JSON, for the bench CLI and scripts that take a path."""
    from test_bench import TINY

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY.to_dict()))
    return path


def _load_script(name: str):
    """benchmarks/NAME.py imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overhead_bench_runs_and_reports_ratios(tmp_path, caplog, capsys):
    import logging

    import glimpseprune.bench.shapes as S
    from glimpseprune.bench import overhead as O

    path = _tiny_shape_file(tmp_path)
    s = O.OverheadSettings(shape=str(path), n_vis=(36,), n_text=10, keep=0.25, warmup=1, reps=2, decode_steps=2)
    with caplog.at_level(logging.INFO, logger="glimpseprune.bench"):  # overhead and efficiency (the loops)
        res = O.run_overhead(s)
    # progress after every repetition of each timed loop (a real shape on a CPU takes minutes per repetition)
    lines = [rec.getMessage() for rec in caplog.records]
    for what, n in (("prefill warm-up", 1), ("prefill", 2), ("decode", 2)):
        got = [m.split(" done")[0] for m in lines if m.strip().startswith(f"{what}: repetition")]
        assert [g.split("repetition ")[1] for g in got] == [f"{i}/{n}" for i in range(1, n + 1)], (what, lines)
    r = res["rows"]["36"]
    assert set(r["prefill_s"]) == {"stock", "full", "mask", "glimpse"}
    q = r["ratios"]
    for k in ("full_vs_stock_prefill", "full_vs_stock_decode", "glimpse_vs_mask_prefill", "glimpse_vs_stock_prefill"):
        assert 0 < q[k] < 50
    assert set(q["checks"]) >= set(O.BARS) | {"glimpse_peak_le_full", "glimpse_vit_prefill_peak_le_full"}
    assert r["analytic"]["glimpse"]["n_kept"] == 9 and 0 < q["glimpse_analytic_prefill"] < 1
    # the VIP timed alone (a diagnostic): as many timings as repetitions, shares of the mask prefill beside its FLOPs
    assert len(r["vip_s"]["all"]) == 2 and 0 < q["vip_vs_mask_prefill"] < 50 and 0 < q["vip_analytic_vs_mask"] < 1
    assert res["ok"] == all(q["checks"].values())
    assert f"| 36 | {S.load_shape(str(path)).default_k} |" in O.table(res)
    assert S.load_shape(str(path)).name == "tiny"
    assert set(q["noise"]) == set(O.BARS) and set(q["noise"].values()) <= {"pass", "fail", "undecided"}
    assert all(lo <= q[k] <= hi for k, (lo, hi) in q["ci95"].items() if k in q and k != "glimpse_measured_vs_analytic")
    # --reanalyse: the saved run's derived fields recomputed from its raw timings, the timings untouched
    from glimpseprune.bench.report import write_json
    from glimpseprune.cli import main

    run = tmp_path / "run"
    saved = json.loads(json.dumps(res))
    for row in saved["rows"].values():
        del row["ratios"]
    write_json(saved, run)
    assert main(["bench", "overhead", "--reanalyse", str(run)]) == 0
    again = json.loads((run / "result.json").read_text())
    assert again["rows"]["36"]["ratios"] == json.loads(json.dumps(q))
    assert again["rows"]["36"]["prefill_s"] == json.loads(json.dumps(r["prefill_s"])) and "analysis" in again
    assert "| 36 |" in (run / "table.md").read_text()
    (run / "result.json").write_text(json.dumps({"schema": O.SCHEMA, "rows": {"36": {"prefill_s": {}}}}))
    capsys.readouterr()
    for argv, match in (([str(run)], r"row 36 .* lacks the raw timings"), (None, "not a `bench overhead` result"),
                        ([str(run), "--out", str(tmp_path / "elsewhere")], "drop --out"),
                        ([str(tmp_path / "nothing")], r"no .*result.json")):
        if argv is None:
            (run / "result.json").write_text('{"schema": "something else"}')
            argv = [str(run)]
        assert main(["bench", "overhead", "--reanalyse", *argv]) == 2  # bad input: one line, no traceback
        err = capsys.readouterr().err
        assert re.search(match, err) and err.startswith("error: ") and "Traceback" not in err, err
    early = O.run_overhead(O.OverheadSettings(shape=str(path), n_vis=(36,), n_text=10, keep=0.25, prune_layer=0,
                                              warmup=1, reps=2, decode_steps=2, memory=False))
    a = early["rows"]["36"]["analytic"]
    assert a["mask"]["prune_layer"] == a["glimpse"]["prune_layer"] == 0 and "| 36 | 0 |" in O.table(early)
    assert early["rows"]["36"]["ratios"]["glimpse_analytic_prefill"] < q["glimpse_analytic_prefill"]


def test_vip_split_replays_the_vip_and_reports_its_share(tmp_path, capsys):
    """benchmarks/vip_split.py on a tiny shape: the prefill with the VIP's output replayed equals the real one (checked
    inside; it raises otherwise), ratios with their intervals and the attention-kernel share are reported, a line is
    printed per repetition, the raw timings kept, written as they come, and an existing result is refused without
    --overwrite."""
    vs = _load_script("vip_split")
    shape = _tiny_shape_file(tmp_path)
    args = ["--shape", str(shape), "--n-vis", "36", "--n-text", "10", "--keep", "0.25", "--warmup", "1", "--reps",
            "3", "--out", str(tmp_path / "out")]
    res = vs.main(args)
    (row,) = res["rows"]
    assert row["n_vis"] == 36 and row["n_text"] == 10 and set(row["vs_mask"]) == {"glimpse", "replayed", "vip"}
    assert all(0 < v < 50 for v in row["vs_mask"].values()) and 0 < row["vip_attention_share"] < 1
    assert all(len(v) == 3 for v in row["raw_s"].values())
    for n, (lo, hi) in row["vs_mask_ci95"].items():
        assert lo <= row["vs_mask"][n] <= hi
    printed = capsys.readouterr().out.splitlines()
    assert [ln.split(" done")[0].strip() for ln in printed if ln.strip().startswith("repetition")] == [
        f"repetition {i}/3" for i in (1, 2, 3)]
    assert json.loads((tmp_path / "out/vip_split.json").read_text()) == json.loads(json.dumps(res))
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        vs.main(args)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot make that folder"):
        vs.main([*args[:-1], str(tmp_path / "file")])
    real_replay = vs.Replay  # a stand-in whose output differs (ranking reversed) is caught before any timing
    vs.Replay = lambda vip, out: real_replay(vip, -out)
    try:
        with pytest.raises(RuntimeError, match="replayed differs from the real one"):
            vs.main([*args, "--overwrite"])
    finally:
        vs.Replay = real_replay


def test_one_more_token_times_both_lengths(tmp_path, capsys):
    """benchmarks/one_more_token.py on a tiny shape: one row per visual-token count with both lengths timed and a
    paired ratio, the raw timings kept, written to its folder; a folder that holds a run, or a path that cannot be a
    folder, is refused before any timing."""
    omt = _load_script("one_more_token")
    shape = _tiny_shape_file(tmp_path)
    args = ["--shape", str(shape), "--n-vis", "36", "--n-text", "10", "--keep", "0.25", "--reps", "3", "--out",
            str(tmp_path / "out")]
    res = omt.main(args)
    (row,) = res["rows"]
    assert row["positions"] == 46 and set(row["median_ms"]) == {"10", "11"} and 0.2 < row["paired_ratio"] < 5
    assert sorted(res["raw_s"]) == ["36/10", "36/11"] and all(len(v) == 3 for v in res["raw_s"].values())
    printed = capsys.readouterr().out.splitlines()
    assert [ln.split(" done")[0] for ln in printed if ln.startswith("repetition")] == [
        f"repetition {i}/3" for i in (1, 2, 3)]
    assert json.loads(printed[-1])["rows"] == json.loads(json.dumps(res["rows"]))
    assert json.loads((tmp_path / "out/one_more_token.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    with pytest.raises(SystemExit, match="already holds a run"):
        omt.main(args)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot make that folder"):
        omt.main([*args[:-1], str(tmp_path / "file" / "sub")])


def test_vip_split_tiny_widths_keeps_the_structure(tmp_path):
    """``--tiny-widths`` (host time at a real model's depth): the 7B shape's layers, K, grouped attention, ViT blocks,
    taps and VIP heads are kept, every width is small; a run on it (in bf16, as the 7B shape runs on a CPU) reports
    stock and keep-everything beside the four."""
    from glimpseprune.bench.shapes import load_shape

    vs = _load_script("vip_split")
    real = load_shape("qwen2_5_vl_7b")
    tiny = vs.tiny_widths(real)
    t, r = tiny.text, real.text
    assert (t.num_layers, tiny.default_k, r.num_layers, real.default_k) == (28, 18, 28, 18)
    assert t.num_kv_heads < t.num_heads and r.num_kv_heads < r.num_heads  # grouped, as the 7B's
    assert t.hidden_size <= 32 and t.intermediate_size <= 64 and t.vocab_size <= 1024
    assert (tiny.vision.depth, tiny.vision.fullatt_blocks, tiny.vision.num_heads) == (32, (7, 15, 23, 31), 16)
    g_tiny, g_real = tiny.glimpse_config(), real.glimpse_config()
    assert g_tiny.vision_taps == g_real.vision_taps and g_tiny.n_vip_layers == g_real.n_vip_layers == 4
    assert g_tiny.vip_heads == g_real.vip_heads and g_tiny.vip_width + g_tiny.cond_width <= 32
    res = vs.main(["--shape", "qwen2_5_vl_3b", "--tiny-widths", "--n-vis", "16", "--keep", "0.25", "--warmup", "1",
                   "--reps", "2", "--dtype", "bfloat16", "--out", str(tmp_path / "out")])
    (row,) = res["rows"]
    assert set(row["median_ms"]) == {"mask", "glimpse", "replayed", "vip", "stock", "full"}
    assert row["dtype"] == "bfloat16"  # the replayed prefill was checked equal to the real one in bf16 too
    assert res["shape_spec"]["name"] == "qwen2_5_vl_3b_tiny_widths" and res["shape_spec"]["text"]["num_layers"] == 36


def test_a_batch_size_that_would_overrun_the_budget_is_not_started():
    """Once a batch size starts, its minimum of runs cannot be cut: ``time_end_to_end`` skips one whose projection
    (the last batch's seconds scaled by the batch ratio) would end past the budget."""
    from glimpseprune.bench.efficiency import Budget, batch_projection

    assert batch_projection(None, 8) == 0.0 and batch_projection((4, 30.0), 16) == 120.0
    budget = Budget(100.0)
    assert budget.fits(99.0) and not budget.fits(101.0) and Budget(None).fits(1e9)


def test_overhead_intervals_and_noise_verdicts_by_hand():
    """The bootstrap interval of a paired median: constant ratios give a zero-width interval at that ratio, the
    interval holds the paired median and repeats exactly (fixed seed); a verdict is decided only when the whole
    interval is on one side of the bar."""
    from glimpseprune.bench import overhead as O

    assert O._paired_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0)
    a, b = [1.0, 1.1, 0.9, 1.3, 1.05, 0.95, 1.2, 1.0], [1.0] * 8
    lo, hi = O._paired_ci(a, b)
    assert lo <= O._paired(a, b) <= hi and lo < hi and (lo, hi) == O._paired_ci(a, b)
    assert 0.9 <= lo and hi <= 1.3
    assert O._noise_verdict(0.98, 1.01, 1.02) == "pass" and O._noise_verdict(1.03, 1.05, 1.02) == "fail"
    assert O._noise_verdict(1.01, 1.04, 1.02) == "undecided"
    assert O._noise_verdict(-0.04, 0.03, 0.05, two_sided=True) == "pass"
    assert O._noise_verdict(0.06, 0.09, 0.05, two_sided=True) == "fail"
    assert O._noise_verdict(-0.09, -0.06, 0.05, two_sided=True) == "fail"
    assert O._noise_verdict(0.04, 0.07, 0.05, two_sided=True) == "undecided"


def test_gpu_scripts_log_progress_and_finish_bounded(tmp_path):
    """Issue 12's one command for a lent GPU (``issue12_device.sh``: ``bench overhead`` beside stock, then the Table-7
    script), dry-run on CPU with a tiny shape: both steps run from ``src`` through the script's own ``glimpseprune``
    shim and leave their results, the device and versions are logged, each step's exit code is recorded; Table 7 logs
    each stage and a 1-second budget cuts its repetitions (recorded) instead of running them all; a folder that holds
    a run is refused before anything runs."""
    shape = _tiny_shape_file(tmp_path)
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"), "DEVICE": "cpu",
           "DTYPE": "float32", "SHAPE": str(shape), "NVIS": "36", "NTEXT": "10", "KEEP": "0.25",
           "OVERHEAD_REPS": "2", "OVERHEAD_DECODE": "2", "OVERHEAD_TIMEOUT_S": "120", "GRID": "6x6",
           "BATCHES": "1 2", "REPS": "50", "E2E_REPS": "50", "WARMUP": "1", "NEW_TOKENS": "2", "BUDGET_S": "1",
           "TIMEOUT_S": "120", "COMMIT": "abc123"}
    out = tmp_path / "dev"
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/issue12_device.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=400)
    took = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert took < 240
    steps = (out / "steps.txt").read_text().splitlines()
    assert [s.split()[0] for s in steps] == ["overhead", "table7"] and all(" rc=0 " in s for s in steps)
    assert int(steps[1].rsplit("seconds=", 1)[1]) < 120  # the Table-7 script alone, as bounded before the wrapper
    assert "device cpu" in (out / "env.txt").read_text() and "transformers" in (out / "env.txt").read_text()
    assert json.loads((out / "overhead" / "result.json").read_text())["rows"]
    log = (out / "log.txt").read_text()
    assert "building a random tiny" in log and "prefill: repetition 1/50 done" in log
    assert "time budget of 1 s used up" in log
    res = json.loads((out / "table7" / "result.json").read_text())
    skipped = res["skipped_for_budget"]  # the stages the 1-second budget cut, wherever this machine's second ended
    assert skipped and all(w.startswith(("prefill", "decode", "end-to-end batch ")) for w in skipped), skipped
    if "prefill" in skipped:
        assert len(res["results"]["full"]["prefill_s"]["all"]) < 50
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(kept) <= 8, kept  # the device tool brings back at most 8 files: no plots, no scratch install or shim
    assert not any(p.endswith(".png") for p in kept) and "commit abc123" in (out / "env.txt").read_text()
    again = subprocess.run(["bash", str(ROOT / "benchmarks/issue12_device.sh"), str(out)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds files" in again.stderr


def test_overhead_7b_cpu_script_runs_with_a_tiny_shape(tmp_path):
    """``benchmarks/overhead_7b_cpu.sh`` (the 7B shape on a CPU, ~75 min) dry-run with its options overridden by a tiny
    shape: the command line it builds is one ``bench overhead`` accepts, and the result lands in the folder given."""
    shape = _tiny_shape_file(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/overhead_7b_cpu.sh"), str(out), "--shape", str(shape),
                           "--dtype", "float32", "--n-vis", "36", "--n-text", "10", "--keep", "0.25", "--reps", "2",
                           "--decode-steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["settings"]["shape"] == str(shape) and res["settings"]["memory"] is False
    assert res["settings"]["warmup"] == 1 and list(res["rows"]) == ["36"]


def test_tensor_peak_bytes_is_exact():
    from glimpseprune.bench.efficiency import tensor_peak_bytes

    def fn():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB live
        del a
        c = torch.ones(2000, 1000)  # 4 + 8 = 12 MB live
        return b.sum() + c.sum()

    peak, _ = tensor_peak_bytes(fn)
    assert 12_000_000 <= peak <= 12_000_000 + 64  # + the few bytes of the 0-d sums


def test_glimpse_prefill_peak_not_above_full():
    """Measured, not assumed: on the scaled CPU shape (Qwen proportions; random weights) with a 20 x 20 image, the
    live-tensor peak of a glimpse prefill (LLM part) is no larger than keep-everything's, and the hooked, pooled taps
    keep the encode within 10 % of an encode without taps (all blocks' outputs used to be kept)."""
    from glimpseprune.bench import efficiency as E
    from glimpseprune.bench.shapes import load_shape

    shape = load_shape("qwen2_5_vl_scaled_cpu")
    model = E.build_model(shape)
    inputs = E.synth_inputs(shape, (20, 20), 32, 1)
    adapter = gp.get_adapter(model)
    frozen = E.FrozenEncodeAdapter(adapter)
    runs = {n: E.make_variant(E.parse_variant(v), shape, [400], "cpu") for n, v in
            (("full", "full"), ("glimpse", "glimpse:0.04"))}
    with torch.no_grad():
        for m, _ in runs.values():
            frozen.prime(model, inputs, m)
        peaks = {n: E.tensor_peak_bytes(lambda m=m, r=r: prefill(model, frozen, m, inputs, r))[0]
                 for n, (m, r) in runs.items()}
        enc = {n: E.tensor_peak_bytes(lambda m=m: adapter.encode(model, inputs, tuple(m.vision_taps()),
                                                                  m.vision_tap_fn()))[0]
               for n, (m, _) in runs.items()}
    assert peaks["glimpse"] <= peaks["full"], peaks
    assert enc["glimpse"] <= 1.10 * enc["full"], enc


def test_bench_out_folder_with_a_run_is_refused_before_running(tmp_path):
    """``bench run`` / ``bench overhead`` into a folder that already holds a result.json stop before any work unless
    --overwrite; a folder whose parent is a file fails before the run too."""
    from glimpseprune.bench.report import check_writable

    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        check_writable(out)
    check_writable(out, overwrite=True)
    assert (out / "result.json").read_text() == "{}"  # checked, not touched
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write results"):
        check_writable(tmp_path / "file" / "sub")
    from glimpseprune.cli import main

    t0 = time.perf_counter()
    assert main(["bench", "overhead", "--shape", "qwen2_5_vl_scaled_cpu", "--out", str(out)]) == 2
    assert time.perf_counter() - t0 < 5  # refused before building a model


def test_overhead_rows_are_keyed_by_what_ran_and_handed_on_as_they_come(tmp_path):
    """--n-vis 10 runs a 3 x 3 grid: its row is "9" (it was labelled "10"); each row but the last is handed on as it
    ends (a killed run kept none); two sizes that round to one grid are refused."""
    from glimpseprune.bench import overhead as O

    path = _tiny_shape_file(tmp_path)
    seen = []
    s = O.OverheadSettings(shape=str(path), n_vis=(10, 16), n_text=10, keep=0.25, warmup=0, reps=1, decode_steps=1,
                           memory=False)
    res = O.run_overhead(s, on_row=lambda r: seen.append((sorted(r["rows"]), r["complete"])))
    assert sorted(res["rows"]) == ["16", "9"] and res["complete"]
    assert seen == [(["9"], False)]
    with pytest.raises(ValueError, match="same grid twice"):
        O.run_overhead(O.OverheadSettings(shape=str(path), n_vis=(9, 10), n_text=10))


# mutation audit, round 2: rules a one-line change could break unnoticed

def _row(peak_glimpse=90):
    """A ``measure_one``-shaped row with hand-picked timings: three repetitions whose paired ratios differ from the
    ratio of the medians (full/stock: pairs 1, 2, 0.5 -> 1.0; medians 2 / 4 -> 0.5)."""
    prefill = {"stock": [1.0, 5.0, 4.0], "full": [1.0, 10.0, 2.0], "mask": [2.0, 2.0, 2.0],
               "glimpse": [2.02, 2.02, 2.02]}
    decode = {"stock": [1.0, 1.0, 1.0], "full": [1.0, 1.0, 1.0], "mask": [1.0, 1.0, 1.0], "glimpse": [0.9, 0.9, 0.9]}
    # glimpse/stock prefill paired: median(2.02, 0.404, 0.505) = 0.505; the analytic ratio 0.63125 puts the measured
    # one 20 % BELOW it (beyond the two-sided 5 % bar)
    analytic = {"full": {"prefill_llm_flops": 1000.0, "vip_flops": 0.0},
                "mask": {"prefill_llm_flops": 400.0, "vip_flops": 0.0},
                "glimpse": {"prefill_llm_flops": 631.25, "vip_flops": 40.0}}
    return {"prefill_s": {n: _stats(v) for n, v in prefill.items()},
            "decode_ms": {n: _stats(v) for n, v in decode.items()}, "vip_s": _stats([0.5, 0.5, 0.5]),
            "analytic": analytic,
            "prefill_peak": {"stock": {"delta_bytes": 50}, "full": {"delta_bytes": 100},
                             "mask": {"delta_bytes": 60}, "glimpse": {"delta_bytes": peak_glimpse}}}


def test_overhead_ratios_by_hand():
    q = O.ratios(_row())
    assert q["full_vs_stock_prefill"] == pytest.approx(1.0)  # paired: the median of the per-repetition ratios
    assert q["glimpse_vs_mask_prefill"] == pytest.approx(1.01)  # glimpse over mask, not mask over glimpse
    assert q["full_vs_stock_decode"] == pytest.approx(1.0) and q["glimpse_vs_stock_decode"] == pytest.approx(0.9)
    assert q["glimpse_vs_stock_prefill"] == pytest.approx(0.505)
    assert q["glimpse_analytic_prefill"] == pytest.approx(0.63125)
    assert q["glimpse_measured_vs_analytic"] == pytest.approx(-0.2)
    checks = q["checks"]
    assert checks["full_vs_stock_prefill"] and checks["full_vs_stock_decode"] and checks["glimpse_vs_mask_prefill"]
    assert not checks["glimpse_measured_vs_analytic"]  # 20 % below the analytic ratio fails the two-sided bar
    assert q["noise"]["glimpse_measured_vs_analytic"] != "pass"
    # the interval of the measured-vs-analytic deviation is that of glimpse/stock, mapped through the analytic ratio
    lo, hi = q["ci95"]["glimpse_vs_stock_prefill"]
    assert lo < hi
    assert q["ci95"]["glimpse_measured_vs_analytic"] == pytest.approx([lo / 0.63125 - 1.0, hi / 0.63125 - 1.0])
    # peaks: glimpse at or below full passes, above fails
    assert q["glimpse_vs_full_peak"] == pytest.approx(0.9) and checks["glimpse_peak_le_full"]
    assert O.ratios(_row(peak_glimpse=100))["checks"]["glimpse_peak_le_full"]
    assert not O.ratios(_row(peak_glimpse=101))["checks"]["glimpse_peak_le_full"]
    assert q["vip_vs_mask_prefill"] == pytest.approx(0.25) and q["vip_analytic_vs_mask"] == pytest.approx(0.1)


def test_rotation_puts_every_variant_in_every_place_and_reverses_every_other_turn():
    names = ["a", "b", "c"]
    orders = [O.rotation(names, r) for r in range(6)]
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert orders[3:] == [["c", "b", "a"], ["a", "c", "b"], ["b", "a", "c"]]  # the second turn reversed
    # over two turns each variant directly follows each other one equally often
    follows = [(o[i], o[i + 1]) for o in orders for i in range(2)]
    assert {follows.count((x, y)) for x in names for y in names if x != y} == {2}
