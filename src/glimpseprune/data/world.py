"""The synthetic VQA world: grid-aligned objects (shape x colour x glyph) on cluttered canvases, five question
families, and exact answer boxes. Deterministic by seed; no file IO here (see ``records.py``).

A canvas is ``cols x rows`` cells of ``CELL`` = 28 px, i.e. one Qwen2.5-VL visual token per cell (14 px patches,
2 x 2 merge). Objects fill a 1 x 1 or 2 x 2 block of cells, so a box covers whole tokens and the answer lives in
those tokens. Families and what they need of the image:

- ``lookup``   "What colour is the circle?" / "What shape is the red object?": one object.
- ``glyph``    "What letter is on the red circle?": fine detail of one object.
- ``count``    "How many red objects are there?": every object of a colour (1-4 of them).
- ``relation`` "Do the circle and the square have the same colour?": two objects.
- ``exist``    "Is there a red circle?": one object for "yes"; for "no" every object must be checked and ruled out, so
  all objects are its boxes (the evidence of an absence).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CELL = 28
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# 5 x 5 bitmaps of the glyph letters, drawn in white (black on yellow/cyan) inside the object
GLYPHS = {
    "A": ("01110", "10001", "11111", "10001", "10001"),
    "E": ("11111", "10000", "11110", "10000", "11111"),
    "T": ("11111", "00100", "00100", "00100", "00100"),
    "X": ("10001", "01010", "00100", "01010", "10001"),
}
FAMILIES = ("lookup", "glyph", "count", "relation", "exist")
NUMBERS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    glyph: str
    col: int  # top-left cell
    row: int
    size: int  # cells per side (1 or 2)

    @property
    def box(self) -> list[int]:
        """Pixel box [x1, y1, x2, y2], exclusive end."""
        return [self.col * CELL, self.row * CELL, (self.col + self.size) * CELL, (self.row + self.size) * CELL]


CLUTTER = 12  # grey strokes per 64 cells: the default of WorldConfig.clutter, Scene.clutter and Clip.clutter


@dataclass
class Scene:
    cols: int
    rows: int
    objects: list[Obj]
    clutter_seed: int
    clutter: int = CLUTTER  # grey strokes per 64 cells (WorldConfig.clutter)

    @property
    def size(self) -> tuple[int, int]:
        return self.cols * CELL, self.rows * CELL


@dataclass
class Sample:
    scene: Scene
    question: str
    answer: str
    family: str
    boxes: list[list[int]]


@dataclass(frozen=True)
class WorldConfig:
    min_cells: int = 8  # 224 px
    max_cells: int = 16  # 448 px
    min_objects: int = 2
    max_objects: int = 7
    big_prob: float = 0.4  # chance an object spans 2 x 2 cells
    clutter: int = CLUTTER  # grey strokes per 64 cells

    def __post_init__(self):
        if not 2 <= self.min_cells <= self.max_cells <= 64:
            raise ValueError(f"need 2 <= min_cells <= max_cells <= 64, got {self.min_cells}, {self.max_cells}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.clutter < 0:
            raise ValueError(f"clutter must be >= 0, got {self.clutter}")


# --------------------------------------------------------------------------- scenes


def _free_spot(taken: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int] | None:
    rows, cols = taken.shape
    spots = [(c, r) for r in range(rows - size + 1) for c in range(cols - size + 1)
             if not taken[max(0, r - 1):r + size + 1, max(0, c - 1):c + size + 1].any()]
    if not spots:
        return None
    return spots[int(rng.integers(len(spots)))]


def place_objects(cols: int, rows: int, specs: list[tuple[str, str]], cfg: WorldConfig,
                  rng: np.random.Generator) -> list[Obj] | None:
    """Place (shape, colour) specs on free cells with a one-cell gap between objects; None if they do not fit."""
    taken = np.zeros((rows, cols), dtype=bool)
    out = []
    glyphs = list(GLYPHS)
    for shape, colour in specs:
        size = 2 if rng.random() < cfg.big_prob else 1
        spot = _free_spot(taken, size, rng)
        if spot is None and size == 2:
            size, spot = 1, _free_spot(taken, 1, rng)
        if spot is None:
            return None
        c, r = spot
        taken[r:r + size, c:c + size] = True
        out.append(Obj(shape, colour, glyphs[int(rng.integers(len(glyphs)))], c, r, size))
    return out


def _distinct_specs(n: int, rng: np.random.Generator, avoid: set | None = None) -> list[tuple[str, str]]:
    """n distinct (shape, colour) pairs, none in ``avoid``."""
    pool = [(s, c) for s in SHAPES for c in COLOURS if not avoid or (s, c) not in avoid]
    idx = rng.permutation(len(pool))[:n]
    return [pool[i] for i in idx]


# --------------------------------------------------------------------------- rendering


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    x1, y1, x2, y2 = obj.box
    m = 2 + obj.size  # margin inside the block
    x1, y1, x2, y2 = x1 + m, y1 + m, x2 - m - 1, y2 - m - 1
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x1, y1, x2, y2], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    else:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)


def _draw_glyph(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
    bitmap = GLYPHS[obj.glyph]
    px = 3 * obj.size  # glyph pixel size: 15 px letter in a 28 px object, 30 px in a 56 px one
    x1, y1, x2, y2 = obj.box
    ox = (x1 + x2) // 2 - 5 * px // 2
    oy = (y1 + y2) // 2 - 5 * px // 2 + (obj.size if obj.shape == "triangle" else 0)
    ink = (0, 0, 0) if obj.colour in ("yellow", "cyan") else (255, 255, 255)
    for r, line in enumerate(bitmap):
        for c, bit in enumerate(line):
            if bit == "1":
                draw.rectangle([ox + c * px, oy + r * px, ox + (c + 1) * px - 1, oy + (r + 1) * px - 1], fill=ink)


def render(scene: Scene) -> Image.Image:
    """Draw a scene: light noisy background, grey clutter strokes, then the objects with their glyphs."""
    rng = np.random.default_rng(scene.clutter_seed)
    w, h = scene.size
    base = rng.integers(225, 246, size=(h // 4 + 1, w // 4 + 1, 1)).repeat(3, axis=2).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for _ in range(int(scene.clutter * scene.cols * scene.rows / 64)):
        x, y = rng.integers(0, w), rng.integers(0, h)
        dx, dy = rng.integers(-20, 21, size=2)
        g = int(rng.integers(90, 200))
        draw.line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=(g, g, g), width=int(rng.integers(1, 3)))
    for obj in scene.objects:
        _draw_shape(draw, obj)
        _draw_glyph(draw, obj)
    return img


def cell_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Dense (rows, cols) labels per visual token: colour / shape / glyph index + 1, 0 for background, and ``part``:
    which cell of its object a token is (1 a whole 1 x 1 object, 2-5 the top-left / top-right / bottom-left /
    bottom-right quarter of a 2 x 2 one), so that objects, not tokens, can be counted."""
    out = {k: np.zeros((scene.rows, scene.cols), dtype=np.int64) for k in ("colour", "shape", "glyph", "part")}
    for o in scene.objects:
        sl = (slice(o.row, o.row + o.size), slice(o.col, o.col + o.size))
        out["colour"][sl] = list(COLOURS).index(o.colour) + 1
        out["shape"][sl] = SHAPES.index(o.shape) + 1
        out["glyph"][sl] = list(GLYPHS).index(o.glyph) + 1
        out["part"][sl] = 1 if o.size == 1 else np.array([[2, 3], [4, 5]])
    return out


# --------------------------------------------------------------------------- questions


def _unique(objs: list[Obj], key) -> list[Obj]:
    vals = [key(o) for o in objs]
    return [o for o in objs if vals.count(key(o)) == 1]


def _q_lookup(objs, rng):
    if rng.random() < 0.5:
        cands = _unique(objs, lambda o: o.shape)
        if cands:
            o = cands[int(rng.integers(len(cands)))]
            return f"What colour is the {o.shape}?", o.colour, [o]
    cands = _unique(objs, lambda o: o.colour)
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    return f"What shape is the {o.colour} object?", o.shape, [o]


def _q_glyph(objs, rng):
    o = objs[int(rng.integers(len(objs)))]
    return f"What letter is on the {o.colour} {o.shape}?", o.glyph, [o]


def _q_relation(objs, rng):
    cands = _unique(objs, lambda o: o.shape)
    if len(cands) < 2:
        return None
    i, j = rng.permutation(len(cands))[:2]
    a, b = cands[i], cands[j]
    answer = "yes" if a.colour == b.colour else "no"
    return f"Do the {a.shape} and the {b.shape} have the same colour?", answer, [a, b]


def _q_exist(objs, rng, target):
    if target is not None:  # ruling an object out means checking every object: all of them are the evidence
        return f"Is there a {target[1]} {target[0]}?", "no", list(objs)
    o = objs[int(rng.integers(len(objs)))]
    return f"Is there a {o.colour} {o.shape}?", "yes", [o]


def _specs_for(family: str, n: int, rng: np.random.Generator):
    """Object specs built so the family's question exists and its answers are balanced."""
    colours = list(COLOURS)
    if family == "count":
        colour = colours[int(rng.integers(len(colours)))]
        k = int(rng.integers(1, min(4, n) + 1))
        shapes = [SHAPES[int(i)] for i in rng.integers(0, len(SHAPES), size=k)]
        others = [c for c in colours if c != colour]
        rest = [(SHAPES[int(rng.integers(len(SHAPES)))], others[int(rng.integers(len(others)))]) for _ in range(n - k)]
        return [(s, colour) for s in shapes] + rest, colour
    if family == "relation":
        specs = _distinct_specs(n, rng)
        if rng.random() < 0.5:  # force a same-colour pair of distinct shapes
            s = [sp for sp in specs if [x[0] for x in specs].count(sp[0]) == 1]
            if len(s) >= 2:
                specs[specs.index(s[1])] = (s[1][0], s[0][1])
        return specs, None
    if family == "exist" and rng.random() < 0.5:
        specs = _distinct_specs(n, rng)
        missing = _distinct_specs(1, rng, avoid=set(specs))[0]
        return specs, missing
    return _distinct_specs(n, rng), None


def sample(seed: int, family: str | None = None, cfg: WorldConfig = WorldConfig()) -> Sample:
    """One (scene, question, answer, boxes) sample, fully determined by ``seed`` (and ``family`` when given)."""
    rng = np.random.default_rng(seed)
    if family is None:
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; choose from {FAMILIES}")
    for _ in range(100):
        cols, rows = (int(v) for v in rng.integers(cfg.min_cells, cfg.max_cells + 1, size=2))
        cap = max(cfg.min_objects, min(cfg.max_objects, cols * rows // 12))
        n = int(rng.integers(cfg.min_objects, cap + 1))
        specs, extra = _specs_for(family, n, rng)
        objs = place_objects(cols, rows, specs, cfg, rng)
        if not objs:
            continue
        if family == "count":
            chosen = [o for o in objs if o.colour == extra]
            q = (f"How many {extra} objects are there?", NUMBERS[len(chosen)], chosen)
        elif family == "exist":
            q = _q_exist(objs, rng, extra)
        else:
            q = {"lookup": _q_lookup, "glyph": _q_glyph, "relation": _q_relation}[family](objs, rng)
        if q is None:
            continue
        question, answer, chosen = q
        scene = Scene(cols, rows, objs, int(rng.integers(2**31)), cfg.clutter)
        return Sample(scene, question, answer, family, [o.box for o in chosen])
    raise RuntimeError(f"could not build a {family!r} sample for seed {seed}; check the WorldConfig")


def answer_vocabulary() -> list[str]:
    return sorted(set(COLOURS) | set(SHAPES) | set(GLYPHS) | set(NUMBERS[1:5]) | {"yes", "no"})


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Questions and answers of the world, for training a tokenizer whose words are single tokens."""
    lines = []
    for i in range(n):
        s = sample(seed * 1_000_003 + i, FAMILIES[i % len(FAMILIES)])
        lines += [s.question, s.answer]
    return lines + answer_vocabulary()
