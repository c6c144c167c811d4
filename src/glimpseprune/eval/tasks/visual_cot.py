"""Visual-CoT benchmark: the paper's free-form VQA (Table 2), 12 subsets scored by an LLM judge.

Expected layout (``DATA_DIR`` is upstream's ``datas/`` folder)::

    DATA_DIR/
      viscot_benchmark/benchmark/<subset>.json   # or DATA_DIR/benchmark/<subset>.json, or DATA_DIR/<subset>.json
      cot/<folder>/...                           # the images, e.g. cot/gqa/2316539.jpg, cot/v7w/v7w_2359399.jpg

Download: the benchmark JSONs are ``viscot_benchmark/benchmark/*.json`` of https://github.com/deepcs233/Visual-CoT
(GlimpsePrune ships a copy); the images are ``huggingface-cli download --repo-type dataset deepcs233/Visual-CoT
cot_images_tar_split`` (about 128 GB), then ``cat cot_images_* | tar -xvf - -C DATA_DIR/cot``. Images may also live
in a separate folder: pass ``image_dir`` to ``load``.

The subsets are cub, docvqa, dude, flickr30k, gqa, infographicsvqa, openimages, sroie, textcap, textvqa, visual7w
and vsr (``emotic`` and ``gqa_debug`` ship too but are not part of the paper's average). A benchmark record is::

    {"dataset": "gqa", "split": "val", "question_id": 7,
     "image": ["cot/gqa/2316539.jpg", "cot/gqa/2316539.jpg###[217, 343, 242, 393]"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...? Please provide the bounding box ..."},
                       {"from": "gpt", "value": "[0.542, 0.686, 0.592, 0.786]"},
                       {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "window"}]}

Flat rows (``question, answer, image, dataset``, as in Visual-CoT's ``viscot_dataset/*.jsonl`` metadata, with
``image`` a path under ``cot/<dataset>/``) are read too, from ``<subset>.json`` or ``<subset>.jsonl``; ``data_dir``
may also be one combined JSON / JSONL file of such rows, split into subsets by ``dataset`` (``v7w`` is visual7w).

Prompt (upstream ``viscot_eval/infer_cot.py``): the first human turn without the bounding-box request and the
``<image>\\n`` marker, stripped; the free-form task adds nothing. ``visual_cot_brief`` (upstream ``BRIEF=1``)
appends ``"\\n\\nAnswer the question using a single word or phrase."``. The reference is the last gpt turn.
A missing image falls back to ``cot/<folder>/val/<file>`` as upstream does. ``limit`` applies per subset (upstream
``--num_samples``); ``meta`` holds ``subset``, ``dataset``, ``question_id``, ``split`` and the pixel ``bbox``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ._base import Sample, Task, check_limit, take

SUBSETS = ("cub", "docvqa", "dude", "flickr30k", "gqa", "infographicsvqa", "openimages", "sroie", "textcap",
           "textvqa", "visual7w", "vsr")
BOX_REQUEST = "Please provide the bounding box coordinate of the region that can help you answer the question better."
BRIEF_SUFFIX = "\n\nAnswer the question using a single word or phrase."
_ALIASES = {"v7w": "visual7w"}  # the `dataset` field -> subset name
_FOLDERS = {"visual7w": ("v7w",), "textcap": ("textvqa",)}  # extra image folders under cot/ for flat rows


class VisualCoTTask(Task):
    metric = "judge"
    download = ("Get viscot_benchmark/benchmark/*.json from https://github.com/deepcs233/Visual-CoT into "
                "DATA_DIR/viscot_benchmark/benchmark/ and the images with `huggingface-cli download --repo-type "
                "dataset deepcs233/Visual-CoT cot_images_tar_split`, extracted into DATA_DIR/cot/.")

    def __init__(self, brief: bool = False, subsets: tuple[str, ...] = SUBSETS):
        self.brief = brief
        self.subsets = tuple(subsets)
        self.name = "visual_cot_brief" if brief else "visual_cot"

    def prompt(self, sample: Sample) -> str:
        return sample.question + BRIEF_SUFFIX if self.brief else sample.question

    def load(self, data_dir: Path, limit: int | None = None, image_dir: Path | None = None) -> list[Sample]:
        check_limit(limit)
        path = Path(data_dir).expanduser()
        if path.is_file():  # one combined file, split by `dataset`
            rows = self.read_rows(path)
            images = Path(image_dir) if image_dir is not None else path.parent
            by_subset: dict[str, list[dict]] = {}
            for n, row in enumerate(rows, 1):
                self.require_keys(row, ["dataset"], path, f"record {n}")
                by_subset.setdefault(_ALIASES.get(row["dataset"], row["dataset"]), []).append(row)
            missing = [s for s in self.subsets if s not in by_subset]
            if missing:
                raise self.format_error(path, f"no rows of the subsets {missing} (found {sorted(by_subset)})")
            parts = [(s, path, by_subset[s]) for s in self.subsets]
        else:
            root = self.data_root(path)
            bench = self._bench_dir(root)
            images = Path(image_dir) if image_dir is not None else root
            parts = []
            for subset in self.subsets:
                file = next((bench / f"{subset}{ext}" for ext in (".json", ".jsonl")
                             if (bench / f"{subset}{ext}").is_file()), None)
                if file is None:
                    raise self.layout_error(f"subset file {subset}.json", bench / f"{subset}.json")
                parts.append((subset, file, self.read_rows(file)))
        drafts = []
        for subset, file, rows in parts:
            for n, row in take(enumerate(rows, 1), limit):
                drafts.append(self._sample(subset, row, file, n, images))
        return self.finish(drafts)

    def _bench_dir(self, root: Path) -> Path:
        for cand in (root / "viscot_benchmark" / "benchmark", root / "benchmark", root):
            if any((cand / f"{s}{ext}").is_file() for s in self.subsets for ext in (".json", ".jsonl")):
                return cand
        raise self.layout_error("benchmark folder with <subset>.json files",
                                root / "viscot_benchmark" / "benchmark")

    def _sample(self, subset: str, row: dict, file: Path, n: int, images: Path) -> Sample:
        where = f"record {n}"
        if "conversations" in row:
            self.require_keys(row, ["image", "question_id"], file, where)
            convs = row["conversations"]
            if not isinstance(convs, list) or len(convs) < 2 or not all(
                    isinstance(c, dict) and "value" in c for c in convs):
                raise self.format_error(file, f"{where}: conversations is not a list of turns with a value")
            image = row["image"]
            if isinstance(image, str):
                image = [image]
            if not isinstance(image, list) or not image or not isinstance(image[0], str):
                raise self.format_error(file, f"{where}: image is not a [path, 'path###[box]'] list")
            question = convs[0]["value"].replace(BOX_REQUEST, "").strip().replace("<image>\n", "")
            answer = str(convs[-1]["value"])
            bbox = None
            if len(image) > 1 and "###" in image[1]:
                try:
                    bbox = [float(v) for v in json.loads(image[1].split("###", 1)[1])]
                except (json.JSONDecodeError, TypeError, ValueError) as err:
                    raise self.format_error(file, f"{where}: bad box in {image[1]!r}") from err
            rel, qid = image[0], row["question_id"]
            candidates = [images / rel]
        else:
            self.require_keys(row, ["question", "answer", "image"], file, where)
            question, answer, rel = str(row["question"]), str(row["answer"]), str(row["image"])
            boxes = row.get("bboxs") or row.get("bboxes") or []
            bbox = [float(v) for v in boxes[0]] if boxes else None
            qid = row.get("question_id", row.get("id", n - 1))
            dataset = str(row.get("dataset", subset))
            folders = dict.fromkeys((dataset, subset, *_FOLDERS.get(subset, ())))
            candidates = [images / rel] + [images / "cot" / f / rel for f in folders]
        image_path = _first_existing(candidates)
        return Sample(
            id=f"{subset}-{qid}", image_paths=[image_path], question=question, prompt="", answers=[answer],
            meta={"subset": subset, "dataset": row.get("dataset", subset), "question_id": qid,
                  "split": row.get("split"), "bbox": bbox},
        )


def _first_existing(candidates: list[Path]) -> Path:
    """The first candidate that exists, else its upstream "val" fallback (``cot/<folder>/val/<file>``)."""
    tried = []
    for p in candidates:
        tried.append(p)
        parts = p.parts
        if "cot" in parts:
            i = len(parts) - 1 - parts[::-1].index("cot")
            if i + 2 < len(parts):
                tried.append(Path(*parts[:i + 2], "val", *parts[i + 2:]))
    return next((p for p in tried if p.is_file()), candidates[0])
