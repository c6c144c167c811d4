"""Efficiency runner, shapes, reports and the ``bench`` command, on a tiny random Qwen2.5-VL (seconds on a CPU)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from glimpseprune.bench import efficiency as E
from glimpseprune.bench.report import PLOTS_MISSING, add_bench_parser, markdown_table, write_json, write_plots
from glimpseprune.bench.shapes import ModelShape, TextShape, VIPShape, VisionShape, list_shapes, load_shape
from glimpseprune.registry import get_adapter
from glimpseprune.runtime.engine import prefill

TINY = ModelShape("tiny", TextShape(64, 3, 4, 2, 96, 512), VisionShape(2, 32, 2, 48, 64, fullatt_blocks=(1,)),
                  VIPShape(16, 16, 2, 32), prune_layer=1)
GRID, N_TEXT = (6, 6), 10


@pytest.fixture(scope="module")
def model():
    return E.build_model(TINY)


@pytest.fixture(scope="module")
def result(model):
    s = E.BenchSettings(shape="tiny", grid=GRID, n_text=N_TEXT, variants=("glimpse:0.25", "mask:0.25", "fixed:0.25"),
                        batch_sizes=(1, 2), warmup=1, reps=1, new_tokens=2)
    return E.run_benchmark(s, TINY, model)


def test_parse_variant():
    assert E.parse_variant("full") == E.Variant("full", "full")
    assert E.parse_variant("glimpse:0.04") == E.Variant("glimpse:0.04", "glimpse", 0.04, None)
    assert E.parse_variant("mask:0.1@3") == E.Variant("mask:0.1@3", "mask", 0.1, 3)
    assert E.parse_variant("fixed:0.111") == E.Variant("fixed:0.111", "mask", 0.111, -1)  # before the LLM
    for bad in ("glimpse", "topk:0.1", "mask:0", "mask:1.5", "glimpse:0.1@-1"):
        with pytest.raises(ValueError):
            E.parse_variant(bad)


def test_shipped_shapes_and_hf_round_trip():
    assert {"qwen2_5_vl_7b", "qwen2_5_vl_3b", "qwen2_5_vl_scaled_cpu"} <= set(list_shapes())
    s7 = load_shape("qwen2_5_vl_7b")
    assert (s7.text.hidden_size, s7.text.num_layers, s7.text.num_kv_heads, s7.text.kv_width) == (3584, 28, 4, 512)
    assert s7.default_k == 18 and load_shape("qwen2_5_vl_3b").default_k == 23
    for name in ("qwen2_5_vl_7b", "qwen2_5_vl_3b", "qwen2_5_vl_scaled_cpu", TINY):
        shape = load_shape(name) if isinstance(name, str) else name
        back = ModelShape.from_hf(shape.to_hf_config(), name=shape.name, vip=shape.vip,
                                  prune_layer=shape.prune_layer, notes=shape.notes)
        assert back == shape
        assert ModelShape.from_dict(json.loads(json.dumps(shape.to_dict()))) == shape
    with pytest.raises(FileNotFoundError):
        load_shape("no_such_shape")
    with pytest.raises(ValueError):
        TextShape(64, 2, 4, 3, 96, 512)  # 4 heads over 3 KV heads


def test_synth_inputs_encode(model):
    inputs = E.synth_inputs(TINY, GRID, N_TEXT, 2)
    assert inputs["input_ids"].shape == (2, 36 + N_TEXT)
    enc = get_adapter(model).encode(model, inputs)
    assert enc.n_vis == [36, 36] and enc.grids == [GRID, GRID]


def test_frozen_encode_replays_same_prefill(model):
    inputs = E.synth_inputs(TINY, GRID, N_TEXT, 1)
    method, request = E.make_variant(E.parse_variant("mask:0.25"), TINY, [36], "cpu")
    frozen = E.FrozenEncodeAdapter(get_adapter(model))
    with torch.no_grad():
        ref = prefill(model, get_adapter(model), method, inputs, request)
        a = prefill(model, frozen, method, inputs, request)
        b = prefill(model, frozen, method, inputs, request)  # replayed encoding
    assert len(frozen._memo) == 1
    for x in (a, b):
        torch.testing.assert_close(x.logits, ref.logits)
        assert x.kv_len == ref.kv_len == [N_TEXT + 9]


def test_result_schema_and_counts(result):
    assert result["schema"] == E.SCHEMA
    meta = result["meta"]
    assert {"device", "torch", "transformers", "git_commit", "time_utc"} <= set(meta)
    assert list(result["results"]) == ["full", "glimpse:0.25", "mask:0.25", "fixed:0.25"]
    for r in result["results"].values():
        a, m = r["analytic"], r["measured"]
        assert m["n_kept"] == [a["n_kept"]] and m["kv_len"] == [a["kv_len"]]  # runtime agrees with the counts
        assert a["kv_len"] == N_TEXT + a["n_kept"]
        assert r["prefill_s"]["median"] > 0 and r["decode_ms_per_token"]["median"] > 0
        for b in ("1", "2"):
            e2e = r["end_to_end"][b]
            assert e2e["tokens_per_s"] > 0 and e2e["memory"]["peak_bytes"] > 0 and e2e["memory"]["method"]
            assert e2e["decode_tokens_per_s"] > 0
            assert len(e2e["decode_ms_per_step"]["all"]) == result["settings"]["reps"]
    assert result["results"]["glimpse:0.25"]["analytic"]["n_kept"] == 9  # floor(0.25 * 36)
    assert result["results"]["fixed:0.25"]["analytic"]["prune_layer"] == -1
    assert result["results"]["full"]["prefill_ratio_analytic"] == 1.0
    json.dumps(result)  # serialisable as is


def test_report_files(result, tmp_path):
    table = markdown_table(result)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 5  # header + 4 variants
    assert "glimpse:0.25" in table and "tok/s B=2" in table
    path = write_json(result, tmp_path)
    assert json.loads(path.read_text())["schema"] == E.SCHEMA
    plots = write_plots(result, tmp_path)
    if isinstance(plots, str):
        assert plots == PLOTS_MISSING
    else:
        assert all(p.is_file() and p.stat().st_size > 0 for p in plots)


def test_ratio_checks(result):
    checks = E.ratio_checks(result, tolerance=0.15)
    assert [c.variant for c in checks] == ["glimpse:0.25", "mask:0.25", "fixed:0.25"]
    c = E.RatioCheck("x", measured=0.8, analytic=0.75)
    assert c.rel_diff == pytest.approx(0.8 / 0.75 - 1) and c.ok
    assert not E.RatioCheck("x", measured=0.9, analytic=0.75).ok


def test_measure_peak_cpu():
    mem = E.measure_peak(lambda: torch.ones(4_000_000).sum(), "cpu")  # 16 MB
    assert mem["method"].startswith("cpu: peak live tensor bytes") and mem["peak_bytes"] >= mem["delta_bytes"]
    assert 16_000_000 <= mem["delta_bytes"] <= 16_000_000 + 64  # exact: the tensor, plus the 0-d sum


def _cli(argv):
    p = argparse.ArgumentParser()
    add_bench_parser(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


def test_cli_flops_table7(capsys):
    assert _cli(["bench", "flops", "--shape", "qwen2_5_vl_7b", "--grid", "71x71", "--n-text", "33",
                 "--keep", "0.034"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("glimpse:0.034"))
    assert row.split(" | ")[3] == "204" and 68.5 < float(row.split(" | ")[6]) < 70.5  # KV 204, ~69 % of full


def test_cli_sweep(capsys, tmp_path):
    assert _cli(["bench", "sweep", "--shape", "qwen2_5_vl_3b", "--keep", "0.082", "--layers", "17", "23",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\n17 | " in out and "\n23 | " in out
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"][0]["prune_layer"] == 17


def test_cli_ratio_check_prints_both(capsys, tmp_path):
    shape_file = tmp_path / "tiny.json"
    shape_file.write_text(json.dumps(TINY.to_dict()))
    assert _cli(["bench", "ratio-check", "--shape", str(shape_file), "--grid", "6x6", "--n-text", "10",
                 "--keep", "0.25", "--warmup", "0", "--reps", "1", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "analytic prefill ratio" in out and "measured prefill ratio" in out and "relative difference" in out
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["ratio_checks"][0]["variant"] == "glimpse:0.25"


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_flops_video_7b_and_8b(capsys):
    """`bench flops --video-frames 16 --frame-size 448x448`: 8 frame-groups of 16 x 16 (Qwen2.5-VL-7B, 28 px tokens)
    or 14 x 14 (Qwen3-VL-8B, 32 px tokens, plus 8 timestamps of 6 tokens and 8 inner start / end pairs of text)."""
    from glimpseprune.bench import flops as F

    video = ["--video-frames", "16", "--frame-size", "448x448", "--n-text", "33", "--keep", "0.1", "--json"]
    assert _cli(["bench", "flops", "--shape", "qwen2_5_vl_7b", *video]) == 0
    out = capsys.readouterr().out
    assert "video of 16 frames of 448x448 px at 2 fps = 8 frame-groups x 16x16 = 2048 visual" in out
    rec = _json_line(out)
    assert rec["n_text"] == 33 and rec["video"]["frame_groups"] == 8 and rec["video"]["timestamp_text_tokens"] == 0
    full, gp = rec["rows"]["full"], rec["rows"]["glimpse:0.1"]
    assert full["n_vis"] == 2048 and full["kv_len"] == 2081 and gp["n_kept"] == 204 and gp["kv_len"] == 237
    s7 = load_shape("qwen2_5_vl_7b")
    vip = F.vip_flops(s7.glimpse_config(), [(16, 16)] * 8, 2048 + 33 + 1, s7.text, [0] * 8)["total"]
    assert gp["vip_flops"] == vip > F.vip_flops(s7.glimpse_config(), [(16, 16)] * 8, 2082, s7.text)["total"]
    assert full["vit_flops"] == F.vit_flops(s7.vision, [(8, 32, 32)])["total"]
    assert _cli(["bench", "flops", "--shape", "qwen2_5_vl_7b", "--video-frames", "16", "--grid", "16x16",
                 "--n-text", "33", "--keep", "0.1", "--json"]) == 0  # the per-frame grid given in tokens instead
    assert _json_line(capsys.readouterr().out)["rows"] == rec["rows"]

    assert _cli(["bench", "flops", "--shape", "qwen3_vl_8b", *video]) == 0
    out = capsys.readouterr().out
    assert "8 frame-groups x 14x14 = 1568 visual (VIP over all frames jointly) + 97 text (33 + 64 timestamp" in out
    rec = _json_line(out)
    full, gp = rec["rows"]["full"], rec["rows"]["glimpse:0.1"]
    assert rec["n_text"] == 97 and full["n_vis"] == 1568 and full["kv_len"] == 1665
    assert gp["prune_layer"] == 23 and gp["n_kept"] == 156 and gp["kv_len"] == 156 + 97
    assert 0.5 < gp["prefill_llm_flops"] / full["prefill_llm_flops"] < 1


def test_cli_flops_video_bad_arguments(capsys):
    with pytest.raises(ValueError, match="--frame-size needs --video-frames"):
        _cli(["bench", "flops", "--shape", "qwen3_vl_8b", "--frame-size", "448x448"])
    for bad in (["--video-frames", "0"], ["--video-frames", "4", "--frame-size", "448"]):
        with pytest.raises(SystemExit):
            _cli(["bench", "flops", "--shape", "qwen3_vl_8b", *bad])
    err = capsys.readouterr().err
    assert "--video-frames: must be at least 1, got 0" in err and "--frame-size: give width x height in pixels" in err


def test_results_are_handed_on_as_each_stage_ends(model):
    """A killed timing run kept nothing (bench run wrote result.json only at its very end; table7_gpu.sh runs under a
    timeout): the result so far is handed on after the prefill, the decode and each end-to-end batch size."""
    seen = []
    s = E.BenchSettings(shape="tiny", grid=GRID, n_text=N_TEXT, variants=("mask:0.25",), batch_sizes=(1, 2),
                        warmup=0, reps=1, new_tokens=2)
    final = E.run_benchmark(s, TINY, model, on_stage=lambda r: seen.append(json.loads(json.dumps(r, default=str))))
    assert [r["complete"] for r in seen] == [False] * 4 and final["complete"]
    assert [sorted(r["results"]["mask:0.25"]) for r in seen][:2] == [
        ["analytic", "measured", "prefill_ratio_analytic", "prefill_ratio_measured", "prefill_s", "variant"],
        ["analytic", "decode_ms_per_token", "measured", "prefill_ratio_analytic", "prefill_ratio_measured",
         "prefill_s", "variant"]]
    assert [sorted(r["results"]["full"].get("end_to_end", {})) for r in seen[2:]] == [["1"], ["1", "2"]]
    assert final["settings"]["n_vis"] == GRID[0] * GRID[1]  # the measured count, not the --n-vis default


def test_bench_arguments_are_checked(capsys):
    from glimpseprune.cli import main

    for argv, match in ((["bench", "sweep", "--keep", "-0.3"], "must be a positive number"),
                        (["bench", "sweep", "--keep", "1.5"], "a kept fraction is at most 1"),
                        (["bench", "flops", "--grid", "0x5"], "both at least 1"),
                        (["bench", "flops", "--grid", "7"], "both at least 1")):
        with pytest.raises(SystemExit):
            main(argv)
        assert match in capsys.readouterr().err, argv


def test_a_malformed_shape_file_is_named(tmp_path, capsys):
    from glimpseprune.cli import main

    for text, match in (("{oops", "not JSON"), ('{"name": "x", "text": {}}', "TextShape"), ("[1]", "JSON object"),
                        ('{"name": "x"}', "lacks 'text'")):
        (tmp_path / "s.json").write_text(text)
        assert main(["bench", "flops", "--shape", str(tmp_path / "s.json")]) == 2
        err = capsys.readouterr().err
        assert "s.json" in err and match in err, err


def test_overwrite_clears_the_earlier_runs_plots_when_the_new_run_writes(tmp_path):
    from glimpseprune.bench.report import _Results, check_writable

    out = tmp_path / "o"
    out.mkdir()
    for f in ("result.json", "table.md", "throughput.png", "notes.txt"):
        (out / f).write_text("earlier")
    check_writable(out, overwrite=True)
    assert (out / "throughput.png").exists()  # nothing removed before the new run has a result
    results = _Results(out)
    results.partial({"complete": False})
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "result.json"]  # only what bench writes
    (out / "throughput.png").write_text("this run's")
    results.partial({"complete": True})
    assert (out / "throughput.png").read_text() == "this run's"  # cleared once, at the first write


def test_ratios_against_full_hand_computed(model):
    """run_benchmark's ratios with causal=False: analytic = variant FLOPs / full FLOPs, both counted non-causal;
    measured = the variant's median prefill seconds / full's. TINY: hidden 64, 3 layers, q width 64, kv width 32,
    intermediate 96, vocab 512; 36 visual + 10 text = 46 tokens; mask:0.25 keeps 9 after layer 1 (TINY's K)."""
    s = E.BenchSettings(shape="tiny", grid=GRID, n_text=N_TEXT, variants=("mask:0.25",), causal=False, warmup=0,
                        reps=1, decode=False, e2e=False)
    res = E.run_benchmark(s, TINY, model)["results"]
    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96)  # 61440: q, k, v, o and the SwiGLU
    layer46 = 46 * per_token + 2 * 2 * 64 * 46 * 46  # 3367936: every one of the 46^2 pairs (causal=False)
    layer19 = 19 * per_token + 2 * 2 * 64 * 19 * 19  # 1259776: 10 text + 9 kept tokens
    head = 2 * 64 * 512  # last prompt token
    full, mask = 3 * layer46 + head, 2 * layer46 + layer19 + head
    assert (full, mask) == (10169344, 8061184)
    assert res["full"]["analytic"]["prefill_llm_flops"] == full
    assert res["mask:0.25"]["analytic"]["prefill_llm_flops"] == mask
    assert res["mask:0.25"]["prefill_ratio_analytic"] == mask / full  # ~0.79, not inverted, not against a causal full
    assert res["full"]["prefill_ratio_analytic"] == 1.0
    full_s, mask_s = res["full"]["prefill_s"]["median"], res["mask:0.25"]["prefill_s"]["median"]
    assert res["mask:0.25"]["prefill_ratio_measured"] == mask_s / full_s


def test_ratio_check_is_two_sided_and_reports_kept_fraction(result):
    assert not E.RatioCheck("x", measured=0.5, analytic=0.75).ok  # 33 % below the analytic ratio fails too
    assert E.RatioCheck("x", measured=0.7, analytic=0.75).ok  # -6.7 %
    checks = {c.variant: c for c in E.ratio_checks(result)}
    assert checks["glimpse:0.25"].extra == {"kept_frac": 9 / 36}  # kept / visual tokens, not kept / KV length
    assert E.near_square_grid(1050) == (32, 33)  # 1056 tokens: nearer 1050 than 32 x 32 = 1024
