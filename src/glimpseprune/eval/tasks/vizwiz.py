"""VizWiz-VQA validation (lmms-eval ``vizwiz_vqa_val``, 4,319 questions), scored by VQA accuracy.

Expected layout (the VizWiz VQA release)::

    DATA_DIR/
      val.json                 # [{"image": "VizWiz_val_00000000.jpg", "question": "...",
                               #   "answers": [{"answer": "...", "answer_confidence": "yes"}, ... (10)],
                               #   "answer_type": "other", "answerable": 1}]
      val/VizWiz_val_00000000.jpg

Download: https://vizwiz.org/tasks-and-datasets/vqa/ (Annotations.zip gives val.json, val.zip the images).

Prompt (lmms-eval): ``question.capitalize() + "\\nWhen the provided information is insufficient, respond with
'Unanswerable'.\\nAnswer the question using a single word or phrase."``; references are the ten answers (VQA accuracy
with the official normalisation, so "unanswerable" is an answer like any other); ``limit`` takes the first questions
in file order.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit, take

ANNOTATIONS = "val.json"
UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."


class VizWizTask(Task):
    name = "vizwiz_vqa"
    metric = "vqa_accuracy"
    download = ("Get the VizWiz VQA release from https://vizwiz.org/tasks-and-datasets/vqa/: val.json "
                "(Annotations.zip) in DATA_DIR and the validation images (val.zip) in DATA_DIR/val/.")

    def prompt(self, sample: Sample) -> str:
        return sample.question.capitalize() + UNANSWERABLE + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        qfile = root / ANNOTATIONS
        rows = self.read_json(qfile)
        if not isinstance(rows, list):
            raise self.format_error(qfile, "not a list of questions")
        images = self.need_dir(root / "val", "image folder val/")
        drafts = []
        for n, q in take(enumerate(rows, 1), limit):
            self.require_keys(q, ["image", "question", "answers"], qfile, f"question {n}")
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in q["answers"]]
            drafts.append(Sample(
                id=Path(q["image"]).stem, image_paths=[images / q["image"]], question=q["question"], prompt="",
                answers=answers, meta={"category": q.get("answer_type"), "answerable": q.get("answerable")},
            ))
        return self.finish(drafts)
