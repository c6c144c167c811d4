"""The command line's rough edges (issue "User experience"): stdout holds results only, --json everywhere it makes
sense, -v / -q after the subcommand, --version, defaults in --help, any registered method in ask / eval with its
settings, a readable `methods` table, make-tiny for LLaVA, convert --vision-depth, the split checked before the model
loads, flag names in errors, and the run's environment in eval's summary.json."""

from __future__ import annotations

import argparse
import json

import pytest

import glimpseprune as gp
from glimpseprune.cli import _in_flags, build_parser, main
from glimpseprune.data.records import write_split
from glimpseprune.registry import describe_method, list_methods
from glimpseprune.testing import random_image


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("ux-world"), n=4, seed=7)


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "img.png"
    random_image(224, 224, seed=5).save(path)
    return path


@pytest.fixture(scope="module")
def mod_dir(module, tmp_path_factory):
    return gp.save_module(module, tmp_path_factory.mktemp("ux-mod") / "mod")


def _one_json(out: str):
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"stdout holds more than the JSON: {out!r}"
    return json.loads(lines[0])


# ------------------------------------------------------------------ 1. stdout is for results, --json


def test_ask_overlay_json_prints_only_json_on_stdout(tiny_dir, mod_dir, img, tmp_path, capsys):
    overlay = tmp_path / "kept.png"
    assert main(["ask", "--model", str(tiny_dir), "--module", str(mod_dir), "--image", str(img), "--question", "Q?",
                 "--overlay", str(overlay), "--json", "--max-new-tokens", "2"]) == 0
    cap = capsys.readouterr()
    out = _one_json(cap.out)
    assert out["n_vis"] == 64 and out["method"] == "glimpse" and overlay.is_file()
    assert f"wrote {overlay}" in cap.err
    assert main(["ask", "--model", str(tiny_dir), "--module", str(mod_dir), "--image", str(img), "--question", "Q?",
                 "--overlay", str(tmp_path / "k2.png"), "--max-new-tokens", "2", "-q"]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines()[-1].startswith("kept ") and "wrote" not in cap.out + cap.err  # -q: no notes
    # asking again to the same path replaces the overlay drawn before (it carries glimpseprune's mark)
    overlay.write_bytes(b"")  # (not an image any more: a foreign file, refused)
    assert main(["ask", "--model", str(tiny_dir), "--module", str(mod_dir), "--image", str(img), "--question", "Q?",
                 "--overlay", str(overlay), "--max-new-tokens", "2"]) == 2
    assert "not an overlay glimpseprune drew" in capsys.readouterr().err and overlay.read_bytes() == b""
    assert main(["ask", "--model", str(tiny_dir), "--module", str(mod_dir), "--image", str(img), "--question", "Q?",
                 "--overlay", str(tmp_path / "k2.png"), "--max-new-tokens", "2"]) == 0


def test_eval_json_and_environment_in_summary(tiny_dir, split, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--split", str(split), "--out", str(out), "--model", str(tiny_dir), "--batch-size", "2",
                 "--max-new-tokens", "2", "--method", "fastv", "--method-arg", "keep_ratio=0.25",
                 "--compare-full", "--json"]) == 0
    cap = capsys.readouterr()
    result = _one_json(cap.out)
    written = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in result.items() if k not in ("full", "relative")} == json.loads(json.dumps(written))
    assert result["method"] == "fastv" and result["relative"]["method"] == "fastv"
    assert result["full"]["method"] == "full" and result["full"]["method_config"] == {}
    assert written["method_config"] == {"keep_ratio": 0.25, "prune_layer": 1} and written["module"] is None
    assert "exact match" in cap.err and "keeps" in cap.err  # the human lines: on stderr under --json
    for summary in (written, json.loads((out / "full" / "summary.json").read_text())):
        assert summary["dtype"] == "float32" and summary["batch_size"] == 2
        env = summary["environment"]
        assert env["device"] == "cpu" and {"torch", "transformers", "glimpseprune", "git_commit"} <= set(env)
    # the task path records the same; without --json its results are on stdout, its notes on stderr
    out2 = tmp_path / "task"
    assert main(["eval", "--task", "world", "--data", str(split.parent), "--out", str(out2), "--model",
                 str(tiny_dir), "--batch-size", "2", "--max-new-tokens", "2"]) == 0
    cap = capsys.readouterr()
    assert "exact_match" in cap.out and f"wrote {out2 / 'summary.json'}" in cap.err
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["batch_size"] == 2 and summary["dtype"] == "float32" and "torch" in summary["environment"]


def test_eval_resume_note_goes_to_stderr(tiny_dir, split, tmp_path, capsys):
    args = ["eval", "--split", str(split), "--out", str(tmp_path / "ev"), "--model", str(tiny_dir),
            "--batch-size", "2", "--limit", "2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    cap = capsys.readouterr()
    assert "resuming" in cap.err and "resuming" not in cap.out


def test_compare_json(tiny_dir, split, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--split", str(split), "--out", str(out), "--model", str(tiny_dir), "--methods",
                 "random", "--budgets", "0.5", "--limit", "2", "--batch-size", "2", "--json"]) == 0
    cap = capsys.readouterr()
    result = _one_json(cap.out)
    assert result["out"] == str(out) and [r["label"] for r in result["runs"]] == ["full", "random@0.5"]
    run = result["runs"][1]
    assert run["kept_frac"] == pytest.approx(0.5, abs=0.02) and "exact_match" in run and "kv_entries_at_decode" in run
    assert "| method" in cap.err or "random@0.5" in cap.err  # the table: stderr under --json


# ------------------------------------------------------------------ 2. -v / -q anywhere, --version, --help


def test_verbose_and_quiet_before_or_after_the_subcommand(capsys):
    p = build_parser()
    assert (p.parse_args(["methods"]).verbose, p.parse_args(["methods"]).quiet) == (False, False)
    assert p.parse_args(["-v", "methods"]).verbose and p.parse_args(["methods", "-v"]).verbose
    assert p.parse_args(["-q", "methods"]).quiet and p.parse_args(["methods", "--quiet"]).quiet
    assert p.parse_args(["bench", "flops", "-q"]).quiet  # nested subcommands too
    with pytest.raises(SystemExit) as e:
        main(["-v", "methods", "-q"])
    assert e.value.code == 2 and "exclude each other" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"glimpseprune {gp.__version__} ")
    assert "torch " in out and "transformers " in out


def _all_parsers(parser, name="glimpseprune"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_help_renders_with_defaults():
    parsers = dict(_all_parsers(build_parser()))
    assert {"glimpseprune ask", "glimpseprune eval", "glimpseprune compare", "glimpseprune make-tiny",
            "glimpseprune convert", "glimpseprune methods", "glimpseprune bench run"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert "-q, --quiet" in text and "-v, --verbose" in text, name
    assert "(default: 8)" in parsers["glimpseprune eval"].format_help()  # --batch-size
    assert "(default: cpu)" in parsers["glimpseprune ask"].format_help()
    assert "(default: qwen2_5_vl)" in parsers["glimpseprune make-tiny"].format_help()
    assert "(default: None)" not in "".join(p.format_help() for p in parsers.values())
    assert "(default: False)" not in "".join(p.format_help() for p in parsers.values())


def test_quiet_hides_progress_bars_and_loading_bars_need_verbose(tiny_dir, split, img, tmp_path, capsys):
    base = ["eval", "--task", "world", "--data", str(split.parent), "--model", str(tiny_dir), "--batch-size", "2",
            "--max-new-tokens", "2", "--limit", "2"]
    assert main([*base, "--out", str(tmp_path / "loud")]) == 0
    err = capsys.readouterr().err
    assert "sample" in err and "Loading weights" not in err  # the eval bar by default; transformers' bar: no
    assert main([*base, "--out", str(tmp_path / "quiet"), "-q"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "exact_match" in cap.out  # -q: results only
    assert main(["ask", "--model", str(tiny_dir), "--image", str(img), "--question", "Q?", "--max-new-tokens", "1",
                 "-v"]) == 0
    assert "Loading weights" in capsys.readouterr().err  # -v shows it (so the check above is not vacuous)


# ------------------------------------------------------------------ 3. any registered method in ask / eval


def test_ask_with_a_method_and_its_settings(tiny_dir, img, capsys):
    assert main(["ask", "--model", str(tiny_dir), "--image", str(img), "--question", "Q?", "--max-new-tokens", "2",
                 "--method", "fastv", "--method-arg", "keep_ratio=0.25", "--method-arg", "prune_layer=2",
                 "--json"]) == 0
    out = _one_json(capsys.readouterr().out)
    assert (out["method"], out["kept"], out["n_vis"], out["prune_layer"]) == ("fastv", 16, 64, 2)
    assert main(["ask", "--model", str(tiny_dir), "--image", str(img), "--question", "Q?", "--max-new-tokens", "2",
                 "--method", "pdrop", "--method-arg", "layers=0,2", "--method-arg", "lam=1", "--json"]) == 0
    assert _one_json(capsys.readouterr().out)["kept"] == 32  # keep_ratio 0.5 at both stages


@pytest.mark.parametrize("argv, message", [
    (["--method", "fastv", "--method-arg", "ratio=0.1"],
     "--method-arg ratio: --method fastv has no setting 'ratio'; its settings (defaults): keep_ratio=0.5, "
     "prune_layer=1"),
    (["--method", "fastv", "--method-arg", "keep_ratio=lots"], "--method-arg keep_ratio=lots: expected float"),
    (["--method", "fastv", "--method-arg", "keep_ratio"], "expected KEY=VALUE"),
    (["--method", "fastv", "--method-arg", "keep_ratio=2"], "--method fastv --method-arg: keep_ratio must be in"),
    (["--method", "glimpse_attn", "--method-arg", "prune_layer=1.5"], "expected int or none"),
    (["--method", "full", "--method-arg", "keep_ratio=0.5"], "it has no settings"),
    (["--method", "oracle"], "--method oracle keeps the tokens given per request"),
    (["--method", "mask"], "which ask and eval cannot supply"),
    (["--method", "nope"], "--method 'nope' is not a registered method; available: cdpruner"),
    (["--method", "glimpse"], "--method glimpse needs a trained glimpse module: pass --module DIR"),
    (["--method", "glimpse", "--module", "embedded", "--method-arg", "threshold=0.3"],
     "set glimpse's selection with --threshold"),
    (["--method", "fastv", "--fixed-keep-ratio", "0.1"], "--fixed-keep-ratio set GlimpsePrune's selection and do "
     "nothing for --method fastv: its own settings go in --method-arg KEY=VALUE (keep_ratio=0.5"),
    (["--method-arg", "keep_ratio=0.5"], "--method-arg needs --method NAME"),
    (["--method", "early_glimpse", "--module", "embedded", "--method-arg", "fill=diverse"],
     "fill 'diverse' fills a fixed budget: set fixed_keep_ratio (--fixed-keep-ratio R)"),
    (["--max-keep-ratio", "0"], "--max-keep-ratio must be in (0, 1]"),
    (["--method", "fastv", "--method-arg", "=0.5"], "'=0.5': expected KEY=VALUE"),
])
def test_method_errors_name_flags_before_the_model_loads(argv, message, tmp_path, capsys):
    # the model folder does not exist: every one of these must be refused before it would be loaded
    for cmd in (["ask", "--question", "Q?"], ["eval", "--split", "missing.jsonl", "--out", str(tmp_path / "o")]):
        assert main([*cmd, "--model", str(tmp_path / "no-model"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "no model at" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_setting_checked_with_the_selection_passes_with_it(tmp_path, capsys):
    # fill=diverse is refused without --fixed-keep-ratio (above) and accepted with it: the check reaches the model
    argv = ["--method", "early_glimpse", "--module", "embedded", "--fixed-keep-ratio", "0.1", "--method-arg",
            "fill=diverse"]
    assert main(["ask", "--question", "Q?", "--model", str(tmp_path / "no-model"), *argv]) == 2
    err = capsys.readouterr().err
    assert "fill" not in err and "no-model" in err, err


def test_pruning_flags_are_read_as_typed_settings():
    from glimpseprune.cli import _parse_typed

    assert _parse_typed("layers", "7, 15,23", tuple[int, ...] | None) == (7, 15, 23)
    assert _parse_typed("layers", "none", tuple[int, ...] | None) is None
    assert _parse_typed("merge", "false", bool) is False and _parse_typed("merge", "YES", bool) is True
    assert _parse_typed("prune_layer", "-1", int) == -1 and _parse_typed("query", "last_token", str) == "last_token"
    with pytest.raises(ValueError, match="expected bool"):
        _parse_typed("merge", "maybe", bool)
    assert _parse_typed("merge", "0", bool) is False and _parse_typed("merge", "1", bool) is True
    assert _parse_typed("layers", "7, ,15,", tuple[int, ...]) == (7, 15)  # blank items are left out
    assert _parse_typed("names", " a , b", tuple[str, ...]) == ("a", "b")
    with pytest.raises(ValueError, match="prune_layer=none: expected int"):  # none only where the field allows it
        _parse_typed("prune_layer", "none", int)


def test_defaults_are_shown_as_typed_and_the_embedded_model_brings_its_module():
    from glimpseprune.assets import EMBEDDED
    from glimpseprune.cli.method_args import _module_arg, _show

    assert [_show(v) for v in (None, True, False, 1 / 3, 0.5, (7, 15, 23), 4)] == \
        ["none", "true", "false", "0.333333", "0.5", "7,15,23", "4"]
    ns = argparse.Namespace
    assert _module_arg(ns(module=None, model=EMBEDDED)) == EMBEDDED
    assert _module_arg(ns(module=None, model="some/dir")) is None
    assert _module_arg(ns(module="m", model=EMBEDDED)) == "m"


def test_port_and_ratio_bounds():
    from glimpseprune.cli.common import port
    from glimpseprune.cli.evaluate import _ratio

    assert port("65535") == 65535 and port("1") == 1
    for bad in ("65536", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            port(bad)
    assert _ratio(0.3, 0.6) == pytest.approx(0.5)
    assert _ratio(0.3, 0.0) is None and _ratio(0.3, float("nan")) is None  # no ratio against nothing / no number


def test_eval_refuses_split_and_task_together(split, tmp_path, capsys):
    argv = ["eval", "--split", str(split), "--task", "textvqa", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
            "--model", str(tmp_path / "no-model")]
    assert main(argv) == 2
    assert "give either --split (a records JSONL) or --task NAME --data DIR" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_leaves_out_rows_of_records_no_longer_in_the_split(capsys):
    from types import SimpleNamespace as R

    from glimpseprune.cli.evaluate import _matching_rows

    records = [R(id="a", question="q1", answer="x"), R(id="b", question="q2", answer="y")]
    done = [{"id": "a", "question": "q1", "answer": "x"}, {"id": "gone", "question": "q", "answer": "z"},
            {"id": "b", "question": "q2", "answer": "y"}]
    args = argparse.Namespace(split="s.jsonl", quiet=False)
    assert [r["id"] for r in _matching_rows(done, records, args)] == ["a", "b"]
    assert "1 saved results belong to records no longer in s.jsonl: left out" in capsys.readouterr().err
    with pytest.raises(ValueError, match="1 saved results no longer match .* 'b'"):
        _matching_rows([{"id": "b", "question": "q2", "answer": "other"}], records, args)


# ------------------------------------------------------------------ 4. methods


def test_methods_table_is_aligned_and_clean(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and "`fastv`" not in out
    lines = out.splitlines()
    where_at = lines[0].index("where it prunes")
    rows = {ln.split()[0]: ln for ln in lines[1:] if ln and not ln.startswith(" ") and ln.split()[0] in
            list_methods()}
    assert set(rows) == set(list_methods())
    for line in rows.values():
        assert line[where_at - 2:where_at] == "  " and line[where_at] != " ", line  # one column for every row
    assert "after LLM layer 1 " in rows["fastv"] and "before the LLM " in rows["random"]
    assert "after LLM layers L/4-1, L/2-1, 3L/4-1" in rows["pdrop"]
    assert "before the LLM + after LLM layer L/2-1" in rows["vscan"]
    assert "settings: keep_ratio=0.5, prune_layer=1" in out
    assert main(["methods", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in infos] == list_methods()
    fastv = next(m for m in infos if m["name"] == "fastv")
    assert fastv["settings"] == [{"name": "keep_ratio", "type": "float", "default": 0.5, "group": None},
                                 {"name": "prune_layer", "type": "int", "default": 1, "group": None}]


def test_describe_method_summaries_are_whole_sentences():
    for name in list_methods():
        info = describe_method(name)
        assert info["summary"].endswith(".") and "`" not in info["summary"], info
        assert info["summary"][0].isupper() and info["where"], info
    assert describe_method("glimpse")["needs"] == "a trained module"
    assert describe_method("oracle")["needs"] == describe_method("mask")["needs"] == "keep masks per request"
    assert describe_method("glimpse_attn")["where"] == "after LLM layer ceil(2L/3)-1"
    assert describe_method("full")["where"].startswith("nowhere")


# ------------------------------------------------------------------ 5. make-tiny --family llava, convert --vision-depth


def test_make_tiny_llava_then_ask(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["make-tiny", "--family", "llava", "--out", str(out)]) == 0
    assert "tiny RANDOM LLaVA-1.5" in capsys.readouterr().out
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "llava"
    assert main(["ask", "--model", str(out / "model"), "--module", str(out / "module"), "--image",
                 str(out / "example.png"), "--question", "What colour is the square?", "--max-new-tokens", "2",
                 "--json"]) == 0
    res = _one_json(capsys.readouterr().out)
    assert res["n_vis"] == 64 and res["method"] == "glimpse"


def test_convert_vision_depth(llava, llava_module, module, model, tmp_path, capsys):
    from test_checkpoint import _to_upstream

    dims = gp.get_adapter(llava[0]).dims(llava[0])
    (tmp_path / "llava").mkdir()
    up = _to_upstream(llava_module, tmp_path / "llava", llava[0])
    assert main(["convert", "--upstream", str(up), "--out", str(tmp_path / "c"), "--vision-depth",
                 str(dims.vision_depth)]) == 0
    assert gp.load_module(tmp_path / "c", dims).cfg.base_vision_depth == dims.vision_depth
    assert main(["convert", "--upstream", str(up), "--out", str(tmp_path / "c24")]) == 0  # LLaVA default: CLIP-L
    assert gp.load_module(tmp_path / "c24").cfg.base_vision_depth == 24
    with pytest.raises(SystemExit) as e:
        main(["convert", "--upstream", str(up), "--out", str(tmp_path / "c0"), "--vision-depth", "0"])
    assert e.value.code == 2 and "--vision-depth: must be at least 1" in capsys.readouterr().err
    # Qwen releases record their depth; the flag overrides it (here: a module that no longer fits this model)
    (tmp_path / "qwen").mkdir()
    qup = _to_upstream(module, tmp_path / "qwen", model)
    assert main(["convert", "--upstream", str(qup), "--out", str(tmp_path / "q")]) == 0
    recorded = gp.load_module(tmp_path / "q").cfg.base_vision_depth
    assert main(["convert", "--upstream", str(qup), "--out", str(tmp_path / "q6"), "--vision-depth",
                 str(recorded + 2)]) == 0
    assert gp.load_module(tmp_path / "q6").cfg.base_vision_depth == recorded + 2


# ------------------------------------------------------------------ 6. the split before the model; flags in errors


def test_eval_checks_the_split_before_loading(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cases = [(tmp_path / "missing.jsonl", "--split {}: no such file"), (tmp_path, "--split {} is a folder"),
             (empty, "--split {} holds no records"), (binary, "--split {}: not a UTF-8 text file")]
    for path, message in cases:
        out = tmp_path / f"out-{path.name}"
        assert main(["eval", "--split", str(path), "--out", str(out), "--model", str(tmp_path / "no-model")]) == 2
        err = capsys.readouterr().err
        assert message.format(path) in err and "no model at" not in err, err
        assert not out.exists()  # refused before the output folder is claimed
    assert main(["compare", "--split", str(empty), "--out", str(tmp_path / "c"), "--methods", "random"]) == 2
    assert "holds no records" in capsys.readouterr().err


def test_library_messages_are_translated_to_flags():
    from glimpseprune.methods import GlimpseMethod, PDropMethod

    with pytest.raises(ValueError) as e:
        GlimpseMethod()
    text = _in_flags(str(e.value))
    assert "--module DIR" in text and "module=" not in text
    with pytest.raises(ValueError) as e:
        PDropMethod().prune_layers(2)
    assert _in_flags(str(e.value)).endswith("pass --method-arg layers=A,B,C")
    lora = ("the glimpse module in m was trained with a LoRA adapter on its base model: alone, on the stock base, it "
            "is the wrong function (upstream lost 12 points this way). Load both with gp.load(model_dir, "
            "module='m') or glimpseprune.checkpoint.load_plus(model, DIR), or pass allow_without_adapter=True to "
            "load the module alone")
    assert "gp.load" not in _in_flags(lora) and "--module" in _in_flags(lora)
