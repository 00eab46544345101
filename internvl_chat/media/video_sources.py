"""The two decoders of a video's sampled frames, behind one interface (`FrameSource`): decord,
which seeks to each frame (with what decord 0.6 decodes, turns by itself and seeks exactly, as
checked against PyAV), and PyAV, which decodes from the start, or only the sampled packets of an
intra-only stream (MJPEG, DV, ProRes, raw). Each charges the frames it decodes to a `DecodeMeter`."""

from __future__ import annotations

import bisect
import math
import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import MediaError
from ..files import visible
from .video_cost import DecodeMeter
from .video_header import (
    Held,
    PacketSpan,
    VideoHeader,
    cannot_read,
    check_count,
    check_duration,
    check_fps,
    check_frame_size,
    demux_length,
    error_reason,
    from_ffmpeg,
    open_container,
    shown_path,
    video_stream,
)
from .video_orientation import CLOCKWISE, Orientation, compose, inverse, swaps_sides
from .video_sps import UnknownSize, decoded_size
from .video_worker import DecodeStop, DecodeStopped

# FFmpeg's frame threading keeps one frame in flight per thread: cap their memory for huge frames.
FRAME_THREADS_BYTES = 512 << 20
# Empty packets (an AVI's dropped frames) read ahead at most, looking for one with data
MAX_EMPTY_AHEAD = 1024


class FrameSource(Protocol):
    num_total_frames: int
    fps: float
    orientation: Orientation  # what is still to be applied to the frames it yields
    size: tuple[int, int]  # (width, height) its decoding work is planned at
    from_start: bool  # decodes every frame up to the last one wanted

    def plan(self, wanted: list[int]) -> int:
        """The frames the decoder will produce to reach the wanted ones (ascending, distinct)."""
        ...

    def frames(self, wanted: list[int], stop: DecodeStop, meter: DecodeMeter) -> Iterator[tuple[int, np.ndarray]]:
        """(number, RGB uint8 [H, W, 3]) for each wanted number (ascending, distinct), each frame
        decoded charged to `meter`. A stream that ends before a wanted frame raises StreamEnded."""
        ...

    def held(self, stop: DecodeStop) -> Held | None:
        """The frames the stream really holds and where they end, as far as it is cheap to know
        after decoding (no frame decoded again); None where it cannot tell."""
        ...

    def close(self) -> None: ...


class StreamEnded(Exception):
    """The stream ended before a wanted frame: it holds `frames` frames (fewer than its header
    lists: a file cut short, or a header that counts more). `reason`: why decoding failed there
    (damage), or None where the stream simply ended."""

    def __init__(self, frames: int, reason: str | None = None) -> None:
        super().__init__(frames, reason)
        self.frames, self.reason = frames, reason


class _DemuxFailed(Exception):
    """The demuxer could not read on (`reason`): the packets before it came out."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecordFailed(MediaError):
    """decord could not open or decode this file: PyAV may still manage. `doing` is what failed,
    as a message says it ("read video PATH"), `detail` decord's own reason, shortened (decord_detail)."""

    def __init__(self, message: str, doing: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.doing, self.detail = doing, detail


DECORD_DETAIL_CHARS = 120


def decord_detail(err: BaseException) -> str:
    """decord's reason for an error, escaped and short: its C++ CHECK messages hold the failed
    expression and its values ("Check failed: avfilter_graph_create_filter(&buffersrc_ctx_, …) >= 0
    (-22 vs. 0) Cannot create buffer source"), and some a stack trace: only the words after them."""
    text = str(err).split("Stack trace")[0]
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)  # a time and a source location
    text = re.sub(r"Check failed: .*?\(-?\d+ vs\. -?\d+\)\s*", "", text, flags=re.DOTALL)
    text = visible(" ".join(text.split())) or type(err).__name__
    return text if len(text) <= DECORD_DETAIL_CHARS else text[: DECORD_DETAIL_CHARS - 1].rstrip() + "…"


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


def decord_rotation(header: VideoHeader) -> Orientation:
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
    return {90: CLOCKWISE[1], 180: CLOCKWISE[2], 270: CLOCKWISE[3]}.get(degrees)


# Containers that store each frame's presentation time and an index to seek by
_EXACT_CONTAINERS = ("mov", "mp4", "matroska", "webm")
# Codecs whose B-frames decord still places right after a seek (closed or H.264-style open GOPs)
_REORDERING_CODECS_OK = ("h264", "vp8", "vp9", "av1", "libdav1d", "libaom-av1")


def decord_is_exact(header: VideoHeader) -> bool:
    """Whether decord 0.6 returns the frame asked for, as checked against PyAV on clips whose
    frames show their number: it seeks to the key frame before it and counts from there, which
    goes wrong (silently: other frames, repeated or out of order) in AVI, MPEG-TS/PS and other
    containers without per-frame times, and for MPEG-1/2/4 Part 2 and HEVC streams with B-frames
    (their open GOPs hold frames that cannot be decoded after a seek). With several video streams
    it reads the one FFmpeg rates best, not necessarily the one the header was read from. Where an
    edit list hides frames (fewer shown than stored), it counts and seeks the stored ones, landing
    off by the hidden frames for some, and where it shows none (edits_ignored), it finds one frame.
    Where FFmpeg's index lists more samples than the stream holds, by its count and by its duration
    (an edit list of many edits lists a key frame and those after it again for each; a fragmented
    MP4's moov may count its first fragment's alone), it counts each entry a frame (23,281 of 60 for
    2,000 edits) and took minutes to open and seek such a file of 60 KB."""
    held = max(header.frames, header.frames_by_duration)
    listed_again = header.index_length is not None and bool(header.frames) and header.index_length > held
    if header.edits_ignored or listed_again or not header.alone:
        return False
    if not any(name in _EXACT_CONTAINERS for name in header.format_name.split(",")):
        return False
    if header.frames_shown < header.frames:
        return False
    return not header.reorders or header.codec in _REORDERING_CODECS_OK


class DecordSource:
    def __init__(self, path: Path, decord, header: VideoHeader, stop: DecodeStop, size: tuple[int, int] | None = None) -> None:
        """`size`: the size this file's decoding is counted at, found already (a plan of the same
        bytes: DecodeCost's of decord), so the stream's parameter sets are not walked again."""
        self._path, self._start = path, header.start
        if header.unfilled:  # decord allocates for the 2^30 frames its placeholder count lists: the process aborts
            doing = f"read video {shown_path(path)}"
            raise DecordFailed(f"cannot {doing}: an AVI written to a pipe (its header never filled in)", doing,
                               "an AVI written to a pipe, its header never filled in")  # fmt: skip
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            self.num_total_frames = check_count(path, len(self._reader))
            if header.lost:  # cut short: decord counts the packets it demuxes, which may end inside one
                self.num_total_frames = min(self.num_total_frames, header.frames_held)
            self.fps = check_fps(path, float(self._reader.get_avg_fps()))
            self._keys = sorted(int(k) for k in self._reader.get_key_indices())  # from the packets, as it seeks by them
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - decord raises DECORDError / RuntimeError for bad files
            raise DecordFailed(str(cannot_read(path, e)), f"read video {shown_path(path)}", decord_detail(e)) from None
        # decord's decoding is not seen frame by frame (it scales its output to the header's size):
        # counted at the largest size the stream's parameter sets declare, in-band ones included
        self.size = size if size is not None else _decoded_size(path, header, stop)
        self.from_start = False  # from the key frame before each wanted one
        applied = decord_rotation(header)
        self.orientation = compose(inverse(applied), header.orientation)
        # a frame of these (rows, columns) would mean decord turned it otherwise than predicted
        self._mis_turned = None
        if header.width and header.height and header.width != header.height:
            self._mis_turned = (header.height, header.width) if swaps_sides(applied) else (header.width, header.height)

    def plan(self, wanted: list[int]) -> int:
        return sum(decord_work(wanted, self._keys, self.num_total_frames))

    def frames(self, wanted: list[int], stop: DecodeStop, meter: DecodeMeter) -> Iterator[tuple[int, np.ndarray]]:
        for number, work in zip(wanted, decord_work(wanted, self._keys, self.num_total_frames)):
            if stop.is_set():
                raise DecodeStopped
            meter.charge(work, *self.size)  # as planned
            try:
                # one frame per call (as get_batch does inside), so Ctrl-C and memory wait for one frame
                self._reader.seek_accurate(number)
                frame = self._reader.next()
            except Exception as e:  # noqa: BLE001
                raise DecordFailed(f"cannot decode frames of {shown_path(self._path)} ({error_reason(e)}); the file may be damaged",
                                   f"decode frames of {shown_path(self._path)}", decord_detail(e)) from None  # fmt: skip
            # another library may have switched decord's output bridge to torch
            array = frame.asnumpy() if hasattr(frame, "asnumpy") else np.asarray(frame)
            del frame
            yield number, self._rgb(array)
            del array

    def _rgb(self, array: np.ndarray) -> np.ndarray:
        if array.ndim != 3 or array.shape[2] < 3:
            raise DecordFailed(f"decord decoded {shown_path(self._path)} to frames of shape {array.shape}, not RGB",
                               f"decode frames of {shown_path(self._path)}", f"frames of shape {array.shape}, not RGB")
        height, width, channels = array.shape
        if channels != 3:
            # decord gives a frame linesize/width "channels": rows padded to 4·width bytes (frames
            # narrower than 64 pixels) come out as 4; the first 3·width bytes of each row are the pixels
            array = np.ascontiguousarray(array).reshape(height, -1)[:, : 3 * width].reshape(height, width, 3)
        if (height, width) == self._mis_turned:
            raise DecordFailed(f"decord turned the frames of {shown_path(self._path)} otherwise than its header says",
                               f"decode frames of {shown_path(self._path)}", "frames turned otherwise than the header says")
        return array

    def held(self, stop: DecodeStop) -> Held | None:
        # decord read every packet as it opened the file: its count and the last frames' times
        try:
            count = len(self._reader)
            if count < 1:
                return None
            # (start, end) of its last frames, in the order shown; with B-frames, a frame the cut
            # took may leave a gap before the last one: the step is the smallest between them
            times = np.asarray(self._reader.get_frame_timestamp(list(range(max(count - 16, 0), count))), np.float64)
            begin, end = float(times[-1][0]), float(times[-1][1])
            steps = np.diff(np.sort(times[:, 0]))
            step = float(steps[steps > 0].min()) if (steps > 0).any() else 0.0
            # decord counts its times from the first frame's; the header's end is in the stream's times
            return Held(count, self._start + begin + max(end - begin, step), step)
        except Exception:  # noqa: BLE001 - a decord without frame times, or none for that frame
            return None

    def close(self) -> None:
        self._reader = None


def _decoded_size(path: Path, header: VideoHeader, stop: DecodeStop) -> tuple[int, int]:
    """The size decord's decoding work is counted at: the header's, or a larger one an H.264 or
    HEVC stream declares in its samples (video_sps). Where that cannot be told, decord is not used
    (DecordFailed: PyAV decodes it, counting each frame at the size it has)."""
    if header.codec not in ("h264", "hevc"):
        return header.width, header.height  # their frame size is in the header or the frames decord shows
    try:
        size = decoded_size(path, (header.width, header.height), stop)
    except UnknownSize as e:
        doing = f"tell the frame size of {shown_path(path)}"
        raise DecordFailed(f"cannot {doing} ({e.reason})", doing, e.reason) from None
    except DecodeStopped:
        raise
    except Exception as e:  # noqa: BLE001 - av raises FFmpegError subclasses, OSError, …
        raise DecordFailed(str(cannot_read(path, e)), f"read video {shown_path(path)}", error_reason(e)) from None
    check_frame_size(path, *size)
    return size


class NotOnePerPacket(Exception):
    """A packet of an intra-only stream decoded to no picture or several (MJPEG fields in packets of
    their own, damage): packet n is not frame n there, so the stream is decoded from the start."""


class PyAVSource:
    def __init__(self, path: Path, header: VideoHeader, stop: DecodeStop, packets_alone: bool = True) -> None:
        self._path = path
        self.orientation = header.orientation
        self.size = (header.width, header.height)  # each frame is counted at its own as it is decoded
        try:
            self._container = open_container(path)
        except Exception as e:  # noqa: BLE001 - av raises FFmpegError subclasses, OSError, …
            raise cannot_read(path, e) from None
        try:
            stream = video_stream(self._container)
            if stream is None:
                raise MediaError(f"{shown_path(path)} has no video stream; pass a video file")
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
            self._demux = None  # the demuxing decoding reads from (held() reads on where it stopped)
            self._span = PacketSpan(stream)  # what the packets demuxed hold
            self._held: Held | None = None
            if header.frames_held:
                self.num_total_frames = header.frames_held
            else:  # no count in the header: demuxed (no decoding), which tells where the frames end too
                self._held = demux_length(path, stop)
                self.num_total_frames = self._held.frames
                if self.fps > 0:  # its length at the header's rate, as probe_video checks it (a tiny rate: enormous)
                    check_duration(path, self.num_total_frames / self.fps)
            # cut short: a decoder is given the samples the file holds whole, not the half one after
            # them, which fails, and makes a frame-threaded decoder drop the frames it holds back
            self._whole = header.samples_whole if header.lost else None
        except BaseException:
            self._container.close()
            raise

    def plan(self, wanted: list[int]) -> int:
        # intra-only: the wanted frames alone; else decoded from the start up to the last one
        return len(wanted) if self._intra else wanted[-1] + 1

    def _packets(self) -> Iterator[tuple[object, bool]]:
        """The stream's packets, each with whether a packet with data follows it (empty ones, an
        AVI's dropped frames or the end's, do not count): a file cut short ends with a cut packet,
        which does not decode; a packet that does not decode elsewhere is damage (an MP4 or MOV
        whose index tells the cut ends with the last sample it holds whole). A demuxing error ends
        with _DemuxFailed once the packets before it are out."""
        self._demux = packets = self._container.demux(self._stream)
        queue: deque = deque()  # read ahead up to the next packet with data
        failed, ended, fed = None, False, 0
        while True:
            while not ended and (len(queue) < 2 or not queue[-1].size) and len(queue) <= MAX_EMPTY_AHEAD:
                try:
                    packet = next(packets, None)
                except MemoryError as e:
                    if not from_ffmpeg(e):
                        raise
                    # FFmpeg's: a sample the index declares far larger than the file (a hostile size)
                    failed, ended = error_reason(e), True
                    break
                except Exception as e:  # noqa: BLE001 - av raises FFmpegError subclasses for damaged data
                    failed, ended = error_reason(e), True
                    break
                if packet is None:
                    ended = True
                    continue
                self._span.add(packet)
                if packet.size and self._whole is not None and fed >= self._whole:
                    continue  # past the samples held whole (the demuxer ends at the file's end)
                fed += 1 if packet.size else 0
                queue.append(packet)
            if not queue:
                break
            capped = len(queue) > MAX_EMPTY_AHEAD  # so many empty packets ahead: taken as data following
            packet = queue.popleft()
            yield packet, failed is not None or capped or any(p.size for p in queue)
        if failed is not None:
            raise _DemuxFailed(failed)

    def _from_start(self) -> Iterator[tuple[int, object]]:
        """(number, frame) for every frame in presentation order; StreamEnded at the end."""
        number = -1
        try:
            for packet, more in self._packets():
                try:
                    frames = packet.decode()  # the empty packet at the end returns what the decoder holds
                except MemoryError:
                    raise
                except Exception as e:  # noqa: BLE001
                    if more:
                        raise StreamEnded(number + 1, error_reason(e)) from None
                    continue  # the file's last packet, cut with it
                for frame in frames:
                    number += 1
                    yield number, frame
        except _DemuxFailed as e:
            raise StreamEnded(number + 1, e.reason) from None
        raise StreamEnded(number + 1)

    def _intra_frames(self, wanted: list[int]) -> Iterator[tuple[int, object]]:
        """(number, frame) for the wanted packets of an intra-only stream, each decoded alone, and
        the last packet's (to know that it is whole); StreamEnded at the end."""
        wanted_set, number = set(wanted), -1
        try:
            for packet, more in self._packets():
                if not packet.size:  # the end-of-stream packet (count_packets counts no empty one either)
                    continue
                number += 1
                if number in wanted_set or not more:
                    try:
                        frame = self._alone(packet)
                    except (NotOnePerPacket, MemoryError):
                        raise
                    except Exception as e:  # noqa: BLE001
                        raise StreamEnded(number, error_reason(e) if more else None) from None
                    yield number, frame
        except _DemuxFailed as e:
            raise StreamEnded(number + 1, e.reason) from None
        raise StreamEnded(number + 1)

    def _alone(self, packet):
        frames = self._stream.codec_context.decode(packet)
        if len(frames) != 1:
            raise NotOnePerPacket
        return frames[0]

    def frames(self, wanted: list[int], stop: DecodeStop, meter: DecodeMeter) -> Iterator[tuple[int, np.ndarray]]:
        pending = iter(wanted)
        target = next(pending)
        decoded = self._intra_frames(wanted) if self._intra else self._from_start()
        for number, frame in decoded:
            if stop.is_set():
                raise DecodeStopped
            check_frame_size(self._path, frame.width, frame.height)
            meter.charge(1, frame.width, frame.height)
            if number == target:
                yield number, frame.to_ndarray(format="rgb24")
                target = next(pending, None)
                if target is None:
                    return
            del frame

    def held(self, stop: DecodeStop) -> Held | None:
        """Demuxes (no decoding) the packets decoding left unread: after the last sampled frame,
        the last few of the stream."""
        if self._held is None:
            packets = self._demux if self._demux is not None else self._container.demux(self._stream)
            try:
                for packet in packets:
                    if stop.is_set():
                        raise DecodeStopped
                    self._span.add(packet)
            except DecodeStopped:
                raise
            except Exception:  # noqa: BLE001 - av raises FFmpegError subclasses for damaged data: it cannot tell
                return None
            self._held = self._span.held
        return self._held

    def close(self) -> None:
        self._container.close()
