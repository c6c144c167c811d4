"""ScienceQA-IMG test (lmms-eval ``scienceqa_img``: the 2,017 test problems that have an image).

Expected layout (``data/scienceqa`` of the release plus its images)::

    DATA_DIR/
      problems.json       # {"<pid>": {"question", "choices": [...], "answer": <index>, "hint", "image": "image.png"
                          #            or null, "split", "subject", "grade", "topic", "category", "skill", ...}}
      pid_splits.json     # {"train": [...], "val": [...], "test": ["<pid>", ...], ...}
      images/test/<pid>/image.png

Download: ``data/scienceqa/problems.json`` and ``pid_splits.json`` of https://github.com/lupantech/ScienceQA and its
test images (``bash tools/download.sh`` there, or test.zip from the links in its README) unzipped to
DATA_DIR/images/test/.

Prompt (lmms-eval ``format: default``): ``"Context: <hint>\\n"`` (only when the hint is not empty), the question,
``"\\nA. ...\\nB. ..."`` and ``"\\nAnswer with the option's letter from the given choices directly."``. The reference
is the answer's letter; ``meta["choices"]`` maps letters to choices. ``limit`` takes the first test pids.
"""

from __future__ import annotations

from pathlib import Path

from ._base import CHOICE_LETTER, Sample, Task, check_limit, options_block, take


class ScienceQAImgTask(Task):
    name = "scienceqa_img"
    metric = "choice"
    download = ("Put problems.json and pid_splits.json (https://github.com/lupantech/ScienceQA, data/scienceqa/) in "
                "DATA_DIR and the test images (tools/download.sh there) in DATA_DIR/images/test/.")

    def __init__(self, split: str = "test"):
        self.split = split

    def prompt(self, sample: Sample) -> str:
        hint = sample.meta.get("hint") or ""
        context = f"Context: {hint}\n" if hint else ""
        return f"{context}{sample.question}\n{options_block(sample.meta['choices'])}{CHOICE_LETTER}"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        pfile = self.need_file(root / "problems.json", "problems file")
        sfile = self.need_file(root / "pid_splits.json", "split file")
        images = self.need_dir(root / "images" / self.split, f"image folder images/{self.split}/")
        problems, splits = self.read_json(pfile), self.read_json(sfile)
        if not isinstance(problems, dict):
            raise self.format_error(pfile, "expected an object keyed by problem id")
        if not isinstance(splits, dict) or not isinstance(splits.get(self.split), list):
            raise self.format_error(sfile, f'no "{self.split}" list of problem ids')
        with_image = []
        for pid in splits[self.split]:
            p = problems.get(str(pid))
            if p is None:
                raise self.format_error(pfile, f"no problem {pid} (listed in {sfile.name})")
            self.require_keys(p, ["question", "choices", "answer", "image"], pfile, f"problem {pid}")
            if p["image"]:
                with_image.append((str(pid), p))
        drafts = []
        for pid, p in take(with_image, limit):
            choices = {chr(ord("A") + i): str(c) for i, c in enumerate(p["choices"])}
            if not 0 <= int(p["answer"]) < len(choices):
                raise self.format_error(pfile, f"problem {pid}: answer {p['answer']} is not a choice index")
            drafts.append(Sample(
                id=pid, image_paths=[images / pid / p["image"]], question=p["question"], prompt="",
                answers=[chr(ord("A") + int(p["answer"]))],
                meta={"choices": choices, "hint": p.get("hint") or "", "subject": p.get("subject"),
                      "grade": p.get("grade"), "topic": p.get("topic"), "category": p.get("category"),
                      "skill": p.get("skill")},
            ))
        return self.finish(drafts)
