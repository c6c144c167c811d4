"""MMBench (lmms-eval ``mmbench_{en,cn}_{dev,test}``; upstream reports ``mmbench_en_test`` and ``mmbench_cn_test``).

Expected layout: the official TSV of the split in DATA_DIR::

    DATA_DIR/MMBench_DEV_EN.tsv     # or MMBench_TEST_EN.tsv, MMBench_DEV_CN.tsv, MMBench_TEST_CN.tsv

with a header row and the columns ``index, question, hint, A, B, C, D[, E], answer, category, image[, source,
l2-category, split]`` (``answer`` is absent from the test splits, whose answers are not public: those samples have
no references and are scored through MMBench's submission server). ``image`` is the base64-encoded picture, or the
``index`` of an earlier row whose picture it shares.

Download: the VLMEvalKit copies, e.g. https://opencompass.openxlab.space/utils/VLMEval/MMBench_DEV_EN.tsv (see
https://github.com/open-compass/MMBench), into DATA_DIR.

Images: ``load`` decodes each picture once into ``CACHE_DIR/_images/<tsv name>/<index>.<png|jpg|...>`` and points
the sample there; ``CACHE_DIR`` is the ``cache_dir`` argument of ``load`` (default ``DATA_DIR/_decoded``). A file
already there with the same bytes is left alone.

Prompt (lmms-eval): ``"<hint> <question> There are several options:\\nA. ...\\nB. ..."`` (no hint part when the hint
is empty), then ``"\\n"`` and the post prompt ``"\\nAnswer with the option's letter from the given choices
directly."`` (Chinese: ``"\\n请直接使用所提供的选项字母作为答案回答。"``) -- so a blank line precedes the
instruction, as in lmms-eval. Options are the non-empty A-E columns. The reference is the answer letter;
``meta`` holds ``choices`` (letter -> text), ``hint``, ``category``, ``l2_category`` and ``circular_index`` (``index``
mod 10^6, shared by the circular copies of one question). ``limit`` takes the first rows.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import re
import sys
import tempfile
from pathlib import Path

from ._base import CHOICE_LETTER, Sample, Task, check_limit, options_block

OPTIONS_HEADER = "There are several options:"
POST_PROMPTS = {"en": CHOICE_LETTER, "cn": "\n请直接使用所提供的选项字母作为答案回答。"}
LETTERS = ("A", "B", "C", "D", "E")
_SAFE_INDEX = re.compile(r"^[A-Za-z0-9_-]+(\.[0-9]+)?$")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def _missing(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


class MMBenchTask(Task):
    metric = "choice"

    def __init__(self, lang: str = "en", split: str = "dev", filename: str | None = None):
        if lang not in POST_PROMPTS or split not in ("dev", "test"):
            raise ValueError(f"MMBench has lang en / cn and split dev / test, got {lang!r} / {split!r}")
        self.lang, self.split = lang, split
        self.name = f"mmbench_{lang}_{split}"
        self.filename = filename or f"MMBench_{split.upper()}_{lang.upper()}.tsv"
        self.download = (f"Put {self.filename} (https://opencompass.openxlab.space/utils/VLMEval/{self.filename}, "
                         "see https://github.com/open-compass/MMBench) in DATA_DIR.")

    def prompt(self, sample: Sample) -> str:
        options = f"{OPTIONS_HEADER}\n{options_block(sample.meta['choices'])}"
        hint = sample.meta.get("hint") or ""
        query = f"{hint} {sample.question} {options}" if hint else f"{sample.question} {options}"
        return f"{query}\n{POST_PROMPTS[self.lang]}"

    def load(self, data_dir: Path, limit: int | None = None, cache_dir: Path | None = None) -> list[Sample]:
        check_limit(limit)
        root = self.data_root(data_dir)
        tsv = self.need_file(root / self.filename, f"TSV file {self.filename}")
        rows = self._read_tsv(tsv)
        by_index = {r["index"]: r for r in rows}
        out_dir = (Path(cache_dir) if cache_dir is not None else root / "_decoded") / "_images" / tsv.stem
        drafts = []
        for n, r in enumerate(rows if limit is None else rows[:limit], 1):
            if r.get("question") is None or r.get("image") is None or None in r:
                raise self.format_error(tsv, f"row {n} does not have one value per header column")
            if not _SAFE_INDEX.match(r["index"] or ""):
                raise self.format_error(tsv, f"row {n}: index {r['index']!r} is not a plain number or name")
            choices = {k: r[k].strip() for k in LETTERS if not _missing(r.get(k))}
            if len(choices) < 2:
                raise self.format_error(tsv, f"row {n} (index {r['index']}) has fewer than two options")
            answer = (r.get("answer") or "").strip()
            if answer and answer not in choices:
                raise self.format_error(tsv, f"row {n} (index {r['index']}): answer {answer!r} is not an option")
            image = self._decode(tsv, r, by_index, out_dir)
            try:
                circular = int(float(r["index"])) % 1_000_000
            except ValueError:
                circular = r["index"]
            drafts.append(Sample(
                id=r["index"], image_paths=[image], question=r["question"], prompt="",
                answers=[answer] if answer else [],
                meta={"choices": choices, "hint": "" if _missing(r.get("hint")) else r["hint"],
                      "category": r.get("category"), "l2_category": r.get("l2-category", r.get("L2-category")),
                      "source": r.get("source"), "split": r.get("split"), "circular_index": circular},
            ))
        return self.finish(drafts)

    def _read_tsv(self, tsv: Path) -> list[dict[str, str]]:
        old = csv.field_size_limit()
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 pictures are far longer than csv's default
        try:
            with tsv.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t")
                header = reader.fieldnames or []
                missing = [k for k in ("index", "question", "A", "B", "image") if k not in header]
                if missing:
                    raise self.format_error(tsv, f"the header lacks the columns {missing} (has {header[:12]})")
                rows = [dict(r) for r in reader]
        except (csv.Error, UnicodeDecodeError) as err:
            raise self.format_error(tsv, f"not a tab-separated file ({err})") from err
        finally:
            csv.field_size_limit(old)
        if not rows:
            raise self.format_error(tsv, "no rows")
        return rows

    def _decode(self, tsv: Path, row: dict, by_index: dict, out_dir: Path) -> Path:
        owner, data = row["index"], (row.get("image") or "").strip()
        if len(data) <= 64 and data in by_index:  # shares the picture of another row
            owner, data = data, (by_index[data].get("image") or "").strip()
            if not _SAFE_INDEX.match(owner):
                raise self.format_error(tsv, f"row index {row['index']}: shares the picture of bad index {owner!r}")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise self.format_error(tsv, f"row index {row['index']}: image is not base64 ({err})") from err
        ext = next((e for magic, e in _MAGIC if raw.startswith(magic)), None)
        if ext is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            ext = ".webp"
        if ext is None:
            raise self.format_error(tsv, f"row index {row['index']}: image is not a PNG / JPEG / GIF / BMP / WEBP")
        path = out_dir / f"{owner}{ext}"
        if not (path.is_file() and path.stat().st_size == len(raw) and path.read_bytes() == raw):
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{owner}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(raw)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return path
