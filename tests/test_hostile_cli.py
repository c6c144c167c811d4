"""Hostile and careless use of the CLI and the Python API (hardening issue): no lost or mixed-up results, every bad
input a one-line named error before the run, no silent wrong answer."""

from __future__ import annotations

import json
import time

import pytest
import torch

import glimpseprune as gp
from glimpseprune.assets import resolve_model, resolve_module
from glimpseprune.cli import main
from glimpseprune.config import SelectionConfig
from glimpseprune.data.records import write_split
from glimpseprune.testing import random_image


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("hostile-world"), n=6, seed=7)


def _eval(split, out, *extra):
    return main(["eval", "--split", str(split), "--out", str(out), "--batch-size", "2", *extra])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ data loss and mix-ups


def test_eval_refuses_a_folder_with_an_earlier_run_and_overwrite_removes_stale_files(split, tmp_path, capsys):
    out = tmp_path / "ev"
    assert _eval(split, out, "--compare-full", "--limit", "2") == 0
    assert (out / "relative.json").is_file() and (out / "full" / "summary.json").is_file()
    capsys.readouterr()
    assert _eval(split, out, "--limit", "2") == 2  # another run into the same folder: refused, files untouched
    err = capsys.readouterr().err
    assert "already holds results of an earlier run" in err and "--overwrite" in err
    assert (out / "relative.json").is_file()
    stray = out / "notes.txt"  # not ours: never touched
    stray.write_text("mine")
    assert _eval(split, out, "--limit", "2", "--overwrite") == 0
    assert not (out / "relative.json").exists() and not (out / "full").exists()  # stale files of the other run gone
    assert stray.read_text() == "mine" and len(_rows(out / "samples.jsonl")) == 2


def test_eval_bad_record_stops_with_results_saved_then_resume_or_skip(split, tmp_path, capsys):
    lines = split.read_text().splitlines()
    bad = json.loads(lines[3])
    bad["image"] = "images/missing.png"
    broken = split.parent / "broken.jsonl"
    broken.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    out = tmp_path / "ev"
    assert _eval(broken, out) == 2
    err = capsys.readouterr().err
    assert f"record {bad['id']}" in err and "3 results so far are saved" in err and "--resume" in err
    assert [r["id"] for r in _rows(out / "samples.jsonl")] == [json.loads(x)["id"] for x in lines[:3]]
    # fix the record, resume: the three done are not run again, the summary covers all six
    broken.write_text("\n".join(lines) + "\n")
    assert _eval(broken, out, "--resume") == 0
    assert "resuming" in capsys.readouterr().err  # a note: stderr (stdout is for results)
    rows = _rows(out / "samples.jsonl")
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert json.loads((out / "summary.json").read_text())["n"] == 6
    # --on-error skip: the bad record is logged by id and left out, the rest evaluated
    broken.write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    out2 = tmp_path / "ev2"
    assert _eval(broken, out2, "--on-error", "skip") == 0
    assert "skipped 1 records" in capsys.readouterr().err
    assert [json.loads(x)["id"] for x in (out2 / "errors.jsonl").read_text().splitlines()] == [bad["id"]]
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["n"] == 5 and summary["skipped"] == [bad["id"]]


def test_eval_resume_checks_the_settings(split, tmp_path, capsys):
    out = tmp_path / "ev"
    assert _eval(split, out, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _eval(split, out, "--limit", "2") == 0
    assert _eval(split, out, "--limit", "3", "--resume") == 2
    assert "settings differ (limit: 2 -> 3)" in capsys.readouterr().err
    assert _eval(split, out, "--resume", "--overwrite") == 2
    assert "pass one of them" in capsys.readouterr().err


def test_unwritable_output_fails_before_the_run(split, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    assert _eval(split, blocker / "out") == 2
    assert "cannot write output" in capsys.readouterr().err and time.perf_counter() - t0 < 5
    assert main(["compare", "--split", str(split), "--out", str(blocker / "c"), "--methods", "random"]) == 2
    assert "cannot write output" in capsys.readouterr().err
    assert main(["make-world", "--out", str(blocker), "--n", "2"]) == 2
    assert "it is a file" in capsys.readouterr().err


def test_ask_overlay_never_overwrites_the_input(tmp_path, capsys):
    img = tmp_path / "in.png"
    random_image(64, 64, seed=1).save(img)
    before = img.read_bytes()
    assert main(["ask", str(img), "What colour is the square?", "--overlay", str(img)]) == 2
    assert "is the input image" in capsys.readouterr().err and img.read_bytes() == before
    assert main(["ask", str(img), "Q?", "--overlay", str(tmp_path / "." / "in.png")]) == 2
    assert main(["ask", str(img), "Q?", "--overlay", str(tmp_path / "out.nope")]) == 2
    assert "unknown image file extension" in capsys.readouterr().err


def test_ask_overlay_never_overwrites_a_file_it_did_not_draw(tmp_path, capsys):
    from PIL import Image

    from glimpseprune.bench.overlay import is_overlay, save_overlay
    from glimpseprune.cli.commands import _check_overlay

    img = tmp_path / "in.png"
    random_image(64, 64, seed=1).save(img)
    photo = tmp_path / "holiday.png"  # the user's own picture at the path given
    random_image(32, 32, seed=2).save(photo)
    before = photo.read_bytes()
    assert main(["ask", str(img), "Q?", "--overlay", str(photo)]) == 2  # refused before the model loads
    assert "not an overlay glimpseprune drew" in capsys.readouterr().err and photo.read_bytes() == before
    _check_overlay(str(photo), [str(img)], overwrite=True)  # the user lets it go
    assert main(["ask", str(img), "Q?", "--overwrite"]) == 2  # without --overlay it would do nothing: refused
    assert "--overwrite applies to --overlay" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is the input image"):  # the input never, --overwrite or not
        _check_overlay(str(img), [str(img)], overwrite=True)
    drawn = Image.new("RGB", (8, 8), (200, 10, 10))
    for name in ("o.png", "o.jpg", "o.gif"):  # one glimpseprune drew is replaced when asked again
        save_overlay(drawn, tmp_path / name)
        assert is_overlay(tmp_path / name), name
        _check_overlay(str(tmp_path / name), [str(img)])
        with Image.open(tmp_path / name) as back:
            assert back.size == (8, 8)
    assert not is_overlay(photo) and not is_overlay(tmp_path / "missing.png")
    (tmp_path / "t.png").write_text("not an image")
    assert not is_overlay(tmp_path / "t.png")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_make_world_and_compare_refuse_another_run(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["make-world", "--out", str(out), "--n", "3", "--seed", "2"]) == 0
    first = (out / "records.jsonl").read_text()
    assert main(["make-world", "--out", str(out), "--n", "3", "--seed", "2"]) == 0  # the same split: kept
    assert "left as it is" in capsys.readouterr().out
    assert main(["make-world", "--out", str(out), "--n", "4", "--seed", "2"]) == 2  # another split: refused
    assert "already holds results" in capsys.readouterr().err and (out / "records.jsonl").read_text() == first
    assert main(["make-world", "--out", str(out), "--n", "2", "--seed", "5", "--overwrite"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["5-000000.png", "5-000001.png"]  # none stale
    cmp_out = tmp_path / "cmp"
    (cmp_out / "runs").mkdir(parents=True)
    (cmp_out / "runs" / "old.json").write_text("{}")
    assert main(["compare", "--split", str(out / "records.jsonl"), "--out", str(cmp_out), "--methods", "random",
                 "--budgets", "0.5"]) == 2
    assert "already holds results" in capsys.readouterr().err


def test_module_and_model_writers_refuse_a_folder_with_files(tmp_path, capsys):
    """new-module, make-tiny and convert fill a folder from scratch: one that holds files (a trained module, a model)
    is refused before anything loads, and replaced only with --overwrite."""
    kit = tmp_path / "kit"
    assert main(["make-tiny", "--out", str(kit)]) == 0
    weights = (kit / "module" / "glimpse_module.safetensors").read_bytes()
    assert main(["new-module", "--model", str(kit / "model"), "--out", str(kit / "module"), "--small",
                 "--seed", "3"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (kit / "module" / "glimpse_module.safetensors").read_bytes() == weights
    assert main(["make-tiny", "--out", str(kit), "--seed", "7"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["new-module", "--model", str(kit / "model"), "--out", str(kit / "module"), "--small",
                 "--seed", "3", "--overwrite"]) == 0
    assert (kit / "module" / "glimpse_module.safetensors").read_bytes() != weights
    assert main(["new-module", "--model", str(kit / "model"), "--out", str(tmp_path / "m2"), "--small",
                 "--preset", "qwen2_5_vl_7b"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--method", "fastv", "--method-arg", "keep_ratio=0.1", "--method-arg", "keep_ratio=0.2"], "given twice"),
    (["--fixed-keep-ratio", "0.5", "--max-keep-ratio", "0.1"], "--max-keep-ratio 0.1 would be ignored"),
    (["--question", "   "], "no question"),
])
def test_conflicting_settings_and_a_blank_question_are_refused(argv, match, capsys):
    question = [] if "--question" in argv else ["--question", "Q?"]
    assert main(["ask", *question, *argv]) == 2
    assert match in capsys.readouterr().err


def test_compare_names_a_missing_image_before_claiming_the_folder(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["make-world", "--out", str(out), "--n", "3", "--seed", "2"]) == 0
    gone = sorted((out / "images").iterdir())[1]
    gone.unlink()
    argv = ["compare", "--split", str(out / "records.jsonl"), "--out", str(tmp_path / "cmp"), "--methods", "random",
            "--budgets", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "record 2 (id 2-000001)" in err and gone.name in err and not (tmp_path / "cmp").exists()


def test_train_merge_into_a_folder_with_files_fails_before_training(tmp_path, capsys):
    from pathlib import Path

    merge = tmp_path / "merged"
    merge.mkdir()
    (merge / "x").write_text("x")
    config = Path(__file__).resolve().parents[1] / "configs" / "stage2_world.yaml"
    t0 = time.perf_counter()
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run"), "--merge", str(merge)]) == 2
    err = capsys.readouterr().err
    assert "--merge" in err and "already holds files" in err
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "run").exists()


def test_output_on_a_file_system_that_refuses_writes_fails_before_the_run(tmp_path, capsys):
    """Permission bits say nothing on /proc (root may 'write' there): a probe file decides, before the model runs."""
    from glimpseprune.outputs import ensure_writable_dir

    with pytest.raises(ValueError, match="cannot (write output to|create output folder)"):
        ensure_writable_dir("/proc/glimpseprune-probe-dir")
    img = tmp_path / "in.png"
    random_image(64, 64, seed=1).save(img)
    t0 = time.perf_counter()
    assert main(["ask", str(img), "What colour is the square?", "--overlay", "/proc/kept.png"]) == 2
    assert "cannot write output to /proc" in capsys.readouterr().err and time.perf_counter() - t0 < 5


@pytest.mark.parametrize("argv, match", [
    (["bench", "flops", "--shape", "bogus"], "no shape 'bogus'"),
    (["bench", "flops", "--n-vis", "-5"], "--n-vis: must be at least 1"),
    (["bench", "run", "--reps", "0"], "--reps: must be at least 1"),
    (["bench", "run", "--batch-sizes", "0"], "--batch-sizes: must be at least 1"),
    (["bench", "flops", "--shape", "qwen3_vl_8b", "--video-frames", "4", "--fps", "0"], "--fps: must be a positive"),
    (["bench", "sweep", "--n-vis", "16", "--out", "/proc/glimpseprune-x"], "cannot write results to /proc"),
    (["demo", "--port", "99999"], "a port is at most 65535"),
])
def test_bench_bad_input_is_one_line_not_a_traceback(argv, match, capsys):
    """bench logs its progress by default; its bad input is still one `error:` line (exit 2), the traceback only
    with -v (and the demo's port is checked as an argument, not by the socket)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refusing a value
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err, err


def test_bench_sweep_and_ratio_check_refuse_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["bench", "sweep", "--n-vis", "16", "--out", str(out)]) == 0
    first = (out / "sweep.json").read_text()
    assert main(["bench", "sweep", "--n-vis", "25", "--out", str(out)]) == 2
    assert "already holds a run (sweep.json)" in capsys.readouterr().err and (out / "sweep.json").read_text() == first
    assert main(["bench", "sweep", "--n-vis", "25", "--out", str(out), "--overwrite"]) == 0
    (tmp_path / "rc").mkdir()
    (tmp_path / "rc" / "result.json").write_text("{}")
    assert main(["bench", "ratio-check", "--out", str(tmp_path / "rc")]) == 2
    assert "already holds a run" in capsys.readouterr().err


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("argv", [["--batch-size", "-1"], ["--limit", "0"], ["--batch-size", "two"]])
def test_cli_rejects_non_positive_counts(split, tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as e:
        _eval(split, tmp_path / "o", *argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("must be at least 1" in err or "expected a whole number" in err)


def test_empty_split_is_an_error_not_n_0(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _eval(empty, tmp_path / "o") == 2
    assert "holds no records" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_without_cuda_is_named(tmp_path, capsys):
    assert main(["ask", "--question", "Q?", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["ask", "--question", "Q?", "--device", "nonsense"]) == 2
    assert "is not a torch device" in capsys.readouterr().err


def test_non_utf8_arguments_give_one_line_errors(tmp_path, capsys):
    bad = b"caf\xe9?".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 argv byte
    assert main(["ask", "--question", bad]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "\\xe9" in err and len(err.strip().splitlines()) == 1
    assert main(["ask", str(tmp_path / bad), "Q?"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: transformers' loading bar)
    assert last.startswith("error: cannot read image file") and "\\udce9" in last


# ------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def pm():
    return gp.load(resolve_model("embedded"), module=resolve_module("embedded"))


def test_api_batch_shapes_and_types(pm, tmp_path):
    img = tmp_path / "a.png"
    random_image(56, 56, seed=2).save(img)
    with pytest.raises(TypeError, match=r"images\[0\] is a single path"):
        pm.generate(images=[str(img)], questions=["Q?"])
    with pytest.raises(TypeError, match="not a single string|list of strings"):
        pm.generate(images=[[str(img)]], questions="Q?")
    for q in (None, 3, b"Q?"):
        with pytest.raises(TypeError, match=r"questions\[0\] must be a string"):
            pm.generate(images=[[str(img)]], questions=[q])
    for q in ("", " \n"):
        with pytest.raises(ValueError, match=r"questions\[1\] is blank"):
            pm.generate(images=[[str(img)], [str(img)]], questions=["Q?", q])


@pytest.mark.parametrize("kwargs, err", [
    (dict(min_keep=2.7), TypeError), (dict(threshold="0.5"), TypeError), (dict(threshold=float("nan")), ValueError),
    (dict(max_keep_ratio="0.1"), TypeError), (dict(min_keep=True), TypeError), (dict(min_keep=-1), ValueError)])
def test_selection_types(kwargs, err):
    with pytest.raises(err):
        SelectionConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=0.0, do_sample=True), "temperature"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(seed="1"), "seed")])
def test_generate_knobs(pm, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pm.generate(images=[[random_image(56, 56)]], questions=["Q?"], **kwargs)


def test_float_keep_mask_is_refused_not_cast(tmp_path):
    pm = gp.load(resolve_model("embedded"), method="oracle")
    n = 16
    with pytest.raises(TypeError, match="must be a bool tensor"):
        pm.generate(images=[[random_image(56, 56)]], questions=["Q?"], keep_masks=[torch.full((n,), 0.2)])


def test_long_question_refused_fast(pm):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="the prompt is .* tokens .*the model's context"):
        pm.generate(images=[[random_image(56, 56)]], questions=["why " * 10_000])
    assert time.perf_counter() - t0 < 1.0


# ------------------------------------------------------------------ found by a bad-input hunt (2026-12-02)


def test_new_module_preset_of_another_model_and_an_unknown_one_are_refused(tmp_path, capsys, monkeypatch):
    """A preset for another base wrote a module with that base's K and taps (silently); an unknown preset was named
    only after the model had loaded."""
    kit = tmp_path / "kit"
    assert main(["make-tiny", "--out", str(kit)]) == 0
    capsys.readouterr()
    assert main(["new-module", "--model", str(kit / "model"), "--out", str(tmp_path / "m"), "--preset",
                 "llava_1_5_7b"]) == 2
    assert "--preset llava_1_5_7b is for another base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the preset was checked")

    monkeypatch.setattr("glimpseprune.api.load_base", no_load)
    assert main(["new-module", "--model", str(kit / "model"), "--out", str(tmp_path / "m2"), "--preset",
                 "bogus"]) == 2
    assert "unknown preset 'bogus'" in capsys.readouterr().err


def test_compare_k_sweep_refuses_settings_it_would_ignore(split, tmp_path, capsys):
    for extra in (["--methods", "random"], ["--budgets", "0.3"], ["--cap", "0.5"]):
        assert main(["compare", "--split", str(split), "--out", str(tmp_path / "k"), "--k-sweep", *extra]) == 2
        assert f"{extra[0]} would be ignored by --k-sweep" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_compare_k_sweep_without_a_module_is_refused_before_claiming_the_folder(split, tmp_path, capsys):
    # a model other than the embedded one brings no module: the sweep's GlimpsePrune masks would have none
    assert main(["compare", "--split", str(split), "--out", str(tmp_path / "k"), "--k-sweep",
                 "--model", str(tmp_path / "no-model")]) == 2
    assert "--k-sweep needs a glimpse module: pass --module DIR" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_train_merge_with_a_stage1_config_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from glimpseprune.training import trainer

    def refuse(*a, **kw):
        raise AssertionError("stage 1 started training although --merge cannot apply to it")

    monkeypatch.setattr(trainer, "train", refuse)
    config = Path(__file__).resolve().parents[1] / "configs" / "stage1_world.yaml"
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run"), "--merge",
                 str(tmp_path / "merged")]) == 2
    assert "--merge applies to stage-2 (GlimpsePrune+) configs" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_make_world_frames_without_video_is_refused(tmp_path, capsys):
    assert main(["make-world", "--out", str(tmp_path / "w"), "--n", "2", "--frames", "6"]) == 2
    assert "--frames sets the frames per clip of a --video split" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("line, match", [("null", "a record is a JSON object, got NoneType"),
                                         ("5", "a record is a JSON object, got int")])
def test_a_record_line_that_is_not_an_object_is_named(tmp_path, line, match, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    assert main(["eval", "--split", str(bad), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: {match}" in err, err


@pytest.mark.parametrize("damage, match", [
    (lambda out: (out / "glimpseprune_run.json").write_text("[]"), "not a run record"),
    (lambda out: (out / "glimpseprune_run.json").write_text('{"command": "eval", "settings": []}'),
     "not a run record"),
    (lambda out: (out / "samples.jsonl").open("a").write("[1, 2]\n"), "not a result row of this run"),
    (lambda out: (out / "glimpseprune_run.json").write_text('{"command": "ev'), "glimpseprune_run.json: not JSON"),
])
def test_a_damaged_run_folder_is_named_on_resume(split, tmp_path, damage, match, capsys):
    out = tmp_path / "ev"
    assert _eval(split, out, "--limit", "2") == 0
    damage(out)
    capsys.readouterr()
    assert _eval(split, out, "--limit", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert match in err and "internal error" not in err, err


def test_a_lone_surrogate_question_is_a_named_record_error(split, tmp_path, capsys):
    """A JSON \\ud800 escape is valid JSON but no text: the tokenizer raised a TypeError that `--on-error skip` did
    not skip (the whole run stopped); now the record is named and skipped."""
    rows = _rows(split)
    rows[1]["question"] = "What \ud800?"
    bad = split.parent / "surrogate.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ev"
    assert _eval(bad, out, "--on-error", "skip") == 0
    assert len(_rows(out / "samples.jsonl")) == len(rows) - 1
    errors = (out / "errors.jsonl").read_text()
    assert rows[1]["id"] in errors and "not valid Unicode text" in errors
    with pytest.raises(ValueError, match=r"questions\[0\] is not valid Unicode text"):
        gp.load("embedded").generate(images=[[random_image(56, 56)]], questions=["What \ud800?"])


def test_model_config_of_the_wrong_shape_is_named(tmp_path, capsys):
    kit = tmp_path / "kit"
    assert main(["make-tiny", "--out", str(kit)]) == 0
    cfg = json.loads((kit / "model" / "config.json").read_text())
    cfg["text_config"] = 5
    (kit / "model" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["ask", "--model", str(kit / "model"), "--question", "Q?"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the model config {kit / 'model' / 'config.json'}" in err and "internal error" not in err

