"""Videos → N sampled frames, each one normalised 448×448 tile (SPEC §4).

Frames are sampled with the published formula (`frame_indices`): the clip, or the part between
`start` and `end` seconds, is cut into N equal segments and one frame is taken near the middle of
each. Frame n is the n-th frame in presentation order. decord seeks to each frame (fast on long
clips) but lands on another frame where the stream reorders frames it cannot place after a seek
(see `decord_is_exact`); PyAV, which decodes from the start, is used there and where decord does
not import. `INTERNVL_CHAT_VIDEO_BACKEND=pyav|decord` forces one. PyAV decodes only the sampled
frames of intra-only streams (MJPEG, DV, ProRes, raw: each packet a whole frame on its own); other
codecs may refer to earlier frames whatever their key frame flags say, so those decode from the start.

When N is larger than the number of frames in the range, frames repeat (as in the published
formula) rather than failing: the model still gets N frames.

Frames come out as a player shows them: a rotation or mirror stored with the video (a display
matrix, as phones write, or an older `rotate` tag) is applied before the tile transform. Each frame
is reduced to its tile as soon as it is decoded, so memory holds one full-size frame at a time
whatever the resolution and N. Decoding runs on a worker thread that stops at the next frame when
the caller is interrupted, so Ctrl-C is answered at once even while FFmpeg is busy in C code.

Decoding work is counted in pixels of the frames the decoder produces (each at least 128×128),
the sampled ones and those it passes through to reach them: `decode_cost` plans it from the
header and the key frames before any decoding; `load_video(max_decode_pixels=…)` refuses a plan
over the limit and stops a decode that goes past it, as a header may lie. `serve` sets a limit;
in the terminal app Ctrl-C is one.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import importlib
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from ..errors import Cancelled, MediaError, UsageError
from ..files import IMAGE_KINDS, sniff_file, visible
from ..native_stderr import captured
from ..threads import start_worker
from .image import IMAGE_SIZE, check_media_file, normalize_tiles, probe_image

BACKEND_ENV = "INTERNVL_CHAT_VIDEO_BACKEND"
BACKENDS = ("decord", "pyav")

# Limits on what a container header may claim (the file is untrusted). FFmpeg itself decodes frames
# up to about 16256×16256; anything beyond 2^28 pixels per frame is a damaged or hostile header.
MAX_FRAME_PIXELS = 1 << 28
MAX_FRAMES = 100_000_000  # 11 days at 100 fps
MAX_FPS = 10_000.0  # high-speed cameras reach about 1,000
MAX_DURATION_S = 1_000_000.0  # 11.6 days
# FFmpeg's frame threading keeps one frame in flight per thread: cap their memory for huge frames.
FRAME_THREADS_BYTES = 512 << 20
# Decoding work is counted in pixels, each frame as at least this side squared: a frame has a fixed
# cost too (a 16×16 one takes as long as about 130×130 pixels of a large one, in FFmpeg and here)
MIN_FRAME_SIDE = 128


@dataclass
class VideoInput:
    pixel_values: torch.Tensor  # float32 [N, 3, S, S], one tile per sampled frame
    indices: list[int]  # frame numbers, 0-based, in presentation order
    timestamps: list[float]  # seconds: index / fps
    fps: float
    num_total_frames: int
    backend: str  # "decord" or "pyav"
    path: Path
    decoded_frames: int = 0  # frames the decoder produced to reach the sampled ones
    decoded_pixels: int = 0  # their width × height (at least MIN_FRAME_SIDE²), summed

    @property
    def num_frames(self) -> int:
        return int(self.pixel_values.shape[0])


# ---------------------------------------------------------------- sampling (pure)


def frame_indices(
    num_total_frames: int, fps: float, num_frames: int, start: float | None = None, end: float | None = None
) -> list[int]:
    """The frame numbers to sample (SPEC §4).

    Bounds in seconds become frame numbers by round(s·fps), clamped to [0, total−1]; the defaults
    are the first and last frame. seg = (last − first)/N and frame k is
    int(first + seg/2 + round(seg·k)), with Python's round (half to even).
    """
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    if num_total_frames < 1:
        raise MediaError("the video has no frames; use a file that contains video")
    last = num_total_frames - 1
    if start is not None or end is not None:
        if not fps > 0:
            raise MediaError("the video has no usable frame rate, so a time range cannot be applied; omit start/end")
        duration = num_total_frames / fps
        if not all(math.isfinite(t) for t in (start, end) if t is not None):  # round(inf · fps) would overflow
            raise MediaError(f"the time range {start}–{end} s is not finite; use times from 0 to {duration:.2f} s")
        if (start is not None and start < 0) or (end is not None and end < 0):
            raise MediaError(f"the time range {start}–{end} s has a negative bound; use times from 0 to {duration:.2f} s")
        if start is not None and start >= duration:
            raise MediaError(f"start {start} s is at or past the end of the video ({duration:.2f} s); choose an earlier start")
        if end is not None and end <= (start or 0.0):
            raise MediaError(f"end {end} s is not after start {start or 0.0} s; choose an end later than the start")
    first = 0 if start is None else min(max(round(start * fps), 0), last)
    final = last if end is None else min(max(round(end * fps), 0), last)
    seg = (final - first) / num_frames
    return [int(first + seg / 2 + round(seg * k)) for k in range(num_frames)]


def used_range(video_range: tuple[float, float] | None, duration: float) -> tuple[float, float] | None:
    """The range as it is used, to show and save: an end past the video's end becomes the end
    (frame_indices takes the last frame for it), rounded up to 1/100 s so the label stays short
    and still reaches the last frame. A start at or past the end is left for the caller to refuse."""
    if video_range is None or not duration > 0:
        return video_range
    start, end = video_range
    if end <= duration or start >= duration:
        return video_range
    return start, math.ceil(round(duration * 100, 6)) / 100


# ---------------------------------------------------------------- orientation (pure)

# The eight ways to turn or mirror a picture, as PIL operations (None: as stored) and as integer
# matrices (m11, m12, m21, m22) with x' = m11·x + m12·y, y' = m21·x + m22·y in picture coordinates
# (y pointing down), the convention of FFmpeg's display matrix.
Orientation = Image.Transpose | None
_MATRICES: dict[Orientation, tuple[int, int, int, int]] = {
    None: (1, 0, 0, 1),
    Image.Transpose.FLIP_LEFT_RIGHT: (-1, 0, 0, 1),
    Image.Transpose.FLIP_TOP_BOTTOM: (1, 0, 0, -1),
    Image.Transpose.ROTATE_180: (-1, 0, 0, -1),
    Image.Transpose.ROTATE_90: (0, 1, -1, 0),  # counter-clockwise
    Image.Transpose.ROTATE_270: (0, -1, 1, 0),  # clockwise, as a phone held upright records
    Image.Transpose.TRANSPOSE: (0, 1, 1, 0),
    Image.Transpose.TRANSVERSE: (0, -1, -1, 0),
}
_BY_MATRIX = {m: o for o, m in _MATRICES.items()}
_CLOCKWISE = [None, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90]


def orientation_from_display_matrix(matrix: Sequence[int]) -> Orientation:
    """The turn/mirror a player applies for FFmpeg's 3×3 display matrix (row-major, 16.16 fixed point).

    p' = a·p + c·q, q' = b·p + d·q with (a, b, c, d) = matrix[0, 1, 3, 4]. Translation and scale
    do not matter for a picture; an angle that is not a multiple of 90° snaps to the nearest one.
    """
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    if not any((a, b, c, d)):
        return None
    # the nearest of the eight: the largest inner product with the (scaled) matrix
    return max(_MATRICES, key=lambda o: sum(x * y for x, y in zip(_MATRICES[o], (a, c, b, d))))


def orientation_from_rotate_tag(value: str) -> Orientation:
    """A `rotate` metadata tag: degrees clockwise; anything unreadable means no turn."""
    try:
        degrees = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(degrees):
        return None
    return _CLOCKWISE[round(degrees / 90) % 4]


def compose(first: Orientation, then: Orientation) -> Orientation:
    """The single operation equal to applying `first`, then `then`."""
    p11, p12, p21, p22 = _MATRICES[first]
    q11, q12, q21, q22 = _MATRICES[then]
    return _BY_MATRIX[(q11 * p11 + q12 * p21, q11 * p12 + q12 * p22, q21 * p11 + q22 * p21, q21 * p12 + q22 * p22)]


def inverse(orientation: Orientation) -> Orientation:
    m11, m12, m21, m22 = _MATRICES[orientation]
    return _BY_MATRIX[(m11, m21, m12, m22)]  # orthogonal: the inverse is the transpose


def swaps_sides(orientation: Orientation) -> bool:
    return _MATRICES[orientation][0] == 0


# ---------------------------------------------------------------- the header (PyAV)


@dataclass
class _Header:
    width: int  # as stored, before any turn
    height: int
    fps: float  # 0.0 when the header has none
    frames: int  # the header's count; 0 when it stores none
    duration: float  # seconds; 0.0 when unknown
    format_name: str
    display_matrix: tuple[int, ...] | None  # from the first decoded frame (FFmpeg attaches it there)
    rotate_tag: str | None
    codec: str = ""  # FFmpeg's decoder name ("h264", "mpeg4", …)
    reorders: bool = False  # the stream has B-frames (frames decoded before they are shown)
    alone: bool = True  # the file's only video stream (no cover picture, no second video)

    @property
    def orientation(self) -> Orientation:
        """How a player turns the stored frames: the display matrix, else the older `rotate` tag."""
        if self.display_matrix is not None:
            return orientation_from_display_matrix(self.display_matrix)
        if self.rotate_tag is not None:
            return orientation_from_rotate_tag(self.rotate_tag)
        return None


def _shown(path: Path) -> str:
    """A path in a message: control and bidi characters escaped (a file name is anything but \\0 and /)."""
    return visible(str(path))


def _one_line(err: BaseException) -> str:
    """The reason an error gives, without what the message already says: PyAV's errors carry
    FFmpeg's reason in `strerror`, while str() adds `[Errno 1094995529]` and the path again."""
    reason = getattr(err, "strerror", None)
    if isinstance(reason, str) and reason.strip():
        text = reason
    else:
        # decord prefixes its messages with a time and a C++ source location: keep only the reason
        text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(err))
    text = " ".join(visible(text).split())
    return text or type(err).__name__


# What the file system says when a path cannot be opened at all (not a video's content)
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}


def _cannot_read(path: Path, err: BaseException) -> MediaError:
    """One line for a file PyAV cannot open (it may have changed since check_media_file looked)."""
    code = err.errno if isinstance(err, OSError) else None
    if code in _PATH_ERRNOS:
        fix = "check the path"
    elif code in _ACCESS_ERRNOS:
        fix = "check its permissions"
    else:
        fix = "use an MP4, MKV, WebM or AVI file"
    return MediaError(f"cannot read video {_shown(path)} ({_one_line(err)}); {fix}")


def _check_frame_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise MediaError(
            f"{_shown(path)} declares {width}×{height} frames, more than the {MAX_FRAME_PIXELS:,} pixels a frame may have; "
            "the file is damaged, or re-encode it at a smaller size"
        )


def _check_fps(path: Path, fps: float) -> float:
    """A usable frame rate, 0.0 for none; a header claiming more than MAX_FPS is refused."""
    if not math.isfinite(fps) or fps <= 0:
        return 0.0
    if fps > MAX_FPS:
        raise MediaError(
            f"{_shown(path)} declares {fps:g} frames per second, more than {MAX_FPS:g}; the file is damaged or not a real video"
        )
    return fps


def _check_count(path: Path, frames: int) -> int:
    if frames > MAX_FRAMES:
        raise MediaError(
            f"{_shown(path)} declares {frames:,} frames, more than {MAX_FRAMES:,}; the file is damaged or not a real video"
        )
    return max(frames, 0)


def _check_duration(path: Path, duration: float) -> float:
    if not math.isfinite(duration) or duration > MAX_DURATION_S:
        raise MediaError(f"{_shown(path)} declares a duration of {duration:g} s; the file is damaged or not a real video")
    return max(duration, 0.0)


def _frame_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _tag(metadata, name: str) -> str | None:
    # Matroska tags keep the case they were written in (ROTATE); MP4's are lower case
    for key, value in dict(metadata).items():
        if key.lower() == name:
            return str(value)
    return None


def _first_display_matrix(container, stream) -> tuple[int, ...] | None:
    """The display matrix FFmpeg attaches to the first decoded frame (from the container or the stream).

    A first frame that does not decode leaves the orientation to the `rotate` tag; the decoding
    proper then reports the damage.
    """
    import av

    try:
        for frame in container.decode(stream):
            data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
            if data is None or len(bytes(data)) < 36:
                return None
            return tuple(int(v) for v in np.frombuffer(bytes(data)[:36], dtype="<i4"))
    except Exception:  # noqa: BLE001 - av raises FFmpegError subclasses for damaged data
        return None
    return None


ATTACHED_PIC = 0x0400  # FFmpeg's AV_DISPOSITION_ATTACHED_PIC


def open_container(path: Path):
    """PyAV's container of `path`, for reading. A tag that is not UTF-8 (a title in Latin-1, say)
    reads with U+FFFD: PyAV's strict default refused the whole video for it."""
    import av

    return av.open(str(path), metadata_errors="replace")


def video_stream(container):
    """The first video stream that is not a cover picture (an MP3's or M4A's artwork is a video
    stream of one frame), or None."""
    for stream in container.streams.video:
        if not int(getattr(stream, "disposition", 0) or 0) & ATTACHED_PIC:
            return stream
    return None


# ISO BMFF (MP4, MOV, 3GP) boxes that hold others on the way to a track's sample tables
_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}
MP4_MOOV_LIMIT = 512 << 20  # read of the sample tables at most (a 24-hour recording's are far smaller)
MP4_TOP_BOXES = 16384


def _box_header(raw: bytes | memoryview, left: int) -> tuple[bytes, int, int] | None:
    """(type, header size, box size) from a box's first 8–16 bytes, `left` bytes from its start to
    the end of what holds it (a size of 0 means all of them); None for a damaged header."""
    if len(raw) < 8:
        return None
    size, kind, head = int.from_bytes(raw[:4], "big"), bytes(raw[4:8]), 8
    if size == 1:  # a 64-bit size follows
        if len(raw) < 16:
            return None
        size, head = int.from_bytes(raw[8:16], "big"), 16
    elif size == 0:
        size = left
    return (kind, head, size) if size >= head else None


def _mp4_boxes(data: memoryview, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes between start and end; stops at a damaged one."""
    at = start
    while (box := _box_header(data[at : min(at + 16, end)], end - at)) is not None:
        kind, head, size = box
        if at + size > end:
            return
        yield kind, at + head, at + size
        at += size


def _mp4_sample_bomb(path: Path) -> tuple[int, int, int] | None:
    """(samples, bytes each, file size) for a track whose sample table declares more samples than
    the file can hold, or None. FFmpeg builds an index entry (~35 bytes) per declared sample when it
    opens the file, before any count can be checked: one stsz entry (a fixed size and a count) or a
    fragment's trun without per-sample sizes declares any number in a few bytes (a 764-byte MOV of
    20 million frames took 700 MB; FFmpeg allows ~178 million, 6 GB)."""
    fragments = 0  # samples declared by all trun boxes
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(8)[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"styp"):
                return None  # not ISO BMFF
            at = 0
            for _ in range(MP4_TOP_BOXES):  # real files have a handful (or a moof and mdat per fragment)
                if at + 8 > file_size:
                    break
                f.seek(at)
                box = _box_header(f.read(16), file_size - at)
                if box is None:
                    break
                kind, head_size, size = box
                if kind in (b"moov", b"moof"):
                    f.seek(at + head_size)
                    payload = memoryview(f.read(min(size - head_size, MP4_MOOV_LIMIT)))  # what a box declares is not what it holds
                    fixed, declared = _declared_samples(payload, file_size)
                    if fixed is not None:
                        return (*fixed, file_size)
                    fragments += declared
                at += size
    except OSError:
        return None  # PyAV then says what is wrong with the file
    return (fragments, 1, file_size) if fragments > file_size else None


def _declared_samples(box: memoryview, file_size: int) -> tuple[tuple[int, int] | None, int]:
    """In a moov or moof box: (count, size) of a fixed-size stsz the file cannot hold, or None; and
    the samples its trun boxes declare (each at least a byte of the file)."""
    stack, declared = [(0, len(box))], 0
    while stack:
        start, end = stack.pop()
        for kind, begin, finish in _mp4_boxes(box, start, end):
            if kind in _MP4_CONTAINERS:
                stack.append((begin, finish))
            elif kind == b"stsz" and finish - begin >= 12:
                each = int.from_bytes(box[begin + 4 : begin + 8], "big")
                count = int.from_bytes(box[begin + 8 : begin + 12], "big")
                if each and count * each > file_size:
                    return (count, each), declared
            elif kind == b"trun" and finish - begin >= 8:
                declared += int.from_bytes(box[begin + 4 : begin + 8], "big")
    return None, declared


def _read_header(path: Path, orientation: bool) -> _Header:
    """Read and check the container header with PyAV; with `orientation`, also decode one frame."""
    import av

    bomb = _mp4_sample_bomb(path)
    if bomb is not None:
        count, each, size = bomb
        of = f" of {each:,} bytes" if each > 1 else ""
        raise MediaError(f"{_shown(path)} declares {count:,} frames (or samples){of}, more than its {size:,} bytes hold; "
                         "the file is damaged or not a real video")  # fmt: skip
    try:
        container = open_container(path)
    except Exception as e:  # noqa: BLE001 - av raises FFmpegError subclasses, OSError, …
        raise _cannot_read(path, e) from None
    try:
        stream = video_stream(container)
        if stream is None:
            covers = " (only a cover picture)" if container.streams.video else ""
            raise MediaError(f"{_shown(path)} has no video stream{covers}; pass a video file")
        if not stream.frames and _is_still_picture(container.format.name):
            what = _what_else(path)
            if what is not None:
                raise MediaError(f"{_shown(path)} is {what}, not a video or an image; pass a video file (MP4, MKV, WebM or AVI)")
            raise MediaError(f"{_shown(path)} is a still picture, not a video; attach (or send) it as an image instead")
        if stream.codec_context is None:  # PyAV has no decoder for the stream's codec (an unknown one)
            raise MediaError(f"{_shown(path)} stores its video in a codec FFmpeg cannot decode; re-encode it as an H.264 MP4")
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        _check_frame_size(path, width, height)
        fps = _check_fps(path, _frame_rate(stream))
        frames = _check_count(path, int(stream.frames or 0))
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        duration = _check_duration(path, duration)
        rotate_tag = _tag(stream.metadata, "rotate")
        codec, reorders = str(stream.codec_context.name or ""), bool(stream.codec_context.has_b_frames)
        alone = len(container.streams.video) == 1  # else decord may choose another stream (it picks the "best")
        matrix = _first_display_matrix(container, stream) if orientation else None
        return _Header(width, height, fps, frames, duration, container.format.name, matrix, rotate_tag, codec, reorders, alone)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _cannot_read(path, e) from None
    finally:
        container.close()


# ---------------------------------------------------------------- backends


class _Stopped(Exception):
    """The caller was interrupted: stop decoding at the next frame."""


class _Stop:
    """What the decoding worker checks before each frame: set by the thread waiting for it
    (Ctrl-C), or the caller's cancel event (a `serve` client gone), seen at once by the worker."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self._own, self._cancel = threading.Event(), cancel

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._cancel is not None and self._cancel.is_set())


class _FrameSource(Protocol):
    num_total_frames: int
    fps: float
    orientation: Orientation  # what is still to be applied to the frames it yields
    from_start: bool  # decodes every frame up to the last one wanted

    def plan(self, wanted: list[int]) -> int:
        """The frames the decoder will produce to reach the wanted ones (ascending, distinct)."""
        ...

    def frames(self, wanted: list[int], stop: _Stop, meter: _Meter) -> Iterator[tuple[int, np.ndarray]]:
        """(number, RGB uint8 [H, W, 3]) for each wanted number (ascending, distinct), each frame
        decoded charged to `meter`. A stream shorter than its header said ends with its last frame,
        under its own number."""
        ...

    def close(self) -> None: ...


class _DecordFailed(MediaError):
    """decord could not open or decode this file: PyAV may still manage."""


class DecodeOverBudget(MediaError):
    """Decoding the frames sampled takes more pixels than the caller allows (load_video's
    max_decode_pixels): `cost` is the plan refused, None when the decoding itself passed the limit."""

    def __init__(self, message: str, cost: DecodeCost | None = None) -> None:
        super().__init__(message)
        self.cost = cost


@dataclass(frozen=True)
class DecodeCost:
    """The decoding a sampling takes: `frames` frames of width × height, the sampled ones and those
    the decoder passes through to reach them (frames after a key frame need the ones before them)."""

    frames: int
    width: int
    height: int
    backend: str
    from_start: bool = False  # decoded from the start up to the last frame sampled: fewer frames save little

    @property
    def pixels(self) -> int:
        return self.frames * frame_work(self.width, self.height)

    def __str__(self) -> str:
        """How the pixels come about, for messages: "1,874 frames of 4096×4096 (31,440.5 megapixels)"."""
        side = MIN_FRAME_SIDE
        floor = "" if self.width * self.height >= side**2 else f", each frame counted as {side}×{side}"
        return f"{self.frames:,} frames of {self.width}×{self.height} ({megapixels(self.pixels)} megapixels{floor})"


def frame_work(width: int, height: int) -> int:
    return max(width * height, MIN_FRAME_SIDE**2)


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:,.6g}"


class _Meter:
    """Counts the frames and pixels a decoder produces against the limit: a plan is checked
    before decoding (`check_plan`); a stream whose frames are larger than its header says passes
    the limit while it decodes (`charge`), and its decoding ends."""

    def __init__(self, path: Path, limit: int | None) -> None:
        self.path, self.limit = path, limit
        self.frames = self.pixels = 0

    def check_plan(self, cost: DecodeCost) -> None:
        """Refuse a plan that would take the decoding past the limit (with what an attempt that
        failed has spent already), before any of it is decoded."""
        if self.limit is None or self.pixels + cost.pixels <= self.limit:
            return
        after = f" ({megapixels(self.pixels)} of them spent already by an attempt that failed)" if self.pixels else ""
        raise DecodeOverBudget(
            f"video {_shown(self.path)} needs {cost} decoded to reach the frames sampled, over the limit of "
            f"{megapixels(self.limit)} megapixels{after}; cut the clip shorter or scale it down",
            cost,
        )

    def charge(self, frames: int, width: int, height: int) -> None:
        self.frames += frames
        self.pixels += frames * frame_work(width, height)
        if self.limit is not None and self.pixels > self.limit:
            raise DecodeOverBudget(
                f"decoding video {_shown(self.path)} passed the limit of {megapixels(self.limit)} megapixels after "
                f"{self.frames:,} frames (its frames are larger than its header says); cut the clip shorter or scale it down"
            )


def decord_work(wanted: list[int], keys: list[int], total: int) -> list[int]:
    """Frames decord 0.6 decodes for each wanted frame (ascending, distinct): its seek_accurate goes
    to the key frame at or before the frame and decodes from there, unless the frame is ahead in
    the group of frames it is already in; then it decodes on from where it is."""

    def key_of(number: int) -> int:  # decord's LocateKeyframe
        if not keys or number <= keys[0]:
            return 0
        if number >= total:
            return keys[-1]
        return keys[bisect.bisect_right(keys, number) - 1]

    work, current = [], 0  # `current`: the frame decord's next() would decode
    for number in wanted:
        seeks = number < current or key_of(number) != key_of(current)
        work.append(number - (key_of(number) if seeks else current) + 1)
        current = number + 1
    return work


def decord_rotation(header: _Header) -> Orientation:
    """The turn decord 0.6 (FFmpeg 4.1 inside) applies by itself, so the rest can be applied after it.

    decord reads the stream's `rotate` tag, which FFmpeg 4.1 derives from an MP4/MOV display matrix
    as "%g" of its clockwise angle (mirrors lost); it turns by that many degrees clockwise when the
    whole-degree part is 90, 180 or 270. It does not see display matrices in other containers.
    """
    tag = header.rotate_tag
    if (tag is None or tag == "0") and header.display_matrix is not None and "mov" in header.format_name.split(","):
        m = [v / 65536.0 for v in header.display_matrix]
        scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
        if scale0 and scale1:
            degrees = math.degrees(math.atan2(m[1] / scale1, m[0] / scale0))
            tag = f"{degrees + 360 if degrees < 0 else degrees:g}"
    if not tag or tag == "0":
        return None
    number = re.match(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", tag)  # C's atof reads a prefix
    if number is None:
        return None
    degrees = float(number.group(0))
    if not math.isfinite(degrees):  # "1e400": atof gives inf, and decord turns nothing
        return None
    degrees = math.fmod(degrees, 360.0)
    degrees = int(degrees + 360 if degrees < 0 else degrees)
    return {90: _CLOCKWISE[1], 180: _CLOCKWISE[2], 270: _CLOCKWISE[3]}.get(degrees)


# Containers that store each frame's presentation time and an index to seek by
_EXACT_CONTAINERS = ("mov", "mp4", "matroska", "webm")
# Codecs whose B-frames decord still places right after a seek (closed or H.264-style open GOPs)
_REORDERING_CODECS_OK = ("h264", "vp8", "vp9", "av1", "libdav1d", "libaom-av1")


def decord_is_exact(header: _Header) -> bool:
    """Whether decord 0.6 returns the frame asked for, as checked against PyAV on clips whose
    frames show their number: it seeks to the key frame before it and counts from there, which
    goes wrong (silently: other frames, repeated or out of order) in AVI, MPEG-TS/PS and other
    containers without per-frame times, and for MPEG-1/2/4 Part 2 and HEVC streams with B-frames
    (their open GOPs hold frames that cannot be decoded after a seek). With several video streams
    it reads the one FFmpeg rates best, not necessarily the one the header was read from."""
    if not header.alone or not any(name in _EXACT_CONTAINERS for name in header.format_name.split(",")):
        return False
    return not header.reorders or header.codec in _REORDERING_CODECS_OK


class _DecordSource:
    def __init__(self, path: Path, decord, header: _Header) -> None:
        self._path = path
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            self.num_total_frames = _check_count(path, len(self._reader))
            self.fps = _check_fps(path, float(self._reader.get_avg_fps()))
            self._keys = sorted(int(k) for k in self._reader.get_key_indices())  # from the packets, as it seeks by them
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - decord raises DECORDError / RuntimeError for bad files
            raise _DecordFailed(str(_cannot_read(path, e))) from None
        self._size = (header.width, header.height)  # decord's decoding is not seen frame by frame: the header's size
        self.from_start = False  # from the key frame before each wanted one
        applied = decord_rotation(header)
        self.orientation = compose(inverse(applied), header.orientation)
        # a frame of these (rows, columns) would mean decord turned it otherwise than predicted
        self._mis_turned = None
        if header.width and header.height and header.width != header.height:
            self._mis_turned = (header.height, header.width) if swaps_sides(applied) else (header.width, header.height)

    def plan(self, wanted: list[int]) -> int:
        return sum(decord_work(wanted, self._keys, self.num_total_frames))

    def frames(self, wanted: list[int], stop: _Stop, meter: _Meter) -> Iterator[tuple[int, np.ndarray]]:
        for number, work in zip(wanted, decord_work(wanted, self._keys, self.num_total_frames)):
            if stop.is_set():
                raise _Stopped
            meter.charge(work, *self._size)  # as planned
            try:
                # one frame per call (as get_batch does inside), so Ctrl-C and memory wait for one frame
                self._reader.seek_accurate(number)
                frame = self._reader.next()
            except Exception as e:  # noqa: BLE001
                raise _DecordFailed(f"cannot decode frames of {_shown(self._path)} ({_one_line(e)}); "
                                   "the file may be damaged") from None  # fmt: skip
            # another library may have switched decord's output bridge to torch
            array = frame.asnumpy() if hasattr(frame, "asnumpy") else np.asarray(frame)
            del frame
            yield number, self._rgb(array)
            del array

    def _rgb(self, array: np.ndarray) -> np.ndarray:
        if array.ndim != 3 or array.shape[2] < 3:
            raise _DecordFailed(f"decord decoded {_shown(self._path)} to frames of shape {array.shape}, not RGB")
        height, width, channels = array.shape
        if channels != 3:
            # decord gives a frame linesize/width "channels": rows padded to 4·width bytes (frames
            # narrower than 64 pixels) come out as 4; the first 3·width bytes of each row are the pixels
            array = np.ascontiguousarray(array).reshape(height, -1)[:, : 3 * width].reshape(height, width, 3)
        if (height, width) == self._mis_turned:
            raise _DecordFailed(f"decord turned the frames of {_shown(self._path)} otherwise than its header says")
        return array

    def close(self) -> None:
        self._reader = None


class _NotOnePerPacket(Exception):
    """A packet of an intra-only stream decoded to no picture or several (MJPEG fields in packets of
    their own, damage): packet n is not frame n there, so the stream is decoded from the start."""


class _PyAVSource:
    def __init__(self, path: Path, header: _Header, stop: _Stop, packets_alone: bool = True) -> None:
        self._path = path
        self.orientation = header.orientation
        try:
            self._container = open_container(path)
        except Exception as e:  # noqa: BLE001 - av raises FFmpegError subclasses, OSError, …
            raise _cannot_read(path, e) from None
        try:
            stream = video_stream(self._container)
            if stream is None:
                raise MediaError(f"{_shown(path)} has no video stream; pass a video file")
            self._stream = stream
            # Intra-only codecs (MJPEG, DV, ProRes, raw…) keep nothing from one frame to the next and do
            # not reorder: packet n is frame n, decoded alone exactly as in a decode from the start
            intra = bool(getattr(stream.codec_context.codec, "intra_only", False)) and not header.reorders
            self._intra = intra and packets_alone
            # frame threading: faster, output order unchanged; it holds frames back, so not for one packet at a time
            stream.thread_type = "SLICE" if self._intra else "AUTO"
            self.from_start = not self._intra
            frame_bytes = max(header.width * header.height * 3 // 2, 1)  # 4:2:0
            stream.codec_context.thread_count = max(1, min(os.cpu_count() or 1, 16, FRAME_THREADS_BYTES // frame_bytes))
            self.fps = header.fps
            self.num_total_frames = header.frames or _count_packets(path, stop)
        except BaseException:
            self._container.close()
            raise

    def plan(self, wanted: list[int]) -> int:
        # intra-only: the wanted frames alone; else decoded from the start up to the last one
        return len(wanted) if self._intra else wanted[-1] + 1

    def _intra_frames(self, wanted: list[int]) -> Iterator[tuple[int, object]]:
        """(number, frame) for the wanted packets of an intra-only stream, each decoded alone; at
        the end of a stream shorter than its header said, its last packet's frame if not wanted."""
        wanted_set, number, skipped = set(wanted), -1, None
        for packet in self._container.demux(self._stream):
            if not packet.size:  # the end-of-stream packet (_count_packets counts no empty one either)
                continue
            number += 1
            if number in wanted_set:
                skipped = None
                yield number, self._alone(packet)
            else:
                skipped = packet
        if skipped is not None:
            yield number, self._alone(skipped)

    def _alone(self, packet):
        frames = self._stream.codec_context.decode(packet)
        if len(frames) != 1:
            raise _NotOnePerPacket
        return frames[0]

    def frames(self, wanted: list[int], stop: _Stop, meter: _Meter) -> Iterator[tuple[int, np.ndarray]]:
        pending = iter(wanted)
        target = next(pending)
        any_yielded = False
        last = None  # (number, frame): the latest decoded frame when it was not a wanted one
        decoded = self._intra_frames(wanted) if self._intra else enumerate(self._container.decode(self._stream))
        try:
            for number, frame in decoded:
                if stop.is_set():
                    raise _Stopped
                _check_frame_size(self._path, frame.width, frame.height)
                meter.charge(1, frame.width, frame.height)
                if number == target:
                    last = None
                    yield number, frame.to_ndarray(format="rgb24")
                    any_yielded = True
                    target = next(pending, None)
                    if target is None:
                        return
                else:
                    last = (number, frame)
                del frame
        except (_Stopped, MediaError, _NotOnePerPacket):
            raise
        except Exception as e:  # noqa: BLE001 - damage after some frames ends the stream there
            if not any_yielded and last is None:
                raise MediaError(f"cannot decode frames of {_shown(self._path)} ({_one_line(e)}); "
                                "the file may be damaged") from None  # fmt: skip
        # A header may promise more frames than the stream holds: the last decoded one stands in.
        if last is not None:
            number, frame = last
            del last
            yield number, frame.to_ndarray(format="rgb24")
        elif not any_yielded:
            raise MediaError(f"{_shown(self._path)} decoded to no frames; the file may be damaged")

    def close(self) -> None:
        self._container.close()


def _count_packets(path: Path, stop: _Stop | None = None) -> int:
    """The frames of a stream whose header stores no count (MKV, WebM, MPEG-PS, APNG): demuxing
    (no decoding) counts one packet per frame."""
    try:
        with open_container(path) as container:
            count = 0
            for packet in container.demux(video_stream(container)):
                if stop is not None and stop.is_set():
                    raise _Stopped
                count += 1 if packet.size else 0
    except _Stopped:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot read video {_shown(path)} ({_one_line(e)}); the file may be damaged") from None
    return _check_count(path, count)


def _import_decord():
    try:
        decord = importlib.import_module("decord")
    except Exception:  # noqa: BLE001 - ImportError, or OSError when its shared libraries are missing
        return None
    try:
        # decord's FFmpeg logs each damaged macroblock to stderr; its errors reach us as exceptions
        decord.logging.set_level(decord.logging.QUIET)
    except Exception:  # noqa: BLE001 - an older or newer decord without the switch: keep its noise
        pass
    return decord


def _forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}={value!r} is not a video backend; set it to 'decord' or 'pyav', or unset it")
    return value


# ---------------------------------------------------------------- decoding

T = TypeVar("T")


def frame_to_tile(rgb: np.ndarray, orientation: Orientation, image_size: int) -> torch.Tensor:
    """One decoded frame → its normalised tile [1, 3, S, S]: turned as a player shows it, then the
    image tile transform (bicubic to S×S). Only this tile outlives the call."""
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if orientation is not None:
        image = image.transpose(orientation)  # exact: a permutation of the pixels
    return normalize_tiles([image], image_size)


@dataclass
class _Decoded:
    tiles: torch.Tensor
    indices: list[int]
    fps: float
    num_total_frames: int
    backend: str
    meter: _Meter


def _open(path: Path, backend: str, header: _Header, decord, stop: _Stop, packets_alone: bool = True) -> _FrameSource:
    if backend == "decord":
        source: _FrameSource = _DecordSource(path, decord, header)
    else:
        source = _PyAVSource(path, header, stop, packets_alone)
    if source.num_total_frames < 1:
        source.close()
        raise MediaError(f"{_shown(path)} has no video frames; use a file that contains video")
    return source


def _cost(backend: str, header: _Header, source: _FrameSource, indices: list[int]) -> DecodeCost:
    return DecodeCost(source.plan(sorted(set(indices))), header.width, header.height, backend, source.from_start)


def _decode(
    path: Path, backend: str, header: _Header, decord, num_frames: int, start, end, image_size: int,
    stop: _Stop, meter: _Meter,
) -> _Decoded:  # fmt: skip
    """`meter` may hold what an attempt that failed decoded (decord's, or PyAV's packet by packet
    on an intra-only stream whose packets are not one frame each): it counts too."""
    args = (path, backend, header, decord, num_frames, start, end, image_size, stop, meter)
    try:
        return _decode_once(*args, packets_alone=True)
    except _NotOnePerPacket:
        return _decode_once(*args, packets_alone=False)


def _decode_once(
    path: Path, backend: str, header: _Header, decord, num_frames: int, start, end, image_size: int,
    stop: _Stop, meter: _Meter, packets_alone: bool,
) -> _Decoded:  # fmt: skip
    source = _open(path, backend, header, decord, stop, packets_alone)
    try:
        indices = frame_indices(source.num_total_frames, source.fps, num_frames, start, end)
        meter.check_plan(_cost(backend, header, source, indices))
        tiles: dict[int, torch.Tensor] = {}
        with contextlib.closing(source.frames(sorted(set(indices)), stop, meter)) as frames:
            for number, rgb in frames:
                tiles[number] = frame_to_tile(rgb, source.orientation, image_size)
                del rgb  # before the next frame is decoded
    finally:
        source.close()
    if not tiles:
        raise MediaError(f"{_shown(path)} decoded to no frames; the file may be damaged")
    last = max(tiles)
    numbers = [i if i in tiles else last for i in indices]
    return _Decoded(torch.cat([tiles[i] for i in numbers]), numbers, source.fps, source.num_total_frames, backend, meter)


def _by_backend(decord, forced: str | None, header: _Header, attempt: Callable[[str], T]) -> T:
    """`attempt(backend)` with decord where it gives exact frames (or is forced), else, or where
    decord cannot open or decode the file, with PyAV."""
    if decord is not None and (forced == "decord" or decord_is_exact(header)):
        try:
            # decord writes its own "ERROR opening: PATH, …" (the path unescaped) and other notes to
            # fd 2, which its FFmpeg log level does not cover; its exceptions hold the reasons
            with captured():
                return attempt("decord")
        except _DecordFailed as e:
            if forced == "decord":
                raise MediaError(str(e)) from None
            # decord lacks some codecs FFmpeg via PyAV has: try that before giving up
    return attempt("pyav")


def _decoders():
    """(the forced backend or None, the decord module or None)."""
    forced = _forced_backend()
    decord = None
    if forced != "pyav":
        decord = _import_decord()
        if decord is None and forced == "decord":
            raise MediaError(f"{BACKEND_ENV}=decord but decord cannot be imported; install decord or unset {BACKEND_ENV}")
    return forced, decord


def _interruptible(work: Callable[[_Stop], T], cancel: threading.Event | None = None) -> T:
    """Run `work(stop)` on a worker thread and wait for it in a way Ctrl-C (or `cancel`) interrupts.

    FFmpeg and decord spend long stretches in C, where Python cannot raise KeyboardInterrupt. The
    waiting thread can: it sets `stop` (the worker quits before its next frame) and re-raises
    at once, leaving the worker to finish the frame it is on by itself. `cancel` set (a `serve`
    client gone, the server stopping) ends the wait the same way, with Cancelled.
    """
    stop = _Stop(cancel)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work(stop)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = e

    worker = start_worker(run, "video-decode")
    cancelled = Cancelled("cancelled while the video was decoded")
    try:
        while worker.is_alive():
            worker.join(0.2)  # short waits: a signal that comes anyway is seen soon
            if stop.is_set():
                raise cancelled
    except BaseException:
        stop.set()
        raise
    if stop.is_set():  # the worker stopped for `cancel` before the first wait
        raise cancelled
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


# ---------------------------------------------------------------- public API


def _is_still_picture(format_name: str) -> bool:
    # FFmpeg reads PNG, JPEG, WebP, BMP, TIFF, … files through its image demuxers ("png_pipe",
    # "image2"), as a video of one frame whose header counts none
    return any(name == "image2" or name == "ico" or name.endswith("_pipe") for name in format_name.split(","))


def _what_else(path: Path) -> str | None:
    """What a file FFmpeg's image demuxers took (by its name: a text file called some.png) really
    is when no image reader knows it either ("text", "a PDF document"); None for a picture, damaged
    or not, which the image loader then explains."""
    try:
        probe_image(path)
        return None
    except MediaError:
        pass
    try:
        what = sniff_file(path)
    except OSError:
        return None
    return None if what in IMAGE_KINDS else what or "text"


def probe_video(path: str | Path) -> tuple[int, float, float]:
    """(num_total_frames, fps, duration in seconds) from the container header, without decoding.

    Where the container stores no frame count (MKV, WebM) it is estimated as duration·fps.
    """
    path = check_media_file(path, "video")
    return _probed(path, _read_header(path, orientation=False))


def _probed(path: Path, header: _Header) -> tuple[int, float, float]:
    """probe_video's answer and checks from a header already read."""
    duration = header.duration
    frames = header.frames or _check_count(path, int(round(duration * header.fps)))
    if frames < 1:
        # no usable duration either (APNG), or one FFmpeg guessed from the bit rate (MPEG-PS): count
        frames = _count_packets(path)
        duration = 0.0
    if frames < 1:
        raise MediaError(f"{_shown(path)} has no video frames; use a file that contains video")
    if duration <= 0 and header.fps > 0:
        duration = frames / header.fps
    return frames, header.fps, duration


def decode_cost(path: str | Path, num_frames: int = 8, start: float | None = None, end: float | None = None) -> DecodeCost:
    """What load_video with these arguments will decode, from the header and the key frames (no
    frame is decoded): the check `serve` makes before it queues a request."""
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    path = check_media_file(path, "video")
    return _planned(path, None, num_frames, start, end)


def plan_video(path: str | Path, num_frames: int, check_frame: Callable[[int, int], None]) -> DecodeCost:
    """probe_video's checks, then `check_frame(width, height)` (the caller's own limit, before the
    key frames are read), then decode_cost of the whole clip: one read of the header for all three
    (`serve` measures each new video with it)."""
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    path = check_media_file(path, "video")
    header = _read_header(path, orientation=False)
    _probed(path, header)
    check_frame(header.width, header.height)
    return _planned(path, header, num_frames, None, None)


def _planned(path: Path, header: _Header | None, num_frames: int, start: float | None, end: float | None) -> DecodeCost:
    """decode_cost's work, from `header` when it has been read (else read here, interruptibly)."""
    forced, decord = _decoders()

    def work(stop: _Stop) -> DecodeCost:
        read = header if header is not None else _read_header(path, orientation=False)

        def attempt(backend: str) -> DecodeCost:
            source = _open(path, backend, read, decord, stop)
            try:
                indices = frame_indices(source.num_total_frames, source.fps, num_frames, start, end)
                return _cost(backend, read, source, indices)
            finally:
                source.close()

        return _by_backend(decord, forced, read, attempt)

    return _interruptible(work)


def load_video(
    path: str | Path,
    num_frames: int = 8,
    start: float | None = None,
    end: float | None = None,
    image_size: int = IMAGE_SIZE,
    max_decode_pixels: int | None = None,
    cancel: threading.Event | None = None,
) -> VideoInput:
    """Sample `num_frames` frames from the video (or its [start, end] seconds) as normalised tiles.

    With `max_decode_pixels`, a sampling whose decoding (see DecodeCost) takes more pixels is
    refused before decoding, and a decode that passes it is stopped (DecodeOverBudget). `cancel`
    set stops the decoding at its next frame and raises Cancelled at once."""
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    path = check_media_file(path, "video")
    forced, decord = _decoders()

    def work(stop: _Stop) -> _Decoded:
        header = _read_header(path, orientation=True)
        meter = _Meter(path, max_decode_pixels)  # one for both attempts
        return _by_backend(decord, forced, header, lambda backend: _decode(
            path, backend, header, decord, num_frames, start, end, image_size, stop, meter))  # fmt: skip

    decoded = _interruptible(work, cancel)
    fps = decoded.fps
    return VideoInput(
        pixel_values=decoded.tiles,
        indices=[int(i) for i in decoded.indices],
        timestamps=[i / fps if fps > 0 else 0.0 for i in decoded.indices],
        fps=fps,
        num_total_frames=decoded.num_total_frames,
        backend=decoded.backend,
        path=path,
        decoded_frames=decoded.meter.frames,
        decoded_pixels=decoded.meter.pixels,
    )
