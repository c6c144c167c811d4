"""Benchmark task loaders: a tiny fixture per family in its public release layout, the exact prompts, and the errors
for a missing folder / file, a wrong layout and a missing image."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import glimpseprune.eval.tasks as tasks_mod
from glimpseprune.eval.tasks import (
    METRICS,
    MMBenchTask,
    MMETask,
    Sample,
    Task,
    VisualCoTTask,
    get_task,
    list_tasks,
    register_task,
)

SUFFIX = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def img(path: Path, fmt: str | None = None, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format=fmt)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- registry -----------------------------------------------------------------------------------------------------

def test_registry_lists_every_family():
    names = list_tasks()
    assert names == sorted(names)
    for name in ("visual_cot", "visual_cot_brief", "vqav2", "gqa", "textvqa", "docvqa", "pope", "chartqa", "mme",
                 "scienceqa_img", "mmbench_en_dev", "mmbench_en_test", "mmbench_cn_dev", "mmbench_cn_test",
                 "vizwiz_vqa", "infovqa", "vstar_bench"):
        task = get_task(name)
        assert task.name == name and task.metric in METRICS and task.download
    assert {get_task(n).metric for n in names} == {"judge", "vqa_accuracy", "exact_match", "anls", "pope",
                                                   "relaxed_accuracy", "mme", "choice"}


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known tasks: chartqa, docvqa, gqa"):
        get_task("nope")


def test_register_task_rules(monkeypatch):
    monkeypatch.setattr(tasks_mod, "_TASKS", dict(tasks_mod._TASKS))  # leave the real registry untouched

    class Tiny(Task):
        name = "tiny_test_task"
        metric = "exact_match"

        def load(self, data_dir, limit=None):
            return []

        def prompt(self, sample):
            return sample.question

    assert register_task(Tiny) is Tiny  # a class works as a decorator
    assert isinstance(get_task("tiny_test_task"), Tiny)
    with pytest.raises(ValueError, match="already registered"):
        register_task(Tiny())
    register_task(Tiny(), replace=True)
    bad = Tiny()
    bad.name, bad.metric = "tiny_bad_metric", "bleu"
    with pytest.raises(ValueError, match="metric 'bleu'"):
        register_task(bad)
    with pytest.raises(TypeError):
        register_task(object())


def test_sample_is_frozen():
    s = Sample("1", [], "q", "p", ["a"])
    with pytest.raises(AttributeError):
        s.prompt = "x"  # type: ignore[misc]
    assert s.meta == {}


BUILTIN = ("visual_cot", "visual_cot_brief", "vqav2", "gqa", "textvqa", "docvqa", "pope", "chartqa", "mme",
           "scienceqa_img", "mmbench_en_dev", "mmbench_en_test", "mmbench_cn_dev", "mmbench_cn_test", "vizwiz_vqa",
           "infovqa", "vstar_bench")


def test_missing_data_dir_and_bad_limit(tmp_path):
    for name in BUILTIN:
        with pytest.raises(FileNotFoundError, match="data folder not found"):
            get_task(name).load(tmp_path / "absent")
    with pytest.raises(ValueError, match="limit"):
        get_task("gqa").load(tmp_path, limit=0)


# ---- Visual-CoT ---------------------------------------------------------------------------------------------------

VCOT_REQ = "Please provide the bounding box coordinate of the region that can help you answer the question better."


def vcot_row(ds, qid, rel, question, answer, box=(1, 2, 5, 6)):
    return {"dataset": ds, "split": "val", "question_id": qid, "image": [rel, f"{rel}###{list(box)}"],
            "conversations": [{"from": "human", "value": f"<image>\n{question} {VCOT_REQ}"},
                              {"from": "gpt", "value": "[0.1, 0.2, 0.5, 0.6]"},
                              {"from": "human", "value": "<image>"}, {"from": "gpt", "value": answer}]}


def make_vcot(root: Path, subsets=("gqa", "visual7w")) -> Path:
    bench = root / "viscot_benchmark" / "benchmark"
    if "gqa" in subsets:
        write_json(bench / "gqa.json", [
            vcot_row("gqa", 7, "cot/gqa/2316539.jpg", "What are the tree branches in front of?", "window"),
            vcot_row("gqa", 8, "cot/gqa/2414389.jpg", "What vegetable is above the carrot?", "broccoli"),
        ])
        img(root / "cot/gqa/2316539.jpg")
        img(root / "cot/gqa/val/2414389.jpg")  # upstream's "val" fallback
    if "visual7w" in subsets:
        write_json(bench / "visual7w.json", [
            vcot_row("v7w", 3, "cot/v7w/v7w_1.jpg", "Who is holding the umbrella?", "The woman in red."),
        ])
        img(root / "cot/v7w/v7w_1.jpg")
    return root


def test_visual_cot_loads_benchmark(tmp_path):
    root = make_vcot(tmp_path)
    task = VisualCoTTask(subsets=("gqa", "visual7w"))
    samples = task.load(root)
    assert [s.id for s in samples] == ["gqa-7", "gqa-8", "visual7w-3"]
    assert [s.answers for s in samples] == [["window"], ["broccoli"], ["The woman in red."]]
    assert [s.prompt for s in samples] == ["What are the tree branches in front of?",
                                           "What vegetable is above the carrot?", "Who is holding the umbrella?"]
    assert samples[0].question == samples[0].prompt
    assert samples[0].image_paths == [root / "cot/gqa/2316539.jpg"]
    assert samples[1].image_paths == [root / "cot/gqa/val/2414389.jpg"]
    assert samples[2].meta == {"subset": "visual7w", "dataset": "v7w", "question_id": 3, "split": "val",
                               "bbox": [1.0, 2.0, 5.0, 6.0]}
    assert [s.id for s in task.load(root, limit=1)] == ["gqa-7", "visual7w-3"]  # limit per subset
    brief = VisualCoTTask(brief=True, subsets=("gqa",)).load(root, limit=1)[0]
    assert brief.prompt == ("What are the tree branches in front of?\n\n"
                            "Answer the question using a single word or phrase.")
    assert get_task("visual_cot").metric == "judge"


def test_visual_cot_flat_rows_and_combined_file(tmp_path):
    rows = [{"question": "Is the bird blue?", "answer": "No", "image": "001.Albatross/a.jpg", "dataset": "cub",
             "bboxs": [[1, 1, 4, 4]], "question_id": 5},
            {"question": "Where is the cat?", "answer": "On the mat.", "image": "9.jpg", "dataset": "vsr"}]
    img(tmp_path / "cot/cub/001.Albatross/a.jpg")
    img(tmp_path / "cot/vsr/9.jpg")
    combined = write_jsonl(tmp_path / "bench.jsonl", rows)
    samples = VisualCoTTask(subsets=("cub", "vsr")).load(combined)
    assert [(s.id, s.prompt, s.answers) for s in samples] == [
        ("cub-5", "Is the bird blue?", ["No"]), ("vsr-0", "Where is the cat?", ["On the mat."])]
    assert samples[0].image_paths == [tmp_path / "cot/cub/001.Albatross/a.jpg"]
    with pytest.raises(ValueError, match=r"no rows of the subsets \['gqa'\]"):
        VisualCoTTask(subsets=("cub", "gqa")).load(combined)
    write_jsonl(tmp_path / "b2" / "benchmark" / "cub.jsonl", rows[:1])
    (tmp_path / "b2" / "cot").symlink_to(tmp_path / "cot")
    assert VisualCoTTask(subsets=("cub",)).load(tmp_path / "b2")[0].id == "cub-5"


def test_visual_cot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"benchmark folder.*deepcs233/Visual-CoT"):
        VisualCoTTask().load(tmp_path)
    root = make_vcot(tmp_path / "a", subsets=("gqa",))
    with pytest.raises(FileNotFoundError, match=r"subset file visual7w.json not found"):
        VisualCoTTask(subsets=("gqa", "visual7w")).load(root)
    (root / "cot/gqa/2316539.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image of sample gqa-7 not found at .*cot/gqa/2316539.jpg"):
        VisualCoTTask(subsets=("gqa",)).load(root)
    write_json(tmp_path / "b/benchmark/gqa.json", [{"question_id": 1, "image": ["x.jpg"], "conversations": "hi"}])
    with pytest.raises(ValueError, match="conversations is not a list"):
        VisualCoTTask(subsets=("gqa",)).load(tmp_path / "b")
    write_json(tmp_path / "c/benchmark/gqa.json", [{"image": "x.jpg", "dataset": "gqa"}])
    with pytest.raises(ValueError, match=r"record 1 lacks \['question', 'answer'\]"):
        VisualCoTTask(subsets=("gqa",)).load(tmp_path / "c")


# ---- VQAv2 --------------------------------------------------------------------------------------------------------

def make_vqav2(root: Path) -> Path:
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
        {"image_id": 393225, "question": "Is the bowl full?", "question_id": 393225001},
    ]})
    answers = [["down"] * 7 + ["at table", "skateboard", "table"], ["yes"] * 9 + ["no"]]
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": qid, "image_id": iid, "question_type": qt, "answer_type": at, "multiple_choice_answer": a[0],
         "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a)]}
        for qid, iid, qt, at, a in [(393225001, 393225, "is the", "yes/no", answers[1]),
                                    (262148000, 262148, "where is", "other", answers[0])]]})
    img(root / "val2014/COCO_val2014_000000262148.jpg")
    img(root / "val2014/COCO_val2014_000000393225.jpg")
    return root


def test_vqav2(tmp_path):
    root = make_vqav2(tmp_path)
    samples = get_task("vqav2").load(root)
    assert [s.id for s in samples] == ["262148000", "393225001"]
    assert samples[0].prompt == "Where is he looking?\nAnswer the question using a single word or phrase."
    assert samples[1].prompt == "Is the bowl full?" + SUFFIX
    assert samples[0].answers == ["down"] * 7 + ["at table", "skateboard", "table"]
    assert samples[1].answers == ["yes"] * 9 + ["no"]
    assert samples[0].image_paths == [root / "val2014/COCO_val2014_000000262148.jpg"]
    assert samples[1].meta == {"image_id": 393225, "question_type": "is the", "answer_type": "yes/no",
                               "multiple_choice_answer": "yes"}
    assert len(get_task("vqav2").load(root, limit=1)) == 1


def test_vqav2_errors(tmp_path):
    root = make_vqav2(tmp_path)
    (root / "v2_mscoco_val2014_annotations.json").rename(root / "ann.json")
    with pytest.raises(FileNotFoundError, match=r"annotations file not found.*visualqa.org"):
        get_task("vqav2").load(root)
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": []})
    with pytest.raises(ValueError, match="no annotation for question_id 262148000"):
        get_task("vqav2").load(root)
    write_json(root / "v2_mscoco_val2014_annotations.json", [])
    with pytest.raises(ValueError, match='not in the expected release layout: no "annotations" list'):
        get_task("vqav2").load(root)


# ---- GQA ----------------------------------------------------------------------------------------------------------

def make_gqa(root: Path) -> Path:
    write_json(root / "testdev_balanced_questions.json", {
        "20968379": {"imageId": "n288870", "question": "Do the shorts have dark color?", "answer": "yes",
                     "fullAnswer": "Yes, the shorts are dark.",
                     "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "20968380": {"imageId": "n161313", "question": "Who is wearing the shirt?", "answer": "man",
                     "fullAnswer": "The man is wearing a shirt."},
    })
    img(root / "images/n288870.jpg")
    img(root / "images/n161313.jpg")
    return root


def test_gqa(tmp_path):
    root = make_gqa(tmp_path)
    samples = get_task("gqa").load(root)
    assert [s.id for s in samples] == ["20968379", "20968380"]
    assert [s.answers for s in samples] == [["yes"], ["man"]]
    assert samples[0].prompt == "Do the shorts have dark color?\nAnswer the question using a single word or phrase."
    assert samples[1].image_paths == [root / "images/n161313.jpg"]
    assert samples[0].meta["image_id"] == "n288870" and samples[0].meta["structural"] == "verify"
    assert get_task("gqa").metric == "exact_match"


def test_gqa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"questions file not found at .*testdev_balanced_questions.json"):
        get_task("gqa").load(tmp_path)
    root = make_gqa(tmp_path)
    write_json(root / "testdev_balanced_questions.json", [{"question": "x"}])
    with pytest.raises(ValueError, match="keyed by question id"):
        get_task("gqa").load(root)
    (root / "testdev_balanced_questions.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"gqa: .*testdev_balanced_questions.json is not in the expected release "
                       r"layout: not JSON \("):
        get_task("gqa").load(root)
    (root / "testdev_balanced_questions.json").write_bytes(b'["\xff"]')  # not UTF-8: named the same way
    with pytest.raises(ValueError, match="expected release layout: not JSON"):
        get_task("gqa").load(root)


# ---- TextVQA ------------------------------------------------------------------------------------------------------

def make_textvqa(root: Path) -> Path:
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "answers": ["nous les gosses", "dakota", "clos culombu"] + ["dakota digital"] * 7},
        {"question_id": 34603, "image_id": "0054c91397f2fe05", "question": "What does the SMALL white text say?",
         "answers": ["copenhagen"] * 10},
    ]})
    img(root / "train_images/003a8ae2ef43b901.jpg")
    img(root / "train_images/0054c91397f2fe05.jpg")
    return root


def test_textvqa(tmp_path):
    root = make_textvqa(tmp_path)
    samples = get_task("textvqa").load(root)
    assert [s.id for s in samples] == ["34602", "34603"]
    # lmms-eval applies str.capitalize(): first letter upper, the rest lower
    assert samples[0].prompt == "What is the brand of this camera?\nAnswer the question using a single word or phrase."
    assert samples[1].prompt == "What does the small white text say?" + SUFFIX
    assert samples[1].question == "What does the SMALL white text say?"
    assert samples[0].answers[-1] == "dakota digital" and len(samples[0].answers) == 10
    assert samples[0].image_paths == [root / "train_images/003a8ae2ef43b901.jpg"]


def test_textvqa_errors(tmp_path):
    root = make_textvqa(tmp_path)
    (root / "train_images").rename(root / "imgs")
    with pytest.raises(FileNotFoundError, match=r"image folder train_images/ not found.*train_val_images.zip"):
        get_task("textvqa").load(root)
    (root / "imgs").rename(root / "train_images")
    write_json(root / "TextVQA_0.5.1_val.json", {"questions": []})
    with pytest.raises(ValueError, match='no "data" list'):
        get_task("textvqa").load(root)


# ---- DocVQA -------------------------------------------------------------------------------------------------------

def make_docvqa(root: Path, name="val_v1.0.json") -> Path:
    write_json(root / name, {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
         "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png", "docId": 14465,
         "answers": ["0.28"]},
        {"questionId": 24581, "question": "What is name of university?", "image": "documents/nkbl0226_1.png",
         "docId": 7027, "answers": ["university of california", "University of California"]},
    ]})
    img(root / "documents/pybv0228_81.png")
    img(root / "documents/nkbl0226_1.png")
    return root


def test_docvqa(tmp_path):
    root = make_docvqa(tmp_path)
    samples = get_task("docvqa").load(root)
    assert [s.id for s in samples] == ["49153", "24581"]
    assert samples[0].prompt == ("What is the ‘actual’ value per 1000, during the year 1975?\n"
                                 "Answer the question using a single word or phrase.")
    assert samples[1].answers == ["university of california", "University of California"]
    assert samples[1].image_paths == [root / "documents/nkbl0226_1.png"]
    assert samples[0].meta["question_types"] == ["figure/diagram"]
    assert get_task("docvqa").metric == "anls"
    qt = make_docvqa(tmp_path / "qt", "val_v1.0_withQT.json")
    assert len(get_task("docvqa").load(qt, limit=1)) == 1


def test_docvqa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"annotation file val_v1.0.json.*rrc.cvc.uab.es"):
        get_task("docvqa").load(tmp_path)
    root = make_docvqa(tmp_path)
    (root / "documents/nkbl0226_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image of sample 24581 not found at .*documents/nkbl0226_1.png"):
        get_task("docvqa").load(root)
    write_json(root / "val_v1.0.json", {"data": [{"questionId": 1, "question": "q", "image": "documents/x.png"}]})
    with pytest.raises(ValueError, match=r"record 1 lacks \['answers'\]"):
        get_task("docvqa").load(root)


# ---- POPE ---------------------------------------------------------------------------------------------------------

def make_pope(root: Path, sub: str = "") -> Path:
    for cat, label in (("random", "yes"), ("popular", "no"), ("adversarial", "no")):
        write_jsonl(root / sub / f"coco_pope_{cat}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000210789.jpg", "text": f"Is there a {cat} car in the image? ",
             "label": label},
        ])
    img(root / "val2014/COCO_val2014_000000310196.jpg")
    img(root / "val2014/COCO_val2014_000000210789.jpg")
    return root


def test_pope(tmp_path):
    root = make_pope(tmp_path)
    samples = get_task("pope").load(root)
    assert [s.id for s in samples] == ["random-1", "random-2", "popular-1", "popular-2", "adversarial-1",
                                       "adversarial-2"]
    assert [s.answers for s in samples] == [["yes"], ["yes"], ["yes"], ["no"], ["yes"], ["no"]]
    assert samples[0].prompt == "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
    assert samples[3].prompt == "Is there a popular car in the image?" + SUFFIX  # stripped, as lmms-eval
    assert samples[3].meta == {"category": "popular", "question_id": 2, "image": "COCO_val2014_000000210789.jpg"}
    assert samples[0].image_paths == [root / "val2014/COCO_val2014_000000310196.jpg"]
    assert [s.id for s in get_task("pope").load(root, limit=1)] == ["random-1", "popular-1", "adversarial-1"]
    nested = make_pope(tmp_path / "n", "coco")  # the POPE repository's output/coco/ folder
    assert len(get_task("pope").load(nested)) == 6


def test_pope_errors(tmp_path):
    root = make_pope(tmp_path)
    (root / "coco_pope_adversarial.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"coco_pope_adversarial.json not found.*AoiDragon/POPE"):
        get_task("pope").load(root)
    write_jsonl(root / "coco_pope_adversarial.json", [{"question_id": 1, "image": "x.jpg", "text": "q", "label": "?"}])
    with pytest.raises(ValueError, match="label '\\?' is not yes / no"):
        get_task("pope").load(root)
    (root / "coco_pope_adversarial.json").write_text('{"question_id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        get_task("pope").load(root)


# ---- ChartQA ------------------------------------------------------------------------------------------------------

def make_chartqa(root: Path) -> Path:
    write_json(root / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?", "label": "14"},
        {"imgname": "multi_col_1.png", "query": "What is the difference between the highest and lowest values?",
         "label": "0.57"},
    ])
    write_json(root / "test_augmented.json", [
        {"imgname": "two_col_1.png", "query": "What was the revenue in 2019?", "label": "33.67"},
    ])
    for name in ("41699051005347.png", "multi_col_1.png", "two_col_1.png"):
        img(root / "png" / name)
    return root


def test_chartqa(tmp_path):
    root = make_chartqa(tmp_path)
    samples = get_task("chartqa").load(root)
    assert [s.id for s in samples] == ["human_test-0", "human_test-1", "augmented_test-0"]
    assert [s.answers for s in samples] == [["14"], ["0.57"], ["33.67"]]
    assert samples[0].prompt == "How many food item is shown in the bar graph?\nAnswer the question with a single word."
    assert samples[2].meta == {"type": "augmented_test", "imgname": "two_col_1.png"}
    assert samples[2].image_paths == [root / "png/two_col_1.png"]
    assert [s.id for s in get_task("chartqa").load(root, limit=1)] == ["human_test-0", "augmented_test-0"]
    assert get_task("chartqa").metric == "relaxed_accuracy"


def test_chartqa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"file test_human.json not found.*vis-nlp/ChartQA"):
        get_task("chartqa").load(tmp_path)
    root = make_chartqa(tmp_path)
    write_json(root / "test_augmented.json", {"imgname": "a.png"})
    with pytest.raises(ValueError, match="expected a list of"):
        get_task("chartqa").load(root)
    write_json(root / "test_augmented.json", [{"imgname": "a.png", "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"record 1 lacks \['query', 'label'\]"):
        get_task("chartqa").load(root)


# ---- MME ----------------------------------------------------------------------------------------------------------

MME_SPLIT = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/


def make_mme(root: Path) -> Path:
    rel = root / "MME_Benchmark_release_version"
    for sub in MMETask().subtasks:
        if sub in MME_SPLIT:
            images, qa, ext = rel / sub / "images", rel / sub / "questions_answers_YN", ".jpg"
        else:
            images = qa = rel / sub
            ext = ".png"
        for stem in ("0001", "0002"):
            img(images / f"{stem}{ext}")
            qa.mkdir(parents=True, exist_ok=True)
            (qa / f"{stem}.txt").write_text(
                f"Is this {sub} {stem}? Please answer yes or no.\tYes\n"
                f"Is this not {sub} {stem}? Please answer yes or no.\tNo\n")
    return root


def test_mme(tmp_path):
    root = make_mme(tmp_path)
    samples = get_task("mme").load(root)
    assert len(samples) == 14 * 2 * 2
    assert [s.id for s in samples[:4]] == ["existence/0001.png#0", "existence/0001.png#1", "existence/0002.png#0",
                                           "existence/0002.png#1"]
    assert samples[0].prompt == "Is this existence 0001?\nAnswer the question using a single word or phrase."
    assert samples[0].question == "Is this existence 0001? Please answer yes or no."
    assert [s.answers for s in samples[:2]] == [["Yes"], ["No"]]
    assert samples[1].meta == {"category": "existence", "group": "perception", "image_id": "existence/0001.png"}
    art = [s for s in samples if s.meta["category"] == "artwork"]
    assert art[0].image_paths == [root / "MME_Benchmark_release_version/artwork/images/0001.jpg"]
    assert art[0].prompt == "Is this artwork 0001?" + SUFFIX
    assert samples[-1].meta["group"] == "cognition" and samples[-1].meta["category"] == "code_reasoning"
    # the release folder itself also works; limit is per subtask, rounded up to whole images
    limited = get_task("mme").load(root / "MME_Benchmark_release_version", limit=1)
    assert len(limited) == 14 * 2 and limited[1].id == "existence/0001.png#1"


def test_mme_errors(tmp_path):
    root = make_mme(tmp_path)
    rel = root / "MME_Benchmark_release_version"
    (rel / "OCR").rename(rel / "ocr_old")
    with pytest.raises(FileNotFoundError, match=r"subtask folder OCR/ not found.*MME_Benchmark_release_version"):
        get_task("mme").load(root)
    (rel / "ocr_old").rename(rel / "OCR")
    (rel / "artwork/questions_answers_YN").rename(rel / "artwork/qa")
    with pytest.raises(FileNotFoundError, match=r"artwork/questions_answers_YN/ not found"):
        get_task("mme").load(root)
    (rel / "artwork/qa").rename(rel / "artwork/questions_answers_YN")
    (rel / "count/0002.txt").write_text("Is there one? Please answer yes or no.\tMaybe\n")
    with pytest.raises(ValueError, match=r"0002.txt.*line 1 is not"):
        get_task("mme").load(root)
    (rel / "count/0002.txt").write_text("Is there one?\tNo\n")
    (rel / "count/0002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no image 0002.jpg / .png for .*count/0002.txt"):
        get_task("mme").load(root)


# ---- ScienceQA-IMG ------------------------------------------------------------------------------------------------

def make_sqa(root: Path) -> Path:
    base = {"task": "closed choice", "grade": "grade2", "subject": "natural science", "topic": "geography",
            "category": "Geography", "skill": "Read a map", "lecture": "", "solution": ""}
    write_json(root / "problems.json", {
        "5": {**base, "question": "Which of these states is farthest north?",
              "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0, "hint": "",
              "image": "image.png", "split": "test"},
        "6": {**base, "question": "Which tense does the sentence use?", "choices": ["past", "future"], "answer": 1,
              "hint": "Mona will print her name.", "image": None, "split": "test"},
        "7": {**base, "question": "Identify the question that Tom's experiment can best answer.",
              "choices": ["Does Tom's snowboard slide faster?", "Do snowboards slide down a hill faster?"],
              "answer": 1, "hint": "People can use the engineering-design process.", "image": "image.png",
              "split": "test"},
        "8": {**base, "question": "Train only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "split": "train"},
    })
    write_json(root / "pid_splits.json", {"train": ["8"], "val": [], "test": ["5", "6", "7"]})
    img(root / "images/test/5/image.png")
    img(root / "images/test/7/image.png")
    return root


def test_scienceqa_img(tmp_path):
    root = make_sqa(tmp_path)
    samples = get_task("scienceqa_img").load(root)
    assert [s.id for s in samples] == ["5", "7"]  # problem 6 has no image
    assert [s.answers for s in samples] == [["A"], ["B"]]
    assert samples[0].prompt == ("Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\n"
                                 "C. Arizona\nD. Oklahoma\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert samples[1].prompt == ("Context: People can use the engineering-design process.\n"
                                 "Identify the question that Tom's experiment can best answer.\n"
                                 "A. Does Tom's snowboard slide faster?\nB. Do snowboards slide down a hill faster?"
                                 + LETTER)
    assert samples[1].image_paths == [root / "images/test/7/image.png"]
    assert samples[0].meta["choices"] == {"A": "West Virginia", "B": "Louisiana", "C": "Arizona", "D": "Oklahoma"}
    assert samples[0].meta["subject"] == "natural science"
    assert [s.id for s in get_task("scienceqa_img").load(root, limit=1)] == ["5"]


def test_scienceqa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"problems file not found.*lupantech/ScienceQA"):
        get_task("scienceqa_img").load(tmp_path)
    root = make_sqa(tmp_path)
    write_json(root / "pid_splits.json", {"train": ["8"]})
    with pytest.raises(ValueError, match='no "test" list of problem ids'):
        get_task("scienceqa_img").load(root)
    write_json(root / "pid_splits.json", {"test": ["5", "99"]})
    with pytest.raises(ValueError, match="no problem 99"):
        get_task("scienceqa_img").load(root)


# ---- MMBench ------------------------------------------------------------------------------------------------------

def b64_image(fmt: str, color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def make_mmbench(root: Path, name="MMBench_DEV_EN.tsv", answers=True) -> Path:
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
            "split"]
    if not answers:
        cols.remove("answer")
    rows = [
        {"index": "0", "question": "What is the main color?", "hint": "", "A": "red", "B": "blue", "C": "", "D": "",
         "answer": "A", "category": "color", "image": b64_image("PNG", (255, 0, 0)), "source": "s",
         "l2-category": "attribute", "split": "dev"},
        {"index": "1", "question": "Which one is correct?", "hint": "The picture shows a \"quoted\" sign.",
         "A": "yes", "B": "no", "C": "maybe", "D": "nan", "answer": "C", "category": "ocr",
         "image": b64_image("JPEG", (0, 0, 255)), "source": "s", "l2-category": "text", "split": "dev"},
        {"index": "1000000", "question": "What is the main color?", "hint": "nan", "A": "blue", "B": "red", "C": "",
         "D": "", "answer": "B", "category": "color", "image": "0", "source": "s", "l2-category": "attribute",
         "split": "dev"},
    ]

    def cell(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if '"' in v or "\t" in v else v

    lines = ["\t".join(cols)] + ["\t".join(cell(r[c]) for c in cols) for r in rows]
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_mmbench_en(tmp_path):
    root = make_mmbench(tmp_path)
    samples = get_task("mmbench_en_dev").load(root)
    assert [s.id for s in samples] == ["0", "1", "1000000"]
    assert [s.answers for s in samples] == [["A"], ["C"], ["B"]]
    assert samples[0].prompt == ("What is the main color? There are several options:\nA. red\nB. blue\n"
                                 "\nAnswer with the option's letter from the given choices directly.")
    assert samples[1].prompt == ("The picture shows a \"quoted\" sign. Which one is correct? There are several options:"
                                 "\nA. yes\nB. no\nC. maybe\n" + LETTER)
    assert samples[2].prompt == "What is the main color? There are several options:\nA. blue\nB. red\n" + LETTER
    assert samples[1].meta["choices"] == {"A": "yes", "B": "no", "C": "maybe"}
    assert samples[2].meta["circular_index"] == 0 and samples[1].meta["category"] == "ocr"
    assert samples[1].meta["l2_category"] == "text"
    decoded = root / "_decoded/_images/MMBench_DEV_EN"
    assert samples[0].image_paths == [decoded / "0.png"]
    assert samples[1].image_paths == [decoded / "1.jpg"]
    assert samples[2].image_paths == [decoded / "0.png"]  # shares row 0's picture
    assert Image.open(decoded / "1.jpg").size == (8, 6)
    mtime = (decoded / "0.png").stat().st_mtime_ns
    cache = tmp_path / "cache"
    again = get_task("mmbench_en_dev").load(root, limit=1, cache_dir=cache)
    assert again[0].image_paths == [cache / "_images/MMBench_DEV_EN/0.png"]
    assert (decoded / "0.png").stat().st_mtime_ns == mtime


def test_mmbench_cn_and_test_split(tmp_path):
    root = make_mmbench(tmp_path, "MMBench_TEST_CN.tsv", answers=False)
    samples = get_task("mmbench_cn_test").load(root)
    assert samples[0].answers == []
    assert samples[0].prompt == ("What is the main color? There are several options:\nA. red\nB. blue\n"
                                 "\n请直接使用所提供的选项字母作为答案回答。")
    with pytest.raises(ValueError, match="lang en / cn"):
        MMBenchTask("fr", "dev")


def test_mmbench_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"TSV file MMBench_DEV_EN.tsv not found.*open-compass/MMBench"):
        get_task("mmbench_en_dev").load(tmp_path)
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("index\tquestion\tA\tB\n0\tq\ta\tb\n")
    with pytest.raises(ValueError, match=r"header lacks the columns \['image'\]"):
        get_task("mmbench_en_dev").load(tmp_path)
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("index\tquestion\tA\tB\timage\n0\tq\ta\tb\tnot-base64!\n")
    with pytest.raises(ValueError, match="image is not base64"):
        get_task("mmbench_en_dev").load(tmp_path)
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("index\tquestion\tA\tB\timage\n0\tq\ta\n")
    with pytest.raises(ValueError, match="row 1 does not have one value per header column"):
        get_task("mmbench_en_dev").load(tmp_path)
    (tmp_path / "MMBench_DEV_EN.tsv").write_text(
        f"index\tquestion\tA\tB\timage\n../x\tq\ta\tb\t{b64_image('PNG', 0)}\n")
    with pytest.raises(ValueError, match="is not a plain number"):
        get_task("mmbench_en_dev").load(tmp_path)
    (tmp_path / "MMBench_DEV_EN.tsv").write_text(
        f"index\tquestion\tA\tB\tanswer\timage\n0\tq\ta\tb\tE\t{b64_image('PNG', 0)}\n")
    with pytest.raises(ValueError, match="answer 'E' is not an option"):
        get_task("mmbench_en_dev").load(tmp_path)


# ---- VizWiz ---------------------------------------------------------------------------------------------------------

def make_vizwiz(root: Path) -> Path:
    ans = lambda *xs: [{"answer": x, "answer_confidence": "yes"} for x in xs]  # noqa: E731
    write_json(root / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "what is this can of?",
         "answers": ans(*["soup"] * 7, "tomato soup", "unanswerable", "soup can"), "answer_type": "other",
         "answerable": 1},
        {"image": "VizWiz_val_00000001.jpg", "question": "What color is this?",
         "answers": ans(*["unanswerable"] * 10), "answer_type": "unanswerable", "answerable": 0},
    ])
    img(root / "val/VizWiz_val_00000000.jpg")
    img(root / "val/VizWiz_val_00000001.jpg")
    return root


def test_vizwiz(tmp_path):
    from glimpseprune.eval.metrics import vqa_accuracy

    root = make_vizwiz(tmp_path)
    samples = get_task("vizwiz_vqa").load(root)
    assert [s.id for s in samples] == ["VizWiz_val_00000000", "VizWiz_val_00000001"]
    assert samples[0].prompt == ("What is this can of?\nWhen the provided information is insufficient, respond with "
                                 "'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert len(samples[0].answers) == 10 and samples[0].image_paths == [root / "val/VizWiz_val_00000000.jpg"]
    assert samples[1].meta["category"] == "unanswerable"
    assert vqa_accuracy("Unanswerable", samples[1].answers) == 1.0 and vqa_accuracy("soup", samples[0].answers) == 1.0
    (root / "val").rename(root / "imgs")
    with pytest.raises(FileNotFoundError, match="image folder val/ not found.*vizwiz.org"):
        get_task("vizwiz_vqa").load(root)


# ---- InfographicVQA ------------------------------------------------------------------------------------------------

def make_infovqa(root: Path) -> Path:
    write_json(root / "infographicsVQA_val_v1.0_withQT.json", {"dataset_name": "infographicVQA", "data": [
        {"questionId": 98313, "question": "Which social platform has heavy female audience?",
         "image_local_name": "37313.jpeg", "image_url": "https://example/37313.jpeg", "answers": ["pinterest"],
         "answer_type": ["single span"], "data_split": "val"},
        {"questionId": 98314, "question": "What percentage of men use Twitter?", "image_local_name": "37313.jpeg",
         "answers": ["24%", "24"], "answer_type": ["single span"], "data_split": "val"},
    ]})
    img(root / "infographicsvqa_images/37313.jpeg")
    return root


def test_infovqa(tmp_path):
    root = make_infovqa(tmp_path)
    samples = get_task("infovqa").load(root)
    assert [s.id for s in samples] == ["98313", "98314"] and get_task("infovqa").metric == "anls"
    assert samples[0].prompt == ("Which social platform has heavy female audience?\n"
                                 "Answer the question using a single word or phrase.")
    assert samples[1].answers == ["24%", "24"]
    assert samples[0].image_paths == [root / "infographicsvqa_images/37313.jpeg"]
    assert len(get_task("infovqa").load(root, limit=1)) == 1
    (root / "infographicsVQA_val_v1.0_withQT.json").unlink()
    with pytest.raises(FileNotFoundError, match="infographicsVQA_val_v1.0_withQT.json"):
        get_task("infovqa").load(root)


# ---- V* -------------------------------------------------------------------------------------------------------------

def make_vstar(root: Path) -> Path:
    write_jsonl(root / "test_questions.jsonl", [
        {"image": "direct_attributes/sa_4690.jpg", "text": "What is the material of the glove?\n(A) rubber\n"
         "(B) cotton\n(C) leather\n(D) polyester\nAnswer with the option's letter from the given choices directly.",
         "category": "direct_attributes", "question_id": 0, "label": "A"},
        {"image": "relative_position/sa_100.jpg", "text": "Is the dog on the left or right side of the bike?\n"
         "(A) The dog is on the left side of the bike.\n(B) The dog is on the right side of the bike.",
         "category": "relative_position", "question_id": 1, "label": "B"},
    ])
    img(root / "direct_attributes/sa_4690.jpg")
    img(root / "relative_position/sa_100.jpg")
    return root


def test_vstar(tmp_path):
    from glimpseprune.eval.runner import score

    root = make_vstar(tmp_path)
    task = get_task("vstar_bench")
    samples = task.load(root)
    assert samples[0].prompt == ("What is the material of the glove?\nA. rubber\nB. cotton\nC. leather\n"
                                 "D. polyester\nAnswer with the option's letter from the given choices directly.")
    assert samples[0].prompt.count("Answer with the option") == 1  # the release's own copy is not repeated
    assert samples[1].meta["choices"] == ["The dog is on the left side of the bike.",
                                          "The dog is on the right side of the bike."]
    assert [s.meta["category"] for s in samples] == ["direct_attributes", "relative_position"]
    assert score(task, samples[0], "A") == 1.0 and score(task, samples[0], "B. cotton") == 0.0
    assert score(task, samples[1], "B") == 1.0
    write_jsonl(root / "test_questions.jsonl", [{"image": "direct_attributes/sa_4690.jpg", "text": "No options?",
                                                 "label": "A"}])
    with pytest.raises(ValueError, match="no \\(A\\)/\\(B\\) options"):
        task.load(root)


def test_vstar_options_may_hold_parentheses():
    from glimpseprune.eval.tasks.vstar import split_options

    assert split_options("Q?\n(A) red (dark)\n(B) blue\n(C) green (C) or teal\n(D) white") == \
        ("Q?", ["red (dark)", "blue", "green (C) or teal", "white"])
    assert split_options("Q? (A) x (B) y") == ("Q?", ["x", "y"])
    assert split_options("no options here") == ("no options here", [])


def test_a_test_split_keeps_predictions_unscored(tmp_path):
    """MMBench's test TSV has no answers: every prediction is kept for the submission server, none is scored (the
    run failed with an IndexError after its first batch)."""
    from glimpseprune.cli import main

    root = make_mmbench(tmp_path / "d", "MMBench_TEST_EN.tsv", answers=False)
    assert main(["eval", "--task", "mmbench_en_test", "--data", str(root), "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["score"] is None and isinstance(r["prediction"], str) for r in rows)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["n"] == len(rows) and summary["n_scored"] == 0


def test_chartqa_summary_has_its_split_scores():
    from glimpseprune.eval.runner import summarize_task

    def row(split, score):
        return {"meta": {"type": split}, "score": score, "kept_frac": 0.5, "kv_len": 10, "prefill_ms": 1.0,
                "decode_ms": 1.0}

    summary = summarize_task(get_task("chartqa"), [row("human_test", 1.0), row("human_test", 0.0),
                                                   row("augmented_test", 1.0)])
    assert summary["per_category"] == {"augmented_test": {"n": 1, "score": 1.0}, "human_test": {"n": 2, "score": 0.5}}
    assert summary["score"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("task, make, name", [("textvqa", make_textvqa, "TextVQA_0.5.1_val.json"),
                                              ("docvqa", make_docvqa, "val_v1.0.json"),
                                              ("infovqa", make_infovqa, "infographicsVQA_val_v1.0_withQT.json")])
def test_answers_as_a_string_and_a_question_that_is_no_text_are_refused(tmp_path, task, make, name):
    """``"answers": "red"`` was read one character per reference answer (r, e, d), a silent wrong score; a question
    that is a number failed later as an internal error."""
    root = make(tmp_path)
    data = json.loads((root / name).read_text())
    data["data"][0]["answers"] = "red"
    write_json(root / name, data)
    with pytest.raises(ValueError, match=r"record 1: answers must be a list, got 'red'"):
        get_task(task).load(root)
    data["data"][0]["answers"] = ["red"]
    data["data"][0]["question"] = 5
    write_json(root / name, data)
    with pytest.raises(ValueError, match=rf"{task}: sample .*: the question must be non-empty text, got 5"):
        get_task(task).load(root)


def test_summary_groups_by_subset_before_category_and_averages_times():
    """Visual-CoT rows carry a subset and a category: the breakdown is by subset (the paper's table); times are the
    mean of the rows' per-sample milliseconds."""
    from glimpseprune.eval.runner import summarize_task

    def row(meta, score, ms):
        return {"meta": meta, "score": score, "kept_frac": 0.5, "kv_len": 10, "prefill_ms": ms, "decode_ms": 2 * ms}

    rows = [row({"subset": "docvqa", "category": "text"}, 1.0, 10.0),
            row({"subset": "gqa", "category": "text"}, 0.0, 20.0),
            row({"category": "scene"}, 1.0, 30.0)]
    summary = summarize_task(get_task("textvqa"), rows)
    assert summary["per_category"] == {"docvqa": {"n": 1, "score": 1.0}, "gqa": {"n": 1, "score": 0.0},
                                       "scene": {"n": 1, "score": 1.0}}
    assert summary["ms_per_sample"] == {"prefill": pytest.approx(20.0), "decode": pytest.approx(40.0)}


# ---- loader edge cases of the public releases --------------------------------------------------------------------

def test_pope_reads_one_question_files_blank_lines_jsonl_and_capitalised_labels(tmp_path):
    """A POPE file of one JSON line parses as one object (not a list), blank lines between records are skipped, a
    ``.jsonl`` name is found, and a label ``"Yes "`` is read as ``yes``."""
    root = make_pope(tmp_path)
    q = {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog?"}
    write_jsonl(root / "coco_pope_random.json", [{**q, "label": "Yes "}])  # one line: a JSON object
    (root / "coco_pope_popular.json").write_text(json.dumps({**q, "label": "no"}) + "\n\n  \n"
                                                 + json.dumps({**q, "question_id": 2, "label": "NO"}) + "\n")
    (root / "coco_pope_adversarial.json").rename(root / "coco_pope_adversarial.jsonl")
    samples = get_task("pope").load(root)
    assert [(s.id, s.answers) for s in samples] == [
        ("random-1", ["yes"]), ("popular-1", ["no"]), ("popular-2", ["no"]), ("adversarial-1", ["yes"]),
        ("adversarial-2", ["no"])]


def test_a_blank_question_is_refused(tmp_path):
    root = make_gqa(tmp_path)
    data = json.loads((root / "testdev_balanced_questions.json").read_text())
    data["20968380"]["question"] = "  "
    write_json(root / "testdev_balanced_questions.json", data)
    with pytest.raises(ValueError, match=r"gqa: sample 20968380: the question must be non-empty text, got '  '"):
        get_task("gqa").load(root)


def test_mmbench_row_with_a_single_option_is_refused(tmp_path):
    (tmp_path / "MMBench_DEV_EN.tsv").write_text(
        f"index\tquestion\tA\tB\tanswer\timage\n0\tq\tonly\t\tA\t{b64_image('PNG', 0)}\n")
    with pytest.raises(ValueError, match=r"row 1 \(index 0\) has fewer than two options"):
        get_task("mmbench_en_dev").load(tmp_path)


def test_mme_question_file_without_questions_is_refused(tmp_path):
    root = make_mme(tmp_path)
    (root / "MME_Benchmark_release_version/count/0002.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"count/0002.txt is not in the expected release layout: no question lines"):
        get_task("mme").load(root)


def test_scienceqa_answer_index_past_the_choices_is_refused(tmp_path):
    root = make_sqa(tmp_path)
    problems = json.loads((root / "problems.json").read_text())
    problems["7"]["answer"] = 2  # two choices: indices 0 and 1
    write_json(root / "problems.json", problems)
    with pytest.raises(ValueError, match="problem 7: answer 2 is not a choice index"):
        get_task("scienceqa_img").load(root)


def test_visual_cot_flat_row_keeps_its_box():
    task = VisualCoTTask(subsets=("cub",))
    row = {"question": "Is the bird blue?", "answer": "No", "image": "a.jpg", "bboxs": [[1, 2, 30, 40], [0, 0, 1, 1]]}
    sample = task._sample("cub", row, Path("cub.jsonl"), 3, Path("/nowhere"))
    assert sample.id == "cub-2" and sample.meta["bbox"] == [1.0, 2.0, 30.0, 40.0]  # the first box, as floats


def test_vstar_label_case_category_fallback_and_single_option(tmp_path):
    from glimpseprune.eval.runner import score

    root = make_vstar(tmp_path)
    write_jsonl(root / "test_questions.jsonl", [
        {"image": "direct_attributes/sa_4690.jpg", "text": "What colour is the cup?\n(A) red\n(B) blue",
         "question_id": 7, "label": " b"}])
    (sample,) = get_task("vstar_bench").load(root)
    assert sample.answers == ["B"] and sample.meta["category"] == "direct_attributes"
    assert score(get_task("vstar_bench"), sample, "B") == 1.0
    write_jsonl(root / "test_questions.jsonl", [
        {"image": "direct_attributes/sa_4690.jpg", "text": "What colour is the cup?\n(A) red", "label": "A"}])
    with pytest.raises(ValueError, match=r"line 1 has no \(A\)/\(B\) options"):
        get_task("vstar_bench").load(root)



def test_mme_limit_counts_whole_images(tmp_path):
    """limit=2 is reached exactly by the first image's two questions (one image per subtask); limit=3 is passed
    only after the second image."""
    root = make_mme(tmp_path)
    two = get_task("mme").load(root, limit=2)
    assert len(two) == 14 * 2 and {s.meta["image_id"].split("/")[1] for s in two} == {"0001.png", "0001.jpg"}
    assert len(get_task("mme").load(root, limit=3)) == 14 * 4


def test_a_missing_video_frame_is_named(tmp_path):
    from glimpseprune.data.world_video import write_video_split

    records = write_video_split(tmp_path / "vw", n=1, seed=3)
    row = json.loads(records.read_text().splitlines()[0])
    (records.parent / row["frames"][1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"world_video: image of sample {row['id']} not found at .*"
                                                 rf"{Path(row['frames'][1]).name}"):
        get_task("world_video").load(tmp_path / "vw")
