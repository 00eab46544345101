"""Videos → N sampled frames, each one normalised 448×448 tile (SPEC §4).

Frames are sampled with the published formula (`frame_indices`): the clip, or the part between
`start` and `end` seconds, is cut into N equal segments and one frame is taken near the middle of
each. Decoding uses decord when it imports and PyAV otherwise; both give the frame with the same
number (the n-th frame in presentation order), so the choice changes speed, not content.
`INTERNVL_CHAT_VIDEO_BACKEND=pyav|decord` forces one.

When N is larger than the number of frames in the range, frames repeat (as in the published
formula) rather than failing: the model still gets N frames.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import MediaError, UsageError
from .image import IMAGE_SIZE, check_media_file, normalize_tiles

BACKEND_ENV = "INTERNVL_CHAT_VIDEO_BACKEND"
BACKENDS = ("decord", "pyav")


@dataclass
class VideoInput:
    pixel_values: torch.Tensor  # float32 [N, 3, S, S], one tile per sampled frame
    indices: list[int]  # frame numbers, 0-based, in presentation order
    timestamps: list[float]  # seconds: index / fps
    fps: float
    num_total_frames: int
    backend: str  # "decord" or "pyav"
    path: Path

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


# ---------------------------------------------------------------- backends


class _FrameSource(Protocol):
    num_total_frames: int
    fps: float

    def read(self, indices: list[int]) -> tuple[list[np.ndarray], list[int]]:
        """RGB uint8 [H, W, 3] frames for the indices, and the frame numbers actually returned."""
        ...

    def close(self) -> None: ...


def _one_line(err: BaseException) -> str:
    # decord prefixes its messages with a time and a C++ source location: keep only the reason
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(err))
    text = " ".join(text.split())
    return text or type(err).__name__


class _DecordSource:
    def __init__(self, path: Path, decord) -> None:
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            self.num_total_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except Exception as e:  # noqa: BLE001 - decord raises DECORDError / RuntimeError for bad files
            raise MediaError(f"cannot read video {path} ({_one_line(e)}); use an MP4, MKV, WebM or AVI file") from None
        self._path = path

    def read(self, indices: list[int]) -> tuple[list[np.ndarray], list[int]]:
        try:
            batch = self._reader.get_batch(indices)
        except Exception as e:  # noqa: BLE001
            raise MediaError(f"cannot decode frames of {self._path} ({_one_line(e)}); the file may be damaged") from None
        # another library may have switched decord's output bridge to torch
        array = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        return list(array), list(indices)

    def close(self) -> None:
        self._reader = None


class _PyAVSource:
    def __init__(self, path: Path) -> None:
        import av

        self._av = av
        self._path = path
        try:
            self._container = av.open(str(path))
        except Exception as e:  # noqa: BLE001 - av raises FFmpegError subclasses, OSError, …
            raise MediaError(f"cannot read video {path} ({_one_line(e)}); use an MP4, MKV, WebM or AVI file") from None
        try:
            if not self._container.streams.video:
                raise MediaError(f"{path} has no video stream; pass a video file")
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threading: faster, output order unchanged
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self.fps = float(rate) if rate else 0.0
            self.num_total_frames = int(stream.frames or 0) or self._count_packets()
        except BaseException:
            self._container.close()
            raise

    def _count_packets(self) -> int:
        # Containers such as MKV and WebM do not store a frame count; demuxing (no decoding)
        # counts one packet per frame.
        try:
            with self._av.open(str(self._path)) as container:
                stream = container.streams.video[0]
                return sum(1 for packet in container.demux(stream) if packet.size)
        except Exception as e:  # noqa: BLE001
            raise MediaError(f"cannot read video {self._path} ({_one_line(e)}); the file may be damaged") from None

    def read(self, indices: list[int]) -> tuple[list[np.ndarray], list[int]]:
        wanted = set(indices)
        stop = max(indices)
        found: dict[int, np.ndarray] = {}
        last = None  # (number, frame) of the latest decoded frame
        try:
            for number, frame in enumerate(self._container.decode(video=0)):
                last = (number, frame)
                if number in wanted:
                    found[number] = frame.to_ndarray(format="rgb24")
                if number >= stop:
                    break
        except Exception as e:  # noqa: BLE001
            if last is None:
                raise MediaError(f"cannot decode frames of {self._path} ({_one_line(e)}); the file may be damaged") from None
        if last is None:
            raise MediaError(f"{self._path} decoded to no frames; the file may be damaged")
        # A header may promise more frames than the stream holds: stand in the last decoded one.
        last_number, last_frame = last
        if last_number not in found:
            found[last_number] = last_frame.to_ndarray(format="rgb24")
        frames = [found.get(i, found[last_number]) for i in indices]
        numbers = [i if i in found else last_number for i in indices]
        return frames, numbers

    def close(self) -> None:
        self._container.close()


def _import_decord():
    try:
        return importlib.import_module("decord")
    except Exception:  # noqa: BLE001 - ImportError, or OSError when its shared libraries are missing
        return None


def _forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise UsageError(f"{BACKEND_ENV}={value!r} is not a video backend; set it to 'decord' or 'pyav', or unset it")
    return value


def _open_source(path: Path) -> tuple[_FrameSource, str]:
    forced = _forced_backend()
    if forced != "pyav":
        decord = _import_decord()
        if decord is None and forced == "decord":
            raise MediaError(f"{BACKEND_ENV}=decord but decord cannot be imported; install decord or unset {BACKEND_ENV}")
        if decord is not None:
            try:
                return _DecordSource(path, decord), "decord"
            except MediaError:
                if forced == "decord":
                    raise
                # decord lacks some codecs FFmpeg via PyAV has: try that before giving up
    return _PyAVSource(path), "pyav"


# ---------------------------------------------------------------- public API


def probe_video(path: str | Path) -> tuple[int, float, float]:
    """(num_total_frames, fps, duration in seconds) from the container header, without decoding.

    Where the container stores no frame count (MKV, WebM) it is estimated as duration·fps.
    """
    import av

    path = check_media_file(path, "video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream; pass a video file")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            frames = int(stream.frames or 0) or int(round(duration * fps))
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot read video {path} ({_one_line(e)}); use an MP4, MKV, WebM or AVI file") from None
    if frames < 1:
        raise MediaError(f"{path} has no video frames; use a file that contains video")
    if duration <= 0 and fps > 0:
        duration = frames / fps
    return frames, fps, duration


def load_video(
    path: str | Path,
    num_frames: int = 8,
    start: float | None = None,
    end: float | None = None,
    image_size: int = IMAGE_SIZE,
) -> VideoInput:
    """Sample `num_frames` frames from the video (or its [start, end] seconds) as normalised tiles."""
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    path = check_media_file(path, "video")
    source, backend = _open_source(path)
    try:
        if source.num_total_frames < 1:
            raise MediaError(f"{path} has no video frames; use a file that contains video")
        indices = frame_indices(source.num_total_frames, source.fps, num_frames, start, end)
        frames, indices = source.read(indices)
    finally:
        source.close()
    tiles = [Image.fromarray(np.ascontiguousarray(frame), "RGB") for frame in frames]
    fps = source.fps
    return VideoInput(
        pixel_values=normalize_tiles(tiles, image_size),
        indices=[int(i) for i in indices],
        timestamps=[i / fps if fps > 0 else 0.0 for i in indices],
        fps=fps,
        num_total_frames=source.num_total_frames,
        backend=backend,
        path=path,
    )
