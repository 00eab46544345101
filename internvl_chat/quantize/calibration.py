"""Calibration data: prompts and answers, half of them with an image, built in (generated pictures
and texts) or from a --calib folder of images and .txt files, read and checked before the model loads."""

from __future__ import annotations

import random
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..chat.template import MediaSpec, PromptBuilder
from ..errors import UsageError
from ..files import MiB, read_bytes_file, sniff_binary, visible
from ..media.formats import IMAGE_EXTENSIONS
from ..media.image import load_image, normalize_tiles
from .progress import Step, no_step

MAX_ANSWER_TOKENS = 512  # calibration text per sample
CALIB_TEXT_CHARS = 2000  # what a --calib .txt file gives: one text, its start (more than MAX_ANSWER_TOKENS holds)
MAX_SAMPLES = 1024  # all are held in memory (an image sample's tiles are megabytes); AWQ needs 32-128

CALIBRATION_TEXT = [
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
    "In 1905, Albert Einstein published four papers that changed physics: on the photoelectric "
    "effect, Brownian motion, special relativity and the equivalence of mass and energy.",
    "To make bread, mix flour, water, salt and yeast, knead for ten minutes, let the dough rise, "
    "shape it, and bake at 230 °C until the crust is deep brown.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "人工智能是计算机科学的一个分支，它试图理解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。",
    "The picture shows a red circle in the upper left, a blue square near the centre and a small "
    "green triangle at the bottom right, all on a light grey background.",
    "Q: What is the capital of France? A: Paris. Q: And of Japan? A: Tokyo.",
    "Photosynthesis converts light energy into chemical energy: carbon dioxide and water become "
    "glucose and oxygen inside the chloroplasts of plant cells.",
    "| year | revenue | profit |\n|---|---|---|\n| 2021 | 4.2 | 0.8 |\n| 2022 | 5.1 | 1.1 |",
    "Dear team, the meeting moves to Thursday at 3 pm; please bring the quarterly figures.",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889 à Paris.",
    "A video of a cat jumping onto a table, knocking over a glass of water, then running away.",
]
QUESTIONS = [
    "Describe this image in detail.",
    "What objects can you see, and where are they?",
    "What colours dominate the picture?",
    "Is there any text in the image? Read it.",
]


def synthetic_image(rng: random.Random, size: int = 448) -> Image.Image:
    """Shapes, gradients, lines and text on a random background: varied, deterministic content."""
    w, h = rng.choice([(size, size), (size * 2, size), (size, size * 2)])
    image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 12)):
        color = tuple(rng.randrange(256) for _ in range(3))
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(10, w // 2)), min(h, y0 + rng.randint(10, h // 2))
        kind = rng.choice(["ellipse", "rectangle", "line", "polygon", "text"])
        if kind == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif kind == "line":
            draw.line([x0, y0, x1, y1], fill=color, width=rng.randint(1, 12))
        elif kind == "polygon":
            draw.polygon([(rng.randrange(w), rng.randrange(h)) for _ in range(rng.randint(3, 6))], fill=color)
        else:
            draw.text((x0, y0), rng.choice(CALIBRATION_TEXT)[:30], fill=color)
    return image


@dataclass
class Sample:
    ids: list[int]
    pixel_values: torch.Tensor | None  # tiles for the <image> run in ids


@dataclass
class Calibration:
    """What a --calib folder gives: the tiles of the images the samples use, and its texts."""

    tiles: list[torch.Tensor]
    texts: list[str]


def calibration_tiles(images: Sequence[Path], max_tiles: int = 2, step: Step = no_step) -> list[torch.Tensor]:
    """The images decoded and tiled; done before the model loads: a damaged or unreadable image
    stopped the run only once the model was loaded (minutes for a large one)."""
    tiles = []
    for path in images:
        tiles.append(load_image(path, max_tiles=max_tiles).pixel_values)
        step()
    return tiles


def calibration_samples(
    builder: PromptBuilder,
    tokenizer,
    count: int,
    seed: int = 0,
    calib: Calibration | None = None,
    step: Step = no_step,
) -> list[Sample]:
    """`count` prompts + answers, half of them with an image: `calib`'s images and texts where it has
    them, built-in ones where it has none. Its texts joined the 12 built-in ones, so that one .txt file
    answered one sample in 13, a domain's own text drowned in generic text. Its texts are taken in
    turn, as its images are (drawn at random, a third of them went unused where others answered
    two or three samples)."""
    rng = random.Random(seed)
    images, own_texts = [], []
    if calib is not None:
        images, own_texts = calib.tiles, calib.texts
    samples = []
    for i in range(count):
        text = own_texts[i % len(own_texts)] if own_texts else rng.choice(CALIBRATION_TEXT)
        answer = tokenizer.encode(text)[:MAX_ANSWER_TOKENS]
        if i % 2 == 0:
            if images:
                tiles = images[(i // 2) % len(images)]
            else:
                tiles = normalize_tiles([synthetic_image(rng)])
            ids = builder.first_turn(rng.choice(QUESTIONS), [MediaSpec("image", tiles.shape[0])]) + answer
            samples.append(Sample(ids, tiles))
        else:
            ids = builder.first_turn(rng.choice(CALIBRATION_TEXT[:6]) + " Continue.", []) + answer
            samples.append(Sample(ids, None))
        step()
    return samples


# the kinds the chat's /image takes (media/formats.py's IMAGE_EXTENSIONS): a folder of .tif scans or .gif
# images beside a .txt was calibrated on built-in pictures without a word
CALIB_IMAGE_SUFFIXES = IMAGE_EXTENSIONS


def calibration_files(calib_dir: Path, max_texts: int | None = None) -> tuple[list[Path], list[str]]:
    """The images of a --calib folder and the texts of its first `max_texts` .txt files by name
    (`calibration_text`; all where None): the samples take texts in turn, so a run of N samples
    uses the first N. Every one was read, a corpus folder of a million short texts for hours and
    gigabytes of memory before the model loaded, a binary file among the unused ones refused it."""
    shown = visible(str(calib_dir))
    if not calib_dir.is_dir():
        raise UsageError(f"--calib {shown} is not a folder; give a folder of images and .txt files")
    try:
        entries = sorted(calib_dir.iterdir())
    except OSError as e:
        raise UsageError(f"cannot list --calib {shown} ({e.strerror or e}); check its permissions") from None
    # not only regular files: a broken link or a device named .png was dropped without a word (the images
    # are read before the model loads, and name what is wrong with one)
    images = [p for p in entries if p.suffix.lower() in CALIB_IMAGE_SUFFIXES and not p.is_dir()]
    # a folder named like a text (`notes.txt/`) is passed over as one named like an image is: it stopped the run
    text_files = [p for p in entries if p.suffix.lower() == ".txt" and not p.is_dir()]
    texts = [calibration_text(p) for p in text_files[:max_texts]]
    if not images and not texts:
        raise UsageError(f"--calib {shown} has no images ({', '.join(sorted(CALIB_IMAGE_SUFFIXES))}) or .txt files")
    return images, texts


def calibration_text(path: Path) -> str:
    """The first 2,000 characters of a --calib .txt file (a regular file of at most 1 MiB; UTF-8,
    or UTF-16 or UTF-32 with a byte order mark), undecodable bytes replaced; one that holds binary data (an image or archive named .txt) is
    refused: it was tokenized as calibration text without a word, skewing the statistics the
    scales are searched on. One that holds no text (empty, or only spaces) is refused too: its samples
    were calibrated on an empty answer, and the user's texts replace the built-in ones."""
    if _file_size(path) > MiB:  # the shared limit's words ("is it the right file?") said nothing of what is used
        raise UsageError(f"calibration text {visible(str(path))} is over 1 MiB, and only its first {CALIB_TEXT_CHARS:,} characters "
                         "would be used; put those in a smaller file (one text per file), or take it out of the --calib folder")  # fmt: skip
    data = read_bytes_file(path, "calibration text", limit=MiB)
    encoding = _unicode_encoding(data)
    kind = sniff_binary(data) if encoding is None else None
    # -sig: Notepad's byte order mark is no part of the text (it was calibrated on, and alone passed as text)
    whole = data.decode(encoding or "utf-8-sig", errors="replace")
    # a NUL character decoded from UTF-16 or UTF-32 is binary data behind bytes that look like a byte
    # order mark (FF FE and zeros passed as 2,000 characters of text), as a NUL byte is in UTF-8
    if kind == "binary data" or (encoding is not None and "\x00" in whole):  # NUL bytes: UTF-16 text without a byte order mark looks the same
        raise UsageError(f"calibration text {visible(str(path))} holds binary data, not text; take it out of the --calib "
                         "folder (text must be UTF-8, or UTF-16 or UTF-32 with a byte order mark)")  # fmt: skip
    if kind is not None:
        raise UsageError(f"calibration text {visible(str(path))} holds {kind}, not text; take it out of the --calib folder")
    text = whole[:CALIB_TEXT_CHARS]
    if not text.strip():
        raise UsageError(f"calibration text {visible(str(path))} is empty; write text into it or take it out of the --calib folder")
    return text


def _unicode_encoding(data: bytes) -> str | None:
    """UTF-32 or UTF-16 where `data` starts with its byte order mark (Notepad's "Unicode" is UTF-16
    LE: its NUL bytes had it refused as binary data), else None (UTF-8, read as such)."""
    if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "utf-32"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    return None


def _file_size(path: Path) -> int:
    """The size of a regular file at `path`; 0 for anything else, which reading it then names."""
    try:
        info = path.stat()
    except OSError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0
