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
formula) rather than failing: the model still gets N frames. An MP4 or MOV cut short whose index
comes before its frames still lists them all; the index also says where each lies, so the frames
past the end of the file are known before any decoding (video_header.frames_lost): such a file is
measured (`measure_video`) and sampled from the frames it holds. A stream that ends before its
header's count otherwise (no index to tell, a header that counts more) is sampled again from the
frames it really holds once decoding finds its end. Either way `VideoInput.shortfall_note` says so;
a stream whose decoding fails before a sampled frame is refused (the file is damaged there). MKV,
WebM and AVI counts are not to be trusted (MKV stores none, an AVI's counts dropped frames): there
the note tells where the frames really end against where the header says (`VideoHeader.listed_end`;
only for a file whose outermost structure runs past its end, as no whole one's does), from what the
decoder knows cheaply: decord read every packet as it opened the file, PyAV demuxed
an MKV's to count its frames, and demuxes (not decodes) what follows an AVI's last sampled frame,
where the sampling runs to the end. An AVI found to hold fewer frames is sampled again from them.
The attach line (`measure_video`) reads no packet of an MKV or WebM: it says such a file is cut short
where a few of its elements' headers tell that the end of the file falls inside its frames
(`ends_early`), and gives the length the blocks it holds whole reach (their headers' times:
`VideoHeader.held_end`); the note gives how many frames it holds. An AVI cut short lost its index with its
end, and with it any true count or duration: its packets are demuxed (not decoded) to measure it.

Frames come out as a player shows them: a rotation or mirror stored with the video (a display
matrix, as phones write, or an older `rotate` tag) is applied before the tile transform. Each frame
is reduced to its tile as soon as it is decoded, so memory holds one full-size frame at a time
whatever the resolution and N. Decoding runs on a worker thread that stops at the next frame when
the caller is interrupted, so Ctrl-C is answered at once even while FFmpeg is busy in C code.

Decoding work is counted in pixels of the frames the decoder produces (each at least 128×128),
the sampled ones and those it passes through to reach them: `decode_cost` plans it from the
header and the key frames before any decoding (decord's, whose output shows the header's size
whatever the stream decodes at, at the largest size an H.264 or HEVC stream's parameter sets
declare, in its samples too: video_sps); `load_video(max_decode_pixels=…)` refuses a plan over the
limit and stops a decode that goes past it, as a header may lie. `serve` sets a limit;
in the terminal app Ctrl-C is one.

This module is the public API (and the choice of decoder); the parts have modules of their own:
video_sampling (which frames), video_orientation (turns and mirrors), video_header (the header, read
and checked), video_sources (decord and PyAV), video_cost (decoding work and its limit), video_sps
(the size an H.264 or HEVC stream's parameter sets declare, in-band ones included: decord's decoding
is counted at it), video_worker (the Ctrl-C-safe worker).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from ..errors import MediaError, UsageError
from ..native_stderr import captured
from .image import IMAGE_SIZE, check_media_file, normalize_tiles
from .video_cost import DecodeCost, DecodeMeter
from .video_header import Held, VideoHeader, check_count, check_duration, count_packets, demux_length, read_header, shown_path
from .video_orientation import Orientation
from .video_sampling import frame_indices, range_rate
from .video_sources import (
    DecordFailed,
    DecordSource,
    FrameSource,
    NotOnePerPacket,
    PyAVSource,
    StreamEnded,
    decord_is_exact,
)
from .video_worker import DecodeStop, interruptible

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
    decoded_frames: int = 0  # frames the decoder produced to reach the sampled ones
    decoded_pixels: int = 0  # their width × height (at least MIN_FRAME_SIDE²), summed
    listed_frames: int | None = None  # the header's count, where the stream held fewer (num_total_frames)
    # MKV, WebM, AVI (whose counts are not to be trusted): (where its frames end, where the header
    # says they end), in seconds, where they end more than two frames early (VideoHeader.ends_short:
    # any frame, where the file's elements say it ends inside its frames)
    ends_at: tuple[float, float] | None = None

    @property
    def num_frames(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def shortfall_note(self) -> str | None:
        """One line for the user where the file held fewer frames than its header lists, else None."""
        if self.ends_at is not None:
            (end, listed_end), held = self.ends_at, self.num_total_frames
            return (f"{shown_path(self.path)} ends at {end:.1f} s of the {listed_end:.1f} s its header lists ({held:,} frames): "
                    f"the file may be cut short (an unfinished download or copy); its frames were sampled from those {held:,}")
        if self.listed_frames is None:
            return None
        held, listed = self.num_total_frames, self.listed_frames
        seconds = f" ({held / self.fps:.1f} s of {listed / self.fps:.1f} s)" if self.fps > 0 else ""
        return (f"{shown_path(self.path)} holds only {held:,} of the {listed:,} frames its header lists{seconds}: "
                f"the file may be cut short (an unfinished download or copy); its frames were sampled from those {held:,}")


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
    meter: DecodeMeter
    listed_frames: int | None = None  # the header's count, where the stream held fewer
    ends_at: tuple[float, float] | None = None  # (seconds held, listed) where the frames end before the header's end


def _open(path: Path, backend: str, header: VideoHeader, decord, stop: DecodeStop, packets_alone: bool = True,
          decord_size: tuple[int, int] | None = None) -> FrameSource:  # fmt: skip
    if backend == "decord":
        source: FrameSource = DecordSource(path, decord, header, stop, decord_size)
    else:
        source = PyAVSource(path, header, stop, packets_alone)
    if source.num_total_frames < 1:
        source.close()
        raise MediaError(f"{shown_path(path)} has no video frames; use a file that contains video")
    return source


def _cost(backend: str, source: FrameSource, indices: list[int]) -> DecodeCost:
    return DecodeCost(source.plan(sorted(set(indices))), *source.size, backend, source.from_start)


def _decode(
    path: Path, backend: str, header: VideoHeader, decord, num_frames: int, start, end, image_size: int,
    stop: DecodeStop, meter: DecodeMeter, decord_size: tuple[int, int] | None = None,
) -> _Decoded:  # fmt: skip
    """`meter` may hold what an attempt that failed decoded (decord's, or PyAV's packet by packet
    on an intra-only stream whose packets are not one frame each): it counts too, as does a first
    pass that found the stream shorter than its header lists."""
    args = (path, backend, header, decord, num_frames, start, end, image_size, stop, meter)
    try:
        return _decode_once(*args, packets_alone=True, decord_size=decord_size)
    except NotOnePerPacket:
        return _decode_once(*args, packets_alone=False, decord_size=decord_size)


def _decode_once(
    path: Path, backend: str, header: VideoHeader, decord, num_frames: int, start, end, image_size: int,
    stop: DecodeStop, meter: DecodeMeter, packets_alone: bool, decord_size: tuple[int, int] | None = None,
) -> _Decoded:  # fmt: skip
    source = _open(path, backend, header, decord, stop, packets_alone, decord_size)
    total = source.num_total_frames
    length = _range_length(header, total, source.fps)
    rate = range_rate(total, source.fps, length)
    held: Held | None = None  # what the stream really holds, where that was found out
    try:
        indices = frame_indices(total, rate, num_frames, start, end, length)
        meter.check_plan(_cost(backend, source, indices))
        tiles: dict[int, torch.Tensor] = {}
        try:
            _decode_tiles(source, indices, tiles, stop, meter, image_size)
            if header.listed_end is not None and (end is None or end >= header.listed_end):
                held = source.held(stop)  # the sampling runs to the end: where its frames really end
                if held is not None and held.frames < total:
                    raise StreamEnded(held.frames)  # an AVI cut short after the last frame sampled
        except StreamEnded as ended:
            if held is None and ended.reason is None and header.listed_end is not None:
                held = source.held(stop)  # the stream's end was reached: nothing more to read
            # fewer frames than the header lists: sample the frames the file really holds
            total = _frames_held(path, ended, total, source.fps)
            if held is not None and 0 < held.frames < total:  # a last packet cut short can decode (concealed) to
                total = held.frames  # a frame the file does not hold: the packets held whole, as the attach line counts
            length = _range_length(header, total, source.fps)  # an AVI's count includes dropped frames
            if held is not None and _avi_cut_inside_frames(header) and held.end > header.start:
                # as the attach line measures it (_avi_cut_short): where its frames end, not the frames
                # at its stated rate (a remuxed AVI states 1000 fps: 30 frames held over 3.0 s were 0.03 s)
                length = held.end - header.start
            rate = range_rate(total, source.fps, length)
            indices = frame_indices(total, rate, num_frames, start, end, length)
            tiles = {number: tile for number, tile in tiles.items() if number in indices}
            source.close()  # the same bytes again: decord's are counted at the size found (video_sps not walked again)
            source = _open(path, backend, header, decord, stop, packets_alone, source.size)
            missing = sorted(set(indices) - set(tiles))
            if missing:
                meter.check_plan(_cost(backend, source, missing))
                try:
                    _decode_tiles(source, missing, tiles, stop, meter, image_size)
                except StreamEnded:
                    raise MediaError(f"{shown_path(path)} changed while it was read; attach it again") from None
    finally:
        source.close()
    ends_at = None
    if held is not None and header.ends_short(held):  # told from its first frame, as the attach line measures it
        ends_at = (held.end - header.start, header.listed_end - header.start)
    return _Decoded(torch.cat([tiles[i] for i in indices]), indices, rate, total, backend, meter,
                    header.listed_if_short(total), ends_at)  # fmt: skip


def _range_length(header: VideoHeader, total: int, fps: float) -> float:
    """The length a time range is measured against: the one the attach line gives (_probed), the
    header's duration, where the decoder holds the frames the header lists (an MKV lists none; an
    AVI's count includes the frames its capture dropped). Measured from the frames counted at the
    stated rate instead, a variable rate's differed, and a range accepted at attach was refused as
    the message was sent. A file cut short (or a duration under half a frame, which _probed
    replaces by a count), or an MKV whose video's own duration is not known (the file's may be a
    longer audio track's): the frames held at the stated rate, as the note after the answer says."""
    cut = header.lost or header.runs_past_end or header.listed_if_short(total) is not None
    stated = header.frames_shown or round(header.duration * header.fps) >= 1
    matroska = any(name in header.format_name.split(",") for name in ("matroska", "webm"))
    videos_own = not matroska or header.track_duration > 0
    if header.duration > 0 and stated and videos_own and not cut:
        return header.duration
    return total / fps if fps > 0 else 0.0


def _decode_tiles(
    source: FrameSource, indices: list[int], tiles: dict[int, torch.Tensor], stop: DecodeStop, meter: DecodeMeter,
    image_size: int,
) -> None:  # fmt: skip
    """Decode the frames `indices` names into `tiles` (number → tile), one full-size frame at a time."""
    with contextlib.closing(source.frames(sorted(set(indices)), stop, meter)) as frames:
        for number, rgb in frames:
            tiles[number] = frame_to_tile(rgb, source.orientation, image_size)
            del rgb  # before the next frame is decoded


def _frames_held(path: Path, ended: StreamEnded, listed: int, fps: float) -> int:
    """The frames a stream that ended early holds, to sample from: refused where decoding failed
    (the file is damaged there; what follows may be anything) or where nothing decoded."""
    if ended.reason is not None:
        if not ended.frames:
            raise MediaError(f"cannot decode frames of {shown_path(path)} ({ended.reason}); the file may be damaged")
        at = f", at {ended.frames / fps:.2f} s" if fps > 0 else ""
        raise MediaError(f"cannot decode {shown_path(path)} past frame {ended.frames:,} of {listed:,}{at} ({ended.reason}); "
                         "the file is damaged there: cut the clip before that point (a time range does), or use an undamaged copy")  # fmt: skip
    if not ended.frames:
        raise MediaError(f"{shown_path(path)} decoded to no frames; the file may be damaged")
    return ended.frames


def _by_backend(decord, forced: str | None, header: VideoHeader, attempt: Callable[[str], T]) -> T:
    """`attempt(backend)` with decord where it gives exact frames (or is forced), else, or where
    decord cannot open or decode the file, with PyAV."""
    if decord is not None and (forced == "decord" or decord_is_exact(header)):
        try:
            # decord writes its own "ERROR opening: PATH, …" (the path unescaped) and other notes to
            # fd 2, which its FFmpeg log level does not cover; its exceptions hold the reasons
            with captured():
                return attempt("decord")
        except DecordFailed as e:
            if forced == "decord":
                raise MediaError(forced_decord_failed(e)) from None
            # decord lacks some codecs FFmpeg via PyAV has: try that before giving up
    return attempt("pyav")


def forced_decord_failed(error: DecordFailed) -> str:
    """The line for a file decord fails on where it was forced: what failed and the way out (PyAV
    reads more files), decord's own words only as a detail at the end."""
    doing = error.doing or "read the video"
    detail = f" (decord: {error.detail})" if error.detail else ""
    return f"decord cannot {doing}: unset {BACKEND_ENV} (it forces decord) or set it to pyav{detail}"


def _decoders():
    """(the forced backend or None, the decord module or None)."""
    forced = _forced_backend()
    decord = None
    if forced != "pyav":
        decord = _import_decord()
        if decord is None and forced == "decord":
            raise MediaError(f"{BACKEND_ENV}=decord but decord cannot be imported; install decord or unset {BACKEND_ENV}")
    return forced, decord


# ---------------------------------------------------------------- public API

@dataclass(frozen=True)
class VideoLength:
    """What a video holds, from its header (and an MP4's index), without decoding."""

    frames: int  # the frames it holds (those its header lists, unless the file is cut short)
    fps: float
    duration: float  # seconds, of those frames
    listed_frames: int | None = None  # the header's count, where the file holds more than one fewer (cut short)
    # MKV, WebM, AVI: the file ends inside its frames (VideoHeader.frames_cut); an MKV's or WebM's
    # `duration` is where the blocks it holds whole end, `frames` that at its rate (how many it holds
    # is found as they are decoded: VideoInput.shortfall_note); an AVI's are demuxed (_avi_cut_short):
    # `frames` and `duration` are those it holds
    ends_early: bool = False


def probe_video(path: str | Path) -> tuple[int, float, float]:
    """(num_total_frames, fps, duration in seconds) from the container header, without decoding.

    Where the container stores no frame count (MKV, WebM) it is estimated as duration·fps. An MP4
    (or MOV) cut short counts the frames it holds (see `measure_video`).
    """
    length = measure_video(path)
    return length.frames, length.fps, length.duration


def measure_video(path: str | Path, cancel: threading.Event | None = None) -> VideoLength:
    """probe_video's numbers, and the count the header lists where an MP4 (or MOV) is cut short: its
    index places the samples of more than its last frame past the end of the file (see
    video_header.frames_lost; no frame is read). An MKV, WebM or AVI cut short inside its frames is
    flagged (`ends_early`, from its elements' headers: video_header.frames_cut_off). A count by
    demuxing (APNG, MPEG-PS) stops at Ctrl-C or `cancel` set (Cancelled), as decoding does."""
    path = check_media_file(path, "video")
    return interruptible(lambda stop: _probed(path, read_header(path, orientation=False), stop), cancel)


def _probed(path: Path, header: VideoHeader, stop: DecodeStop | None = None) -> VideoLength:
    """measure_video's answer and probe_video's checks from a header already read; a count by
    demuxing checks `stop` before each packet."""
    if header.lost:  # an MP4 or MOV cut short: the frames (and the time) it holds
        held = header.frames_held
        duration = held / header.fps if header.fps > 0 else header.duration * held / header.frames_shown
        return VideoLength(held, header.fps, duration, header.listed_if_short(held))
    duration = header.duration
    if header.runs_past_end and "avi" in header.format_name.split(","):  # cut short: its duration is a guess from its size
        if _avi_cut_inside_frames(header):
            return _avi_cut_short(path, header, stop)
        if header.frames and header.fps > 0:  # cut after its frames (in its idx1): it holds those its header counts
            duration = check_duration(path, header.frames / header.fps)
    held = _matroska_length_held(header)
    if held is not None:  # the header's length is the whole file's: the one its frames held reach
        duration = held
    frames = header.frames_shown or check_count(path, int(round(duration * header.fps)))  # not those an edit list hides
    if frames < 1:
        # no usable duration either (APNG), or one FFmpeg guessed from the bit rate (MPEG-PS): count
        frames = count_packets(path, stop)
        duration = 0.0
    if frames < 1:
        raise MediaError(f"{shown_path(path)} has no video frames; use a file that contains video")
    if duration <= 0 and header.fps > 0:  # the header has none (a pipe AVI, APNG) or guessed it (MPEG-PS)
        duration = check_duration(path, frames / header.fps)
    return VideoLength(frames, header.fps, duration, ends_early=bool(header.frames_cut))


def _matroska_length_held(header: VideoHeader) -> float | None:
    """An MKV or WebM cut short inside its frames (`frames_cut`): its length to where the blocks it
    holds whole end (`held_end`, from a few elements' headers, no packet read), from its first
    frame; None elsewhere, or where that is not shorter than the header's (or holds no time at all:
    decoding tells). The attach line gave the header's length, the note after the answer the one held."""
    if not header.frames_cut or header.held_end is None or not math.isfinite(header.held_end):
        return None
    length = header.held_end - header.start
    return length if 0 < length < header.duration else None


def _avi_cut_short(path: Path, header: VideoHeader, stop: DecodeStop | None) -> VideoLength:
    """An AVI whose movi list runs past the end of the file inside its frames (`frames_cut`): its
    index (idx1, at the end) went with the cut, its count is the whole file's and FFmpeg's duration
    a guess from its size, so the attach line gave a length the file does not hold. Its packets are
    demuxed (no decoding): the frames it holds and where they end; one that holds none is refused."""
    held = demux_length(path, stop)
    if not held.frames:
        listed = f" of the {header.frames:,} frames its header lists" if header.frames else " of its frames"
        raise MediaError(f"{shown_path(path)} holds none{listed}: the file is cut short (an unfinished download or copy); "
                         "use a complete copy")  # fmt: skip
    duration = held.end - header.start if held.end > header.start else held.frames / header.fps if header.fps > 0 else 0.0
    return VideoLength(held.frames, header.fps, check_duration(path, duration), ends_early=bool(header.frames_cut))


def _avi_cut_inside_frames(header: VideoHeader) -> bool:
    """Whether the file is an AVI cut short, maybe inside its frames (`_avi_cut_short` measures it;
    decoding takes a time range against that length)."""
    return bool(header.runs_past_end) and "avi" in header.format_name.split(",") and header.frames_cut is not False


def decode_cost(path: str | Path, num_frames: int = 8, start: float | None = None, end: float | None = None) -> DecodeCost:
    """What load_video with these arguments will decode, from the header and the key frames (no
    frame is decoded): the check `serve` makes before it queues a request."""
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    path = check_media_file(path, "video")
    decoders = _decoders()
    return interruptible(lambda stop: _planned(path, read_header(path, orientation=False), num_frames, start, end, stop,
                                               decoders))  # fmt: skip


def plan_video(path: str | Path, num_frames: int, check_frame: Callable[[int, int], None],
               cancel: threading.Event | None = None) -> DecodeCost:  # fmt: skip
    """probe_video's checks, then `check_frame(width, height)` (the caller's own limit, before the
    key frames are read), then decode_cost of the whole clip: one read of the header for all three
    (`serve` measures each new video with it). `cancel` set (the client gone) stops it at the next
    packet a count by demuxing reads, or frame it decodes (Cancelled)."""
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    path = check_media_file(path, "video")
    decoders = _decoders()

    def work(stop: DecodeStop) -> DecodeCost:
        header = read_header(path, orientation=False)
        _probed(path, header, stop)
        check_frame(header.width, header.height)
        return _planned(path, header, num_frames, None, None, stop, decoders)

    return interruptible(work, cancel)


def _planned(path: Path, header: VideoHeader, num_frames: int, start: float | None, end: float | None, stop: DecodeStop,
             decoders: tuple) -> DecodeCost:  # fmt: skip
    """decode_cost's work, on the decoding worker (`stop`), with `decoders` (_decoders())."""
    forced, decord = decoders

    def attempt(backend: str) -> DecodeCost:
        source = _open(path, backend, header, decord, stop)
        try:
            total = source.num_total_frames
            length = _range_length(header, total, source.fps)
            indices = frame_indices(total, range_rate(total, source.fps, length), num_frames, start, end, length)
            return _cost(backend, source, indices)
        finally:
            source.close()

    return _by_backend(decord, forced, header, attempt)


def load_video(
    path: str | Path,
    num_frames: int = 8,
    start: float | None = None,
    end: float | None = None,
    image_size: int = IMAGE_SIZE,
    max_decode_pixels: int | None = None,
    cancel: threading.Event | None = None,
    planned: DecodeCost | None = None,
) -> VideoInput:
    """Sample `num_frames` frames from the video (or its [start, end] seconds) as normalised tiles.

    With `max_decode_pixels`, a sampling whose decoding (see DecodeCost) takes more pixels is
    refused before decoding, and a decode that passes it is stopped (DecodeOverBudget). `cancel`
    set stops the decoding at its next frame and raises Cancelled at once. `planned`: plan_video's
    cost of these same bytes (`serve` plans each video as its request is read): where decord
    planned it, its frames are counted at the size that plan found, the stream's parameter sets
    not walked again (video_sps)."""
    if num_frames < 1:
        raise MediaError(f"num_frames is {num_frames}; sample at least 1 frame (8 is the default)")
    path = check_media_file(path, "video")
    forced, decord = _decoders()
    decord_size = (planned.width, planned.height) if planned is not None and planned.backend == "decord" else None

    def work(stop: DecodeStop) -> _Decoded:
        header = read_header(path, orientation=True)
        meter = DecodeMeter(path, max_decode_pixels)  # one for both attempts
        return _by_backend(decord, forced, header, lambda backend: _decode(
            path, backend, header, decord, num_frames, start, end, image_size, stop, meter, decord_size))  # fmt: skip

    decoded = interruptible(work, cancel)
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
        listed_frames=decoded.listed_frames,
        ends_at=decoded.ends_at,
    )
