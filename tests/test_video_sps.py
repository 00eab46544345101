"""The frame size an H.264 or HEVC stream declares in its parameter sets (video_sps): SPS parsed
from real encodes, and a stream whose header tells of small frames but whose samples carry a new,
larger SPS, which decord decodes at that size (showing frames of the header's): its decoding is
planned and counted at the larger size, so the limit refuses it. Frames are counted; no timings."""

from __future__ import annotations

import os
import random
import threading

import av
import pytest
from media_helpers import annex_b_units, encode_plain, h264_sps, nal_kind, with_second_description, write_inband_growing

from internvl_chat.errors import MediaError
from internvl_chat.files import NotRegularFile
from internvl_chat.media import video_header, video_sps
from internvl_chat.media.video import BACKEND_ENV, decode_cost, load_video
from internvl_chat.media.video_cost import DecodeOverBudget
from internvl_chat.media.video_sps import SpsSize, UnknownSize, decoded_size, h264_sps_size, hevc_sps_size
from internvl_chat.media.video_worker import DecodeStopped

QUIET_X265 = {"x265-params": "log-level=none"}


def first_sps(encoder: str, width: int, height: int, options: dict | None = None, pix_fmt: str = "yuv420p") -> bytes:
    data = b"".join(bytes(packet) for packet in encode_plain(encoder, width, height, 1, options, pix_fmt))
    sps = 7 if encoder == "libx264" else 33
    return next(unit for unit in annex_b_units(data) if nal_kind(encoder, unit) == sps)


@pytest.mark.parametrize(("width", "height", "options", "pix_fmt", "profile", "coded"), [
    (64, 48, {"profile": "baseline"}, "yuv420p", 66, (64, 48)),
    (100, 50, {"profile": "main"}, "yuv420p", 77, (112, 64)),  # cropped from whole macroblocks
    (1920, 1080, {"preset": "ultrafast"}, "yuv420p", 66, (1920, 1088)),  # cropped 8 rows
    (98, 62, {}, "yuv420p", 100, (112, 64)),  # High
    (98, 62, {"x264-params": "cqm=jvt"}, "yuv420p", 100, (112, 64)),  # High with scaling lists in its SPS
    (98, 62, {}, "yuv422p", 122, (112, 64)),  # High 4:2:2: cropped in chroma units of 2×1
    (98, 62, {"x264-params": "cqm=jvt"}, "yuv444p", 244, (112, 64)),  # High 4:4:4: 12 scaling lists, units of 1×1
])  # fmt: skip
def test_h264_sps_of_real_encodes_give_their_size(width, height, options, pix_fmt, profile, coded):
    sps = first_sps("libx264", width, height, options, pix_fmt)
    assert sps[1] == profile
    size = h264_sps_size(sps)
    assert (size.shown, size.coded, size.work) == ((width, height), coded, (width, height))


@pytest.mark.parametrize(("width", "height", "pix_fmt", "coded"), [
    (64, 48, "yuv420p", (64, 48)), (98, 62, "yuv420p", (104, 64)), (98, 62, "yuv444p", (104, 64)),
    (1280, 720, "yuv420p", (1280, 720)),
])  # fmt: skip
def test_hevc_sps_of_real_encodes_give_their_size(width, height, pix_fmt, coded):
    size = hevc_sps_size(first_sps("libx265", width, height, QUIET_X265, pix_fmt))
    assert (size.shown, size.coded, size.work) == ((width, height), coded, (width, height))


def test_an_sps_of_the_longest_codes_reads_its_size():
    """Scaling lists of every delta at its longest code (17 bits) and a picture order cycle of 255
    offsets at theirs (63 bits): each code is read where it lies."""
    sps = h264_sps(120, 68, scaling_delta=-128, poc_cycle=[-(2**31) + 1] * 255)
    assert len(sps) > 3000
    assert h264_sps_size(sps).coded == (1920, 1088)
    assert h264_sps_size(h264_sps(8191, 1)).coded == (8191 * 16, 16)  # a width code of 25 bits


def test_a_number_of_over_31_leading_zeros_is_refused():
    sps = h264_sps(4, 3)
    with pytest.raises(UnknownSize, match="an SPS holds an invalid number"):
        h264_sps_size(sps[:4] + b"\x00\x00\x03\x00\x00\x03\x00\x00\x03\x00\x00\x03\x01")
    with pytest.raises(UnknownSize, match="an SPS ends early"):
        h264_sps_size(sps[:4] + b"\x00\x00\x03\x00")


class _BitByBit:
    """The plainest reader of the same codes: the RBSP as one integer, an exp-Golomb code's leading
    zeros read a bit at a time (as the spec writes it; slow, but plainly right)."""

    def __init__(self, data: bytes) -> None:
        self._value, self._left = int.from_bytes(data, "big"), 8 * len(data)

    def u(self, count: int) -> int:
        if count > self._left:
            raise UnknownSize("an SPS ends early")
        self._left -= count
        return (self._value >> self._left) & ((1 << count) - 1)

    def ue(self) -> int:
        zeros = 0
        while not self.u(1):
            zeros += 1
            if zeros > 31:
                raise UnknownSize("an SPS holds an invalid number")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


def _reads(reader, reads: list[tuple[str, int]]) -> list:
    values = []
    try:
        for kind, count in reads:
            values.append(reader.u(count) if kind == "u" else getattr(reader, kind)())
    except UnknownSize as e:
        values.append(e.reason)
    return values


def test_the_bit_reader_reads_what_a_bit_by_bit_one_reads():
    """_Bits reads each code from the bytes it spans and counts a code's leading zeros at once:
    on any bytes, each read gives the same value, or stops with the same reason, as the plain reader."""
    rng = random.Random(0)
    for _ in range(20_000):
        # few-valued bytes too: long runs of zeros (the longest codes, none over 31 zeros) and of ones
        pick = (lambda: rng.choice([0, 0, 0, 1, 0x80, 0xFF])) if rng.random() < 0.3 else (lambda: rng.randrange(256))
        data = bytes(pick() for _ in range(rng.randrange(12)))
        reads = [(rng.choice(["u", "ue", "se"]), rng.choice([0, 1, 3, 8, 9, 31, 32, 33, 40])) for _ in range(rng.randrange(1, 12))]
        assert _reads(video_sps._Bits(data), reads) == _reads(_BitByBit(data), reads), (data.hex(), reads)


def test_a_cropping_that_hides_more_than_block_alignment_counts_the_coded_size():
    """Decoding works on the coded frame: a 4096×4096 one cropped to 64×48 is no 64×48 frame."""
    assert SpsSize((4096, 4096), (64, 48), slack=16).work == (4096, 4096)
    assert SpsSize((1920, 1088), (1920, 1080), slack=16).work == (1920, 1080)


def test_an_sps_cut_short_cannot_tell_a_size():
    sps = first_sps("libx264", 98, 62)
    with pytest.raises(UnknownSize, match="an SPS ends early"):
        h264_sps_size(sps[:6])


@pytest.mark.parametrize("name", ["grows.mp4", "grows.mkv"])
def test_decord_plans_a_stream_at_the_larger_size_its_samples_declare(tmp_path, monkeypatch, name):
    """The header says 64×48; from frame 10 the stream's own SPS says 512×512: decord decodes those
    at 512×512 and shows them at 64×48, so only the SPS tell. The plan counts every frame at
    512×512, and a limit that 64×48 frames would fit refuses it before any frame is decoded."""
    pytest.importorskip("decord")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = write_inband_growing(tmp_path / name, small=10, large=20)
    assert decoded_size(path, (64, 48)) == (512, 512)
    cost = decode_cost(path, 8)
    assert (cost.backend, cost.width, cost.height) == ("decord", 512, 512)
    with pytest.raises(DecodeOverBudget) as err:
        load_video(path, 8, max_decode_pixels=1_000_000)  # the frames decord decodes, at 64×48: 409,600
    assert err.value.cost == cost
    assert "frames of 512×512" in str(err.value)
    result = load_video(path, 8, max_decode_pixels=cost.pixels)
    assert (result.backend, result.decoded_pixels) == ("decord", cost.pixels)


def test_decord_counts_an_hevc_stream_at_the_larger_size_its_samples_declare(tmp_path, monkeypatch):
    pytest.importorskip("decord")
    monkeypatch.setenv(BACKEND_ENV, "decord")  # our x265 clips have reordering set: PyAV's by default
    path = write_inband_growing(tmp_path / "grows_hevc.mp4", small=10, large=20, encoder="libx265")
    cost = decode_cost(path, 8)
    assert (cost.width, cost.height) == (512, 512)
    with pytest.raises(DecodeOverBudget):
        load_video(path, 8, max_decode_pixels=1_000_000)


def test_past_the_bounds_of_the_walk_pyav_decodes_and_counts_each_frame(tmp_path, monkeypatch):
    """A stream whose samples are not all walked is not decord's: PyAV's decoding sees each frame's
    size, and stops at the limit; decord forced says why it cannot and what to do."""
    pytest.importorskip("decord")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = write_inband_growing(tmp_path / "grows.mp4", small=10, large=20)
    monkeypatch.setattr(video_sps, "SCAN_SAMPLES", 16)
    assert decode_cost(path, 8).backend == "pyav"
    with pytest.raises(DecodeOverBudget, match="its frames are larger than its header says"):
        load_video(path, 8, max_decode_pixels=1_000_000)
    monkeypatch.setenv(BACKEND_ENV, "decord")
    with pytest.raises(MediaError) as err:
        decode_cost(path, 8)
    assert str(err.value) == (f"decord cannot tell the frame size of {path}: unset {BACKEND_ENV} (it forces decord) or set "
                              "it to pyav (decord: over 16 samples)")  # fmt: skip


def test_a_stream_of_one_size_is_planned_at_its_header_size(tmp_path, monkeypatch):
    """In-band SPS that repeat the header's (a stream cut from a broadcast, x264's repeat-headers)
    change nothing."""
    pytest.importorskip("decord")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = write_inband_growing(tmp_path / "same.mp4", small=30, large=0)  # an SPS at each of its 3 key frames
    assert decoded_size(path, (1, 1)) == (64, 48)
    cost = decode_cost(path, 8)
    assert (cost.backend, cost.width, cost.height) == ("decord", 64, 48)


def test_the_walk_of_a_long_clip_stops_when_asked(tmp_path):
    """Ctrl-C or a client gone (the decoding worker's stop) ends the walk within 1,024 samples."""
    path = write_inband_growing(tmp_path / "long.mp4", small=1100, large=0)
    stop = threading.Event()
    assert decoded_size(path, (1, 1), stop) == (64, 48)
    stop.set()
    with pytest.raises(DecodeStopped):
        decoded_size(path, (1, 1), stop)


def test_the_sps_of_every_sample_description_count(tmp_path, monkeypatch):
    """FFmpeg hands the decoder another sample description's parameter sets as the samples switch
    to it: a second description of 512×512 frames makes the plan count 512×512."""
    pytest.importorskip("decord")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    small = write_inband_growing(tmp_path / "small.mp4", small=30, large=0)
    with av.open(str(tmp_path / "large.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 512
        for packet in stream.encode(av.VideoFrame(512, 512, "yuv420p")) + stream.encode():
            container.mux(packet)
    path = with_second_description(small, tmp_path / "large.mp4", tmp_path / "two.mp4")
    assert decode_cost(small, 8).width == 64
    cost = decode_cost(path, 8)
    assert (cost.backend, cost.width, cost.height) == ("decord", 512, 512)


def _walk(codec: str, units: list[bytes]) -> tuple[int, int]:
    """The size a sample of these NAL units (4-byte sizes) declares, over a 64×48 header."""
    scan = video_sps._Scan(codec, 4, None)
    sample = b"".join(len(unit).to_bytes(4, "big") + unit for unit in units)
    scan.sample(lambda at, count: sample[at : at + count], 0, len(sample))
    return video_sps.largest_work(scan.sizes, (64, 48))


def test_sps_units_the_decoder_drops_do_not_count():
    """FFmpeg drops an HEVC NAL unit of a layer above the base (MV-HEVC's second view: its SPS has
    another syntax), one with a temporal id of 0, and any whose forbidden bit is set: a size they
    seem to declare is not decoded at."""
    large = first_sps("libx265", 512, 512, QUIET_X265)
    assert _walk("hevc", [large]) == (512, 512)
    layer_1 = bytes([large[0], large[1] | 1 << 3]) + large[2:]  # nuh_layer_id 1
    temporal_0 = bytes([large[0], large[1] & 0xF8]) + large[2:]
    forbidden = bytes([large[0] | 0x80]) + large[1:]
    for unit in (layer_1, temporal_0, forbidden):
        assert _walk("hevc", [unit]) == (64, 48)
    h264 = first_sps("libx264", 512, 512)
    assert _walk("h264", [h264]) == (512, 512)
    assert _walk("h264", [bytes([h264[0] | 0x80]) + h264[1:]]) == (64, 48)


def test_a_sample_of_as_many_nal_units_as_the_bound_is_walked(monkeypatch):
    monkeypatch.setattr(video_sps, "NALS_PER_SAMPLE", 3)
    delimiter = b"\x09\xf0"  # an access unit delimiter
    assert _walk("h264", [delimiter] * 3) == (64, 48)
    with pytest.raises(UnknownSize, match="^a sample of over 3 NAL units$"):
        _walk("h264", [delimiter] * 4)


def test_an_hvcc_record_of_version_0_is_read_as_ffmpeg_reads_it(tmp_path):
    """FFmpeg takes HEVC extradata that does not open with a start code for an hvcC record, version
    0 too (written by muxers before the format was final); only 00 00 00/01 opens Annex B."""
    path = write_inband_growing(tmp_path / "hevc.mp4", small=2, large=0, encoder="libx265")
    with av.open(str(path)) as container:
        record = bytes(container.streams.video[0].codec_context.extradata)
    length, units = video_sps.header_sps("hevc", record)
    assert length == 4 and len(units) == 1
    assert video_sps.header_sps("hevc", b"\x00" + record[1:]) == (length, units)
    assert video_sps.header_sps("hevc", b"\x00\x00\x00\x01" + units[0]) == (None, [])


def test_the_profiles_whose_sps_holds_chroma_and_scaling_lists_are_ffmpegs():
    """FFmpeg reads the chroma format, bit depths and scaling lists in the SPS of its list of
    profiles: the old High 4:4:4 (144) among them, MVC's 134, 135 and 139 not (those come in a
    subset SPS, NAL type 15, which it does not decode): the SPS is read as the decoder reads it."""
    high = bytearray(first_sps("libx264", 98, 62, {"x264-params": "cqm=jvt"}, "yuv444p"))
    high[1] = 144
    assert h264_sps_size(bytes(high)).shown == (98, 62)
    main = bytearray(first_sps("libx264", 100, 50, {"profile": "main"}))
    main[1] = 139
    assert h264_sps_size(bytes(main)).shown == (100, 50)


def test_a_new_sps_is_parsed_only_while_the_walk_is_wanted():
    """Ctrl-C or a client gone ends the walk at the next distinct SPS too, not only every 1,024
    samples: a few samples may carry many."""
    scan = video_sps._Scan("h264", 4, stop := threading.Event())
    scan.add(h264_sps(4, 3), len(h264_sps(4, 3)))
    stop.set()
    scan.add(h264_sps(4, 3), len(h264_sps(4, 3)))  # known: nothing to parse
    with pytest.raises(DecodeStopped):
        scan.add(h264_sps(8, 8), len(h264_sps(8, 8)))


def test_over_64_distinct_sps_are_past_the_bound():
    """Real streams have a few SPS (H.264 allows 32 ids, HEVC 16): 64 are walked, 65 are not."""
    units = [h264_sps(4 + number, 3) for number in range(64)]
    assert _walk("h264", units) == (67 * 16, 48)
    with pytest.raises(UnknownSize, match="^over 64 different SPS$"):
        _walk("h264", [*units, h264_sps(100, 3)])


def test_an_sps_larger_than_the_largest_scaling_lists_need_is_past_the_bound():
    """The largest scaling lists at their longest codes fit 3 KiB (H.264's in 1,032 bytes); a
    picture order cycle of 255 offsets at their longest codes does not."""
    lists = h264_sps(32, 32, scaling_delta=-128)
    assert _walk("h264", [lists + b"\x00" * (3072 - len(lists))]) == (512, 512)  # trailing zeros, as FFmpeg reads them
    cycle = h264_sps(32, 32, scaling_delta=-128, poc_cycle=[-(2**31) + 1] * 255)
    assert len(cycle) > 3072
    with pytest.raises(UnknownSize, match=f"^an SPS of {len(cycle):,} bytes$"):
        _walk("h264", [cycle])


def test_a_fifo_swapped_in_for_the_file_is_not_read(tmp_path):
    """The samples are read from the path PyAV opened: a FIFO put there since is refused, not read
    (with no writer, opening it would wait forever). Held open here for reading and writing, so
    that an open without the check would not block this test."""
    path = write_inband_growing(tmp_path / "clip.mp4", small=2, large=0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fifo = tmp_path / "fifo.mp4"
        os.mkfifo(fifo)
        held = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            with pytest.raises(NotRegularFile):
                video_sps._scan_indexed(fifo, stream, video_sps._Scan("h264", 4, None))
        finally:
            os.close(held)


def test_the_sample_descriptions_are_not_read_from_a_fifo(tmp_path):
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    found = []
    reader = threading.Thread(target=lambda: found.append(video_header.decoder_configs(fifo, 0)), daemon=True)
    reader.start()
    reader.join(30)  # without the check it waits for a writer
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let it go
    assert found == [None]


class _CountedReads:
    """A file whose reads are added up."""

    def __init__(self, f, counted: list[int]) -> None:
        self._f, self._counted = f, counted

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def read(self, count: int = -1) -> bytes:
        data = self._f.read(count)
        self._counted.append(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def test_the_sample_descriptions_are_read_without_the_rest_of_the_moov(tmp_path, monkeypatch):
    """decord's every open of an MP4 looks for its sample descriptions: only the box headers on the
    way to them are read, and the stsd box, not a moov of megabytes (a long recording's tables; a
    1 MiB free box in it here)."""
    path = write_inband_growing(tmp_path / "clip.mp4", small=2, large=0)
    data = bytearray(path.read_bytes())
    moov = data.index(b"moov") - 4
    assert moov + int.from_bytes(data[moov : moov + 4], "big") == len(data)  # the moov comes last
    data += (8 + (1 << 20)).to_bytes(4, "big") + b"free" + bytes(1 << 20)
    data[moov : moov + 4] = (len(data) - moov).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    expected = video_header.decoder_configs(path, 0)
    assert expected is not None and len(expected) == 1
    counted: list[int] = []
    real = video_header.open_regular_file
    monkeypatch.setattr(video_header, "open_regular_file", lambda p: _CountedReads(real(p), counted))
    assert video_header.decoder_configs(path, 0) == expected
    assert sum(counted) < 4096


def test_a_sample_description_box_past_its_bound_is_not_read(tmp_path, monkeypatch):
    path = write_inband_growing(tmp_path / "clip.mp4", small=2, large=0)
    monkeypatch.setattr(video_header, "STSD_BYTES", 64)
    assert video_header.decoder_configs(path, 0) is None
    monkeypatch.setattr(video_sps, "STSD_BYTES", 64)
    with pytest.raises(UnknownSize, match="^its sample descriptions cannot be read \\(damaged, or over 256 or 64 bytes\\)$"):
        decoded_size(path, (64, 48))


def test_an_sps_of_a_size_ffmpeg_refuses_is_dropped_as_ffmpeg_drops_it():
    """FFmpeg's decoder refuses an SPS whose (width + 128) × (height + 128) reaches 2^28 (its
    image limit) and goes on with the SPS it had: the size it declares is not decoded at."""
    assert _walk("h264", [h264_sps(1015, 1015)]) == (16240, 16240)  # 16,368² is under the limit
    assert _walk("h264", [h264_sps(1024, 1024)]) == (64, 48)  # 16,512² is not
    assert _walk("h264", [h264_sps(2048, 1)]) == (32768, 16)
    assert _walk("h264", [h264_sps(2048, 1024), h264_sps(32, 32)]) == (512, 512)
    assert video_sps.decoder_takes(hevc_sps_size(first_sps("libx265", 64, 48, QUIET_X265)).coded)
    assert not video_sps.decoder_takes((0, 48)) and not video_sps.decoder_takes((40000, 40000))


def test_a_file_with_an_sps_ffmpeg_refuses_decodes_at_the_size_it_had(tmp_path, monkeypatch):
    """A 32,768×16,384 SPS in a 64×48 stream (over the frame limit) does not refuse the file:
    FFmpeg drops it and decodes on at 64×48, and the plan counts 64×48."""
    pytest.importorskip("decord")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    path = write_inband_growing(tmp_path / "odd.mp4", small=30, large=0, extra=h264_sps(2048, 1024))
    assert decoded_size(path, (64, 48)) == (64, 48)
    cost = decode_cost(path, 8)
    assert (cost.backend, cost.width, cost.height) == ("decord", 64, 48)
    result = load_video(path, 8, max_decode_pixels=cost.pixels)
    assert (result.backend, result.decoded_pixels) == ("decord", cost.pixels)
