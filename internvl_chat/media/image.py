"""Images → normalised 448×448 tiles by InternVL's dynamic tiling (SPEC §4).

The grid choice must match the published preprocessing bit for bit: the number of tiles decides
how many image tokens the model sees, so a different grid is a different prompt. The helpers are
pure and cheap (`choose_grid`, `count_tiles`, `probe_image`) so the UI can show a token cost
before any pixel is decoded; `check_image_decodes` then refuses a damaged file as it is attached.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import BmpImagePlugin, IcoImagePlugin, Image, PngImagePlugin, UnidentifiedImageError

from ..errors import MediaError
from ..files import (STILL_BMFF_KINDS, NotRegularFile, check_working_folder, expand_home, is_video_kind, open_regular_file,
                     sniff_file, too_long_path_line, visible)
from ..native_stderr import captured

# Pillow logs some damage as an ERROR record (a TIFF's "More samples per pixel than can be decoded:
# 51462"), and with no logging set up Python prints it to stderr itself, a line before our own
# error. A handler of its own keeps it off the terminal; the MediaError says what matters.
logging.getLogger("PIL").addHandler(logging.NullHandler())

IMAGE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Twice Pillow's default MAX_IMAGE_PIXELS: the size at which Pillow itself refuses to open an image.
# Checked here too, so a caller that changed Pillow's global limit does not change ours.
MAX_PIXELS = 2 * 89_478_485
# Pillow decodes QOI, plain-text (ASCII) PNM, PNM of other maximum values than 255 (and 65535 for
# grey: a 16-bit colour PPM, dcraw's output say, goes through it too) and run-length-encoded BMP in Python: about 0.7 µs a pixel for QOI (a 24 MB QOI of 6000×4000 took 16 s),
# 0.4 µs a number for plain PNM (12 million took 4 s); an RLE BMP ends a row by adding its pixels one
# at a time (a 53 KB one of 13000×13000 took 26 s). A picture within MAX_PIXELS would take minutes;
# a 16-megapixel QOI photo takes some 11 s.
PYTHON_DECODERS = {"qoi": "a QOI image", "ppm_plain": "a plain-text PNM image", "ppm": "a PNM image of 16-bit colour or an unusual maximum value",
                   "bmp_rle": "a run-length-encoded BMP image"}  # Pillow's decoder → what the file is; fmt: skip
MAX_PYTHON_DECODED_PIXELS = 1 << 24
# Progressive JPEGs from libjpeg have 6 or 10 scans, mozjpeg's a few more
MAX_JPEG_SCANS = 256
# Real tiled TIFFs use tiles of 256² to 1024²; a larger one than the picture is refused past this size
MAX_TIFF_TILE_PIXELS = 1 << 24
# Pillow keeps a pointer (and bookkeeping) per row of each image it makes, so a picture one pixel
# wide costs ~20 bytes a pixel, not 3: a 194 KB PNG of 1×100,000,000 took 2.2 GB and 19 s, within
# MAX_PIXELS. No real picture has a side this long (a turn makes a long row a long column).
MAX_SIDE = 1 << 20
EXIF_ORIENTATION = 0x0112
# The formats a file is opened as. Pillow would otherwise try some forty, among them EPS, which it
# renders by running Ghostscript on the file, and rarely used parsers; none of them is a photo.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA", "JPEG2000", "AVIF", "HEIF", "QOI")
# Colour conversions run over strips of about this many pixels, so converting a large image
# needs little more memory than its RGB result.
STRIP_PIXELS = 1 << 20
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that rotate by 90° (or transpose)


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # float32 [n, 3, S, S]; the thumbnail, if any, is last
    size: tuple[int, int]  # (width, height) after EXIF orientation
    grid: tuple[int, int]  # (cols, rows) of the tiling, thumbnail not counted
    path: Path

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


# ---------------------------------------------------------------- tiling (pure)


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min ≤ cols·rows ≤ max, ordered as the published code orders them.

    The order among grids with the same tile count is a Python set's iteration order, which
    depends on how the set was built; it decides some ties when min_tiles > 1, so the set is
    built exactly the published way and then stable-sorted by tile count.
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


MAX_TILES = 64  # the candidate search grows with the cube of the limit; settings cap max_tiles here too


def _check_tile_limits(max_tiles: int, min_tiles: int) -> None:
    if not 1 <= max_tiles <= MAX_TILES:
        raise MediaError(f"max_tiles is {max_tiles}; set it from 1 to {MAX_TILES} (InternVL3 checkpoints use 12)")
    if min_tiles < 1 or min_tiles > max_tiles:
        raise MediaError(f"min_tiles is {min_tiles}; set it between 1 and max_tiles ({max_tiles})")


def choose_grid(
    width: int, height: int, max_tiles: int = 12, min_tiles: int = 1, image_size: int = IMAGE_SIZE
) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width/height (SPEC §4)."""
    _check_tile_limits(max_tiles, min_tiles)
    if width <= 0 or height <= 0:
        raise MediaError(f"the image is {width}×{height} pixels; use an image with a non-zero size")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            # a tie goes to the larger grid only when the image has the pixels to fill it
            best = (cols, rows)
    return best


def count_tiles(
    width: int,
    height: int,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    image_size: int = IMAGE_SIZE,
    min_tiles: int = 1,
) -> int:
    """How many tiles `load_image` makes for an image of this (oriented) size, thumbnail included."""
    cols, rows = choose_grid(width, height, max_tiles, min_tiles, image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def tile_image(
    image: Image.Image,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    image_size: int = IMAGE_SIZE,
    min_tiles: int = 1,
) -> list[Image.Image]:
    """Cut an image into S×S tiles, row-major, plus the whole image at S×S last when tiled."""
    cols, rows = choose_grid(image.width, image.height, max_tiles, min_tiles, image_size)
    resized = _resize(image, (image_size * cols, image_size * rows))
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(_resize(image, (image_size, image_size)))
    return tiles


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pillow's bicubic resize (the reference's). Pillow refuses with a MemoryError, whatever the
    free memory, to shrink one side of more than ~67 million pixels (its filter weights would pass
    2 GiB): a 1×100,000,000 picture is within the pixel limit (load_image refuses sides over
    MAX_SIDE; tile_image may be given one). Such a picture is first shrunk by whole factors,
    averaging boxes, to about four times the size asked for."""
    try:
        return image.resize(size, Image.Resampling.BICUBIC)
    except MemoryError:
        factors = tuple(max(1, side // (4 * target)) for side, target in zip(image.size, size))
        return image.reduce(factors).resize(size, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------- pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode.

    Transparent images are composited onto white (as transformers' `convert_to_rgb` does), so a
    transparent background does not turn into whatever colour hides under alpha 0; opaque
    pixels are unchanged. 16-bit greyscale is scaled down (Pillow's own conversion clips it).
    Both are done strip by strip: whole-image temporaries (float64 copies, RGBA layers) cost
    up to 25 bytes a pixel, gigabytes for a small file that declares a large image.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _deep_grey_to_l(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    try:
        if has_alpha:
            return _over_white(image)
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"cannot convert an image in colour mode {image.mode} to RGB ({visible(_one_line(e))}); save it as an RGB PNG or JPEG") from None


def _strips(image: Image.Image):
    """(top, bottom) row ranges of about STRIP_PIXELS pixels each."""
    rows = max(1, STRIP_PIXELS // max(image.width, 1))
    return ((top, min(top + rows, image.height)) for top in range(0, image.height, rows))


def _deep_grey_to_l(image: Image.Image) -> Image.Image:
    """I;16 (and I holding values above 255) → L by /257, rounded; I within 0…255 is clipped only."""
    scale = image.mode.startswith("I;16") or (image.getextrema()[1] or 0) > 255
    out = np.empty((image.height, image.width), np.uint8)
    for top, bottom in _strips(image):
        values = np.asarray(image.crop((0, top, image.width, bottom))).astype(np.float64)
        if scale:
            values /= 257.0  # 0…65535 → 0…255
        out[top:bottom] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _over_white(image: Image.Image) -> Image.Image:
    out = Image.new("RGB", image.size)
    for top, bottom in _strips(image):
        rgba = image.crop((0, top, image.width, bottom)).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, rgba).convert("RGB"), (0, top))
    return out


def normalize_tiles(tiles: list[Image.Image], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB tiles → float32 [n, 3, S, S]: resize to S×S (bicubic, a no-op for tiles already that
    size), /255, then (x − mean) / std per channel, in float32 like torchvision's pipeline."""
    if not tiles:
        raise MediaError("no tiles to normalise; pass at least one image")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    out = np.empty((len(tiles), 3, image_size, image_size), dtype=np.float32)
    for k, tile in enumerate(tiles):
        tile = to_rgb(tile)
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.Resampling.BICUBIC)
        x = np.asarray(tile, dtype=np.float32) / np.float32(255)
        out[k] = ((x - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(out)


# ---------------------------------------------------------------- files


def check_media_file(path: str | Path, what: str) -> Path:
    """The path as a Path if it names a readable file; a MediaError that says what to do if not."""
    path = expand_home(path)
    a_what = f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"
    try:
        if not path.exists():
            if path.is_symlink():  # `ls` lists it: say why it cannot be read
                raise MediaError(f"{what} {visible(str(path))} is a link to a file that does not exist (or a loop of links); check the path")
            check_working_folder(path, what, MediaError)  # a relative path in a folder deleted since: say so
            raise MediaError(f"{what} {visible(str(path))} does not exist; check the path")
        if path.is_dir():
            raise MediaError(f"{visible(str(path))} is a folder, not {a_what} file; pass the path of one file")
        if not path.is_file():
            raise MediaError(f"{visible(str(path))} is not a regular file; pass the path of {a_what} file")
    except OSError as e:  # not ENOENT: a name too long for the file system, say
        if e.errno == errno.ENAMETOOLONG:
            raise MediaError(too_long_path_line(str(path), what)) from None
        raise MediaError(f"cannot use {what} {visible(str(path))} ({e.strerror or e}); check the path") from None
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since the look above must not block
            empty = os.fstat(f.fileno()).st_size == 0
    except NotRegularFile:
        raise MediaError(f"{visible(str(path))} is not a regular file; pass the path of {a_what} file") from None
    except OSError as e:
        raise MediaError(f"cannot read {what} {visible(str(path))} ({e.strerror or e}); check its permissions") from None
    if empty:  # the decoders' own words for it ("Invalid data", "not an image format") do not say so
        raise MediaError(f"cannot read {what} {visible(str(path))}: the file is empty (0 bytes; an unfinished download "
                         "or copy?); use a complete copy")  # fmt: skip
    return path


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


@contextlib.contextmanager
def quiet_pillow():
    """Pillow's warnings about a file (corrupt EXIF, odd TIFF tags, large images) silenced: they
    would print two lines of Python source location each; what matters is said as a MediaError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def image_formats() -> list[str]:
    """IMAGE_FORMATS that this Pillow can open (AVIF and HEIF need optional plugins)."""
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def _open_image(path: Path) -> Image.Image:
    """Open the header only, refusing non-images, decompression bombs and empty images."""
    icon = _icon_picture_size(path)
    if icon is not None:  # Pillow decodes an icon's picture as it opens it: its size is checked first
        _check_size(path, *icon)
    flood = _header_flood(path)
    if flood is not None:
        raise MediaError(f"{visible(str(path))} is {flood}, refused as a possible decompression bomb; re-save it as PNG or JPEG")
    try:
        with quiet_pillow(), captured():  # a plugin's native library may write to fd 2 (native_stderr.py)
            image = Image.open(path, formats=image_formats())
    except Image.DecompressionBombError:
        raise MediaError(
            f"{visible(str(path))} declares more than {MAX_PIXELS:,} pixels and is refused as a possible decompression bomb; "
            "downscale it first"
        ) from None
    except UnidentifiedImageError:
        what = _sniffed(path)
        if is_video_kind(what):
            raise MediaError(f"{visible(str(path))} is a video, not an image; attach (or send) it as a video instead") from None
        if what in STILL_BMFF_KINDS and _reader_of(what) not in image_formats():
            raise MediaError(f"{visible(str(path))} is {what}, a format this installation cannot read; convert it to JPEG or PNG") from None
        raise MediaError(
            f"{visible(str(path))} is not an image format that can be read (or it is damaged); use a JPEG, PNG, WebP, GIF, BMP or TIFF file"
        ) from None
    except (OSError, ValueError, SyntaxError, RuntimeError) as e:  # RuntimeError: Pillow's AVIF plugin on a damaged file
        raise MediaError(f"cannot read image {visible(str(path))} ({visible(_one_line(e))}); re-export it as PNG or JPEG") from None
    width, height = image.size
    try:
        _check_size(path, width, height)
    except MediaError:
        image.close()
        raise
    decoded_in_python = PYTHON_DECODERS.get(image.tile[0][0]) if image.tile else None
    if decoded_in_python and width * height > MAX_PYTHON_DECODED_PIXELS:
        image.close()
        raise MediaError(
            f"{visible(str(path))} is {decoded_in_python} of {width}×{height} pixels, more than the {MAX_PYTHON_DECODED_PIXELS:,} "
            "that Pillow's decoder (written in Python) reads in seconds; convert it to PNG"
        )
    scans = _jpeg_scans(path) if image.format in ("JPEG", "MPO") else 0
    if scans > MAX_JPEG_SCANS:
        image.close()
        raise MediaError(
            f"{visible(str(path))} is a JPEG of {scans:,} scans (real ones have a few dozen at most), refused as a possible "
            "decompression bomb; re-save it as a baseline JPEG or PNG"
        )
    tile = _tiff_tile_pixels(image)
    if tile > max(width * height, MAX_TIFF_TILE_PIXELS):
        image.close()
        raise MediaError(
            f"{visible(str(path))} is {width}×{height} pixels stored in tiles of {tile:,} pixels each, "
            "refused as a possible decompression bomb; re-save it as PNG or an untiled TIFF"
        )
    return image


def _check_size(path: Path, width: int, height: int) -> None:
    """Refuse a picture of more than MAX_PIXELS, a side over MAX_SIDE, or no pixels at all."""
    if width * height > MAX_PIXELS:
        raise MediaError(
            f"{visible(str(path))} is {width}×{height} pixels, over the {MAX_PIXELS:,}-pixel limit for decompression bombs; downscale it first"
        )
    if width <= 0 or height <= 0:
        raise MediaError(f"{visible(str(path))} is {width}×{height} pixels; use an image with a non-zero size")
    if max(width, height) > MAX_SIDE:
        raise MediaError(
            f"{visible(str(path))} is {width}×{height} pixels, a side longer than {MAX_SIDE:,}, and is refused as a possible "
            "decompression bomb; crop or downscale it"
        )


ICO_MAGIC = b"\x00\x00\x01\x00"


def _icon_picture_size(path: Path) -> tuple[int, int] | None:
    """The size of the picture Pillow decodes as it opens an ICO file, from that picture's own header;
    None for another file, or one whose header does not read (opening it says why). The icon's
    directory says 256×256 at most, but the PNG or BMP it points to declares any size, and Pillow
    decodes it whole on opening, within only its own global limit: a 95 KB icon holding a PNG of
    1×50,000,000 took 655 MB and 2 s to be refused by the MAX_SIDE check that came after."""
    try:
        with open_regular_file(path) as f, quiet_pillow():
            offset = _icon_picture_at(f)
            if offset is None:
                return None
            f.seek(offset)
            head = f.read(24)
            if head[:8] == PngImagePlugin._MAGIC:  # its IHDR's (the PNG's chunks are the header walk's to count)
                return (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) if head[12:16] == b"IHDR" else None
            f.seek(offset)
            width, height = BmpImagePlugin.DibImageFile(f).size
            return width, height // 2  # an icon's BMP counts the rows of its transparency mask too
    except Exception:  # noqa: BLE001 - OSError, SyntaxError, IndexError (no entries), …: Pillow's opening reports it
        return None


def _icon_picture_at(f: BinaryIO) -> int | None:
    """Where the picture Pillow decodes as it opens an ICO file starts (the largest), or None for another file."""
    f.seek(0)
    if f.read(4) != ICO_MAGIC:
        return None
    f.seek(0)
    return IcoImagePlugin.IcoFile(f).entry[0].offset


# Pillow reads a header a segment, chunk or block at a time in Python, keeping what most of them hold
# (a PNG's chunks after its pixels too, as it loads them): a 48 MB JPEG of 12 million empty segments
# took 14 s and 1.8 GB to open, a 10 MB GIF of 5 million comment blocks 650 MB. Real files have a
# few dozen (a PNG one per 8 KB or so of pixels, a GIF's XMP one per ~80 bytes of it); the JPEG
# limit is MAX_JPEG_SEGMENTS.
MAX_PNG_CHUNKS = 1 << 20
MAX_GIF_BLOCKS = 1 << 16
# A TIFF's lists that Pillow turns whole into Python values as it opens the file (a strip's or tile's
# offset each: a 64 MB TIFF of 16×16 pixels listing 8 million strips took 2.2 GB and 14 s to open,
# a minute to decode). A picture within MAX_SIDE has at most MAX_SIDE strips of a row each.
TIFF_LISTS = {258: "BitsPerSample", 273: "StripOffsets", 279: "StripByteCounts", 320: "ColorMap", 324: "TileOffsets",
              325: "TileByteCounts", 338: "ExtraSamples"}  # fmt: skip
MAX_TIFF_VALUES = MAX_SIDE
# A PPM's header is read a byte at a time, comments and blanks included: 24 MB of them took 5 s
PPM_HEADER_BYTES = 1 << 16
_PPM_GAP = re.compile(rb"(?:[ \t\n\v\f\r]+|#[^\r\n]*)*")  # blanks and comments (to the end of the line)
_PPM_TOKEN = re.compile(rb"[^ \t\n\v\f\r#]*")
# Pillow walks a JPEG 2000 file's boxes up to its header and those in it one at a time in Python: 3
# million empty ones took 4 s
MAX_JP2_BOXES = 1 << 16
# Pillow strips each comment among a plain-text PNM's numbers by copying the rest of the megabyte it
# is in: a 4 MB file of two million empty comments took 36 s
MAX_PNM_COMMENTS = 1 << 10


class _Pages:
    """Reads of a file here and there through one cached page, for the header walks."""

    PAGE = 1 << 20

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._base, self._page = f, 0, b""

    def at(self, offset: int, need: int) -> tuple[bytes, int]:
        """A page and where `offset` falls in it, read anew from `offset` where the cached one lacks
        `need` bytes from there (fewer than `need` follow `offset` only at the end of the file)."""
        if not self._base <= offset <= self._base + len(self._page) - need:
            self._f.seek(offset)
            self._page, self._base = self._f.read(self.PAGE), offset
        return self._page, offset - self._base


def _header_flood(path: Path) -> str | None:
    """What the file is ("a JPEG of more than 65,536 …") where its header holds more segments,
    chunks or blocks than a real one has, else None (a file that does not read: opening it says why)."""
    try:
        with open_regular_file(path) as f:
            pages = _Pages(f)
            magic, _ = pages.at(0, 8)
            if magic.startswith(b"\xff\xd8\xff") and _jpeg_header_steps(pages) > MAX_JPEG_SEGMENTS:
                return f"a JPEG of more than {MAX_JPEG_SEGMENTS:,} segments or fill bytes before its picture (real ones have a few dozen)"
            if magic.startswith(PngImagePlugin._MAGIC) and _png_chunks(pages, 0) > MAX_PNG_CHUNKS:
                return f"a PNG of more than {MAX_PNG_CHUNKS:,} chunks (real ones have one per 8 KB or so of pixels)"
            if magic[:4] == ICO_MAGIC and _icon_png_chunks(f, pages) > MAX_PNG_CHUNKS:
                return f"an icon holding a PNG of more than {MAX_PNG_CHUNKS:,} chunks (real ones have one per 8 KB or so of pixels)"
            if magic[:6] in (b"GIF87a", b"GIF89a") and _gif_blocks(pages) > MAX_GIF_BLOCKS:
                return f"a GIF of more than {MAX_GIF_BLOCKS:,} comment or other extension blocks before its first frame"
            if magic[:1] == b"P" and magic[1:2] in b"0123456fy":
                end = _ppm_header_end(pages)
                if end > PPM_HEADER_BYTES:
                    return f"a PPM whose header runs past its first {PPM_HEADER_BYTES:,} bytes (real ones take a few dozen)"
                if magic[1:2] in b"123" and _comments_from(f, end) > MAX_PNM_COMMENTS:
                    return f"a plain-text PNM of more than {MAX_PNM_COMMENTS:,} comments among its pixels (real ones have them in the header)"
            if magic[:12] == b"\0\0\0\x0cjP  \r\n\x87\n" and _jp2_boxes(pages) > MAX_JP2_BOXES:
                return f"a JPEG 2000 file of more than {MAX_JP2_BOXES:,} boxes around its header (real ones have a few dozen)"
            if magic[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # TIFF, BigTIFF
                name, values = _tiff_longest_list(pages)
                if values > MAX_TIFF_VALUES:
                    return f"a TIFF whose {name} tag lists {values:,} values (real ones list one per strip or tile, {MAX_TIFF_VALUES:,} at most)"
    except (OSError, OverflowError):  # NotRegularFile is one; OverflowError: an offset past 2^63 (BigTIFF's), where no file reaches
        pass
    return None


def _jpeg_header_steps(pages: _Pages) -> int:
    """The segments, fill and stray bytes before the first scan (Pillow takes each on its own), up to
    one past MAX_JPEG_SEGMENTS."""
    steps, at = 0, 2
    while steps <= MAX_JPEG_SEGMENTS:
        page, i = pages.at(at, 4)
        if len(page) - i < 4:
            return steps  # the end of the file
        found = _JPEG_MARKER.search(page, i)
        if found is None or found.end() + 2 > len(page):  # on in the next page (from the marker, or the last byte: 0xFF?)
            end = found.start() if found is not None else len(page) - 1
            steps, at = steps + end - i, at + end - i
            continue
        steps += found.start() - i + 1
        marker = page[found.start() + 1]
        if marker in (0xDA, 0xD9):  # SOS, EOI
            return steps
        at += found.end() - i
        if marker not in (0x01, 0xD8):  # markers without a length
            at += int.from_bytes(page[found.end() : found.end() + 2], "big")
    return steps


def _icon_png_chunks(f: BinaryIO, pages: _Pages) -> int:
    """_png_chunks of the PNG an ICO file holds, the one Pillow decodes as it opens the file (0 for a BMP)."""
    try:
        with quiet_pillow():
            start = _icon_picture_at(f)
    except Exception:  # noqa: BLE001 - SyntaxError, IndexError (no entries), …: Pillow's opening reports it
        return 0
    page, i = pages.at(start, 8)
    return _png_chunks(pages, start) if page[i : i + 8] == PngImagePlugin._MAGIC else 0


def _png_chunks(pages: _Pages, start: int) -> int:
    """The chunks of the PNG at `start` up to IEND (Pillow takes each on its own), up to one past MAX_PNG_CHUNKS."""
    chunks, at = 0, start + 8
    while chunks <= MAX_PNG_CHUNKS:
        page, i = pages.at(at, 8)
        if len(page) - i < 8:
            return chunks
        chunks += 1
        if page[i + 4 : i + 8] == b"IEND":
            return chunks
        at += 12 + int.from_bytes(page[i : i + 4], "big")  # length, type, data, CRC
    return chunks


def _gif_blocks(pages: _Pages) -> int:
    """The extensions' sub-blocks before the first frame (Pillow reads each on its own), up to one
    past MAX_GIF_BLOCKS."""
    page, _ = pages.at(0, 13)
    if len(page) < 13:
        return 0
    flags = page[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while blocks <= MAX_GIF_BLOCKS:
        page, i = pages.at(at, 2)
        if len(page) - i < 2 or page[i] != 0x21:  # a frame, the end, damage: for Pillow to read
            return blocks
        at += 2  # the introducer and the extension's label, then its sub-blocks up to an empty one
        while blocks <= MAX_GIF_BLOCKS:
            page, i = pages.at(at, 1)
            if len(page) - i < 1:
                return blocks
            blocks += 1
            at += 1 + page[i]
            if not page[i]:
                break
    return blocks


def _ppm_header_end(pages: _Pages) -> int:
    """Where a PPM's header (its magic number, then its size and maximum value, or scale) ends, if
    within PPM_HEADER_BYTES; a number past them where it runs on."""
    page, _ = pages.at(0, PPM_HEADER_BYTES + 1)
    head = page[: PPM_HEADER_BYTES + 1]
    at = _PPM_TOKEN.match(head).end()
    for _ in range(2 if head[:at] in (b"P1", b"P4") else 3):  # bitmaps have no maximum value
        at = _PPM_TOKEN.match(head, _PPM_GAP.match(head, at).end()).end()
    return at


def _comments_from(f: BinaryIO, start: int) -> int:
    """The comment signs (#) from `start` to the end of the file, up to one past MAX_PNM_COMMENTS."""
    f.seek(start)
    count = 0
    while count <= MAX_PNM_COMMENTS and (block := f.read(1 << 20)):
        count += block.count(b"#")
    return count


def _jp2_boxes(pages: _Pages) -> int:
    """The boxes Pillow reads a JPEG 2000 file's header through: those up to its header box (jp2h),
    those in it, and those of its resolution box (res ) up to the one it reads (resc); up to one
    past MAX_JP2_BOXES."""
    count = 0
    for kind, start, end in _jp2_box_list(pages, 0, 1 << 62):
        count += 1
        if kind == b"jp2h":
            for kind, start, end in _jp2_box_list(pages, start, end):
                count += 1
                if kind == b"res ":
                    for kind, _, _ in _jp2_box_list(pages, start, end):
                        count += 1
                        if kind == b"resc" or count > MAX_JP2_BOXES:
                            break
                if count > MAX_JP2_BOXES:
                    break
            return count
        if count > MAX_JP2_BOXES:
            break
    return count


def _jp2_box_list(pages: _Pages, at: int, end: int):
    """(type, where its contents start, where it ends) for the boxes from `at` to `end`; they end
    where one is damaged or the file does."""
    while at + 8 <= end:
        page, i = pages.at(at, 16)
        if len(page) - i < 8:
            return
        size, kind, head = int.from_bytes(page[i : i + 4], "big"), page[i + 4 : i + 8], 8
        if size == 1:  # the size follows, in 8 bytes
            size, head = int.from_bytes(page[i + 8 : i + 16], "big"), 16
        elif size == 0:  # to the end
            size = end - at
        if size < head:
            return
        yield kind, at + head, at + size
        at += size


def _tiff_longest_list(pages: _Pages) -> tuple[str, int]:
    """The longest of the TIFF_LISTS in the first directory (the one Pillow opens): its name and its
    number of values; ("", 0) where there is none or the header does not read."""
    head, _ = pages.at(0, 16)
    order = "little" if head[:2] == b"II" else "big"
    version = int.from_bytes(head[2:4], order)
    if len(head) < 16 or version not in (42, 43):
        return "", 0
    # classic TIFF: 4-byte offsets, 2-byte entry counts, 12-byte entries; BigTIFF: 8, 8 and 20
    at, count_size, entry_size = (int.from_bytes(head[4:8], order), 2, 12) if version == 42 else (int.from_bytes(head[8:16], order), 8, 20)
    page, i = pages.at(at, count_size)
    entries = min(int.from_bytes(page[i : i + count_size], order), 1 << 16)
    longest = ("", 0)
    for k in range(entries):
        page, i = pages.at(at + count_size + k * entry_size, entry_size)
        if len(page) - i < entry_size:
            break
        tag, values = int.from_bytes(page[i : i + 2], order), int.from_bytes(page[i + 4 : i + 4 + (entry_size - 4) // 2], order)
        if tag in TIFF_LISTS and values > longest[1]:
            longest = (TIFF_LISTS[tag], values)
    return longest


def _jpeg_scans(path: Path) -> int:
    """How many scans (SOS markers) the picture holds. A progressive JPEG's decoder passes over the
    whole picture for each scan, and a scan can be 31 bytes: a 683 KB JPEG of 4000×4000 with 20,000
    of them took 33 s to decode. Counted up to the picture's end (EOI), where the decoder stops: a
    phone's motion photo appends its video there, and 20 MB of compressed video hold 0xFF 0xDA some
    300 times by chance (within the picture 0xFF is stuffed as 0xFF 0x00), which refused the photo.

    The picture's first JPEG_WALK_BYTES are read, not mapped: a file truncated while a mapping of it
    is read kills the process (SIGBUS)."""
    try:
        with open_regular_file(path) as f:
            head = f.read(JPEG_WALK_BYTES)
            scans = _scans_before_end(head, whole=len(head) < JPEG_WALK_BYTES)
            if scans is None:
                f.seek(0)
                scans = _sos_markers(f)
    except OSError:  # NotRegularFile is one
        return 0  # the decoder reports the file's trouble
    return scans


# A marker: 0xFF then neither a stuffed 0x00, a fill byte 0xFF nor a restart marker (0xD0…0xD7, within a scan)
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
# Segments a picture may have: a progressive one has a few dozen, a camera's some more
MAX_JPEG_SEGMENTS = 1 << 16
# What the walk to the picture's end reads: a phone's photo ends well within it (its video follows)
JPEG_WALK_BYTES = 64 << 20


def _scans_before_end(data: bytes, whole: bool = True) -> int | None:
    """The SOS segments from SOI to EOI, each segment skipped by its length (an EXIF thumbnail's own
    markers are inside one); None for a file of more segments than a picture has, or where `data`
    (not `whole`: the file's start) ends before the picture does."""
    scans, at = 0, 2
    for _ in range(MAX_JPEG_SEGMENTS):
        found = _JPEG_MARKER.search(data, at)
        if found is None or (not whole and found.end() + 2 > len(data)):
            return scans if whole else None
        marker = data[found.start() + 1]
        if marker == 0xD9:  # EOI
            return scans
        if marker in (0x01, 0xD8):  # markers without a length
            at = found.end()
            continue
        scans += marker == 0xDA
        at = found.end() + int.from_bytes(data[found.end() : found.end() + 2], "big")
    return None


def _sos_markers(f: BinaryIO) -> int:
    """Every 0xFF 0xDA of the file, within the picture or not: the count for a file of countless
    segments, or whose picture does not end within JPEG_WALK_BYTES."""
    count, carry = 0, b""
    while block := f.read(1 << 20):
        data = carry + block
        count += data.count(b"\xff\xda")
        carry = data[-1:] if data.endswith(b"\xff") else b""
    return count


def _tiff_tile_pixels(image: Image.Image) -> int:
    """Pixels in one tile of a tiled TIFF (0 if untiled). Each tile is decoded whole before it is cut
    to the picture, and nothing ties its size to the picture's: a 64×64 TIFF of 3 MB can declare
    16384×16384 tiles that decode to 805 MB each. (Strips are cut to the picture's height.)"""
    if image.format != "TIFF":
        return 0
    with quiet_pillow():  # tags are parsed as they are read: one of several values warns (opening did not read them)
        width, height = image.tag_v2.get(322), image.tag_v2.get(323)  # TileWidth, TileLength
    if not isinstance(width, int) or not isinstance(height, int):
        return 0
    return max(width, 0) * max(height, 0)


def _reader_of(still_bmff_kind: str) -> str:
    """The Pillow format that opens a HEIF or AVIF file: HEIF needs the pillow-heif plugin (not
    used here), AVIF a Pillow built with libavif."""
    return "AVIF" if still_bmff_kind == "an AVIF image" else "HEIF"


def _sniffed(path: Path) -> str:
    """What the file's first bytes say it is ("a video (MP4/MOV)", "a HEIC image"; see sniff_binary), or ""."""
    try:
        return sniff_file(path) or ""
    except OSError:
        return ""


# EXIF orientation → the operation that shows the picture upright (as ImageOps.exif_transpose has it)
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def pending_orientation(image: Image.Image) -> int:
    """The EXIF orientation still to apply, read from the header only: the probe and the decode both
    go by it, so the tiles counted are the tiles made. 1 (as stored) unless it is a whole number 2…8:
    a damaged tag ("6" as text, 13/2, two values) turns nothing."""
    # A PNG's EXIF chunk may follow the pixel data, and looking for it there decodes everything.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    if image.format == "TIFF" and image.size != (image.tag_v2.get(256), image.tag_v2.get(257)):
        return 1  # recent Pillow opens a TIFF at its turned size (tags 256, 257: as stored) and turns it as it loads
    try:
        with quiet_pillow():
            value = image.getexif().get(EXIF_ORIENTATION, 1)
        # a dict lookup, as exif_transpose does it: 6 and a rational 6/1 match, "6" and 6.5 do not
        return int(value) if value in _TURNS else 1
    except Exception:  # noqa: BLE001 - malformed EXIF, an unhashable value: orientation unknown, keep the image as stored
        return 1


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """The image turned as `pending_orientation` says (the image itself when there is nothing to turn)."""
    turn = _TURNS.get(orientation)
    return image.transpose(turn) if turn is not None else image


def probe_image(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header alone (no pixel decoding).

    Rare exception: a PNG whose EXIF chunk comes after its pixel data is reported, and decoded,
    unrotated.
    """
    path = check_media_file(path, "image")
    with _open_image(path) as image:
        width, height = image.size
        if pending_orientation(image) in _SWAPS_SIDES:
            width, height = height, width
    return width, height


def is_animation(path: Path) -> bool:
    """Whether the file is an animated GIF, PNG or WebP, from its header; False for anything else,
    a multi-page TIFF or a file Pillow cannot open included. The image loader uses its first frame."""
    try:
        with _open_image(path) as image:
            return image.format in ("GIF", "PNG", "WEBP") and bool(getattr(image, "is_animated", False))
    except MediaError:
        return False


def _decode(path: Path) -> Image.Image:
    """Fully decode (so truncation is caught here), apply EXIF orientation, convert to RGB."""
    with _open_image(path) as image:
        orientation = pending_orientation(image)  # decided before the pixels, as probe_image decides
        native = captured()  # libtiff writes its errors to fd 2 ("ZIPDecode: Decoding error …"); Pillow says "decoder error -2"
        try:
            with quiet_pillow(), native:
                image.load()
        except MemoryError:
            raise MediaError(f"not enough memory to decode {visible(str(path))}; downscale the image first") from None
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error, …
            excerpt = native.excerpt()
            reason = _one_line(e) + (f": {excerpt}" if excerpt else "")
            raise MediaError(f"cannot decode {visible(str(path))}: the file is truncated or corrupt ({visible(reason)}); re-export or re-download it") from None
        return to_rgb(upright(image, orientation))


def check_image_decodes(path: str | Path) -> None:
    """Decode the whole picture and let it go: a truncated or corrupt file is refused when it is
    attached, with the error sending it would give, instead of only when the message is sent.
    The size limits come first (`_open_image`), so a decompression bomb is refused before a pixel
    is decoded. The pixels are decoded again when sent: kept for every attachment, they could
    hold gigabytes."""
    _decode(check_media_file(path, "image"))


def load_image(
    path: str | Path,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    image_size: int = IMAGE_SIZE,
    min_tiles: int = 1,
) -> ImageInput:
    """Read an image file and return its normalised tiles (SPEC §4): a grid of min_tiles to
    max_tiles tiles (the checkpoint's min/max_dynamic_patch), plus the thumbnail when tiled."""
    _check_tile_limits(max_tiles, min_tiles)
    path = check_media_file(path, "image")
    image = _decode(path)
    grid = choose_grid(image.width, image.height, max_tiles, min_tiles, image_size)
    try:
        tiles = tile_image(image, max_tiles, use_thumbnail, image_size, min_tiles)
    except MemoryError:
        raise MediaError(f"not enough memory to resize {visible(str(path))}; downscale the image first") from None
    return ImageInput(pixel_values=normalize_tiles(tiles, image_size), size=image.size, grid=grid, path=path)
