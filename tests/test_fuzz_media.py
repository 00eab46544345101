"""A deterministic mutation fuzz of the media readers: images (PNG, JPEG, GIF, WebP) through
load_image, videos (MP4, MKV, AVI) through measure_video and load_video. Each mutant is decoded
or refused with one MediaError line (tests/fuzz_helpers.py says how mutants are made). Cuts land
at every structural boundary: PNG chunks, JPEG markers, MP4 boxes, EBML elements, RIFF chunks.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from fuzz_helpers import Findings, byte_mutants, spread
from media_helpers import (display_matrix, numbered_frame, png_with_exif_after_pixels, textured_rgb, tiled_tiff,
                           write_pattern_video)
from PIL import Image

from internvl_chat.media.image import load_image
from internvl_chat.media.video import load_video, measure_video


def png_boundaries(data: bytes) -> list[int]:
    """Where each chunk, its data and its CRC start."""
    out, at = [8], 8
    while at + 8 <= len(data):
        size = struct.unpack(">I", data[at : at + 4])[0]
        out += [at + 4, at + 8, at + 8 + size, at + 12 + size]
        at += 12 + size
    return out


def jpeg_boundaries(data: bytes) -> list[int]:
    return [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]


def mp4_boundaries(data: bytes, start: int = 0, end: int | None = None) -> list[int]:
    """Where each box and its payload start, recursively into the boxes that hold boxes."""
    end = len(data) if end is None else end
    out, at = [], start
    while at + 8 <= end:
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        if size < 8:
            break
        out += [at, at + 4, at + 8]
        if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"mvex", b"moof", b"traf"):
            out += mp4_boundaries(data, at + 8, at + size)
        at += size
    return out + [end]


def every(step: int, data: bytes) -> list[int]:
    """Cuts through a file whose structure is walked by the reader itself (EBML, RIFF)."""
    return list(range(0, len(data), step))


def png_repair(data: bytes) -> bytes:
    """Every whole chunk's CRC made right again, so a mutant reaches the chunk's reader."""
    out, at = bytearray(data), 8
    while at + 12 <= len(data):
        size = struct.unpack(">I", data[at : at + 4])[0]
        if at + 12 + size > len(data):
            break
        out[at + 8 + size : at + 12 + size] = struct.pack(">I", zlib.crc32(data[at + 4 : at + 8 + size]))
        at += 12 + size
    return bytes(out)


def _image_seeds() -> dict[str, bytes]:
    rgb = textured_rgb(96, 40, seed=3)
    pixels = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned: the orientation is read and applied
    exif[0x010F] = "camera"
    out = {"png-exif": png_with_exif_after_pixels(rgb, 8)}
    for kind, options in (("png", {}), ("jpeg", {"quality": 80, "exif": exif.tobytes()}), ("gif", {}), ("webp", {"quality": 60})):
        buffer = io.BytesIO()
        pixels.save(buffer, kind.upper(), **options)
        out[kind] = buffer.getvalue()
    return out


def _header_span(kind: str, data: bytes) -> tuple[int, int]:
    """The bytes before the pixels: where the structure a reader parses lives."""
    if kind.startswith("png"):
        return 8, data.index(b"IDAT")
    if kind == "jpeg":
        return 2, data.index(b"\xff\xda")  # up to the start of scan (EXIF, tables, frame header)
    return 0, min(len(data), 64)


IMAGE_CUTS = {"png": png_boundaries, "png-exif": png_boundaries, "jpeg": jpeg_boundaries, "gif": lambda d: every(7, d),
              "webp": lambda d: every(7, d)}  # fmt: skip


@pytest.mark.parametrize("kind", ["png", "png-exif", "jpeg", "gif", "webp"])
def test_image_mutants(tmp_path, kind, capfd):
    good = _image_seeds()[kind]
    path = tmp_path / f"picture.{kind.split('-')[0]}"
    findings = Findings(f"{kind} image", capfd)
    repair = png_repair if kind.startswith("png") else None
    cuts = spread(IMAGE_CUTS[kind](good), 40)
    mutants = [*byte_mutants(good, 21, 60, cuts, repair=repair), *byte_mutants(good, 22, 80, span=_header_span(kind, good), repair=repair)]
    for label, data in mutants:
        path.write_bytes(data)
        findings.check(label, lambda: load_image(path, max_tiles=2, image_size=28))
    findings.assert_none()


def _use_video(path: Path) -> None:
    measure_video(path)
    load_video(path, num_frames=3, image_size=28, max_decode_pixels=10**7)


def _video_span(suffix: str, data: bytes) -> tuple[int, int]:
    """The container's own structure: an MP4's moov, an MKV's elements before its first Cluster,
    an AVI's hdrl list (before movi)."""
    if suffix == "mp4":
        at = data.index(b"moov") - 4
        return at, at + struct.unpack(">I", data[at : at + 4])[0]
    if suffix == "mkv":
        return 0, data.index(bytes.fromhex("1F43B675"))
    return 0, data.index(b"movi")


def _written(path: Path, codec: str = "mpeg4", **options: str) -> Path:
    """Six numbered frames, muxed bit-exact: Matroska's muxer otherwise draws random UIDs, and the
    mutants of a seed that changes on every run would not be the same mutants."""
    import av

    with av.open(str(path), "w", options={"fflags": "+bitexact", **options}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = 2
        for number in range(6):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _video_seed(path: Path, kind: str) -> bytes:
    if kind == "mp4":  # turned a quarter by its display matrix: the orientation is read
        return write_pattern_video(path, 64, 48, frames=4, matrix=display_matrix(0, 1, -1, 0, 48, 0)).read_bytes()
    if kind == "mp4-fragmented":  # its samples listed in moof boxes after an empty moov (a live recording's)
        return _written(path, movflags="frag_keyframe+empty_moov").read_bytes()
    return _written(path, "libvpx-vp9" if kind == "webm" else "mpeg4").read_bytes()


@pytest.mark.parametrize("kind", ["mp4", "mp4-fragmented", "mov", "mkv", "webm", "avi"])
def test_video_mutants(tmp_path, kind, capfd):
    suffix = kind.split("-")[0]
    good = _video_seed(tmp_path / f"seed.{suffix}", kind)
    path = tmp_path / f"clip.{suffix}"
    findings = Findings(f"{kind} video", capfd)
    mp4_like = suffix in ("mp4", "mov")
    cuts = spread(mp4_boundaries(good) if mp4_like else every(3, good), 50 if kind in ("mp4", "mkv", "avi") else 20)
    count = 100 if kind in ("mp4", "mkv", "avi") else 40
    span = _video_span("mp4" if mp4_like else "mkv" if suffix == "webm" else suffix, good)
    mutants = [*byte_mutants(good, 23, count // 3, cuts), *byte_mutants(good, 24, count, span=span)]
    for label, data in mutants:
        path.write_bytes(data)
        findings.check(label, lambda: _use_video(path))
    findings.assert_none()


MORE_IMAGES = {  # the other formats the app takes (image.image_formats), as Pillow writes them
    "bmp": ("BMP", {}), "tiff": ("TIFF", {"compression": "tiff_deflate"}), "tiff-jpeg": ("TIFF", {"compression": "jpeg"}),
    "ico": ("ICO", {}), "ppm": ("PPM", {}), "tga": ("TGA", {"compression": "tga_rle"}), "jp2": ("JPEG2000", {}),
    "avif": ("AVIF", {"quality": 50}), "qoi": ("QOI", {}), "jpeg-progressive": ("JPEG", {"progressive": True}),
}  # fmt: skip


@pytest.mark.parametrize("kind", [*MORE_IMAGES, "tiff-tiled"])
def test_more_image_format_mutants(tmp_path, capfd, kind):
    """Fewer mutants each: a cut at 16 places, and mutations of its first 256 bytes (the header)."""
    if kind == "tiff-tiled":
        good, suffix = tiled_tiff(96, 40, 16), "tiff"
    else:
        fmt, options = MORE_IMAGES[kind]
        buffer = io.BytesIO()
        Image.fromarray(textured_rgb(96, 40, seed=3)).save(buffer, fmt, **options)
        good, suffix = buffer.getvalue(), kind.split("-")[0]
    path = tmp_path / f"picture.{suffix}"
    findings = Findings(f"{kind} image", capfd)
    mutants = [*byte_mutants(good, 25, 0, spread(every(1, good), 16)), *byte_mutants(good, 26, 30, span=(0, min(256, len(good))))]
    for label, data in mutants:
        path.write_bytes(data)
        findings.check(label, lambda: load_image(path, max_tiles=2, image_size=28))
    findings.assert_none()
