"""Synthetic scenes for the demo model: 1–3 flat shapes on a neutral background, with questions.

Everything is a pure function of an integer seed: `make_scene(seed)` gives the same shapes,
background and image size every time, `Scene.render()` the same pixels, and the question
templates the same canonical answers. The answers are short and canonical ("Red.",
"A triangle.", "Three.", "Left.") so accuracy is exact match after `normalize_answer`.

Layout rules that keep every answer well defined:
- every shape in a scene has its own colour, so "the red circle" / "What shape is red?" names one shape;
- shapes sit in distinct cells of a small grid (1×1, 2×1, 1×2, 2×2, 3×1, 1×3), so they never overlap;
- a shape is "left" only when all of it lies left of the vertical midline by a clear gap (the same
  for right / top / bottom), and position questions are asked only about such shapes;
- backgrounds are greys (at most a faint tint), shapes are saturated colours: they never share a colour.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 155, 55),
    "blue": (35, 80, 225),
    "yellow": (240, 205, 25),
    "purple": (140, 55, 190),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
QUESTION_TYPES = ("colour", "shape", "count", "position", "describe")
NUMBER_WORDS = {1: "One", 2: "Two", 3: "Three"}

# disjoint seed ranges, so the evaluation never sees a training scene
EVAL_SEED_BASE = 0  # scripts/eval_demo_model.py: scenes 0, 1, 2, …
HELDOUT_SEED_BASE = 500_000_000  # the held-out accuracy printed while training
CALIBRATION_SEED_BASE = 900_000_000  # calibration images for the 4-bit quantizer (eval script)
TRAIN_SEED_BASE = 1_000_000_000  # training scenes: base + run seed · 10¹² + a counter

COLOUR_JITTER = 12  # per channel, so the model cannot key on one exact RGB value
MIN_SIDE, MAX_SIDE = 250, 1400
GAP = 0.03  # a "left" shape ends at least this fraction of the width before the midline

# question templates per type; {colour} / {shape} name a shape of the scene
COLOUR_ONE = ("What colour is the shape?", "What color is the shape?")
COLOUR_BY_SHAPE = ("What colour is the {shape}?", "What color is the {shape}?")
SHAPE_ONE = ("What shape is in the image?", "What shape is this?")
SHAPE_BY_COLOUR = ("What shape is {colour}?", "What shape is the {colour} one?")
COUNT = ("How many shapes are there?", "How many shapes are in the image?")
POSITION_H = ("Is the {colour} {shape} on the left or the right?",)
POSITION_V = ("Is the {colour} {shape} at the top or the bottom?",)
DESCRIBE = ("Describe the image in one sentence.",)

# grids (columns, rows) a scene of n shapes may use
_GRIDS = {1: ((1, 1), (2, 1), (1, 2), (2, 2)), 2: ((2, 1), (1, 2), (2, 2)), 3: ((3, 1), (1, 3), (2, 2))}
_H_RANK = {"left": 0, None: 1, "right": 2}
_V_RANK = {"top": 0, None: 1, "bottom": 2}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    rgb: tuple[int, int, int]  # the exact fill (the colour with a little jitter)
    center: tuple[float, float]
    radius: float  # every point of the shape is within this distance of the centre
    rotation: float  # degrees
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 of the drawn outline
    horizontal: str | None  # "left", "right", or None when the shape reaches across the midline
    vertical: str | None  # "top", "bottom", or None

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    def outline(self) -> list[tuple[float, float]]:
        """Polygon vertices (empty for a circle)."""
        return _outline(self.kind, self.center, self.radius, self.rotation)


@dataclass(frozen=True)
class Background:
    grey: int  # base level 0–255
    tint: tuple[int, int, int]  # small per-channel offset (|t| ≤ 5), keeps it neutral
    texture: str  # plain, noise, gradient, stripes, checker
    strength: int  # texture amplitude in grey levels
    period: int  # stripes / checker period in pixels
    direction: int  # 0 horizontal, 1 vertical, 2 diagonal


@dataclass(frozen=True)
class QA:
    type: str  # one of QUESTION_TYPES
    question: str
    answer: str


@dataclass(frozen=True)
class Scene:
    seed: int
    width: int
    height: int
    background: Background
    shapes: tuple[Shape, ...]
    easy: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    # ---- pixels ---------------------------------------------------------------------------
    def render(self) -> Image.Image:
        """The scene as an RGB image of `size`; shapes are solid fills of their exact `rgb`."""
        image = Image.fromarray(_background_pixels(self.background, self.width, self.height, self.seed), "RGB")
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            if shape.kind == "circle":
                cx, cy = shape.center
                r = shape.radius
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shape.rgb)
            else:
                draw.polygon(shape.outline(), fill=shape.rgb)
        return image

    def label_map(self) -> Image.Image:
        """Mode "L" image of `size`: 0 for background, k + 1 where shape k is drawn (same outlines
        as `render`). Training uses it for dense per-token supervision of the vision side."""
        image = Image.new("L", self.size, 0)
        draw = ImageDraw.Draw(image)
        for k, shape in enumerate(self.shapes):
            if shape.kind == "circle":
                cx, cy = shape.center
                r = shape.radius
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=k + 1)
            else:
                draw.polygon(shape.outline(), fill=k + 1)
        return image

    # ---- text -----------------------------------------------------------------------------
    def description(self) -> str:
        """The canonical one-sentence description, shapes from left to right, then top to bottom."""
        ordered = sorted(self.shapes, key=lambda s: (_H_RANK[s.horizontal], _V_RANK[s.vertical], s.center[0], s.center[1]))
        phrases = [f"{_article(s.colour)} {s.name}{_place_phrase(s)}" for s in ordered]
        if len(phrases) == 1:
            text = phrases[0]
        else:
            text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return text[0].upper() + text[1:] + "."

    def questions(self) -> dict[str, list[QA]]:
        """Every question this scene supports, by type (a type with no valid question is absent)."""
        shapes = self.shapes
        one = len(shapes) == 1
        out: dict[str, list[QA]] = {t: [] for t in QUESTION_TYPES}
        kinds = [s.kind for s in shapes]
        for s in shapes:
            colour = s.colour.capitalize() + "."
            if one:
                out["colour"] += [QA("colour", q, colour) for q in COLOUR_ONE]
            if kinds.count(s.kind) == 1:  # "the circle" must name exactly one shape
                out["colour"] += [QA("colour", q.format(shape=s.kind), colour) for q in COLOUR_BY_SHAPE]
            shape = f"A {s.kind}."
            if one:
                out["shape"] += [QA("shape", q, shape) for q in SHAPE_ONE]
            out["shape"] += [QA("shape", q.format(colour=s.colour), shape) for q in SHAPE_BY_COLOUR]
            if s.horizontal is not None:
                out["position"] += [
                    QA("position", q.format(colour=s.colour, shape=s.kind), s.horizontal.capitalize() + ".") for q in POSITION_H
                ]
            if s.vertical is not None:
                out["position"] += [
                    QA("position", q.format(colour=s.colour, shape=s.kind), s.vertical.capitalize() + ".") for q in POSITION_V
                ]
        out["count"] = [QA("count", q, NUMBER_WORDS[len(shapes)] + ".") for q in COUNT]
        out["describe"] = [QA("describe", q, self.description()) for q in DESCRIBE]
        return {t: qs for t, qs in out.items() if qs}

    def question(self, qtype: str, rng: random.Random) -> QA | None:
        """One question of `qtype` (uniform over this scene's choices), or None if it has none."""
        choices = self.questions().get(qtype)
        return rng.choice(choices) if choices else None

    def conversation(self, rng: random.Random, turns: int, types: tuple[str, ...] = QUESTION_TYPES) -> list[QA]:
        """Up to `turns` questions of distinct types (random order), as one multi-turn chat asks them."""
        available = self.questions()
        chosen = [t for t in types if t in available]
        rng.shuffle(chosen)
        return [rng.choice(available[t]) for t in chosen[:turns]]


# ---------------------------------------------------------------- generation


def make_scene(seed: int, easy: bool = False) -> Scene:
    """The scene of `seed`. `easy` scenes (the training curriculum's start) hold one large shape,
    mostly centred, else filling one half, on a small near-square image (a single tile)."""
    rng = random.Random(seed)
    width, height = sample_size(rng, easy)
    background = _sample_background(rng)
    n = 1 if easy else rng.randint(1, 3)
    cells = _sample_cells(rng, n, width, height, easy)
    colours = rng.sample(list(COLOURS), n)
    shapes = []
    for (cell, centred), colour in zip(cells, colours):
        kind = rng.choice(SHAPES)
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
        shapes.append(_place_shape(rng, kind, colour, rgb, cell, centred, width, height, easy))
    return Scene(seed, width, height, background, tuple(shapes), easy)


def sample_size(rng: random.Random, easy: bool = False) -> tuple[int, int]:
    """Image (width, height), so that every tiling path is common:
    45 % near-square up to 620 px (one tile); 15 % near-square 640–1000 px (2×2 or 3×3 + thumbnail,
    the equal-aspect tie rule); 20 % about 2:1 or 1:2 (2 tiles + thumbnail); 20 % any aspect in
    1:2…2:1 up to 1400 px (up to 12 tiles + thumbnail). Easy scenes are near-square, one tile."""
    u = rng.random()
    if easy or u < 0.6:
        aspect = math.exp(rng.uniform(math.log(0.88), math.log(1.14)))
        long_side = rng.randint(300, 620) if easy or u < 0.45 else rng.randint(640, 1000)
    elif u < 0.8:
        aspect = rng.uniform(1.8, 2.25)
        aspect = aspect if rng.random() < 0.5 else 1 / aspect
        long_side = rng.randint(600, MAX_SIDE)
    else:
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        long_side = rng.randint(400, MAX_SIDE)
    if aspect >= 1:
        return long_side, max(MIN_SIDE, round(long_side / aspect))
    return max(MIN_SIDE, round(long_side * aspect)), long_side


def _sample_background(rng: random.Random) -> Background:
    grey = rng.choice((rng.randint(225, 250), rng.randint(185, 215), rng.randint(110, 150), rng.randint(25, 60)))
    tint = tuple(rng.randint(-5, 5) for _ in range(3))
    texture = rng.choice(("plain", "plain", "noise", "gradient", "stripes", "checker"))
    return Background(
        grey=grey,
        tint=tint,
        texture=texture,
        strength=rng.randint(6, 16),
        period=rng.randint(12, 48),
        direction=rng.randint(0, 2),
    )


def _background_pixels(bg: Background, width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: grey + texture (identical on all channels) + tint, so it stays neutral."""
    if bg.texture == "noise":
        noise_rng = np.random.default_rng(seed & 0xFFFFFFFF)
        level = bg.grey + noise_rng.integers(-bg.strength // 2, bg.strength // 2 + 1, size=(height, width), dtype=np.int16)
    else:
        ys, xs = np.ogrid[0:height, 0:width]  # broadcast: no full-size index arrays
        coord = (ys, xs, xs + ys)[bg.direction]
        if bg.texture == "gradient":
            span = max(1, (height, width, width + height)[bg.direction] - 1)
            offset = np.rint((coord / span - 0.5) * 2 * bg.strength).astype(np.int16)
        elif bg.texture == "stripes":
            offset = ((coord // bg.period) % 2).astype(np.int16) * bg.strength
        elif bg.texture == "checker":
            offset = (((xs // bg.period) + (ys // bg.period)) % 2).astype(np.int16) * bg.strength
        else:
            offset = np.zeros((height, width), dtype=np.int16)
        # keep the textured level on the same side of mid-grey as the base level
        level = bg.grey + np.broadcast_to(offset if bg.grey < 128 else -offset, (height, width))
    rgb = level[:, :, None] + np.asarray(bg.tint, dtype=np.int16)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _sample_cells(rng: random.Random, n: int, width: int, height: int, easy: bool) -> list[tuple[tuple[float, float, float, float], str | None]]:
    """n distinct grid cells (x0, y0, w, h) and how to centre the shape in each (None, "x" or "y")."""
    if easy:
        grid = rng.choice(((1, 1), (1, 1), (1, 1), (2, 1), (1, 2)))
    else:
        grids = [g for g in _GRIDS[n] if not (g == (3, 1) and width < 0.9 * height) and not (g == (1, 3) and height < 0.9 * width)]
        grid = rng.choice(grids)
    cols, rows = grid
    cell_w, cell_h = width / cols, height / rows
    picks = rng.sample([(c, r) for r in range(rows) for c in range(cols)], n)
    cells = []
    for c, r in picks:
        centred = None
        if easy and grid == (1, 1):
            centred = "xy"
        elif cols == 3 and c == 1:
            centred = "x"  # the middle of three columns reaches across the midline: neither left nor right
        elif rows == 3 and r == 1:
            centred = "y"
        cells.append(((c * cell_w, r * cell_h, cell_w, cell_h), centred))
    return cells


def _place_shape(
    rng: random.Random,
    kind: str,
    colour: str,
    rgb: tuple[int, ...],
    cell: tuple[float, float, float, float],
    centred: str | None,
    width: int,
    height: int,
    easy: bool,
) -> Shape:
    x0, y0, cw, ch = cell
    # margins keep shapes off the borders and clear of the midlines by more than GAP
    mx, my = (GAP + 0.01) * width + 2, (GAP + 0.01) * height + 2
    r_max = 0.5 * min(cw - 2 * mx, ch - 2 * my)
    r = r_max * (rng.uniform(0.75, 0.95) if easy else rng.uniform(0.55, 0.95))
    cx = rng.uniform(x0 + mx + r, x0 + cw - mx - r)
    cy = rng.uniform(y0 + my + r, y0 + ch - my - r)
    if centred and "x" in centred:
        cx = width / 2 + rng.uniform(-0.02, 0.02) * width
    if centred and "y" in centred:
        cy = height / 2 + rng.uniform(-0.02, 0.02) * height
    rotation = 0.0 if kind == "circle" else rng.uniform(-12.0, 12.0)
    points = _outline(kind, (cx, cy), r, rotation)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        bbox = (min(xs), min(ys), max(xs), max(ys))
    else:
        bbox = (cx - r, cy - r, cx + r, cy + r)
    return Shape(
        kind=kind,
        colour=colour,
        rgb=tuple(rgb),  # type: ignore[arg-type]
        center=(cx, cy),
        radius=r,
        rotation=rotation,
        bbox=bbox,
        horizontal=side_of(bbox[0], bbox[2], width, ("left", "right")),
        vertical=side_of(bbox[1], bbox[3], height, ("top", "bottom")),
    )


def side_of(lo: float, hi: float, extent: int, names: tuple[str, str]) -> str | None:
    """names[0] if [lo, hi] ends clearly before the middle of [0, extent], names[1] if it starts
    clearly after, None otherwise. One pixel of slack covers the rasteriser's rounding."""
    gap = GAP * extent
    if hi + 1 <= extent / 2 - gap:
        return names[0]
    if lo - 1 >= extent / 2 + gap:
        return names[1]
    return None


def _outline(kind: str, center: tuple[float, float], r: float, rotation: float) -> list[tuple[float, float]]:
    cx, cy = center
    if kind == "circle":
        return []
    if kind == "square":
        # half side 0.8 r: with |rotation| ≤ 12° the corners stay within r of the centre
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        radii = [0.8 * r * math.sqrt(2)] * 4
        angles = [math.degrees(math.atan2(y, x)) for x, y in corners]
    elif kind == "triangle":
        radii = [r] * 3
        angles = [-90.0, 30.0, 150.0]  # pointing up
    elif kind == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        angles = [-90.0 + 36.0 * k for k in range(10)]
    else:
        raise ValueError(f"unknown shape {kind!r}; use one of {', '.join(SHAPES)}")
    out = []
    for radius, angle in zip(radii, angles):
        a = math.radians(angle + rotation)
        out.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _place_phrase(shape: Shape) -> str:
    h, v = shape.horizontal, shape.vertical
    if h and v:
        return f" at the {v} {h}"
    if h:
        return f" on the {h}"
    if v:
        return f" at the {v}"
    return " in the middle"


# ---------------------------------------------------------------- answers


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing full stop."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def answers_match(predicted: str, expected: str) -> bool:
    return normalize_answer(predicted) == normalize_answer(expected)


def corpus_texts(num_scenes: int = 400, seed: int = 0) -> list[str]:
    """Every question template and answer word, plus descriptions of `num_scenes` scenes: the text
    the demo tokenizer is trained on, so every prompt and answer costs few tokens."""
    texts = list(COLOUR_ONE + SHAPE_ONE + COUNT + DESCRIBE)
    for colour in COLOURS:
        texts.append(colour.capitalize() + ".")
        texts += [q.format(colour=colour) for q in SHAPE_BY_COLOUR]
        for kind in SHAPES:
            texts += [q.format(colour=colour, shape=kind) for q in POSITION_H + POSITION_V]
    for kind in SHAPES:
        texts.append(f"A {kind}.")
        texts += [q.format(shape=kind) for q in COLOUR_BY_SHAPE]
    texts += [w + "." for w in NUMBER_WORDS.values()] + ["Left.", "Right.", "Top.", "Bottom."]
    texts += [make_scene(seed * 1_000_003 + k).description() for k in range(num_scenes)]
    return texts
