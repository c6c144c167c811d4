"""ChartQA test (lmms-eval ``chartqa``: 1,250 human + 1,250 augmented questions), relaxed accuracy.

Expected layout (the ``test`` folder of the release)::

    DATA_DIR/
      test_human.json       # [{"imgname": "41699051005347.png", "query": "...", "label": "..."}]
      test_augmented.json
      png/41699051005347.png

Download: https://github.com/vis-nlp/ChartQA ("ChartQA Dataset" from the link in its README, or the Hugging Face
dataset ``ahmed-masry/ChartQA``); use its ``test/`` folder as DATA_DIR.

Prompt (lmms-eval): ``query + "\\nAnswer the question with a single word."``; the reference is ``label``;
``meta["type"]`` is ``human_test`` or ``augmented_test`` (lmms-eval's split scores). ``limit`` applies per split.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SINGLE_WORD, Sample, Task, check_limit, take

SPLITS = (("human_test", "test_human.json"), ("augmented_test", "test_augmented.json"))


class ChartQATask(Task):
    name = "chartqa"
    metric = "relaxed_accuracy"
    download = ("Get the ChartQA release (https://github.com/vis-nlp/ChartQA) and use its test/ folder "
                "(test_human.json, test_augmented.json, png/) as DATA_DIR.")

    def prompt(self, sample: Sample) -> str:
        return sample.question + SINGLE_WORD

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        for _, file in SPLITS:
            self.need_file(root / file)
        images = self.need_dir(root / "png", "image folder png/")
        drafts = []
        for split, file in SPLITS:
            rows = self.read_json(root / file)
            if not isinstance(rows, list):
                raise self.format_error(root / file, "expected a list of {imgname, query, label} records")
            for n, r in take(enumerate(rows), limit):
                if not isinstance(r, dict):
                    raise self.format_error(root / file, f"record {n + 1} is not an object")
                self.require_keys(r, ["imgname", "query", "label"], root / file, f"record {n + 1}")
                drafts.append(Sample(
                    id=f"{split}-{n}", image_paths=[images / r["imgname"]], question=r["query"], prompt="",
                    answers=[str(r["label"])], meta={"type": split, "imgname": r["imgname"]},
                ))
        return self.finish(drafts)
