"""A video's container header, read with PyAV and checked before any decoding (the file is
untrusted): frame size, rate, count and duration limits; an MP4 sample table or fragments that
declare more frames than the file holds, refused before FFmpeg indexes them; cover pictures, still
pictures and files that are not videos at all; the frame count by demuxing where the header stores
none (or, an AVI written to a pipe, only FFmpeg's placeholders); an MP4 (or MOV) cut short: the
frames its index places past the end of the file, or its index lost with its end; an MKV, WebM or
AVI cut short inside its frames, from a few element headers.
Also the one-line messages for a file that cannot be read."""

from __future__ import annotations

import errno
import os
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MediaError
from ..files import IMAGE_KINDS, STILL_BMFF_KINDS, open_regular_file, sniff_file, visible
from .formats import SHARED_VIDEO_EXTENSIONS, is_transport_stream
from .image import is_animation, probe_image
from .video_orientation import Orientation, orientation_from_display_matrix, orientation_from_rotate_tag
from .video_worker import DecodeStop, DecodeStopped

# Limits on what a container header may claim (the file is untrusted). FFmpeg itself decodes frames
# up to about 16256×16256; anything beyond 2^28 pixels per frame is a damaged or hostile header.
MAX_FRAME_PIXELS = 1 << 28
MAX_FRAMES = 100_000_000  # 11 days at 100 fps
MAX_FPS = 10_000.0  # high-speed cameras reach about 1,000
MAX_DURATION_S = 1_000_000.0  # 11.6 days


@dataclass
class VideoHeader:
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
    hidden: int | None = None  # MP4/MOV: the frames its index flags an edit list hides (frames_hidden); None: not read
    lost: int = 0  # MP4/MOV: frames shown whose samples the index places past the end of the file (cut short)
    samples_whole: int | None = None  # and then: the samples, in decode order, before the first such one
    track_duration: float = 0.0  # MKV/WebM: the video track's own (track_duration()), 0.0 where not known
    start: float = 0.0  # MKV/WebM: when its first frame is shown (_start), left out of `duration`, not of the stream's times
    runs_past_end: bool | None = None  # MKV/WebM/AVI: whether its outermost element does (ends_past_the_file)
    unfilled: bool = False  # an AVI whose writer never filled in its header (avi_header_unfilled): no count, no sizes
    frames_cut: bool | None = None  # and then: whether the file ends inside its video frames (frames_cut_off)
    # MKV/WebM whose end runs past the file: where the blocks it holds whole end, seconds on the stream's
    # clock (_cluster_end_held; inf: frames whole), None where not told: the length measure_video gives
    held_end: float | None = None
    edits_ignored: bool = False  # MP4/MOV: read without its edit list, which shows none of its frames (edits_show_nothing)
    index_length: int | None = None  # MP4/MOV: the samples FFmpeg's index lists (an edit list may list some twice); None: not read

    @property
    def frames_by_duration(self) -> int:
        """The frames its duration holds at its rate (0 when either is unknown)."""
        return round(self.duration * self.fps) if self.duration > 0 and self.fps > 0 else 0

    @property
    def frames_shown(self) -> int:
        """The frames a player shows: the count, or fewer where the duration holds fewer (an MP4
        edit list hides the frames before a cut made without re-encoding, `ffmpeg -ss … -c copy`,
        and FFmpeg drops them as it decodes); 0 where the header stores no count. Only MP4 and MOV
        have edit lists; elsewhere the duration may be a guess (an AVI cut short, its index lost
        with its end: from its size), so the count stands. Where the index was read (`hidden`),
        it tells: a variable rate's average times the duration may hold fewer than all."""
        if not self.frames:
            return 0
        if "mov" not in self.format_name.split(","):
            return self.frames
        if self.hidden is not None:
            return max(self.frames - self.hidden, 0)
        return min(self.frames, self.frames_by_duration or self.frames)

    @property
    def frames_held(self) -> int:
        """The frames shown that the file holds: `frames_shown` less those lost with a cut-off end."""
        return max(self.frames_shown - self.lost, 0)

    def listed_if_short(self, held: int) -> int | None:
        """The frames the header says a player shows, where the file holds `held`, more than one
        fewer: it is cut short; else None. Only an MP4's (or MOV's) count tells (within one: it may
        come from the duration): MKV and WebM store none (it is estimated from the duration), an
        AVI's counts the frames its capture dropped."""
        if "mov" not in self.format_name.split(","):
            return None
        shown = self.frames_shown
        return shown if held + 1 < shown else None

    @property
    def listed_end(self) -> float | None:
        """Where the header says the stream ends (seconds), for a container whose frame count is not
        to be trusted, to tell it cut short by where its frames really end (`ends_short`): MKV and
        WebM keep the video track's duration at the start (`track_duration`), an AVI its count,
        the frames a capture dropped included (its duration, cut short, a guess from its size).
        None elsewhere: an MP4's (or MOV's) index tells (`lost`); MPEG-TS and others have a guess."""
        formats = self.format_name.split(",")
        if not self.fps > 0 or self.runs_past_end is False:  # whole: its last frame may last long (VFR)
            return None
        if "matroska" in formats or "webm" in formats:
            return self.track_duration or None
        if "avi" in formats:
            return self.frames / self.fps if self.frames else None
        return None

    def ends_short(self, held: Held) -> bool:
        """Whether the frames `held` stop short of `listed_end` by more than two frames (at the
        header's rate or the last step between them: a remuxed AVI's rate is its time base's) and
        a millisecond (MKV rounds its duration to it). The two frames allow for where a header's
        end is not quite where the frames end (a last frame's length not stored, ticks, rounding);
        where the file's own elements say it ends inside its frames (`frames_cut`: an AVI's movi
        list runs past its end, as the attach line says), half a frame is enough: a frame lost is
        a whole one, and the last one or two are told too."""
        listed = self.listed_end
        frames = 0.5 if self.frames_cut else 2
        return listed is not None and held.end + frames * max(1 / self.fps, held.step) + 0.001 < listed

    @property
    def orientation(self) -> Orientation:
        """How a player turns the stored frames: the display matrix, else the older `rotate` tag."""
        if self.display_matrix is not None:
            return orientation_from_display_matrix(self.display_matrix)
        if self.rotate_tag is not None:
            return orientation_from_rotate_tag(self.rotate_tag)
        return None


def shown_path(path: Path) -> str:
    """A path in a message: control and bidi characters escaped (a file name is anything but \\0 and /)."""
    return visible(str(path))


def error_reason(err: BaseException) -> str:
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


def from_ffmpeg(error: BaseException) -> bool:
    """Whether a MemoryError is FFmpeg's ENOMEM (av.error.MemoryError), not Python's own."""
    from av.error import FFmpegError

    return isinstance(error, MemoryError) and isinstance(error, FFmpegError)


def cannot_read(path: Path, err: BaseException) -> MediaError:
    """One line for a file PyAV cannot open (it may have changed since check_media_file looked)."""
    if from_ffmpeg(err):
        # FFmpeg answers some invalid headers with ENOMEM: a duplicated MP4 stts box (FFmpeg 7.1+ keeps
        # the freed table's size and its realloc returns nothing), a table larger than it accepts
        return MediaError(f"cannot read video {shown_path(path)}: its header is invalid (FFmpeg cannot parse it); "
                          "the file is damaged: use an undamaged copy")  # fmt: skip
    code = err.errno if isinstance(err, OSError) else None
    if code in _PATH_ERRNOS:
        fix = "check the path"
    elif code in _ACCESS_ERRNOS:
        fix = "check its permissions"
    elif path.suffix.lower() in SHARED_VIDEO_EXTENSIONS and not is_transport_stream(path):
        return MediaError(f"{shown_path(path)} is not a video: no MPEG transport stream (TypeScript source has its "
                          "extension too); pass a video file")  # fmt: skip
    else:
        fix = "use an MP4, MKV, WebM or AVI file"
    return MediaError(f"cannot read video {shown_path(path)} ({error_reason(err)}); {fix}")


def check_frame_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise MediaError(
            f"{shown_path(path)} declares {width}×{height} frames, more than the {MAX_FRAME_PIXELS:,} pixels a frame may have; "
            "the file is damaged, or re-encode it at a smaller size"
        )


def check_fps(path: Path, fps: float) -> float:
    """A usable frame rate, 0.0 for none; a header claiming more than MAX_FPS is refused."""
    if not math.isfinite(fps) or fps <= 0:
        return 0.0
    if fps > MAX_FPS:
        raise MediaError(
            f"{shown_path(path)} declares {fps:g} frames per second, more than {MAX_FPS:g}; the file is damaged or not a real video"
        )
    return fps


def check_count(path: Path, frames: int) -> int:
    if frames > MAX_FRAMES:
        raise MediaError(
            f"{shown_path(path)} declares {frames:,} frames, more than {MAX_FRAMES:,}; the file is damaged or not a real video"
        )
    return max(frames, 0)


def check_duration(path: Path, duration: float) -> float:
    """A header's duration, or one a count of frames gives at the header's rate (where the header
    stores none: a hostile file's tiny rate makes an enormous one), within MAX_DURATION_S."""
    if not math.isfinite(duration) or duration > MAX_DURATION_S:
        raise MediaError(f"{shown_path(path)} declares a duration of {duration:g} s; the file is damaged or not a real video")
    return max(duration, 0.0)


def track_duration(container, stream, duration: float, start: float = 0.0) -> float:
    """An MKV's (or WebM's) video track's own duration, in seconds: its DURATION tag (FFmpeg and
    mkvmerge write one per track, at the start), else the file's `duration` where no other track
    may run longer than the video (audio often ends after it); 0.0 where not known. Both are where
    its frames end, in the stream's times: held to MAX_DURATION_S from `start`, its first frame's."""
    tag = _tag(stream.metadata, "duration")
    found = re.fullmatch(r"\s*(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)\s*", tag or "")
    if found:
        hours, minutes, seconds = found.groups()
        value = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    else:
        value = duration if len(container.streams) == 1 else 0.0
    return value if 0 < value - start <= MAX_DURATION_S else 0.0


RIFF_CHUNKS = 4096  # an OpenDML AVI has one RIFF chunk per GB or so
# The size FFmpeg writes for a RIFF or LIST chunk as it starts it, filled in at its end only where
# the output can seek back (libavformat's ff_start_tag / ff_end_tag)
AVI_SIZE_UNKNOWN = 0xFFFFFFFF
# Those sizes, and the 0 other writers leave there: no RIFF chunk is empty (it holds its form type at least)
AVI_SIZES_UNFILLED = (0, AVI_SIZE_UNKNOWN)


def avi_header_unfilled(path: Path) -> bool:
    """Whether an AVI was written to a pipe or another output that cannot seek (`ffmpeg … -f avi
    pipe:1 > out.avi`): FFmpeg's muxer then cannot go back to fill in its header, and leaves
    placeholders: its RIFF and movi sizes unknown (0xFFFFFFFF), its stream's length 2^30 frames
    (1,073,741,824: AVI_MAX_RIFF_SIZE), its main header's count 0, no index. The file is complete
    and plays; nothing its header counts is true of it (the RIFF size tells: whatever wrote it did
    not come back; other writers leave it 0), so its frames are counted by demuxing, as an MKV's."""
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since PyAV read it must not block
            head = f.read(12)
    except OSError:  # NotRegularFile is one
        return False
    return head[:4] == b"RIFF" and head[8:12] == b"AVI " and int.from_bytes(head[4:8], "little") in AVI_SIZES_UNFILLED


def ends_past_the_file(path: Path, kind: str) -> bool | None:
    """Whether an MKV/WebM ("matroska") or AVI ("avi") file is cut short by its outermost structure:
    the size its Segment (or the last of its RIFF chunks) declares runs past the end of the file.
    A whole file's elements end within it, so its frames are never told against its header (a
    last frame may last long, and a VFR AVI's count includes its ticks). None where it cannot
    tell (a live MKV's Segment has an unknown size; a file that reads otherwise)."""
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since PyAV read it must not block
            window = _Window(f, os.fstat(f.fileno()).st_size)
            if kind == "matroska":
                return _matroska_past_end(window)
            riff = _riff_cut(window)
            return None if riff is None else riff[0]
    except OSError:  # NotRegularFile is one
        return None


def _riff_cut(window: _Window) -> tuple[bool, int] | None:
    """Over an AVI's RIFF chunks ('AVI ', then an OpenDML file's 'AVIX' ones, a GB or so each):
    (True, where the one that runs past the end of the file starts), or (False, where they end)
    where they all end within it (a few stray bytes after them at most); None where it cannot tell
    (not an AVI, a size never filled in, more chunks than RIFF_CHUNKS)."""
    at = 0
    for _ in range(RIFF_CHUNKS):
        if at + 12 > window.size:
            return False, at
        head = window.read(at, 12)
        if head[:4] != b"RIFF" or head[8:12] not in (b"AVI ", b"AVIX"):
            return None if at == 0 else (False, at)  # what follows the chunks is not one
        size = int.from_bytes(head[4:8], "little")
        if size in AVI_SIZES_UNFILLED:
            return None  # written to a pipe (avi_header_unfilled): its size was never filled in
        if at + 8 + size > window.size:
            return True, at
        at += 8 + size + (size & 1)
    return None


def _ebml_number(data: bytes, at: int, is_size: bool) -> tuple[int | None, int] | None:
    """An EBML variable-length number at `at`: (value, length); value None for a size of all ones
    (unknown); None where damaged."""
    if at >= len(data) or not data[at]:
        return None
    length = 9 - data[at].bit_length()
    if at + length > len(data):
        return None
    value = int.from_bytes(data[at : at + length], "big")
    if not is_size:
        return value, length
    value &= (1 << (7 * length)) - 1
    return (None if value == (1 << (7 * length)) - 1 else value), length


def _matroska_past_end(window: _Window) -> bool | None:
    segment = _segment(window)
    if segment is None or segment[1] is None:
        return None  # damaged, or a live stream's unknown size
    start, length = segment
    return start + length > window.size


# Bounds on the walk of a cut MKV's or AVI's elements (frames_cut_off): each step reads one header
MATROSKA_ELEMENTS = 1 << 17  # the Segment's (a cluster a second: 36 hours) and the cut Cluster's
AVI_CHUNKS = 256  # a RIFF chunk's own (hdrl, movi, idx1, JUNK, INFO: a handful)
STRL_CHUNKS = 16  # a stream's header list's (strh, strf, strd, strn, indx, vprp, JUNK)
INDEX_CHUNKS = 4 * RIFF_CHUNKS  # those the super indexes list, all streams together: a few per RIFF chunk
_EBML, _SEGMENT = 0x1A45DFA3, 0x18538067
_CLUSTER, _TIMECODE, _SIMPLE_BLOCK, _BLOCK_GROUP, _BLOCK = 0x1F43B675, 0xE7, 0xA3, 0xA0, 0xA1


def frames_cut_off(path: Path, header: VideoHeader, time_base: float) -> bool | None:
    """Whether an MKV/WebM or AVI file whose outermost structure runs past its end (the header's
    `runs_past_end`) ends inside its video frames, from its elements' headers, without a packet
    demuxed: its end may hold only an index (Cues, idx1) or tags, or an MKV's audio that runs on.
    An AVI: its movi list (the frames) runs past the end. An MKV: a Cluster (the frames) does, and
    no block it holds whole (any track's: muxers interleave them by time) reaches the video track's
    end (`ends_short`); `time_base` is its blocks' tick, seconds. None where it cannot tell (a cut
    between two elements, an unknown size, more than the bounds above): decoding tells then."""
    return _frames_cut_and_end(path, header, time_base)[0]


def _frames_cut_and_end(path: Path, header: VideoHeader, time_base: float) -> tuple[bool | None, float | None]:
    """frames_cut_off's answer, and for an MKV or WebM where the blocks it holds whole end (seconds,
    `_cluster_end_held`; None where not told): one walk for both."""
    formats = header.format_name.split(",")
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since PyAV read it must not block
            window = _Window(f, os.fstat(f.fileno()).st_size)
            if "avi" in formats:
                return _avi_movi_cut(window), None
            if header.listed_end is None or not {"matroska", "webm"} & set(formats):
                return None, None
            end = _cluster_end_held(window, time_base, 1 / header.fps)  # listed_end: fps > 0
            return (None, None) if end is None else (header.ends_short(Held(0, end, 0.0)), end)
    except OSError:  # NotRegularFile is one
        return None, None


class _Window:
    """Reads of a few bytes at any place in a file through a 4 KiB window: a walk over small
    elements reads each page once, one over large ones (an MKV's Clusters, a megabyte or so each)
    a page per element, not the file."""

    BLOCK = 1 << 12

    def __init__(self, f, size: int) -> None:
        self.f, self.size, self._at, self._data = f, size, 0, b""

    def read(self, at: int, length: int) -> bytes:
        if not (self._at <= at and at + length <= self._at + len(self._data)):
            self.f.seek(at)
            self._at, self._data = at, self.f.read(max(length, self.BLOCK))
        return self._data[at - self._at : at - self._at + length]


def _ebml_element(window: _Window, at: int) -> tuple[int, int, int | None] | None:
    """(id, where its payload starts, its size or None for unknown) of the EBML element at `at`;
    None where its header is damaged or cut off by the end of the file."""
    head = window.read(at, 12)
    element = _ebml_number(head, 0, is_size=False)
    if element is None:
        return None
    length = _ebml_number(head, element[1], is_size=True)
    if length is None:
        return None
    return element[0], at + element[1] + length[1], length[0]


def _segment(window: _Window) -> tuple[int, int | None] | None:
    """(where an MKV's Segment payload starts, its size: None when unknown) after the EBML header;
    None where they are damaged."""
    ebml = _ebml_element(window, 0)
    if ebml is None or ebml[0] != _EBML or ebml[2] is None:
        return None
    segment = _ebml_element(window, ebml[1] + ebml[2])
    if segment is None or segment[0] != _SEGMENT:
        return None
    return segment[1], segment[2]


def _cluster_end_held(window: _Window, time_base: float, frame: float) -> float | None:
    """Where the blocks an MKV holds whole end, in seconds: in the Cluster that runs past the end
    of the file, its latest block's time and a `frame` after, or its own time where it holds none
    whole (the earlier Clusters' blocks end there); inf where something else runs past it (the
    frames are whole); None where it cannot tell."""
    segment, clusters = _segment(window), 0
    if segment is None or segment[1] is None:
        return None
    at = segment[0]
    for _ in range(MATROSKA_ELEMENTS):
        if at >= window.size:
            return None  # cut between two elements: what is missing is not known
        element = _ebml_element(window, at)
        if element is None or element[2] is None:
            return None  # a header cut off, or a live stream's unknown size
        kind, start, size = element
        if start + size > window.size:
            if kind == _CLUSTER:
                return _blocks_end(window, start, time_base, frame)
            return math.inf if clusters else None  # an index or tags after the frames
        clusters += kind == _CLUSTER
        at = start + size
    return None


def _blocks_end(window: _Window, at: int, time_base: float, frame: float) -> float | None:
    """_cluster_end_held's end, from the Cluster at `at` that the end of the file cuts; None where
    it has no Timecode before its blocks."""
    cluster_time, latest = None, None
    for _ in range(MATROSKA_ELEMENTS):
        element = _ebml_element(window, at)
        if element is None or element[2] is None or element[1] + element[2] > window.size:
            break  # the cut: nothing after it is held whole
        kind, start, size = element
        at = start + size
        if kind == _TIMECODE and size <= 8:
            cluster_time = int.from_bytes(window.read(start, size), "big")
        elif kind in (_SIMPLE_BLOCK, _BLOCK_GROUP):
            if cluster_time is None:
                return None
            time = _block_time(window, start, size, kind == _BLOCK_GROUP)
            if time is not None:
                latest = max(latest if latest is not None else time, time)
    else:
        return None
    if cluster_time is None:
        return None
    if latest is None:
        return cluster_time * time_base
    return (cluster_time + latest) * time_base + frame


def _block_time(window: _Window, at: int, size: int, in_group: bool) -> int | None:
    """The time of the SimpleBlock (or the BlockGroup's Block, which comes first) of `size` bytes
    at `at`, relative to its Cluster's: after the track number, a signed 16-bit count of ticks.
    None where it does not hold one."""
    if in_group:
        inner = _ebml_element(window, at)
        if inner is None or inner[0] != _BLOCK or inner[2] is None or inner[1] + inner[2] > at + size:
            return None
        at, size = inner[1], inner[2]
    track = _ebml_number(window.read(at, min(size, 8)), 0, is_size=True)
    if track is None or track[1] + 2 > size:
        return None
    return int.from_bytes(window.read(at + track[1], 2), "big", signed=True)


def _avi_movi_cut(window: _Window) -> bool | None:
    """Whether an AVI's last RIFF chunk, running past the end of the file, is cut before the end
    of the frames in its movi list (hdrl before it, idx1 after; an OpenDML file's ix## chunks close
    it: _ends_in_closing_index); None where it cannot tell."""
    riff = _riff_cut(window)
    if riff is None or not riff[0]:
        return None
    end, at, movi_whole = window.size, riff[1] + 12, False
    for _ in range(AVI_CHUNKS):
        if at >= end:
            return False if movi_whole else None  # cut between two chunks
        head = window.read(at, 12)
        if len(head) < 12:
            return not movi_whole  # a chunk's header cut off
        size = int.from_bytes(head[4:8], "little")
        is_movi = head[:4] == b"LIST" and head[8:12] == b"movi"
        if at + 8 + size > end:
            if is_movi:
                return not _ends_in_closing_index(window, at + 12, at + 8 + size)
            return not movi_whole
        movi_whole = movi_whole or is_movi
        at += 8 + size + (size & 1)
    return None


def _ends_in_closing_index(window: _Window, start: int, end: int) -> bool:
    """Whether the end of the file falls in the standard index chunks (ix##) that close the movi
    list from `start` to `end`, with no frame after them, and none listed after that list (FFmpeg
    writes one per stream after each RIFF chunk's frames): every frame is held then. Told from the
    super index alone (indx, in each stream's header: each such chunk's place and size), without
    walking the frames; a chunk it does not list counts as frames."""
    listed = _index_chunks(window)
    if any(at >= end for at in listed):
        return False  # frames follow, in a later RIFF chunk
    at = max((at for at in listed if start <= at <= window.size), default=None)
    for _ in range(len(listed)):
        if at not in listed:
            return False  # frames after the index, or none listed where the file ends
        at += listed[at]
        if at == end:
            return True
    return False


def _index_chunks(window: _Window) -> dict[int, int]:
    """{where it starts: its size, header included} of each standard index chunk an OpenDML AVI's
    super indexes (indx: one in each stream's strl list, in hdrl) list; {} where there are none."""
    hdrl = next(((at, size) for kind, at, size in _avi_chunks(window, 12, window.size) if kind == b"hdrl"), None)
    if hdrl is None:
        return {}
    listed: dict[int, int] = {}
    for kind, at, size in _avi_chunks(window, hdrl[0] + 12, hdrl[0] + 8 + hdrl[1]):
        if kind != b"strl":
            continue
        for inner, index, length in _avi_chunks(window, at + 12, at + 8 + size, STRL_CHUNKS):
            if inner == b"indx" and len(listed) < INDEX_CHUNKS:  # past the bound: some not known, taken for frames
                listed.update(_super_index(window, index, length))
    return listed


def _avi_chunks(window: _Window, at: int, end: int, most: int = AVI_CHUNKS) -> Iterator[tuple[bytes, int, int]]:
    """(its name: a LIST's form type, where it starts, its size) of the chunks from `at` to `end`,
    `most` of them at most."""
    for _ in range(most):
        if at + 8 > end:
            return
        head = window.read(at, 12)
        size = int.from_bytes(head[4:8], "little")
        yield (head[8:12] if head[:4] in (b"LIST", b"RIFF") else head[:4]), at, size
        at += 8 + size + (size & 1)


def _super_index(window: _Window, at: int, size: int) -> dict[int, int]:
    """The index chunks an indx chunk of `size` bytes at `at` lists (AVISUPERINDEX: after its
    header, whose bIndexType 0 says it lists index chunks, and its count in use, 16 bytes each:
    qwOffset, dwSize, dwDuration); RIFF_CHUNKS at most."""
    head = window.read(at + 8, 24)
    if len(head) < 24 or head[3] != 0:
        return {}
    count = min(int.from_bytes(head[4:8], "little"), max(size - 24, 0) // 16, RIFF_CHUNKS)
    entries = window.read(at + 32, count * 16)
    return {int.from_bytes(entries[i : i + 8], "little"): int.from_bytes(entries[i + 8 : i + 12], "little")
            for i in range(0, len(entries) - 15, 16)}  # fmt: skip


def _frame_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _start(stream) -> float:
    """Where the stream's first frame is shown (seconds; 0.0 where unknown or before 0): a clip
    cut from a broadcast or remuxed with its times kept starts later, and frames are numbered
    (and a time range counted) from its first."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return max(float(stream.start_time * stream.time_base), 0.0)


def _reorder_delay(path: Path) -> float:
    """How much later than it is decoded the first video frame is shown (seconds: B-frames' delay;
    0.0 where unknown), from its first packet. FFmpeg's FLV writer counts that delay into the length
    it stores, but not a start after 0 (a clip cut from a stream, its times kept): taking the whole
    start off measured 20 frames starting at 1 s as 10."""
    try:
        with open_container(path) as container:
            stream = video_stream(container)
            if stream is None or stream.time_base is None:
                return 0.0
            for packet in container.demux(stream):
                if packet.pts is not None and packet.dts is not None:
                    return max(float((packet.pts - packet.dts) * stream.time_base), 0.0)
                if packet.size:  # a frame without both times: nothing to tell
                    return 0.0
    except Exception:  # noqa: BLE001 - read_header's own open reports a damaged file
        pass
    return 0.0


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
    reads with U+FFFD: PyAV's strict default refused the whole video for it. An MP4 (or MOV) whose
    edit list shows none of its video's samples (edits_show_nothing) is read without it."""
    import av

    container = av.open(str(path), metadata_errors="replace")
    try:
        stream = video_stream(container)
        if stream is None or not stream.frames or "mov" not in container.format.name.split(","):
            return container
        if not edits_show_nothing(stream):
            return container
    except BaseException:
        container.close()
        raise
    container.close()
    return av.open(str(path), metadata_errors="replace", options={"ignore_editlist": "1"})


def edits_show_nothing(stream) -> bool:
    """Whether FFmpeg's index of an MP4's (or MOV's) stream, which lists samples, flags every one
    to be discarded (or lists none): its edit list shows none of them. Its edits may all last 0
    (a muxer that never filled them in, or one following the rule for fragmented files: 0 is "to
    the end of the media"), start past the end of the media, or all be empty. The file read as 60
    frames at attach and "decoded to no frames" at send; a player that plays it shows all its
    samples, as FFmpeg does without the edit list (ignore_editlist). Read up to the first sample
    shown: where none is hidden, the first."""
    try:
        return not any(not entry.is_discard for entry in stream.index_entries)
    except Exception:  # noqa: BLE001 - an older PyAV without index_entries, an odd entry
        return False


def video_stream(container):
    """The first video stream that is not a cover picture (an MP3's or M4A's artwork is a video
    stream of one frame), or None."""
    for stream in container.streams.video:
        if not disposition_flags(stream) & ATTACHED_PIC:
            return stream
    return None


def disposition_flags(stream) -> int:
    """A stream's FFmpeg disposition bits: PyAV 13 gives an int, 18 an `enum.IntFlag`, and 15 an
    `enum.Flag`, which int() refuses (no video opened with PyAV 15)."""
    flags = getattr(stream, "disposition", 0) or 0
    return int(getattr(flags, "value", flags))


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


# The first box of an ISO BMFF file (MP4, MOV, 3GP) is one of these
_MP4_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"styp")


def _top_boxes(f, file_size: int) -> Iterator[tuple[bytes, int, int, int]]:
    """(type, start, header size, size) of an ISO BMFF file's top-level boxes, at most
    MP4_TOP_BOXES of them; none where the file is not one. Stops at a damaged header."""
    f.seek(0)
    if f.read(8)[4:8] not in _MP4_FIRST_BOXES:
        return
    at = 0
    for _ in range(MP4_TOP_BOXES):  # real files have a handful (or a moof and mdat per fragment)
        if at + 8 > file_size:
            return
        f.seek(at)
        box = _box_header(f.read(16), file_size - at)
        if box is None:
            return
        kind, head_size, size = box
        yield kind, at, head_size, size
        at += size


def _mp4_sample_bomb(path: Path) -> tuple[int, int, int] | None:
    """(samples, bytes each, file size) for a track whose sample table declares more samples than
    the file can hold, or None. FFmpeg builds an index entry (~35 bytes) per declared sample when it
    opens the file, before any count can be checked: one stsz entry (a fixed size and a count) or a
    fragment's trun without per-sample sizes declares any number in a few bytes (a 764-byte MOV of
    20 million frames took 700 MB; FFmpeg allows ~178 million, 6 GB)."""
    fragments = 0  # samples declared by all trun boxes
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since it was checked must not block
            file_size = os.fstat(f.fileno()).st_size
            for kind, at, head_size, size in _top_boxes(f, file_size):
                if kind in (b"moov", b"moof"):
                    f.seek(at + head_size)
                    payload = memoryview(f.read(min(size - head_size, MP4_MOOV_LIMIT)))  # what a box declares is not what it holds
                    fixed, declared = _declared_samples(payload, file_size)
                    if fixed is not None:
                        return (*fixed, file_size)
                    fragments += declared
    except OSError:
        return None  # PyAV then says what is wrong with the file
    return (fragments, 1, file_size) if fragments > file_size else None


def _lost_index(path: Path, after_frames: bool) -> MediaError | None:
    """The refusal for an ISO BMFF file cut short with its index (moov, or fragments with their
    own), and None for any other: one written with its index at the end and cut before it keeps its
    frames (mdat) and no index; one written with it first ("faststart") and cut inside it ends there,
    its moov running past the end of the file (or a box header cut short), and holds no frame. With
    `after_frames`, where FFmpeg could not use the index, also an index cut short after the frames
    (without it, FFmpeg may still read one whose tail alone is cut off)."""
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since it was checked must not block
            size = os.fstat(f.fileno()).st_size
            boxes = list(_top_boxes(f, size))
    except OSError:
        return None
    if not boxes:
        return None  # not ISO BMFF
    kinds = {kind for kind, *_ in boxes}
    cut = "the file is cut short (an unfinished download, copy or recording); use a complete copy"
    if b"mdat" in kinds and not kinds & {b"moov", b"moof"}:
        return MediaError(f"{shown_path(path)} has no index (an MP4 or MOV without its moov box): {cut}")
    kind, at, _, box_size = boxes[-1]
    left = size - (at + box_size)  # what follows the last box read: a header cut short is under 8 bytes
    inside = kind == b"moov" and left < 0 or 0 < left < 8  # it ends in its index, or in a box header
    if inside and (after_frames or b"mdat" not in kinds):
        return MediaError(f"{shown_path(path)} ends before its index (the moov box of an MP4 or MOV) is whole: {cut}")
    return None


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


def read_header(path: Path, orientation: bool) -> VideoHeader:
    """Read and check the container header with PyAV; with `orientation`, also decode one frame."""
    import av

    still = _still_bmff(path)
    if still is not None:  # its pictures are items, not a track: it read as an MP4 cut short before its index
        raise MediaError(f"{shown_path(path)} is {still}, not a video; attach (or send) it as an image instead")
    bomb = _mp4_sample_bomb(path)
    if bomb is not None:
        count, each, size = bomb
        of = f" of {each:,} bytes" if each > 1 else ""
        raise MediaError(f"{shown_path(path)} declares {count:,} frames (or samples){of}, more than its {size:,} bytes hold; "
                         "the file is damaged or not a real video")  # fmt: skip
    lost = _lost_index(path, after_frames=False)  # what FFmpeg would make of it is not what it is
    if lost is not None:
        raise lost
    try:
        container = open_container(path)
    except Exception as e:  # noqa: BLE001 - av raises FFmpegError subclasses, OSError, …
        raise _lost_index(path, after_frames=True) or cannot_read(path, e) from None
    try:
        stream = video_stream(container)
        if stream is None:
            covers = " (only a cover picture)" if container.streams.video else ""
            raise _lost_index(path, after_frames=True) or MediaError(
                f"{shown_path(path)} has no video stream{covers}; pass a video file")
        if not stream.frames and _is_still_picture(container.format.name):
            what = _what_else(path)
            if what is not None:
                raise MediaError(f"{shown_path(path)} is {what}, not a video or an image; pass a video file (MP4, MKV, WebM or AVI)")
            if is_animation(path):  # an animated WebP: FFmpeg reads its first picture only, and fails on the next
                raise MediaError(f"{shown_path(path)} is an animated image that FFmpeg cannot play as a video; attach (or send) it "
                                 "as an image (its first frame is used), or convert it to MP4 or GIF")  # fmt: skip
            raise MediaError(f"{shown_path(path)} is a still picture, not a video; attach (or send) it as an image instead")
        if stream.codec_context is None:  # PyAV has no decoder for the stream's codec (an unknown one, or a cut index)
            raise _lost_index(path, after_frames=True) or MediaError(
                f"{shown_path(path)} stores its video in a codec FFmpeg cannot decode; re-encode it as an H.264 MP4")
        formats = set(container.format.name.split(","))  # a demuxer's names: "mov,mp4,m4a,3gp,3g2,mj2"
        if "mov" in formats and _index_is_empty(stream):
            lost = _lost_index(path, after_frames=True)  # cut inside its sample tables: FFmpeg placed no frame
            if lost is not None:
                raise lost
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        check_frame_size(path, width, height)
        fps = check_fps(path, _frame_rate(stream))
        unfilled = "avi" in formats and avi_header_unfilled(path)
        frames = 0 if unfilled else check_count(path, int(stream.frames or 0))  # 0: counted by demuxing
        if not unfilled and "mov" in formats:  # 0: an empty moov (frag_keyframe+empty_moov)
            frames = _fragments_counted(path, stream, frames)
        if unfilled or "mpeg" in formats:
            # FFmpeg's guess from the placeholder count, or from the size and bit rate; an MPEG-PS
            # (.mpg, .mpeg, .vob) stores no length, and FFmpeg's from its last time stamps was a
            # frame for 20 MPEG-2 frames: its frames are counted by demuxing (measure_video)
            duration = 0.0
        elif stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
            if "flv" in formats:  # its onMetaData's length counts H.264's B-frame delay (0.2 s), not a late start
                duration = max(duration - _reorder_delay(path), 0.0)
        else:
            duration = 0.0
        matroska = bool({"matroska", "webm"} & formats)
        start = _start(stream) if matroska else 0.0  # an MKV's duration is where its frames end, counted from 0
        frames_end = track_duration(container, stream, duration, start) if matroska else 0.0
        duration = check_duration(path, duration - start)  # the length limited, not where a late first frame puts it
        if frames_end:  # the video's own, from its first frame: the file's may hold a longer audio track
            duration = frames_end - start
        rotate_tag = _tag(stream.metadata, "rotate")
        codec, reorders = str(stream.codec_context.name or ""), bool(stream.codec_context.has_b_frames)
        alone = len(container.streams.video) == 1  # else decord may choose another stream (it picks the "best")
        header = VideoHeader(width, height, fps, frames, duration, container.format.name, None, rotate_tag, codec, reorders,
                             alone, unfilled=unfilled, start=start)  # fmt: skip
        header.edits_ignored = dict(getattr(container, "options", None) or {}).get("ignore_editlist") == "1"
        if "mov" in formats:
            header.index_length = _index_length(stream)
        if matroska:
            header.track_duration = frames_end
            header.runs_past_end = ends_past_the_file(path, "matroska")
        elif "avi" in formats:
            header.runs_past_end = ends_past_the_file(path, "avi")
        if header.runs_past_end and stream.time_base is not None:  # cut short: where? (from a few headers)
            header.frames_cut, header.held_end = _frames_cut_and_end(path, header, float(stream.time_base))
        if frames and "mov" in formats:  # its index tells where each frame lies
            # an edit list may hide some, or the rate varies; after an empty edit (the first frame shown
            # late) the duration may hold them all and still some are hidden
            if header.frames_by_duration < frames or _start(stream) > 0:
                header.hidden = frames_hidden(stream)
            header.lost = frames_lost(stream, path, hides=header.frames_shown < frames)
            if header.lost:
                header.samples_whole = first_sample_lost(stream, path)
                if reorders and header.frames_shown == frames and header.samples_whole is not None:
                    shown = _shown_before_the_cut(path, stream.index, header.samples_whole, frames)
                    header.lost = frames - shown if shown is not None else header.lost  # in the order shown
        if orientation:
            header.display_matrix = _first_display_matrix(container, stream)
        if header.lost and not header.frames_held:
            raise MediaError(f"{shown_path(path)} holds none of the {header.frames_shown:,} frames its header lists: the file is "
                             "cut short (an unfinished download or copy); use a complete copy")  # fmt: skip
        return header
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise cannot_read(path, e) from None
    finally:
        container.close()


def frames_hidden(stream) -> int | None:
    """The samples of an MP4's (or MOV's) track that an edit list hides (FFmpeg's index flags them
    to be discarded, and decoding drops them); None where PyAV does not show the index. Read only
    where the duration holds fewer frames than the count, or the first frame is shown after 0
    (each entry costs ~0.25 µs): at a variable rate, the average rate times the duration may hold
    fewer though none is hidden; after an empty edit, it may hold all though some are."""
    try:
        entries = stream.index_entries
        return sum(1 for entry in entries if entry.is_discard) if len(entries) == stream.frames else None
    except Exception:  # noqa: BLE001 - an older PyAV without index_entries, an odd entry
        return None


def frames_lost(stream, path: Path, hides: bool) -> int:
    """The frames shown whose samples lie past the end of the file, from the index FFmpeg built
    from an MP4's (or MOV's) sample tables as it opened the file: no sample is read. One cut short
    with its index before the frames ("faststart", as streaming sites write them) still lists them
    all. The frames from the first sample past the end on are lost (FFmpeg's demuxing stops there;
    see first_sample_lost), less those an edit list hides (flagged to be discarded: looked for only
    where the header `hides` some, as each entry costs ~0.25 µs to read). An index without
    positions, or a PyAV that does not show the index, tells nothing: 0."""
    first = first_sample_lost(stream, path)
    if first is None:
        return 0
    try:
        entries = stream.index_entries
        past = range(first, len(entries))
        return sum(1 for number in past if not entries[number].is_discard) if hides else len(past)
    except Exception:  # noqa: BLE001 - an odd entry
        return 0


def first_sample_lost(stream, path: Path) -> int | None:
    """The number, in decode order, of the first sample FFmpeg's index places (wholly or in part)
    past the end of the file; None where the last one lies within it, or the index tells nothing.
    Samples lie in the file in decode order, each after the one before: it is found by bisection
    (~10 µs). Where they do not, the sample found may come after the first one lost, never before:
    decoding then finds the end earlier, as without an index."""
    try:
        size = path.stat().st_size
        entries = stream.index_entries
        count = len(entries)
        if not count or _inside(entries[count - 1], size) is not False:
            return None
        first, last = 0, count - 1  # entries[last] lies past the end; find the first that does
        while first < last:
            middle = (first + last) // 2
            if _inside(entries[middle], size) is False:
                last = middle
            else:
                first = middle + 1
        return first
    except Exception:  # noqa: BLE001 - OSError, an older PyAV without index_entries, an odd entry
        return None


# A B-frame stream's sample tables are read to put the frames held in the order they are shown
# only where they list this many samples at most (~50 ms; a table larger than this is left as it is)
ORDER_SAMPLES = 1 << 20


def _shown_before_the_cut(path: Path, track: int, whole: int, samples: int) -> int | None:
    """How many frames of an MP4's (or MOV's) B-frame track a player shows before the first one it
    lacks, the file holding its first `whole` samples (of `samples`). Samples are stored in decode
    order, which is not the order they are shown in: a P-frame held may be shown after a B-frame
    lost, and counting it would make it stand in for one shown earlier. Their times (stts, and
    ctts, what each is shown after its decoding) say: the frames held shown before any lost one.
    None where the track's tables cannot tell (none found, not `samples` long, or the first frame
    shown is not held)."""
    if samples > ORDER_SAMPLES or not 0 < whole < samples:
        return None
    try:
        tables = _sample_times(path, track)
    except Exception:  # noqa: BLE001 - an odd box: its tables tell nothing
        return None
    if tables is None or any(table is not None and int(table[:, 0].sum()) != samples for table in tables):
        return None  # counted before any table is expanded: a count may be anything
    stts, ctts = tables
    decoded = np.concatenate(([0], np.repeat(stts[:, 1], stts[:, 0]).cumsum()[:-1]))
    shown = decoded + np.repeat(ctts[:, 1], ctts[:, 0]) if ctts is not None else decoded
    return int((shown[:whole] < shown[whole:].min()).sum()) or None  # none: the tables are not a real stream's


def _sample_times(path: Path, track: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The stts and ctts tables ((count, value) rows, int64) of the moov's `track`-th trak (FFmpeg
    makes a stream of each trak, in order); ctts None where it has none; None where not found."""
    found = _sample_tables(path, track, (b"stts", b"ctts"))
    if found is None or b"stts" not in found:
        return None
    return _rows(found[b"stts"]), _rows(found[b"ctts"]) if b"ctts" in found else None


# Sample descriptions of a track read at most (a real track has one, a spliced recording a few)
SAMPLE_DESCRIPTIONS = 256
STSD_BYTES = 1 << 20  # read of the sample descriptions at most: 256 of 4 KiB (a real one takes ~150 bytes)


def decoder_configs(path: Path, track: int) -> list[bytes] | None:
    """The decoder configuration records (avcC, hvcC: an H.264 or HEVC stream's parameter sets) of
    each sample description (stsd entry) of an MP4's (or MOV's) `track`-th trak: a track may switch
    between several, FFmpeg giving the decoder each one's as its samples come. None where they
    are not found, more than SAMPLE_DESCRIPTIONS, or over STSD_BYTES."""
    found = _sample_tables(path, track, (b"stsd",), STSD_BYTES)
    if found is None or b"stsd" not in found:
        return None
    stsd, configs = found[b"stsd"], []  # version and flags, an entry count, then the entries (boxes)
    for number, (_, start, end) in enumerate(_mp4_boxes(stsd, 8, len(stsd))):
        if number >= SAMPLE_DESCRIPTIONS:
            return None
        entry = stsd[start:end]  # a visual entry's 78 bytes of fields, then its boxes
        configs += [bytes(entry[a:b]) for kind, a, b in _mp4_boxes(entry, 78, len(entry)) if kind in (b"avcC", b"hvcC")]
    return configs


def _sample_tables(path: Path, track: int, kinds: tuple[bytes, ...], limit: int = MP4_MOOV_LIMIT) -> dict[bytes, memoryview] | None:
    """The boxes of these kinds in the sample table (stbl) of the moov's `track`-th trak, each
    payload; None where there is no such trak, or one of them is over `limit` bytes. Only the box
    headers on the way are read, and the boxes wanted: not the whole moov (a long recording's
    sample tables are megabytes, and decord's every open of an MP4 looks for its descriptions)."""
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since PyAV read it must not block
            size = os.fstat(f.fileno()).st_size
            moov = next(((at, head, box) for kind, at, head, box in _top_boxes(f, size) if kind == b"moov"), None)
            if moov is None:
                return None
            at, head, box = moov
            inside = (at + head, min(at + box, size, at + head + MP4_MOOV_LIMIT))  # what a box declares is not what it holds
            trak = next((box for number, box in enumerate(_boxes_named(f, inside, b"trak")) if number == track), None)
            for name in (b"mdia", b"minf", b"stbl"):
                trak = next(_boxes_named(f, trak, name), None) if trak is not None else None
            if trak is None:
                return None
            found = {}
            for kind, start, end in _file_boxes(f, *trak):
                if kind in kinds:
                    if end - start > limit:
                        return None
                    f.seek(start)
                    found[kind] = memoryview(f.read(end - start))
            return found
    except OSError:
        return None


def _file_boxes(f, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """As _mp4_boxes, from the file: each box's header read, at most MP4_TOP_BOXES of them."""
    at = start
    for _ in range(MP4_TOP_BOXES):
        if end - at < 8:
            return  # (a read of a negative count would read to the end of the file)
        f.seek(at)
        box = _box_header(f.read(min(16, end - at)), end - at)
        if box is None or at + box[2] > end:
            return
        kind, head, size = box
        yield kind, at + head, at + size
        at += size


def _boxes_named(f, inside: tuple[int, int], name: bytes) -> Iterator[tuple[int, int]]:
    return ((start, end) for kind, start, end in _file_boxes(f, *inside) if kind == name)


def _rows(table: memoryview) -> np.ndarray:
    """A full box's (count, value) rows: after version and flags, an entry count, then the rows;
    the value signed, as FFmpeg reads a ctts offset (and an stts delta never reaches 2^31)."""
    count = min(int.from_bytes(table[4:8], "big"), (len(table) - 8) // 8) if len(table) >= 8 else 0  # what it holds
    rows = np.frombuffer(table[8 : 8 + 8 * count], dtype=">i4").reshape(-1, 2).astype(np.int64)
    rows[:, 0] &= 0xFFFFFFFF  # the counts are unsigned
    return rows


def _fragments_counted(path: Path, stream, frames: int) -> int:
    """The frames of a fragmented MP4 whose moov lists some samples (the first fragment's, as
    `movflags=frag_keyframe` writes it) or none (`+empty_moov`, as recorders that survive a crash
    write it) and its moof boxes the rest: FFmpeg's count is the moov's (5 of 30, or 0), its index
    lists them all as it opens the file (the samples it does not flag to be discarded), those of a
    fragment cut short too: frames_lost tells them. `frames` elsewhere."""
    length = _index_length(stream)
    if length is None or length <= frames:
        return frames
    try:
        with open_regular_file(path) as f:  # a FIFO swapped in since PyAV read it must not block
            fragmented = any(kind == b"moof" for kind, *_ in _top_boxes(f, os.fstat(f.fileno()).st_size))
        if not fragmented:
            return frames
        return check_count(path, sum(1 for entry in stream.index_entries if not entry.is_discard))
    except MediaError:
        raise
    except Exception:  # noqa: BLE001 - OSError, an odd entry: FFmpeg's count stands
        return frames


def _index_length(stream) -> int | None:
    """The entries of FFmpeg's index of the stream (None where PyAV does not show it)."""
    try:
        return len(stream.index_entries)
    except Exception:  # noqa: BLE001 - an older PyAV without index_entries
        return None


def _index_is_empty(stream) -> bool:
    """Whether FFmpeg's index of the stream lists no sample (False where PyAV does not show it)."""
    try:
        return len(stream.index_entries) == 0
    except Exception:  # noqa: BLE001 - an older PyAV without index_entries
        return False


def _inside(entry, size: int) -> bool | None:
    """Whether an index entry's sample lies wholly within the first `size` bytes; None where its
    position is unknown (-1, or none)."""
    pos, length = entry.pos, entry.size
    if not isinstance(pos, int) or not isinstance(length, int) or pos < 0:
        return None
    return pos + max(length, 0) <= size


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


def _still_bmff(path: Path) -> str | None:
    """"a HEIC image" (or HEIF, AVIF) for a still picture in an MP4's container (files.sniff_binary), else None."""
    try:
        what = sniff_file(path)
    except OSError:
        return None
    return what if what in STILL_BMFF_KINDS else None


def count_packets(path: Path, stop: DecodeStop | None = None) -> int:
    """The frames of a stream whose header stores no count (MKV, WebM, MPEG-PS, APNG, an AVI
    written to a pipe): demuxing (no decoding) counts one packet per frame."""
    return demux_length(path, stop).frames


def demux_length(path: Path, stop: DecodeStop | None = None) -> Held:
    """count_packets's count, and where the frames end (Held), from one demuxing."""
    try:
        with open_container(path) as container:
            stream = video_stream(container)
            span = PacketSpan(stream)
            for packet in container.demux(stream):
                if stop is not None and stop.is_set():
                    raise DecodeStopped
                span.add(packet)
                if span.frames > MAX_FRAMES:  # a header that counts nothing bounds nothing: stop here
                    break
    except DecodeStopped:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"cannot read video {shown_path(path)} ({error_reason(e)}); the file may be damaged") from None
    if span.frames > MAX_FRAMES:
        raise MediaError(f"{shown_path(path)} holds more than {MAX_FRAMES:,} frames; the file is damaged or not a real video")
    return span.held


@dataclass(frozen=True)
class Held:
    """What a stream really holds: its frames, where the last one shown ends and the smallest step
    between the times its frames are shown at (seconds)."""

    frames: int
    end: float
    step: float


class PacketSpan:
    """Held, from a stream's packets as they are demuxed: the frames (packets with data), the
    latest time shown and the smallest step between times (a frame's; B-frames come in decode
    order, their times behind the latest). The last frame lasts its duration, or that step where
    it is longer: a remuxed AVI's packets last one tick of its time base (1/600 s) while its count
    runs to the end of the frame. Times are kept in the stream's time base (ints: cheap per packet).
    The last packet, where FFmpeg flags it corrupt (an AVI's read short: the file ends inside it), is
    no frame held: the attach line calls such a file cut short, and a decoder conceals what it lacks."""

    def __init__(self, stream) -> None:
        self._base = stream.time_base
        self.frames, self._last, self._step, self._length = 0, None, None, 0
        self._corrupt = None  # a packet flagged corrupt, counted once another with data follows it

    def add(self, packet) -> None:
        if not packet.size:  # an AVI's dropped frame, the end-of-stream packet: no frame
            return
        if self._corrupt is not None:  # not the last: damage inside (MPEG-TS's lost bytes), still a frame
            self._count(self._corrupt)
            self._corrupt = None
        if getattr(packet, "is_corrupt", False):
            self._corrupt = packet
            return
        self._count(packet)

    def _count(self, packet) -> None:
        self.frames += 1
        at = packet.pts if packet.pts is not None else packet.dts
        if at is None:
            return
        if self._last is not None and at != self._last:
            gap = abs(at - self._last)
            self._step = gap if self._step is None else min(self._step, gap)
        if self._last is None or at > self._last:
            self._last, self._length = at, packet.duration or 0

    @property
    def held(self) -> Held:
        if self._last is None or self._base is None:
            return Held(self.frames, 0.0, 0.0)
        step = self._step or 0
        return Held(self.frames, float((self._last + max(self._length, step)) * self._base), float(step * self._base))
