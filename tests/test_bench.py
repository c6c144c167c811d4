"""Efficiency runner, shapes, reports and the ``bench`` command, on a tiny random Qwen2.5-VL (seconds on a CPU)."""

from __future__ import annotations

import argparse
import json
import math

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
    assert E.parse_variant("glimpse:1@0") == E.Variant("glimpse:1@0", "glimpse", 1.0, 0)  # (0, 1]: all kept is valid
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
    # [4 text][vision_start][36 image][vision_end][4 text]: the N_TEXT - 2 text tokens split evenly around the image
    ids, row = TINY.token_ids(), inputs["input_ids"][0].tolist()
    assert row[4] == ids["vision_start"] and row[5:41] == [ids["image"]] * 36 and row[41] == ids["vision_end"]
    assert ids["image"] not in row[:4] + row[42:]


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
    # the tolerance itself passes, on either side: rel_diff exactly +-0.25
    assert E.RatioCheck("x", measured=1.25, analytic=1.0, tolerance=0.25).ok
    assert E.RatioCheck("x", measured=0.75, analytic=1.0, tolerance=0.25).ok


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


# ----------------------------------------------------------------------------------- bench.accuracy, by hand


class _FakePM:
    """A PrunedModel stand-in: fixed answers per question, n_vis 100 / n_kept 4 / kv_len 30 per sample, and a call
    that takes prefill 0.3 s and decode 0.6 s of (reported) wall time whatever its size; a question "bad" is refused
    (ValueError), as a processor refuses one."""

    def __init__(self, answers: dict):
        self.answers, self.calls = answers, []

    def generate(self, images, questions, max_new_tokens):
        from types import SimpleNamespace

        self.calls.append(list(questions))
        if "bad" in questions:
            raise ValueError("the processor refuses this question")
        n = len(questions)
        return SimpleNamespace(texts=[self.answers[q] for q in questions], n_vis=[100] * n, n_kept=[4] * n,
                               kv_len=[30] * n, timing={"prefill": 0.3, "decode": 0.6, "decode_steps": 3})


def _acc_split(tmp_path, questions, answers=None):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    rows = [{"id": f"r{i}", "image": "a.png", "question": q, "answer": (answers or {}).get(q, "cat"), "width": 32,
             "height": 32, "family": "f"} for i, q in enumerate(questions)]
    split = tmp_path / "split.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return split


def test_accuracy_summary_by_hand():
    from glimpseprune.bench.accuracy import summarize

    def row(fam, ok, n_vis, n_kept, kv, pre, dec):
        return {"family": fam, "correct": ok, "n_vis": n_vis, "n_kept": n_kept, "kept_frac": n_kept / n_vis,
                "kv_len": kv, "prefill_ms": pre, "decode_ms": dec}

    rows = [row("a", True, 100, 50, 70, 10.0, 1.0), row("a", False, 100, 25, 45, 20.0, 2.0),
            row("b", True, 50, 5, 17, 60.0, 3.0)]
    s = summarize(rows, {"method": "m"})
    assert s["method"] == "m" and s["n"] == 3
    assert s["exact_match"] == pytest.approx(2 / 3)
    # kept fractions 0.5, 0.25, 0.1: mean 0.85 / 3, median 0.25
    assert s["kept_frac"] == pytest.approx({"mean": 0.85 / 3, "median": 0.25, "min": 0.1, "max": 0.5})
    assert s["mean_n_vis"] == pytest.approx(250 / 3) and s["mean_n_kept"] == pytest.approx(80 / 3)
    assert s["mean_kv_len"] == pytest.approx(44.0)  # (70 + 45 + 17) / 3; the median would be 45
    assert s["ms_per_sample"] == pytest.approx({"prefill": 30.0, "decode": 2.0})
    a, b = s["per_family"]["a"], s["per_family"]["b"]
    assert a["n"] == 2 and a["exact_match"] == pytest.approx(0.5) and b["n"] == 1 and b["exact_match"] == 1.0
    assert a["kept_frac"] == pytest.approx({"mean": 0.375, "median": 0.375, "min": 0.25, "max": 0.5})
    # nothing evaluated (every record skipped): no accuracy figure, not a measured 0 %
    none = summarize([], {})
    assert none["n"] == 0 and math.isnan(none["exact_match"]) and math.isnan(none["kept_frac"]["mean"])


def test_accuracy_rows_by_hand(tmp_path):
    from glimpseprune.bench.accuracy import RecordError, evaluate, read_records

    split = _acc_split(tmp_path, ["q0", "q1", "q2"], {"q1": "dog"})
    pm = _FakePM({"q0": " Cat. ", "q1": "cat", "q2": "CAT"})
    seen = []
    rows = evaluate(pm, read_records(split), tmp_path, batch_size=2, on_row=seen.append)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"] and seen == rows
    assert [r["prediction"] for r in rows] == ["Cat.", "cat", "CAT"]
    assert [r["correct"] for r in rows] == [True, False, True]  # normalised: case, spaces, a final full stop
    assert all(r["kept_frac"] == pytest.approx(0.04) and r["n_vis"] == 100 and r["kv_len"] == 30 for r in rows)
    # a batch's wall time shared by its samples: 300 ms / 2 for the first two, 300 ms for the third alone
    assert [r["prefill_ms"] for r in rows] == pytest.approx([150.0, 150.0, 300.0])
    assert [r["decode_ms"] for r in rows] == pytest.approx([300.0, 300.0, 600.0])
    with pytest.raises(ValueError, match="on_error"):
        evaluate(pm, read_records(split), tmp_path, on_error="ignore")
    # a refused record in a batch: the batch is retried one record at a time; "stop" raises naming it, "skip"
    # hands it to on_skip and keeps the good ones
    split = _acc_split(tmp_path, ["q0", "bad", "q2"])
    with pytest.raises(RecordError, match="record r1"):
        evaluate(pm, read_records(split), tmp_path, batch_size=2)
    skipped = []
    rows = evaluate(pm, read_records(split), tmp_path, batch_size=2, on_error="skip", on_skip=skipped.append)
    assert [r["id"] for r in rows] == ["r0", "r2"] and [e.record_id for e in skipped] == ["r1"]


def test_accuracy_run_resumes_and_warms_up(tmp_path):
    from glimpseprune.bench.accuracy import run

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no records"):
        run(_FakePM({}), empty)
    split = _acc_split(tmp_path, ["q0", "q1", "q2"])
    pm = _FakePM({"q0": "cat", "q1": "dog", "q2": "cat"})
    done = [{"id": "r0", "family": "f", "correct": True, "n_vis": 100, "n_kept": 4, "kept_frac": 0.04, "kv_len": 30,
             "prefill_ms": 1.0, "decode_ms": 1.0}]
    rows, summary = run(pm, split, batch_size=2, done=done)
    # r0 is not run again: one untimed warm-up call of the first batch, then the timed one
    assert pm.calls == [["q1", "q2"], ["q1", "q2"]]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"] and summary["n"] == 3
    assert summary["exact_match"] == pytest.approx(2 / 3)  # r0 (done) and r2 right, r1 wrong


def test_accuracy_read_rows_drops_only_a_torn_last_line(tmp_path):
    from glimpseprune.bench.accuracy import read_rows

    p = tmp_path / "samples.jsonl"
    assert read_rows(p) == []
    p.write_text('{"id": "a"}\n\n{"id": "b"}\n{"id": "c", "pre')  # a crash while writing the last line
    assert [r["id"] for r in read_rows(p)] == ["a", "b"]
    p.write_text('{"id": "a"}\n{"id": "b", "pre\n{"id": "c"}\n')  # damaged inside: named, not dropped
    with pytest.raises(ValueError, match="samples.jsonl:2: not JSON"):
        read_rows(p)
    p.write_text('{"id": "a"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:2: not a result row .* an 'id'"):
        read_rows(p)


@pytest.mark.parametrize("status, want", [("", "abc123"), (" M src/x.py\n", "abc123+dirty")])
def test_run_metadata_names_the_commit_and_threads(tmp_path, monkeypatch, status, want):
    from types import SimpleNamespace

    from glimpseprune.bench import meta

    monkeypatch.setattr(meta, "__file__", str(tmp_path / "src" / "glimpseprune" / "bench" / "meta.py"))
    monkeypatch.setenv("GLIMPSEPRUNE_COMMIT", "from-env")
    assert meta._git_commit() == "from-env"  # no checkout: the environment names it
    (tmp_path / ".git").mkdir()
    monkeypatch.setattr(meta.subprocess, "run", lambda cmd, **kw: SimpleNamespace(
        stdout="abc123\n" if "rev-parse" in cmd else status))
    threads = torch.get_num_threads()
    torch.set_num_threads((torch.get_num_threads() or 1) + 2)
    try:
        env = meta.environment("cpu")
        assert env["git_commit"] == want and env["torch_threads"] == threads + 2 and env["device"] == "cpu"
    finally:
        torch.set_num_threads(threads)


def test_end_to_end_rates_from_medians_by_hand(model, monkeypatch):
    """tokens/s = B * new_tokens / median seconds per generate; decode ms/step = seconds / steps; decode tokens/s =
    1000 * B / median ms per step. The clock is replaced: e2e runs 0.2, 0.1, 0.9 s (median 0.2, mean 0.4), decode
    runs of 4 steps 0.08, 0.04, 0.4 s (20, 10, 100 ms per step: median 20)."""
    clock = iter([0.2, 0.1, 0.9, 0.08, 0.04, 0.4])
    monkeypatch.setattr(E, "_timed", lambda fn, device: (next(clock), fn()))
    monkeypatch.setattr(E, "measure_peak", lambda fn, device: {"method": "fake", "peak_bytes": 3 * 2**20,
                                                                "delta_bytes": 2**20})
    s = E.BenchSettings(grid=GRID, n_text=N_TEXT, warmup=0, reps=3, new_tokens=4)
    inputs = E.synth_inputs(TINY, GRID, N_TEXT, 2)
    runs = {"full": E.make_variant(E.parse_variant("full"), TINY, [36, 36], "cpu")}
    r = E._e2e_batch(model, get_adapter(model), runs, inputs, 2, s, torch.device("cpu"))["full"]
    assert r["seconds"] == {"median": 0.2, "min": 0.1, "max": 0.9, "all": [0.2, 0.1, 0.9]}
    assert r["tokens_per_s"] == pytest.approx(2 * 4 / 0.2)
    assert r["decode_ms_per_step"]["all"] == pytest.approx([20.0, 10.0, 100.0])
    assert r["decode_ms_per_step"]["median"] == pytest.approx(20.0)
    assert r["decode_tokens_per_s"] == pytest.approx(1000.0 * 2 / 20.0)
    assert r["memory"]["peak_bytes"] == 3 * 2**20


def test_reported_prefill_figures_are_medians_by_hand(model, monkeypatch):
    """The measured ratio, the table's prefill ms and % of full, and the summary line all come from the medians: full
    1, 2, 6 s (median 2), mask:0.25 0.5, 1.5, 0.4 s (median 0.5, min 0.4): measured 25 %. Analytic (causal=False,
    see test_ratios_against_full_hand_computed) 8061184 / 10169344 = 79.3 %; kept 9 of 36 = 25.0 %, KV 10 + 9."""
    from glimpseprune.bench.report import _summary

    times = {"full": [1.0, 2.0, 6.0], "mask:0.25": [0.5, 1.5, 0.4]}
    monkeypatch.setattr(E, "time_prefill", lambda *a, **k: (times, {n: {} for n in times}))
    s = E.BenchSettings(shape="tiny", grid=GRID, n_text=N_TEXT, variants=("mask:0.25",), causal=False, warmup=0,
                        reps=3, decode=False, e2e=False)
    result = E.run_benchmark(s, TINY, model)
    r = result["results"]["mask:0.25"]
    assert r["prefill_s"]["median"] == 0.5 and r["prefill_ratio_measured"] == 0.25
    assert result["settings"]["n_vis"] == 36 and result["settings"]["grid"] == [6, 6]  # the grid's, not --n-vis
    # end-to-end figures of two batch sizes, given as run_benchmark writes them (str keys), larger one first
    for name, peak in (("full", 7), ("mask:0.25", 3)):
        result["results"][name]["end_to_end"] = {
            "16": {"tokens_per_s": 160.0, "decode_tokens_per_s": 320.0,
                   "memory": {"method": "m", "peak_bytes": 99 * 2**20, "delta_bytes": 98 * 2**20}},
            "4": {"tokens_per_s": 40.0, "decode_tokens_per_s": 80.0,
                  "memory": {"method": "m", "peak_bytes": peak * 2**20, "delta_bytes": 2**20}}}
    lines = markdown_table(result).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(head, [c.strip() for c in next(x for x in lines if x.startswith("| mask:0.25"))
                            .strip("|").split("|")], strict=True))
    assert head[-6:] == ["tok/s B=4", "tok/s B=16", "decode tok/s B=4", "decode tok/s B=16", "peak MiB B=4",
                         "rise MiB B=4"]  # batch sizes in numeric order; memory of the smallest
    assert cells["kept %"] == "25.0" and cells["KV len"] == "19" and cells["% of full (analytic)"] == "79.3"
    assert cells["prefill ms"] == "500.00" and cells["% of full (measured)"] == "25.0"
    assert cells["tok/s B=4"] == "40.0" and cells["peak MiB B=4"] == "3" and cells["rise MiB B=4"] == "1"
    line = _summary(result)["results"]["mask:0.25"]
    assert line["prefill_ms"] == 500.0 and line["prefill_ratio_measured"] == 0.25
    assert line["peak_mib"] == {"16": 99.0, "4": 3.0} and line["tokens_per_s"] == {"16": 160.0, "4": 40.0}


def test_budget_keeps_one_repetition_and_records_skipped_batches():
    spent = E.Budget(-1.0)  # over from the start
    assert spent.more(0, "prefill") and spent.skipped == []  # at least one repetition is always measured
    assert not spent.more(1, "prefill") and spent.skipped == ["prefill"]
    assert E._order(["a", "b", "c"], 0) == ["a", "b", "c"] and E._order(["a", "b", "c"], 1) == ["c", "b", "a"]
    s = E.BenchSettings(grid=GRID, n_text=N_TEXT, batch_sizes=(4, 1))
    budget = E.Budget(-1.0)
    out = E.time_end_to_end(None, None, TINY, [E.parse_variant("full")], s, "cpu", budget)
    assert out == {"full": {4: {"error": "skipped: time budget"}, 1: {"error": "skipped: time budget"}}}
    assert budget.skipped == ["end-to-end batch 1", "end-to-end batch 4"]  # smallest first, each recorded


def test_measure_peak_cpu_figures_by_hand(monkeypatch):
    """CPU: delta = the replayed tensor peak (16 MiB); peak = RSS before (100 MiB) + it; rss_delta = VmHWM after
    (150 MiB) - RSS before."""
    ran = []
    monkeypatch.setattr(E, "_reset_peak_rss", lambda: True)
    monkeypatch.setattr(E, "_proc_status_kb", lambda name: {"VmRSS": 100, "VmHWM": 150}[name] * 2**20)
    monkeypatch.setattr(E, "tensor_peak_bytes", lambda fn: (fn(), (16 * 2**20, 0))[1])
    mem = E.measure_peak(lambda: ran.append(1), "cpu")
    assert ran == [1, 1]  # once for the RSS mark, once replayed
    assert (mem["peak_bytes"], mem["delta_bytes"], mem["rss_delta_bytes"]) == (116 * 2**20, 16 * 2**20, 50 * 2**20)


def test_frozen_encode_is_per_inputs_taps_and_tap_function():
    class Inner:
        calls = 0

        def encode(self, model, inputs, taps=(), tap_fn=None):
            Inner.calls += 1
            return (id(inputs), taps, tap_fn)

    frozen, inputs = E.FrozenEncodeAdapter(Inner()), {"x": 1}

    def f1(*a):
        return a

    def f2(*a):
        return a

    assert frozen.encode(None, inputs, (1,), f1) == (id(inputs), (1,), f1)
    assert frozen.encode(None, inputs, (1,), f2)[2] is f2  # another module's tap projection: encoded again
    assert frozen.encode(None, inputs, (1,), f1)[2] is f1 and Inner.calls == 2  # replayed


def test_ratio_check_verdict_needs_every_variant_within_tolerance(capsys):
    from glimpseprune.bench.report import _checks

    def row(measured, analytic):
        return {"prefill_ratio_measured": measured, "prefill_ratio_analytic": analytic,
                "analytic": {"n_kept": 1, "n_vis": 4}}

    result = {"results": {"full": row(1.0, 1.0), "a": row(0.5, 0.5), "b": row(0.9, 0.5)}}
    assert _checks(result, 0.15, True) is False  # b is 80 % off
    assert [(c["variant"], c["ok"]) for c in result["ratio_checks"]] == [("a", True), ("b", False)]
    assert result["ratio_checks"][1]["rel_diff"] == pytest.approx(0.8)
    out = capsys.readouterr().out
    assert "kept fraction 25.00 %" in out and "+80.0 %" in out and "FAIL" in out
    assert _checks({"results": {"full": row(1.0, 1.0), "a": row(0.5, 0.5)}}, 0.15, True) is True


def test_an_earlier_run_is_refused_without_overwrite(tmp_path, capsys):
    from glimpseprune.bench.report import check_writable
    from glimpseprune.cli import main

    out = tmp_path / "o"
    out.mkdir()
    (out / "sweep.json").write_text("earlier")
    check_writable(out)  # no result.json: a run may write here
    with pytest.raises(ValueError, match=r"already holds a run \(sweep.json\).*--overwrite"):
        check_writable(out, name="sweep.json")
    check_writable(out, overwrite=True, name="sweep.json")
    assert main(["bench", "sweep", "--shape", "qwen2_5_vl_3b", "--layers", "17", "--out", str(out)]) == 2
    assert "already holds a run (sweep.json)" in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == "earlier"
    (out / "result.json").write_text("earlier")
    with pytest.raises(ValueError, match=r"already holds a run \(result.json\)"):
        check_writable(out)


def test_cli_flops_odd_frames_and_paper_decode_column(capsys):
    """15 frames at temporal patch 2: ceil(15 / 2) = 8 frame-groups of 16x16 = 2048 visual tokens; the last column is
    upstream's decode FLOPs: --new-tokens steps from the prompt's KV length, without the LM head."""
    from glimpseprune.bench import flops as F

    argv = ["bench", "flops", "--shape", "qwen2_5_vl_7b", "--video-frames", "15", "--grid", "16x16", "--n-text",
            "33", "--keep", "0.1", "--new-tokens", "5", "--json"]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    rec = _json_line(out)
    assert rec["video"]["frame_groups"] == 8 and rec["rows"]["full"]["n_vis"] == 2048
    row = next(line for line in out.splitlines() if line.startswith("full |")).split(" | ")
    s7 = load_shape("qwen2_5_vl_7b")
    paper, with_head = F.decode_flops(s7, 2081, 5, lm_head=False), F.decode_flops(s7, 2081, 5)
    assert row[-1] == f"{paper / 1e9:.1f}" != f"{with_head / 1e9:.1f}"
    assert _cli(["bench", "flops", "--keep", "1"]) == 0  # all kept: the top of (0, 1]
    p = argparse.ArgumentParser()
    add_bench_parser(p.add_subparsers(dest="cmd", required=True))
    assert p.parse_args(["bench", "ratio-check", "--tolerance", "0"]).tolerance == 0.0  # exact agreement asked
