"""The demo scenes: deterministic, and every answer agrees with the pixels actually drawn.

The checks read the rendered image (pixels of each shape's exact colour, their extent and
geometry), never the generator's own bookkeeping, so a wrong answer or a mislabelled position
cannot agree with itself.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from internvl_chat.demo.scenes import COLOURS, QUESTION_TYPES, SHAPES, answers_match, make_scene, normalize_answer
from internvl_chat.media.image import count_tiles

SEEDS = range(40)
NUMBERS = {"one": 1, "two": 2, "three": 3}


class Drawn:
    """A rendered scene and, per palette colour, the coordinates of its pixels (computed once)."""

    def __init__(self, seed: int):
        self.scene = make_scene(seed)
        self.pixels = np.asarray(self.scene.render(), dtype=np.int16)
        self.blobs = {c: np.nonzero(palette_mask(self.pixels, c))[::-1] for c in COLOURS}  # (xs, ys)
        self._kinds: dict[str, str] = {}

    def kind(self, colour: str) -> str:
        """The shape the pixels of this colour form."""
        if colour not in self._kinds:
            self._kinds[colour] = classify(*self.blobs[colour])
        return self._kinds[colour]


@pytest.fixture(scope="module")
def rendered() -> list[Drawn]:
    return [Drawn(seed) for seed in SEEDS]


def palette_mask(pixels: np.ndarray, colour: str, tolerance: int = 16) -> np.ndarray:
    """Pixels within the colour-jitter tolerance of a palette colour."""
    return np.abs(pixels - np.asarray(COLOURS[colour])).max(axis=-1) <= tolerance


def hull_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Area of the convex hull of the pixels (monotone chain over each row's two end pixels)."""
    points = []
    for y in np.unique(ys):
        row = xs[ys == y]
        points += [(float(row.min()), float(y)), (float(row.max()) + 1, float(y)), (float(row.min()), y + 1.0), (row.max() + 1.0, y + 1.0)]
    points = sorted(set(points))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(pts):
        chain = []
        for p in pts:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = half(points) + half(points[::-1])
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1])))


def classify(xs: np.ndarray, ys: np.ndarray) -> str:
    """Shape from pixels alone. A star is the one non-convex shape (area / hull area ≈ 0.56);
    the convex ones differ in the farthest pixel from the centroid relative to sqrt(area):
    circle 1/sqrt(pi) = 0.56, square sqrt(1/2) = 0.71, equilateral triangle 0.88."""
    if len(xs) / hull_area(xs, ys) < 0.75:
        return "star"
    cx, cy = xs.mean(), ys.mean()
    ratio = np.sqrt(((xs - cx) ** 2 + (ys - cy) ** 2).max()) / np.sqrt(len(xs))
    if ratio < 0.635:
        return "circle"
    if ratio < 0.79:
        return "square"
    return "triangle"


def find_colour_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in COLOURS]


def test_same_seed_same_scene_and_pixels():
    for seed in (0, 7, 123456):
        a, b = make_scene(seed), make_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
        assert a.questions() == b.questions()
        assert a.conversation(random.Random(1), 5) == b.conversation(random.Random(1), 5)
    assert make_scene(1) != make_scene(2)
    assert make_scene(3, easy=True) == make_scene(3, easy=True)


def test_image_sizes_vary_and_exercise_tiling():
    sizes = [make_scene(seed).size for seed in range(300)]
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    assert min(widths) >= 250 and min(heights) >= 250 and max(widths) <= 1400 and max(heights) <= 1400
    assert max(widths) > 1200 and min(widths) < 400
    tiles = {count_tiles(w, h) for w, h in sizes}
    assert 1 in tiles and 3 in tiles and 5 in tiles and max(tiles) >= 10  # single tile, 2×1, ties, large grids
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.6 and max(aspects) > 1.7
    counts = {len(make_scene(seed).shapes) for seed in range(300)}
    assert counts == {1, 2, 3}
    kinds = {s.kind for seed in range(300) for s in make_scene(seed).shapes}
    assert kinds == set(SHAPES) and {s.colour for seed in range(300) for s in make_scene(seed).shapes} == set(COLOURS)


def test_easy_scenes_are_single_large_shapes_on_one_tile():
    for seed in range(30):
        scene = make_scene(seed, easy=True)
        assert len(scene.shapes) == 1 and count_tiles(*scene.size) == 1
        shape = scene.shapes[0]
        assert 2 * shape.radius >= 0.3 * min(scene.size)


def test_colours_are_drawn_and_background_is_neutral(rendered):
    for drawn in rendered:
        scene, pixels = drawn.scene, drawn.pixels
        spread = pixels.max(axis=-1) - pixels.min(axis=-1)
        shape_pixels = np.zeros(pixels.shape[:2], dtype=bool)
        for shape in scene.shapes:
            exact = (pixels == np.asarray(shape.rgb)).all(axis=-1)
            assert exact.sum() > 200, f"seed {scene.seed}: {shape.name} has too few pixels"
            assert exact[int(shape.center[1]), int(shape.center[0])], "the shape's centre pixel has its colour"
            shape_pixels |= exact
        # everything else is grey (a faint tint at most): never confusable with a shape colour
        assert spread[~shape_pixels].max() <= 12
        assert all(max(c) - min(c) >= 100 for c in COLOURS.values())


def test_count_answer_matches_distinct_colour_blobs(rendered):
    for drawn in rendered:
        scene = drawn.scene
        present = [c for c in COLOURS if len(drawn.blobs[c][0]) > 200]
        qa = scene.questions()["count"][0]
        assert NUMBERS[normalize_answer(qa.answer)] == len(present) == len(scene.shapes)


def test_colour_and_shape_answers_match_pixels(rendered):
    checked = 0
    for drawn in rendered:
        scene = drawn.scene
        questions = scene.questions()
        for qa in questions.get("colour", []):
            colour = normalize_answer(qa.answer)
            assert len(drawn.blobs[colour][0]) > 200
            named = [k for k in SHAPES if k in qa.question]
            if named:  # "What colour is the circle?": the blob of that colour has that shape
                assert drawn.kind(colour) == named[0], (scene.seed, qa)
            else:  # "What colour is the shape?": there is only one
                assert len(scene.shapes) == 1
            checked += 1
        for qa in questions["shape"]:
            words = find_colour_words(qa.question)
            colour = words[0] if words else scene.shapes[0].colour
            kind = normalize_answer(qa.answer).removeprefix("a ")
            assert drawn.kind(colour) == kind, (scene.seed, qa)
            checked += 1
    assert checked > 100


def side(values: np.ndarray, extent: int) -> str | None:
    """Which half all pixels lie in, with a margin of 2 % of the side; None if they reach across."""
    margin = 0.02 * extent
    if values.max() < extent / 2 - margin:
        return "low"
    if values.min() > extent / 2 + margin:
        return "high"
    return None


def test_position_answers_are_unambiguous_and_match_pixels(rendered):
    asked = 0
    for drawn in rendered:
        scene = drawn.scene
        for qa in scene.questions().get("position", []):
            (colour,) = find_colour_words(qa.question)
            kind = next(k for k in SHAPES if k in qa.question)
            # the reference names exactly one shape: colours are unique within a scene
            assert sum(1 for s in scene.shapes if s.colour == colour) == 1
            assert sum(1 for s in scene.shapes if s.colour == colour and s.kind == kind) == 1
            xs, ys = drawn.blobs[colour]
            answer = normalize_answer(qa.answer)
            if "left or the right" in qa.question:
                assert answer in ("left", "right")
                assert side(xs, scene.width) == ("low" if answer == "left" else "high"), (scene.seed, qa)
            else:
                assert "top or the bottom" in qa.question and answer in ("top", "bottom")
                assert side(ys, scene.height) == ("low" if answer == "top" else "high"), (scene.seed, qa)
            asked += 1
    assert asked > 40


def test_description_matches_pixels(rendered):
    phrase = re.compile(r"(?:a|an) (\w+) (\w+)(?: (?:at|on|in) the (top|bottom)? ?(left|right|middle)?)?")
    for drawn in rendered:
        scene = drawn.scene
        sentence = scene.questions()["describe"][0].answer
        assert sentence[0].isupper() and sentence.endswith(".")
        parts = phrase.findall(sentence.lower())
        assert len(parts) == len(scene.shapes), sentence
        xs_order = []
        for colour, kind, vertical, horizontal in parts:
            xs, ys = drawn.blobs[colour]
            assert drawn.kind(colour) == kind, (scene.seed, sentence)
            hx, vy = side(xs, scene.width), side(ys, scene.height)
            if horizontal in ("left", "right"):
                assert hx == ("low" if horizontal == "left" else "high"), (scene.seed, sentence)
            if vertical:
                assert vy == ("low" if vertical == "top" else "high"), (scene.seed, sentence)
            if horizontal == "middle":
                assert vertical == "" and side(xs, scene.width) is None and side(ys, scene.height) is None
            xs_order.append({"left": 0, "right": 2}.get(horizontal, 1))
        assert xs_order == sorted(xs_order), "shapes are described from left to right"


def test_conversation_has_distinct_types_and_answers_normalise():
    rng = random.Random(0)
    for seed in range(30):
        scene = make_scene(seed)
        turns = scene.conversation(rng, 5)
        types = [qa.type for qa in turns]
        assert len(types) == len(set(types)) and set(types) <= set(QUESTION_TYPES)
        assert set(types) == set(scene.questions())  # five turns ask every available type
    assert answers_match(" red. ", "Red.") and answers_match("A  triangle", "a triangle.")
    assert not answers_match("Red.", "Blue.") and not answers_match("A triangle.", "Triangle.")
