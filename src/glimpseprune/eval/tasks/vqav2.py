"""VQAv2 validation (lmms-eval ``vqav2_val``; upstream ran its 500-question ``vqav2_val_lite`` subset, whose
selection lives only in lmms-eval's Hugging Face copy, so use ``limit`` or the full split here).

Expected layout::

    DATA_DIR/
      v2_OpenEnded_mscoco_val2014_questions.json   # {"questions": [{"question_id", "image_id", "question"}]}
      v2_mscoco_val2014_annotations.json           # {"annotations": [{"question_id", "answers": [10 x {"answer"}],
                                                   #   "question_type", "answer_type", "multiple_choice_answer"}]}
      val2014/COCO_val2014_000000393225.jpg        # COCO_val2014_%012d.jpg of image_id

Download: "Validation questions" and "Validation annotations" of https://visualqa.org/download.html (unzip into
DATA_DIR) and the COCO 2014 validation images http://images.cocodataset.org/zips/val2014.zip (unzip to
DATA_DIR/val2014/).

Prompt (lmms-eval): ``question + "\\nAnswer the question using a single word or phrase."``; references are the ten
human answers (VQA accuracy); ``limit`` takes the first questions of the questions file.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit, take

QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


class VQAv2Task(Task):
    name = "vqav2"
    metric = "vqa_accuracy"
    download = (f"Put {QUESTIONS} and {ANNOTATIONS} (https://visualqa.org/download.html) in DATA_DIR and the COCO "
                "val2014 images (http://images.cocodataset.org/zips/val2014.zip) in DATA_DIR/val2014/.")

    def prompt(self, sample: Sample) -> str:
        return sample.question + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        qfile, afile = root / QUESTIONS, root / ANNOTATIONS
        self.need_file(qfile, "questions file")
        self.need_file(afile, "annotations file")
        images = self.need_dir(root / "val2014", "COCO val2014 image folder")
        qdata, adata = self.read_json(qfile), self.read_json(afile)
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise self.format_error(qfile, 'no "questions" list')
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise self.format_error(afile, 'no "annotations" list')
        anns = {}
        for n, a in enumerate(adata["annotations"], 1):
            self.require_keys(a, ["question_id", "answers"], afile, f"annotation {n}")
            anns[a["question_id"]] = a
        drafts = []
        for n, q in take(enumerate(qdata["questions"], 1), limit):
            self.require_keys(q, ["question_id", "image_id", "question"], qfile, f"question {n}")
            ann = anns.get(q["question_id"])
            if ann is None:
                raise self.format_error(afile, f"no annotation for question_id {q['question_id']}")
            drafts.append(Sample(
                id=str(q["question_id"]), image_paths=[images / f"COCO_val2014_{int(q['image_id']):012d}.jpg"],
                question=q["question"], prompt="", answers=[str(a["answer"]) for a in ann["answers"]],
                meta={"image_id": q["image_id"], "question_type": ann.get("question_type"),
                      "answer_type": ann.get("answer_type"),
                      "multiple_choice_answer": ann.get("multiple_choice_answer")},
            ))
        return self.finish(drafts)
