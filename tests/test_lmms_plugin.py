"""The lmms-eval plugin: ``--model glimpseprune`` resolves to our class through the ``lmms_eval.models`` entry point,
and a tiny local task (world questions saved with ``datasets``) is evaluated end to end offline, batched, with the
kept-token statistics logged beside the scores."""

from __future__ import annotations

import json
import textwrap

# Not skipped when missing: the README's test command installs lmms-eval (--no-deps) and the `lmms` extra, and this
# test must run in CI.
import lmms_eval  # noqa: F401
import pytest
from lmms_eval.api.instance import Instance

from glimpseprune.assets import resolve_model, resolve_module
from glimpseprune.data.records import write_split
from glimpseprune.eval.lmms_plugin import GlimpsePruneLMMS, clean_context, decoding_kwargs, truncate_at

TASK = "gp_world_tiny"


def test_name_resolves_to_plugin_class():
    from lmms_eval.models import get_model, list_available_models

    assert "glimpseprune" in list_available_models()
    assert get_model("glimpseprune") is GlimpsePruneLMMS


def test_context_and_until_helpers():
    assert clean_context("<image>\nWhat colour is the triangle?") == "What colour is the triangle?"
    assert clean_context("<image 1> <image_2>How many?  ") == "How many?"
    assert truncate_at("red\nmore", ["\n"]) == "red" and truncate_at("red", []) == "red"


def test_generation_kwargs_follow_lmms_eval():
    """Sampling exactly when temperature > 0 (lmms-eval's rule), with top_p / top_k; greedy otherwise (a task's
    temperature 0.7 was decoded greedily and do_sample with temperature 0 sampled at 1.0); beams refused."""
    assert decoding_kwargs({"temperature": 0.7, "top_p": 0.5, "until": ["\n"]}) == \
        {"do_sample": True, "temperature": 0.7, "top_p": 0.5}
    assert decoding_kwargs({"do_sample": True, "temperature": 0, "top_p": None}) == {"do_sample": False}
    assert decoding_kwargs({}) == {"do_sample": False}
    assert decoding_kwargs({"temperature": 1, "top_k": "5", "repetition_penalty": 1.1}) == \
        {"do_sample": True, "temperature": 1.0, "top_k": 5, "repetition_penalty": 1.1}
    assert decoding_kwargs({"num_beams": 1}) == {"do_sample": False}
    with pytest.raises(ValueError, match="num_beams=3: beam search is not supported"):
        decoding_kwargs({"num_beams": 3})


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A task yaml + helper module + a ``datasets`` DatasetDict on disk holding 3 world questions with PIL images."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("lmms_task")
    records = write_split(root / "world", n=3, seed=1)
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    ds = datasets.Dataset.from_dict({
        "image": [Image.open(records.parent / r["image"]).convert("RGB") for r in rows],
        "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
    }, features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                   "answer": datasets.Value("string")}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "gp_world_utils.py").write_text(textwrap.dedent("""
        def doc_to_visual(doc):
            return [doc["image"].convert("RGB")]

        def doc_to_text(doc):
            return "<image>\\n" + doc["question"]
    """))
    (tasks / f"{TASK}.yaml").write_text(textwrap.dedent(f"""
        task: {TASK}
        dataset_path: {root / "data"}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function gp_world_utils.doc_to_visual
        doc_to_text: !function gp_world_utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          until: ["\\n"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: true
    """))
    return tasks


def test_evaluates_tiny_task_offline(task_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    model_args = f"model={resolve_model('embedded')},module={resolve_module('embedded')},max_keep_ratio=0.5"
    results = simple_evaluate(model="glimpseprune", model_args=model_args, tasks=[TASK], batch_size=2,
                              task_manager=TaskManager("WARNING", include_path=str(task_dir)), log_samples=True,
                              verbosity="WARNING", bootstrap_iters=0)
    scores = results["results"][TASK]
    assert 0.0 <= scores["exact_match,none"] <= 1.0
    assert len(results["samples"][TASK]) == 3
    stats = results["throughput"]
    n_vis, n_kept = stats["avg_glimpseprune_n_vis"], stats["avg_glimpseprune_n_kept"]
    assert 1 <= n_kept <= 0.5 * n_vis + 1e-6  # the cap held
    assert 0.0 < stats["avg_glimpseprune_kept_frac"] <= 0.5
    assert stats["avg_glimpseprune_kv_len"] > n_kept  # the cache holds the kept visual tokens + the text


def test_lmms_eval_console_command_runs_the_plugin(task_dir, tmp_path):
    """The command a user types: ``lmms-eval --model glimpseprune --model_args ... --tasks ...`` (the console script
    installed beside this interpreter), end to end, offline; its results file holds the score and our statistics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "lmms-eval"
    assert exe.is_file(), f"the lmms-eval console script is not installed beside {sys.executable}"
    model_args = f"model={resolve_model('embedded')},module={resolve_module('embedded')},max_keep_ratio=0.5"
    r = subprocess.run([str(exe), "--model", "glimpseprune", "--model_args", model_args, "--tasks", TASK,
                        "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(tmp_path / "out"),
                        "--log_samples"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("*_results.json")
    data = json.loads(results.read_text())
    assert 0.0 <= data["results"][TASK]["exact_match,none"] <= 1.0
    assert data["config"]["model"] == "glimpseprune"
    assert "avg_glimpseprune_kept_frac" in r.stdout and "avg_glimpseprune_n_kept" in r.stdout
    (samples,) = (tmp_path / "out").rglob(f"*_samples_{TASK}.jsonl")
    assert len(samples.read_text().splitlines()) == 3


def test_unset_model_args_placeholders_and_visuals():
    from PIL import Image

    from glimpseprune.eval.lmms_plugin import _as_images, _optional

    assert [_optional(v) for v in ("", " None ", "null", None)] == [None] * 4 and _optional("0") == "0"
    assert clean_context("<image1>Which one?") == "Which one?"
    assert clean_context("Look: <image>\nWhat is it? <image_2>\nAnswer briefly.") == \
        "Look:\nWhat is it?\nAnswer briefly."  # no space left dangling before a line break
    assert truncate_at("red. It is\nred", [".", "\n"]) == "red"  # the earliest stop, whatever its order in until
    assert truncate_at("red", ["", "\n"]) == "red"  # an empty stop string cuts nothing
    rgba = Image.new("RGBA", (4, 4))
    out = _as_images([rgba, "a/b.PNG"])
    assert out[0].mode == "RGB" and out[1] == "a/b.PNG" and _as_images(None) == []
    with pytest.raises(ValueError, match="image questions only; got a str visual \\('clip.mp4'\\)"):
        _as_images("clip.mp4")


class _FakePM:
    """Answers ``"<question> END D"`` for each question and records every generate call."""

    processor = None

    def __init__(self):
        self.calls = []

    def generate(self, images, questions, max_new_tokens, **kw):
        from types import SimpleNamespace

        self.calls.append((list(questions), max_new_tokens, kw))
        n = len(questions)
        return SimpleNamespace(texts=[f"{q}? D. END x\nmore" for q in questions], n_kept=[2] * n, n_vis=[8] * n,
                               kv_len=[20] * n)


@pytest.fixture
def fake_lmms(monkeypatch):
    """GlimpsePruneLMMS(**model_args) answering with ``_FakePM`` (no model is loaded)."""
    import glimpseprune
    import glimpseprune.eval.lmms_plugin as plugin

    monkeypatch.setattr(plugin, "_filelock_compat", lambda: None)  # imports lmms_eval.evaluator: slow, not needed
    monkeypatch.setattr(glimpseprune, "load", lambda *a, **k: _FakePM())
    return GlimpsePruneLMMS


def test_batch_size_args(fake_lmms):
    assert fake_lmms().batch_size == 1 and fake_lmms(batch_size="none").batch_size == 1
    assert fake_lmms(batch_size="auto").batch_size == 8
    assert fake_lmms(batch_size="auto:4", max_batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        fake_lmms(batch_size=0)


def test_generate_until_batches_by_generation_kwargs_and_answers_in_request_order(fake_lmms):
    """Requests of one task with two generation settings, interleaved: each batch holds one setting (its
    max_new_tokens and until apply), and every answer goes back to its own request."""
    from PIL import Image

    from glimpseprune.eval.lmms_plugin import _warned

    lm = fake_lmms(batch_size=2, max_new_tokens=9)
    docs = [{"q": f"q{i}"} for i in range(4)]
    lm.task_dict = {"t": {"test": docs}}
    short = {"until": ["\n", "."], "max_new_tokens": 5}
    free = {"until": "END", "temperature": 0.5, "do_sample": True}
    visual = lambda doc: [Image.new("RGB", (4, 4))]  # noqa: E731
    reqs = [Instance("generate_until", (f"<image>\nq{i}", kw, visual, i, "t", "test"), i,
                     {"task": "t", "doc_id": i, "repeats": 1}) for i, kw in enumerate([short, free, short, free])]
    _warned.add("do_sample")
    assert lm.generate_until(reqs) == ["q0? D", "q1? D.", "q2? D", "q3? D."]
    assert lm.pm.calls == [(["q0", "q2"], 5, {"do_sample": False}),
                           (["q1", "q3"], 9, {"do_sample": True, "temperature": 0.5})]
    assert lm.summary() == {"n_kept": 2.0, "n_vis": 8.0, "kv_len": 20.0, "kept_frac": 0.25}
    assert len(lm.records) == 4 and [r["doc_id"] for r in lm.records] == [0, 2, 1, 3]
    assert GlimpsePruneLMMS.summarize([]) == {"n_kept": 0.0, "n_vis": 0.0, "kv_len": 0.0, "kept_frac": 0.0}
