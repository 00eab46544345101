"""The frame size an H.264 or HEVC stream really decodes at, from its sequence parameter sets (SPS):
those of each sample description (avcC, hvcC) and those carried in its samples (in-band, NAL type 7
or 33). A stream may declare a new, larger size at any sample; FFmpeg then decodes at that size
while the container header still tells the first. decord shows none of it (it scales its output to
the header's size), so the size its decoding work is counted at (video_sources.DecordSource) comes
from here: every sample's NAL unit headers are walked (a few bytes each, never a whole sample: an
MP4's where FFmpeg's index places them; other containers' demuxed, no decoding) and each distinct
SPS is parsed for its coded size and cropping. The walk is bounded (below); past a bound the size
is not known (UnknownSize) and decord is not used."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..files import open_regular_file
from .video_header import SAMPLE_DESCRIPTIONS, STSD_BYTES, decoder_configs, open_container, video_stream
from .video_worker import DecodeStop, DecodeStopped

H264_SPS, HEVC_SPS = 7, 33
# Bounds on the walk: past them the stream is not taken as known (the caller decodes with PyAV,
# which counts each frame at the size it decodes to)
SCAN_SAMPLES = 1 << 20  # 9.7 hours at 30 fps
NALS_PER_SAMPLE = 1024  # a frame's slices, parameter sets, SEI, …
SCAN_UNITS = 4 * SCAN_SAMPLES  # frames of several slices each
# A stream repeats its few SPS at its key frames: H.264 has 32 ids, HEVC 16, and streams joined at
# a change of size add one per part. Each distinct one is parsed (under 2 ms at the most)
DISTINCT_SPS = 64
# Real SPS are tens of bytes. The largest scaling lists, each coefficient at its longest code (17
# bits), take 1,020 bytes in H.264 (4:4:4's 12 lists) and 2,125 in HEVC (its 1,000 coefficients);
# the other fields and a VUI some dozens more. Lists no encoder writes at their longest can pass
# it: H.264's picture order cycle (255 offsets of up to 63 bits: 2 KB), HEVC's 64 short-term
# reference picture sets (up to ~4 KB); such a stream is past the bound, and PyAV decodes it
SPS_BYTES = 3072
# H.264 profiles whose SPS carries chroma format, bit depths and scaling lists, as FFmpeg's decoder
# reads them (H.264 7.3.2.1.1 but for 144, the old High 4:4:4; MVC's 134, 135 and 139 come in
# subset SPS, NAL type 15, which it does not take for the stream's size)
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 144}


class UnknownSize(Exception):
    """The stream's frame size cannot be told from its parameter sets (an SPS that does not parse,
    samples past the bounds, NAL units not length-prefixed): `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SpsSize:
    """An SPS's frame size: `coded` (what is decoded: whole macroblocks or coding blocks) and
    `shown` (after its cropping)."""

    coded: tuple[int, int]
    shown: tuple[int, int]
    slack: int  # a cropping under this, in width or in height (both sides together), is taken for alignment to whole blocks

    @property
    def work(self) -> tuple[int, int]:
        """The size the decoding work is counted at: the shown one, unless the cropping hides more
        than alignment to whole blocks needs (a huge coded frame cropped to a small one)."""
        (cw, ch), (sw, sh) = self.coded, self.shown
        return self.coded if cw - sw >= self.slack or ch - sh >= self.slack else self.shown


class _Bits:
    """Big-endian bits of an RBSP (emulation prevention bytes removed), with exp-Golomb codes. Each
    read takes only the bytes it spans: shifting the whole SPS as one integer cost every bit read
    the SPS's length (a 4 KiB SPS of long scaling lists took ~10 ms)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at, self._size = data, 0, 8 * len(data)

    def _peek(self, count: int) -> int:
        end = self._at + count
        if end > self._size:
            raise UnknownSize("an SPS ends early")
        first, last = self._at >> 3, (end + 7) >> 3
        return (int.from_bytes(self._data[first:last], "big") >> (8 * last - end)) & ((1 << count) - 1)

    def u(self, count: int) -> int:
        value = self._peek(count)
        self._at += count
        return value

    def ue(self) -> int:
        ahead = min(32, self._size - self._at)  # a code of over 31 leading zeros is refused
        window = self._peek(ahead)
        if not window:
            raise UnknownSize("an SPS holds an invalid number" if ahead == 32 else "an SPS ends early")
        zeros = ahead - window.bit_length()
        self._at += zeros + 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


def rbsp(nal: bytes) -> bytes:
    """A NAL unit's payload without its emulation prevention bytes (00 00 03 → 00 00)."""
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def h264_sps_size(nal: bytes) -> SpsSize:
    """The frame size an H.264 SPS NAL unit (its header byte first) declares (H.264 7.3.2.1.1)."""
    bits = _Bits(rbsp(nal[1:]))
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    chroma, separate = 1, 0
    if profile in _HIGH_PROFILES:
        chroma = bits.ue()
        if chroma > 3:
            raise UnknownSize("an SPS declares an invalid chroma format")
        if chroma == 3:
            separate = bits.u(1)
        bits.ue(), bits.ue(), bits.u(1)  # bit depths, qpprime_y_zero_transform_bypass
        if bits.u(1):  # seq_scaling_matrix_present
            for number in range(8 if chroma != 3 else 12):
                if bits.u(1):
                    _skip_scaling_list(bits, 16 if number < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    order = bits.ue()  # pic_order_cnt_type
    if order == 0:
        bits.ue()
    elif order == 1:
        bits.u(1), bits.se(), bits.se()
        cycle = bits.ue()
        if cycle > 255:
            raise UnknownSize("an SPS declares an invalid picture order cycle")
        for _ in range(cycle):
            bits.se()
    bits.ue(), bits.u(1)  # max_num_ref_frames, gaps_in_frame_num_allowed
    width, height = (bits.ue() + 1) * 16, bits.ue() + 1
    frames_only = bits.u(1)
    height *= 16 * (2 - frames_only)
    if not frames_only:
        bits.u(1)  # mb_adaptive_frame_field
    bits.u(1)  # direct_8x8_inference
    crop = (bits.ue(), bits.ue(), bits.ue(), bits.ue()) if bits.u(1) else (0, 0, 0, 0)
    chroma_type = 0 if separate else chroma
    unit_x = 2 if chroma_type in (1, 2) else 1
    unit_y = (2 if chroma_type == 1 else 1) * (2 - frames_only)
    return _cropped((width, height), crop, unit_x, unit_y, slack=16 * (2 - frames_only))


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = following = 8
    for _ in range(size):
        if following:
            following = (last + bits.se() + 256) % 256
        last = following or last


def hevc_sps_size(nal: bytes) -> SpsSize:
    """The frame size an HEVC SPS NAL unit (its two header bytes first) declares (H.265 7.3.2.2)."""
    bits = _Bits(rbsp(nal[2:]))
    bits.u(4)  # sps_video_parameter_set_id
    sub_layers = bits.u(3)  # sps_max_sub_layers_minus1
    bits.u(1)
    bits.u(32), bits.u(32), bits.u(32)  # general profile (88 bits) and level (8)
    present = [(bits.u(1), bits.u(1)) for _ in range(sub_layers)]
    if sub_layers:
        bits.u(2 * (8 - sub_layers))  # reserved
    for profile, level in present:
        bits.u(88 if profile else 0), bits.u(8 if level else 0)
    bits.ue()  # sps_seq_parameter_set_id
    chroma = bits.ue()
    if chroma > 3:
        raise UnknownSize("an SPS declares an invalid chroma format")
    if chroma == 3 and bits.u(1):  # separate_colour_plane
        chroma = 0
    width, height = bits.ue(), bits.ue()
    crop = (bits.ue(), bits.ue(), bits.ue(), bits.ue()) if bits.u(1) else (0, 0, 0, 0)
    unit_x = 2 if chroma in (1, 2) else 1
    unit_y = 2 if chroma == 1 else 1
    return _cropped((width, height), crop, unit_x, unit_y, slack=64)  # coding tree blocks are up to 64 pixels


def _cropped(coded: tuple[int, int], crop: tuple[int, int, int, int], unit_x: int, unit_y: int, slack: int) -> SpsSize:
    left, right, top, bottom = crop
    width, height = coded[0] - unit_x * (left + right), coded[1] - unit_y * (top + bottom)
    if width <= 0 or height <= 0:
        shown = coded  # FFmpeg ignores a cropping that leaves nothing
    else:
        shown = (width, height)
    return SpsSize(coded, shown, slack)


# ---------------------------------------------------------------- the stream's parameter sets

def header_sps(codec: str, extradata: bytes) -> tuple[int | None, list[bytes]]:
    """(the length of each NAL unit's size field in the samples, or None where they are not
    length-prefixed; the SPS NAL units) of an avcC or hvcC record (a stream's extradata)."""
    data = extradata or b""
    if codec == "h264":
        record = data[:1] == b"\x01"
    else:  # as FFmpeg reads it: version 0 too (muxers before the format was final), 00 00 0x a start code
        record = len(data) > 3 and (data[0] or data[1] or data[2] > 1)
    if not record:
        return None, []  # Annex B parameter sets (start codes), or none
    try:
        if codec == "h264":
            length = (data[4] & 3) + 1
            units, at = [], 6
            for _ in range(data[5] & 0x1F):
                size = int.from_bytes(data[at : at + 2], "big")
                units.append(data[at + 2 : at + 2 + size])
                at += 2 + size
            return length, units
        length, units, at = (data[21] & 3) + 1, [], 23
        for _ in range(data[22]):
            kind, count = data[at] & 0x3F, int.from_bytes(data[at + 1 : at + 3], "big")
            at += 3
            for _ in range(count):
                size = int.from_bytes(data[at : at + 2], "big")
                if kind == HEVC_SPS:
                    units.append(data[at + 2 : at + 2 + size])
                at += 2 + size
        return length, units
    except IndexError:
        return None, []


class _Scan:
    """The SPS NAL units found in a stream's samples, each distinct one parsed once; the bounds
    on the walk (SCAN_SAMPLES, SCAN_UNITS, DISTINCT_SPS, NALS_PER_SAMPLE) kept."""

    def __init__(self, codec: str, length: int, stop: DecodeStop | None) -> None:
        self.codec, self.length, self.stop = codec, length, stop
        self.seen: set[bytes] = set()  # each distinct SPS, parsed once
        self.sizes: list[SpsSize] = []  # those the decoder takes
        self.samples = self.units = 0

    def sample(self, read: Callable[[int, int], bytes], start: int, size: int) -> None:
        """Walk the NAL units of the sample of `size` bytes at `start` (each after a `length`-byte
        size); `read(at, count)` reads bytes. Only each unit's first bytes are read, and an SPS's."""
        self.samples += 1
        if self.samples > SCAN_SAMPLES:
            raise UnknownSize(f"over {SCAN_SAMPLES:,} samples")
        if not self.samples % 1024 and self.stop is not None and self.stop.is_set():
            raise DecodeStopped  # Ctrl-C, or the client gone: a long clip's walk takes a while
        length, codec = self.length, self.codec
        sps, head = (H264_SPS, 1) if codec == "h264" else (HEVC_SPS, 2)
        at, end = start, start + size
        for count in range(NALS_PER_SAMPLE + 1):
            if at + length + head > end:
                return  # the end, or bytes too few for a unit (the decoder skips them)
            if count == NALS_PER_SAMPLE:
                raise UnknownSize(f"a sample of over {NALS_PER_SAMPLE:,} NAL units")
            self.units += 1
            if self.units > SCAN_UNITS:
                raise UnknownSize(f"over {SCAN_UNITS:,} NAL units")
            field = read(at, length + head)
            if len(field) < length + head:
                return  # the file ends inside the sample (cut short): its decoding ends there too
            unit = int.from_bytes(field[:length], "big")
            kind = field[length] & 0x1F if codec == "h264" else (field[length] >> 1) & 0x3F
            if kind == sps:
                self.add(read(at + length, min(unit, end - at - length, SPS_BYTES + 1)), unit)
            at += length + unit

    def add(self, nal: bytes, unit: int) -> None:
        if unit > SPS_BYTES:
            raise UnknownSize(f"an SPS of {unit:,} bytes")
        if len(nal) < unit or nal in self.seen or not decoder_takes_as_sps(self.codec, nal):
            return  # cut off by the end of the sample or file (no decoder reads it), known, or dropped
        if len(self.seen) >= DISTINCT_SPS:
            raise UnknownSize(f"over {DISTINCT_SPS:,} different SPS")
        if self.stop is not None and self.stop.is_set():
            raise DecodeStopped  # as at every 1,024 samples: the SPS of a few samples take a while too
        self.seen.add(nal)
        size = sps_size(self.codec, nal)
        if decoder_takes(size.coded):
            self.sizes.append(size)


def decoder_takes_as_sps(codec: str, nal: bytes) -> bool:
    """Whether FFmpeg's decoder takes this NAL unit as an SPS of the stream it shows. It drops a unit
    whose forbidden bit is set, and an HEVC one of a layer above the base (MV-HEVC's second view,
    whose SPS has another syntax) or with a temporal id of 0 (invalid); an avcC's SPS slot may
    hold another kind, which it takes as that kind."""
    if codec == "h264":
        return len(nal) >= 1 and nal[0] & 0x9F == H264_SPS  # forbidden bit and type (any nal_ref_idc)
    if len(nal) < 2:
        return False
    layer, temporal_plus_1 = (nal[0] & 1) << 5 | nal[1] >> 3, nal[1] & 7
    return nal[0] >> 1 == HEVC_SPS and layer == 0 and temporal_plus_1 != 0  # (nal[0] >> 1 holds the forbidden bit)


# FFmpeg refuses an image whose (width + 128) × (height + 128) reaches this (av_image_check_size)
FFMPEG_IMAGE_LIMIT = (2**31 - 1) // 8


def decoder_takes(coded: tuple[int, int]) -> bool:
    """Whether FFmpeg's decoder takes an SPS of this coded size. One it refuses (no width, or a
    size past its image limit, ~2^28 pixels) is dropped: decoding goes on with the SPS it had,
    at that one's size; the file is not refused for it."""
    width, height = coded
    return width > 0 and height > 0 and (width + 128) * (height + 128) < FFMPEG_IMAGE_LIMIT


def sps_size(codec: str, nal: bytes) -> SpsSize:
    return h264_sps_size(nal) if codec == "h264" else hevc_sps_size(nal)


def largest_work(sizes: Iterable[SpsSize], at_least: tuple[int, int]) -> tuple[int, int]:
    """The largest of the work sizes (by pixels), and `at_least`'s (the header's) where none is larger."""
    largest = at_least
    for size in sizes:
        work = size.work
        if work[0] * work[1] > largest[0] * largest[1]:
            largest = work
    return largest


def decoded_size(path: Path, header_size: tuple[int, int], stop: DecodeStop | None = None) -> tuple[int, int]:
    """The largest frame size (work size, see SpsSize.work) an H.264 or HEVC stream's parameter
    sets declare, its header's and those in its samples, or `header_size` where none is larger.
    An MP4 or MOV's samples are read where FFmpeg's index places them (a few bytes per NAL unit);
    other containers' are demuxed (no decoding). UnknownSize where it cannot tell; DecodeStopped
    once `stop` is set."""
    with open_container(path) as container:
        stream = video_stream(container)
        codec = str(stream.codec_context.name or "") if stream is not None else ""
        if codec not in ("h264", "hevc"):
            return header_size
        length, units = header_sps(codec, bytes(stream.codec_context.extradata or b""))
        if length is None:
            raise UnknownSize("its NAL units are not length-prefixed (no avcC or hvcC record)")
        scan = _Scan(codec, length, stop)
        for unit in units:
            scan.add(unit, len(unit))
        mp4 = "mov" in container.format.name.split(",")  # MP4, MOV and their kin
        if mp4:
            _scan_descriptions(path, stream.index, scan)
        if mp4 and 0 < stream.frames == len(stream.index_entries):
            _scan_indexed(path, stream, scan)
        else:  # not an MP4, or one whose index lacks samples (fragments FFmpeg reads as it goes)
            _scan_demuxed(container, stream, scan)
    return largest_work(scan.sizes, header_size)


def _scan_descriptions(path: Path, track: int, scan: _Scan) -> None:
    """The parameter sets of each of an MP4 track's sample descriptions (FFmpeg hands the decoder
    another's as the samples switch to it)."""
    configs = decoder_configs(path, track)
    if configs is None:
        raise UnknownSize(f"its sample descriptions cannot be read (damaged, or over {SAMPLE_DESCRIPTIONS} or {STSD_BYTES:,} bytes)")
    for config in configs:
        length, units = header_sps(scan.codec, config)
        if length != scan.length:
            raise UnknownSize("its sample descriptions differ in the length of their NAL unit sizes")
        for unit in units:
            scan.add(unit, len(unit))


def _scan_indexed(path: Path, stream, scan: _Scan) -> None:
    """Each sample, where FFmpeg's index of the MP4's sample tables places it."""
    entries = stream.index_entries
    if len(entries) > SCAN_SAMPLES:
        raise UnknownSize(f"over {SCAN_SAMPLES:,} samples")
    with open_regular_file(path) as f:  # a FIFO swapped in since PyAV read it must not block
        fd = f.fileno()

        def read(at: int, count: int) -> bytes:
            return os.pread(fd, count, at)

        for entry in entries:
            if entry.pos >= 0 and entry.size > 0:
                scan.sample(read, entry.pos, entry.size)


def _scan_demuxed(container, stream, scan: _Scan) -> None:
    """Each packet, as demuxing (no decoding) gives them: MKV and WebM index only key frames."""
    for packet in container.demux(stream):
        if packet.size:
            data = memoryview(packet)  # not copied: a few bytes of each unit are read
            scan.sample(lambda at, count: bytes(data[at : at + count]), 0, len(data))
