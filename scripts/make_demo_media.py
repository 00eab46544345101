"""Draw the media of the scripted demo (`make demo`): a still scene and a short clip.

    scene.png  scene 6202820 of internvl_chat/demo/scenes.py (640×400): a yellow star at the top
               right and a green triangle at the bottom left, on a near-white ground
    clip.mp4   a green triangle moving from left to right (2 s, 12 fps)

The still is drawn by the same generator the embedded demo model was trained on, from a seed far
below the training range (the model never saw it), so `examples/demo.txt` can ask it the kinds of
questions the model was trained to answer and the canonical answers are known. The demo model is
far from perfect (benchmarks/RESULTS.md): on this picture it answers the count, a colour, a shape
and both positions right, but gets other questions about it wrong (e.g. "What colour is the
triangle?"). The clip is drawn with PIL and encoded with PyAV.
Usage: python scripts/make_demo_media.py --out-dir .cache/demo/
"""

from __future__ import annotations

import argparse
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from internvl_chat.demo.scenes import make_scene  # noqa: E402

# one of the few seeds whose scene is 640×400 (found by scanning sample_size); far below
# HELDOUT_SEED_BASE and TRAIN_SEED_BASE, so no training scene
DEMO_SCENE_SEED = 6_202_820
BACKGROUND = (200, 200, 196)
GREEN = (30, 155, 55)


def draw_scene() -> Image.Image:
    """The demo still: scenes.py's scene DEMO_SCENE_SEED, exactly as the generator renders it."""
    return make_scene(DEMO_SCENE_SEED).render()


def triangle(center: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    cx, cy = center
    return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]


def clip_frames(num_frames: int = 24, width: int = 320, height: int = 240) -> list[np.ndarray]:
    """A green triangle moving from the left edge to the right edge."""
    frames = []
    radius = height * 0.2
    for i in range(num_frames):
        x = radius + (width - 2 * radius) * i / max(num_frames - 1, 1)
        image = Image.new("RGB", (width, height), BACKGROUND)
        ImageDraw.Draw(image).polygon(triangle((x, height / 2), radius), fill=GREEN)
        frames.append(np.asarray(image))
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 12) -> Path:
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "3"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(".cache/demo"), help="where to write scene.png and clip.mp4")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scene = args.out_dir / "scene.png"
    draw_scene().save(scene)
    clip = write_clip(args.out_dir / "clip.mp4", clip_frames())
    print(f"wrote {scene} and {clip}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
