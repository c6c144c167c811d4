"""POPE on COCO (lmms-eval ``pope``: random, popular and adversarial, 3,000 questions each).

Expected layout::

    DATA_DIR/
      coco_pope_random.json        # JSON lines (whatever the extension, .json or .jsonl; also accepted in
      coco_pope_popular.json       #   DATA_DIR/coco/): {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
      coco_pope_adversarial.json   #                     "text": "Is there a snowboard in the image?", "label": "yes"}
      val2014/COCO_val2014_000000310196.jpg

Download: ``output/coco/coco_pope_{random,popular,adversarial}.json`` of https://github.com/AoiDragon/POPE and the
COCO 2014 validation images http://images.cocodataset.org/zips/val2014.zip (unzip to DATA_DIR/val2014/).

Prompt (lmms-eval): ``text.strip() + "\\nAnswer the question using a single word or phrase."``; the reference is
``label`` (yes / no); ``meta["category"]`` is the file's split. ``question_id`` restarts in each file, so ids are
``<category>-<question_id>``. ``limit`` applies per category.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit, take

CATEGORIES = ("random", "popular", "adversarial")


class POPETask(Task):
    name = "pope"
    metric = "pope"
    download = ("Put coco_pope_{random,popular,adversarial}.json from https://github.com/AoiDragon/POPE "
                "(output/coco/) in DATA_DIR and the COCO val2014 images "
                "(http://images.cocodataset.org/zips/val2014.zip) in DATA_DIR/val2014/.")

    def __init__(self, categories: tuple[str, ...] = CATEGORIES):
        self.categories = tuple(categories)

    def prompt(self, sample: Sample) -> str:
        return sample.question.strip() + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        files = {c: self._file(root, c) for c in self.categories}
        images = self.need_dir(root / "val2014", "COCO val2014 image folder")
        drafts = []
        for cat, file in files.items():
            for n, r in take(enumerate(self.read_rows(file), 1), limit):
                self.require_keys(r, ["question_id", "image", "text", "label"], file, f"record {n}")
                label = str(r["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise self.format_error(file, f"record {n}: label {r['label']!r} is not yes / no")
                drafts.append(Sample(
                    id=f"{cat}-{r['question_id']}", image_paths=[images / r["image"]], question=r["text"],
                    prompt="", answers=[label],
                    meta={"category": cat, "question_id": r["question_id"], "image": r["image"]},
                ))
        return self.finish(drafts)

    def _file(self, root: Path, cat: str) -> Path:
        for folder in (root, root / "coco"):
            for ext in (".json", ".jsonl"):
                if (folder / f"coco_pope_{cat}{ext}").is_file():
                    return folder / f"coco_pope_{cat}{ext}"
        raise self.layout_error(f"question file coco_pope_{cat}.json", root / f"coco_pope_{cat}.json")
