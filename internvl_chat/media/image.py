"""Images → normalised 448×448 tiles by InternVL's dynamic tiling (SPEC §4).

The grid choice must match the published preprocessing bit for bit: the number of tiles decides
how many image tokens the model sees, so a different grid is a different prompt. The helpers are
pure and cheap (`choose_grid`, `count_tiles`, `probe_image`) so the UI can show a token cost
before any pixel is decoded; `check_image_decodes` then refuses a damaged file as it is attached.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import MediaError
from ..files import (STILL_BMFF_KINDS, NotRegularFile, check_working_folder, expand_home, file_head, is_video_kind,
                     open_regular_file, sniff_binary, too_long_path_line, visible)
from ..native_stderr import captured
from .formats import IMAGE_FORMATS  # the formats a file is opened as (formats.py)
from .image_headers import gif_frame_follows, header_flood, icon_picture_size, jpeg_scans, quiet_pillow, tiff_second_picture

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
# A QOI picture is decoded by FFmpeg's decoder instead (PyAV's, there for video): a 16-megapixel one
# in 0.3 s, not 17 s. FFmpeg decodes a picture of (w+128)·(h+128) < 2^28 (av_image_check_size); a
# longer strip is left to Pillow, within MAX_PYTHON_DECODED_PIXELS.
FFMPEG_IMAGE_LIMIT = 1 << 28
QOI_END = bytes(7) + b"\x01"  # every QOI file ends so; FFmpeg decodes a file cut short without a word
QOI_HEADER_BYTES = 14
QOI_PIXELS_PER_BYTE = 62  # a run op's most: a file of fewer op bytes than pixels / 62 cannot be whole
# Two sets of ops put where a QOI's end marker is (_qoi_by_ffmpeg): every byte differs between them,
# and either's first op (an RGB op, an RGBA op) gives a colour the other's does not
QOI_TAILS = (b"\xfe\x10\x20\x30\xfe\x10\x20\x30", b"\xff\xe0\xd0\xc0\xb0\xff\xe0\xd0")
# Progressive JPEGs from libjpeg have 6 or 10 scans, mozjpeg's a few more
MAX_JPEG_SCANS = 256
# Real tiled TIFFs use tiles of 256² to 1024²; a larger one than the picture is refused past this size
MAX_TIFF_TILE_PIXELS = 1 << 24
# Pillow keeps a pointer (and bookkeeping) per row of each image it makes, so a picture one pixel
# wide costs ~20 bytes a pixel, not 3: a 194 KB PNG of 1×100,000,000 took 2.2 GB and 19 s, within
# MAX_PIXELS. No real picture has a side this long (a turn makes a long row a long column).
MAX_SIDE = 1 << 20
EXIF_ORIENTATION = 0x0112
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
    keyed = "transparency" in image.info and (image.mode not in ("RGB", "L") or _eight_bit_key(image.info["transparency"]))
    if image.mode == "RGB" and not keyed:  # an 8-bit RGB PNG's tRNS colour key is transparency too
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _deep_grey_to_l(image)
        keyed = False  # its transparent value is white already
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or keyed
    try:
        if has_alpha:
            return _over_white(image)
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"cannot convert an image in colour mode {image.mode} to RGB ({visible(_one_line(e))}); save it as an RGB PNG or JPEG") from None


def _eight_bit_key(key: object) -> bool:
    """Whether an 8-bit RGB or grey picture's tRNS key (Pillow keeps its 16-bit fields) can be a
    pixel's value: one past 255 matches none (a PNG viewer keys nothing), while Pillow compares its
    low byte and made white the pixels of that value (a key of 256: every black pixel)."""
    values = key if isinstance(key, tuple) else (key,)
    return all(isinstance(v, int) and 0 <= v <= 255 for v in values)


def _strips(image: Image.Image):
    """(top, bottom) row ranges of about STRIP_PIXELS pixels each."""
    rows = max(1, STRIP_PIXELS // max(image.width, 1))
    return ((top, min(top + rows, image.height)) for top in range(0, image.height, rows))


def _deep_grey_to_l(image: Image.Image) -> Image.Image:
    """I;16 (and I holding values above 255) → L by /257, rounded; I within 0…255 is clipped only.
    A grey value a PNG's tRNS chunk marks transparent comes out white, as transparency composited
    over white does (the 8-bit grey it becomes is no longer that value alone): set in each strip, so
    no alpha layer of the whole picture is kept."""
    scale = image.mode.startswith("I;16") or (image.getextrema()[1] or 0) > 255
    transparent = image.info.get("transparency")
    key = transparent if isinstance(transparent, int) else None
    out = np.empty((image.height, image.width), np.uint8)
    for top, bottom in _strips(image):
        values = np.asarray(image.crop((0, top, image.width, bottom))).astype(np.float64)
        keyed = values == key if key is not None else None
        if scale:
            values /= 257.0  # 0…65535 → 0…255
        out[top:bottom] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        if keyed is not None:
            out[top:bottom][keyed] = 255
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


def image_formats() -> list[str]:
    """IMAGE_FORMATS that this Pillow can open (AVIF and HEIF need optional plugins)."""
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def _open_image(path: Path) -> Image.Image:
    """Open the header only, refusing non-images, decompression bombs and empty images."""
    try:
        with open_regular_file(path) as f:  # both walks read the one open file (they seek as they go)
            icon, flood = icon_picture_size(f), header_flood(f)
    except OSError:  # NotRegularFile is one: Pillow's opening says why
        icon = flood = None
    if icon is not None:  # Pillow decodes an icon's picture as it opens it: its size is checked first
        _check_size(path, *icon)
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
        if what in NOT_PICTURES:  # a web page saved under a picture's name, say: "damaged" would mislead
            raise MediaError(f"{visible(str(path))} is {what}, not an image; {NOT_PICTURES[what]}") from None
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
    decoded_in_python = PYTHON_DECODERS.get(image.tile[0][0]) if image.tile and not ffmpeg_decodes(image) else None
    if decoded_in_python and width * height > MAX_PYTHON_DECODED_PIXELS:
        image.close()
        raise MediaError(
            f"{visible(str(path))} is {decoded_in_python} of {width}×{height} pixels, more than the {MAX_PYTHON_DECODED_PIXELS:,} "
            "that Pillow's decoder (written in Python) reads in seconds; convert it to PNG"
        )
    scans = jpeg_scans(path) if image.format in ("JPEG", "MPO") else 0
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


def ffmpeg_decodes(image: Image.Image) -> bool:
    """Whether the picture is a QOI that FFmpeg decodes (`_qoi_by_ffmpeg`), not Pillow's decoder in Python."""
    width, height = image.size
    return image.format == "QOI" and (width + 128) * (height + 128) < FFMPEG_IMAGE_LIMIT


def _qoi_by_ffmpeg(path: Path, image: Image.Image) -> Image.Image:
    """The QOI picture `image` (opened by Pillow, its header checked) decoded by FFmpeg: a ValueError
    where the file is cut short or FFmpeg's picture is not the one its header declares.

    The file goes to the decoder whole, as one packet: FFmpeg's qoi_pipe demuxer splits its data
    after the first 8 bytes that equal the end marker (seven index ops of 0, one of 1, as a
    picture's ops may hold), and the decoder, given the part before them, left the rest of the
    picture unfilled (or the last colour) without a word. A file that ends with the end marker
    may still be cut short where its ops held those bytes: the decoder reads ops while more than 4
    bytes are left, so a whole file's end before its last 8 bytes, a cut one's run into them. So
    it is decoded twice, those 8 bytes replaced by ops of other colours (QOI_TAILS), as 4 channels
    (the ops are the same; an RGBA op read into them may differ only in its alpha): the two
    pictures differ only where its ops ran into its end (told by digests: one picture is held at a time).
    The bytes are held once: read into one buffer, whose channels byte and last 8 bytes are changed
    in place (copies of them for each decode came to four times the file, 3.5 GB for the largest)."""
    with open_regular_file(path) as f:
        return qoi_decoded(_read_whole(f), image)


def _read_whole(f) -> bytearray:
    """The bytes of the open file `f`, up to its size as it is read, in one buffer."""
    data = bytearray(os.fstat(f.fileno()).st_size)
    got = 0
    with memoryview(data) as view:
        while got < len(data):
            count = f.readinto(view[got:])
            if not count:
                break
            got += count
    del data[got:]  # the file shrank meanwhile
    return data


def qoi_decoded(data: bytes | bytearray, image: Image.Image) -> Image.Image:
    """_qoi_by_ffmpeg's picture from the file's bytes (`image`: Pillow's, opened from them). A
    bytearray is changed in place (its channels byte and last 8 bytes); bytes are copied once."""
    if not data.endswith(QOI_END):
        raise ValueError("the file does not end as a QOI file does")
    ops = len(data) - QOI_HEADER_BYTES - len(QOI_END)
    if ops * QOI_PIXELS_PER_BYTE < image.width * image.height:  # FFmpeg would fill the rest with the last colour
        raise ValueError(f"the file holds too few bytes for its {image.width * image.height:,} pixels")
    packet = data if isinstance(data, bytearray) else bytearray(data)
    del data  # where the caller passed its own buffer, it alone holds the bytes now
    packet[12] = 4  # as 4 channels: an RGBA op read into the end differs in its alpha too
    second = _pixels_digest(_qoi_frame(packet, QOI_TAILS[1], image))  # one picture held at a time, and a digest
    frame = _qoi_frame(packet, QOI_TAILS[0], image)
    del packet
    if _pixels_digest(frame) != second:
        raise ValueError("its pixel data ends before its last pixel")
    return Image.fromarray(frame.to_ndarray(format="rgba" if image.mode == "RGBA" else "rgb24"), image.mode)


def _qoi_frame(packet: bytearray, tail: bytes, image: Image.Image):
    """FFmpeg's picture of a QOI file's bytes (`packet`, its channels byte 4), given to its decoder
    whole, its last 8 bytes (the end marker) replaced by `tail` in place, as 4 channels."""
    import av

    packet[-len(QOI_END) :] = tail
    frames = av.CodecContext.create("qoi", "r").decode(av.Packet(packet))  # the packet refers to the buffer: no copy
    if len(frames) != 1 or (frames[0].width, frames[0].height) != image.size or frames[0].format.name != "rgba":
        raise ValueError("FFmpeg decoded no picture of the size its header declares")
    return frames[0]


def _pixels_digest(frame) -> bytes:
    """A digest of an RGBA frame's pixels (each row's, not the padding after it)."""
    plane, row = frame.planes[0], frame.width * 4
    view, stride, digest = memoryview(plane), plane.line_size, hashlib.blake2b()
    if stride == row:
        digest.update(view[: row * frame.height])
    else:
        for top in range(0, stride * frame.height, stride):
            digest.update(view[top : top + row])
    return digest.digest()


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


# What no image reader here opens, as _sniffed names it → what to do
NOT_PICTURES = {
    "an SVG drawing": "convert it to PNG (a browser or `rsvg-convert` can)",
    "a PostScript (EPS) drawing": "convert it to PNG",  # Pillow would run Ghostscript on it: never opened here
    "text": "pass a picture file (JPEG, PNG, WebP, GIF, BMP or TIFF); a web page saved under a picture's name is one",
    "a PDF document": "export its page as PNG or JPEG",
    "a zip archive": "extract the picture from it",
    "a gzip archive": "extract the picture from it",
}


def _sniffed(path: Path) -> str:
    """What the file's first bytes say it is ("a video (MP4/MOV)", "a HEIC image"; see sniff_binary),
    "a PostScript (EPS) drawing", "an SVG drawing" or "text" where they are UTF-8 with no binary data,
    or "" where the file does not read or they are none of these (text in another encoding, say)."""
    try:
        head = file_head(path)
    except OSError:
        return ""
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):  # EPS as text, or with its binary DOS header
        return "a PostScript (EPS) drawing"
    what = sniff_binary(head)
    if what is not None or not _is_utf8(head):
        return what or ""
    return "an SVG drawing" if _SVG_ROOT.match(head) else "text"


# An SVG file's first element, after its XML declaration, comments and doctype, is <svg>: a web page
# holds <svg> elements too (its icons), inside its <html>. Possessive (*+): the prolog is read once,
# where backtracking into it took seconds for two dozen comments followed by no <svg>.
_SVG_ROOT = re.compile(rb"(?:\xef\xbb\xbf)?(?:\s|<\?.*?\?>|<!--.*?-->|<!doctype[^>\[]*(?:\[.*?\])?\s*>)*+<svg[\s>/:]",
                       re.IGNORECASE | re.DOTALL)  # fmt: skip


def _is_utf8(head: bytes) -> bool:
    """Whether a file's first bytes read as UTF-8 (a character cut at their end allowed)."""
    for cut in range(4):
        try:
            head[: len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


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
    if image.format == "TIFF":
        # Pillow turns a TIFF by every orientation as it loads it (and opens one of 5…8 at its turned
        # size): nothing is left to turn (turned here as well, a mirrored or upside-down scan (2, 3,
        # 4) was turned twice, back to as stored)
        return 1
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
    """Whether the file is an animated GIF, PNG, WebP or AVIF, from its header; False for anything else,
    a multi-page TIFF or a file Pillow cannot open included. The image loader uses its first frame."""
    try:
        with _open_image(path) as image:
            return _animated(path, image)
    except MediaError:
        return False


def _animated(path: Path, image: Image.Image) -> bool:
    """Whether `image` (opened from `path`) is an animated GIF, PNG, WebP or AVIF (an image sequence).
    The others say so in their header; a GIF's second frame is looked for by a bounded walk of its
    blocks (image_headers.py), not by Pillow's, which reads every block up to it in Python and fails
    on damage after the first."""
    if image.format == "GIF":
        try:
            with open_regular_file(path) as f:
                return gif_frame_follows(f)
        except OSError:
            return False
    return image.format in ("PNG", "WEBP", "AVIF") and bool(getattr(image, "is_animated", False))


def unused_pictures(path: Path) -> str | None:
    """What the file holds beyond the one picture the image loader uses, for the attach line
    ("animated: only its first frame is used"), or None: a question about a whole animation or
    document must not be answered from its first picture without a word. Read once, as the image is
    measured (its Media keeps it for /media's list); a file no longer regular (a FIFO swapped in
    since the probe) is not opened, nor waited on."""
    try:
        with _open_image(check_media_file(path, "image")) as image:
            if _animated(path, image):
                return "animated: only its first frame is used"
            if image.format == "TIFF" and _second_tiff_picture_is_a_page(path):
                return "several pages: only its first is used"
    except MediaError:
        pass
    return None


def _second_tiff_picture_is_a_page(path: Path) -> bool:
    """Whether a TIFF's second picture is a page of its own, not a smaller copy of the first (a
    scanner's or camera's preview: NewSubfileType, tag 254, bit 0) nor a transparency mask (bit 2: a
    GeoTIFF's nodata mask). Read from its header (image_headers.py), not by Pillow's seek."""
    try:
        with open_regular_file(path) as f:
            subfile_type = tiff_second_picture(f)
    except OSError:
        return False
    return subfile_type is not None and not subfile_type & 0b101


def _decode(path: Path) -> Image.Image:
    """Fully decode (so truncation is caught here), apply EXIF orientation, convert to RGB."""
    with _open_image(path) as image:
        orientation = pending_orientation(image)  # decided before the pixels, as probe_image decides
        native = captured()  # libtiff writes its errors to fd 2 ("ZIPDecode: Decoding error …"); Pillow says "decoder error -2"
        try:
            with quiet_pillow(), native:
                key = sixteen_bit_rgb_key(image)  # read from the tile, which loading empties
                decoded = _qoi_by_ffmpeg(path, image) if ffmpeg_decodes(image) else _loaded(image)
                if key is not None:
                    decoded = keyed_out(path, decoded, key)
        except MemoryError:
            raise MediaError(f"not enough memory to decode {visible(str(path))}; downscale the image first") from None
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib.error, …
            excerpt = native.excerpt()
            reason = _one_line(e) + (f": {excerpt}" if excerpt else "")
            raise MediaError(f"cannot decode {visible(str(path))}: the file is truncated or corrupt ({visible(reason)}); re-export or re-download it") from None
        return to_rgb(upright(decoded, orientation))


def _loaded(image: Image.Image) -> Image.Image:
    image.load()
    return image


def sixteen_bit_rgb_key(image: Image.Image) -> tuple[int, int, int] | None:
    """The transparent colour (tRNS) of a 16-bit RGB PNG, not yet loaded, or None. Pillow reads such a
    PNG as 8-bit RGB, each value's high byte, and keeps the colour in 16 bits: compared with the 8-bit
    pixels it marks none transparent (or, of (0, 0, 0), every pixel whose values are 0…255)."""
    key = image.info.get("transparency")
    if image.format != "PNG" or not image.tile or not isinstance(key, tuple) or len(key) != 3:
        return None
    return key if _raw_mode(image.tile[0][3]) == "RGB;16B" else None


def _raw_mode(args: str | tuple) -> str:
    """The raw mode of a tile's decoder arguments (Pillow gives the mode alone or a tuple it starts)."""
    return args if isinstance(args, str) else args[0]


def keyed_out(path: Path | BinaryIO, image: Image.Image, key: tuple[int, int, int]) -> Image.Image:
    """`image` (a loaded 16-bit RGB PNG: its values' high bytes) with the pixels whose 16-bit colour is
    `key` exactly made white, as transparency composited over white is, strip by strip and in place.
    The low bytes come from decoding the file (`path`, or its bytes in a file object) again as
    little-endian data. A picture sent to a server (remote_media) is made so too."""
    with Image.open(path, formats=["PNG"]) as low:
        codec, extents, offset, args = low.tile[0]
        if low.size != image.size or _raw_mode(args) != "RGB;16B":
            raise ValueError("the file changed while it was read")
        low.tile = [(codec, extents, offset, "RGB;16L" if isinstance(args, str) else ("RGB;16L", *args[1:]))]
        low.load()
        high_key, low_key = np.array([k >> 8 for k in key], np.uint8), np.array([k & 0xFF for k in key], np.uint8)
        for top, bottom in _strips(image):
            box = (0, top, image.width, bottom)
            high = np.array(image.crop(box))
            keyed = (high == high_key).all(-1) & (np.asarray(low.crop(box)) == low_key).all(-1)
            if keyed.any():
                high[keyed] = 255
                image.paste(Image.fromarray(high, "RGB"), box[:2])
    del image.info["transparency"]  # dealt with: to_rgb must not compare the 8-bit pixels with it again
    return image


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
