"""GQA test-dev balanced (lmms-eval ``gqa``, 12,578 questions).

Expected layout::

    DATA_DIR/
      testdev_balanced_questions.json   # {"<question id>": {"imageId", "question", "answer", "fullAnswer",
                                        #                     "types": {"structural", "semantic", "detailed"}, ...}}
      images/n161313.jpg                # images/{imageId}.jpg

Download: "Questions" (questions1.2.zip; take ``testdev_balanced_questions.json``) and "Images" (images.zip) from
https://cs.stanford.edu/people/dorarad/gqa/download.html, both unzipped into DATA_DIR.

Prompt (lmms-eval): ``question + "\\nAnswer the question using a single word or phrase."``; the reference is the
one short answer, scored by exact match; ``limit`` takes the first questions in file order.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit, take

QUESTIONS = "testdev_balanced_questions.json"


class GQATask(Task):
    name = "gqa"
    metric = "exact_match"
    download = (f"Put {QUESTIONS} (questions1.2.zip) and images/ (images.zip) from "
                "https://cs.stanford.edu/people/dorarad/gqa/download.html in DATA_DIR.")

    def prompt(self, sample: Sample) -> str:
        return sample.question + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        qfile = self.need_file(root / QUESTIONS, "questions file")
        images = self.need_dir(root / "images", "image folder")
        data = self.read_json(qfile)
        if not isinstance(data, dict):
            raise self.format_error(qfile, f"expected an object keyed by question id, got a {type(data).__name__}")
        drafts = []
        for qid, q in take(data.items(), limit):
            if not isinstance(q, dict):
                raise self.format_error(qfile, f"question {qid} is not an object")
            self.require_keys(q, ["imageId", "question", "answer"], qfile, f"question {qid}")
            types = q.get("types") or {}
            drafts.append(Sample(
                id=str(qid), image_paths=[images / f"{q['imageId']}.jpg"], question=q["question"], prompt="",
                answers=[str(q["answer"])],
                meta={"image_id": q["imageId"], "full_answer": q.get("fullAnswer"),
                      "structural": types.get("structural"), "semantic": types.get("semantic"),
                      "detailed": types.get("detailed")},
            ))
        return self.finish(drafts)
