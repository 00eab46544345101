"""Draw the media of the scripted demo (`make demo`): a still scene and a short clip.

    scene.png  a red circle on the left and a blue square on the right, on a light grey ground
    clip.mp4   a green triangle moving from left to right (2 s, 12 fps)

Both are drawn with PIL (the clip encoded with PyAV), in the style of the scenes the embedded
demo model is trained on: flat saturated shapes on a neutral background, never overlapping, each
clearly on one side. Usage: python scripts/make_demo_media.py --out-dir .cache/demo/
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (200, 200, 196)
RED = (220, 30, 35)
BLUE = (35, 80, 225)
GREEN = (30, 155, 55)


def draw_scene(width: int = 640, height: int = 400) -> Image.Image:
    """A red circle in the left half and a blue square in the right half."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    r = height * 0.22
    cx, cy = width * 0.25, height * 0.5
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=RED)
    side = height * 0.4
    sx, sy = width * 0.75, height * 0.5
    draw.rectangle([sx - side / 2, sy - side / 2, sx + side / 2, sy + side / 2], fill=BLUE)
    return image


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
