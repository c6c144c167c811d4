"""V* Bench (``vstar_bench``: 191 high-resolution images, 238 multiple-choice questions in two categories,
direct_attributes and relative_position), scored by choice accuracy, overall and per category.

Expected layout (the V* release, https://huggingface.co/datasets/craigwu/vstar_bench)::

    DATA_DIR/
      test_questions.jsonl     # {"image": "direct_attributes/sa_4690.jpg", "text": "What is the material of the
                               #   glove?\\n(A) rubber\\n(B) cotton\\n(C) leather\\n(D) polyester\\nAnswer with the
                               #   option's letter from the given choices directly.", "category": "direct_attributes",
                               #   "question_id": 0, "label": "A"}
      direct_attributes/sa_4690.jpg
      relative_position/...

Prompt (lmms-eval): the question text up to its options, then one line per option ``"A. rubber"``, then
``"\\nAnswer with the option's letter from the given choices directly."`` (a copy of that instruction already in the
release's text is not repeated). ``limit`` takes the first questions in file order.
"""

from __future__ import annotations

import re
from pathlib import Path

from ._base import CHOICE_LETTER, Sample, Task, check_limit, take

QUESTIONS = "test_questions.jsonl"
MARK = re.compile(r"\(([A-D])\)")


def split_options(text: str) -> tuple[str, list[str]]:
    """("question", ["option A", "option B", ...]) from V*'s "question\\n(A) x\\n(B) y" text: the options are what
    lies between the markers (A), (B), ... in letter order, so an option may hold parentheses of its own."""
    body = text.replace(CHOICE_LETTER.strip(), "").strip()
    marks = [m for m in MARK.finditer(body)]
    first = next((i for i, m in enumerate(marks) if m.group(1) == "A"), None)
    if first is None:
        return body, []
    run = [marks[first]]
    for m in marks[first + 1:]:  # the next letter only; any other "(X)" is part of an option's text
        if m.group(1) == chr(ord(run[-1].group(1)) + 1):
            run.append(m)
    ends = [m.start() for m in run[1:]] + [len(body)]
    return body[:run[0].start()].strip(), [body[m.end():e].strip() for m, e in zip(run, ends)]


class VStarTask(Task):
    name = "vstar_bench"
    metric = "choice"
    download = ("Get the V* Bench release (https://huggingface.co/datasets/craigwu/vstar_bench): test_questions.jsonl "
                "and the direct_attributes/ and relative_position/ image folders, into DATA_DIR.")

    def prompt(self, sample: Sample) -> str:
        opts = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(sample.meta["choices"]))
        return f"{sample.question}\n{opts}{CHOICE_LETTER}" if opts else sample.question + CHOICE_LETTER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        rows = _read_jsonl(self, root / QUESTIONS)
        drafts = []
        for n, q in take(enumerate(rows, 1), limit):
            self.require_keys(q, ["image", "text", "label"], root / QUESTIONS, f"line {n}")
            question, options = split_options(q["text"])
            if len(options) < 2:
                raise self.format_error(root / QUESTIONS, f"line {n} has no (A)/(B) options in its text")
            drafts.append(Sample(
                id=str(q.get("question_id", n - 1)), image_paths=[root / q["image"]], question=question, prompt="",
                answers=[str(q["label"]).strip().upper()],
                meta={"category": q.get("category") or Path(q["image"]).parts[0], "choices": options},
            ))
        return self.finish(drafts)


def _read_jsonl(task: Task, path: Path) -> list[dict]:
    import json

    task.need_file(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise task.format_error(path, f"line {n} is not JSON ({err})") from None
    return rows
