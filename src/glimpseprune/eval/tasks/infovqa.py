"""InfographicVQA validation (lmms-eval ``infovqa_val``, 2,801 questions), scored by ANLS.

Expected layout (the "Infographics VQA" release of the DocVQA challenge)::

    DATA_DIR/
      infographicsVQA_val_v1.0_withQT.json   # {"data": [{"questionId", "question", "image_local_name": "37313.jpeg",
                                             #   "answers": [...], "answer_type", ...}]}  (or ..._val_v1.0.json)
      infographicsvqa_images/37313.jpeg

Download: register at https://rrc.cvc.uab.es/?ch=17&com=downloads, get the Infographics VQA validation annotations
and images (infographicsvqa_images.tar.gz) and unpack them into DATA_DIR.

Prompt (lmms-eval): ``question + "\\nAnswer the question using a single word or phrase."``; references are all the
answers; ``limit`` takes the first questions in file order.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit, take

FILES = ("infographicsVQA_val_v1.0_withQT.json", "infographicsVQA_val_v1.0.json")
IMAGES = "infographicsvqa_images"


class InfoVQATask(Task):
    name = "infovqa"
    metric = "anls"
    download = ("Get the Infographics VQA validation set from https://rrc.cvc.uab.es/?ch=17&com=downloads and unpack "
                f"it into DATA_DIR ({FILES[0]} and {IMAGES}/).")

    def prompt(self, sample: Sample) -> str:
        return sample.question + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        qfile = self.first_file(root, FILES)
        rows = self.read_data_list(qfile)
        images = self.need_dir(root / IMAGES, f"image folder {IMAGES}/")
        drafts = []
        for n, q in take(enumerate(rows, 1), limit):
            self.require_keys(q, ["questionId", "question", "image_local_name", "answers"], qfile, f"record {n}")
            drafts.append(Sample(
                id=str(q["questionId"]), image_paths=[images / q["image_local_name"]], question=q["question"],
                prompt="", answers=[str(a) for a in self.answer_list(q["answers"], qfile, f"record {n}")],
                meta={"answer_type": q.get("answer_type"), "image": q["image_local_name"]},
            ))
        return self.finish(drafts)
