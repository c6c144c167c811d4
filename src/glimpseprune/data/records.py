"""One JSONL record format for box-labelled VQA, shared by the synthetic world and Visual-CoT, and the conversion
of pixel boxes to a visual-token mask on the model's grid.

A record line::

    {"id": "w-000001", "image": "images/000001.png", "question": "...", "answer": "red", "family": "lookup",
     "width": 336, "height": 280, "bboxs": [[28, 56, 84, 112]]}

``bboxs`` are pixel ``[x1, y1, x2, y2]`` of the original image (Visual-CoT's key and convention); ``image`` is
relative to the JSONL file's folder (or absolute). Visual-CoT training rows (``question, answer, image, width,
height, bboxs, dataset``) read as they are, with ``family`` taken from ``dataset``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .world import FAMILIES, WorldConfig, render, sample

logger = logging.getLogger(__name__)


@dataclass
class Record:
    id: str
    image: str
    question: str
    answer: str
    width: int
    height: int
    bboxs: list[list[float]] = field(default_factory=list)
    family: str = ""

    def image_path(self, root: Path) -> Path:
        """``image`` under ``root`` (absolute paths as they are); Visual-CoT's training rows name a file under
        ``<root>/<dataset>/``, which is taken when ``root/image`` does not exist but that file does."""
        p = Path(self.image)
        if p.is_absolute():
            return p
        q = Path(root) / p
        if self.family and not q.exists() and (Path(root) / self.family / p).is_file():
            return Path(root) / self.family / p
        return q


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v, key: str, where: str) -> int:
    """A record's width / height: a whole number > 0 (a numeric string too), else an error naming file and line."""
    try:
        n = float(v) if isinstance(v, str) else v
        ok = _is_number(n) and n == int(n) and n > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: {key} must be a whole number of pixels > 0, got {v!r:.60}")
    return int(n)


def _parse(row: dict, where: str) -> Record:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a record is a JSON object, got {type(row).__name__} {row!r:.60}")
    missing = [k for k in ("question", "answer", "image", "width", "height") if k not in row]
    if missing:
        raise ValueError(f"{where}: record lacks {missing}")
    for key in ("question", "image"):  # str(None) would ask "None"; an empty question asks nothing
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: {key} must be a non-empty string, got {row[key]!r:.60}")
    if row["answer"] is None or isinstance(row["answer"], (bool, list, dict)):
        raise ValueError(f"{where}: answer must be a string (or a number), got {row['answer']!r:.60}")
    size = {k: _positive_int(row[k], k, where) for k in ("width", "height")}
    boxes = row.get("bboxs", row.get("bboxes", [])) or []
    if not isinstance(boxes, list):
        raise ValueError(f"{where}: bboxs must be a list of [x1, y1, x2, y2] boxes, got {boxes!r:.60}")
    for box in boxes:
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box) \
                or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}: box {box} is not [x1, y1, x2, y2] (numbers) with x1 <= x2, y1 <= y2")
        if box[0] > size["width"] or box[1] > size["height"] or box[2] < 0 or box[3] < 0:
            # its token mask would be empty (boxes_to_token_mask): the sample would teach "drop every token"
            raise ValueError(f"{where}: box {box} lies wholly outside the {size['width']}x{size['height']} image: "
                             "boxes are pixels of the image as its width / height declare it (not normalised, "
                             "not another size's); a box partly outside is clipped")
    return Record(
        id=str(row.get("id", row.get("question_id", where))), image=str(row["image"]), question=str(row["question"]),
        answer=str(row["answer"]), width=size["width"], height=size["height"],
        bboxs=[[float(v) for v in b] for b in boxes], family=str(row.get("family", row.get("dataset", ""))),
    )


def read_records(path: str | Path, limit: int | None = None) -> list[Record]:
    """Records of a JSONL file (ours or Visual-CoT's); ``ValueError`` naming the file and line on a bad row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no record file at {path}")
    out = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
            out.append(_parse(row, f"{path}:{n}"))
            if limit is not None and len(out) >= limit:
                break
    return _unique_ids(out, path)


def _unique_ids(records: list[Record], path: Path) -> list[Record]:
    """Results are matched to records by id (``--resume``, errors): a repeated id (Visual-CoT restarts
    ``question_id`` in every subset) becomes ``ID#2``, ``ID#3``, ... in file order, with a warning."""
    seen = {r.id for r in records}
    counts: dict[str, int] = {}
    renamed = 0
    for r in records:
        counts[r.id] = counts.get(r.id, 0) + 1
        if counts[r.id] > 1:
            k, new = counts[r.id], f"{r.id}#{counts[r.id]}"
            while new in seen:  # the file may hold an "ID#2" of its own
                k += 1
                new = f"{r.id}#{k}"
            seen.add(new)
            r.id = new
            renamed += 1
    if renamed:
        logger.warning("%s: %d records repeat an earlier record's id; they are named ID#2, ID#3, ... in file order",
                       path, renamed)
    return records


def boxes_on_image(record: Record, size: tuple[int, int]) -> list[list[float]]:
    """``record.bboxs`` on its image as loaded, of ``size`` (w, h). The boxes are pixels of the record's declared
    ``width`` x ``height``: a file of another size with the same aspect (a resized copy) gets them scaled; one of
    another aspect (an EXIF rotation the loader applied, another file) is an error naming the record, rather than
    box targets on the wrong tokens."""
    w, h = size
    if (w, h) == (record.width, record.height):
        return record.bboxs
    sx, sy = w / record.width, h / record.height
    if abs(sx / sy - 1) > 0.02:
        raise ValueError(f"record {record.id}: its width x height say {record.width}x{record.height} but its image "
                         f"{record.image} loads as {w}x{h} (EXIF orientation applied?): its boxes cannot be placed; "
                         "give the size of the image as displayed, with boxes in those pixels")
    return [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in record.bboxs]


def boxes_to_token_mask(boxes, width: int, height: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h, grid_w) bool: the tokens whose cell overlaps any box by a positive area.

    Boxes are pixel xyxy on a ``width x height`` image that the processor resized onto the ``grid_h x grid_w``
    token grid. Cell j spans [j, j+1) / grid in normalised units; a box [x1, x2) covers cells floor(x1 g) to
    ceil(x2 g) - 1, so an edge on a grid line does not spill into the next cell (upstream's inclusive floor
    does). A degenerate (zero-area) box marks the cell that contains it.
    """
    mask = np.zeros((grid_h, grid_w), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        if x1 > width or y1 > height or x2 < 0 or y2 < 0:
            continue  # entirely outside the image
        c1, c2 = _span(x1 / width, x2 / width, grid_w)
        r1, r2 = _span(y1 / height, y2 / height, grid_h)
        mask[r1:r2, c1:c2] = True
    return mask


POINTS = ("centre", "top_left")


def box_points(boxes, at: str = "centre") -> list[list[float]]:
    """Each pixel xyxy box reduced to one point, as a zero-area box: ``boxes_to_token_mask`` then marks the one token
    cell holding it (one token per object, whatever its size). ``at``: the box's centre, or its top-left corner (the
    object's first token in raster order).

    >>> box_points([[28, 56, 84, 112], [0, 0, 28, 28]])
    [[56.0, 84.0, 56.0, 84.0], [14.0, 14.0, 14.0, 14.0]]
    >>> box_points([[28, 56, 84, 112]], "top_left")
    [[28.0, 56.0, 28.0, 56.0]]
    """
    if at not in POINTS:
        raise ValueError(f"a box point is one of {POINTS}, got {at!r}")
    out = []
    for x1, y1, x2, y2 in boxes:
        x, y = ((float(x1) + float(x2)) / 2, (float(y1) + float(y2)) / 2) if at == "centre" else (float(x1), float(y1))
        out.append([x, y, x, y])
    return out


def mask_boxes(boxes, family: str, point_families, point_at: str = "centre") -> list:
    """The boxes a training target (token mask) is built from: the answer's boxes, or one point of each (``point_at``,
    see ``box_points``) when the record's family is in ``point_families``."""
    return box_points(boxes, point_at) if family in point_families else list(boxes)


def _span(a: float, b: float, n: int) -> tuple[int, int]:
    a, b = min(max(a, 0.0), 1.0), min(max(b, 0.0), 1.0)
    lo = min(int(math.floor(a * n + 1e-9)), n - 1)
    hi = max(int(math.ceil(b * n - 1e-9)), lo + 1)
    return lo, min(hi, n)


def _split_record(n: int, seed: int, name: str, world: WorldConfig) -> dict:
    return {"command": "make-world", "settings": {"n": n, "seed": seed, "name": name, "world": asdict(world)}}


def _split_marker(out_dir: Path, name: str) -> Path:
    from ..outputs import RUN_MARKER

    return out_dir / f"{name}.{RUN_MARKER}"  # one per split file: train.jsonl and eval.jsonl may share a folder


def has_split(out_dir: str | Path, n: int, seed: int, cfg: WorldConfig | None = None,
              name: str = "records.jsonl") -> bool:
    """True when ``out_dir`` already holds this very split, complete (``write_split`` with the same arguments)."""
    from ..outputs import holds_run

    record = _split_record(n, seed, name, cfg or WorldConfig())
    return holds_run(out_dir, name, record["command"], record["settings"], _split_marker(Path(out_dir), name).name)


def relative_paths_in(path: Path, key: str) -> list[Path]:
    """The relative paths (no ``..``) that an existing JSONL file's rows name under ``key`` (a path or a list of
    paths): the files a split owns. Unreadable lines, absolute paths and paths leaving the folder are ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line).get(key)
        except (json.JSONDecodeError, AttributeError):
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and not Path(item).is_absolute() and ".." not in Path(item).parts:
                out.append(Path(item))
    return out


def _images_of(path: Path) -> list[str]:
    """Relative image paths (as glob patterns) of an existing records file."""
    import glob

    return [glob.escape(str(p)) for p in relative_paths_in(path, "image")]


def write_split(out_dir: str | Path, n: int, seed: int, cfg: WorldConfig | None = None,
                name: str = "records.jsonl", overwrite: bool = False) -> Path:
    """Render ``n`` samples (families in turn, seeds ``seed*10^6 + i``) as PNGs plus one JSONL; returns its path.

    A folder that already holds a split file of this name is refused unless ``overwrite`` (that file, its images and
    its run record are removed first). The records file is written last and atomically: a split is complete when it
    exists.
    """
    from ..outputs import atomic_write_text, claim_run_dir

    if n < 1:
        raise ValueError(f"a split needs at least one sample, got n={n}")
    out_dir = Path(out_dir)
    path = out_dir / name
    world = cfg or WorldConfig()
    record = _split_record(n, seed, name, world)
    owned = [name, f"images/{seed}-*.png", *_images_of(path)]  # the earlier split's images go with it
    claim_run_dir(out_dir, "make-world", record["settings"], owned, overwrite=overwrite, resume_flag="",
                  marker=_split_marker(out_dir, name).name)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        s = sample(seed * 1_000_000 + i, FAMILIES[i % len(FAMILIES)], world)
        rel = f"images/{seed}-{i:06d}.png"
        render(s.scene).save(out_dir / rel)
        w, h = s.scene.size
        rec = Record(f"{seed}-{i:06d}", rel, s.question, s.answer, w, h, s.boxes, s.family)
        lines.append(json.dumps(asdict(rec)) + "\n")
    atomic_write_text(path, "".join(lines))
    return path
