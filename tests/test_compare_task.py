"""``compare --task NAME --data DIR``: methods x budgets through the generic task path give what the world comparison
gives on the same split; an interrupted comparison resumes; ``eval --task`` shows a progress bar with an ETA."""

from __future__ import annotations

import json

import pytest

from glimpseprune.cli import main
from glimpseprune.data.records import write_split


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("cmp-task-world"), n=10, seed=5)


ARGS = ["--methods", "glimpse", "fastv", "random", "--budgets", "0.1", "0.3", "--batch-size", "4"]


def _runs(folder):
    return {json.loads(p.read_text())["label"]: json.loads(p.read_text()) for p in (folder / "runs").glob("*.json")}


@pytest.fixture(scope="module")
def world_and_task(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    assert main(["compare", "--split", str(split), "--out", str(out / "world"), *ARGS]) == 0
    assert main(["compare", "--task", "world", "--data", str(split.parent), "--out", str(out / "task"),
                 "--max-new-tokens", "8", *ARGS]) == 0
    return out


def test_compare_task_equals_the_world_comparison(world_and_task):
    world, task = _runs(world_and_task / "world"), _runs(world_and_task / "task")
    assert world.keys() == task.keys()
    # full, glimpse at 2 budgets + dynamic + capped, fastv and random at 2 budgets each
    assert len(task) == 1 + 4 + 2 + 2
    for label, w in world.items():
        t = task[label]
        assert t["metric"] == "exact_match" and t["task"] == "world" and t["n"] == w["n"] == 10
        assert t["score"] == pytest.approx(w["exact_match"]), label
        assert t["kept_frac"]["mean"] == pytest.approx(w["kept_frac"]["mean"]), label
        assert t["model"] == w["model"] and t["module"] == w["module"] and t["judge_model"] is None, label
        for key in ("visual_tokens_entering_llm", "equivalent_visual_tokens", "equivalent_frac",
                    "kv_entries_at_decode", "visual_kv_at_decode"):
            assert t["accounting"][key] == pytest.approx(w["accounting"][key]), (label, key)
        assert {f: v["score"] for f, v in t["per_family"].items()} == pytest.approx(
            {f: v["exact_match"] for f, v in w["per_family"].items()}), label
    md = (world_and_task / "task" / "compare.md").read_text()
    assert "world exact_match by method and budget" in md.lower() and "| fastv |" in md
    rows = (world_and_task / "task" / "runs" / "fastv_0.1.samples.jsonl").read_text().splitlines()
    assert len(rows) == 10 and {"entering", "equivalent", "kept_frac"} <= json.loads(rows[0]).keys()


def test_compare_task_interrupted_and_resumed_gives_the_same_runs(split, world_and_task, tmp_path, capsys,
                                                                   monkeypatch):
    from glimpseprune.api import PrunedModel

    out = tmp_path / "half"
    args = ["compare", "--task", "world", "--data", str(split.parent), "--out", str(out), "--max-new-tokens", "8",
            *ARGS]
    assert main(args) == 0
    runs = out / "runs"
    (runs / "random_0.3.json").unlink()  # killed during the last run, after its 6th sample
    samples = runs / "random_0.3.samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:6]) + "\n" + lines[6][:11])
    marked = {**json.loads((runs / "fastv_0.3.json").read_text()), "seconds": -1.0}
    (runs / "fastv_0.3.json").write_text(json.dumps(marked))  # a finished run is read back, not rerun
    assert main(args) == 2  # a folder holding another run is refused without --resume
    asked, generate = [], PrunedModel.generate

    def counted(self, *a, **kw):
        asked.extend(kw["questions"])
        return generate(self, *a, **kw)

    monkeypatch.setattr(PrunedModel, "generate", counted)
    assert main([*args, "--resume"]) == 0
    assert len(asked) == 4  # only the 4 samples the interrupted run had not written are generated again
    monkeypatch.undo()
    assert json.loads((runs / "fastv_0.3.json").read_text())["seconds"] == -1.0
    whole = _runs(world_and_task / "task")
    got = json.loads((runs / "random_0.3.json").read_text())
    assert got["score"] == whole["random@0.3"]["score"] and got["n"] == 10
    resumed = [json.loads(line) for line in samples.read_text().splitlines()]  # the torn line is gone, not glued
    assert len({r["id"] for r in resumed}) == len(resumed) == 10
    assert main([*args[:-len(ARGS)], "--methods", "fastv", "--resume"]) == 2  # other settings: refused

    # a summary file that is torn or belongs to another run is named, not trusted or read as a traceback
    for text, match in (('{"label": "fastv', "not JSON"), (json.dumps({**marked, "label": "random@0.3"}),
                                                          "not the summary of run 'fastv@0.3'"),
                        (json.dumps({**marked, "version": marked["version"] - 1}), "not the summary of run")):
        (runs / "fastv_0.3.json").write_text(text)
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err
        assert match in err and "fastv_0.3.json" in err and "Traceback" not in err


def test_compare_task_bad_input(split, tmp_path, capsys):
    base = ["compare", "--data", str(split.parent), "--out", str(tmp_path / "o")]
    assert main([*base, "--task", "world", "--methods", "oracle"]) == 2
    assert "oracle" in capsys.readouterr().err
    assert main([*base, "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main([*base, "--task", "gqa"]) == 2
    assert "gqa:" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "o")]) == 2
    assert "--split" in capsys.readouterr().err
    assert main(["compare", "--split", str(split), "--out", str(tmp_path / "o"), "--resume"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_task_shows_progress_with_eta_and_writes_a_markdown_row(split, tmp_path, capsys):
    assert main(["eval", "--task", "world", "--data", str(split.parent), "--out", str(tmp_path / "e"),
                 "--batch-size", "4", "--limit", "8"]) == 0
    err = capsys.readouterr().err
    assert "world" in err and "8/8" in err and "<" in err  # tqdm: "n/total [elapsed<remaining, rate]"
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    head, rule, row = (tmp_path / "e" / "summary.md").read_text().splitlines()
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert head.startswith("| task | method |") and rule.startswith("|---|")
    assert cells[:2] == ["world", "glimpse"] and cells[5] == f"{summary['score']:.4f}" and cells[6] == "8"


def test_world_eval_and_compare_show_progress(split, tmp_path, capsys):
    """eval --split and the world comparison are not silent on long runs: a bar per run with i/N and an ETA."""
    assert main(["eval", "--split", str(split), "--out", str(tmp_path / "e"), "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "eval [glimpse]" in err and "10/10" in err and "<" in err
    assert main(["compare", "--split", str(split), "--out", str(tmp_path / "c"), "--methods", "random",
                 "--budgets", "0.2", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "[1/2] full" in err and "[2/2] random@0.2" in err and "10/10" in err
    assert main(["compare", "-q", "--split", str(split), "--out", str(tmp_path / "q"), "--methods", "random",
                 "--budgets", "0.2", "--batch-size", "4"]) == 0
    assert "[1/2]" not in capsys.readouterr().err  # -q: no bars


def test_compare_task_refuses_a_bad_plan_before_using_the_model(tmp_path):
    """Called from Python (the CLI checks its own flags first): the oracle, glimpse without a module, or no samples
    is refused naming the problem, before the model is touched or the output folder made."""
    from glimpseprune.eval.compare_task import compare_task
    from glimpseprune.eval.tasks import get_task

    task = get_task("world")
    with pytest.raises(ValueError, match="method 'oracle' needs ground-truth boxes; task world has none"):
        compare_task(None, None, None, task, [object()], tmp_path / "o", ["fastv", "oracle"])
    with pytest.raises(ValueError, match="method 'glimpse' needs a glimpse module"):
        compare_task(None, None, None, task, [object()], tmp_path / "o", ["glimpse"])
    with pytest.raises(ValueError, match="world: no samples to compare on"):
        compare_task(None, None, None, task, [], tmp_path / "o", ["fastv"])
    assert not (tmp_path / "o").exists()
