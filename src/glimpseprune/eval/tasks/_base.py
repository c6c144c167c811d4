"""What every task shares: the ``Sample`` record, the ``Task`` base class, the prompt suffixes lmms-eval uses, and the
layout checks that turn a missing or malformed release into an error saying what to download and where to put it."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# lmms-eval's ``post_prompt`` (default model kwargs), appended verbatim to the question.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
SINGLE_WORD = "\nAnswer the question with a single word."  # ChartQA
CHOICE_LETTER = "\nAnswer with the option's letter from the given choices directly."

METRICS = ("vqa_accuracy", "anls", "relaxed_accuracy", "exact_match", "pope", "mme", "choice", "judge")


@dataclass(frozen=True)
class Sample:
    """One evaluation question.

    ``question`` is the raw question of the release; ``prompt`` the full text the model is given (question plus the
    task's options, hint and answer-format suffix); ``answers`` the references (several for VQA-style accuracy, one
    letter for multiple choice, empty where the split has no public answers); ``meta`` whatever the metric or a
    per-category report needs (subset, category, image id, choices, question type ...).
    """

    id: str
    image_paths: list[Path]
    question: str
    prompt: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    video: list[Path] = field(default_factory=list)  # frame files of the sample's video (fps in meta["fps"]), if any


class Task(ABC):
    """A benchmark in its public release layout: ``load`` reads local files only, ``prompt`` builds the text."""

    name: str = ""
    metric: str = ""  # a metric of glimpseprune.eval.metrics (one of METRICS)
    download: str = ""  # one line: what release to get and where to put it (used in every layout error)

    @abstractmethod
    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        """The samples of the release under ``data_dir`` (at most ``limit`` per part, see the task's docstring)."""

    @abstractmethod
    def prompt(self, sample: Sample) -> str:
        """The full text prompt of ``sample``, built from its raw ``question`` and ``meta``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric!r})"

    # ---- helpers for subclasses -------------------------------------------------------------------------------

    def layout_error(self, what: str, path: Path) -> FileNotFoundError:
        return FileNotFoundError(f"{self.name}: {what} not found at {path}. {self.download}")

    def format_error(self, path: Path, why: str) -> ValueError:
        return ValueError(f"{self.name}: {path} is not in the expected release layout: {why}. {self.download}")

    def data_root(self, data_dir: str | Path) -> Path:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise self.layout_error("data folder", root)
        return root

    def need_file(self, path: Path, what: str | None = None) -> Path:
        if not path.is_file():
            raise self.layout_error(what or f"file {path.name}", path)
        return path

    def need_dir(self, path: Path, what: str | None = None) -> Path:
        if not path.is_dir():
            raise self.layout_error(what or f"folder {path.name}/", path)
        return path

    def read_json(self, path: Path) -> Any:
        """The JSON in ``path`` (outputs.read_json); one that cannot be read or parsed is named with the layout."""
        from ...outputs import read_json

        self.need_file(path)
        try:
            return read_json(path)
        except ValueError as err:
            raise self.format_error(path, str(err).removeprefix(f"{path}: ")) from err

    def read_rows(self, path: Path) -> list[dict]:
        """Rows of a JSON array or a JSON-lines file (releases use both, whatever the extension says)."""
        self.need_file(path)
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise self.format_error(path, f"line {n} is not JSON ({err})") from err
        else:
            rows = data if isinstance(data, list) else [data]
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise self.format_error(path, f"record {n} is a {type(row).__name__}, not an object")
        return rows

    def first_file(self, root: Path, names: Sequence[str]) -> Path:
        """The first of ``names`` present under ``root`` (releases name one annotation file several ways)."""
        found = next((root / n for n in names if (root / n).is_file()), None)
        if found is None:
            alt = " (or " + ", ".join(names[1:]) + ")" if len(names) > 1 else ""
            raise self.layout_error(f"annotation file {names[0]}{alt}", root / names[0])
        return found

    def read_data_list(self, path: Path) -> list:
        """The ``"data"`` list of a DocVQA-style annotation file (``{"data": [...]}``)."""
        data = self.read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise self.format_error(path, 'no "data" list')
        return data["data"]

    def answer_list(self, answers, path: Path, where: str) -> list:
        """A row's list of reference answers (a bare string would be read one character per answer)."""
        if not isinstance(answers, list):
            raise self.format_error(path, f"{where}: answers must be a list, got {answers!r:.60}")
        return answers

    def require_keys(self, row: dict, keys: Iterable[str], path: Path, where: str) -> None:
        missing = [k for k in keys if k not in row]
        if missing:
            raise self.format_error(path, f"{where} lacks {missing}")

    def finish(self, drafts: Iterable[Sample]) -> list[Sample]:
        """Fill in each prompt and check that every image exists (the first missing one is named)."""
        out = []
        for s in drafts:
            if not isinstance(s.question, str) or not s.question.strip():
                raise ValueError(f"{self.name}: sample {s.id}: the question must be non-empty text, got "
                                 f"{s.question!r:.60}. {self.download}")
            for p in [*s.image_paths, *s.video]:
                if not p.is_file():
                    raise FileNotFoundError(
                        f"{self.name}: image of sample {s.id} not found at {p}. {self.download}")
            out.append(replace(s, prompt=self.prompt(s)))
        return out


def check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return limit


def take(items: Iterable, limit: int | None) -> Iterator:
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            return
        yield item


def options_block(choices: dict[str, str]) -> str:
    """``A. ...\\nB. ...`` in letter order."""
    return "\n".join(f"{k}. {v}" for k, v in choices.items())
