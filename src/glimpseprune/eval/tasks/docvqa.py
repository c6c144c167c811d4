"""DocVQA validation (lmms-eval ``docvqa_val``, 5,349 questions), scored by ANLS.

Expected layout (the ``val`` folder of the Task 1 "Single Page Document VQA" release)::

    DATA_DIR/
      val_v1.0.json            # or val_v1.0_withQT.json: {"data": [{"questionId", "question",
                               #   "image": "documents/xxx.png", "answers": [...], "question_types", "docId"}]}
      documents/pybv0228_81.png

Download: register at https://rrc.cvc.uab.es/?ch=17&com=downloads, get the validation annotations and images of
"Single Page Document Visual Question Answering" and unpack them so that ``image`` paths resolve under DATA_DIR.

Prompt (lmms-eval): ``question + "\\nAnswer the question using a single word or phrase."``; references are all the
answers; ``limit`` takes the first questions in file order.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit, take

FILES = ("val_v1.0.json", "val_v1.0_withQT.json")


class DocVQATask(Task):
    name = "docvqa"
    metric = "anls"
    download = ("Get the DocVQA (Single Page, Task 1) validation set from https://rrc.cvc.uab.es/?ch=17&com=downloads "
                "and unpack it into DATA_DIR (val_v1.0.json and documents/).")

    def prompt(self, sample: Sample) -> str:
        return sample.question + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        qfile = self.first_file(root, FILES)
        rows = self.read_data_list(qfile)
        drafts = []
        for n, q in take(enumerate(rows, 1), limit):
            self.require_keys(q, ["questionId", "question", "image", "answers"], qfile, f"record {n}")
            drafts.append(Sample(
                id=str(q["questionId"]), image_paths=[root / q["image"]], question=q["question"], prompt="",
                answers=[str(a) for a in self.answer_list(q["answers"], qfile, f"record {n}")],
                meta={"doc_id": q.get("docId"), "question_types": q.get("question_types"), "image": q["image"]},
            ))
        return self.finish(drafts)
