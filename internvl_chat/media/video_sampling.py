"""Which frames of a video are sampled (SPEC §4): the published formula (`frame_indices`), the rate
a time range's seconds become frame numbers at (`range_rate`), and the time range as it is used
(`used_range`)."""

from __future__ import annotations

import math

from ..errors import MediaError

MKV_TICK_S = 0.001  # Matroska's usual time unit: its durations are rounded to it


def frame_indices(
    num_total_frames: int, fps: float, num_frames: int, start: float | None = None, end: float | None = None,
    length: float | None = None,
) -> list[int]:
    """The frame numbers to sample (SPEC §4).

    Bounds in seconds become frame numbers by round(s·fps), clamped to [0, total−1]; the defaults
    are the first and last frame. seg = (last − first)/N and frame k is
    int(first + seg/2 + round(seg·k)), with Python's round (half to even). `length`: the video's
    length in seconds as the attach line measured it (a start at or past it is refused); by default
    the frames at `fps`.
    """
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    if num_total_frames < 1:
        raise MediaError("the video has no frames; use a file that contains video")
    last = num_total_frames - 1
    if start is not None or end is not None:
        if not fps > 0:
            raise MediaError("the video has no usable frame rate, so a time range cannot be applied; omit start/end")
        duration = length if length and length > 0 else num_total_frames / fps
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


def range_rate(num_total_frames: int, fps: float, length: float) -> float:
    """The rate a time range's seconds become frame numbers at: the stated `fps`, unless the frames
    at it end more than a frame away from the video's `length` (a variable rate under one stated
    rate: an MKV saying 25 fps over 20 frames in 1.36 s, an AVI remuxed from a 1 ms time base saying
    1000 fps); then the frames' average over the length, so a range inside the length samples
    frames inside it, not past the last (refused as past the end) or all at the last. A frame off
    is allowed a millisecond more (an MKV rounds its times to it; it also absorbs the float error
    of exactly one frame, 1.0000000000000009): a constant-rate file whose last frame lasts two
    keeps its stated rate, as the published formula takes it."""
    if not (fps > 0 and length > 0) or abs(num_total_frames / fps - length) <= 1 / fps + MKV_TICK_S:
        return fps
    return num_total_frames / length


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
