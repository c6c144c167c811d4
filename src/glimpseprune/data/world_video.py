"""Short clips of the synthetic world: the answer lives in some frames only.

A clip is ``frames`` frames of one scene (same canvas, same clutter). Frames come in pairs — Qwen-VL models merge
``temporal_patch_size`` = 2 consecutive frames into one visual token — and the pairs are the clip's *moments*. The
question's evidence objects are visible in one moment only (chosen per sample); the other objects of the scene stay
in every frame, and distractors (objects that answer nothing) appear in the other moments. So a question is answered
by the tokens of one moment, and a pruner that keeps the right moment's tokens can drop most of the clip.

Families are the image world's (``lookup``, ``glyph``, ``count``, ``relation``, ``exist``) with the same questions and
answers; ``frame_boxes`` gives the evidence boxes per frame (empty where the evidence is not visible). Records:

    {"id": "v3-000001", "frames": ["videos/3-000001/0.png", ...], "question": "...", "answer": "red",
     "family": "lookup", "width": 280, "height": 224, "fps": 2.0, "moment": 1,
     "frame_boxes": [[], [], [[28, 56, 84, 112]], [[28, 56, 84, 112]]]}

Deterministic by seed, like the image world.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .world import CLUTTER, FAMILIES, Obj, Scene, WorldConfig, _distinct_specs, place_objects, render, sample

TEMPORAL_PATCH = 2  # frames per visual token of Qwen2.5-VL / Qwen3-VL


@dataclass(frozen=True)
class VideoConfig:
    frames: int = 4  # a multiple of TEMPORAL_PATCH
    fps: float = 2.0
    distractors: int = 2  # objects appearing in the other moments only
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self):
        if self.frames < 2 * TEMPORAL_PATCH or self.frames % TEMPORAL_PATCH:
            raise ValueError(f"frames must be a multiple of {TEMPORAL_PATCH} holding at least two moments, "
                             f"got {self.frames}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")

    @property
    def moments(self) -> int:
        return self.frames // TEMPORAL_PATCH


@dataclass
class Clip:
    """One clip: the objects visible per frame, the question, and its evidence boxes per frame."""

    cols: int
    rows: int
    clutter_seed: int
    visible: list[list[Obj]]  # per frame
    question: str
    answer: str
    family: str
    moment: int  # the moment (frame pair) holding the evidence
    frame_boxes: list[list[list[int]]]  # per frame
    clutter: int = CLUTTER  # grey strokes per 64 cells (WorldConfig.clutter)

    def frame(self, i: int) -> Image.Image:
        return render(Scene(self.cols, self.rows, self.visible[i], self.clutter_seed, self.clutter))


def clip_sample(seed: int, family: str | None = None, cfg: VideoConfig = VideoConfig()) -> Clip:
    """A clip whose question is the image world's question for ``seed``, its evidence shown in one moment only."""
    rng = np.random.default_rng(seed + 7_919)
    s = sample(seed, family, cfg.world)
    evidence_boxes = {tuple(b) for b in s.boxes}
    evidence = [o for o in s.scene.objects if tuple(o.box) in evidence_boxes]
    others = [o for o in s.scene.objects if tuple(o.box) not in evidence_boxes]
    if s.family == "exist" and s.answer == "no":
        evidence, others = [], s.scene.objects  # the absent object's evidence is the whole scene: shown throughout
    moment = int(rng.integers(cfg.moments))
    # distractors: new objects of colours/shapes the question does not ask about, on free cells, other moments only
    asked = {(o.shape, o.colour) for o in s.scene.objects}
    pool = _distinct_specs(cfg.distractors, rng, avoid=asked | _question_specs(s.question))
    taken = [(o.col, o.row, o.size) for o in s.scene.objects]
    extra = _place_around(s.scene.cols, s.scene.rows, pool, taken, cfg.world, rng)
    visible, frame_boxes = [], []
    for f in range(cfg.frames):
        m = f // TEMPORAL_PATCH
        objs = list(others) + (list(evidence) if m == moment else []) + (extra if m != moment else [])
        visible.append(objs)
        frame_boxes.append([o.box for o in evidence] if m == moment else [])
    if s.family == "exist" and s.answer == "no":
        frame_boxes = [[o.box for o in s.scene.objects] for _ in range(cfg.frames)]
    return Clip(s.scene.cols, s.scene.rows, s.scene.clutter_seed, visible, s.question, s.answer, s.family, moment,
                frame_boxes, s.scene.clutter)


def _question_specs(question: str) -> set:
    """(shape, colour) pairs a distractor must not be: any of the colours or shapes the question names (a red
    distractor changes "How many red objects...", a second circle "What colour is the circle?")."""
    from .world import COLOURS, SHAPES

    words = set(question.lower().rstrip("?").split())
    return {(s, c) for s in SHAPES for c in COLOURS if s in words or c in words}


def _place_around(cols: int, rows: int, specs, taken, cfg: WorldConfig, rng) -> list[Obj]:
    """Place ``specs`` on cells left free (with a gap) by the objects in ``taken``; those that do not fit are left
    out."""
    occupied = np.zeros((rows, cols), dtype=bool)
    for c, r, size in taken:
        occupied[r:r + size, c:c + size] = True
    out = []
    for spec in specs:
        placed = place_objects(cols, rows, [spec], cfg, rng)  # a candidate spot on an empty canvas ...
        for _ in range(20):
            if placed is None:
                break
            o = placed[0]
            r0, c0 = max(0, o.row - 1), max(0, o.col - 1)
            if not occupied[r0:o.row + o.size + 1, c0:o.col + o.size + 1].any():  # ... kept if it is free here
                occupied[o.row:o.row + o.size, o.col:o.col + o.size] = True
                out.append(o)
                break
            placed = place_objects(cols, rows, [spec], cfg, rng)
    return out


@dataclass
class VideoRecord:
    id: str
    frames: list[str]
    question: str
    answer: str
    family: str
    width: int
    height: int
    fps: float
    moment: int
    frame_boxes: list[list[list[int]]]

    def frame_paths(self, root: Path) -> list[Path]:
        return [p if Path(p).is_absolute() else Path(root) / p for p in map(Path, self.frames)]


VIDEO_COMMAND = "make-world --video"


def _video_marker(name: str) -> str:
    return f".{name}.run.json"


def _video_settings(n: int, seed: int, cfg: VideoConfig) -> dict:
    return {"n": n, "seed": seed, "frames": cfg.frames, "fps": cfg.fps, "distractors": cfg.distractors,
            "world": asdict(cfg.world)}


def has_video_split(out_dir: str | Path, n: int, seed: int, cfg: VideoConfig | None = None,
                    name: str = "video_records.jsonl") -> bool:
    """True when ``out_dir`` already holds this very split, complete (``write_video_split`` with the same
    arguments; the records file is written last)."""
    from ..outputs import holds_run

    return holds_run(out_dir, name, VIDEO_COMMAND, _video_settings(n, seed, cfg or VideoConfig()), _video_marker(name))


def _clip_folders_of(path: Path) -> list[str]:
    """The clip folders (``videos/<clip>``, as glob patterns) holding the frames of an existing video records file;
    frames outside that layout are ignored."""
    import glob

    from .records import relative_paths_in

    return sorted({glob.escape(f"videos/{p.parts[1]}") for p in relative_paths_in(path, "frames")
                   if len(p.parts) == 3 and p.parts[0] == "videos"})


def write_video_split(out_dir: str | Path, n: int, seed: int, cfg: VideoConfig | None = None,
                      name: str = "video_records.jsonl", overwrite: bool = False) -> Path:
    """Render ``n`` clips (families in turn) as PNG frames plus one JSONL; returns its path. A folder holding another
    split of this name is refused unless ``overwrite``; the records file is written last (complete when it exists)."""
    from ..outputs import atomic_write_text, claim_run_dir

    if n < 1:
        raise ValueError(f"a split needs at least one clip, got n={n}")
    cfg = cfg or VideoConfig()
    out_dir = Path(out_dir)
    settings = _video_settings(n, seed, cfg)
    owned = [name, f"videos/{seed}-*", *_clip_folders_of(out_dir / name)]  # the earlier split's clips go with it
    claim_run_dir(out_dir, VIDEO_COMMAND, settings, owned, overwrite=overwrite, resume_flag="",
                  marker=_video_marker(name))
    lines = []
    for i in range(n):
        clip = clip_sample(seed * 1_000_000 + i, FAMILIES[i % len(FAMILIES)], cfg)
        folder = f"videos/{seed}-{i:06d}"
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        rels = []
        for f in range(cfg.frames):
            rel = f"{folder}/{f}.png"
            clip.frame(f).save(out_dir / rel)
            rels.append(rel)
        rec = VideoRecord(f"v{seed}-{i:06d}", rels, clip.question, clip.answer, clip.family, clip.cols * 28,
                          clip.rows * 28, cfg.fps, clip.moment, clip.frame_boxes)
        lines.append(json.dumps(asdict(rec)) + "\n")
    atomic_write_text(out_dir / name, "".join(lines))
    return out_dir / name


def read_video_records(path: str | Path, limit: int | None = None) -> list[VideoRecord]:
    """Records of a video split; ``ValueError`` naming the file and line on a bad row."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no video split at {p} (make one with `glimpseprune make-world --video`)")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rec = VideoRecord(**{k: row[k] for k in VideoRecord.__dataclass_fields__})
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{p}:{n}: not a video record ({err})") from None
        if len(rec.frame_boxes) != len(rec.frames):
            raise ValueError(f"{p}:{n}: {len(rec.frames)} frames but {len(rec.frame_boxes)} frame_boxes")
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out
