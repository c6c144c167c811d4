"""The generic benchmark path (``eval --task NAME --data DIR``): the world task through it gives the same answers and
scores as ``eval --split``; a run killed half way and resumed gives the same summary; bad input fails before the first
sample."""

from __future__ import annotations

import json
import socket

import pytest

from glimpseprune.cli import main
from glimpseprune.data.records import write_split
from glimpseprune.eval.tasks import get_task, register_task
from glimpseprune.eval.tasks.world import WorldTask


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("task-world"), n=12, seed=3)


def _rows(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_world_task_equals_the_world_path(split, tmp_path):
    assert main(["eval", "--split", str(split), "--out", str(tmp_path / "a"), "--batch-size", "4"]) == 0
    assert main(["eval", "--task", "world", "--data", str(split.parent), "--out", str(tmp_path / "b"),
                 "--batch-size", "4"]) == 0
    a, b = _rows(tmp_path / "a" / "samples.jsonl"), _rows(tmp_path / "b" / "samples.jsonl")
    assert a.keys() == b.keys() and len(a) == 12
    assert all(a[k]["prediction"] == b[k]["prediction"] and float(a[k]["correct"]) == b[k]["score"] for k in a)
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sa["exact_match"] == pytest.approx(sb["score"]) and sa["kept_frac"]["mean"] == pytest.approx(sb["kept_frac"])
    assert {k: v["exact_match"] for k, v in sa["per_family"].items()} == pytest.approx(
        {k: v["score"] for k, v in sb["per_category"].items()})


def test_rows_carry_their_batch_time_per_sample(split, tmp_path, monkeypatch, capsys):
    """prefill_ms / decode_ms of a row: its batch's seconds x 1000 / the batch's size (12 samples in batches of 5:
    5, 5, 2), and the summary's ms_per_sample their mean; the progress bar ends at 12/12, not 15/12."""
    from glimpseprune.api import PrunedModel

    batches, generate = [], PrunedModel.generate

    def timed(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        out.timing.update(prefill=0.25 * len(out.texts), decode=0.5 + len(out.texts))  # known seconds per batch
        batches.append((len(out.texts), dict(out.timing)))
        return out

    monkeypatch.setattr(PrunedModel, "generate", timed)
    assert main(["eval", "--task", "world", "--data", str(split.parent), "--out", str(tmp_path / "t"),
                 "--batch-size", "5"]) == 0
    assert sorted(n for n, _ in batches) == [2, 5, 5]
    err = capsys.readouterr().err
    assert "12/12" in err and "15/12" not in err
    rows = list(_rows(tmp_path / "t" / "samples.jsonl").values())
    assert sorted(r["prefill_ms"] for r in rows) == pytest.approx([250.0] * 12)
    want = sorted([1000 * 5.5 / 5] * 10 + [1000 * 2.5 / 2] * 2)
    assert sorted(r["decode_ms"] for r in rows) == pytest.approx(want)
    ms = json.loads((tmp_path / "t" / "summary.json").read_text())["ms_per_sample"]
    assert ms["prefill"] == pytest.approx(250.0) and ms["decode"] == pytest.approx(sum(want) / 12)


def test_killed_half_way_and_resumed_gives_the_same_summary(split, tmp_path):
    args = ["eval", "--task", "world", "--data", str(split.parent), "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "half")]) == 0
    samples = tmp_path / "half" / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])  # killed mid-write of the 6th row
    (tmp_path / "half" / "summary.json").unlink()
    assert main([*args, "--out", str(tmp_path / "half"), "--resume"]) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    half = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert half["n"] == whole["n"] == 12 and half["score"] == whole["score"]
    assert half["per_category"] == whole["per_category"]
    assert _rows(samples).keys() == _rows(tmp_path / "whole" / "samples.jsonl").keys()


def test_bad_input_fails_before_the_first_sample(split, tmp_path, capsys):
    assert main(["eval", "--task", "nope", "--data", str(split.parent), "--out", str(tmp_path / "o")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--task", "gqa", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "gqa: data folder not found" in err
    assert main(["eval", "--task", "gqa", "--data", str(split.parent), "--out", str(tmp_path / "o3")]) == 2
    assert "gqa:" in capsys.readouterr().err  # another layout: named, before any model loads
    assert main(["eval", "--task", "world", "--out", str(tmp_path / "o4")]) == 2
    assert "needs --data" in capsys.readouterr().err

    class JudgedWorld(WorldTask):
        name, metric = "world_judged", "judge"

    register_task(JudgedWorld(), replace=True)
    assert get_task("world_judged").metric == "judge"
    assert main(["eval", "--task", "world_judged", "--data", str(split.parent), "--out", str(tmp_path / "o5")]) == 2
    assert "--judge-url" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["eval", "--task", "world_judged", "--data", str(split.parent), "--out", str(tmp_path / "o6"),
                 "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "m"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "o6" / "samples.jsonl").exists()


def test_two_process_accelerate_launch_equals_one_process(split, tmp_path):
    import subprocess
    import sys

    args = ["eval", "--task", "world", "--data", str(split.parent), "--batch-size", "3"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "glimpseprune.cli", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = _rows(tmp_path / "one" / "samples.jsonl"), _rows(tmp_path / "two" / "samples.jsonl")
    keys = ("prediction", "score", "n_vis", "n_kept", "kv_len")
    assert one.keys() == two.keys() and all({k: one[i][k] for k in keys} == {k: two[i][k] for k in keys} for i in one)
    assert not list((tmp_path / "two").glob("samples.rank*.jsonl"))  # gathered into one file
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["score"] == s2["score"] and s1["n"] == s2["n"] == 12


def test_paper_eval_script_issues_valid_commands(tmp_path):
    """benchmarks/eval_qwen2_5_vl_7b.sh with a stand-in `glimpseprune` on PATH: every command it would run parses
    with our real CLI and names a registered task."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    from glimpseprune.cli import build_parser
    from glimpseprune.eval.tasks import list_tasks

    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.txt"
    fake = bindir / "glimpseprune"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_qwen2_5_vl_7b.sh"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), "PLUS": "plus/",
           "COMPARE": "1"}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [shlex.split(line) for line in log.read_text().splitlines() if line.strip()]
    assert len(calls) == 3 + 2 * 12 + 12
    for argv in calls:
        args = build_parser().parse_args(argv)
        assert args.cmd in ("eval", "compare") and args.task in list_tasks() and args.device == "cuda"
    assert sum(build_parser().parse_args(a).cmd == "compare" for a in calls) == 12


def test_judged_task_killed_and_resumed_asks_the_judge_nothing_twice(split, tmp_path, monkeypatch):
    """A judge-scored task through the real CLI against a chat-completions server on 127.0.0.1: the run killed half
    way and resumed gives the whole run's summary, and the resumed run sends the judge no grading request again (only
    the one health check every run makes)."""
    from test_rewards import JudgeServer  # the local chat-completions server of the judge tests

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("GLIMPSEPRUNE_JUDGE_API_KEY", raising=False)

    class JudgedWorld(WorldTask):
        name, metric = "world_judged", "judge"

    register_task(JudgedWorld(), replace=True)

    def grade(body, n):  # a deterministic judge whose score depends on the prompt
        text = body["messages"][-1]["content"]
        return 200, f"Score: {0.9 if len(text) % 2 else 0.3}", 0.0

    def grading(requests):  # the grading prompts sent (the health check asks about two plus two)
        texts = [r["messages"][-1]["content"] for r in requests]
        return [t for t in texts if "two plus two" not in t]

    server = JudgeServer(grade)
    try:
        args = ["eval", "--task", "world_judged", "--data", str(split.parent), "--batch-size", "4",
                "--judge-url", server.url, "--judge-model", "judge-m"]
        assert main([*args, "--out", str(tmp_path / "whole")]) == 0
        asked = grading(server.requests)
        assert len(asked) == len(set(asked)) >= 6  # one request per distinct (question, reference, answer)
        samples = tmp_path / "whole" / "samples.jsonl"
        assert len(samples.read_text().splitlines()) == 12
        assert main([*args, "--out", str(tmp_path / "half"), "--judge-cache", str(tmp_path / "half_cache")]) == 0
        assert len(grading(server.requests)) == 2 * len(asked)  # another cache folder: asked again
        samples = tmp_path / "half" / "samples.jsonl"
        lines = samples.read_text().splitlines()
        samples.write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])  # killed mid-write of the 6th row
        (tmp_path / "half" / "summary.json").unlink()
        before = len(server.requests)
        assert main([*args, "--out", str(tmp_path / "half"), "--judge-cache", str(tmp_path / "half_cache"),
                     "--resume"]) == 0
        assert grading(server.requests[before:]) == []  # the 7 re-run samples were answered from the cache
        assert len(server.requests) == before + 1  # the health check, made before every run
        whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
        half = json.loads((tmp_path / "half" / "summary.json").read_text())
        assert half["n"] == whole["n"] == 12 and half["score"] == pytest.approx(whole["score"])
        assert half["judge_model"] == "judge-m" and 0.3 <= half["score"] <= 0.9
    finally:
        server.close()


def test_a_judge_that_fails_mid_run_stops_it_and_resume_asks_again(split, tmp_path, monkeypatch, capsys):
    """The judge answers the health check and the first batch, then returns HTTP 500: the run stops naming it (the
    failed batch is not saved as wrong answers), and --resume against a healthy judge grades the rest."""
    from test_rewards import JudgeServer

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("GLIMPSEPRUNE_JUDGE_API_KEY", raising=False)

    class JudgedWorld(WorldTask):
        name, metric = "world_judged", "judge"

    register_task(JudgedWorld(), replace=True)
    healthy = {"on": False}
    server = JudgeServer(lambda body, n: (200, "score: 1", 0.0) if n <= 5 or healthy["on"] else (500, "down", 0.0))
    try:
        args = ["eval", "--task", "world_judged", "--data", str(split.parent), "--batch-size", "4",
                "--judge-url", server.url, "--judge-model", "judge-m", "--out", str(tmp_path / "o")]
        assert main(args) == 2
        assert "HTTP 500" in capsys.readouterr().err
        saved = _rows(tmp_path / "o" / "samples.jsonl")
        assert len(saved) == 4 and all(r["score"] == 1.0 for r in saved.values())  # the batch graded before it
        healthy["on"] = True
        assert main([*args, "--resume"]) == 0
        summary = json.loads((tmp_path / "o" / "summary.json").read_text())
        assert summary["n"] == summary["n_scored"] == 12 and summary["score"] == 1.0
    finally:
        server.close()


@pytest.mark.parametrize("batch_size", ["4", "2"])
def test_skip_leaves_out_only_the_bad_sample_of_a_batch(split, tmp_path, batch_size):
    """--on-error skip with one unreadable image in a batch of 4 (or 2): that sample alone is skipped and named (the
    whole batch was, with the first sample's id in the message)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(split.parent, data)
    rows = [json.loads(line) for line in (data / "records.jsonl").read_text().splitlines()]
    (data / rows[5]["image"]).write_bytes(b"not a png")
    assert main(["eval", "--task", "world", "--data", str(data), "--batch-size", batch_size, "--on-error", "skip",
                 "--out", str(tmp_path / "o")]) == 0
    errors = [json.loads(line) for line in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == [rows[5]["id"]]
    assert len(_rows(tmp_path / "o" / "samples.jsonl")) == 11


def test_resume_follows_the_split_and_refuses_another_answer_length(split, tmp_path, capsys):
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(split.parent, mine)
    args = ["eval", "--split", str(mine / "records.jsonl"), "--batch-size", "4", "--limit", "4",
            "--out", str(tmp_path / "s")]
    assert main(args) == 0
    capsys.readouterr()
    write_split(mine, n=12, seed=3, overwrite=True)  # the same split written again: the run continues
    assert main([*args, "--resume"]) == 0
    rows = [json.loads(line) for line in mine.joinpath("records.jsonl").read_text().splitlines()]
    rows[1]["answer"] = "purple"  # a record that now expects another answer
    mine.joinpath("records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*args, "--resume"]) == 2
    assert "no longer match the records" in capsys.readouterr().err
    write_split(mine, n=12, seed=4, overwrite=True)  # another split at the same path: other ids
    assert main([*args, "--resume"]) == 0
    assert "4 saved results belong to records no longer in" in capsys.readouterr().err
    ids = {json.loads(line)["id"] for line in mine.joinpath("records.jsonl").read_text().splitlines()[:4]}
    assert set(_rows(tmp_path / "s" / "samples.jsonl")) == ids  # only the new split's records, not 8 mixed
    targs = ["eval", "--task", "world", "--data", str(split.parent), "--limit", "4", "--out", str(tmp_path / "t")]
    assert main([*targs, "--max-new-tokens", "8"]) == 0
    assert main([*targs, "--max-new-tokens", "2", "--resume"]) == 2
    assert "max_new_tokens: 8 -> 2" in capsys.readouterr().err


def test_a_mistyped_task_does_not_claim_the_folder(split, tmp_path):
    out = tmp_path / "o"
    assert main(["eval", "--task", "gqa", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["eval", "--task", "world", "--data", str(split.parent), "--limit", "2", "--out", str(out)]) == 0


def test_repeated_record_ids_are_all_evaluated_and_resumed(split, tmp_path):
    """Visual-CoT restarts question_id in every subset: records sharing an id are named ID#2, ... so that a resumed
    run neither drops nor double counts them."""
    data = tmp_path / "dup"
    data.mkdir()
    rows = [json.loads(line) for line in split.read_text().splitlines()][:6]
    for i, r in enumerate(rows):
        r["id"] = f"q{i // 2}"
        r["image"] = str((split.parent / r["image"]).resolve())
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--split", str(data / "records.jsonl"), "--batch-size", "2", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    samples = tmp_path / "o" / "samples.jsonl"
    assert sorted(_rows(samples)) == ["q0", "q0#2", "q1", "q1#2", "q2", "q2#2"]
    samples.write_text("\n".join(samples.read_text().splitlines()[:3]) + "\n")
    assert main([*args, "--resume"]) == 0
    assert len(_rows(samples)) == 6 and json.loads((tmp_path / "o" / "summary.json").read_text())["n"] == 6


def test_relative_accuracy_against_a_zero_full_score_is_none():
    """--compare-full divided by max(full, 1e-9): a family the full run scored 0 on read 999999999.99 in
    relative.json."""
    from glimpseprune.cli.evaluate import _ratio

    assert _ratio(1.0, 0.0) is None and _ratio(0.0, 0.0) is None and _ratio(1.0, float("nan")) is None
    assert _ratio(0.5, 0.25) == 2.0 and _ratio(0.0, 0.5) == 0.0


def test_per_sample_score_takes_the_best_reference():
    """A prediction matching any reference scores it (ChartQA rows can hold several answers; it read only the
    first), and a split without answers is unscored."""
    from pathlib import Path

    from glimpseprune.eval.runner import score
    from glimpseprune.eval.tasks._base import Sample

    def sample(answers):
        return Sample(id="1", image_paths=[Path("x.png")], question="q", prompt="q", answers=answers)

    assert score(get_task("chartqa"), sample(["12", "twelve"]), "twelve") == 1.0
    assert score(get_task("chartqa"), sample(["12", "twelve"]), "13") == 0.0
    assert score(get_task("chartqa"), sample([]), "twelve") is None


def _sample(answers, meta=None, id="1"):
    from pathlib import Path

    from glimpseprune.eval.tasks._base import Sample

    return Sample(id=id, image_paths=[Path("x.png")], question="q", prompt="q", answers=answers, meta=meta or {})


def test_per_sample_scores_follow_each_benchmarks_rule():
    """Hand-worked scores. VQA accuracy: the mean over the 10 leave-one-out subsets of min(#matches / 3, 1), so one
    matching annotator of ten gives 9/10 x 1/3 = 0.3. ANLS: 1 - edit distance / longer length when that is below
    0.5, else 0. MME and POPE: the reply read as yes / no against a reference in any case."""
    from glimpseprune.eval.runner import score

    vqa = ["down"] * 7 + ["at table", "skateboard", "table"]
    assert score(get_task("vqav2"), _sample(vqa), "Down.") == 1.0
    assert score(get_task("vqav2"), _sample(vqa), "table") == pytest.approx(0.3)
    assert score(get_task("textvqa"), _sample(["yes"] * 9 + ["no"]), "no") == pytest.approx(0.3)
    doc = get_task("docvqa")
    refs = ["university of california", "University of California"]
    assert score(doc, _sample(refs), "University of Californa") == pytest.approx(1 - 1 / 24)
    assert score(doc, _sample(["0.28"]), "0.2") == pytest.approx(0.75)
    assert score(doc, _sample(["0.28"]), "28") == 0.0  # NL = 2/4: exactly the threshold scores 0
    mme = get_task("mme")
    assert score(mme, _sample(["Yes"]), "yes") == 1.0 and score(mme, _sample(["No"]), "No, it is not.") == 1.0
    assert score(mme, _sample(["Yes"]), "No") == 0.0
    pope = get_task("pope")
    assert score(pope, _sample(["Yes "]), "Yes, there is a dog.") == 1.0 and score(pope, _sample(["no"]), "yes") == 0.0
    assert score(get_task("gqa"), _sample(["man", "person"]), "Person.") == 1.0
    # a choice answered with the option's text: V* options are a list, MMBench's a letter -> text dict
    assert score(get_task("vstar_bench"), _sample(["A"], {"choices": ["rubber", "cotton"]}), "rubber") == 1.0
    mmb = _sample(["C"], {"choices": {"B": "no", "A": "yes", "C": "maybe"}})
    assert score(get_task("mmbench_en_dev"), mmb, "maybe") == 1.0 and score(get_task("mmbench_en_dev"), mmb, "no") == 0


def _row(id, category, pred, answer, image_id=None, score=None):
    return {"id": id, "prediction": pred, "answers": [answer], "score": score,
            "meta": {"category": category, **({"image_id": image_id} if image_id else {})},
            "kept_frac": 0.5, "kv_len": 10, "prefill_ms": 1.0, "decode_ms": 1.0}


def test_pope_summary_is_the_mean_f1_over_its_splits():
    """random: tp 2, fp 1, fn 1 -> precision = recall = F1 = 2/3 (accuracy 1/2); popular: no true positive -> F1 0.
    POPE's headline is the mean F1: 1/3."""
    from glimpseprune.eval.runner import summarize_task

    rows = [_row("r1", "random", "Yes", "yes"), _row("r2", "random", "No", "yes"), _row("r3", "random", "yes", "no"),
            _row("r4", "random", "yes.", "yes"), _row("p1", "popular", "no", "no"), _row("p2", "popular", "no", "yes")]
    summary = summarize_task(get_task("pope"), rows)
    assert summary["per_category"]["random"]["f1"] == pytest.approx(2 / 3)
    assert summary["per_category"]["random"]["accuracy"] == 0.5
    assert summary["per_category"]["random"]["yes_ratio"] == 0.75
    assert summary["per_category"]["popular"]["f1"] == 0.0
    assert summary["score"] == pytest.approx(1 / 3)


def test_mme_summary_is_the_sum_of_subtask_scores_with_acc_plus_per_image():
    """existence: 3 of 4 questions right (acc 0.75), one of two images with both right (acc+ 0.5): 125;
    code_reasoning: both right: 200. Perception 125 + cognition 200 = 325."""
    from glimpseprune.eval.runner import summarize_task

    rows = [_row("e1#0", "existence", "Yes", "Yes", "existence/1.png"), _row("e1#1", "existence", "No", "No",
                                                                             "existence/1.png"),
            _row("e2#0", "existence", "Yes", "Yes", "existence/2.png"), _row("e2#1", "existence", "Yes", "No",
                                                                             "existence/2.png"),
            _row("c1#0", "code_reasoning", "yes", "Yes", "code_reasoning/1.png"),
            _row("c1#1", "code_reasoning", "no", "No", "code_reasoning/1.png")]
    summary = summarize_task(get_task("mme"), rows)
    assert summary["mme"]["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert summary["mme"]["perception"] == pytest.approx(125.0) and summary["mme"]["cognition"] == pytest.approx(200.0)
    assert summary["score"] == pytest.approx(325.0)


def test_markdown_row_and_header():
    from glimpseprune.eval.runner import markdown_row

    summary = {"task": "gqa", "method": "glimpse", "model": "m", "module": None, "metric": "exact_match",
               "score": 0.5, "n": 4, "kept_frac": 0.25, "mean_kv_len": 100.0,
               "ms_per_sample": {"prefill": 12.34, "decode": 5.0}, "judge_model": None}
    row = "| gqa | glimpse | m | - | exact_match | 0.5000 | 4 | 25.0 | 100.0 | 12.3 | 5.0 | - |\n"
    assert markdown_row(summary) == row
    head = ("| task | method | model | module | metric | score | n | kept % | KV at decode | prefill ms | decode ms "
            "| judge |\n|" + "---|" * 12 + "\n")
    assert markdown_row(summary, header=True) == head + row


def test_run_task_refuses_a_judged_task_without_a_judge():
    """Called from Python (not the CLI, which checks its flags), a judge-scored task without a judge is refused
    before anything runs, instead of every row being left unscored."""
    from glimpseprune.eval.runner import run_task

    class JudgedWorld(WorldTask):
        name, metric = "world_judged", "judge"

    with pytest.raises(ValueError, match="task world_judged is scored by an LLM judge"):
        run_task(None, JudgedWorld(), [])


def test_a_judged_split_without_answers_asks_the_judge_nothing(split, tmp_path, monkeypatch):
    """A free-form task's test split without references (as MMBench's test TSV): its predictions are kept unscored and
    the judge is sent no grading request (there is no reference to grade against)."""
    import dataclasses

    from test_rewards import JudgeServer

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("GLIMPSEPRUNE_JUDGE_API_KEY", raising=False)

    class UnansweredJudged(WorldTask):
        name, metric = "world_judged_test", "judge"

        def load(self, data_dir, limit=None):
            return [dataclasses.replace(s, answers=[]) for s in super().load(data_dir, limit)]

    register_task(UnansweredJudged(), replace=True)
    server = JudgeServer(lambda body, n: (200, "score: 1", 0.0))
    try:
        assert main(["eval", "--task", "world_judged_test", "--data", str(split.parent), "--limit", "3",
                     "--judge-url", server.url, "--judge-model", "m", "--out", str(tmp_path / "o")]) == 0
        rows = list(_rows(tmp_path / "o" / "samples.jsonl").values())
        assert len(rows) == 3 and all(r["score"] is None and r["answers"] == [] for r in rows)
        assert len(server.requests) == 1  # the health check only
        assert json.loads((tmp_path / "o" / "summary.json").read_text())["n_scored"] == 0
    finally:
        server.close()
