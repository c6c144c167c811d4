"""MME (lmms-eval ``mme``: 14 yes/no subtasks, two questions per image, 2,374 questions).

Expected layout: DATA_DIR is ``MME_Benchmark_release_version/`` (or the folder that holds it), one folder per
subtask, in one of the two forms the release uses::

    artwork/                      # artwork, celebrity, landmark, posters, scene
      images/10002.jpg
      questions_answers_YN/10002.txt
    code_reasoning/               # the other nine: images and question files side by side
      0020.png
      0020.txt

Each ``.txt`` holds one question a line, ``"<question>\\t<Yes|No>"``, for the image of the same stem (.jpg, .png or
.jpeg). Subtasks: existence, count, position, color, posters, celebrity, scene, landmark, artwork, OCR (perception)
and commonsense_reasoning, numerical_calculation, text_translation, code_reasoning (cognition).

Download: request MME from https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation
(or get ``MME_Benchmark_release_version.zip`` of the Hugging Face dataset ``darkyarding/MME``) and unzip it.

Prompt (lmms-eval): the question without its " Please answer yes or no." ending, plus
``"\\nAnswer the question using a single word or phrase."``. ``meta["image_id"]`` (``<subtask>/<image file>``)
pairs the two questions of an image for the acc+ part of the MME score; ``meta["category"]`` is the subtask and
``meta["group"]`` perception / cognition. ``limit`` applies per subtask and is rounded up to whole images.
"""

from __future__ import annotations

from pathlib import Path

from ._base import SHORT_ANSWER, Sample, Task, check_limit

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
RELEASE = "MME_Benchmark_release_version"
YES_NO_SUFFIX = " Please answer yes or no."
IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


class MMETask(Task):
    name = "mme"
    metric = "mme"
    download = (f"Get {RELEASE}.zip (https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/"
                "Evaluation, or the Hugging Face dataset darkyarding/MME) and unzip it into DATA_DIR.")

    def __init__(self, subtasks: tuple[str, ...] = PERCEPTION + COGNITION):
        self.subtasks = tuple(subtasks)

    def prompt(self, sample: Sample) -> str:
        return sample.question.strip().replace(YES_NO_SUFFIX, "") + SHORT_ANSWER

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        if (root / RELEASE).is_dir():
            root = root / RELEASE
        folders = {s: self.need_dir(root / s, f"subtask folder {s}/") for s in self.subtasks}
        drafts = []
        for sub, folder in folders.items():
            if (folder / "images").is_dir():
                images = folder / "images"
                qa = self.need_dir(folder / "questions_answers_YN", f"question folder {sub}/questions_answers_YN/")
            else:
                images = qa = folder
            txts = sorted(qa.glob("*.txt"))
            if not txts:
                raise self.format_error(qa, "no <image>.txt question files")
            count = 0
            for txt in txts:
                if limit is not None and count >= limit:
                    break
                image = next((images / (txt.stem + e) for e in IMAGE_EXTS if (images / (txt.stem + e)).is_file()),
                             None)
                if image is None:
                    raise FileNotFoundError(f"mme: no image {txt.stem}.jpg / .png for {txt} in {images}. "
                                            f"{self.download}")
                for k, (question, answer) in enumerate(self._lines(txt)):
                    drafts.append(Sample(
                        id=f"{sub}/{image.name}#{k}", image_paths=[image], question=question, prompt="",
                        answers=[answer],
                        meta={"category": sub, "group": "perception" if sub in PERCEPTION else "cognition",
                              "image_id": f"{sub}/{image.name}"},
                    ))
                    count += 1
        return self.finish(drafts)

    def _lines(self, txt: Path) -> list[tuple[str, str]]:
        out = []
        for n, line in enumerate(txt.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split("\t")]
            if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                raise self.format_error(txt, f'line {n} is not "<question>\\t<Yes|No>"')
            out.append((fields[0], fields[1]))
        if not out:
            raise self.format_error(txt, "no question lines")
        return out
