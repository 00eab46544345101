"""Shared helpers for the media tests: reference pipelines written plainly, and real test files.

Everything here is deliberately independent of `internvl_chat.media`: the expected values come
from straightforward PIL + numpy code, so a bug in the package cannot hide in its own oracle.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ---------------------------------------------------------------- images


def reference_normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] → float64 [3, H, W], ImageNet-normalised."""
    return ((rgb.astype(np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def reference_tiles(rgb: np.ndarray, cols: int, rows: int, thumbnail: bool, size: int) -> np.ndarray:
    """The published tiling for a given grid: one bicubic resize, numpy slicing, thumbnail last."""
    image = Image.fromarray(rgb)
    big = np.asarray(image.resize((size * cols, size * rows), Image.BICUBIC))
    tiles = [big[r * size : (r + 1) * size, c * size : (c + 1) * size] for r in range(rows) for c in range(cols)]
    if thumbnail and cols * rows > 1:
        tiles.append(np.asarray(image.resize((size, size), Image.BICUBIC)))
    return np.stack([reference_normalize(t) for t in tiles])


def textured_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: every tile differs, so a misplaced or flipped tile is noticed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 127 + 0 * x], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG header declaring width×height RGB pixels, followed by almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def heic_photo() -> bytes:
    """The top-level boxes of an iPhone photo (.heic): ftyp (major brand heic), meta (its pictures,
    as items), mdat; no moov, as an MP4 cut short before its index has none. Not decodable: the
    picture's items are left out, as is the HEVC data."""
    ftyp = b"ftyp" + b"heic" + struct.pack(">I", 0) + b"mif1heic"
    meta = b"meta" + struct.pack(">I", 0)  # a full box: version and flags
    mdat = b"mdat" + bytes(64)
    return b"".join(struct.pack(">I", 4 + len(box)) + box for box in (ftyp, meta, mdat))


def png_with_exif_after_pixels(pixels: np.ndarray, orientation: int) -> bytes:
    """A PNG of `pixels` whose eXIf chunk (an EXIF orientation) comes after the pixel data, as some
    writers put it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
    return data[:end] + _png_chunk(b"eXIf", exif.tobytes()[6:]) + data[end:]  # the chunk holds no "Exif\0\0"


# ---------------------------------------------------------------- videos

BITS = 8  # frame numbers up to 255
BAR_WIDTH = 8
VIDEO_SIZE = (BITS * BAR_WIDTH, 48)  # 64×48


def numbered_frame(number: int) -> np.ndarray:
    """A 64×48 frame showing `number` in binary: bar b is white when bit b is set, black if not.

    Full-height bars 8 px wide survive chroma subsampling and lossy coding: only the centre of
    each bar is read back.
    """
    width, height = VIDEO_SIZE
    frame = np.zeros((height, width, 3), np.uint8)
    for bit in range(BITS):
        if (number >> bit) & 1:
            frame[:, bit * BAR_WIDTH : (bit + 1) * BAR_WIDTH] = 255
    return frame


def read_frame_number(tile: np.ndarray) -> int:
    """The number shown in a normalised [3, S, S] tile made from `numbered_frame`."""
    rgb = tile.transpose(1, 2, 0) * STD + MEAN  # back to 0…1
    grey = rgb.mean(axis=-1)
    size = grey.shape[1]
    bar = size / BITS
    number = 0
    for bit in range(BITS):
        left, right = int(bit * bar + bar * 0.3), int(bit * bar + bar * 0.7)
        if grey[:, left:right].mean() > 0.5:
            number |= 1 << bit
    return number


def write_numbered_video(
    path: Path, num_frames: int, fps: int | float = 30, codec: str = "mpeg4", gop: int | None = None, options: dict | None = None,
    pix_fmt: str = "yuv420p",
) -> Path:  # fmt: skip
    """Encode frames 0…num_frames−1, each showing its own number, with PyAV (MJPEG wants pix_fmt yuvj420p)."""
    import av
    from fractions import Fraction

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        for number in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_empty_video(path: Path) -> Path:
    """An AVI with a video stream and no frames (AVI keeps an empty stream; MP4 drops it)."""
    import av

    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=30)
    stream.width, stream.height = VIDEO_SIZE
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    return path


def write_audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------- turned and large videos

FIXED_ONE = 1 << 16  # 1.0 in the 16.16 fixed point of a display matrix


def display_matrix(a: int, b: int, c: int, d: int, tx: int = 0, ty: int = 0) -> list[int]:
    """FFmpeg's 3×3 display matrix (row-major) for p' = a·p + c·q + tx, q' = b·p + d·q + ty."""
    return [a * FIXED_ONE, b * FIXED_ONE, 0, c * FIXED_ONE, d * FIXED_ONE, 0, tx * FIXED_ONE, ty * FIXED_ONE, 1 << 30]


def orientation_pattern(width: int, height: int) -> np.ndarray:
    """Red rising to the right, green rising downwards, a white block in the top-left corner.

    Each of the eight turns and mirrors of it looks different, and smooth ramps survive lossy
    coding closely, so a decoded frame can be matched against the eight candidates.
    """
    x = np.linspace(0, 255, width)
    y = np.linspace(0, 255, height)
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = np.rint(x)[None, :]
    frame[..., 1] = np.rint(y)[:, None]
    frame[..., 2] = 60
    frame[: height // 3, : width // 4] = 250
    return frame


def write_pattern_video(
    path: Path,
    width: int,
    height: int,
    frames: int = 3,
    matrix: list[int] | None = None,
    rotate_tag: str | None = None,
    codec: str = "mpeg4",
) -> Path:
    """`frames` copies of `orientation_pattern`, with a display matrix and/or a `rotate` tag.

    PyAV writes the matrix as stream side data (MP4: the track matrix; MKV: the projection
    pose) and the tag as stream metadata (MKV keeps it as a ROTATE tag, as older FFmpeg did).
    """
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if matrix is not None:
            stream.set_display_matrix(matrix)
        if rotate_tag is not None:
            stream.metadata["rotate"] = rotate_tag
        picture = av.VideoFrame.from_ndarray(orientation_pattern(width, height), format="rgb24")
        for _ in range(frames):
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_large_video(path: Path, side: int, frames: int = 4) -> Path:
    """A side×side clip made cheaply: YUV planes filled directly (no RGB conversion), intra-only
    MPEG-4 (no motion search); a ramp across, chroma differing per frame."""
    import av

    ramp = np.linspace(16, 235, side).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 1
        for number in range(frames):
            planes = np.empty((side * 3 // 2, side), np.uint8)
            planes[:side] = ramp[None, :]
            planes[side:] = 100 + 20 * number
            for packet in stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_backends() -> list:
    """pytest parameters for both video decoders; decord is skipped where it has no wheel."""
    import pytest

    try:
        import decord  # noqa: F401

        decord_param = pytest.param("decord", id="decord")
    except Exception:  # noqa: BLE001
        decord_param = pytest.param("decord", id="decord", marks=pytest.mark.skip(reason="decord not installed"))
    return [decord_param, pytest.param("pyav", id="pyav")]


def tiled_tiff(width: int, height: int, tile: int, grey: int | None = 128) -> bytes:
    """A deflate-compressed RGB TIFF of width×height in tile×tile tiles, every pixel grey (Pillow
    writes no tiled TIFFs); grey None: tiles of 16 bytes, for a header that is never decoded."""
    across, down = -(-width // tile), -(-height // tile)
    block = zlib.compress(bytes(16) if grey is None else bytes([grey]) * (tile * tile * 3))
    entries = [(256, 4, width), (257, 4, height), (258, 3, None), (259, 3, 8), (262, 3, 2), (277, 3, 3), (284, 3, 1),
               (322, 4, tile), (323, 4, tile), (324, 4, None), (325, 4, None)]  # fmt: skip
    count = across * down
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = 8 + ifd_size
    offsets_at = bits_at + 6
    sizes_at = offsets_at + 4 * count
    data_at = sizes_at + 4 * count
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        if tag == 258:
            field = struct.pack("<HHI", tag, 3, 3) + struct.pack("<I", bits_at)
        elif tag == 324:
            field = struct.pack("<HHI", tag, 4, count) + struct.pack("<I", offsets_at if count > 1 else data_at)
        elif tag == 325:
            field = struct.pack("<HHI", tag, 4, count) + struct.pack("<I", sizes_at if count > 1 else len(block))
        elif kind == 3:
            field = struct.pack("<HHIHH", tag, 3, 1, value, 0)
        else:
            field = struct.pack("<HHII", tag, 4, 1, value)
        out += field
    out += b"\0\0\0\0" + struct.pack("<HHH", 8, 8, 8)
    out += b"".join(struct.pack("<I", data_at + k * len(block)) for k in range(count))
    out += struct.pack("<I", len(block)) * count
    return out + block * count


def jpeg_with_empty_scans(side: int, scans: int) -> bytes:
    """A grey progressive JPEG followed by `scans` more AC scans of its luma, each a few bytes: one
    EOB-run code per 32,767 blocks (a Huffman table of that one symbol is added first). Each costs
    the decoder a pass over the whole picture."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    end = data.rindex(b"\xff\xd9")
    table = b"\xff\xc4" + struct.pack(">H", 20) + bytes([0x11, 1] + [0] * 15 + [0xE0])  # AC table 1: EOB14 = "0"
    bits = []
    left = -(-side // 8) ** 2
    while left > 0:
        run = min(left, 32767)
        bits += [0] + [(run - (1 << 14)) >> i & 1 for i in range(13, -1, -1)]
        left -= run
    bits += [1] * (-len(bits) % 8)
    coded = bytearray()
    for k in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[k : k + 8])), 2)
        coded += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    scan = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0x01, 1, 63, 0]) + bytes(coded)
    return data[:end] + table + scan * scans + b"\xff\xd9"


def write_growing_video(path: Path, small: int, large: int, side: int = 512) -> Path:
    """An MPEG-TS clip whose header tells of 64×48 frames: `small` of them, then `large` frames of
    side×side in the same stream (MPEG-2 carries its frame size in the stream; FFmpeg reads the
    header's from the first frames)."""
    import av
    from fractions import Fraction

    packets = []
    for (width, height), count in (((64, 48), small), ((side, side), large)):
        encoder = av.CodecContext.create("mpeg2video", "w")
        encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
        encoder.time_base, encoder.framerate, encoder.gop_size = Fraction(1, 30), 30, 12
        for number in range(count):
            planes = np.full((height * 3 // 2, width), 100 + number, np.uint8)
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = number
            packets += encoder.encode(frame)
        packets += encoder.encode()
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=30)
        stream.width, stream.height = 64, 48
        for number, packet in enumerate(packets):
            packet.stream = stream
            packet.time_base = Fraction(1, 90000)
            packet.pts = packet.dts = number * 3000
            container.mux(packet)
    return path


def faststart_copy(path: Path, copy: Path) -> Path:
    """`path` remuxed (no re-encoding) with its index (moov) before the frames, as streaming sites
    write MP4s: a copy cut short keeps an index that lists every frame."""
    import av

    with av.open(str(path)) as source, av.open(str(copy), "w", options={"movflags": "faststart"}) as target:
        stream = source.streams.video[0]
        out = target.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.dts is None:  # the flush packet at the end
                continue
            packet.stream = out
            target.mux(packet)
    return copy


def cut_at_frame(whole: Path, copy: Path, frame: int, inside: bool = False) -> Path:
    """A copy of `whole` that ends where frame `frame`'s data begins, or halfway through it (as an
    unfinished download does: with faststart_copy's index, which lists every frame)."""
    import av

    with av.open(str(whole)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    pos, size = packets[frame]
    copy.write_bytes(whole.read_bytes()[: pos + (size // 2 if inside else 0)])
    return copy


def write_trimmed_video(path: Path, num_frames: int, hidden: int, fps: int = 10) -> Path:
    """An MP4 of frames 0…num_frames−1 (each showing its number) whose first `hidden` come before
    time 0: the muxer writes an edit list that hides them, as `ffmpeg -ss … -c copy` does when it
    cuts a clip without re-encoding. A player (and FFmpeg's decoding) shows frame `hidden` first."""
    import av
    from fractions import Fraction

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for number in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            frame.pts, frame.time_base = number - hidden, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_late_start_video(path: Path, num_frames: int, first_ms: int, step_ms: int = 40, codec: str = "mpeg4",
                           times_ms: list[int] | None = None, options: dict | None = None) -> Path:  # fmt: skip
    """Frames 0…num_frames−1 (each showing its number), `step_ms` apart, the first shown at
    `first_ms`, not 0: a clip cut from a broadcast or remuxed with its times kept. An MKV's or
    WebM's header then gives where its frames end as its duration. `times_ms`: each frame's time
    instead (a variable frame rate, as phones and screen recorders write)."""
    import av
    from fractions import Fraction

    base = Fraction(1, 1000)
    times_ms = times_ms or [first_ms + number * step_ms for number in range(num_frames)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(1000, step_ms))
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        if options:
            stream.options = options
        for number in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            frame.pts, frame.time_base = times_ms[number], base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_padded_video(path: Path, num_frames: int, rate: float, last_frames: float, codec: str = "mpeg4") -> Path:
    """Frames 0…num_frames−1 at a constant `rate`, times in milliseconds (an MKV's), its last frame
    lasting `last_frames` frames: a container duration padded by `last_frames` − 1 frames, as a
    muxer that gives the last frame the length of two, or rounds it to the millisecond, writes it."""
    import av
    from fractions import Fraction

    base = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(rate).limit_denominator(1001))
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        packets = []
        for number in range(num_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(number), format="rgb24")
            frame.pts, frame.time_base = round(number * 1000 / rate), base
            packets += stream.encode(frame)
        packets += stream.encode()
        for packet in packets:  # in milliseconds, so that half a frame is not rounded to a whole one
            packet.pts = packet.dts = round(packet.pts * packet.time_base / base)
            packet.time_base = base
        max(packets, key=lambda packet: packet.pts).duration = round(last_frames * 1000 / rate)
        for packet in packets:
            container.mux(packet)
    return path


def with_empty_edit(path: Path, copy: Path, seconds: float) -> Path:
    """`path` (an MP4 with an edit list, its index after its frames) with an empty edit of
    `seconds` before its edits: its first frame is shown that late, as an editor that delays a
    track writes it. The boxes that hold the new entry grow by its 12 bytes; no sample moves."""
    import struct

    data = bytearray(path.read_bytes())
    assert data.index(b"mdat") < data.index(b"moov") and b"elst" in data
    mvhd = data.index(b"mvhd") - 4
    timescale = struct.unpack(">I", data[mvhd + (28 if data[mvhd + 8] else 20):][:4])[0]
    elst = data.index(b"elst") - 4
    assert data[elst + 8] == 0  # version 0: 32-bit durations and times
    count = struct.unpack(">I", data[elst + 12 : elst + 16])[0]
    data[elst + 12 : elst + 16] = struct.pack(">I", count + 1)
    data[elst + 16 : elst + 16] = struct.pack(">IiI", round(seconds * timescale), -1, 1 << 16)  # media time −1: empty
    for name in (b"elst", b"edts", b"trak", b"moov"):
        at = data.index(name) - 4
        data[at : at + 4] = struct.pack(">I", struct.unpack(">I", data[at : at + 4])[0] + 12)
    copy.write_bytes(data)
    return copy


def with_edits(path: Path, copy: Path, edits: list[tuple[int, int]], version: int = 0) -> Path:
    """`path` (an MP4 with one edit list, its index after its frames) with that list's entries
    replaced by `edits`, (duration in the movie's time scale, media time: −1 for an empty edit),
    in an elst box of `version` (1: 64-bit fields). The boxes that hold it grow or shrink; no
    sample moves."""
    import struct

    data = bytearray(path.read_bytes())
    assert data.index(b"mdat") < data.index(b"moov") and data.count(b"elst") == 1
    elst = data.index(b"elst") - 4
    size = struct.unpack(">I", data[elst : elst + 4])[0]
    row = ">QqI" if version else ">IiI"
    payload = bytes([version, 0, 0, 0]) + struct.pack(">I", len(edits))
    payload += b"".join(struct.pack(row, duration, media, 1 << 16) for duration, media in edits)
    box = struct.pack(">I", 8 + len(payload)) + b"elst" + payload
    data[elst : elst + size] = box
    for name in (b"edts", b"trak", b"moov"):
        at = data.index(name) - 4
        data[at : at + 4] = struct.pack(">I", struct.unpack(">I", data[at : at + 4])[0] + len(box) - size)
    copy.write_bytes(data)
    return copy


def remux_video(source: Path, path: Path) -> Path:
    """`source`'s video packets in another container (by `path`'s extension), times kept in its
    time base: an MKV's 1 ms base makes an AVI of 1000 "frames" a second, most of them dropped
    (empty chunks), as `ffmpeg -i vfr.mkv -c copy vfr.avi` writes it."""
    import av

    with av.open(str(source)) as given, av.open(str(path), "w") as made:
        stream = given.streams.video[0]
        out = made.add_stream_from_template(stream)
        out.time_base = stream.time_base
        for packet in given.demux(stream):
            if packet.dts is None:  # the end-of-stream packet
                continue
            packet.stream = out
            made.mux(packet)
    return path


def encode_plain(codec: str, width: int, height: int, count: int, options: dict | None = None, pix_fmt: str = "yuv420p") -> list:
    """`count` flat frames encoded alone (no container): H.264 and HEVC packets then carry their
    parameter sets in-band, Annex B (start codes), before each key frame's slices."""
    import av
    from fractions import Fraction

    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, pix_fmt
    encoder.time_base, encoder.framerate, encoder.gop_size = Fraction(1, 30), 30, 12
    encoder.options = options or {}
    packets = []
    for number in range(count):
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 10 * number % 256, np.uint8), format="rgb24")
        frame = frame.reformat(format=pix_fmt)
        frame.pts = number
        packets += encoder.encode(frame)
    return packets + encoder.encode()


ANNEX_B_SPS = {"libx264": (7, 1), "libx265": (33, 2)}  # encoder: (SPS NAL type, NAL header bytes)


def annex_b_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B stream (each after a 00 00 01 start code), trailing zeros dropped."""
    return [unit.rstrip(b"\x00") for unit in data.split(b"\x00\x00\x01")[1:] if unit.rstrip(b"\x00")]


def nal_kind(encoder: str, unit: bytes) -> int:
    return unit[0] & 0x1F if encoder == "libx264" else (unit[0] >> 1) & 0x3F


QUIET = {"libx264": {"bframes": "0"}, "libx265": {"x265-params": "log-level=none:bframes=0"}}


def write_inband_growing(path: Path, small: int, large: int, side: int = 512, encoder: str = "libx264", extra: bytes = b"") -> Path:
    """An MP4 (or MKV, by its name) whose header (avcC or hvcC, tkhd) tells of 64×48 frames: `small`
    of them, then `large` of side×side in the same stream, whose first key frame carries its new
    SPS in-band (FFmpeg decodes on at the new size; decord scales its frames to the header's).
    An `extra` NAL unit goes before the last small frame's."""
    import av
    from fractions import Fraction

    first = encode_plain(encoder, 64, 48, small, QUIET[encoder])
    if extra:
        first[-1] = av.Packet(b"\x00\x00\x00\x01" + extra + bytes(first[-1]))
    packets = first + encode_plain(encoder, side, side, large, QUIET[encoder])
    data = bytes(first[0])
    slice_at = min(data.index(b"\x00\x00\x01" + unit) for unit in annex_b_units(data)
                   if nal_kind(encoder, unit) not in (6, 7, 8, 32, 33, 34, 35, 39))  # fmt: skip
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264" if encoder == "libx264" else "hevc", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.extradata = data[:slice_at].rstrip(b"\x00")  # the muxer makes avcC/hvcC of them
        for number, packet in enumerate(packets):
            packet.stream, packet.time_base = stream, Fraction(1, 30)
            packet.pts = packet.dts = number
            container.mux(packet)
    return path


_STSD_PATH = (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd")


def _box_chain(data: bytes | bytearray) -> list[int]:
    """Where each box of _STSD_PATH starts, the first of its kind inside the one before."""
    at, end, found = 0, len(data), []
    for kind in _STSD_PATH:
        while int.from_bytes(data[at + 4 : at + 8], "big") and data[at + 4 : at + 8] != kind:
            at += int.from_bytes(data[at : at + 4], "big")
            assert at < end, kind
        found.append(at)
        end, at = at + int.from_bytes(data[at : at + 4], "big"), at + 8
    return found


def with_second_description(path: Path, other: Path, copy: Path) -> Path:
    """A copy of the MP4 `path` whose track lists the sample description of `other`'s (its avc1
    box: another avcC) as a second one (no sample refers to it). The moov follows the frames, so
    no chunk offset moves."""
    data, donor = bytearray(path.read_bytes()), other.read_bytes()
    assert data.index(b"mdat") < data.index(b"moov")
    entry_at = _box_chain(donor)[-1] + 16  # after the stsd's header, version, flags and count
    entry = donor[entry_at : entry_at + int.from_bytes(donor[entry_at : entry_at + 4], "big")]
    chain = _box_chain(data)
    stsd = chain[-1]
    end = stsd + int.from_bytes(data[stsd : stsd + 4], "big")
    data[stsd + 12 : stsd + 16] = (int.from_bytes(data[stsd + 12 : stsd + 16], "big") + 1).to_bytes(4, "big")
    for at in chain:
        data[at : at + 4] = (int.from_bytes(data[at : at + 4], "big") + len(entry)).to_bytes(4, "big")
    data[end:end] = entry
    copy.write_bytes(bytes(data))
    return copy


class BitWriter:
    """Bits written big-endian, with exp-Golomb codes: a parameter set made by hand."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, value: int, count: int) -> BitWriter:
        self.bits += [(value >> shift) & 1 for shift in range(count - 1, -1, -1)]
        return self

    def ue(self, value: int) -> BitWriter:
        return self.u(value + 1, 2 * (value + 1).bit_length() - 1)

    def se(self, value: int) -> BitWriter:
        return self.ue(2 * value - 1 if value > 0 else -2 * value)

    def nal(self, header: bytes) -> bytes:
        """The NAL unit: `header`, then the bits with their stop bit, emulation prevention added."""
        bits = self.bits + [1] + [0] * (-(len(self.bits) + 1) % 8)
        payload, out, zeros = bytes(int("".join(map(str, bits[at : at + 8])), 2) for at in range(0, len(bits), 8)), bytearray(), 0
        for byte in payload:
            if zeros >= 2 and byte <= 3:
                out.append(3)
                zeros = 0
            out.append(byte)
            zeros = zeros + 1 if byte == 0 else 0
        return header + bytes(out)


def h264_sps(mb_width: int, mb_height: int, scaling_delta: int | None = None, poc_cycle: list[int] | None = None) -> bytes:
    """An H.264 SPS NAL unit of mb_width × mb_height macroblocks (frames, no cropping): Baseline, or
    High 4:4:4 with all 12 scaling lists, each delta `scaling_delta`; a picture order cycle of
    these offsets (type 1) where given."""
    bits = BitWriter().u(244 if scaling_delta is not None else 66, 8).u(0, 8).u(40, 8).ue(0)
    if scaling_delta is not None:
        bits.ue(3).u(0, 1).ue(0).ue(0).u(0, 1).u(1, 1)  # 4:4:4, 8 bits, scaling matrix present
        for number in range(12):
            bits.u(1, 1)
            for _ in range(16 if number < 6 else 64):
                bits.se(scaling_delta)
    bits.ue(0)  # log2_max_frame_num_minus4
    if poc_cycle is None:
        bits.ue(0).ue(0)
    else:
        bits.ue(1).u(0, 1).se(0).se(0).ue(len(poc_cycle))
        for offset in poc_cycle:
            bits.se(offset)
    bits.ue(1).u(0, 1).ue(mb_width - 1).ue(mb_height - 1).u(1, 1).u(1, 1).u(0, 1).u(0, 1)  # frames only, no cropping, no VUI
    return bits.nal(b"\x67")
