"""TextVQA validation (lmms-eval ``textvqa_val``, 5,000 questions).

Expected layout::

    DATA_DIR/
      TextVQA_0.5.1_val.json          # {"data": [{"question_id", "image_id", "question", "answers": [10 strings]}]}
      train_images/003a8ae2ef43b901.jpg   # train_images/{image_id}.jpg (the validation images live there)

Download: https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json and
https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip (unzip into DATA_DIR, giving train_images/).

Prompt (lmms-eval, no OCR tokens): ``question.capitalize() + "\\nAnswer the question using a single word or
phrase."`` -- lmms-eval applies Python's ``str.capitalize`` (first letter upper, the rest lower case) and so do we.
References are the ten answers (VQA accuracy); ``limit`` takes the first questions in file order.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit, take

QUESTIONS = "TextVQA_0.5.1_val.json"


class TextVQATask(Task):
    name = "textvqa"
    metric = "vqa_accuracy"
    download = (f"Put {QUESTIONS} (https://dl.fbaipublicfiles.com/textvqa/data/{QUESTIONS}) in DATA_DIR and unzip "
                "https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip there (train_images/).")

    def prompt(self, sample: Sample) -> str:
        return sample.question.capitalize() + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        qfile = self.need_file(root / QUESTIONS, "questions file")
        images = self.need_dir(root / "train_images", "image folder train_images/")
        rows = self.read_data_list(qfile)
        drafts = []
        for n, q in take(enumerate(rows, 1), limit):
            self.require_keys(q, ["question_id", "image_id", "question", "answers"], qfile, f"record {n}")
            drafts.append(Sample(
                id=str(q["question_id"]), image_paths=[images / f"{q['image_id']}.jpg"], question=q["question"],
                prompt="", answers=[str(a) for a in self.answer_list(q["answers"], qfile, f"record {n}")],
                meta={"image_id": q["image_id"], "image_classes": q.get("image_classes")},
            ))
        return self.finish(drafts)
